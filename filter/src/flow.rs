//! The decisions for one request: is it metadata traffic, what IMDS would answer, whether
//! the broker must be asked, and what to tell the application when it answers or fails.
//!
//! Every metadata request ends in a local reply: nothing the application sent to the
//! metadata address is ever forwarded anywhere. The broker sees a call-out built here from
//! scratch, so no header of the application (an `x-meshiam-*` identity, its IMDSv2 token)
//! reaches it; the call-out carries the sidecar's own broker token instead
//! ([`broker_session`]), because the broker applies its token rule to every read.

use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::OnceCell;
use core::net::IpAddr;

use meshiam_imds::container;
use meshiam_imds::headers::{
    self, APPLICATION_JSON, FILTER, POD_NAME, POD_NAMESPACE, REASON, TEXT_PLAIN, TOKEN, TOKEN_TTL,
};
use meshiam_imds::rules::{self, Admission, ImdsHeaders, Refusal, Seen};
use meshiam_imds::token::NONCE_LEN;
use meshiam_imds::{Credentials, PathClass, Resource, classify};

use crate::cache::{self, Entry};
use crate::config::Config;
use crate::host::{Callout, CalloutResponse, Host, Level};
use crate::identity::{self, Door, Identity, SourceRefusal};
use crate::{broker_session, metrics, secret};

/// The filter's version, sent to the broker in `x-meshiam-filter`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Answers the filter itself marks, for operators and tests: `broker`, `cache`, `stale`.
pub const SOURCE_HEADER: &str = "x-meshiam-source";
/// The body of a metadata request refused because it did not come from the pod itself.
pub const NOT_THE_POD: &str = "metadata is answered only to the pod itself";
/// The broker's token PUT path (the filter's own broker session).
const TOKEN_PATH: &str = "/latest/api/token";
/// The largest broker answer the filter reads.
pub const MAX_BROKER_BODY: usize = 64 * 1024;

/// What the proxy should do with the request's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Not metadata traffic: on to the next filter, untouched.
    Continue,
    /// Answered locally, or waiting for the broker (which ends in a local reply).
    Pause,
}

/// State of one VM, shared by its request flows.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    /// Resolved on configure when possible, else on the first metadata request.
    pub identity: OnceCell<Identity>,
    /// The pod's own addresses (`None`: unknown), resolved on configure or on the first
    /// metadata request.
    pub pod_ips: OnceCell<Option<Vec<IpAddr>>>,
}

impl Shared {
    pub fn new(config: Config) -> Self {
        Shared {
            config,
            identity: OnceCell::new(),
            pod_ips: OnceCell::new(),
        }
    }

    pub fn pod_ips<H: Host>(&self, h: &H) -> Option<&[IpAddr]> {
        self.pod_ips
            .get_or_init(|| {
                let ips = identity::resolve_pod_ips(h, &self.config);
                if ips.is_none() {
                    h.log(
                        Level::Warn,
                        "meshiam: the pod's addresses are unknown (no podIps, no INSTANCE_IPS \
                         node metadata); only loopback connections are answered",
                    );
                }
                ips
            })
            .as_deref()
    }

    pub fn identity<H: Host>(&self, h: &H) -> &Identity {
        self.identity.get_or_init(|| {
            let id = identity::resolve(h, &self.config);
            if !id.is_complete() {
                h.log(
                    Level::Warn,
                    "meshiam: pod identity unknown (no NAMESPACE/NAME node metadata); \
                     the broker will rely on the source address alone",
                );
            }
            id
        })
    }
}

/// The metrics label of the container-credentials door.
pub const CONTAINER_LABEL: &str = "container";

/// The pod's service-account token on its way to the broker (container door). `Debug` never
/// shows it.
struct PodToken(String);

impl core::fmt::Debug for PodToken {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PodToken(<redacted>)")
    }
}

