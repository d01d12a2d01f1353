//! Counting slots per caller address and in total: the broker's bound on what one pod (or
//! everything together) can hold open at once. Used twice: for connections on the IMDS
//! listener, and for requests waiting for an unknown address to appear in the pod store.
//!
//! A slot is a [`Permit`] that gives itself back when dropped, so a task that ends any way
//! at all (done, timed out, cancelled) frees what it held.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Which cap a caller hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// The caller's address already holds its share.
    PerPeer,
    /// The node-wide total is taken.
    Total,
}

impl LimitHit {
    /// The metric label and the audit wording.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitHit::PerPeer => "per-peer",
            LimitHit::Total => "total",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    peers: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Inner {
    per_peer: usize,
    total: usize,
    counts: Mutex<Counts>,
}

/// Slots, at most `per_peer` for one address and `total` for all. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerLimiter {
    inner: Arc<Inner>,
}

/// One held slot; dropping it gives it back.
#[derive(Debug)]
pub struct Permit {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl PeerLimiter {
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                per_peer,
                total,
                counts: Mutex::new(Counts::default()),
            }),
        }
    }

    /// A slot for `ip`, or which cap is full. Never waits.
    pub fn try_acquire(&self, ip: IpAddr) -> Result<Permit, LimitHit> {
        let mut c = lock(&self.inner.counts);
        if c.total >= self.inner.total {
            return Err(LimitHit::Total);
        }
        let held = c.peers.entry(ip).or_insert(0);
        if *held >= self.inner.per_peer {
            return Err(LimitHit::PerPeer);
        }
        *held += 1;
        c.total += 1;
        Ok(Permit {
            inner: self.inner.clone(),
            ip,
        })
    }

    /// Slots held now, by everyone.
    pub fn in_use(&self) -> usize {
        lock(&self.inner.counts).total
    }

    /// Slots `ip` holds now.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        lock(&self.inner.counts)
            .peers
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }

    /// Addresses with at least one slot (the map never keeps empty entries, so an attacker
    /// cycling through addresses leaves nothing behind).
    pub fn peers(&self) -> usize {
        lock(&self.inner.counts).peers.len()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = lock(&self.inner.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(held) = c.peers.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                c.peers.remove(&self.ip);
            }
        }
    }
}

/// The counts stay consistent even if a holder panicked (every update is one step), so a
/// poisoned lock is used as it is.
fn lock(m: &Mutex<Counts>) -> MutexGuard<'_, Counts> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_peer_cap_leaves_others_their_share() {
        let l = PeerLimiter::new(2, 10);
        let a1 = l.try_acquire(ip("10.0.0.1")).unwrap();
        let _a2 = l.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            l.try_acquire(ip("10.0.0.1")).unwrap_err(),
            LimitHit::PerPeer
        );
        let _b = l.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(l.in_use(), 3);
        drop(a1);
        assert_eq!(l.held_by(ip("10.0.0.1")), 1);
        let _a3 = l.try_acquire(ip("10.0.0.1")).unwrap();
    }

    #[test]
    fn total_cap_counts_everyone() {
        let l = PeerLimiter::new(5, 3);
        let held: Vec<_> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .map(|a| l.try_acquire(ip(a)).unwrap())
            .collect();
        assert_eq!(l.try_acquire(ip("10.0.0.4")).unwrap_err(), LimitHit::Total);
        drop(held);
        assert_eq!(l.in_use(), 0);
        assert_eq!(l.peers(), 0, "released addresses leave no entry");
        l.try_acquire(ip("10.0.0.4")).unwrap();
    }
}
