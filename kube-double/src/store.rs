//! The double's etcd: every object, one global resourceVersion, and the change history that
//! watches replay from.
//!
//! Objects are kept as JSON so whatever a client writes comes back unchanged (the double does
//! not validate Pod schemas). History keeps each change's previous object, which gives two
//! things cheaply: watches can tell when an object enters or leaves a selector, and lists can
//! be served as of an older resourceVersion (for `continue` and `resourceVersionMatch=Exact`)
//! by undoing the newer changes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::ApiError;

/// The resources the double serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
}

impl Kind {
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Pod)
    }
}

/// Where an object lives: kind, namespace ("" for cluster-scoped), name. Sorted like the
/// apiserver's etcd keys, so lists come out in the same order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: if kind.namespaced() {
                namespace.into()
            } else {
                String::new()
            },
            name: name.into(),
        }
    }
}

/// The watch event type of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as history keeps it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub key: ObjKey,
    pub event: EventType,
    /// The object before the change (`None` for a creation).
    pub prev: Option<Arc<Value>>,
    /// The object after the change; for a deletion, the deleted object stamped with the
    /// deletion's resourceVersion (what a DELETED watch event carries).
    pub obj: Arc<Value>,
}

/// At most this many changes are kept; older ones are compacted away, as etcd does.
const HISTORY_LIMIT: usize = 10_000;

/// The first resourceVersion handed out is `RV_BASE + 1`; small numbers look like "0" too
/// easily in tests.
const RV_BASE: u64 = 1000;

#[derive(Debug)]
pub struct Db {
    rv: u64,
    objects: BTreeMap<ObjKey, Arc<Value>>,
    history: VecDeque<Change>,
    /// The oldest resourceVersion a watch can resume from (or a list be served at).
    compacted: u64,
    uids: u64,
    /// Stamped into every uid, so no two runs of the double hand out the same uid (a real
    /// API server's uids are unique forever; the broker binds tokens to them).
    uid_run: u64,
}

impl Default for Db {
    fn default() -> Self {
        Self {
            rv: RV_BASE,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: RV_BASE,
            uids: 0,
            uid_run: 0,
        }
    }
}

impl Db {
    /// An empty store whose first write gets `base + 1`. Everything at or below `base` counts
    /// as compacted: a watch or list at an older resourceVersion gets 410 Expired, as one
    /// from before a restart does on a real API server whose etcd moved on.
    pub fn starting_at(base: u64) -> Self {
        Self {
            rv: base,
            compacted: base,
            uid_run: base,
            ..Self::default()
        }
    }
}

/// A resourceVersion base no earlier run of the double can have reached: the clock in
/// microseconds. A restarted double therefore never hands out a resourceVersion a client
/// kept from before the restart (which would let a resumed watch skip the changes and
/// keep the client's stale objects); such resourceVersions are below the new base and get
/// 410 Expired, so clients re-list.
pub fn clock_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(RV_BASE)
        .max(RV_BASE)
}

/// `resourceVersion` as the apiserver parses it: a decimal; anything else is a bad request.
pub fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version {s:?}")))
}

impl Db {
    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    pub fn get(&self, key: &ObjKey) -> Option<Arc<Value>> {
        self.objects.get(key).cloned()
    }