/// A read's call-out on its way. `key` says what it is for, and where its answer is cached.
#[derive(Debug)]
struct Pending {
    key: Resource,
    label: &'static str,
    head: bool,
    /// The pod's token for the container door, sent to the broker as `Authorization`.
    auth: Option<PodToken>,
}

/// Which call-out of a read is on its way.
#[derive(Debug)]
enum Stage {
    /// The token PUT for the filter's broker session; the read follows.
    Token { retried: bool },
    /// The read itself, with this broker token.
    Read { token: String, retried: bool },
}

/// A read waiting for the broker: what it is for, the path to ask, and the stage.
#[derive(Debug)]
struct InFlight {
    p: Pending,
    path: String,
    stage: Stage,
}

/// The decision flow of one HTTP request.
#[derive(Debug)]
pub struct RequestFlow {
    shared: Rc<Shared>,
    pending: Option<InFlight>,
}

impl RequestFlow {
    pub fn new(shared: Rc<Shared>) -> Self {
        RequestFlow {
            shared,
            pending: None,
        }
    }

    pub fn on_request_headers<H: Host>(&mut self, h: &H) -> Action {
        let cfg = &self.shared.config;
        let Some(door) = identity::door(h, cfg) else {
            return Action::Continue;
        };
        // Only the pod itself, before anything else: a connection from another pod or the
        // node gets neither a token nor a call-out made with this pod's identity.
        if let Err((why, ip)) = identity::check_source(h, self.shared.pod_ips(h)) {
            refuse_source(h, why, ip, door);
            return Action::Pause;
        }
        if door == Door::Container {
            self.container(h);
            return Action::Pause;
        }
        let method = h.request_header(":method").unwrap_or_default();
        let path = h.request_header(":path").unwrap_or_default();
        let head = method == "HEAD";
        let class = classify(&path);
        let label = class.label();
        // Every value of a header only where a repeat matters (token PUTs, reads carrying a
        // token): `request_header` sees the first value alone, and reading the whole map is
        // kept off the IMDSv1 hot path. An unreadable map is refused as a repeat.
        let all = |name: &str| h.request_header_values(name);
        let ttl = match (method.as_str(), &class) {
            ("PUT", PathClass::Token) => all(TOKEN_TTL),
            _ => Some(Vec::new()),
        };
        let token = match h.request_header(TOKEN) {
            Some(_) if method != "PUT" => all(TOKEN),
            _ => Some(Vec::new()),
        };
        fn seen(v: &Option<Vec<String>>) -> Seen<'_> {
            match v {
                Some(v) => Seen::of(v.iter().map(String::as_str)),
                None => Seen::Repeated,
            }
        }
        let imds_headers = ImdsHeaders {
            ttl: seen(&ttl),
            token: seen(&token),
            forwarded_for: h.request_header(headers::FORWARDED_FOR).is_some(),
        };
        match rules::admit(&method, &class, &imds_headers) {
            Err(r) => refuse(h, label, r, head),
            Ok(Admission::IssueToken { ttl }) => self.issue_token(h, ttl),
            Ok(Admission::Read) => self.read(h, &path, class, head),
        }
        Action::Pause
    }

    /// The container-credentials door: `GET /v1/credentials` with the pod's token in
    /// `Authorization`. The filter cannot check the token itself; the broker does
    /// (TokenReview) on every call-out, and a cached answer is keyed by the token's digest, so
    /// it only ever goes back to a request carrying the token the broker accepted.
    fn container<H: Host>(&mut self, h: &H) {
        let cfg = &self.shared.config;
        let method = h.request_header(":method").unwrap_or_default();
        let path = h.request_header(":path").unwrap_or_default();
        let head = method == "HEAD";
        let label = CONTAINER_LABEL;
        if !container::is_path(&path) {
            return refuse(h, label, container::NOT_FOUND, head);
        }
        if method != "GET" && !head {
            return refuse(h, label, rules::METHOD_NOT_ALLOWED, head);
        }
        let values = h.request_header_values(container::AUTHORIZATION);
        let auth = match values.as_deref() {
            None => return refuse(h, label, container::TOKEN_REPEATED, head),
            Some(v) => Seen::of(v.iter().map(String::as_str)),
        };
        let token = match auth {
            Seen::Repeated => return refuse(h, label, container::TOKEN_REPEATED, head),
            Seen::Absent => return refuse(h, label, container::TOKEN_MISSING, head),
            Seen::Once(v) => match container::token(v) {
                Ok(t) => t,
                Err(r) => return refuse(h, label, r, head),
            },
        };
        let key = Resource::ContainerCredentials(container::token_digest(token));
        if answered_from_cache(h, cfg, &key, label, head) {
            return;
        }
        let auth = Some(PodToken(String::from(token)));
        self.call_broker(
            h,
            container::PATH,
            Pending {
                key,
                label,
                head,
                auth,
            },
        );
    }

    fn issue_token<H: Host>(&self, h: &H, ttl: u32) {
        // Fail closed, and say why once per request: no token without its secret or a nonce.
        let cannot_issue = |why: &str| {
            h.log(
                Level::Error,
                &alloc::format!("meshiam: {why}; cannot issue tokens"),
            );
            answer(
                h,
                "token",
                503,
                TEXT_PLAIN,
                b"Service Unavailable",
                false,
                None,
            );
        };
        let Some(issuer) = secret::issuer_or_create(h) else {
            return cannot_issue("no token secret");
        };
        // Every token unique: a fresh nonce from the proxy's randomness.
        let mut nonce = [0u8; NONCE_LEN];
        if !h.fill_random(&mut nonce) {
            return cannot_issue("no randomness");
        }
        let binding = self.shared.identity(h).binding();
        let token = issuer.issue(h.now(), ttl, binding.as_bytes(), &nonce);
        let ttl = ttl.to_string();
        h.count(metrics::TOKENS_ISSUED);
        h.count(&metrics::request("token", 200));
        h.reply(
            200,
            &[("content-type", TEXT_PLAIN), (TOKEN_TTL, &ttl)],
            Some(token.as_bytes()),
        );
    }

    fn read<H: Host>(&mut self, h: &H, path: &str, class: PathClass<'_>, head: bool) {
        let cfg = &self.shared.config;
        let label = class.label();
        let token = h.request_header(TOKEN);
        if token.is_some() || cfg.require_imdsv2 {
            let Some(issuer) = secret::issuer_or_create(h) else {
                return answer(
                    h,
                    label,
                    503,
                    TEXT_PLAIN,
                    b"Service Unavailable",
                    head,
                    None,
                );
            };
            let binding = self.shared.identity(h).binding();
            if let Err(r) = rules::check_session(
                token.as_deref(),
                &issuer,
                h.now(),
                binding.as_bytes(),
                cfg.require_imdsv2,
            ) {
                return refuse(h, label, r, head);
            }
        }
        // What the read is for, by the contract's rule (`-extended` credential documents are
        // not implemented: SDKs fall back on 404).
        let key = match Resource::of(&class, &cfg.allow_paths) {
            Ok(k) => k,
            Err(r) => return refuse(h, label, r, head),
        };
        if answered_from_cache(h, cfg, &key, label, head) {
            return;
        }
        self.call_broker(
            h,
            path,
            Pending {
                key,
                label,
                head,
                auth: None,
            },
        );
    }

    /// Asks the broker, with the sidecar's broker token; gets one first when there is none
    /// (or it is close to expiry).
    fn call_broker<H: Host>(&mut self, h: &H, path: &str, p: Pending) {
        let path = String::from(path.split('?').next().unwrap_or(path));
        match broker_session::current(h) {
            Some(t) => self.dispatch_read(h, p, path, t.token, false),
            None => self.dispatch_token(h, p, path, false),
        }
    }

    /// The token PUT of the sidecar's broker session (see [`broker_session`]).
    fn dispatch_token<H: Host>(&mut self, h: &H, p: Pending, path: String, retried: bool) {
        let shared = self.shared.clone();
        let mut headers = call_headers(h, &shared, "PUT", TOKEN_PATH);
        headers.push((TOKEN_TTL, broker_session::TTL_HEADER_VALUE));
        h.count(metrics::BROKER_TOKENS);
        let started = start(h, &shared.config, headers);
        let stage = Stage::Token { retried };
        self.after_dispatch(h, started, InFlight { p, path, stage });
    }

    /// The read, with the broker token.
    fn dispatch_read<H: Host>(
        &mut self,
        h: &H,
        p: Pending,
        path: String,
        token: String,
        retried: bool,
    ) {
        let shared = self.shared.clone();
        let mut headers = call_headers(h, &shared, "GET", &path);
        headers.push((TOKEN, &token));
        if let Some(PodToken(auth)) = &p.auth {
            headers.push((container::AUTHORIZATION, auth));
        }
        let started = start(h, &shared.config, headers);
        let stage = Stage::Read { token, retried };
        self.after_dispatch(h, started, InFlight { p, path, stage });
    }

    fn after_dispatch<H: Host>(&mut self, h: &H, started: bool, f: InFlight) {
        if started {
            self.pending = Some(f);
            return;
        }
        h.log(
            Level::Warn,
            "meshiam: could not dispatch to the broker cluster (is it configured?)",
        );
        broker_failed(h, &self.shared.config, &f.p, 503, BROKER_UNAVAILABLE);
    }

    /// The broker answered, or the call-out failed (`resp.status == None`).
    pub fn on_callout_response<H: Host>(&mut self, h: &H, resp: CalloutResponse) {
        let Some(f) = self.pending.take() else {
            return;
        };
        match f.stage {
            Stage::Token { retried } => self.on_token_answer(h, f.p, f.path, retried, resp),
            // A 401 about the pod's own token (container door) is the application's answer,
            // not a refusal of the sidecar's broker token.
            Stage::Read { token, retried }
                if resp.status == Some(401)
                    && !resp
                        .reason
                        .as_deref()
                        .is_some_and(container::is_token_reason) =>
            {
                // The broker no longer takes our token (it restarted: new secret). Get a
                // new one and ask once more; a second 401 is a broker failure.
                broker_session::forget(h, &token);
                if retried {
                    h.log(
                        Level::Warn,
                        "meshiam: broker refused a fresh broker token for the read",
                    );
                    return broker_failed(h, &self.shared.config, &f.p, 502, BROKER_BAD_ANSWER);
                }
                h.log(
                    Level::Info,
                    "meshiam: broker refused the sidecar's broker token; getting a new one",
                );
                h.count(metrics::BROKER_TOKEN_RETRIES);
                self.dispatch_token(h, f.p, f.path, true);
            }
            Stage::Read { .. } => on_read_answer(h, &self.shared.config, &f.p, resp),
        }
    }

    /// The broker answered the token PUT: store the token and make the read, or fail the
    /// read as a failed call-out would (still-valid cached credentials, else fail closed).
    fn on_token_answer<H: Host>(
        &mut self,
        h: &H,
        p: Pending,
        path: String,
        retried: bool,
        resp: CalloutResponse,
    ) {
        let cfg = &self.shared.config;
        match resp.status {
            Some(200) => match broker_session::accept(&resp, h.now()) {
                Ok(t) => {
                    broker_session::store(h, &t);
                    self.dispatch_read(h, p, path, t.token, retried);
                }
                Err(why) => {
                    h.log(
                        Level::Warn,
                        &alloc::format!("meshiam: broker token answer refused: {why}"),
                    );
                    broker_failed(h, cfg, &p, 502, BROKER_BAD_ANSWER);
                }
            },
            // The broker does not know this pod (or it is not who we say): the read
            // would be refused the same way, so the application hears it.
            Some(403) => on_read_answer(h, cfg, &p, resp),
            Some(status @ 400..=499) => {
                h.log(
                    Level::Warn,
                    &alloc::format!(
                        "meshiam: broker refused the sidecar's token request with {status} (reason {})",
                        printable(resp.reason.as_deref().unwrap_or("-"))
                    ),
                );
                broker_failed(h, cfg, &p, 502, BROKER_BAD_ANSWER);
            }
            _ => on_read_answer(h, cfg, &p, resp),
        }
    }
}

