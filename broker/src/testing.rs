//! Test doubles shared by the unit tests and `broker/tests/`: a fake STS that counts calls.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use meshiam_imds::Credentials;

use crate::clock::Clock;
use crate::sts::{AssumeRoleRequest, StsApi, StsError, StsErrorKind};

/// An STS that answers from memory: credentials expire `duration_secs` after the clock's
/// now; it can be made to fail or to be slow.
#[derive(Debug)]
pub struct FakeSts {
    clock: Clock,
    calls: AtomicUsize,
    requests: Mutex<Vec<AssumeRoleRequest>>,
    fail: Mutex<Option<StsErrorKind>>,
    delay: Mutex<Duration>,
    caller_arn: Mutex<Result<String, StsErrorKind>>,
}

impl FakeSts {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            calls: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            fail: Mutex::new(None),
            delay: Mutex::new(Duration::ZERO),
            caller_arn: Mutex::new(Ok(
                "arn:aws:sts::123456789012:assumed-role/kube-1-worker/i-0123456789".into(),
            )),
        }
    }

    /// AssumeRole calls so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<AssumeRoleRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn fail_with(&self, kind: Option<StsErrorKind>) {
        *self.fail.lock().unwrap_or_else(|e| e.into_inner()) = kind;
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }
}

impl StsApi for FakeSts {
    fn assume_role<'a>(
        &'a self,
        req: &'a AssumeRoleRequest,
    ) -> BoxFuture<'a, Result<Credentials, StsError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(req.clone());
            let delay = *self.delay.lock().unwrap_or_else(|e| e.into_inner());
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(kind) = *self.fail.lock().unwrap_or_else(|e| e.into_inner()) {
                return Err(StsError::new(kind, "Fake"));
            }
            let now = self.clock.now();
            Ok(Credentials {
                access_key_id: format!("ASIAFAKE{n:08}"),
                secret_access_key: format!("fake-secret-{n}"),
                token: format!("fake-token-{n}"),
                expiration: now + u64::from(req.duration_secs),
                last_updated: now,
            })
        })
    }

    fn caller_arn(&self) -> BoxFuture<'_, Result<String, StsError>> {
        Box::pin(async move {
            self.caller_arn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .map_err(|k| StsError::new(k, "Fake"))
        })
    }
}
