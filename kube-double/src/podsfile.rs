//! meshiam's pods YAML file (the demo stack's and the broker's file source's format), turned
//! into Kubernetes Pod and Namespace objects.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodsFile {
    #[serde(default)]
    pub pods: Vec<FilePod>,
    #[serde(default)]
    pub namespaces: Vec<FileNamespace>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FilePod {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileNamespace {
    pub name: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
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
        let mut metadata = json!({
            "namespace": self.namespace,
            "name": self.name,
            "annotations": self.annotations,
            "labels": self.labels,
        });
        if let Some(uid) = &self.uid {
            metadata["uid"] = json!(uid);
        }
        let sa = self.service_account.as_deref().unwrap_or("default");
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
        let mut status = json!({"phase": self.phase.as_deref().unwrap_or("Running")});
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
            "metadata": {"name": self.name, "annotations": self.annotations, "labels": self.labels},
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
  - name: agent
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
}
