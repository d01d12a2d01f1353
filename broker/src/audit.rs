//! One structured line per credential issue or refusal (target `meshiam::audit`), and
//! security events (target `meshiam::security`). Never a secret key or a token.

use std::net::IpAddr;

/// What happened to one request.
#[derive(Debug, Default)]
pub struct AuditEvent<'a> {
    pub caller: Option<IpAddr>,
    pub namespace: Option<&'a str>,
    pub pod: Option<&'a str>,
    pub role_arn: Option<&'a str>,
    pub session_name: Option<&'a str>,
    pub access_key_id: Option<&'a str>,
    pub path: &'a str,
    /// `issued`, `stale`, or the refusal's reason code.
    pub outcome: &'a str,
    pub status: u16,
    /// The `x-meshiam-filter` version the caller sent (sanitised), empty when absent.
    /// Informational only: any caller can send it, and it changes no rule.
    pub claimed_filter: &'a str,
    /// The SPIFFE ID of the verified workload certificate on the connection (`--mtls`),
    /// empty for plain callers.
    pub peer_identity: Option<&'a str>,
    pub detail: Option<String>,
}

pub fn record(e: &AuditEvent<'_>) {
    tracing::info!(
        target: "meshiam::audit",
        caller = %e.caller.map(|c| c.to_string()).unwrap_or_default(),
        namespace = e.namespace.unwrap_or(""),
        pod = e.pod.unwrap_or(""),
        role_arn = e.role_arn.unwrap_or(""),
        session_name = e.session_name.unwrap_or(""),
        access_key_id = e.access_key_id.unwrap_or(""),
        path = e.path,
        outcome = e.outcome,
        status = e.status,
        claimed_filter = e.claimed_filter,
        peer_identity = e.peer_identity.unwrap_or(""),
        detail = e.detail.as_deref().unwrap_or(""),
        "audit"
    );
}

/// A call-out claimed one pod from another pod's address.
pub fn identity_mismatch(caller: IpAddr, detail: &str) {
    tracing::warn!(
        target: "meshiam::security",
        event = "identity-mismatch",
        caller = %caller,
        detail,
        "security event: claimed identity does not match the caller's address"
    );
}

/// A workload certificate that is invalid or names another pod than the caller's address.
pub fn peer_certificate_refused(caller: IpAddr, reason: &str, detail: &str) {
    tracing::warn!(
        target: "meshiam::security",
        event = reason,
        caller = %caller,
        detail,
        "security event: workload certificate refused"
    );
}
