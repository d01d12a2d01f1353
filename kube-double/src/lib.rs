//! A Kubernetes API test double: pods and namespaces in memory, served over plain HTTP in the
//! real list/watch wire format, so kube-rs clients and watchers run against it unmodified.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let double = meshiam_kube_double::KubeDouble::start("127.0.0.1:0".parse()?).await?;
//! let config = kube::Config::new(double.url().parse()?); // plain HTTP, no auth
//! # let _ = config; Ok(()) }
//! ```
//!
//! Besides the core API, tests can break things on purpose: compact history (the next watch
//! resume gets 410 Gone), drop every open watch, fail or slow down requests for a while —
//! from Rust ([`KubeDouble`]) or over HTTP (`/_double/…`, see `docs/kube-double.md`).

mod admin;
mod api;
pub mod error;
pub mod podsfile;
pub mod select;
pub mod store;
mod tokens;
mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{oneshot, watch as tokio_watch};
use tokio::time::Instant;

pub use error::ApiError;
pub use podsfile::PodsFile;
use store::{Db, Kind, ObjKey};

/// How the double behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often a watch that asked for bookmarks gets one (the apiserver: about a minute).
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(60),
        }
    }
}

/// Counters, for tests to check what a client did.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    pub expired: AtomicU64,
    pub bookmarks: AtomicU64,
    pub injected_failures: AtomicU64,
}

/// What the double has served so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// List requests.
    pub lists: u64,
    /// Watch requests.
    pub watches: u64,
    /// 410 Expired answers (watch ERROR events and list errors).
    pub expired: u64,
    /// BOOKMARK events sent (periodic ones, not the initial-events-end marker).
    pub bookmarks: u64,
    /// Requests answered with an injected failure.
    pub injected_failures: u64,
}

#[derive(Debug, Default)]
struct Faults {
    /// Answer every API request with this status code, until the deadline (`None`: until
    /// [`KubeDouble::recover`]).
    fail: Option<(u16, Option<Instant>)>,
    /// Delay every API request by this much, until the deadline.
    delay: Option<(Duration, Option<Instant>)>,
}

