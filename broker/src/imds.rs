//! The IMDS router: one set of rules for every request, whether it is a filter's call-out
//! or a pod (or anything that reaches the broker's address: an SSRF through an app) calling
//! directly.
//!
//! The broker cannot tell the two apart: both come from the pod's address, and any header
//! can be forged by whoever opens the connection. So nothing a caller sends relaxes a rule.
//! The caller is its TCP source address; the broker answers the IMDSv2 token PUT itself,
//! with tokens bound to the UID of the pod at that address (a token dies with its pod, even
//! when the next pod gets the address), and checks session tokens on every read according
//! to `--direct-mode` and the pod's `meshiam.io/imdsv2` annotation. The filter holds its own
//! broker token for its call-outs (see docs/architecture.md).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshiam_imds::rules::{self, Admission, ImdsHeaders, Seen};
use meshiam_imds::{
    PathClass, Resource, admit, check_session, classify, container, creds, headers,
};
use serde::Serialize;

use crate::Broker;
use crate::audit::{self, AuditEvent};
use crate::cache::{Cached, Purpose, Served};
use crate::container::{ContainerError, Verdict as ContainerVerdict};
use crate::error::BrokerError;
use crate::identity;
use crate::mtls::{self, Transport};
use crate::pods::{Pod, canonical};
use crate::policy::{Decision, PolicyError};

/// The metrics and audit label of the container-credentials door.
pub const CONTAINER_LABEL: &str = "container";

/// The pod annotation with which a pod demands IMDSv2 at the broker: `required` (any other
/// value than `optional` counts as `required`, so a typo never weakens it). Only tightens:
/// under `--direct-mode required` every pod needs a token anyway.
pub const IMDSV2_ANNOTATION: &str = "meshiam.io/imdsv2";

/// The broker's token rule for every read (`--direct-mode`), call-out or direct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectMode {
    /// Reads without a token are answered (IMDSv1), unless the pod's `meshiam.io/imdsv2`
    /// annotation says `required`; a token, when sent, must be valid. For pods without a
    /// sidecar that still use IMDSv1 (a kube2iam migration). Weakens SSRF protection: a
    /// GET that reaches the broker's address gets credentials.
    Optional,
    /// Every read needs a valid token from the broker's token PUT, whichever way it comes.
    Required,
}

impl DirectMode {
    pub const VALUES: [&str; 2] = ["required", "optional"];

    /// Parses the `--direct-mode` value; `off` is gone, with a message that says why.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "required" => Ok(DirectMode::Required),
            "optional" => Ok(DirectMode::Optional),
            "off" => Err(
                "`off` is no longer supported: the broker cannot tell a filter \
                          call-out from a direct request (same address, and any marker header \
                          can be forged), so it cannot refuse only the latter. Use `required` \
                          (the default): every read needs a broker token, and the filter \
                          holds one"
                    .into(),
            ),
            other => Err(format!(
                "{other:?} is not a direct mode (possible values: {})",
                Self::VALUES.join(", ")
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DirectMode::Required => "required",
            DirectMode::Optional => "optional",
        }
    }
}

/// True when reads of this pod need a valid token: the mode says so, or the pod does.
pub fn token_required(mode: DirectMode, pod: &Pod) -> bool {
    mode == DirectMode::Required
        || pod
            .annotation(IMDSV2_ANNOTATION)
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("optional"))
}

/// What a broker token is bound to: the pod's UID (and, should a source ever leave the UID
/// empty, its namespace and name). A new pod at the same address has another UID.
pub fn token_binding(pod: &Pod) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + pod.uid.len() + pod.namespace.len() + pod.name.len());
    b.extend_from_slice(b"pod-uid\0");
    b.extend_from_slice(pod.uid.as_bytes());
    b.push(0);
    b.extend_from_slice(pod.namespace.as_bytes());
    b.push(b'/');
    b.extend_from_slice(pod.name.as_bytes());
    b
}

/// The request headers the broker reads, as parsed names: a lookup by `&str` parses and
/// checks the name on every call. `pub(crate)` for the identity cross-check.
pub(crate) mod names {
    use axum::http::HeaderName;
    use meshiam_imds::headers;

