//! The pods (and namespaces) on this node, indexed by IP: who a caller is.
//!
//! Sources (the Kubernetes watcher, the YAML file) feed a [`PodStore`]; the request path
//! only reads it. Only live pods (not `Succeeded`/`Failed`) that do not share the node's
//! network hold their addresses, so a finished pod releases its IP at once, and when two
//! live pods claim the same address the store says so instead of picking one.
//!
//! The store also knows how current it is: a source whose watch fails marks its side down
//! from that moment until it has re-listed. Identity by source address is only as good as
//! this view (a deleted pod's address may already belong to a new pod the store has not
//! seen), so the request path refuses once the view has been down longer than a bound
//! ([`PodStore::check_fresh`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::policy::NamespaceRules;

/// `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    /// Parses Kubernetes' phase string; anything unrecognised is `Unknown`.
    pub fn parse(s: &str) -> Self {
        match s {
            "Pending" => PodPhase::Pending,
            "Running" => PodPhase::Running,
            "Succeeded" => PodPhase::Succeeded,
            "Failed" => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }
}

/// What the broker needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub node: String,
    pub host_network: bool,
    pub phase: PodPhase,
    pub annotations: BTreeMap<String, String>,
}

impl Pod {
    pub fn key(&self) -> PodKey {
        PodKey::new(&self.namespace, &self.name)
    }

    /// A pod that finished no longer owns its address.
    pub fn is_live(&self) -> bool {
        !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }

    pub fn annotation(&self, name: &str) -> Option<&str> {
        self.annotations.get(name).map(String::as_str)
    }
}

/// What the broker needs to know about a namespace: its restriction annotations, compiled
/// once here (globs, regex) rather than on every evaluation.
#[derive(Debug, Clone, Default)]
pub struct Namespace {
    pub name: String,
    annotations: BTreeMap<String, String>,
    rules: Arc<NamespaceRules>,
}

impl Namespace {
    pub fn new(name: impl Into<String>, annotations: BTreeMap<String, String>) -> Self {
        let rules = Arc::new(NamespaceRules::compile(&annotations));
        Self {
            name: name.into(),
            annotations,
            rules,
        }
    }

    pub fn annotations(&self) -> &BTreeMap<String, String> {
        &self.annotations
    }

    /// The restriction annotations, compiled.
    pub fn rules(&self) -> &NamespaceRules {
        &self.rules
    }
}

/// The compiled rules follow from the annotations.
impl PartialEq for Namespace {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.annotations == other.annotations
    }
}

impl Eq for Namespace {}

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpLookup {
    /// Exactly one live pod.
    Pod(Arc<Pod>),
    /// No pod we know of (yet).
    Unknown,
    /// More than one live pod claims it: refuse rather than guess.
    Ambiguous(Vec<PodKey>),
    /// The address belongs to host-network pods, i.e. to the node itself: never served.
    HostNetwork,
}

/// A change the store saw, for prefetching and cache clean-up.
#[derive(Debug, Clone)]
pub enum PodEvent {
    /// A pod was added or changed.
    Applied(Arc<Pod>),
    /// A pod is gone (or finished).
    Removed(PodKey),
}

/// What a source watches; each side of the store is fresh or down on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Pods,
    Namespaces,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
        }
    }
}

/// The store's view has been out of date for too long: its source's watch failed and has
/// not re-listed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale {
    /// The side that has been down longest.
    pub resource: Resource,
    /// How long it has been down.
    pub down_for: Duration,
    /// The bound it is over.
    pub bound: Duration,
}

impl fmt::Display for Stale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} watch has been down for {:.1}s (bound {:.1}s); answering again once it has re-listed",
            self.resource.as_str(),
            self.down_for.as_secs_f64(),
            self.bound.as_secs_f64()
        )
    }
}

#[derive(Default)]
struct State {
    pods: HashMap<PodKey, Arc<Pod>>,
    /// Live, non-host-network pods by address.
    by_ip: HashMap<IpAddr, Vec<PodKey>>,
    /// Addresses of live host-network pods (the node's).
    host_ips: HashMap<IpAddr, usize>,
    namespaces: HashMap<String, Arc<Namespace>>,
    pods_synced: bool,
    namespaces_synced: bool,
    /// When each side's watch failed, while it has not recovered.
    pods_down_since: Option<Instant>,
    namespaces_down_since: Option<Instant>,
}

impl State {
    fn index(&mut self, pod: &Pod) {
        if !pod.is_live() {
            return;
        }
        for ip in &pod.ips {
            if pod.host_network {
                *self.host_ips.entry(*ip).or_default() += 1;
            } else {
                self.by_ip.entry(*ip).or_default().push(pod.key());
            }
        }
    }