    /// The objects of `kind` (in `namespace`, when given) as of `at` (`None`: now), sorted.
    pub fn snapshot(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        at: Option<u64>,
    ) -> Result<Vec<Arc<Value>>, ApiError> {
        let in_scope = |k: &ObjKey| k.kind == kind && namespace.is_none_or(|ns| k.namespace == ns);
        let mut objects: BTreeMap<ObjKey, Arc<Value>> = self
            .objects
            .iter()
            .filter(|(k, _)| in_scope(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(at) = at.filter(|at| *at < self.rv) {
            if at < self.compacted {
                return Err(ApiError::expired(format!(
                    "too old resource version: {at} ({})",
                    self.compacted
                )));
            }
            for change in self.history.iter().rev().take_while(|c| c.rv > at) {
                if !in_scope(&change.key) {
                    continue;
                }
                match &change.prev {
                    Some(prev) => objects.insert(change.key.clone(), prev.clone()),
                    None => objects.remove(&change.key),
                };
            }
        }
        Ok(objects.into_values().collect())
    }

    /// Changes after `since`, or `Expired` when history no longer reaches back that far, or
    /// when `since` is a resourceVersion this store never issued (newer than its current
    /// one: typically kept by a client from before the double restarted).
    pub fn changes_since(&self, since: u64) -> Result<Vec<Change>, ApiError> {
        if since < self.compacted {
            return Err(ApiError::expired(format!(
                "too old resource version: {since} ({})",
                self.compacted
            )));
        }
        if since > self.rv {
            return Err(ApiError::expired(format!(
                "resource version {since} was never issued by this API server (current: {}); \
                 re-list",
                self.rv
            )));
        }
        // History is ordered by rv; skip what the caller has seen.
        let start = self.history.partition_point(|c| c.rv <= since);
        Ok(self.history.iter().skip(start).cloned().collect())
    }

    /// Forgets all history: every watch or list at an older resourceVersion now gets 410.
    pub fn compact(&mut self) -> u64 {
        self.history.clear();
        self.compacted = self.rv;
        self.rv
    }

    fn next_uid(&mut self) -> String {
        self.uids += 1;
        let run = self.uid_run;
        format!(
            "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
            (run >> 28) as u32,
            (run >> 12) & 0xffff,
            run & 0xfff,
            self.uids
        )
    }

    fn record(&mut self, key: ObjKey, event: EventType, prev: Option<Arc<Value>>, obj: Arc<Value>) {
        match event {
            EventType::Deleted => self.objects.remove(&key),
            _ => self.objects.insert(key.clone(), obj.clone()),
        };
        self.history.push_back(Change {
            rv: self.rv,
            key,
            event,
            prev,
            obj,
        });
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// Fills in what the apiserver owns (kind, namespace, uid, resourceVersion, timestamps)
    /// and checks the name.
    fn stamp(
        &mut self,
        kind: Kind,
        namespace: Option<&str>,
        obj: &mut Value,
        existing: Option<&Value>,
    ) -> Result<ObjKey, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        obj["apiVersion"] = json!("v1");
        obj["kind"] = json!(kind.kind());
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let meta = &mut obj["metadata"];
        if kind.namespaced() {
            let path_ns = namespace.unwrap_or_default();
            match meta["namespace"].as_str() {
                None | Some("") => meta["namespace"] = json!(path_ns),
                Some(ns) if ns == path_ns => {}
                Some(ns) => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({ns}) does not match the \
                         namespace sent on the request ({path_ns})"
                    )));
                }
            }
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        if meta["name"].as_str().unwrap_or_default().is_empty() {
            match meta["generateName"].as_str() {
                Some(prefix) if existing.is_none() => {
                    self.uids += 1;
                    meta["name"] = json!(format!("{prefix}{:05x}", self.uids));
                }
                _ => return Err(ApiError::invalid("metadata.name: Required value")),
            }
        }
        match existing {
            Some(old) => {
                meta["uid"] = old["metadata"]["uid"].clone();
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            }
            None => {
                if meta["uid"].as_str().unwrap_or_default().is_empty() {
                    meta["uid"] = json!(self.next_uid());
                }
                meta["creationTimestamp"] = json!(now_rfc3339());
            }
        }
        let key = ObjKey::new(
            kind,
            meta["namespace"].as_str().unwrap_or_default(),
            meta["name"].as_str().unwrap_or_default(),
        );
        if !obj["status"].is_object() {
            obj["status"] = json!({});
        }
        if obj["status"]["phase"].is_null() {
            obj["status"]["phase"] = json!(match kind {
                Kind::Pod => "Pending",
                Kind::Namespace => "Active",
            });
        }
        Ok(key)
    }

    pub fn create(
        &mut self,
        kind: Kind,
        namespace: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let key = self.stamp(kind, namespace, &mut obj, None)?;
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&key));
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let obj = Arc::new(obj);
        self.record(key, EventType::Added, None, obj.clone());
        Ok(obj)
    }

    /// Replaces an object. A `metadata.resourceVersion` in the body must match the stored
    /// one (optimistic concurrency); an empty one means "unconditionally".
    pub fn replace(&mut self, key: &ObjKey, mut obj: Value) -> Result<Arc<Value>, ApiError> {
        let old = self.get(key).ok_or_else(|| ApiError::not_found(key))?;
        if obj["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n != key.name)
        {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(key));
        }
        obj["metadata"]["name"] = json!(key.name);
        let ns = key.kind.namespaced().then_some(key.namespace.as_str());
        self.stamp(key.kind, ns, &mut obj, Some(&old))?;
        if strip_rv(&obj) == strip_rv(&old) {
            // The apiserver does not write (or bump the resourceVersion) for a no-op update.
            return Ok(old);
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let obj = Arc::new(obj);
        self.record(key.clone(), EventType::Modified, Some(old), obj.clone());
        Ok(obj)
    }

    /// Creates or replaces (what the pods-file loader and the Rust API's `apply` use).
    pub fn apply(&mut self, kind: Kind, mut obj: Value) -> Result<Arc<Value>, ApiError> {
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let key = ObjKey::new(kind, ns.clone().unwrap_or_default(), name);
        if self.objects.contains_key(&key) {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            self.replace(&key, obj)
        } else {
            self.create(kind, ns.as_deref(), obj)
        }
    }

    pub fn delete(&mut self, key: &ObjKey) -> Result<Arc<Value>, ApiError> {
        let old = self.get(key).ok_or_else(|| ApiError::not_found(key))?;
        self.rv += 1;
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let gone = Arc::new(gone);
        self.record(key.clone(), EventType::Deleted, Some(old), gone.clone());
        Ok(gone)
    }
}

