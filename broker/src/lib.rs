pub mod kube_source;
pub mod pods;
