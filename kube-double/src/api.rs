//! The core API (`/api/v1`): pods and namespaces, list/watch/get/create/replace/patch/delete,
//! plus the discovery endpoints a client may probe.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Router, routing};
use serde_json::{Value, json};

use crate::Shared;
use crate::error::ApiError;
use crate::select::Selector;
use crate::store::{Kind, ObjKey, parse_rv};
use crate::watch::{self, Start, WatchRequest};

type Params = Query<HashMap<String, String>>;
type ApiResult = Result<Response, ApiError>;

/// The apiserver's default watch lifetime is 30–60 minutes when the client sets none.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api", get(api_versions))
        .route("/api/v1", get(api_resources))
        .route("/api/v1/pods", get(all_pods))
        .route("/api/v1/namespaces", get(namespaces).post(create_namespace))
        .route(
            "/api/v1/namespaces/{ns}",
            get(get_namespace)
                .put(put_namespace)
                .patch(patch_namespace)
                .delete(delete_namespace),
        )
        .route(
            "/api/v1/namespaces/{ns}/status",
            get(get_namespace)
                .put(put_namespace_status)
                .patch(patch_namespace_status),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods",
            get(namespace_pods).post(create_pod),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}",
            get(get_pod)
                .put(put_pod)
                .patch(patch_pod)
                .delete(delete_pod),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/status",
            routing::get(get_pod)
                .put(put_pod_status)
                .patch(patch_pod_status),
        )
        .route(
            "/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
            routing::post(crate::tokens::request_token),
        )
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            routing::post(crate::tokens::review),
        )
        .with_state(shared)
}

async fn version() -> Json<Value> {
    Json(json!({
        "major": "1", "minor": "34", "gitVersion": "v1.34.0-meshiam-double",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
    }))
}

async fn api_versions() -> Json<Value> {
    Json(json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    }))
}

async fn api_resources() -> Json<Value> {
    let verbs = json!([
        "create", "delete", "get", "list", "patch", "update", "watch"
    ]);
    let status_verbs = json!(["get", "patch", "update"]);
    Json(json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": "namespaces", "singularName": "namespace", "namespaced": false,
             "kind": "Namespace", "verbs": verbs, "shortNames": ["ns"]},
            {"name": "namespaces/status", "singularName": "", "namespaced": false,
             "kind": "Namespace", "verbs": status_verbs},
            {"name": "pods", "singularName": "pod", "namespaced": true,
             "kind": "Pod", "verbs": verbs, "shortNames": ["po"]},
            {"name": "pods/status", "singularName": "", "namespaced": true,
             "kind": "Pod", "verbs": status_verbs},
        ],
    }))
}

fn is_true(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("true" | "1"))
}

fn nonempty<'a>(q: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    q.get(name).map(String::as_str).filter(|s| !s.is_empty())
}

async fn all_pods(State(s): State<Arc<Shared>>, Query(q): Params) -> ApiResult {
    collection(s, Kind::Pod, None, q)
}

async fn namespace_pods(
    State(s): State<Arc<Shared>>,
    Path(ns): Path<String>,
    Query(q): Params,
) -> ApiResult {
    collection(s, Kind::Pod, Some(ns), q)
}

async fn namespaces(State(s): State<Arc<Shared>>, Query(q): Params) -> ApiResult {
    collection(s, Kind::Namespace, None, q)
}

