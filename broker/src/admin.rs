//! The admin port: `/healthz`, `/readyz` and `/metrics` for the kubelet and Prometheus, and,
//! only with `--debug-endpoints` and only to callers on the node's loopback,
//! `/debug/pods[/{namespace}/{name}]`, which explains what a pod gets and why.
//!
//! The admin port listens on the node's addresses (the DaemonSet runs on the host network
//! so probes and scrapes reach it), so every pod can reach it too: nothing but the debug
//! endpoints names a pod, a role or a key, and those are off by default and refused to any
//! caller that is not on the node itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use meshiam_imds::headers;
use serde_json::{Value, json};

use crate::Broker;
use crate::error::BrokerError;
use crate::pods::{IpLookup, PodKey, canonical};
use crate::policy::PolicyError;

/// What the admin port serves besides health, readiness and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdminConfig {
    /// `/debug/pods…`, to loopback callers only.
    pub debug_endpoints: bool,
}

/// Health, readiness and metrics; no debug endpoints.
pub fn router(broker: Arc<Broker>) -> Router {
    router_with(broker, AdminConfig::default())
}

pub fn router_with(broker: Arc<Broker>, cfg: AdminConfig) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if cfg.debug_endpoints {
        let debug = Router::new()
            .route("/debug/pods", get(list_pods))
            .route("/debug/pods/{namespace}/{name}", get(explain_pod))
            .route_layer(middleware::from_fn(loopback_only));
        app = app.merge(debug);
    }
    app.with_state(broker)
}

/// True for the node's own loopback addresses. Not the whole of 127.0.0.0/8: the local
/// stack's loopback mode gives its pretend pods 127.1.0.x.
pub fn is_node_loopback(ip: IpAddr) -> bool {
    matches!(canonical(ip), IpAddr::V4(v4) if v4 == Ipv4Addr::LOCALHOST)
        || canonical(ip) == IpAddr::V6(Ipv6Addr::LOCALHOST)
}

async fn loopback_only(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if is_node_loopback(peer.ip()) {
        return next.run(req).await;
    }
    tracing::warn!(
        target: "meshiam::security",
        event = "debug-endpoint-refused",
        caller = %peer.ip(),
        path = req.uri().path(),
        "security event: debug endpoint asked from off the node's loopback"
    );
    (
        StatusCode::FORBIDDEN,
        [(
            header::HeaderName::from_static(headers::REASON),
            HeaderValue::from_static("debug-loopback-only"),
        )],
        "debug endpoints answer only on the node's loopback (127.0.0.1, ::1)\n",
    )
        .into_response()
}

/// Why the broker is not ready, if it is not.
pub fn not_ready_reasons(b: &Broker) -> Vec<String> {
    let mut why = Vec::new();
    if !b.store.is_ready() {
        why.push("pod store has not synced".to_string());
    }
    if let Err(stale) = b.store.check_fresh(b.serve.max_staleness) {
        why.push(format!(
            "pod store stale, IMDS requests refused (pod-store-stale): {stale}"
        ));
    }
    if b.policy.base_arn().is_none() {
        why.push("base role ARN not known yet (GetCallerIdentity has not answered)".to_string());
    }
    why
}

async fn readyz(State(b): State<Arc<Broker>>) -> Response {
    let why = not_ready_reasons(&b);
    if why.is_empty() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", why.join("; ")),
        )
            .into_response()
    }
}

async fn metrics(State(b): State<Arc<Broker>>) -> Response {
    b.metrics.set_pods_tracked(b.store.len());
    b.metrics.set_cache_entries(b.cache.len());
    b.metrics.set_pod_store_stale(
        b.store
            .down_for()
            .map_or(0.0, |(_, down_for)| down_for.as_secs_f64()),
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        b.metrics.encode(),
    )
        .into_response()
}

async fn list_pods(State(b): State<Arc<Broker>>) -> Json<Value> {
    let pods: Vec<Value> = b
        .store
        .pods()
        .iter()
        .map(|p| {
            let ns = b.store.namespace(&p.namespace);
            let verdict = match b.policy.decide(p, ns.as_deref()) {
                Ok(d) => json!({"roleArn": d.role_arn}),
                Err(e) => json!({"refused": BrokerError::Policy(e).reason()}),
            };
            json!({"pod": p.key().to_string(), "ips": p.ips, "live": p.is_live(), "hostNetwork": p.host_network, "role": verdict})
        })
        .collect();
    Json(json!({ "ready": b.store.is_ready(), "pods": pods }))
}

async fn explain_pod(
    State(b): State<Arc<Broker>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let key = PodKey::new(namespace, name);
    match explain(&b, &key) {
        Some(v) => Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"pod": key.to_string(), "found": false, "verdict": "unknown-pod"})),
        )
            .into_response(),
    }
}

/// What `key` gets and why: identity, role, session, restriction verdict, cache state.
pub fn explain(b: &Broker, key: &PodKey) -> Option<Value> {
    let pod = b.store.pod(key)?;
    let addresses: Vec<Value> = pod
        .ips
        .iter()
        .map(|ip| {
            let lookup = match b.store.lookup_ip(*ip) {
                IpLookup::Pod(p) if p.key() == *key => "this pod".to_string(),
                IpLookup::Pod(p) => format!("another pod: {}", p.key()),
                IpLookup::Unknown => "not indexed (pod finished or host-network)".to_string(),
                IpLookup::HostNetwork => "host network: never served".to_string(),
                IpLookup::Ambiguous(keys) => format!(
                    "ambiguous, refused: {}",
                    keys.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            json!({"ip": ip, "lookup": lookup})
        })
        .collect();
    let identity_ok = pod.is_live()
        && !pod.host_network
        && pod
            .ips
            .iter()
            .any(|ip| matches!(b.store.lookup_ip(*ip), IpLookup::Pod(p) if p.key() == *key));
    let ns = b.store.namespace(&pod.namespace);
    let mut out = json!({
        "pod": key.to_string(),
        "found": true,
        "phase": format!("{:?}", pod.phase),
        "live": pod.is_live(),
        "hostNetwork": pod.host_network,
        "serviceAccount": pod.service_account,
        "node": pod.node,
        "addresses": addresses,
        "roleAnnotation": pod.annotation(&b.policy.config().role_key),
        "roleAnnotationKey": b.policy.config().role_key,
        "namespaceKnown": ns.is_some(),
        "restrictionMode": b.policy.config().restriction,
    });
    let verdict = match b.policy.evaluate(&pod, ns.as_deref()) {
        Ok(d) => {
            let r = &d.request;
            out["decision"] = json!({
                "roleArn": d.role_arn,
                "roleName": d.role_name(),
                "source": d.source,
                "sessionName": r.session_name,
                "externalId": if r.external_id.is_some() { "set" } else { "none" },
                "sessionTags": r.tags.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "sourceIdentity": r.source_identity,
                "durationSeconds": r.duration_secs,
                "restriction": d.verdict,
            });
            out["cache"] = serde_json::to_value(b.cache.view(r)).unwrap_or(Value::Null);
            if !identity_ok {
                "not-served-identity"
            } else if !d.verdict.permitted {
                "role-not-permitted"
            } else {
                "served"
            }
        }
        Err(e) => {
            out["decision"] = Value::Null;
            out["refusal"] = json!({"detail": e.to_string()});
            match e {
                PolicyError::NoRole => "no-role",
                other => BrokerError::Policy(other).reason(),
            }
        }
    };
    out["verdict"] = json!(verdict);
    Some(out)
}