/// The headers every call-out has, built from scratch (nothing the application sent):
/// method, path, the broker authority, the filter's version (informational: the broker
/// trusts no marker) and the identity the filter believes it serves (a cross-check).
fn call_headers<'a, H: Host>(
    h: &H,
    shared: &'a Shared,
    method: &'a str,
    path: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let id = shared.identity(h);
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(8);
    headers.push((":method", method));
    headers.push((":path", path));
    headers.push((":authority", &shared.config.broker_authority));
    headers.push((":scheme", "http"));
    headers.push((FILTER, VERSION));
    if let Some(ns) = &id.namespace {
        headers.push((POD_NAMESPACE, ns));
    }
    if let Some(n) = &id.name {
        headers.push((POD_NAME, n));
    }
    headers
}

/// Starts a call-out to the broker cluster; false when the proxy refuses to.
fn start<H: Host>(h: &H, cfg: &Config, headers: Vec<(&str, &str)>) -> bool {
    h.count(metrics::CALLOUTS);
    let call = Callout {
        cluster: &cfg.broker_cluster,
        headers,
        timeout_ms: cfg.broker_timeout_ms,
    };
    h.dispatch(&call).is_ok()
}

/// What the application gets for the broker's answer to a read.
fn on_read_answer<H: Host>(h: &H, cfg: &Config, p: &Pending, resp: CalloutResponse) {
    match resp.status {
        Some(200) => match accept(p, &resp, h.now()) {
            Ok(entry) => {
                if p.key == Resource::RoleList {
                    forget_other_role(h, &entry.body);
                }
                cache::put(h, &p.key, &entry);
                answer(
                    h,
                    p.label,
                    200,
                    &entry.content_type,
                    &entry.body,
                    p.head,
                    Some("broker"),
                );
            }
            Err(why) => {
                h.log(
                    Level::Warn,
                    &alloc::format!("meshiam: broker answer refused: {why}"),
                );
                broker_failed(h, cfg, p, 502, BROKER_BAD_ANSWER);
            }
        },
        Some(status @ 400..=499) => {
            let reason = resp.reason.as_deref().unwrap_or("-");
            // A pod without a role asks again and again: 404 is routine, 403 is not.
            let level = if status == 404 {
                Level::Debug
            } else {
                Level::Info
            };
            h.log(
                level,
                &alloc::format!(
                    "meshiam: broker refused {} with {status} (reason {})",
                    p.label,
                    printable(reason)
                ),
            );
            // 408 and 429 speak about load; every other refusal says this answer is no
            // longer the pod's (role removed or changed, not permitted): forget it.
            if !matches!(status, 408 | 429) {
                forget_refused(h, p);
            }
            let body = if resp.body.len() <= 256 && resp.body.is_ascii() {
                resp.body.as_slice()
            } else {
                b"Refused".as_slice()
            };
            let reason = relayed_reason(&resp);
            answer_with_reason(
                h,
                p.label,
                status,
                TEXT_PLAIN,
                body,
                p.head,
                Some("broker"),
                reason.as_deref(),
            );
        }
        Some(status @ 500..=599) => {
            h.log(
                Level::Warn,
                &alloc::format!(
                    "meshiam: broker failed {} with {status} (reason {})",
                    p.label,
                    printable(resp.reason.as_deref().unwrap_or("-"))
                ),
            );
            let status = match status {
                503 | 504 => status,
                _ => 502,
            };
            // A 5xx without a reason code is Envoy's own answer for the call-out (the
            // broker's connection refused or reset, no healthy host, an upstream timeout):
            // the broker did not answer.
            let reason = relayed_reason(&resp);
            broker_failed(
                h,
                cfg,
                p,
                status,
                reason.as_deref().unwrap_or(BROKER_UNAVAILABLE),
            );
        }
        Some(other) => {
            h.log(
                Level::Warn,
                &alloc::format!("meshiam: broker answered unexpected status {other}"),
            );
            broker_failed(h, cfg, p, 502, BROKER_BAD_ANSWER);
        }
        None => {
            h.log(
                Level::Warn,
                "meshiam: broker call-out failed without an answer",
            );
            broker_failed(h, cfg, p, 503, BROKER_UNAVAILABLE);
        }
    }
}

