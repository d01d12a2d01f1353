//! The floor of a proxy-wasm filter's memory in Envoy (benchmark 6, BENCHMARKS.md): a root
//! context and an HTTP context whose every callback only continues. Whatever the meshiam
//! filter costs beyond this module, in the same Envoy, is meshiam's own.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(Root));
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Continue))
    }
}

/// Every callback keeps the SDK's default: continue.
struct Continue;

impl Context for Continue {}

impl HttpContext for Continue {}
