//! The node-wide STS limiter: a token bucket (`--sts-rate`, `--sts-burst`) plus a backoff
//! window that throttling or an STS outage opens for every key at once, doubling on each
//! further systemic failure up to a ceiling. A denial is about one role, not about STS, and
//! opens nothing.
//!
//! Times use `tokio::time` (tests pause it).

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::sts::{StsError, StsErrorKind};

/// Between half and all of `d`: spread out, never longer than promised.
pub(crate) fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// `base` doubled for each step after the first (`step` 0 and 1 give `base`), at most `max`.
pub(crate) fn doubled(base: Duration, step: u32, max: Duration) -> Duration {
    base.saturating_mul(1u32 << step.saturating_sub(1).min(20))
        .min(max)
}

/// A node-wide token bucket plus a backoff window opened by throttling or outages.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    burst: f64,
    base: Duration,
    max: Duration,
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    tokens: f64,
    last: Instant,
    blocked_until: Option<Instant>,
    streak: u32,
    last_kind: StsErrorKind,
}

impl Limiter {
    /// `rate_per_sec` calls a second with bursts of `burst` (both at least a little above
    /// zero); backoff from `backoff_base` doubling up to `backoff_max`.
    pub fn new(
        rate_per_sec: f64,
        burst: u32,
        backoff_base: Duration,
        backoff_max: Duration,
    ) -> Self {
        Self {
            rate: rate_per_sec.max(0.001),
            burst: f64::from(burst.max(1)),
            base: backoff_base,
            max: backoff_max,
            state: Mutex::new(LimiterState {
                tokens: f64::from(burst.max(1)),
                last: Instant::now(),
                blocked_until: None,
                streak: 0,
                last_kind: StsErrorKind::Throttled,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimiterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for permission to call STS; gives up (without waiting) when that would take
    /// past `deadline`: `node-backoff` (with the kind that opened the window) or
    /// `node-rate-limit` (throttled).
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<(), StsError> {
        loop {
            let (wait, err) = {
                let mut s = self.lock();
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
                s.tokens = (s.tokens + elapsed * self.rate).min(self.burst);
                s.last = now;
                match s.blocked_until {
                    Some(until) if until > now => {
                        (until - now, StsError::new(s.last_kind, "node-backoff"))
                    }
                    _ if s.tokens >= 1.0 => {
                        s.tokens -= 1.0;
                        return Ok(());
                    }
                    _ => (
                        // At least a millisecond: a rounding-sized wait would spin.
                        Duration::from_secs_f64((1.0 - s.tokens) / self.rate)
                            .max(Duration::from_millis(1)),
                        StsError::new(StsErrorKind::Throttled, "node-rate-limit"),
                    ),
                }
            };
            if let Some(d) = deadline
                && Instant::now() + wait > d
            {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The outcome of an STS call: success closes the backoff window, a systemic failure
    /// (throttled, unavailable, timeout) opens or lengthens it.
    pub fn record(&self, result: Result<(), StsErrorKind>) {
        let mut s = self.lock();
        match result {
            Ok(()) => {
                s.streak = 0;
                s.blocked_until = None;
            }
            Err(kind) if kind.is_systemic() => {
                s.streak = s.streak.saturating_add(1);
                s.last_kind = kind;
                let wait = jittered(doubled(self.base, s.streak, self.max));
                s.blocked_until = Some(Instant::now() + wait);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubling_starts_at_base_and_stops_at_max() {
        let s = Duration::from_secs;
        let steps: Vec<_> = (0..8).map(|i| doubled(s(1), i, s(30))).collect();
        assert_eq!(steps, [s(1), s(1), s(2), s(4), s(8), s(16), s(30), s(30)]);
        // A huge streak neither overflows nor passes the ceiling.
        assert_eq!(doubled(s(1), u32::MAX, s(60)), s(60));
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        for _ in 0..200 {
            let j = jittered(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(5) && j <= Duration::from_secs(10),
                "{j:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_spends_its_burst_then_refills_at_the_rate() {
        let l = Limiter::new(4.0, 2, Duration::from_secs(1), Duration::from_secs(8));
        let t0 = Instant::now();
        l.acquire(None).await.unwrap();
        l.acquire(None).await.unwrap();
        assert!(t0.elapsed() < MS);
        // Empty: a caller with a 100 ms deadline is refused at once, not after waiting.
        let e = l
            .acquire(Some(Instant::now() + 100 * MS))
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind, e.code.as_str()),
            (StsErrorKind::Throttled, "node-rate-limit")
        );
        assert!(t0.elapsed() < MS);
        // Without a deadline it waits one token's time (250 ms at 4/s).
        l.acquire(None).await.unwrap();
        let waited = t0.elapsed();
        assert!(waited >= 249 * MS && waited <= 260 * MS, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_systemic_failure_opens_a_doubling_window_and_success_closes_it() {
        let l = Limiter::new(1000.0, 100, Duration::from_secs(2), Duration::from_secs(8));
        l.record(Err(StsErrorKind::Unavailable));
        let e = l.acquire(Some(Instant::now())).await.unwrap_err();
        assert_eq!(
            (e.kind, e.code.as_str()),
            (StsErrorKind::Unavailable, "node-backoff")
        );
        // Background callers wait the window out: 1-2 s for the first failure.
        let t0 = Instant::now();
        l.acquire(None).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(1) && t0.elapsed() <= Duration::from_secs(2));
        // Second and third failures in a row: 2-4 s, then 4-8 s; the kind is the latest.
        l.record(Err(StsErrorKind::Throttled));
        l.record(Err(StsErrorKind::Timeout));
        let t0 = Instant::now();
        let e = l.acquire(Some(t0)).await.unwrap_err();
        assert_eq!(e.kind, StsErrorKind::Timeout);
        l.acquire(None).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(4) && t0.elapsed() <= Duration::from_secs(8));
        // Success resets the streak: the next failure is back at the first step.
        l.record(Ok(()));
        l.acquire(Some(Instant::now())).await.unwrap();
        l.record(Err(StsErrorKind::Throttled));
        let t0 = Instant::now();
        l.acquire(None).await.unwrap();
        assert!(t0.elapsed() <= Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_denial_opens_no_window() {
        let l = Limiter::new(1000.0, 100, Duration::from_secs(2), Duration::from_secs(8));
        l.record(Err(StsErrorKind::Denied));
        l.acquire(Some(Instant::now())).await.unwrap();
    }
}
