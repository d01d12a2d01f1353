//! A host in memory for native tests: headers and properties in, replies, call-outs,
//! metrics and logs recorded. Shared data is behind an `Rc` so several mocks can stand for
//! several worker VMs of one Envoy (`other_vm`), or for another pod (`MockHost::new`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use crate::host::{Callout, DispatchError, Host, Level, SharedError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.body.as_deref().unwrap_or_default()).into_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u32,
}

impl Dispatched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type SharedMap = Rc<RefCell<HashMap<String, (Vec<u8>, u32)>>>;

#[derive(Debug, Default)]
pub struct MockHost {
    headers: RefCell<Vec<(String, String)>>,
    properties: HashMap<Vec<String>, Vec<u8>>,
    property_reads: Cell<usize>,
    header_map_reads: Cell<usize>,
    now: Rc<Cell<u64>>,
    shared: SharedMap,
    no_random: bool,
    random_seed: Cell<u8>,
    pub dispatch_fails: Cell<bool>,
    pub dispatched: RefCell<Vec<Dispatched>>,
    pub replies: RefCell<Vec<Reply>>,
    pub metrics: RefCell<HashMap<String, u64>>,
    pub logs: RefCell<Vec<(Level, String)>>,
}

impl MockHost {
    pub fn new() -> Self {
        let h = MockHost::default();
        h.now.set(1_767_225_600);
        // Distinct randomness per "pod" so two pods never share a secret by accident.
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
        h.random_seed
            .set(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        h
    }

    /// Another worker VM of the same Envoy: same shared data and clock, own everything else.
    pub fn other_vm(&self) -> Self {
        MockHost {
            properties: self.properties.clone(),
            now: self.now.clone(),
            shared: self.shared.clone(),
            random_seed: Cell::new(self.random_seed.get().wrapping_add(101)),
            ..MockHost::default()
        }
    }

    pub fn header(self, name: &str, value: &str) -> Self {
        self.headers
            .borrow_mut()
            .push((name.to_string(), value.to_string()));
        self
    }

    pub fn property(mut self, path: &[&str], value: &str) -> Self {
        self.properties.insert(
            path.iter().map(|s| s.to_string()).collect(),
            value.as_bytes().to_vec(),
        );
        self
    }

    pub fn without_randomness(mut self) -> Self {
        self.no_random = true;
        self
    }

    /// Replaces the request headers (a new request on the same VM).
    pub fn set_request(&self, headers: &[(&str, &str)]) {
        *self.headers.borrow_mut() = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    pub fn property_reads(&self) -> usize {
        self.property_reads.get()
    }

    /// How many times the whole request header map was read.
    pub fn header_map_reads(&self) -> usize {
        self.header_map_reads.get()
    }

    pub fn advance(&self, secs: u64) {
        self.now.set(self.now.get() + secs);
    }

    pub fn last_reply(&self) -> Option<Reply> {
        self.replies.borrow().last().cloned()
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.metrics.borrow().get(name).copied().unwrap_or(0)
    }
}

impl Host for MockHost {
    fn request_header(&self, name: &str) -> Option<String> {
        self.headers
            .borrow()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn request_header_values(&self, name: &str) -> Option<Vec<String>> {
        self.header_map_reads.set(self.header_map_reads.get() + 1);
        Some(
            self.headers
                .borrow()
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect(),
        )
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.property_reads.set(self.property_reads.get() + 1);
        let key: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        self.properties.get(&key).cloned()
    }

    fn now(&self) -> u64 {
        self.now.get()
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        let mut map = self.shared.borrow_mut();
        let next = match map.get(key) {
            Some((_, current)) if cas.is_some_and(|c| c != *current) => {
                return Err(SharedError::CasMismatch);
            }
            Some((_, current)) => current + 1,
            None => 1,
        };
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }

    fn fill_random(&self, buf: &mut [u8]) -> bool {
        if self.no_random {
            return false;
        }
        let seed = self.random_seed.get();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add(i as u8);
        }
        self.random_seed.set(seed.wrapping_add(1));
        true
    }

    fn dispatch(&self, call: &Callout<'_>) -> Result<(), DispatchError> {
        if self.dispatch_fails.get() {
            return Err(DispatchError);
        }
        self.dispatched.borrow_mut().push(Dispatched {
            cluster: call.cluster.to_string(),
            headers: call
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timeout_ms: call.timeout_ms,
        });
        Ok(())
    }

    fn reply(&self, status: u16, headers: &[(&str, &str)], body: Option<&[u8]>) {
        self.replies.borrow_mut().push(Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.map(|b| b.to_vec()),
        });
    }

    fn count(&self, metric: &str) {
        *self
            .metrics
            .borrow_mut()
            .entry(metric.to_string())
            .or_default() += 1;
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
}