/// Checks a `200` from the broker and turns it into what the application gets.
fn accept(p: &Pending, resp: &CalloutResponse, now: u64) -> Result<Entry, &'static str> {
    let text = core::str::from_utf8(&resp.body).map_err(|_| "body is not UTF-8")?;
    let (content_type, body, expiration) = match &p.key {
        Resource::RoleList => {
            // Bare role name: botocore pastes the body into the next URL as is.
            let role = text.trim_end();
            if role.is_empty() || !role.bytes().all(|c| c.is_ascii_graphic()) || role.contains('/')
            {
                return Err("role list is not a role name");
            }
            (TEXT_PLAIN, role.as_bytes().to_vec(), 0)
        }
        Resource::Credentials(_) => {
            let c = Credentials::from_imds_json(text).map_err(|_| "unreadable credentials")?;
            if c.remaining(now) == 0 {
                return Err("credentials already expired");
            }
            // Re-rendered: field order and second-precision `Z` timestamps as SDKs expect.
            (
                APPLICATION_JSON,
                c.to_imds_json().into_bytes(),
                c.expiration,
            )
        }
        Resource::IamInfo => {
            meshiam_imds::creds::parse_flat_object(text).map_err(|_| "unreadable iam/info")?;
            (APPLICATION_JSON, resp.body.clone(), 0)
        }
        Resource::ContainerCredentials(_) => {
            let (c, account) =
                container::parse(text).map_err(|_| "unreadable container credentials")?;
            if c.remaining(now) == 0 {
                return Err("credentials already expired");
            }
            // Kept no longer than the broker's verdict on the token holds (no verdict: not
            // reused at all).
            let until = resp.token_expires.unwrap_or(now).min(c.expiration);
            (
                APPLICATION_JSON,
                container::render(&c, account.as_deref()).into_bytes(),
                until,
            )
        }
        Resource::Allowed(_) => {
            let ct = match resp.content_type.as_deref() {
                Some(ct) if ct.starts_with(APPLICATION_JSON) => APPLICATION_JSON,
                _ => TEXT_PLAIN,
            };
            (ct, resp.body.clone(), 0)
        }
    };
    Ok(Entry {
        fetched: now,
        expiration,
        content_type: String::from(content_type),
        body,
    })
}