    pub static TOKEN: HeaderName = HeaderName::from_static(headers::TOKEN);
    pub static TOKEN_TTL: HeaderName = HeaderName::from_static(headers::TOKEN_TTL);
    pub static FORWARDED_FOR: HeaderName = HeaderName::from_static(headers::FORWARDED_FOR);
    pub static FILTER: HeaderName = HeaderName::from_static(headers::FILTER);
    pub static POD_NAME: HeaderName = HeaderName::from_static(headers::POD_NAME);
    pub static POD_NAMESPACE: HeaderName = HeaderName::from_static(headers::POD_NAMESPACE);
}

/// What a request is served with: the broker, the slots of requests waiting for an unknown
/// address, and the slots of identified requests doing work (`--max-concurrency`).
struct Ctx {
    broker: Arc<Broker>,
    waiters: identity::Waiters,
    work: tokio::sync::Semaphore,
}

impl Ctx {
    /// One of the `--max-concurrency` slots of identified requests doing work (node IMDS,
    /// STS, TokenReview). The semaphore is never closed, so acquiring fails only if it were.
    async fn work_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, BrokerError> {
        self.work
            .acquire()
            .await
            .map_err(|_| BrokerError::NodeImds("shutting down".into()))
    }
}

/// The IMDS service, with request timeout, body and concurrency limits. Concurrency is
/// counted once the caller is known: a request waiting for an unknown address holds no
/// shared slot (its own cap is `--max-pod-waiters`), so known pods never queue behind it.
///
/// Every path goes to one handler, so the IMDS listener calls [`Imds::call`] directly
/// (`server::serve_fn`), without a router in between; [`router`] wraps the same call for
/// tests and embedding. Cheap to clone.
#[derive(Clone)]
pub struct Imds {
    ctx: Arc<Ctx>,
}

impl Imds {
    pub fn new(broker: Arc<Broker>) -> Self {
        let limits = &broker.serve;
        let ctx = Ctx {
            waiters: identity::Waiters::new(
                limits.max_pod_waiters_per_peer,
                limits.max_pod_waiters,
                broker.metrics.clone(),
            ),
            work: tokio::sync::Semaphore::new(limits.max_concurrency),
            broker,
        };
        Self { ctx: Arc::new(ctx) }
    }

    /// Answers one request from `peer`. Its body is never read: a request that declares a
    /// body over `max_body_bytes` is refused `413`; one that takes longer than
    /// `request_timeout` is answered `504`.
    pub async fn call<B>(&self, peer: SocketAddr, req: http::Request<B>) -> Response {
        let serve = &self.ctx.broker.serve;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > serve.max_body_bytes as u64) {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded");
        }
        let (parts, _body) = req.into_parts();
        match tokio::time::timeout(serve.request_timeout, handle(&self.ctx, peer, parts)).await {
            Ok(r) => r,
            Err(_) => StatusCode::GATEWAY_TIMEOUT.into_response(),
        }
    }
}

/// [`Imds`] as an axum router (the caller's address from `ConnectInfo`).
pub fn router(broker: Arc<Broker>) -> Router {
    let imds = Imds::new(broker);
    Router::new().fallback(
        move |ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request| async move {
            imds.call(peer, req).await
        },
    )
}

/// What the audit line needs, filled in as the request goes.
#[derive(Default)]
struct Trail {
    pod: Option<Arc<Pod>>,
    decision: Option<Arc<Decision>>,
    /// What was handed out (the audit line names its access key id).
    issued: Option<Arc<Cached>>,
    served: Option<Served>,
    /// The verified SPIFFE ID of the connection's workload certificate.
    peer_identity: Option<String>,
}