    fn unindex(&mut self, pod: &Pod) {
        if !pod.is_live() {
            return;
        }
        let key = pod.key();
        for ip in &pod.ips {
            if pod.host_network {
                if let Some(n) = self.host_ips.get_mut(ip) {
                    *n -= 1;
                    if *n == 0 {
                        self.host_ips.remove(ip);
                    }
                }
            } else if let Some(keys) = self.by_ip.get_mut(ip) {
                keys.retain(|k| k != &key);
                if keys.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    fn upsert(&mut self, pod: Pod) -> Arc<Pod> {
        let pod = Arc::new(pod);
        if let Some(old) = self.pods.insert(pod.key(), pod.clone()) {
            self.unindex(&old);
        }
        self.index(&pod);
        pod
    }

    fn remove(&mut self, key: &PodKey) -> Option<Arc<Pod>> {
        let old = self.pods.remove(key)?;
        self.unindex(&old);
        Some(old)
    }
}

struct Inner {
    state: RwLock<State>,
    /// Bumped on every pod change, so waiters for an unknown IP wake up.
    generation: watch::Sender<u64>,
    events: broadcast::Sender<PodEvent>,
}

/// The node's pods and namespaces. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct PodStore {
    inner: Arc<Inner>,
}

impl Default for PodStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PodStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodStore")
            .field("pods", &self.len())
            .finish()
    }
}

impl PodStore {
    pub fn new() -> Self {
        let (generation, _) = watch::channel(0);
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                generation,
                events,
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is applied
        // before anything can panic), so a poisoned lock is still usable.
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.inner
            .generation
            .send_modify(|g| *g = g.wrapping_add(1));
    }

    fn emit(&self, event: PodEvent) {
        // No subscriber is fine.
        let _ = self.inner.events.send(event);
    }

    /// Adds or replaces a pod.
    pub fn upsert_pod(&self, pod: Pod) {
        let pod = self.write().upsert(pod);
        self.bump();
        self.emit(if pod.is_live() {
            PodEvent::Applied(pod.clone())
        } else {
            PodEvent::Removed(pod.key())
        });
    }

    /// Forgets a pod.
    pub fn remove_pod(&self, key: &PodKey) {
        let removed = self.write().remove(key);
        if removed.is_some() {
            self.bump();
            self.emit(PodEvent::Removed(key.clone()));
        }
    }

    /// Replaces every pod (a source's full re-list). Emits events for what changed only.
    pub fn replace_pods(&self, pods: impl IntoIterator<Item = Pod>) {
        let mut events = Vec::new();
        {
            let mut st = self.write();
            let mut incoming: HashMap<PodKey, Pod> =
                pods.into_iter().map(|p| (p.key(), p)).collect();
            let gone: Vec<PodKey> = st
                .pods
                .keys()
                .filter(|k| !incoming.contains_key(*k))
                .cloned()
                .collect();
            for key in gone {
                st.remove(&key);
                events.push(PodEvent::Removed(key));
            }
            for (key, pod) in incoming.drain() {
                if st.pods.get(&key).map(|old| **old == pod).unwrap_or(false) {
                    continue;
                }
                let pod = st.upsert(pod);
                events.push(if pod.is_live() {
                    PodEvent::Applied(pod)
                } else {
                    PodEvent::Removed(key)
                });
            }
        }
        self.bump();
        for e in events {
            self.emit(e);
        }
    }

    pub fn upsert_namespace(&self, ns: Namespace) {
        self.write()
            .namespaces
            .insert(ns.name.clone(), Arc::new(ns));
    }

    pub fn remove_namespace(&self, name: &str) {
        self.write().namespaces.remove(name);
    }

    pub fn replace_namespaces(&self, namespaces: impl IntoIterator<Item = Namespace>) {
        self.write().namespaces = namespaces
            .into_iter()
            .map(|n| (n.name.clone(), Arc::new(n)))
            .collect();
    }

    /// The pod source has delivered a complete list (its first, or a re-list): the pod
    /// side is synced and current.
    pub fn mark_pods_synced(&self) {
        {
            let mut st = self.write();
            st.pods_synced = true;
            st.pods_down_since = None;
        }
        self.bump();
    }

    /// The namespace source has delivered a complete list (or is not needed): the namespace
    /// side is synced and current.
    pub fn mark_namespaces_synced(&self) {
        {
            let mut st = self.write();
            st.namespaces_synced = true;
            st.namespaces_down_since = None;
        }
        self.bump();
    }

