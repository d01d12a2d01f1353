//! Kubernetes API test double (under construction).
