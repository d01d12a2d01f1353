//! The file pod source: a YAML list of pods and namespaces, reloaded when it changes (the
//! file's modification time, size or inode is polled). The local demo and hosts without
//! Kubernetes use it. Its format is `docs/pods.schema.json`, shared with the Kubernetes API
//! double and tests/stack (a test below holds these structs to it).
//!
//! ```yaml
//! pods:
//!   - namespace: default
//!     name: myapp
//!     ips: ["198.18.1.10"]
//!     serviceAccount: myapp     # default "default"
//!     node: node-1              # optional
//!     phase: Running            # default Running
//!     hostNetwork: false        # default false
//!     annotations:
//!       iam.amazonaws.com/role: myapp-iam-role
//! namespaces:
//!   - name: restricted
//!     annotations:
//!       iam.amazonaws.com/allowed-roles: '["allowed-*"]'
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use thiserror::Error;

use crate::pods::{Namespace, Pod, PodPhase, PodStore, canonical};

#[derive(Debug, Error)]
pub enum FileError {
    #[error("pods file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pods file {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    pods: Vec<FilePod>,
    #[serde(default)]
    namespaces: Vec<FileNamespace>,
}

fn running() -> PodPhase {
    PodPhase::Running
}

/// As the API server's admission does for a pod that names none.
fn default_service_account() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilePod {
    namespace: String,
    name: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default = "default_service_account")]
    service_account: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default = "running")]
    phase: PodPhase,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNamespace {
    name: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Parses a pods file. With `node_name`, only pods of that node or with no node are kept.
pub fn parse(
    path: &Path,
    text: &str,
    node_name: Option<&str>,
) -> Result<(Vec<Pod>, Vec<Namespace>), FileError> {
    let invalid = |problem: String| FileError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc {
            pods: Vec::new(),
            namespaces: Vec::new(),
        }
    } else {
        yaml_serde::from_str(text).map_err(|e| invalid(e.to_string()))?
    };
    let mut seen = HashSet::new();
    let mut pods = Vec::new();
    for (i, p) in doc.pods.into_iter().enumerate() {
        if p.namespace.trim().is_empty() || p.name.trim().is_empty() {
            return Err(invalid(format!(
                "pods[{i}]: namespace and name must not be empty"
            )));
        }
        if !seen.insert((p.namespace.clone(), p.name.clone())) {
            return Err(invalid(format!(
                "pods[{i}]: {}/{} is listed twice",
                p.namespace, p.name
            )));
        }
        if let (Some(want), Some(node)) = (node_name, p.node.as_deref())
            && want != node
        {
            continue;
        }
        pods.push(Pod {
            uid: format!("file:{}/{}", p.namespace, p.name),
            namespace: p.namespace,
            name: p.name,
            // As the store looks callers up: `::ffff:198.18.1.10` is 198.18.1.10.
            ips: p.ips.into_iter().map(canonical).collect(),
            service_account: p.service_account,
            node: p.node.unwrap_or_default(),
            host_network: p.host_network,
            phase: p.phase,
            annotations: p.annotations,
        });
    }
    let mut ns_seen = HashSet::new();
    let mut namespaces = Vec::new();
    for (i, n) in doc.namespaces.into_iter().enumerate() {
        if n.name.trim().is_empty() || !ns_seen.insert(n.name.clone()) {
            return Err(invalid(format!(
                "namespaces[{i}]: name empty or listed twice"
            )));
        }
        namespaces.push(Namespace::new(n.name, n.annotations));
    }
    Ok((pods, namespaces))
}

/// Reads and parses `path`.
pub fn load(path: &Path, node_name: Option<&str>) -> Result<(Vec<Pod>, Vec<Namespace>), FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, node_name)
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino,
    })
}

fn apply(store: &PodStore, pods: Vec<Pod>, namespaces: Vec<Namespace>) {
    store.replace_namespaces(namespaces);
    store.replace_pods(pods);
    store.mark_namespaces_synced();
    store.mark_pods_synced();
}

/// Loads `path` into `store` once; the first load must succeed (the caller fails start-up
/// on error).
pub fn load_into(path: &Path, node_name: Option<&str>, store: &PodStore) -> Result<(), FileError> {
    let (pods, namespaces) = load(path, node_name)?;
    tracing::info!(path = %path.display(), pods = pods.len(), namespaces = namespaces.len(), "loaded pods file");
    apply(store, pods, namespaces);
    Ok(())
}

