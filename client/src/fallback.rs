//! The fallback: while no WebSocket is up (or it is turned off), ask every space's head over
//! HTTP once per interval with `If-None-Match`, so an unchanged head costs the hub a 304 and
//! a change is seen within about one interval, push or no push.

use crate::hub_api::{HeadCheck, HubApi};
use crate::space::{HeadSource, SpaceShared};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct FallbackContext {
    pub api: HubApi,
    pub spaces: Vec<Arc<SpaceShared>>,
    pub interval: Duration,
    /// The WebSocket is off: this task also rotates hubs on failure.
    pub only_channel: bool,
    /// Last time any head answer came back (for the status page).
    pub last_ok: watch::Sender<Option<chrono::DateTime<chrono::Utc>>>,
    /// Why the last check failed; cleared by the next answer.
    pub last_error: watch::Sender<Option<String>>,
}

impl FallbackContext {
    fn answered(&self) {
        self.last_ok.send_replace(Some(chrono::Utc::now()));
        if self.last_error.send_replace(None).is_some() {
            tracing::info!(hub = %self.api.hub(), "hub answers again");
        }
    }

    /// Logs the first failure of a run at warn level (then debug: this repeats every second).
    fn failed(&self, space: &str, error: String) {
        if self.last_error.borrow().is_none() {
            tracing::warn!(hub = %self.api.hub(), space, %error, "head check failed; retrying every interval");
        } else {
            tracing::debug!(space, %error, "head check failed");
        }
        self.last_error.send_replace(Some(error));
    }
}

pub async fn run(
    ctx: Arc<FallbackContext>,
    mut connected: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut etags: HashMap<String, String> = HashMap::new();
    loop {
        if *connected.borrow_and_update() {
            // The socket carries the heads; wait until it goes down.
            etags.clear();
            ctx.last_error.send_replace(None);
            tokio::select! {
                r = connected.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            continue;
        }
        let tick = tokio::time::sleep(ctx.interval);
        for space in &ctx.spaces {
            let etag = etags.get(&space.name).map(String::as_str);
            match ctx.api.head(&space.name, etag).await {
                Ok(HeadCheck::NotModified) => ctx.answered(),
                Ok(HeadCheck::Head { head, etag }) => {
                    ctx.answered();
                    match etag {
                        Some(t) => etags.insert(space.name.clone(), t),
                        None => etags.remove(&space.name),
                    };
                    space.offer_head(head, HeadSource::Poll);
                }
                Err(e) => {
                    ctx.failed(&space.name, e.to_string());
                    etags.clear();
                    if ctx.only_channel {
                        ctx.api.rotate();
                    }
                    break;
                }
            }
        }
        tokio::select! {
            _ = tick => {}
            _ = stop.changed() => return,
        }
    }
}
