//! The narrow interface between the filter's decisions and the proxy.
//!
//! Everything the decision code needs from Envoy goes through [`Host`]: the proxy-wasm
//! adapter ([`crate::glue`]) implements it over the real hostcalls, the mock host in the
//! tests over plain memory. Decisions never call a hostcall directly, so every branch can be
//! exercised natively.

/// Log severity, mapped one to one onto proxy-wasm's levels by the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

/// A shared-data write refused because another VM changed the key since it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedError {
    CasMismatch,
    Failed,
}

/// A call-out to the broker, built from scratch (never from the application's headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout<'a> {
    pub cluster: &'a str,
    /// Pseudo-headers first (`:method`, `:path`, `:authority`, `:scheme`), then the rest.
    pub headers: Vec<(&'a str, &'a str)>,
    pub timeout_ms: u32,
}

/// A call-out the proxy refused to start (unknown cluster, bad headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchError;

/// What came back from a call-out. `status` is `None` when the call failed without an
/// answer (reset, refused connection reported as a failure, oversized body).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CalloutResponse {
    pub status: Option<u16>,
    pub content_type: Option<String>,
    pub reason: Option<String>,
    /// `x-meshiam-token-expires` (container-credentials answers): until when the broker's
    /// verdict on the pod's token holds, Unix seconds.
    pub token_expires: Option<u64>,
    pub body: Vec<u8>,
}

/// The proxy as the decision code sees it. Methods take `&self`: proxy-wasm hostcalls act on
/// the current context, and the mock keeps its state in cells.
pub trait Host {
    /// A request header of the current stream (`:authority`, `:path`, …), lowercase name.
    fn request_header(&self, name: &str) -> Option<String>;
    /// Every value of a request header, in order (`None` when the headers cannot be read).
    /// Costs a copy of the whole header map: only for the rare requests where a repeated
    /// header matters (token PUTs, reads carrying a token); `request_header` sees the first
    /// value only.
    fn request_header_values(&self, name: &str) -> Option<Vec<String>>;
    /// An Envoy attribute such as `["destination", "address"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Wall-clock time, Unix seconds.
    fn now(&self) -> u64;
    /// Shared data of this Envoy (all worker VMs): value and its CAS version.
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes shared data; with `cas`, only if the key is still at that version.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError>;
    /// Fills `buf` from a cryptographic source; false on failure.
    fn fill_random(&self, buf: &mut [u8]) -> bool;
    /// Starts a call-out; its answer arrives later through the stream's call-out callback.
    fn dispatch(&self, call: &Callout<'_>) -> Result<(), DispatchError>;
    /// Answers the application directly; the request goes nowhere else.
    fn reply(&self, status: u16, headers: &[(&str, &str)], body: Option<&[u8]>);
    /// Adds one to the named counter.
    fn count(&self, metric: &str);
    fn log(&self, level: Level, message: &str);
}