/// The broker refused `p`: drop its cached answer, and when it was the role list (or the
/// credentials of the role the cached list names) also the list, that role's credentials and
/// `iam/info`, so no later outage serves them stale.
fn forget_refused<H: Host>(h: &H, p: &Pending) {
    let names_refused_role = |role: &str| {
        cache::get(h, &Resource::RoleList).is_some_and(|list| list.body == role.as_bytes())
    };
    match &p.key {
        Resource::RoleList => forget_other_role(h, b""),
        Resource::Credentials(role) if names_refused_role(role) => forget_other_role(h, b""),
        _ => {}
    }
    cache::forget(h, &p.key);
}

/// The pod's role is now `role` (empty: none). Drops what the cache holds for the role the
/// cached role list named, if that was another one.
fn forget_other_role<H: Host>(h: &H, role: &[u8]) {
    let Some(old) = cache::get(h, &Resource::RoleList) else {
        return;
    };
    if old.body == role {
        return;
    }
    if let Ok(old_role) = core::str::from_utf8(&old.body) {
        cache::forget(h, &Resource::Credentials(old_role.to_string()));
    }
    cache::forget(h, &Resource::IamInfo);
    cache::forget(h, &Resource::RoleList);
}

/// The broker could not answer: serve still-valid cached credentials, else fail closed.
/// Fails the request closed (unless a still-valid cached answer may be served). `reason` is
/// the `x-meshiam-reason` the application gets: the broker's own code when it gave one,
/// else why the filter gave up on the call-out.
fn broker_failed<H: Host>(h: &H, cfg: &Config, p: &Pending, status: u16, reason: &str) {
    h.count(metrics::CALLOUT_FAILURES);
    if let Some(e) = stale_entry(h, cfg, p) {
        h.count(metrics::STALE_SERVES);
        return answer(
            h,
            p.label,
            200,
            &e.content_type,
            &e.body,
            p.head,
            Some("stale"),
        );
    }
    let body: &[u8] = match status {
        503 => b"Service Unavailable",
        504 => b"Gateway Timeout",
        _ => b"Bad Gateway",
    };
    answer_with_reason(
        h,
        p.label,
        status,
        TEXT_PLAIN,
        body,
        p.head,
        None,
        Some(reason),
    );
}

