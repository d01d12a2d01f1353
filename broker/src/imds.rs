//! The IMDS router: the same paths for the filter's call-outs and for pods calling directly.
//!
//! A request carrying `x-meshiam-filter` is a filter call-out: the filter has already applied
//! the token rules. Any other request is a pod calling directly (node-level redirect): the
//! broker then answers the token PUT itself, with tokens bound to the caller's address, and
//! checks session tokens on reads. Either way the caller is its TCP source address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshiam_imds::rules::{self, Admission, ImdsHeaders, Seen};
use meshiam_imds::{PathClass, admit, check_session, classify, creds, headers, is_allowed};
use serde::Serialize;

use crate::Broker;
use crate::audit::{self, AuditEvent};
use crate::cache::{Purpose, Served};
use crate::config::NEVER_FORWARDED;
use crate::error::BrokerError;
use crate::identity;
use crate::pods::{Pod, canonical};
use crate::policy::{Decision, PolicyError};

/// How pods calling the broker directly (without a sidecar) are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DirectMode {
    /// Only filter call-outs are answered.
    Off,
    /// IMDSv1 and IMDSv2 (a token, when sent, must be valid).
    Optional,
    /// IMDSv2 only: reads need a session token from the token PUT.
    Required,
}

/// The IMDS service, with request timeout, body and concurrency limits.
pub fn router(broker: Arc<Broker>) -> Router {
    let limits = broker.serve.clone();
    Router::new()
        .fallback(handle)
        .with_state(broker)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.max_concurrency,
        ))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            limits.max_body_bytes,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            limits.request_timeout,
        ))
}

/// What the audit line needs, filled in as the request goes.
#[derive(Default)]
struct Trail {
    pod: Option<Arc<Pod>>,
    decision: Option<Decision>,
    access_key_id: Option<String>,
    served: Option<Served>,
}

async fn handle(
    State(broker): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let (parts, _body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let class = classify(&path);
    let caller = canonical(peer.ip());
    let via = if parts.headers.contains_key(headers::FILTER) {
        "filter"
    } else {
        "direct"
    };
    let mut trail = Trail::default();
    let result = serve(
        &broker,
        &mut trail,
        &parts.method,
        &class,
        &parts.headers,
        caller,
        via,
    )
    .await;
    let label = class.label();
    let mut response = match result {
        Ok(r) => {
            broker.metrics.request(label, "ok");
            if matches!(class, PathClass::RoleCredentials(_)) {
                let outcome = match trail.served {
                    Some(Served::Stale) => "issued-stale",
                    _ => "issued",
                };
                audit::record(&event(&trail, caller, &path, outcome, 200, via, None));
            }
            r
        }
        Err(e) => {
            let reason = e.reason();
            broker.metrics.request(label, reason);
            if let BrokerError::IdentityMismatch { .. } = e {
                broker.metrics.identity_mismatch();
                audit::identity_mismatch(caller, &e.to_string());
            }
            let status = e.status().as_u16();
            audit::record(&event(
                &trail,
                caller,
                &path,
                reason,
                status,
                via,
                Some(e.to_string()),
            ));
            e.into_response()
        }
    };
    if parts.method == Method::HEAD {
        *response.body_mut() = Body::empty();
    }
    response
}

fn event<'a>(
    t: &'a Trail,
    caller: std::net::IpAddr,
    path: &'a str,
    outcome: &'a str,
    status: u16,
    via: &'a str,
    detail: Option<String>,
) -> AuditEvent<'a> {
    AuditEvent {
        caller: Some(caller),
        namespace: t.pod.as_deref().map(|p| p.namespace.as_str()),
        pod: t.pod.as_deref().map(|p| p.name.as_str()),
        role_arn: t.decision.as_ref().map(|d| d.role_arn.as_str()),
        session_name: t.decision.as_ref().map(|d| d.request.session_name.as_str()),
        access_key_id: t.access_key_id.as_deref(),
        path,
        outcome,
        status,
        via,
        detail,
    }
}

fn text(status: StatusCode, body: impl Into<Body>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(headers::TEXT_PLAIN),
        )],
        body.into(),
    )
        .into_response()
}

fn json(body: String) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(headers::APPLICATION_JSON),
        )],
        body,
    )
        .into_response()
}

fn imds_refusal(r: rules::Refusal) -> BrokerError {
    BrokerError::Imds {
        refusal: r,
        reason: r.reason,
    }
}

/// Every value of one header: a header sent twice is refused, never read as its first copy.
fn seen<'a>(req_headers: &'a HeaderMap, name: &str) -> Seen<'a> {
    Seen::of(
        req_headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("\u{fffd}")),
    )
}

