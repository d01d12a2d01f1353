//! The credential cache: one STS call per key however many requests wait on it, refresh
//! ahead of expiry, prefetch, a short negative cache, and still-valid credentials served
//! while STS fails. Every STS call first asks the node-wide [`Limiter`].
//!
//! Times: credential expiry is wall-clock Unix seconds ([`Clock`]); waiting, backoff and the
//! negative cache use `tokio::time` (tests pause it).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use meshiam_imds::Credentials;
use meshiam_imds::time::format_rfc3339;
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::limiter::{Limiter, doubled, jittered};
use crate::metrics::Metrics;
use crate::sts::{AssumeRoleRequest, StsApi, StsError, StsErrorKind};

/// Tuning, all operator-settable (see `config`).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Every answer has at least this much lifetime left (default 30 min).
    pub min_remaining: Duration,
    /// Background refresh starts this much before `min_remaining` is reached, so requests
    /// rarely wait on STS.
    pub refresh_margin: Duration,
    /// One STS call's budget; also how long a fetch waits for the node-wide limiter.
    pub sts_timeout: Duration,
    /// How long a pod's request waits for STS. Past it the request is answered (with
    /// still-valid credentials, or an error) while the STS call carries on in the background,
    /// so the SDK's next try finds the credentials. Below the SDKs' 1 s timeouts.
    pub request_wait: Duration,
    /// How long a key's failure is remembered after its first failure (doubles on each
    /// further failure, up to `backoff_max`).
    pub negative_ttl: Duration,
    /// Node-wide backoff after throttling or an STS outage: first step and ceiling.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Node-wide STS call rate (token bucket).
    pub rate_per_sec: f64,
    pub burst: u32,
    /// Prefetch and background refresh wait a random delay up to this, so pods created
    /// together do not call STS together.
    pub jitter: Duration,
    /// While STS fails, credentials with at least this much left are still served.
    pub stale_floor: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            min_remaining: Duration::from_secs(30 * 60),
            refresh_margin: Duration::from_secs(5 * 60),
            sts_timeout: Duration::from_secs(5),
            request_wait: Duration::from_millis(900),
            negative_ttl: Duration::from_secs(5),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            rate_per_sec: 5.0,
            burst: 10,
            jitter: Duration::from_secs(2),
            stale_floor: Duration::from_secs(60),
        }
    }
}

/// Why credentials are being fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A pod asked.
    Request,
    /// A role-annotated pod appeared.
    Prefetch,
    /// Credentials approach the minimum lifetime.
    Refresh,
}

impl Purpose {
    pub fn label(self) -> &'static str {
        match self {
            Purpose::Request => "request",
            Purpose::Prefetch => "prefetch",
            Purpose::Refresh => "refresh",
        }
    }
}

/// How an answer was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Served {
    Hit,
    Fetched,
    /// STS is failing; these are still valid.
    Stale,
}

/// Credentials as the cache keeps and hands them out: shared (a hit copies no secret), with
/// their IMDS document rendered once, when they arrive from STS, not on every answer.
#[derive(PartialEq, Eq)]
pub struct Cached {
    pub creds: Credentials,
    imds_json: Bytes,
}

impl Cached {
    pub fn new(creds: Credentials) -> Self {
        let imds_json = Bytes::from(creds.to_imds_json());
        Self { creds, imds_json }
    }

    /// The IMDS credential document (`Credentials::to_imds_json`), shared.
    pub fn imds_json(&self) -> Bytes {
        self.imds_json.clone()
    }
}

impl std::ops::Deref for Cached {
    type Target = Credentials;
    fn deref(&self) -> &Credentials {
        &self.creds
    }
}

/// Never the document: it holds the secret key and the session token.
impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.creds.fmt(f)
    }
}

#[derive(Debug, Clone)]
struct Failure {
    error: StsError,
    count: u32,
    retry_at: Instant,
}

#[derive(Debug, Default)]
struct SlotState {
    creds: Option<Arc<Cached>>,
    failure: Option<Failure>,
}