/// A cached answer that may be served while the broker is down: credentials with more than
/// `staleMinRemainingSeconds` left, or the role list when the credentials of the role it
/// names are such. Nothing else is served stale.
fn stale_entry<H: Host>(h: &H, cfg: &Config, p: &Pending) -> Option<Entry> {
    let now = h.now();
    let min = cfg.stale_min_remaining_seconds;
    let valid_creds = |role: &str| {
        cache::get(h, &Resource::Credentials(role.to_string()))
            .filter(|e| e.expiration != 0 && e.has_left(now, min))
    };
    match &p.key {
        Resource::Credentials(role) => {
            // Never the credentials of a role the cached role list no longer names.
            match cache::get(h, &Resource::RoleList) {
                Some(list) if list.body != role.as_bytes() => None,
                _ => valid_creds(role),
            }
        }
        Resource::RoleList => {
            let list = cache::get(h, &Resource::RoleList)?;
            let role = core::str::from_utf8(&list.body).ok()?;
            valid_creds(role).map(|_| list)
        }
        // Only to the same token, while the broker's verdict on it holds.
        Resource::ContainerCredentials(_) => {
            cache::get(h, &p.key).filter(|e| e.expiration != 0 && e.has_left(now, min))
        }
        _ => None,
    }
}

/// A metadata request whose connection did not begin in the pod: 403 with the reason code,
/// one warning line (the source address, never a header value), one counter.
fn refuse_source<H: Host>(h: &H, why: SourceRefusal, ip: Option<IpAddr>, door: Door) {
    let path = h.request_header(":path").unwrap_or_default();
    let label = match door {
        Door::Imds => classify(&path).label(),
        Door::Container => CONTAINER_LABEL,
    };
    let head = h.request_header(":method").as_deref() == Some("HEAD");
    let from = ip.map_or_else(|| String::from("unknown"), |ip| ip.to_string());
    h.log(
        Level::Warn,
        &alloc::format!(
            "meshiam: metadata request from {from} refused ({}): only the pod itself is answered",
            why.reason()
        ),
    );
    h.count(metrics::SOURCE_REFUSALS);
    h.count(&metrics::request(label, 403));
    h.reply(
        403,
        &[("content-type", TEXT_PLAIN), (REASON, why.reason())],
        if head {
            None
        } else {
            Some(NOT_THE_POD.as_bytes())
        },
    );
}

