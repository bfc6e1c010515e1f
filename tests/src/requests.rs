//! Request helpers on [`TestHub`], so that a test reads as what it checks: a request to an API
//! path with a bearer token, a JSON or byte body read back after a 2xx, and the status and
//! error `code` of a request the hub refuses.

use crate::fixtures::http;
use crate::hub::TestHub;
use anyhow::Context;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use synchub_protocol::{ApiError, DEFAULT_SPACE};

/// `/spaces/{DEFAULT_SPACE}{rest}`: an API path in the default space.
pub fn in_default_space(rest: &str) -> String {
    format!("/spaces/{DEFAULT_SPACE}{rest}")
}

impl TestHub {
    /// A `method` request to the API `path` (under `/api/v1`) with `token` as bearer.
    pub fn request(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        http().request(method, self.api(path)).bearer_auth(token)
    }

    /// `GET path` as `token`.
    pub fn get(&self, path: &str, token: &str) -> RequestBuilder {
        self.request(Method::GET, path, token)
    }

    /// `POST path` as `token` with `body` as JSON.
    pub fn post(&self, path: &str, token: &str, body: &impl Serialize) -> RequestBuilder {
        self.request(Method::POST, path, token).json(body)
    }

    /// `PUT path` as `token` with `body`.
    pub fn put(&self, path: &str, token: &str, body: impl Into<reqwest::Body>) -> RequestBuilder {
        self.request(Method::PUT, path, token).body(body)
    }

    /// `GET path` as `token`; fails unless the hub answers 2xx; the JSON body.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        token: &str,
    ) -> anyhow::Result<T> {
        let r = self.get(path, token).send().await?.error_for_status()?;
        r.json()
            .await
            .with_context(|| format!("JSON of GET {path}"))
    }

    /// `GET path` as `token`; fails unless the hub answers 2xx; the body.
    pub async fn get_bytes(&self, path: &str, token: &str) -> anyhow::Result<bytes::Bytes> {
        let r = self.get(path, token).send().await?.error_for_status()?;
        Ok(r.bytes().await?)
    }
}

/// Sends `request`: its status and the `code` of the [`ApiError`] it answered with (fails
/// when the body is not one).
pub async fn refusal(request: RequestBuilder) -> anyhow::Result<(StatusCode, String)> {
    let r = request.send().await?;
    let status = r.status();
    let error: ApiError = r
        .json()
        .await
        .with_context(|| format!("an API error body with {status}"))?;
    Ok((status, error.code))
}
