//! The broker's one error type: every refusal, with its status and reason code.
//!
//! The response carries a short generic body and `x-meshiam-reason`; the detail (the
//! `Display` text, which never holds STS error text or credentials) goes to the audit log.

use std::net::IpAddr;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshiam_imds::headers;
use meshiam_imds::rules::Refusal;
use thiserror::Error;

use crate::container::ContainerError;
use crate::limits::LimitHit;
use crate::pods::Stale;
use crate::policy::PolicyError;
use crate::sts::{StsError, StsErrorKind};

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("pod store out of date: {0}")]
    PodStoreStale(Stale),
    #[error("no pod holds address {0} (after waiting for the pod store)")]
    UnknownPod(IpAddr),
    #[error(
        "too many requests are waiting for unknown address {ip} to appear in the pod store ({} limit)",
        limit.as_str()
    )]
    PodWaitLimit { ip: IpAddr, limit: LimitHit },
    #[error("address {0} belongs to host-network pods (the node itself)")]
    HostNetwork(IpAddr),
    #[error("address {ip} is claimed by several live pods: {pods}")]
    AmbiguousIp { ip: IpAddr, pods: String },
    #[error("call-out claims to serve {claimed} but the caller's address is pod {actual}")]
    IdentityMismatch { claimed: String, actual: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("asked for role {asked:?} but the pod's role is {own:?}")]
    NotPodRole { asked: String, own: String },
    #[error("the node's metadata service has no such path")]
    NodeNotFound,
    #[error("{0}")]
    Sts(#[from] StsError),
    #[error("node metadata service: {0}")]
    NodeImds(String),
    #[error("IMDS rule refused the request ({})", .0.reason)]
    Imds(Refusal),
    #[error("no workload certificate on the connection ({0}) and --mtls required")]
    PeerCertificateMissing(&'static str),
    #[error("workload certificate refused: {0}")]
    PeerCertificateInvalid(String),
    #[error("workload certificate names {peer} but the caller's address is pod {pod}")]
    PeerIdentityMismatch { peer: String, pod: String },
    #[error("container credentials: {0}")]
    Container(#[from] ContainerError),
}

impl BrokerError {
    pub fn status(&self) -> StatusCode {
        use BrokerError::*;
        match self {
            PodStoreStale(_) | PodWaitLimit { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UnknownPod(_)
            | HostNetwork(_)
            | AmbiguousIp { .. }
            | IdentityMismatch { .. }
            | PeerCertificateMissing(_)
            | PeerCertificateInvalid(_)
            | PeerIdentityMismatch { .. } => StatusCode::FORBIDDEN,
            Policy(PolicyError::NoRole) => StatusCode::NOT_FOUND,
            Policy(PolicyError::InvalidAnnotation { .. }) => StatusCode::FORBIDDEN,
            Policy(PolicyError::NotPermitted { .. }) => StatusCode::FORBIDDEN,
            Policy(PolicyError::BaseArnUnknown(_)) => StatusCode::SERVICE_UNAVAILABLE,
            NotPodRole { .. } | NodeNotFound => StatusCode::NOT_FOUND,
            Sts(e) => match e.kind {
                StsErrorKind::Denied => StatusCode::BAD_GATEWAY,
                StsErrorKind::Throttled | StsErrorKind::Unavailable => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                StsErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            },
            NodeImds(_) => StatusCode::BAD_GATEWAY,
            Imds(refusal) => StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN),
            Container(e) => StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN),
        }
    }

    /// The `x-meshiam-reason` code (documented in docs/broker.md).
    pub fn reason(&self) -> &'static str {
        use BrokerError::*;
        match self {
            PodStoreStale(_) => "pod-store-stale",
            PodWaitLimit { .. } => "pod-wait-limit",
            UnknownPod(_) => "unknown-pod",
            HostNetwork(_) => "host-network",
            AmbiguousIp { .. } => "ambiguous-ip",
            IdentityMismatch { .. } => "identity-mismatch",
            Policy(PolicyError::NoRole) => "no-role",
            Policy(PolicyError::InvalidAnnotation { .. }) => "invalid-annotation",
            Policy(PolicyError::NotPermitted { .. }) => "role-not-permitted",
            Policy(PolicyError::BaseArnUnknown(_)) => "base-arn-unknown",
            NotPodRole { .. } => "not-pod-role",
            NodeNotFound => "path-not-allowed",
            Sts(e) => match e.kind {
                StsErrorKind::Denied => "sts-denied",
                StsErrorKind::Throttled => "sts-throttled",
                StsErrorKind::Unavailable => "sts-unavailable",
                StsErrorKind::Timeout => "sts-timeout",
            },
            NodeImds(_) => "node-imds-unavailable",
            Imds(refusal) => refusal.reason,
            PeerCertificateMissing(_) => "peer-certificate-missing",
            PeerCertificateInvalid(_) => "peer-certificate-invalid",
            PeerIdentityMismatch { .. } => "peer-identity-mismatch",
            Container(e) => e.reason(),
        }
    }
}

impl IntoResponse for BrokerError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = status.canonical_reason().unwrap_or("Error");
        (
            status,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(headers::TEXT_PLAIN),
                ),
                (
                    header::HeaderName::from_static(headers::REASON),
                    HeaderValue::from_static(self.reason()),
                ),
            ],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_errors_map_to_gateway_statuses_without_detail() {
        let e = BrokerError::Sts(StsError::new(StsErrorKind::Denied, "AccessDenied"));
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(e.reason(), "sts-denied");
        let r = e.into_response();
        assert_eq!(r.headers()[headers::REASON], "sts-denied");
        let e = BrokerError::Sts(StsError::new(StsErrorKind::Timeout, "timeout"));
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        let e = BrokerError::Sts(StsError::new(StsErrorKind::Throttled, "Throttling"));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
