//! meshiam's pods YAML file (the demo stack's and the broker's file source's format), turned
//! into Kubernetes Pod and Namespace objects. The format is `docs/pods.schema.json`, shared
//! with the broker and tests/stack (a test below holds these structs to it).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodsFile {
    #[serde(default)]
    pub pods: Vec<FilePod>,
    #[serde(default)]
    pub namespaces: Vec<FileNamespace>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilePod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `status.phase`, one of Kubernetes' five.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Phase {
    Pending,
    #[default]
    Running,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNamespace {
    pub name: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// As the API server's admission does for a pod that names none.
fn default_service_account() -> String {
    "default".into()
}

impl PodsFile {
    pub fn parse(yaml: &str) -> anyhow::Result<Self> {
        Ok(yaml_serde::from_str(yaml)?)
    }
}

impl FilePod {
    /// The Pod as the apiserver would hold it once scheduled and (by default) running.
    pub fn to_object(&self) -> Value {
        let metadata = json!({
            "namespace": self.namespace,
            "name": self.name,
            "annotations": self.annotations,
            "labels": {},
        });
        let sa = &self.service_account;
        let mut spec = json!({
            "containers": [{"name": "app", "image": "registry.invalid/app"}],
            "serviceAccountName": sa,
            "serviceAccount": sa,
        });
        if let Some(node) = &self.node {
            spec["nodeName"] = json!(node);
        }
        if self.host_network {
            spec["hostNetwork"] = json!(true);
        }
        let mut status = json!({"phase": self.phase});
        if let Some(first) = self.ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = self.ips.iter().map(|ip| json!({"ip": ip})).collect();
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": spec,
            "status": status,
        })
    }
}

impl FileNamespace {
    pub fn to_object(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": self.name, "annotations": self.annotations, "labels": {}},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_the_documented_format() {
        let file = PodsFile::parse(
            r#"
pods:
  - namespace: default
    name: myapp
    ips: ["198.18.1.10", "fd00::10"]
    serviceAccount: myapp
    node: node-1
    annotations:
      iam.amazonaws.com/role: myapp-iam-role
  - namespace: default
    name: agent
    hostNetwork: true
    phase: Pending
namespaces:
  - name: restricted
    annotations:
      iam.amazonaws.com/allowed-roles: '["allowed-*"]'
"#,
        )
        .unwrap();
        let pod = file.pods[0].to_object();
        assert_eq!(pod["metadata"]["namespace"], "default");
        assert_eq!(pod["spec"]["nodeName"], "node-1");
        assert_eq!(pod["spec"]["serviceAccountName"], "myapp");
        assert_eq!(pod["status"]["phase"], "Running");
        assert_eq!(pod["status"]["podIP"], "198.18.1.10");
        assert_eq!(pod["status"]["podIPs"][1]["ip"], "fd00::10");
        assert_eq!(
            pod["metadata"]["annotations"]["iam.amazonaws.com/role"],
            "myapp-iam-role"
        );
        let agent = file.pods[1].to_object();
        assert_eq!(agent["metadata"]["namespace"], "default");
        assert_eq!(agent["spec"]["hostNetwork"], true);
        assert_eq!(agent["status"]["phase"], "Pending");
        assert!(agent["status"]["podIP"].is_null());
        let ns = file.namespaces[0].to_object();
        assert_eq!(
            ns["metadata"]["annotations"]["iam.amazonaws.com/allowed-roles"],
            r#"["allowed-*"]"#
        );
    }

    include!("../../tests/pods_schema_check.rs");

    /// `docs/pods.schema.json` is the pods file's one format (the broker and tests/stack read
    /// it too): this reader takes every field the schema lists, refuses any other, needs the
    /// ones it requires and assumes its defaults.
    #[test]
    fn reads_exactly_the_shared_schema() {
        check_pods_schema_fields(|text| {
            PodsFile::parse(text).map(|_| ()).map_err(|e| e.to_string())
        });
        let (_, full) = pods_schema();
        let file = PodsFile::parse(&full.to_string()).unwrap();
        let pod = file.pods[0].to_object();
        assert_eq!(pod["metadata"]["namespace"], "default");
        assert_eq!(pod["metadata"]["name"], "myapp");
        assert_eq!(pod["status"]["podIPs"][1]["ip"], "fd00::10");
        assert_eq!(pod["spec"]["serviceAccountName"], "myapp");
        assert_eq!(pod["spec"]["nodeName"], "node-1");
        assert_eq!(pod["status"]["phase"], "Pending");
        assert_eq!(pod["spec"]["hostNetwork"], true);
        assert_eq!(
            pod["metadata"]["annotations"],
            full["pods"][0]["annotations"]
        );
        let ns = file.namespaces[0].to_object();
        assert_eq!(
            ns["metadata"]["annotations"],
            full["namespaces"][0]["annotations"]
        );

        let minimal =
            r#"{"pods": [{"namespace": "a", "name": "b"}], "namespaces": [{"name": "a"}]}"#;
        let file = PodsFile::parse(minimal).unwrap();
        let (pod, ns) = (&file.pods[0], &file.namespaces[0]);
        check_pods_schema_defaults(
            json!({
                "ips": pod.ips,
                "serviceAccount": pod.service_account,
                "node": pod.node,
                "phase": pod.phase,
                "hostNetwork": pod.host_network,
                "annotations": pod.annotations,
            }),
            json!({"annotations": ns.annotations}),
        );
    }
}