#[derive(Debug, Default)]
struct Slot {
    /// Held by whoever calls STS for this key: the single flight.
    fetch: tokio::sync::Mutex<()>,
    state: Mutex<SlotState>,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh(&self, now: u64, min_left: u64) -> Option<Arc<Cached>> {
        self.state()
            .creds
            .as_ref()
            .filter(|c| c.remaining(now) >= min_left)
            .cloned()
    }
}

struct Inner {
    sts: Arc<dyn StsApi>,
    cfg: CacheConfig,
    clock: Clock,
    metrics: Metrics,
    slots: Mutex<HashMap<AssumeRoleRequest, Arc<Slot>>>,
    limiter: Limiter,
}

/// Where a key's credentials stand, by remaining lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryState {
    /// More than the minimum lifetime plus the refresh margin left.
    Fresh,
    /// Inside the refresh margin: the background refresh fetches it.
    RefreshDue,
    /// Valid but below the minimum lifetime: a request fetches before answering.
    BelowMinimum,
    Expired,
    /// The key is known but nothing was fetched (yet).
    Empty,
    NotCached,
}

/// What the cache holds for a key, for the operator: no secrets, and no access key id (the
/// view is shown on the admin port's debug endpoints).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryView {
    pub state: EntryState,
    pub expiration: Option<String>,
    pub remaining_secs: Option<u64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub retry_in_ms: Option<u64>,
}

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache")
            .field("entries", &self.len())
            .finish()
    }
}

