//! Header names: the ones IMDS clients send and expect, and the ones the filter and the
//! broker exchange.
//!
//! The filter builds its call-out to the broker from scratch, so no `x-meshiam-*` header an
//! application sent can ever reach the broker as identity. The broker still treats the
//! claimed identity as a cross-check only: the caller is its TCP source address.

/// IMDSv2 session token sent on GET/HEAD.
pub const TOKEN: &str = "x-aws-ec2-metadata-token";
/// IMDSv2 token TTL: required on the token PUT, echoed on its response.
pub const TOKEN_TTL: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// A token PUT carrying this header is refused, as real IMDS does.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// The pod name the filter believes it serves (cross-check only).
pub const POD_NAME: &str = "x-meshiam-pod-name";
/// The pod namespace the filter believes it serves (cross-check only).
pub const POD_NAMESPACE: &str = "x-meshiam-pod-namespace";
/// The filter's version, sent on its call-outs. Informational only (the broker records it
/// in the audit line): anything that reaches the broker can send it, so it changes no rule.
pub const FILTER: &str = "x-meshiam-filter";
/// A short, secret-free reason code the broker attaches to refusals, for logs and metrics.
pub const REASON: &str = "x-meshiam-reason";

/// Content type of every IMDS answer that is not a JSON document.
pub const TEXT_PLAIN: &str = "text/plain";
/// Content type of the credential and info documents.
pub const APPLICATION_JSON: &str = "application/json";