async fn handle(ctx: &Ctx, peer: SocketAddr, parts: http::request::Parts) -> Response {
    // Set by the IMDS listener on a TLS connection; absent on a plain one.
    let transport = parts.extensions.get::<Transport>().cloned();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let class = classify(path);
    let caller = canonical(peer.ip());
    // Informational only (audit): any caller can send the marker.
    let claimed_filter = filter_claim(&parts.headers);
    let mut trail = Trail::default();
    let broker = &ctx.broker;
    // The container-credentials door (EKS Pod Identity's path) has rules of its own.
    let container = container::is_path(path);
    let result = if container {
        serve_container(
            ctx,
            &mut trail,
            &parts.method,
            &parts.headers,
            caller,
            transport.as_ref(),
        )
        .await
    } else {
        serve(
            ctx,
            &mut trail,
            &parts.method,
            &class,
            &parts.headers,
            caller,
            transport.as_ref(),
        )
        .await
    };
    let label = if container {
        CONTAINER_LABEL
    } else {
        class.label()
    };
    let mut response = match result {
        Ok(r) => {
            broker.metrics.request(label, "ok");
            if container || matches!(class, PathClass::RoleCredentials(_)) {
                let outcome = match trail.served {
                    Some(Served::Stale) => "issued-stale",
                    _ => "issued",
                };
                audit::record(&event(
                    &trail,
                    caller,
                    path,
                    outcome,
                    200,
                    &claimed_filter,
                    None,
                ));
            }
            r
        }
        Err(e) => {
            let reason = e.reason();
            broker.metrics.request(label, reason);
            match e {
                BrokerError::IdentityMismatch { .. } => {
                    broker.metrics.identity_mismatch();
                    audit::identity_mismatch(caller, &e.to_string());
                }
                BrokerError::PeerCertificateInvalid(_)
                | BrokerError::PeerIdentityMismatch { .. } => {
                    audit::peer_certificate_refused(caller, reason, &e.to_string());
                }
                _ => {}
            }
            let status = e.status().as_u16();
            audit::record(&event(
                &trail,
                caller,
                path,
                reason,
                status,
                &claimed_filter,
                Some(e.to_string()),
            ));
            e.into_response()
        }
    };
    if parts.method == Method::HEAD {
        *response.body_mut() = Body::empty();
    }
    // A TLS connection judged before the roots changed, or long ago: this answer is its
    // last, the client reconnects and is judged again.
    if let Some(Transport::Tls(peer)) = &transport
        && peer.due_for_reverification()
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn event<'a>(
    t: &'a Trail,
    caller: std::net::IpAddr,
    path: &'a str,
    outcome: &'a str,
    status: u16,
    claimed_filter: &'a str,
    detail: Option<String>,
) -> AuditEvent<'a> {
    AuditEvent {
        caller: Some(caller),
        namespace: t.pod.as_deref().map(|p| p.namespace.as_str()),
        pod: t.pod.as_deref().map(|p| p.name.as_str()),
        role_arn: t.decision.as_ref().map(|d| d.role_arn.as_str()),
        session_name: t.decision.as_ref().map(|d| d.request.session_name.as_str()),
        access_key_id: t.issued.as_deref().map(|c| c.access_key_id.as_str()),
        path,
        outcome,
        status,
        claimed_filter,
        peer_identity: t.peer_identity.as_deref(),
        detail,
    }
}

/// The `x-meshiam-filter` value a caller sent, cut to safe characters for the audit line.
/// It proves nothing and changes no rule.
fn filter_claim(h: &HeaderMap) -> String {
    h.get(&names::FILTER)
        .map(|v| {
            let s: String = v
                .as_bytes()
                .iter()
                .map(|b| *b as char)
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'))
                .take(32)
                .collect();
            if s.is_empty() { "?".to_string() } else { s }
        })
        .unwrap_or_default()
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

fn json(body: impl Into<Body>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(headers::APPLICATION_JSON),
        )],
        body.into(),
    )
        .into_response()
}

/// Every value of one header: a header sent twice is refused, never read as its first copy.
fn seen<'a>(req_headers: &'a HeaderMap, name: &HeaderName) -> Seen<'a> {
    Seen::of(
        req_headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("\u{fffd}")),
    )
}