/// An IMDS rule refused the request: IMDS's status and body, and the rule's reason code in
/// `x-meshiam-reason` for whoever debugs the application.
/// Answers from the sidecar cache when `key`'s entry is still fresh (both doors); false
/// when the broker must be asked.
fn answered_from_cache<H: Host>(
    h: &H,
    cfg: &Config,
    key: &Resource,
    label: &str,
    head: bool,
) -> bool {
    let Some(e) = cache::get(h, key) else {
        return false;
    };
    if !e.is_fresh(
        h.now(),
        cfg.cache_fresh_seconds,
        cfg.stale_min_remaining_seconds,
    ) {
        return false;
    }
    h.count(metrics::CACHE_HITS);
    answer(h, label, 200, &e.content_type, &e.body, head, Some("cache"));
    true
}

fn refuse<H: Host>(h: &H, label: &str, r: Refusal, head: bool) {
    h.count(&metrics::request(label, r.status));
    h.reply(
        r.status,
        &[("content-type", TEXT_PLAIN), (headers::REASON, r.reason)],
        if head { None } else { Some(r.body.as_bytes()) },
    );
}

/// Every local reply goes through here: one metric, correct content type, no body on HEAD.
fn answer<H: Host>(
    h: &H,
    label: &str,
    status: u16,
    content_type: &str,
    body: &[u8],
    head: bool,
    source: Option<&str>,
) {
    answer_with_reason(h, label, status, content_type, body, head, source, None);
}