impl CredentialCache {
    pub fn new(sts: Arc<dyn StsApi>, cfg: CacheConfig, clock: Clock, metrics: Metrics) -> Self {
        let limiter = Limiter::new(
            cfg.rate_per_sec,
            cfg.burst,
            cfg.backoff_base,
            cfg.backoff_max,
        );
        Self {
            inner: Arc::new(Inner {
                sts,
                cfg,
                clock,
                metrics,
                slots: Mutex::new(HashMap::new()),
                limiter,
            }),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.cfg
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<AssumeRoleRequest, Arc<Slot>>> {
        self.inner.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, req: &AssumeRoleRequest) -> Arc<Slot> {
        let mut slots = self.slots();
        // The key is cloned only when it is new (a hit hashes it, nothing more).
        if let Some(slot) = slots.get(req) {
            return slot.clone();
        }
        let slot = slots.entry(req.clone()).or_default().clone();
        self.inner.metrics.set_cache_entries(slots.len());
        slot
    }

    pub fn len(&self) -> usize {
        self.slots().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn threshold(&self, purpose: Purpose) -> u64 {
        let cfg = &self.inner.cfg;
        let t = match purpose {
            Purpose::Request | Purpose::Prefetch => cfg.min_remaining,
            Purpose::Refresh => cfg.min_remaining + cfg.refresh_margin,
        };
        t.as_secs()
    }

    /// Credentials for `req` with at least the minimum lifetime left, calling STS if needed
    /// (once per key, however many callers wait).
    ///
    /// A pod's request waits at most `request_wait`: the fetch runs in a task of its own, so
    /// when the request gives up the STS call still completes and fills the cache.
    pub async fn get(
        &self,
        req: &AssumeRoleRequest,
        purpose: Purpose,
    ) -> Result<(Arc<Cached>, Served), StsError> {
        if purpose != Purpose::Request {
            return self.get_or_fetch(req, purpose).await;
        }
        let slot = self.slot(req);
        if let Some(c) = slot.fresh(self.inner.clock.now(), self.threshold(purpose)) {
            self.inner.metrics.cache_hit();
            return Ok((c, Served::Hit));
        }
        let cache = self.clone();
        let owned = req.clone();
        let fetch = tokio::spawn(async move { cache.get_or_fetch(&owned, Purpose::Request).await });
        match tokio::time::timeout(self.inner.cfg.request_wait, fetch).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StsError::new(
                StsErrorKind::Unavailable,
                "fetch-task-failed",
            )),
            Err(_) => self.fallback(&slot, StsError::new(StsErrorKind::Timeout, "request-wait")),
        }
    }

    async fn get_or_fetch(
        &self,
        req: &AssumeRoleRequest,
        purpose: Purpose,
    ) -> Result<(Arc<Cached>, Served), StsError> {
        let min_left = self.threshold(purpose);
        let slot = self.slot(req);
        let metrics = &self.inner.metrics;
        if let Some(c) = slot.fresh(self.inner.clock.now(), min_left) {
            if purpose == Purpose::Request {
                metrics.cache_hit();
            }
            return Ok((c, Served::Hit));
        }
        let _flight = slot.fetch.lock().await;
        // Whoever held the flight before us may have fetched already.
        if let Some(c) = slot.fresh(self.inner.clock.now(), min_left) {
            if purpose == Purpose::Request {
                metrics.cache_hit();
            }
            return Ok((c, Served::Hit));
        }
        // Bound first: the guard must be gone before `fallback` locks the state again.
        let failure = slot.state().failure.clone();
        if let Some(f) = failure
            && Instant::now() < f.retry_at
        {
            return self.fallback(&slot, f.error);
        }
        match purpose {
            Purpose::Request => metrics.cache_miss(purpose.label()),
            _ => metrics.cache_refresh(purpose.label()),
        }
        let result = self.call_sts(req, purpose).await;
        match result {
            Ok(c) => {
                let c = Arc::new(Cached::new(c));
                let mut st = slot.state();
                st.creds = Some(c.clone());
                st.failure = None;
                Ok((c, Served::Fetched))
            }
            Err((e, called)) => {
                if called {
                    let mut st = slot.state();
                    let count = st.failure.as_ref().map_or(0, |f| f.count) + 1;
                    let wait = jittered(doubled(
                        self.inner.cfg.negative_ttl,
                        count,
                        self.inner.cfg.backoff_max.max(self.inner.cfg.negative_ttl),
                    ));
                    st.failure = Some(Failure {
                        error: e.clone(),
                        count,
                        retry_at: Instant::now() + wait,
                    });
                }
                self.fallback(&slot, e)
            }
        }
    }

    /// STS failed: still-valid credentials are better than none.
    fn fallback(&self, slot: &Slot, e: StsError) -> Result<(Arc<Cached>, Served), StsError> {
        let floor = self.inner.cfg.stale_floor.as_secs();
        match slot.fresh(self.inner.clock.now(), floor.max(1)) {
            Some(c) => {
                self.inner.metrics.stale_served();
                Ok((c, Served::Stale))
            }
            None => Err(e),
        }
    }

    /// One rate-limited, timed STS call. The flag says whether STS was actually called
    /// (a local limiter refusal is not a failure of the key).
    async fn call_sts(
        &self,
        req: &AssumeRoleRequest,
        purpose: Purpose,
    ) -> Result<Credentials, (StsError, bool)> {
        let cfg = &self.inner.cfg;
        let deadline = (purpose == Purpose::Request).then(|| Instant::now() + cfg.sts_timeout);
        self.inner
            .limiter
            .acquire(deadline)
            .await
            .map_err(|e| (e, false))?;
        let t0 = Instant::now();
        let result =
            match tokio::time::timeout(cfg.sts_timeout, self.inner.sts.assume_role(req)).await {
                Ok(r) => r,
                Err(_) => Err(StsError::new(StsErrorKind::Timeout, "timeout")),
            };
        let secs = t0.elapsed().as_secs_f64();
        let label = result.as_ref().map_or_else(|e| e.kind.label(), |_| "ok");
        self.inner.metrics.sts_call(label, secs);
        self.inner
            .limiter
            .record(result.as_ref().map(|_| ()).map_err(|e| e.kind));
        match &result {
            Ok(c) => tracing::debug!(
                role_arn = %req.role_arn,
                session_name = %req.session_name,
                access_key_id = %c.access_key_id,
                purpose = purpose.label(),
                seconds = secs,
                "STS AssumeRole succeeded"
            ),
            Err(e) => tracing::warn!(
                role_arn = %req.role_arn,
                session_name = %req.session_name,
                kind = e.kind.label(),
                code = %e.code,
                purpose = purpose.label(),
                "STS AssumeRole failed"
            ),
        }
        result.map_err(|e| (e, true))
    }

    /// Fetches `req` in the background after a random delay (prefetch or refresh).
    pub fn spawn_fetch(&self, req: AssumeRoleRequest, purpose: Purpose) {
        let cache = self.clone();
        let jitter = self.inner.cfg.jitter;
        tokio::spawn(async move {
            if !jitter.is_zero() {
                let delay = jitter.mul_f64(rand::rng().random_range(0.0..1.0));
                tokio::time::sleep(delay).await;
            }
            let _ = cache.get_or_fetch(&req, purpose).await;
        });
    }

    /// Keys whose credentials should be fetched now in the background: close to the
    /// minimum lifetime, or failed and ready to retry.
    pub fn due_for_refresh(&self) -> Vec<AssumeRoleRequest> {
        let now = self.inner.clock.now();
        let min_left = self.threshold(Purpose::Refresh);
        let slots: Vec<(AssumeRoleRequest, Arc<Slot>)> = self
            .slots()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        slots
            .into_iter()
            .filter(|(_, slot)| {
                let st = slot.state();
                let retry_ok = st
                    .failure
                    .as_ref()
                    .is_none_or(|f| Instant::now() >= f.retry_at);
                let due = st
                    .creds
                    .as_ref()
                    .is_none_or(|c| c.remaining(now) < min_left);
                due && retry_ok
            })
            .map(|(k, _)| k)
            .collect()
    }

    /// Drops every entry not in `live`: credentials no live pod uses are not kept or
    /// refreshed.
    pub fn retain(&self, live: &HashSet<AssumeRoleRequest>) -> usize {
        let mut slots = self.slots();
        let before = slots.len();
        slots.retain(|k, _| live.contains(k));
        self.inner.metrics.set_cache_entries(slots.len());
        before - slots.len()
    }

    /// What the cache holds for `req`.
    pub fn view(&self, req: &AssumeRoleRequest) -> EntryView {
        let Some(slot) = self.slots().get(req).cloned() else {
            return EntryView {
                state: EntryState::NotCached,
                expiration: None,
                remaining_secs: None,
                last_error: None,
                consecutive_failures: 0,
                retry_in_ms: None,
            };
        };
        let now = self.inner.clock.now();
        let st = slot.state();
        let remaining = st.creds.as_ref().map(|c| c.remaining(now));
        let state = match remaining {
            None => EntryState::Empty,
            Some(0) => EntryState::Expired,
            Some(r) if r < self.threshold(Purpose::Request) => EntryState::BelowMinimum,
            Some(r) if r < self.threshold(Purpose::Refresh) => EntryState::RefreshDue,
            Some(_) => EntryState::Fresh,
        };
        EntryView {
            state,
            expiration: st.creds.as_ref().map(|c| format_rfc3339(c.expiration)),
            remaining_secs: remaining,
            last_error: st.failure.as_ref().map(|f| f.error.to_string()),
            consecutive_failures: st.failure.as_ref().map_or(0, |f| f.count),
            retry_in_ms: st.failure.as_ref().map(|f| {
                f.retry_at
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeSts;

    const T0: u64 = 1_767_225_600;

    /// A cache entry's document is rendered once and is the credentials' IMDS document; its
    /// `Debug` never shows the secret or the token.
    #[test]
    fn cached_document_and_debug() {
        let c = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "very-secret".into(),
            token: "session-token".into(),
            expiration: T0 + 3600,
            last_updated: T0,
        };
        let cached = Cached::new(c.clone());
        assert_eq!(&cached.imds_json()[..], c.to_imds_json().as_bytes());
        assert_eq!(cached.access_key_id, "ASIAEXAMPLE");
        let shown = format!("{cached:?}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("session-token"),
            "{shown}"
        );
    }

    fn req(role: &str) -> AssumeRoleRequest {
        AssumeRoleRequest {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
            session_name: "default.myapp".into(),
            external_id: None,
            tags: Vec::new(),
            source_identity: None,
            duration_secs: 3600,
        }
    }

    fn setup(cfg: CacheConfig) -> (CredentialCache, Arc<FakeSts>, Clock) {
        let clock = Clock::manual(T0);
        let sts = Arc::new(FakeSts::new(clock.clone()));
        let cache = CredentialCache::new(sts.clone(), cfg, clock.clone(), Metrics::new());
        (cache, sts, clock)
    }

    fn quiet() -> CacheConfig {
        CacheConfig {
            jitter: Duration::ZERO,
            ..CacheConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_sts_call_however_many_wait() {
        let (cache, sts, _) = setup(quiet());
        sts.set_delay(Duration::from_millis(200));
        let r = req("app");
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                let r = r.clone();
                tokio::spawn(async move { cache.get(&r, Purpose::Request).await })
            })
            .collect();
        let mut keys = HashSet::new();
        for w in waiters {
            let (c, _) = w.await.unwrap().unwrap();
            keys.insert(c.access_key_id.clone());
        }
        assert_eq!(sts.calls(), 1);
        assert_eq!(keys.len(), 1);
        // Another key is another call.
        cache.get(&req("other"), Purpose::Request).await.unwrap();
        assert_eq!(sts.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn every_answer_has_at_least_the_minimum_left() {
        let (cache, sts, clock) = setup(quiet());
        let r = req("app");
        let (first, how) = cache.get(&r, Purpose::Request).await.unwrap();
        assert_eq!(how, Served::Fetched);
        // Exactly 30 minutes left: still served from the cache.
        clock.advance(1800);
        let (c, how) = cache.get(&r, Purpose::Request).await.unwrap();
        assert_eq!(
            (how, c.access_key_id.as_str()),
            (Served::Hit, first.access_key_id.as_str())
        );
        // One second less: refreshed before answering.
        clock.advance(1);
        let (c, how) = cache.get(&r, Purpose::Request).await.unwrap();
        assert_eq!(how, Served::Fetched);
        assert_ne!(c.access_key_id, first.access_key_id);
        // Over three hours of requests a minute apart, nothing under 30 minutes.
        for _ in 0..180 {
            clock.advance(60);
            let (c, _) = cache.get(&r, Purpose::Request).await.unwrap();
            assert!(
                c.remaining(clock.now()) >= 1800,
                "{}",
                c.remaining(clock.now())
            );
        }
        // About two calls an hour (each session is good for 30 minutes of answers).
        assert!((6..=8).contains(&sts.calls()), "{}", sts.calls());
    }

    #[tokio::test(start_paused = true)]
    async fn background_refresh_comes_due_before_the_minimum() {
        let (cache, _sts, clock) = setup(quiet());
        let r = req("app");
        cache.get(&r, Purpose::Request).await.unwrap();
        assert!(cache.due_for_refresh().is_empty());
        // 35 minutes left: inside min_remaining (30) + margin (5).
        clock.advance(3600 - 35 * 60 + 1);
        assert_eq!(cache.due_for_refresh(), vec![r.clone()]);
        let (c, how) = cache.get(&r, Purpose::Refresh).await.unwrap();
        assert_eq!(how, Served::Fetched);
        assert!(c.remaining(clock.now()) > 55 * 60);
        assert!(cache.due_for_refresh().is_empty());
        assert_eq!(cache.view(&r).state, EntryState::Fresh);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_remembered_briefly() {
        let (cache, sts, _) = setup(quiet());
        sts.fail_with(Some(StsErrorKind::Denied));
        let r = req("app");
        let e = cache.get(&r, Purpose::Request).await.unwrap_err();
        assert_eq!(e.kind, StsErrorKind::Denied);
        // Within the negative cache: no second call.
        let e = cache.get(&r, Purpose::Request).await.unwrap_err();
        assert_eq!(e.kind, StsErrorKind::Denied);
        assert_eq!(sts.calls(), 1);
        assert_eq!(cache.view(&r).consecutive_failures, 1);
        // After it (5 s at most for the first failure): tried again, and now it works.
        tokio::time::sleep(Duration::from_secs(5)).await;
        sts.fail_with(None);
        cache.get(&r, Purpose::Request).await.unwrap();
        assert_eq!(sts.calls(), 2);
        assert_eq!(cache.view(&r).last_error, None);
    }

    #[tokio::test(start_paused = true)]
    async fn negative_cache_grows_on_repeated_failures() {
        let (cache, sts, _) = setup(CacheConfig {
            negative_ttl: Duration::from_secs(4),
            backoff_max: Duration::from_secs(60),
            ..quiet()
        });
        sts.fail_with(Some(StsErrorKind::Denied));
        let r = req("app");
        for expected_calls in 1..=4 {
            let _ = cache.get(&r, Purpose::Request).await;
            assert_eq!(sts.calls(), expected_calls);
            let wait = cache.view(&r).retry_in_ms.unwrap();
            // 4 s, 8 s, 16 s, 32 s, each jittered down by at most half.
            let full = 4000u64 << (expected_calls - 1);
            assert!(wait <= full && wait >= full / 2 - 1, "{wait} vs {full}");
            tokio::time::sleep(Duration::from_millis(wait + 1)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn still_valid_credentials_are_served_while_sts_fails() {
        let (cache, sts, clock) = setup(quiet());
        let r = req("app");
        let (first, _) = cache.get(&r, Purpose::Request).await.unwrap();
        clock.advance(3000); // 10 minutes left: below the minimum, still valid.
        sts.fail_with(Some(StsErrorKind::Unavailable));
        let (c, how) = cache.get(&r, Purpose::Request).await.unwrap();
        assert_eq!(how, Served::Stale);
        assert_eq!(c.access_key_id, first.access_key_id);
        // Past the stale floor (60 s left): nothing to serve.
        clock.advance(560);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(cache.get(&r, Purpose::Request).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_backs_off_node_wide() {
        let (cache, sts, _) = setup(CacheConfig {
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(30),
            sts_timeout: Duration::from_millis(500),
            ..quiet()
        });
        sts.fail_with(Some(StsErrorKind::Unavailable));
        assert!(cache.get(&req("a"), Purpose::Request).await.is_err());
        assert_eq!(sts.calls(), 1);
        // Another role during the backoff: refused at once, STS not called.
        let t0 = Instant::now();
        let e = cache.get(&req("b"), Purpose::Request).await.unwrap_err();
        assert_eq!(e.kind, StsErrorKind::Unavailable);
        assert_eq!(e.code, "node-backoff");
        assert_eq!(sts.calls(), 1);
        assert!(t0.elapsed() < Duration::from_millis(10));
        // Background work waits the backoff out instead.
        sts.fail_with(None);
        let t0 = Instant::now();
        cache.get(&req("b"), Purpose::Prefetch).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
        assert_eq!(sts.calls(), 2);
        // Success closes the backoff window.
        cache.get(&req("c"), Purpose::Request).await.unwrap();
        assert_eq!(sts.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_doubles_the_backoff() {
        let (cache, sts, _) = setup(CacheConfig {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            negative_ttl: Duration::from_millis(1),
            ..quiet()
        });
        sts.fail_with(Some(StsErrorKind::Throttled));
        let mut waits = Vec::new();
        for i in 0..4 {
            let t0 = Instant::now();
            let e = cache
                .get(&req(&format!("r{i}")), Purpose::Refresh)
                .await
                .unwrap_err();
            assert_eq!(e.kind, StsErrorKind::Throttled);
            waits.push(t0.elapsed());
        }
        assert_eq!(sts.calls(), 4);
        // No wait before the first call, then about 1, 2, 4 s (each jittered to at least half).
        assert!(waits[0] < Duration::from_millis(10));
        for (i, w) in waits[1..].iter().enumerate() {
            let full = Duration::from_secs(1 << i);
            assert!(
                *w >= full / 2 && *w <= full + Duration::from_millis(10),
                "{i}: {w:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_node_wide_rate_limit_spaces_calls() {
        let (cache, sts, _) = setup(CacheConfig {
            rate_per_sec: 2.0,
            burst: 2,
            sts_timeout: Duration::from_millis(200),
            ..quiet()
        });
        let t0 = Instant::now();
        for i in 0..2 {
            cache
                .get(&req(&format!("r{i}")), Purpose::Request)
                .await
                .unwrap();
        }
        assert!(t0.elapsed() < Duration::from_millis(10));
        // The bucket is empty: a request cannot wait 500 ms within its 200 ms budget.
        let e = cache.get(&req("r2"), Purpose::Request).await.unwrap_err();
        assert_eq!(
            (e.kind, e.code.as_str()),
            (StsErrorKind::Throttled, "node-rate-limit")
        );
        // A prefetch waits its turn.
        cache.get(&req("r3"), Purpose::Prefetch).await.unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(sts.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_sts_times_out() {
        let (cache, sts, _) = setup(CacheConfig {
            sts_timeout: Duration::from_secs(1),
            ..quiet()
        });
        sts.set_delay(Duration::from_secs(10));
        let e = cache.get(&req("a"), Purpose::Request).await.unwrap_err();
        assert_eq!(e.kind, StsErrorKind::Timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_briefly_and_the_call_completes_for_the_next_one() {
        let (cache, sts, _) = setup(CacheConfig {
            sts_timeout: Duration::from_secs(5),
            request_wait: Duration::from_millis(900),
            ..quiet()
        });
        sts.set_delay(Duration::from_secs(2));
        let t0 = Instant::now();
        let e = cache.get(&req("a"), Purpose::Request).await.unwrap_err();
        assert_eq!(
            (e.kind, e.code.as_str()),
            (StsErrorKind::Timeout, "request-wait")
        );
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        // The STS call was not abandoned: once it lands the next request is a hit.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (_, served) = cache.get(&req("a"), Purpose::Request).await.unwrap();
        assert_eq!(served, Served::Hit);
        assert_eq!(sts.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn entry_states_follow_the_remaining_lifetime() {
        let (cache, sts, clock) = setup(quiet());
        let r = req("app");
        let state = |c: &CredentialCache| c.view(&r).state;
        assert_eq!(state(&cache), EntryState::NotCached);
        sts.fail_with(Some(StsErrorKind::Denied));
        let _ = cache.get(&r, Purpose::Request).await;
        assert_eq!(state(&cache), EntryState::Empty);
        tokio::time::sleep(Duration::from_secs(10)).await;
        sts.fail_with(None);
        cache.get(&r, Purpose::Request).await.unwrap();
        // One hour: fresh; refresh due inside 35 min; below the minimum inside 30 min.
        let mut seen = vec![state(&cache)];
        let mut elapsed = 0;
        for left in [35 * 60 - 1, 30 * 60 - 1, 0] {
            clock.advance(3600 - left - elapsed);
            elapsed = 3600 - left;
            seen.push(state(&cache));
        }
        assert_eq!(
            seen,
            [
                EntryState::Fresh,
                EntryState::RefreshDue,
                EntryState::BelowMinimum,
                EntryState::Expired
            ]
        );
        // The admin endpoints show them as before.
        assert_eq!(
            serde_json::to_value(cache.view(&r)).unwrap()["state"],
            "expired"
        );
        assert_eq!(
            serde_json::to_value(EntryState::RefreshDue).unwrap(),
            "refresh-due"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retain_drops_unused_entries() {
        let (cache, _, _) = setup(quiet());
        cache.get(&req("a"), Purpose::Request).await.unwrap();
        cache.get(&req("b"), Purpose::Request).await.unwrap();
        let live: HashSet<_> = [req("a")].into_iter().collect();
        assert_eq!(cache.retain(&live), 1);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.view(&req("b")).state, EntryState::NotCached);
        assert_eq!(cache.view(&req("a")).state, EntryState::Fresh);
    }
}