/// A list, or with `watch=true` a watch, of a collection.
fn collection(
    shared: Arc<Shared>,
    kind: Kind,
    namespace: Option<String>,
    q: HashMap<String, String>,
) -> ApiResult {
    let selector = Selector::parse(
        kind,
        nonempty(&q, "fieldSelector"),
        nonempty(&q, "labelSelector"),
    )?;
    let rv = nonempty(&q, "resourceVersion");
    let rv_match = nonempty(&q, "resourceVersionMatch");
    if is_true(q.get("watch")) {
        let bookmarks = is_true(q.get("allowWatchBookmarks"));
        let send_initial = is_true(q.get("sendInitialEvents"));
        if send_initial && !bookmarks {
            return Err(ApiError::invalid(
                "sendInitialEvents: Forbidden: sendInitialEvents requires setting \
                 allowWatchBookmarks to true",
            ));
        }
        let start = match rv {
            _ if send_initial => Start::Initial { end_bookmark: true },
            None | Some("0") => Start::Initial {
                end_bookmark: false,
            },
            Some(rv) => Start::After(parse_rv(rv)?),
        };
        let timeout = match nonempty(&q, "timeoutSeconds") {
            Some(t) => Duration::from_secs(
                t.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
            ),
            None => DEFAULT_WATCH_TIMEOUT,
        };
        shared.stats.watches.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            kind = kind.kind(),
            namespace = namespace.as_deref().unwrap_or(""),
            resource_version = rv.unwrap_or(""),
            field_selector = nonempty(&q, "fieldSelector").unwrap_or(""),
            "watch"
        );
        let req = WatchRequest {
            kind,
            namespace,
            selector,
            start,
            bookmarks,
            timeout,
        };
        let body = Body::from_stream(watch::stream(shared, req));
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    }

    shared.stats.lists.fetch_add(1, Ordering::Relaxed);
    let limit = match nonempty(&q, "limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        None => 0,
    };
    // The continue token is ours: "<resourceVersion>/<namespace>/<name>" of the last item sent.
    let cont = match nonempty(&q, "continue") {
        Some(c) => {
            if rv.is_some() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let mut parts = c.splitn(3, '/');
            match (parts.next().map(parse_rv), parts.next(), parts.next()) {
                (Some(Ok(at)), Some(ns), Some(name)) => Some((at, ns.to_owned(), name.to_owned())),
                _ => return Err(ApiError::bad_request("invalid continue token")),
            }
        }
        None => None,
    };
    if rv_match.is_some() && rv.is_none() {
        return Err(ApiError::invalid(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless \
             resourceVersion is provided",
        ));
    }
    let (items, list_rv) = {
        let db = shared.db();
        let current = db.rv();
        let at = match (&cont, rv, rv_match) {
            (Some((at, _, _)), _, _) => Some(*at),
            (None, None | Some("0"), _) => None,
            (None, Some(rv), m) => {
                let rv = parse_rv(rv)?;
                if rv > current {
                    return Err(ApiError::new(
                        504,
                        "Timeout",
                        format!("Too large resource version: {rv}, current: {current}"),
                    ));
                }
                match m {
                    Some("Exact") => Some(rv),
                    None | Some("NotOlderThan") => None,
                    Some(other) => {
                        return Err(ApiError::bad_request(format!(
                            "unsupported resourceVersionMatch {other:?}"
                        )));
                    }
                }
            }
        };
        let items = db.snapshot(kind, namespace.as_deref(), at);
        if matches!(items, Err(ref e) if e.code == 410) {
            shared.stats.expired.fetch_add(1, Ordering::Relaxed);
        }
        (items?, at.unwrap_or(current))
    };
    let mut items: Vec<_> = items
        .into_iter()
        .filter(|o| selector.matches(o))
        .filter(|o| match &cont {
            Some((_, ns, name)) => {
                let meta = &o["metadata"];
                let key = (
                    meta["namespace"].as_str().unwrap_or_default(),
                    meta["name"].as_str().unwrap_or_default(),
                );
                key > (ns.as_str(), name.as_str())
            }
            None => true,
        })
        .collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if limit > 0 && items.len() > limit {
        let remaining = items.len() - limit;
        items.truncate(limit);
        if let Some(last) = items.last() {
            let meta = &last["metadata"];
            metadata["continue"] = json!(format!(
                "{list_rv}/{}/{}",
                meta["namespace"].as_str().unwrap_or_default(),
                meta["name"].as_str().unwrap_or_default()
            ));
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let items: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut o = (**o).clone();
            // Items of a typed list carry no apiVersion/kind of their own.
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let list = json!({
        "kind": format!("{}List", kind.kind()),
        "apiVersion": "v1",
        "metadata": metadata,
        "items": items,
    });
    Ok(Json(list).into_response())
}

fn ok(obj: Arc<Value>) -> ApiResult {
    Ok(Json(&*obj).into_response())
}

fn created(obj: Arc<Value>) -> ApiResult {
    Ok((StatusCode::CREATED, Json(&*obj)).into_response())
}

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The patched object. Merge and strategic-merge patches are both applied as JSON merge
/// patches (the double knows no patch strategies: lists are replaced whole).
fn patched(
    shared: &Shared,
    key: &ObjKey,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Value, ApiError> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !matches!(
        ctype.split(';').next().unwrap_or_default().trim(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the double supports merge and strategic-merge patches, not {ctype:?}"),
        ));
    }
    let patch = body_json(body)?;
    let mut obj = (*shared
        .db()
        .get(key)
        .ok_or_else(|| ApiError::not_found(key))?)
    .clone();
    merge_patch(&mut obj, &patch);
    Ok(obj)
}