async fn serve(
    ctx: &Ctx,
    trail: &mut Trail,
    method: &Method,
    class: &PathClass<'_>,
    req_headers: &HeaderMap,
    caller: std::net::IpAddr,
    transport: Option<&Transport>,
) -> Result<Response, BrokerError> {
    let broker = &*ctx.broker;
    let imds_headers = ImdsHeaders {
        ttl: seen(req_headers, &names::TOKEN_TTL),
        token: seen(req_headers, &names::TOKEN),
        forwarded_for: req_headers.contains_key(&names::FORWARDED_FOR),
    };
    let admission = admit(method.as_str(), class, &imds_headers).map_err(BrokerError::Imds)?;
    // Every answer below, the token PUT included, rests on the caller's address: not while
    // the pod store may be missing the pod that holds it now.
    fresh(broker)?;
    let now = broker.clock.now();

    if let Admission::IssueToken { ttl } = admission {
        // A token is for one pod: the one at the caller's address now, by its UID.
        let pod =
            identity::identify(&broker.store, &ctx.waiters, caller, broker.serve.ip_wait).await?;
        fresh(broker)?;
        trail.pod = Some(pod.clone());
        // The workload certificate first: it is proof, the claimed identity a cross-check.
        peer_check(broker, trail, transport, &pod)?;
        identity::cross_check(&pod, req_headers)?;
        let token = broker
            .issuer
            .issue(now, ttl, &token_binding(&pod), &Broker::token_nonce());
        let mut r = text(StatusCode::OK, token);
        r.headers_mut()
            .insert(names::TOKEN_TTL.clone(), HeaderValue::from(ttl));
        return Ok(r);
    }

    // What the read is for, by the contract's rule; paths never answered are refused
    // before looking anyone up.
    let resource = Resource::of(class, &broker.serve.metadata_allow).map_err(BrokerError::Imds)?;

    let pod = identity::identify(&broker.store, &ctx.waiters, caller, broker.serve.ip_wait).await?;
    // The wait for an unknown address may have outlasted the bound.
    fresh(broker)?;
    trail.pod = Some(pod.clone());
    // The workload certificate, when --mtls asks for one: it must name this pod. Checked
    // before the claimed identity, which proves nothing by itself.
    peer_check(broker, trail, transport, &pod)?;
    identity::cross_check(&pod, req_headers)?;

    // The token rule, the same for every read: checked against the pod at the address now,
    // so a token issued to a pod that is gone is refused for the pod that took its address.
    let token = req_headers.get(&names::TOKEN).and_then(|v| v.to_str().ok());
    let required = token_required(broker.serve.direct_mode, &pod);
    check_session(token, &broker.issuer, now, &token_binding(&pod), required)
        .map_err(BrokerError::Imds)?;

    // From here on the request does work (node IMDS, STS): take a shared slot.
    let _work = ctx.work_slot().await?;

    if let Resource::Allowed(rel) = &resource {
        let (status, body) = broker
            .node_imds
            .get(rel)
            .await
            .map_err(BrokerError::NodeImds)?;
        if status == 404 {
            return Err(BrokerError::NodeNotFound);
        }
        return Ok(text(StatusCode::OK, body));
    }

    let decision = decide(broker, trail, &pod)?;

    match resource {
        Resource::RoleList => Ok(text(StatusCode::OK, decision.role_name().to_string())),
        Resource::IamInfo => Ok(json(creds::render_iam_info(
            now,
            &decision.role_arn.instance_profile_arn(),
            &instance_profile_id(decision.role_arn.as_str()),
        ))),
        Resource::Credentials(asked) => {
            if asked != decision.role_name() {
                return Err(BrokerError::NotPodRole {
                    asked,
                    own: decision.role_name().to_string(),
                });
            }
            let (c, served) = broker
                .cache
                .get(&decision.request, Purpose::Request)
                .await?;
            let doc = c.imds_json();
            trail.issued = Some(c);
            trail.served = Some(served);
            Ok(json(doc))
        }
        // Answered from the node's IMDS above; the container door is `serve_container`.
        Resource::Allowed(_) | Resource::ContainerCredentials(_) => {
            Err(BrokerError::Imds(rules::NOT_FOUND))
        }
    }
}

fn peer_check(
    broker: &Broker,
    trail: &mut Trail,
    transport: Option<&Transport>,
    pod: &Pod,
) -> Result<(), BrokerError> {
    if broker.serve.mtls.mode == mtls::MtlsMode::Off {
        return Ok(());
    }
    let ns = broker.store.namespace(&pod.namespace);
    match mtls::check(&broker.serve.mtls, transport, pod, ns.as_deref()) {
        Ok(Some(id)) => {
            broker.metrics.mtls_check("verified");
            trail.peer_identity = Some(id.to_string());
            Ok(())
        }
        Ok(None) => {
            broker.metrics.mtls_check("plain-allowed");
            Ok(())
        }
        Err(e) => {
            broker.metrics.mtls_check(e.reason());
            Err(e)
        }
    }
}

