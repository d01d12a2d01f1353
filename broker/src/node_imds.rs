//! The node's own metadata service, for allow-listed non-credential paths
//! (`placement/region`, …). Uses an IMDSv2 token of the node's own (cached for most of its
//! TTL) and caches answers: these values do not change while the node runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshiam_imds::headers;
use tokio::time::Instant;

const TOKEN_TTL: u64 = 21_600;
/// Largest answer relayed; allow-listed documents are tiny.
const MAX_ANSWER: usize = 64 * 1024;

pub struct NodeImds {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    cache_ttl: Duration,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    answers: Mutex<HashMap<String, (Instant, u16, Bytes)>>,
}

impl std::fmt::Debug for NodeImds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeImds")
            .field("base", &self.base)
            .finish()
    }
}

impl NodeImds {
    /// `base_url` such as `http://169.254.169.254` (no trailing slash needed).
    pub fn new(base_url: &str, timeout: Duration, cache_ttl: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
            cache_ttl,
            token: tokio::sync::Mutex::new(None),
            answers: Mutex::new(HashMap::new()),
        }
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, u16, Bytes)>> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET /latest/<rel>` on the node's IMDS: its status (200 or 404) and body.
    pub async fn get(&self, rel: &str) -> Result<(u16, Bytes), String> {
        if let Some((at, status, body)) = self.answers().get(rel).cloned()
            && at.elapsed() < self.cache_ttl
        {
            return Ok((status, body));
        }
        let mut token = self.token(false).await?;
        let mut answer = self.fetch(rel, token.as_deref()).await?;
        if answer.0 == 401 {
            token = self.token(true).await?;
            answer = self.fetch(rel, token.as_deref()).await?;
        }
        match answer.0 {
            200 | 404 => {
                self.answers().insert(
                    rel.to_string(),
                    (Instant::now(), answer.0, answer.1.clone()),
                );
                Ok(answer)
            }
            s => Err(format!("answered {s}")),
        }
    }

    /// The node's IMDSv2 token; `None` when the node's IMDS does not issue tokens (v1 only).
    async fn token(&self, force: bool) -> Result<Option<String>, String> {
        let mut cached = self.token.lock().await;
        if !force
            && let Some((t, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(Some(t.clone()));
        }
        let req = http::Request::put(format!("{}/latest/api/token", self.base))
            .header(headers::TOKEN_TTL, TOKEN_TTL.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("token request: {e}"))?;
        let (status, body) = self.send(req).await?;
        if status != 200 {
            *cached = None;
            return Ok(None);
        }
        let t = String::from_utf8_lossy(&body).trim().to_string();
        // Renew well before the node's IMDS would refuse it.
        *cached = Some((
            t.clone(),
            Instant::now() + Duration::from_secs(TOKEN_TTL - 600),
        ));
        Ok(Some(t))
    }

    async fn fetch(&self, rel: &str, token: Option<&str>) -> Result<(u16, Bytes), String> {
        let mut req = http::Request::get(format!("{}/latest/{rel}", self.base));
        if let Some(t) = token {
            req = req.header(headers::TOKEN, t);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("request: {e}"))?;
        self.send(req).await
    }

    async fn send(&self, req: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), String> {
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("unreachable: {e}"))?;
            let status = resp.status().as_u16();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|_| "answer too large or broken".to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| "timed out".to_string())?
    }
}
