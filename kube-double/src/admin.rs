//! `/_double/…`: test controls over HTTP, for the out-of-process demo stack. Never subject to
//! injected failures.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::{PodsFile, Shared};

type Params = Query<HashMap<String, String>>;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_double/stats", get(stats))
        .route("/_double/compact", post(compact))
        .route("/_double/close-watches", post(close_watches))
        .route("/_double/hang-watches", post(hang_watches))
        .route("/_double/fail", post(fail))
        .route("/_double/slow", post(slow))
        .route("/_double/recover", post(recover))
        .route("/_double/pods", post(apply_pods).delete(delete_pods))
        .with_state(shared)
}

fn number(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{name}: not a number: {v:?}")))
        })
        .transpose()
}

/// `ms` (how long the fault lasts); absent means until `/_double/recover`.
fn duration(q: &HashMap<String, String>) -> Result<Option<Duration>, ApiError> {
    Ok(number(q, "ms")?.map(Duration::from_millis))
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<Value> {
    let rv = s.db().rv();
    Json(json!({"resourceVersion": rv.to_string(), "stats": s.stats()}))
}

async fn compact(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"compactedTo": s.compact().to_string()}))
}

async fn close_watches(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.close_watches();
    tracing::info!("all watches closed");
    Json(json!({"closed": true}))
}

/// `POST /_double/hang-watches?ms=30000`: open and new watches go silent without closing.
async fn hang_watches(
    State(s): State<Arc<Shared>>,
    Query(q): Params,
) -> Result<Json<Value>, ApiError> {
    let d = duration(&q)?;
    s.hang_watches(d);
    tracing::info!(ms = d.map(|d| d.as_millis() as u64), "watches hang");
    Ok(Json(
        json!({"hang": true, "ms": d.map(|d| d.as_millis() as u64)}),
    ))
}

/// `POST /_double/fail?status=503&ms=2000`
async fn fail(State(s): State<Arc<Shared>>, Query(q): Params) -> Result<Json<Value>, ApiError> {
    let status = number(&q, "status")?.unwrap_or(503);
    if !(400..=599).contains(&status) {
        return Err(ApiError::bad_request("status must be 400–599"));
    }
    let d = duration(&q)?;
    s.set_failure(status as u16, d);
    tracing::info!(
        status,
        ms = d.map(|d| d.as_millis() as u64),
        "failing requests"
    );
    Ok(Json(
        json!({"status": status, "ms": d.map(|d| d.as_millis() as u64)}),
    ))
}

/// `POST /_double/slow?delayMs=500&ms=2000`
async fn slow(State(s): State<Arc<Shared>>, Query(q): Params) -> Result<Json<Value>, ApiError> {
    let delay = Duration::from_millis(number(&q, "delayMs")?.unwrap_or(1000));
    let d = duration(&q)?;
    s.set_delay(delay, d);
    tracing::info!(delay_ms = delay.as_millis() as u64, "slowing requests");
    Ok(Json(
        json!({"delayMs": delay.as_millis() as u64, "ms": d.map(|d| d.as_millis() as u64)}),
    ))
}

async fn recover(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.recover();
    tracing::info!("faults cleared");
    Json(json!({"recovered": true}))
}

fn parse_file(body: &Bytes) -> Result<PodsFile, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("body is not UTF-8"))?;
    PodsFile::parse(text).map_err(|e| ApiError::bad_request(format!("invalid pods file: {e}")))
}

/// `POST /_double/pods` with a pods YAML body: create or replace what it lists.
async fn apply_pods(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let file = parse_file(&body)?;
    let (pods, namespaces) = s.apply_pods_file(&file)?;
    tracing::info!(pods, namespaces, "applied pods file");
    Ok(Json(
        json!({"applied": {"pods": pods, "namespaces": namespaces}}),
    ))
}

/// `DELETE /_double/pods` with a pods YAML body: delete what it names.
async fn delete_pods(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let file = parse_file(&body)?;
    let (pods, namespaces) = s.delete_pods_file(&file)?;
    tracing::info!(pods, namespaces, "deleted from pods file");
    Ok(Json(
        json!({"deleted": {"pods": pods, "namespaces": namespaces}}),
    ))
}