/// Polls `path` every `poll` and reloads it when it changed. A bad file keeps the last good
/// state (and says why, once per change).
pub async fn watch(path: PathBuf, node_name: Option<String>, poll: Duration, store: PodStore) {
    let mut last = stamp(&path);
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match load(&path, node_name.as_deref()) {
            Ok((pods, namespaces)) => {
                tracing::info!(path = %path.display(), pods = pods.len(), namespaces = namespaces.len(), "reloaded pods file");
                apply(&store, pods, namespaces);
            }
            Err(e) => {
                tracing::warn!(error = %e, "pods file not reloaded; keeping the last good state")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::IpLookup;

    const GOOD: &str = r#"
pods:
  - namespace: default
    name: myapp
    ips: ["198.18.1.10"]
    serviceAccount: myapp
    node: node-1
    annotations:
      iam.amazonaws.com/role: myapp-iam-role
  - namespace: default
    name: elsewhere
    ips: ["198.18.1.11"]
    node: node-2
  - namespace: kube-system
    name: agent
    ips: ["198.18.0.1"]
    hostNetwork: true
    phase: Running
namespaces:
  - name: restricted
    annotations:
      iam.amazonaws.com/allowed-roles: '["allowed-*"]'
"#;

    #[test]
    fn parses_the_documented_shape_and_filters_by_node() {
        let p = Path::new("pods.yaml");
        let (pods, ns) = parse(p, GOOD, Some("node-1")).unwrap();
        assert_eq!(pods.len(), 2, "node-2's pod is not ours");
        assert_eq!(pods[0].phase, PodPhase::Running);
        assert_eq!(pods[0].service_account, "myapp");
        assert!(pods[1].host_network);
        assert_eq!(ns[0].name, "restricted");
        let (all, _) = parse(p, GOOD, None).unwrap();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn a_dual_stack_pod_is_found_by_either_address_in_any_spelling() {
        let text = r#"pods: [{namespace: default, name: myapp, ips: ["::ffff:198.18.1.10", "FD00:198:18::1:10"],
                       annotations: {iam.amazonaws.com/role: myapp-iam-role}}]"#;
        let (pods, _) = parse(Path::new("pods.yaml"), text, None).unwrap();
        let store = PodStore::new();
        store.replace_pods(pods);
        for caller in [
            "198.18.1.10",
            "::ffff:198.18.1.10",
            "fd00:198:18::1:10",
            "fd00:198:18:0:0:0:1:10",
        ] {
            match store.lookup_ip(caller.parse().unwrap()) {
                crate::pods::IpLookup::Pod(p) => assert_eq!(p.name, "myapp", "{caller}"),
                other => panic!("{caller}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let p = Path::new("/etc/meshiam/pods.yaml");
        for bad in [
            "pods: [{namespace: a, name: b, ips: [\"not-an-ip\"]}]",
            "pods: [{namespace: a, name: b, colour: red}]",
            "pods: [{namespace: a, name: b}, {namespace: a, name: b}]",
            "pods: [{namespace: a, name: b, phase: Sleeping}]",
            "pods: {}",
        ] {
            let e = parse(p, bad, None).unwrap_err().to_string();
            assert!(e.starts_with("pods file /etc/meshiam/pods.yaml: "), "{e}");
        }
        assert!(parse(p, "", None).unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pods.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let store = PodStore::new();
        load_into(&path, None, &store).unwrap();
        assert!(store.is_ready());
        let task = tokio::spawn(watch(
            path.clone(),
            None,
            Duration::from_millis(20),
            store.clone(),
        ));
        let ip: IpAddr = "198.18.1.10".parse().unwrap();
        assert!(matches!(store.lookup_ip(ip), IpLookup::Pod(_)));

        // A broken file: nothing changes.
        let tmp = dir.path().join("tmp.yaml");
        std::fs::write(&tmp, "pods: [").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(store.lookup_ip(ip), IpLookup::Pod(_)));

        // A good one that moves myapp away.
        std::fs::write(&tmp, GOOD.replace("198.18.1.10", "198.18.1.99")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let moved: IpAddr = "198.18.1.99".parse().unwrap();
        let found = store.wait_for_ip(moved, Duration::from_secs(2)).await;
        assert!(matches!(found, IpLookup::Pod(p) if p.name == "myapp"));
        assert_eq!(store.lookup_ip(ip), IpLookup::Unknown);
        task.abort();
    }

    include!("../../tests/pods_schema_check.rs");

    /// `docs/pods.schema.json` is the pods file's one format (the API double and tests/stack
    /// read it too): this reader takes every field the schema lists, refuses any other,
    /// needs the ones it requires and assumes its defaults.
    #[test]
    fn reads_exactly_the_shared_schema() {
        use serde_json::json;
        let p = Path::new("pods.yaml");
        check_pods_schema_fields(|text| {
            parse(p, text, None).map(|_| ()).map_err(|e| e.to_string())
        });
        let (_, full) = pods_schema();
        let (pods, nss) = parse(p, &full.to_string(), None).unwrap();
        let pod = &pods[0];
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("default", "myapp")
        );
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(
            (pod.service_account.as_str(), pod.node.as_str()),
            ("myapp", "node-1")
        );
        assert_eq!((pod.phase, pod.host_network), (PodPhase::Pending, true));
        assert_eq!(json!(pod.annotations), full["pods"][0]["annotations"]);
        assert_eq!(
            json!(nss[0].annotations()),
            full["namespaces"][0]["annotations"]
        );

        let minimal =
            r#"{"pods": [{"namespace": "a", "name": "b"}], "namespaces": [{"name": "a"}]}"#;
        let (pods, nss) = parse(p, minimal, None).unwrap();
        let pod = &pods[0];
        check_pods_schema_defaults(
            json!({
                "ips": pod.ips,
                "serviceAccount": pod.service_account,
                // No node: the broker keeps the pod whatever its --node-name.
                "node": if pod.node.is_empty() { None } else { Some(&pod.node) },
                "phase": pod.phase,
                "hostNetwork": pod.host_network,
                "annotations": pod.annotations,
            }),
            json!({"annotations": nss[0].annotations()}),
        );
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = load(Path::new("/nonexistent/pods.yaml"), None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/pods.yaml"), "{e}");
    }
}
