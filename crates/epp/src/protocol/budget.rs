//! The memory budget for request bodies across all streams. `--max-body-bytes` bounds one
//! stream; without a bound across streams, many concurrent large bodies could take all memory.
//!
//! Every buffered body byte is charged to one process-wide budget (`--max-buffered-body-bytes`)
//! through a [`Lease`] its stream holds until the body is handed to the gateway (or the stream
//! ends). Bytes are charged as they arrive: a declared `Content-Length` is only checked against
//! what is free when the headers come (a body that could not fit is refused before any byte is
//! kept), never reserved, because a client could otherwise hold the whole budget with headers
//! alone. A charge that does not fit refuses that one stream (503); every other stream, and
//! every body already handed on, goes on. The counter is one atomic: no lock on the request
//! path.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Default budget: 1 GiB, sixteen bodies at the default per-request limit.
pub const DEFAULT_BODY_BUDGET_BYTES: usize = 1 << 30;

/// The process-wide budget.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One stream's share of the budget; returned when dropped or [`Lease::release`]d.
#[derive(Debug)]
pub struct Lease {
    budget: Arc<BodyBudget>,
    held: usize,
}

impl Lease {
    /// An empty lease on `budget`.
    pub fn new(budget: Arc<BodyBudget>) -> Self {
        Self { budget, held: 0 }
    }

    /// Makes the lease cover at least `bytes` in all; `false` (and nothing charged) when the
    /// budget cannot.
    pub fn cover(&mut self, bytes: usize) -> bool {
        if bytes <= self.held {
            return true;
        }
        let more = bytes - self.held;
        if self.budget.charge(more) {
            self.held = bytes;
            true
        } else {
            false
        }
    }

    /// Whether `bytes` in all could be covered now (nothing is charged).
    pub fn could_cover(&self, bytes: usize) -> bool {
        bytes <= self.held
            || self
                .budget
                .used()
                .checked_add(bytes - self.held)
                .is_some_and(|total| total <= self.budget.limit)
    }

    /// The budget's limit in bytes.
    pub fn budget_limit(&self) -> usize {
        self.budget.limit
    }

    /// Bytes held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Returns everything held.
    pub fn release(&mut self) {
        if self.held > 0 {
            self.budget.release(self.held);
            self.held = 0;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_share_the_budget_and_return_it() {
        let budget = BodyBudget::new(100);
        let mut a = Lease::new(budget.clone());
        let mut b = Lease::new(budget.clone());
        assert!(a.cover(60));
        assert!(a.cover(40), "already covered");
        assert!(!b.cover(50), "60 + 50 > 100");
        assert_eq!(budget.used(), 60);
        assert!(b.cover(40));
        assert!(!a.cover(61));
        assert_eq!((a.held(), budget.used()), (60, 100));
        drop(a);
        assert_eq!(budget.used(), 40);
        b.release();
        assert_eq!(budget.used(), 0);
        assert!(!Lease::new(budget.clone()).cover(101));
        assert!(Lease::new(budget.clone()).could_cover(100));
        assert!(!Lease::new(budget.clone()).could_cover(101));
        assert_eq!(budget.used(), 0, "checking charges nothing");
    }
}