impl Db {
    /// Deletes a namespace and, as the namespace controller would, the pods in it (at once:
    /// the double has no `Terminating` phase).
    pub fn delete_namespace(&mut self, key: &ObjKey) -> Result<Arc<Value>, ApiError> {
        if !self.objects.contains_key(key) {
            return Err(ApiError::not_found(key));
        }
        let pods: Vec<ObjKey> = self
            .objects
            .keys()
            .filter(|k| k.kind == Kind::Pod && k.namespace == key.name)
            .cloned()
            .collect();
        for pod in pods {
            self.delete(&pod)?;
        }
        self.delete(key)
    }
}

fn strip_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    v
}

/// Seconds precision, UTC, as `metav1.Time` serialises (the same form IMDS uses).
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    meshiam_imds::time::format_rfc3339(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn stamps_and_versions_every_write() {
        let mut db = Db::default();
        let a = db.create(Kind::Pod, Some("default"), pod("a")).unwrap();
        assert_eq!(a["metadata"]["resourceVersion"], "1001");
        assert_eq!(a["metadata"]["namespace"], "default");
        assert_eq!(a["kind"], "Pod");
        assert_eq!(a["status"]["phase"], "Pending");
        let key = ObjKey::new(Kind::Pod, "default", "a");
        assert!(db.create(Kind::Pod, Some("default"), pod("a")).is_err());
        let mut changed = (*a).clone();
        changed["status"]["podIP"] = json!("198.18.0.1");
        let b = db.replace(&key, changed.clone()).unwrap();
        assert_eq!(b["metadata"]["resourceVersion"], "1002");
        assert_eq!(b["metadata"]["uid"], a["metadata"]["uid"]);
        // Stale resourceVersion: conflict.
        assert_eq!(db.replace(&key, changed).unwrap_err().code, 409);
        let gone = db.delete(&key).unwrap();
        assert_eq!(gone["metadata"]["resourceVersion"], "1003");
        assert_eq!(db.changes_since(1001).unwrap().len(), 2);
    }

    #[test]
    fn snapshots_undo_newer_changes_until_compacted() {
        let mut db = Db::default();
        db.create(Kind::Pod, Some("default"), pod("a")).unwrap();
        let at = db.rv();
        db.create(Kind::Pod, Some("default"), pod("b")).unwrap();
        db.delete(&ObjKey::new(Kind::Pod, "default", "a")).unwrap();
        let names = |objs: Vec<Arc<Value>>| -> Vec<String> {
            objs.iter()
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(db.snapshot(Kind::Pod, None, None).unwrap()), ["b"]);
        assert_eq!(
            names(db.snapshot(Kind::Pod, None, Some(at)).unwrap()),
            ["a"]
        );
        db.compact();
        assert_eq!(
            db.snapshot(Kind::Pod, None, Some(at)).unwrap_err().code,
            410
        );
        assert_eq!(db.changes_since(at).unwrap_err().code, 410);
        assert!(db.changes_since(db.rv()).unwrap().is_empty());
    }

    #[test]
    fn uids_differ_across_runs() {
        let uid = |db: &mut Db| {
            let o = db.create(Kind::Pod, Some("default"), pod("a")).unwrap();
            o["metadata"]["uid"].as_str().unwrap().to_string()
        };
        let (mut one, mut two) = (Db::starting_at(5_000), Db::starting_at(9_000));
        let (a, b) = (uid(&mut one), uid(&mut two));
        assert_ne!(
            a, b,
            "a restarted double must not reuse an earlier run's uids"
        );
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn resource_versions_never_issued_are_expired() {
        let mut db = Db::starting_at(5_000);
        // Before the base (an earlier run of the double): too old.
        assert_eq!(db.changes_since(4_999).unwrap_err().code, 410);
        assert!(db.changes_since(5_000).unwrap().is_empty());
        db.create(Kind::Pod, Some("default"), pod("a")).unwrap();
        assert_eq!(db.changes_since(5_000).unwrap().len(), 1);
        assert!(db.changes_since(5_001).unwrap().is_empty());
        // Newer than anything issued: never issued, so expired rather than silently empty.
        let err = db.changes_since(5_002).unwrap_err();
        assert_eq!((err.code, err.reason), (410, "Expired"));
        assert!(clock_base() > 1_700_000_000_000_000);
    }

    #[test]
    fn creation_timestamps_are_second_precision_utc() {
        let mut db = Db::default();
        let a = db.create(Kind::Pod, Some("default"), pod("a")).unwrap();
        let stamp = a["metadata"]["creationTimestamp"].as_str().unwrap();
        assert!(
            meshiam_imds::time::parse_rfc3339(stamp).is_some(),
            "{stamp}"
        );
        assert!(stamp.ends_with('Z') && stamp.len() == 20, "{stamp}");
    }
}