    /// `what`'s watch failed: from now on that side may miss changes, until the source has
    /// re-listed (`mark_*_synced`). A side already down keeps its first failure time.
    pub fn mark_down(&self, what: Resource) {
        let now = Instant::now();
        let mut st = self.write();
        let since = match what {
            Resource::Pods => &mut st.pods_down_since,
            Resource::Namespaces => &mut st.namespaces_down_since,
        };
        since.get_or_insert(now);
    }

    /// The side that has been down longest and for how long; `None` while every source is
    /// connected (a connected but silent watch is current: nothing changed).
    pub fn down_for(&self) -> Option<(Resource, Duration)> {
        let st = self.read();
        let now = Instant::now();
        [
            (Resource::Pods, st.pods_down_since),
            (Resource::Namespaces, st.namespaces_down_since),
        ]
        .into_iter()
        .filter_map(|(r, since)| since.map(|s| (r, now.saturating_duration_since(s))))
        .max_by_key(|(_, d)| *d)
    }

    /// `Err` once a source has been down for `bound` or longer: then a caller's address may
    /// belong to a pod the store has not seen, and identity by address must not be trusted.
    pub fn check_fresh(&self, bound: Duration) -> Result<(), Stale> {
        match self.down_for() {
            Some((resource, down_for)) if down_for >= bound => Err(Stale {
                resource,
                down_for,
                bound,
            }),
            _ => Ok(()),
        }
    }