#[allow(clippy::too_many_arguments)]
fn answer_with_reason<H: Host>(
    h: &H,
    label: &str,
    status: u16,
    content_type: &str,
    body: &[u8],
    head: bool,
    source: Option<&str>,
    reason: Option<&str>,
) {
    h.count(&metrics::request(label, status));
    let mut hs: Vec<(&str, &str)> = Vec::with_capacity(3);
    hs.push(("content-type", content_type));
    if let Some(s) = source {
        hs.push((SOURCE_HEADER, s));
    }
    if let Some(r) = reason {
        hs.push((headers::REASON, r));
    }
    h.reply(status, &hs, if head { None } else { Some(body) });
}

/// A stream on a VM that has no valid configuration (its `on_configure` failed, or Envoy
/// created the stream before one came). Such a filter cannot identify the pod or reach the
/// broker, and letting a metadata request through would send it wherever the capture
/// leads, so a request for a default metadata host or address is refused `503
/// filter-not-configured`; other traffic passes, as it would through a configured filter.
pub fn unconfigured<H: Host>(h: &H) -> Action {
    if !identity::is_metadata_request(h, &Config::default()) {
        return Action::Continue;
    }
    let path = h.request_header(":path").unwrap_or_default();
    let label = classify(&path).label();
    let head = h.request_header(":method").as_deref() == Some("HEAD");
    h.log(
        Level::Error,
        "meshiam: metadata request refused: this filter has no valid configuration (see the \
         configuration error logged when it started)",
    );
    h.count(&metrics::request(label, 503));
    h.reply(
        503,
        &[
            ("content-type", TEXT_PLAIN),
            (headers::REASON, NOT_CONFIGURED_REASON),
        ],
        if head {
            None
        } else {
            Some(b"Service Unavailable".as_slice())
        },
    );
    Action::Pause
}

/// The reason code of [`unconfigured`]'s refusal.
pub const NOT_CONFIGURED_REASON: &str = "filter-not-configured";

/// Why the filter failed a request closed when the broker gave no usable answer: no answer
/// at all (down, unreachable, reset, timed out, the call-out could not start; also a `5xx`
/// without a reason code, which is Envoy's own) …
pub const BROKER_UNAVAILABLE: &str = "broker-unavailable";
/// … or an answer it does not pass on (unreadable, unexpected status, a refused broker
/// token).
pub const BROKER_BAD_ANSWER: &str = "broker-bad-answer";

/// The broker's reason code as the application gets it (safe characters, short); `None` when
/// it sent none.
fn relayed_reason(resp: &CalloutResponse) -> Option<String> {
    let r = printable(resp.reason.as_deref()?);
    (!r.is_empty()).then_some(r)
}

/// A broker-supplied reason code, shortened and stripped to safe characters for a log line.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect()
}
