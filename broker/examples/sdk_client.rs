//! A long-running AWS SDK for Rust client, for the end-to-end tests.
//!
//! It uses the SDK's default configuration only — credentials and region come from the
//! instance metadata service, IMDSv2-only as aws-sdk-rust is — and calls
//! `sts:GetCallerIdentity` every `--interval-ms` for `--seconds`, recording which access key
//! signed each call (from the request's `Authorization` header). It prints one JSON line:
//! `{"calls":N,"failures":N,"keys":N,"arn":"…"}` — counts only, never a key.
//!
//!     cargo run --example sdk_client -- 150 1000

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sts::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_sts::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_sts::error::{BoxError, DisplayErrorContext};

/// Remembers the access key of the last signed request.
#[derive(Debug, Default, Clone)]
struct SigningKey(Arc<Mutex<Option<String>>>);

impl Intercept for SigningKey {
    fn name(&self) -> &'static str {
        "SigningKey"
    }

    fn read_before_transmit(
        &self,
        ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // "AWS4-HMAC-SHA256 Credential=ASIA…/20260101/us-east-1/sts/aws4_request, …"
        let key = ctx
            .request()
            .headers()
            .get("authorization")
            .and_then(|a| a.split("Credential=").nth(1))
            .and_then(|c| c.split('/').next())
            .map(str::to_owned);
        if let Ok(mut last) = self.0.lock() {
            *last = key;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(30);
    let interval_ms: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);

    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let recorder = SigningKey::default();
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&config)
            .interceptor(recorder.clone())
            .build(),
    );

    let (mut calls, mut failures, mut keys, mut arn) = (0u64, 0u64, HashSet::new(), None);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        match sts.get_caller_identity().send().await {
            Ok(out) => {
                calls += 1;
                arn = out.arn;
            }
            Err(e) => {
                failures += 1;
                eprintln!("call failed: {}", DisplayErrorContext(&e));
            }
        }
        if let Some(k) = recorder.0.lock().ok().and_then(|k| k.clone()) {
            keys.insert(k);
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
    println!(
        "{}",
        serde_json::json!({"calls": calls, "failures": failures, "keys": keys.len(), "arn": arn})
    );
    Ok(())
}