    /// Resolves once every source has synced (see [`Self::is_ready`]).
    pub async fn wait_ready(&self) {
        let mut changes = self.inner.generation.subscribe();
        loop {
            changes.borrow_and_update();
            if self.is_ready() {
                return;
            }
            if changes.changed().await.is_err() {
                // The store is gone; nothing will ever sync.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Ready to answer: every source has synced once.
    pub fn is_ready(&self) -> bool {
        let st = self.read();
        st.pods_synced && st.namespaces_synced
    }

    /// Who holds `ip` right now.
    pub fn lookup_ip(&self, ip: IpAddr) -> IpLookup {
        let ip = canonical(ip);
        let st = self.read();
        match st.by_ip.get(&ip).map(Vec::as_slice) {
            Some([one]) => match st.pods.get(one) {
                Some(pod) => IpLookup::Pod(pod.clone()),
                None => IpLookup::Unknown,
            },
            Some(many) if many.len() > 1 => {
                let mut keys = many.to_vec();
                keys.sort();
                IpLookup::Ambiguous(keys)
            }
            _ if st.host_ips.contains_key(&ip) => IpLookup::HostNetwork,
            _ => IpLookup::Unknown,
        }
    }

    /// Like [`Self::lookup_ip`], but while the address is unknown waits up to `timeout` for
    /// the sources to catch up: a pod that asks the moment it starts is usually not in the
    /// store yet.
    pub async fn wait_for_ip(&self, ip: IpAddr, timeout: Duration) -> IpLookup {
        let mut changes = self.inner.generation.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changes.borrow_and_update();
            let found = self.lookup_ip(ip);
            if found != IpLookup::Unknown {
                return found;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                // Timed out, or the store is gone.
                _ => return self.lookup_ip(ip),
            }
        }
    }

    pub fn pod(&self, key: &PodKey) -> Option<Arc<Pod>> {
        self.read().pods.get(key).cloned()
    }

    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.read().namespaces.get(name).cloned()
    }

    /// Every pod, live or not, sorted by key.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let mut pods: Vec<_> = self.read().pods.values().cloned().collect();
        pods.sort_by_key(|p| p.key());
        pods
    }

    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pod changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PodEvent> {
        self.inner.events.subscribe()
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:198.18.0.5`, as a dual-stack socket reports IPv4
/// callers) are the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ip: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            ips: vec![ip.parse().unwrap()],
            phase: PodPhase::Running,
            ..Pod::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn finds_a_pod_by_ip_and_forgets_it() {
        let store = PodStore::new();
        store.upsert_pod(pod("default", "myapp", "198.18.0.10"));
        match store.lookup_ip(ip("198.18.0.10")) {
            IpLookup::Pod(p) => assert_eq!(p.key(), PodKey::new("default", "myapp")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store.lookup_ip(ip("::ffff:198.18.0.10")),
            store.lookup_ip(ip("198.18.0.10"))
        );
        store.remove_pod(&PodKey::new("default", "myapp"));
        assert_eq!(store.lookup_ip(ip("198.18.0.10")), IpLookup::Unknown);
    }

    #[test]
    fn finished_pods_release_their_ip() {
        let store = PodStore::new();
        let mut old = pod("default", "old", "198.18.0.11");
        store.upsert_pod(old.clone());
        store.upsert_pod(pod("default", "new", "198.18.0.11"));
        assert!(
            matches!(store.lookup_ip(ip("198.18.0.11")), IpLookup::Ambiguous(k) if k.len() == 2)
        );
        old.phase = PodPhase::Succeeded;
        store.upsert_pod(old);
        match store.lookup_ip(ip("198.18.0.11")) {
            IpLookup::Pod(p) => assert_eq!(p.name, "new"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_network_pods_are_never_a_caller() {
        let store = PodStore::new();
        let mut hn = pod("kube-system", "agent", "198.18.0.1");
        hn.host_network = true;
        store.upsert_pod(hn);
        assert_eq!(store.lookup_ip(ip("198.18.0.1")), IpLookup::HostNetwork);
        store.remove_pod(&PodKey::new("kube-system", "agent"));
        assert_eq!(store.lookup_ip(ip("198.18.0.1")), IpLookup::Unknown);
    }

    #[test]
    fn replace_emits_only_changes() {
        let store = PodStore::new();
        store.upsert_pod(pod("a", "keep", "198.18.0.2"));
        store.upsert_pod(pod("a", "drop", "198.18.0.3"));
        let mut rx = store.subscribe();
        store.replace_pods(vec![
            pod("a", "keep", "198.18.0.2"),
            pod("a", "add", "198.18.0.4"),
        ]);
        let mut seen = Vec::new();
        while let Ok(e) = rx.try_recv() {
            seen.push(match e {
                PodEvent::Applied(p) => format!("+{}", p.name),
                PodEvent::Removed(k) => format!("-{}", k.name),
            });
        }
        seen.sort();
        assert_eq!(seen, vec!["+add", "-drop"]);
        assert_eq!(store.lookup_ip(ip("198.18.0.3")), IpLookup::Unknown);
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn readiness_needs_both_sources() {
        let store = PodStore::new();
        assert!(!store.is_ready());
        store.mark_pods_synced();
        assert!(!store.is_ready());
        store.mark_namespaces_synced();
        assert!(store.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_down_longer_than_the_bound_makes_the_store_stale() {
        let store = PodStore::new();
        store.mark_pods_synced();
        store.mark_namespaces_synced();
        let bound = Duration::from_secs(5);
        assert_eq!(store.down_for(), None);
        assert_eq!(store.check_fresh(bound), Ok(()));

        store.mark_down(Resource::Pods);
        tokio::time::advance(Duration::from_secs(3)).await;
        // Down, but within the bound; a second failure keeps the first time.
        store.mark_down(Resource::Pods);
        assert_eq!(store.check_fresh(bound), Ok(()));
        store.mark_down(Resource::Namespaces);
        tokio::time::advance(Duration::from_secs(2)).await;
        let stale = store.check_fresh(bound).unwrap_err();
        assert_eq!(stale.resource, Resource::Pods);
        assert_eq!(stale.down_for, Duration::from_secs(5));
        assert!(
            stale
                .to_string()
                .contains("pods watch has been down for 5.0s (bound 5.0s)")
        );

        // The pods re-listed; the namespaces are still down (2 s so far).
        store.mark_pods_synced();
        assert_eq!(
            store.down_for(),
            Some((Resource::Namespaces, Duration::from_secs(2)))
        );
        assert_eq!(store.check_fresh(bound), Ok(()));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            store.check_fresh(bound).unwrap_err().resource,
            Resource::Namespaces
        );
        store.mark_namespaces_synced();
        assert_eq!(store.check_fresh(Duration::ZERO), Ok(()));
    }

    #[tokio::test]
    async fn ready_waiters_wake_when_the_last_source_syncs() {
        let store = PodStore::new();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait_ready().await }
        });
        store.mark_pods_synced();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        store.mark_namespaces_synced();
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn waits_for_a_pod_that_appears_late() {
        let store = PodStore::new();
        let writer = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.upsert_pod(pod("default", "late", "198.18.0.20"));
        });
        let t0 = std::time::Instant::now();
        let found = store
            .wait_for_ip(ip("198.18.0.20"), Duration::from_secs(2))
            .await;
        assert!(matches!(found, IpLookup::Pod(p) if p.name == "late"));
        assert!(t0.elapsed() < Duration::from_secs(1));
        let t0 = std::time::Instant::now();
        let missing = store
            .wait_for_ip(ip("198.18.0.21"), Duration::from_millis(100))
            .await;
        assert_eq!(missing, IpLookup::Unknown);
        assert!(t0.elapsed() >= Duration::from_millis(100));
    }
}
