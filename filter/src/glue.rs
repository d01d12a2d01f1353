//! The proxy-wasm adapter: the real hostcalls behind [`Host`], and the root and HTTP
//! contexts that hand Envoy's callbacks to the decision code. Nothing is decided here.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config;
use crate::flow::{self, MAX_BROKER_BODY, RequestFlow, Shared};
use crate::host::{Callout, CalloutResponse, DispatchError, Host, Level, SharedError};
use crate::secret;

/// The real proxy: every method is a hostcall on the current context.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyHost;

thread_local! {
    // Metric ids by name, defined on first use (Envoy returns the same id for a name).
    static METRICS: RefCell<Vec<(String, u32)>> = const { RefCell::new(Vec::new()) };
}

impl Host for ProxyHost {
    fn request_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn request_header_values(&self, name: &str) -> Option<Vec<String>> {
        let map = hostcalls::get_map(MapType::HttpRequestHeaders).ok()?;
        Some(
            map.into_iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
                .collect(),
        )
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn now(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SharedError::CasMismatch),
            Err(_) => Err(SharedError::Failed),
        }
    }

    fn fill_random(&self, buf: &mut [u8]) -> bool {
        getrandom::getrandom(buf).is_ok()
    }

    fn dispatch(&self, call: &Callout<'_>) -> Result<(), DispatchError> {
        hostcalls::dispatch_http_call(
            call.cluster,
            call.headers.clone(),
            None,
            vec![],
            Duration::from_millis(u64::from(call.timeout_ms)),
        )
        .map(|_| ())
        .map_err(|_| DispatchError)
    }

    fn reply(&self, status: u16, headers: &[(&str, &str)], body: Option<&[u8]>) {
        if hostcalls::send_http_response(u32::from(status), headers.to_vec(), body).is_err() {
            self.log(Level::Error, "meshiam: could not send the local reply");
        }
    }

    fn count(&self, metric: &str) {
        let id = METRICS.with(|m| {
            let mut m = m.borrow_mut();
            if let Some((_, id)) = m.iter().find(|(n, _)| n == metric) {
                return Some(*id);
            }
            let id = hostcalls::define_metric(MetricType::Counter, metric).ok()?;
            m.push((metric.to_string(), id));
            Some(id)
        });
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
            Level::Critical => LogLevel::Critical,
        };
        let _ = hostcalls::log(level, message);
    }
}

/// One per VM (one VM per Envoy worker thread).
#[derive(Debug, Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        // Create the token secret as early as possible; on_configure checks it again.
        if let Err(e) = secret::ensure(&ProxyHost) {
            ProxyHost.log(
                Level::Error,
                &format!("meshiam: cannot set up the token secret: {e:?}"),
            );
            return false;
        }
        ProxyHost.log(
            Level::Info,
            concat!(
                "meshiam filter ",
                env!("CARGO_PKG_VERSION"),
                " (commit ",
                env!("MESHIAM_GIT_COMMIT"),
                ") starting"
            ),
        );
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let h = ProxyHost;
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let cfg = match config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                h.log(Level::Error, &e.to_string());
                return false;
            }
        };
        if let Err(e) = secret::ensure(&h) {
            h.log(
                Level::Error,
                &format!("meshiam: cannot set up the token secret: {e:?}"),
            );
            return false;
        }
        let shared = Shared::new(cfg);
        let id = crate::identity::resolve(&h, &shared.config);
        if id.is_complete() {
            let _ = shared.identity.set(id);
        }
        // Logs a warning now rather than at the first request when the addresses are unknown.
        let _ = shared.pod_ips(&h);
        self.shared = Some(Rc::new(shared));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            flow: self.shared.clone().map(RequestFlow::new),
        }))
    }
}

/// One per HTTP stream.
#[derive(Debug)]
pub struct Http {
    /// `None` only if Envoy created a stream for a VM whose configuration failed; such a
    /// stream's metadata requests are refused ([`flow::unconfigured`]).
    flow: Option<RequestFlow>,
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(flow) = self.flow.as_mut() else {
            return;
        };
        let headers = hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let status = find(":status").and_then(|s| s.parse::<u16>().ok());
        let body = if body_size > MAX_BROKER_BODY {
            None
        } else {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
        };
        let resp = CalloutResponse {
            // An oversized answer is treated like no answer.
            status: if body_size > MAX_BROKER_BODY {
                None
            } else {
                status
            },
            content_type: find("content-type"),
            reason: find(meshiam_imds::headers::REASON),
            token_expires: find(meshiam_imds::container::TOKEN_EXPIRES)
                .and_then(|v| v.trim().parse().ok()),
            body: body.unwrap_or_default(),
        };
        flow.on_callout_response(&ProxyHost, resp);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.flow.as_mut() {
            Some(flow) => match flow.on_request_headers(&ProxyHost) {
                flow::Action::Continue => Action::Continue,
                flow::Action::Pause => Action::Pause,
            },
            // Fail closed for metadata, never a pass-through.
            None => match flow::unconfigured(&ProxyHost) {
                flow::Action::Continue => Action::Continue,
                flow::Action::Pause => Action::Pause,
            },
        }
    }
}

/// A panic aborts the VM (and every request on its worker): say so loudly.
fn panic_hook(info: &std::panic::PanicHookInfo<'_>) {
    let location = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    ProxyHost.log(
        Level::Critical,
        &format!("meshiam: filter panicked at {location}; this worker's VM is lost"),
    );
}

/// Entry point: Envoy calls `_initialize` once per VM.
pub fn start() {
    std::panic::set_hook(Box::new(panic_hook));
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}