pub(crate) struct Shared {
    db: Mutex<Db>,
    /// The current resourceVersion, so watches wake on every write.
    rv_tx: tokio_watch::Sender<u64>,
    /// Bumped to end every open watch.
    epoch: tokio_watch::Sender<u64>,
    /// True while watches hang: connected, sending nothing (no events, no bookmarks, no
    /// close), as behind a stuck proxy or a wedged API server.
    hang: tokio_watch::Sender<bool>,
    /// Which hang a timed release belongs to (a newer hang is not cut short by it).
    hang_gen: AtomicU64,
    faults: Mutex<Faults>,
    /// Service-account tokens issued by the TokenRequest API (see [`tokens`]).
    tokens: Mutex<tokens::Tokens>,
    stats: Counters,
    bookmark_interval: Duration,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every write completes before anything can panic, so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn new(options: &Options) -> Self {
        // Not `Db::default()`: a restarted double must not re-issue the resourceVersions of
        // an earlier run (see `store::clock_base`).
        let db = Db::starting_at(store::clock_base());
        let (rv_tx, _) = tokio_watch::channel(db.rv());
        let (epoch, _) = tokio_watch::channel(0);
        let (hang, _) = tokio_watch::channel(false);
        Self {
            db: Mutex::new(db),
            rv_tx,
            epoch,
            hang,
            hang_gen: AtomicU64::new(0),
            faults: Mutex::default(),
            tokens: Mutex::default(),
            stats: Counters::default(),
            bookmark_interval: options.bookmark_interval.max(Duration::from_millis(10)),
        }
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Db> {
        lock(&self.db)
    }

    /// Runs a write and wakes the watches.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&mut Db) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (result, rv) = {
            let mut db = self.db();
            let result = f(&mut db);
            (result, db.rv())
        };
        self.rv_tx
            .send_if_modified(|cur| std::mem::replace(cur, rv) != rv);
        result
    }

    pub(crate) fn close_watches(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Makes every open watch, and every watch opened from now on, go silent without
    /// closing, for `duration` (`None`: until [`Self::recover`]).
    pub(crate) fn hang_watches(self: &Arc<Self>, duration: Option<Duration>) {
        let generation = self.hang_gen.fetch_add(1, Ordering::SeqCst) + 1;
        self.hang.send_replace(true);
        if let Some(d) = duration {
            let shared = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                if let Some(s) = shared.upgrade()
                    && s.hang_gen.load(Ordering::SeqCst) == generation
                {
                    s.hang.send_replace(false);
                    tracing::info!("watches released");
                }
            });
        }
    }

    pub(crate) fn compact(&self) -> u64 {
        let rv = self.db().compact();
        tracing::info!(resource_version = rv, "history compacted");
        rv
    }

    pub(crate) fn set_failure(&self, status: u16, duration: Option<Duration>) {
        lock(&self.faults).fail = Some((status, duration.map(|d| Instant::now() + d)));
    }

    pub(crate) fn set_delay(&self, delay: Duration, duration: Option<Duration>) {
        lock(&self.faults).delay = Some((delay, duration.map(|d| Instant::now() + d)));
    }

    pub(crate) fn recover(&self) {
        *lock(&self.faults) = Faults::default();
        self.hang_gen.fetch_add(1, Ordering::SeqCst);
        self.hang.send_replace(false);
    }

    /// The faults in force now (expired ones are cleared).
    fn current_faults(&self) -> (Option<u16>, Option<Duration>) {
        let mut f = lock(&self.faults);
        let now = Instant::now();
        let live = |until: Option<Instant>| until.is_none_or(|t| t > now);
        if f.fail.is_some_and(|(_, until)| !live(until)) {
            f.fail = None;
        }
        if f.delay.is_some_and(|(_, until)| !live(until)) {
            f.delay = None;
        }
        (f.fail.map(|(s, _)| s), f.delay.map(|(d, _)| d))
    }

    pub(crate) fn stats(&self) -> Stats {
        let s = &self.stats;
        Stats {
            lists: s.lists.load(Ordering::Relaxed),
            watches: s.watches.load(Ordering::Relaxed),
            expired: s.expired.load(Ordering::Relaxed),
            bookmarks: s.bookmarks.load(Ordering::Relaxed),
            injected_failures: s.injected_failures.load(Ordering::Relaxed),
        }
    }

    /// Creates or replaces everything in a pods file; namespaces its pods use but it does
    /// not list are created bare, so a namespace watch sees them.
    pub(crate) fn apply_pods_file(&self, file: &PodsFile) -> Result<(usize, usize), ApiError> {
        self.write(|db| {
            for ns in &file.namespaces {
                db.apply(Kind::Namespace, ns.to_object())?;
            }
            for pod in &file.pods {
                let ns_key = ObjKey::new(Kind::Namespace, "", &pod.namespace);
                if db.get(&ns_key).is_none() {
                    db.apply(
                        Kind::Namespace,
                        serde_json::json!({"metadata": {"name": pod.namespace}}),
                    )?;
                }
                db.apply(Kind::Pod, pod.to_object())?;
            }
            Ok((file.pods.len(), file.namespaces.len()))
        })
    }

    /// Deletes every pod and namespace a pods file names (those that exist).
    pub(crate) fn delete_pods_file(&self, file: &PodsFile) -> Result<(usize, usize), ApiError> {
        self.write(|db| {
            let mut pods = 0;
            for pod in &file.pods {
                pods += usize::from(
                    db.delete(&ObjKey::new(Kind::Pod, &pod.namespace, &pod.name))
                        .is_ok(),
                );
            }
            let mut namespaces = 0;
            for ns in &file.namespaces {
                namespaces += usize::from(
                    db.delete_namespace(&ObjKey::new(Kind::Namespace, "", &ns.name))
                        .is_ok(),
                );
            }
            Ok((pods, namespaces))
        })
    }
}

/// Injected slowness and failures, for the core API only (never for `/_double/…`).
async fn faults(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let (fail, delay) = shared.current_faults();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(code) = fail {
        shared
            .stats
            .injected_failures
            .fetch_add(1, Ordering::Relaxed);
        let reason = match code {
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        tracing::debug!(method = %req.method(), uri = %req.uri(), code, "injected failure");
        return ApiError::new(code, reason, "injected failure (kube double)").into_response();
    }
    tracing::debug!(method = %req.method(), uri = %req.uri(), "request");
    next.run(req).await
}

fn app(shared: Arc<Shared>) -> Router {
    api::router(shared.clone())
        .layer(middleware::from_fn_with_state(shared.clone(), faults))
        .merge(admin::router(shared))
}

/// A running double. Dropping it stops the server.
pub struct KubeDouble {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for KubeDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDouble")
            .field("addr", &self.addr)
            .finish()
    }
}

fn from_json<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_json::from_value(v.clone()).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::bad_request(e.to_string()))
}