/// The pod's role by the policy (remembered per pod object, see
/// `RolePolicy::evaluate_cached`), refused when its namespace does not permit it.
fn decide(
    broker: &Broker,
    trail: &mut Trail,
    pod: &Arc<Pod>,
) -> Result<Arc<Decision>, BrokerError> {
    let ns = broker.store.namespace(&pod.namespace);
    let decision = broker.policy.evaluate_cached(pod, ns.as_ref())?;
    // Keep what we know for the audit line even when the restriction refuses.
    trail.decision = Some(decision.clone());
    if !decision.verdict.permitted {
        return Err(PolicyError::NotPermitted {
            role_arn: decision.role_arn.to_string(),
            rule: decision.verdict.rule.clone(),
        }
        .into());
    }
    Ok(decision)
}

/// `GET /v1/credentials`: the pod's role credentials in the container-credentials format
/// (see [`meshiam_imds::container`]). The same caller, freshness, cross-check, broker-token
/// rule, policy and credential cache as the IMDS credential path; on top, the request's
/// `Authorization` must be the calling pod's own service-account token (see
/// [`crate::container`]).
async fn serve_container(
    ctx: &Ctx,
    trail: &mut Trail,
    method: &Method,
    req_headers: &HeaderMap,
    caller: std::net::IpAddr,
    transport: Option<&Transport>,
) -> Result<Response, BrokerError> {
    let broker = &*ctx.broker;
    if method != Method::GET && method != Method::HEAD {
        return Err(BrokerError::Imds(rules::METHOD_NOT_ALLOWED));
    }
    let session = seen(req_headers, &names::TOKEN);
    if session == Seen::Repeated {
        return Err(BrokerError::Imds(rules::REPEATED_HEADER));
    }
    let auth = match seen(req_headers, &header::AUTHORIZATION) {
        Seen::Repeated => return Err(ContainerError::TokenRepeated.into()),
        Seen::Absent => return Err(ContainerError::TokenMissing.into()),
        Seen::Once(v) => match container::token(v) {
            Ok(t) => t,
            Err(r) if r == container::TOKEN_MISSING => {
                return Err(ContainerError::TokenMissing.into());
            }
            Err(r) if r == container::TOKEN_REPEATED => {
                return Err(ContainerError::TokenRepeated.into());
            }
            Err(_) => {
                return Err(ContainerError::TokenInvalid("not a header-safe token".into()).into());
            }
        },
    };
    fresh(broker)?;
    let pod = identity::identify(&broker.store, &ctx.waiters, caller, broker.serve.ip_wait).await?;
    fresh(broker)?;
    trail.pod = Some(pod.clone());
    // The workload certificate, when --mtls asks for one, as on the IMDS paths.
    peer_check(broker, trail, transport, &pod)?;
    identity::cross_check(&pod, req_headers)?;
    let now = broker.clock.now();
    let required = token_required(broker.serve.direct_mode, &pod);
    check_session(
        session.once(),
        &broker.issuer,
        now,
        &token_binding(&pod),
        required,
    )
    .map_err(BrokerError::Imds)?;

    let _work = ctx.work_slot().await?;

    let reviewed = match broker
        .container
        .review(auth, &pod.uid, &broker.clock, &broker.metrics)
        .await?
    {
        ContainerVerdict::Accepted(r) => r,
        ContainerVerdict::Refused(why) => return Err(ContainerError::TokenInvalid(why).into()),
    };
    crate::container::check_pod(&reviewed, &pod)?;

    let decision = decide(broker, trail, &pod)?;
    let (c, served) = broker
        .cache
        .get(&decision.request, Purpose::Request)
        .await?;
    let body = container::render(&c, container::account_of(decision.role_arn.as_str()));
    trail.issued = Some(c);
    trail.served = Some(served);
    let mut r = json(body);
    r.headers_mut()
        .insert(container::TOKEN_EXPIRES, HeaderValue::from(reviewed.until));
    Ok(r)
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