/// Keeps everything of the stored object but its status, which comes from `new`.
fn with_status(shared: &Shared, key: &ObjKey, new: &Value) -> Result<Value, ApiError> {
    let mut obj = (*shared
        .db()
        .get(key)
        .ok_or_else(|| ApiError::not_found(key))?)
    .clone();
    obj["status"] = new["status"].clone();
    if let Some(rv) = new["metadata"]["resourceVersion"].as_str() {
        obj["metadata"]["resourceVersion"] = json!(rv);
    }
    Ok(obj)
}

fn pod_key(ns: String, name: String) -> ObjKey {
    ObjKey::new(Kind::Pod, ns, name)
}

fn ns_key(name: String) -> ObjKey {
    ObjKey::new(Kind::Namespace, "", name)
}

async fn get_pod(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult {
    let key = pod_key(ns, name);
    ok(s.db().get(&key).ok_or_else(|| ApiError::not_found(&key))?)
}

async fn create_pod(
    State(s): State<Arc<Shared>>,
    Path(ns): Path<String>,
    body: Bytes,
) -> ApiResult {
    let obj = body_json(&body)?;
    created(s.write(|db| db.create(Kind::Pod, Some(&ns), obj))?)
}

async fn put_pod(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let key = pod_key(ns, name);
    let obj = body_json(&body)?;
    ok(s.write(|db| db.replace(&key, obj))?)
}

async fn patch_pod(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let key = pod_key(ns, name);
    let obj = patched(&s, &key, &headers, &body)?;
    ok(s.write(|db| db.replace(&key, obj))?)
}

async fn put_pod_status(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let key = pod_key(ns, name);
    let obj = with_status(&s, &key, &body_json(&body)?)?;
    ok(s.write(|db| db.replace(&key, obj))?)
}

async fn patch_pod_status(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let key = pod_key(ns, name);
    let obj = with_status(&s, &key, &patched(&s, &key, &headers, &body)?)?;
    ok(s.write(|db| db.replace(&key, obj))?)
}

async fn delete_pod(
    State(s): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult {
    let key = pod_key(ns, name);
    ok(s.write(|db| db.delete(&key))?)
}

async fn get_namespace(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> ApiResult {
    let key = ns_key(name);
    ok(s.db().get(&key).ok_or_else(|| ApiError::not_found(&key))?)
}

async fn create_namespace(State(s): State<Arc<Shared>>, body: Bytes) -> ApiResult {
    let obj = body_json(&body)?;
    created(s.write(|db| db.create(Kind::Namespace, None, obj))?)
}

async fn put_namespace(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let key = ns_key(name);
    let obj = body_json(&body)?;
    ok(s.write(|db| db.replace(&key, obj))?)
}

async fn patch_namespace(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let key = ns_key(name);
    let obj = patched(&s, &key, &headers, &body)?;
    ok(s.write(|db| db.replace(&key, obj))?)
}

async fn put_namespace_status(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let key = ns_key(name);
    let obj = with_status(&s, &key, &body_json(&body)?)?;
    ok(s.write(|db| db.replace(&key, obj))?)
}

async fn patch_namespace_status(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let key = ns_key(name);
    let obj = with_status(&s, &key, &patched(&s, &key, &headers, &body)?)?;
    ok(s.write(|db| db.replace(&key, obj))?)
}

async fn delete_namespace(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> ApiResult {
    let key = ns_key(name);
    ok(s.write(|db| db.delete_namespace(&key))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
    }
}