async fn serve(
    broker: &Broker,
    trail: &mut Trail,
    method: &Method,
    class: &PathClass<'_>,
    req_headers: &HeaderMap,
    caller: std::net::IpAddr,
    via: &str,
) -> Result<Response, BrokerError> {
    let header = |name: &str| req_headers.get(name).and_then(|v| v.to_str().ok());
    let imds_headers = ImdsHeaders {
        ttl: seen(req_headers, headers::TOKEN_TTL),
        token: seen(req_headers, headers::TOKEN),
        forwarded_for: req_headers.contains_key(headers::FORWARDED_FOR),
    };
    let admission = admit(method.as_str(), class, &imds_headers).map_err(imds_refusal)?;
    // Every answer below, the token PUT included, rests on the caller's address: not while
    // the pod store may be missing the pod that holds it now.
    fresh(broker)?;
    let direct = via == "direct";
    let mode = broker.serve.direct_mode;
    let binding = caller.to_string();
    let now = broker.clock.now();

    if let Admission::IssueToken { ttl } = admission {
        if mode == DirectMode::Off {
            return Err(BrokerError::DirectDisabled);
        }
        let token = broker.issuer.issue(now, ttl, binding.as_bytes());
        let mut r = text(StatusCode::OK, token);
        r.headers_mut()
            .insert(headers::TOKEN_TTL, HeaderValue::from(ttl));
        return Ok(r);
    }

    if direct {
        let token = header(headers::TOKEN);
        let required = match mode {
            DirectMode::Off => return Err(BrokerError::DirectDisabled),
            DirectMode::Optional => false,
            DirectMode::Required => true,
        };
        check_session(token, &broker.issuer, now, binding.as_bytes(), required).map_err(|r| {
            BrokerError::Imds {
                refusal: r,
                reason: if token.is_some() {
                    "token-invalid"
                } else {
                    "token-required"
                },
            }
        })?;
    }

    // Paths never answered: refuse before looking anyone up.
    match class {
        PathClass::Invalid | PathClass::Token | PathClass::VersionedToken => {
            return Err(BrokerError::InvalidPath);
        }
        PathClass::Extended => return Err(BrokerError::Extended),
        PathClass::Other(rel)
            if !is_allowed(rel, &broker.serve.metadata_allow)
                || NEVER_FORWARDED.iter().any(|f| rel.starts_with(f)) =>
        {
            return Err(BrokerError::PathNotAllowed);
        }
        _ => {}
    }

    let pod = identity::identify(&broker.store, caller, broker.serve.ip_wait).await?;
    // The wait for an unknown address may have outlasted the bound.
    fresh(broker)?;
    trail.pod = Some(pod.clone());
    identity::cross_check(&pod, req_headers)?;

    if let PathClass::Other(rel) = class {
        let (status, body) = broker
            .node_imds
            .get(rel)
            .await
            .map_err(BrokerError::NodeImds)?;
        if status == 404 {
            return Err(BrokerError::PathNotAllowed);
        }
        return Ok(text(StatusCode::OK, body));
    }

    let ns = broker.store.namespace(&pod.namespace);
    let decision = broker.policy.evaluate(&pod, ns.as_deref())?;
    // Keep what we know for the audit line even when the restriction refuses.
    trail.decision = Some(decision.clone());
    if !decision.verdict.permitted {
        return Err(PolicyError::NotPermitted {
            role_arn: decision.role_arn,
            rule: decision.verdict.rule,
        }
        .into());
    }

    match class {
        PathClass::RoleList => Ok(text(StatusCode::OK, decision.role_name().to_string())),
        PathClass::IamInfo => {
            let arn = decision
                .role_arn
                .replacen(":role/", ":instance-profile/", 1);
            Ok(json(creds::render_iam_info(
                now,
                &arn,
                &instance_profile_id(&decision.role_arn),
            )))
        }
        PathClass::RoleCredentials(asked) => {
            if *asked != decision.role_name() {
                return Err(BrokerError::NotPodRole {
                    asked: (*asked).to_string(),
                    own: decision.role_name().to_string(),
                });
            }
            let (c, served) = broker
                .cache
                .get(&decision.request, Purpose::Request)
                .await?;
            trail.access_key_id = Some(c.access_key_id.clone());
            trail.served = Some(served);
            Ok(json(c.to_imds_json()))
        }
        _ => Err(BrokerError::InvalidPath),
    }
}

fn fresh(broker: &Broker) -> Result<(), BrokerError> {
    broker
        .store
        .check_fresh(broker.serve.max_staleness)
        .map_err(BrokerError::PodStoreStale)
}

/// A stable stand-in for an instance-profile id (`AIPA` + 17 characters), derived from the
/// role ARN: there is no real instance profile behind a pod's role.
pub fn instance_profile_id(role_arn: &str) -> String {
    use sha2::{Digest, Sha256};
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(role_arn.as_bytes());
    let mut id = String::from("AIPA");
    id.extend(
        digest
            .iter()
            .take(17)
            .map(|b| ALPHABET[(*b as usize) % 32] as char),
    );
    id
}
