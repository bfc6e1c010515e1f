//! The fallback: while no WebSocket is up (or it is turned off), ask every space's head over
//! HTTP once per interval with `If-None-Match`, so an unchanged head costs the hub a 304 and
//! a change is seen within about one interval, push or no push.

use crate::agent::Agent;
use crate::hub_api::HeadCheck;
use crate::space::HeadSource;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A head check answered: the hub is reachable again.
fn answered(agent: &Agent) {
    agent.last_head_check.send_replace(Some(chrono::Utc::now()));
    if agent.hub_error.send_replace(None).is_some() {
        tracing::info!(hub = %agent.api.hub(), "hub answers again");
    }
}

/// Logs the first failure of a run at warn level (then debug: this repeats every second).
fn failed(agent: &Agent, space: &str, error: String) {
    if agent.hub_error.borrow().is_none() {
        tracing::warn!(hub = %agent.api.hub(), space, %error, "head check failed; retrying every interval");
    } else {
        tracing::debug!(space, %error, "head check failed");
    }
    agent.hub_error.send_replace(Some(error));
}

/// Checks the heads while no socket is up, until the agent stops.
pub(crate) async fn run(agent: Arc<Agent>) {
    let interval = Duration::from_millis(agent.config.fallback_interval_ms.max(50));
    // The WebSocket is off: this task also rotates hubs on failure.
    let only_channel = agent.config.disable_websocket;
    let mut connected = agent.connected.subscribe();
    let mut etags: HashMap<String, String> = HashMap::new();
    loop {
        if *connected.borrow_and_update() {
            // The socket carries the heads; wait until it goes down.
            etags.clear();
            agent.hub_error.send_replace(None);
            tokio::select! {
                r = connected.changed() => if r.is_err() { return },
                _ = agent.stopped() => return,
            }
            continue;
        }
        let tick = tokio::time::sleep(interval);
        for space in &agent.spaces {
            let etag = etags.get(&space.name).map(String::as_str);
            match agent.api.head(&space.name, etag).await {
                Ok(HeadCheck::NotModified) => answered(&agent),
                Ok(HeadCheck::Head { head, etag }) => {
                    answered(&agent);
                    match etag {
                        Some(t) => etags.insert(space.name.clone(), t),
                        None => etags.remove(&space.name),
                    };
                    space.offer_head(head, HeadSource::Poll);
                }
                Err(e) => {
                    failed(&agent, &space.name, e.to_string());
                    etags.clear();
                    if only_channel {
                        agent.api.rotate();
                    }
                    break;
                }
            }
        }
        tokio::select! {
            _ = tick => {}
            _ = agent.stopped() => return,
        }
    }
}
