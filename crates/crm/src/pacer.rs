//! Request pacing for Kommo, whose limit (7 requests/s per account) covers every worker at once.
//!
//! `LocalPacer` paces one process; a deployment with several worker processes plugs in a
//! PostgreSQL-backed `Pacer` (written with the database code) so the budget is shared.

use std::num::NonZeroU32;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Default pace for Kommo (`KOMMO_RPS`): one below the account limit of 7, to leave room for
/// scheduling jitter.
pub const DEFAULT_KOMMO_RPS: u32 = 6;

/// Kommo's limit per account (`crm-contracts.md`): more earns 429s and, repeated, a block of the
/// IP, so no pacing may be set above it.
pub const KOMMO_MAX_RPS: u32 = 7;

/// Grants permission to send one request. Every Kommo request (searches, token refreshes and
/// retries included) waits on it first.
#[async_trait]
pub trait Pacer: Send + Sync {
    /// Waits until one more request may be sent.
    async fn acquire(&self);

    /// Kommo answered 429: no request of the account may go out for `wait` (repeated 429s
    /// earn the IP a block, so the whole account pauses, not just the request that got it).
    async fn hold_off(&self, wait: std::time::Duration) {
        let _ = wait;
    }
}

/// How long the account pauses after a 429: its `Retry-After`, else one second; at least a
/// second (a `Retry-After: 0`, or a date already past, would let the next request earn another
/// 429 at once), at most a minute.
pub fn hold_off_after_429(retry_after: Option<std::time::Duration>) -> std::time::Duration {
    retry_after
        .unwrap_or(std::time::Duration::from_secs(1))
        .clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        )
}

/// In-process pacing with `governor`: requests are spaced evenly (no bursts), so any one-second
/// window holds at most `rps` of them.
pub struct LocalPacer {
    limiter: DefaultDirectRateLimiter,
    /// No request before this (after a 429).
    held_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl LocalPacer {
    /// Allows `rps` requests per second, evenly spaced.
    pub fn per_second(rps: NonZeroU32) -> Self {
        let quota = Quota::per_second(rps).allow_burst(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::direct(quota),
            held_until: std::sync::Mutex::new(None),
        }
    }

    /// Like [`LocalPacer::per_second`]; `0` means the default ([`DEFAULT_KOMMO_RPS`]).
    pub fn from_rps(rps: u32) -> Self {
        let rps = NonZeroU32::new(rps)
            .or(NonZeroU32::new(DEFAULT_KOMMO_RPS))
            .unwrap_or(NonZeroU32::MIN);
        Self::per_second(rps)
    }
}

impl Default for LocalPacer {
    fn default() -> Self {
        Self::from_rps(DEFAULT_KOMMO_RPS)
    }
}

impl std::fmt::Debug for LocalPacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalPacer")
    }
}

#[async_trait]
impl Pacer for LocalPacer {
    async fn acquire(&self) {
        loop {
            let held = *self
                .held_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match held {
                Some(until) if until > tokio::time::Instant::now() => {
                    tokio::time::sleep_until(until).await;
                }
                // Checked again after the wait for a slot: a hold-off may have begun meanwhile.
                _ => {
                    self.limiter.until_ready().await;
                    let held = *self
                        .held_until
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if held.is_none_or(|until| until <= tokio::time::Instant::now()) {
                        return;
                    }
                }
            }
        }
    }

    async fn hold_off(&self, wait: std::time::Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut held = self
            .held_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.is_none_or(|h| h < until) {
            *held = Some(until);
        }
    }
}

/// No pacing at all (tests that need to provoke the CRM's own limit).
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpaced;

#[async_trait]
impl Pacer for Unpaced {
    async fn acquire(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn spaces_requests_evenly() {
        let pacer = LocalPacer::from_rps(20);
        let start = Instant::now();
        let mut stamps = Vec::new();
        for _ in 0..5 {
            pacer.acquire().await;
            stamps.push(start.elapsed());
        }
        // No burst: the fifth permit comes about 4 x 50 ms after the first.
        assert!(stamps[4] >= Duration::from_millis(190), "{stamps:?}");
        for w in stamps.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(40), "{stamps:?}");
        }
    }

    #[test]
    fn zero_means_default() {
        let _ = LocalPacer::from_rps(0);
    }
}
