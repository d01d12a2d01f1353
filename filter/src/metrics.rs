//! Metric names. Envoy shows proxy-wasm counters under the `wasmcustom.` stats prefix,
//! e.g. `wasmcustom.meshiam.requests.credentials.200`.

use alloc::format;
use alloc::string::String;

/// Call-outs started to the broker (token PUTs of the broker session included).
pub const CALLOUTS: &str = "meshiam.callouts";
/// Call-outs that failed: no answer, timeout, 5xx, or an unreadable answer.
pub const CALLOUT_FAILURES: &str = "meshiam.callout_failures";
/// Answers served from a fresh cache entry, without a call-out.
pub const CACHE_HITS: &str = "meshiam.cache_hits";
/// Answers served from the cache because the broker failed.
pub const STALE_SERVES: &str = "meshiam.stale_serves";
/// Metadata requests refused because their connection did not begin in the pod (from
/// another pod, the node, or a source that cannot be told); each is also counted as
/// `meshiam.requests.<class>.403`.
pub const SOURCE_REFUSALS: &str = "meshiam.source_refusals";
/// Broker tokens asked for (the sidecar's own session with the broker).
pub const BROKER_TOKENS: &str = "meshiam.broker_tokens";
/// Reads asked again with a new broker token after the broker refused the old one (401).
pub const BROKER_TOKEN_RETRIES: &str = "meshiam.broker_token_retries";
/// IMDSv2 tokens issued (to the application).
pub const TOKENS_ISSUED: &str = "meshiam.tokens_issued";

/// Metadata requests by path class (see `PathClass::label`) and answered status.
pub fn request(class: &str, status: u16) -> String {
    format!("meshiam.requests.{class}.{status}")
}