impl KubeDouble {
    /// Binds `addr` (port 0 picks one) and serves in the background.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(addr, Options::default()).await
    }

    pub async fn start_with(addr: SocketAddr, options: Options) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(&options));
        let (stop, stopped) = oneshot::channel::<()>();
        let router = app(shared.clone());
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!("kube double server failed: {e}");
            }
        });
        Ok(Self {
            shared,
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.db().rv()
    }

    fn write_typed<T: DeserializeOwned>(
        &self,
        f: impl FnOnce(&mut Db) -> Result<Arc<Value>, ApiError>,
    ) -> Result<T, ApiError> {
        from_json(&*self.shared.write(f)?)
    }

    /// Creates a pod (status included, so tests can set IPs and phases directly).
    pub fn create_pod(&self, pod: &Pod) -> Result<Pod, ApiError> {
        let obj = to_json(pod)?;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        self.write_typed(|db| db.create(Kind::Pod, Some(&ns), obj))
    }

    /// Replaces a pod unconditionally (a `metadata.resourceVersion` in `pod` is ignored).
    pub fn update_pod(&self, pod: &Pod) -> Result<Pod, ApiError> {
        let mut obj = to_json(pod)?;
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let key = ObjKey::new(
            Kind::Pod,
            obj["metadata"]["namespace"].as_str().unwrap_or("default"),
            obj["metadata"]["name"].as_str().unwrap_or_default(),
        );
        self.write_typed(|db| db.replace(&key, obj))
    }

    /// Changes a stored pod in place (`f` gets the current one).
    pub fn modify_pod(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Pod),
    ) -> Result<Pod, ApiError> {
        let mut pod = self
            .pod(namespace, name)
            .ok_or_else(|| ApiError::not_found(&ObjKey::new(Kind::Pod, namespace, name)))?;
        f(&mut pod);
        self.update_pod(&pod)
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<Pod, ApiError> {
        let key = ObjKey::new(Kind::Pod, namespace, name);
        self.write_typed(|db| db.delete(&key))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let obj = self
            .shared
            .db()
            .get(&ObjKey::new(Kind::Pod, namespace, name))?;
        from_json(&obj).ok()
    }

    pub fn create_namespace(&self, ns: &Namespace) -> Result<Namespace, ApiError> {
        let obj = to_json(ns)?;
        self.write_typed(|db| db.create(Kind::Namespace, None, obj))
    }

    /// Replaces a namespace unconditionally.
    pub fn update_namespace(&self, ns: &Namespace) -> Result<Namespace, ApiError> {
        let mut obj = to_json(ns)?;
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let key = ObjKey::new(
            Kind::Namespace,
            "",
            obj["metadata"]["name"].as_str().unwrap_or_default(),
        );
        self.write_typed(|db| db.replace(&key, obj))
    }

    /// Deletes a namespace and its pods.
    pub fn delete_namespace(&self, name: &str) -> Result<Namespace, ApiError> {
        let key = ObjKey::new(Kind::Namespace, "", name);
        self.write_typed(|db| db.delete_namespace(&key))
    }

    /// Creates or replaces the pods and namespaces of a pods file. Returns (pods, namespaces).
    pub fn apply_pods_file(&self, file: &PodsFile) -> Result<(usize, usize), ApiError> {
        self.shared.apply_pods_file(file)
    }

    /// Deletes the pods and namespaces a pods file names.
    pub fn delete_pods_file(&self, file: &PodsFile) -> Result<(usize, usize), ApiError> {
        self.shared.delete_pods_file(file)
    }

    /// Forgets history: watches and lists at any older resourceVersion get 410 Expired.
    /// Returns the resourceVersion compacted to.
    pub fn compact(&self) -> u64 {
        self.shared.compact()
    }

    /// Ends every open watch (clients resume from their last resourceVersion).
    pub fn close_watches(&self) {
        self.shared.close_watches();
    }

    /// Answers every core API request with `status` for `duration` (`None`: until
    /// [`Self::recover`]). Open watches keep running; close them too to cut clients off.
    pub fn fail(&self, status: u16, duration: Option<Duration>) {
        self.shared.set_failure(status, duration);
    }

    /// Delays every core API request by `delay` for `duration` (`None`: until recovered).
    pub fn slow(&self, delay: Duration, duration: Option<Duration>) {
        self.shared.set_delay(delay, duration);
    }

    /// Makes every open watch, and every watch opened meanwhile, go silent without closing
    /// the connection (no events, no bookmarks, no end at its timeout) for `duration`
    /// (`None`: until [`Self::recover`]). Lists keep working. Released watches go on from
    /// where they stopped.
    pub fn hang_watches(&self, duration: Option<Duration>) {
        self.shared.hang_watches(duration);
    }

    /// Clears injected failures and slowness, and releases hung watches.
    pub fn recover(&self) {
        self.shared.recover();
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Stops serving: ends every watch, then shuts the server down.
    pub async fn shutdown(mut self) {
        self.stop_now();
        if let Some(task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
        {
            tracing::warn!("kube double did not stop in time");
        }
    }

    fn stop_now(&mut self) {
        self.shared.close_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        self.stop_now();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
