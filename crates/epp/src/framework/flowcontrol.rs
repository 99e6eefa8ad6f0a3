//! Flow-control policy contracts (the reference's `framework/interface/flowcontrol`): how
//! requests waiting in the picker are ordered within a flow, which flow of a priority band
//! is served next, and how full the pool may get before a band stops being served.
//!
//! All three are sync and pure: the queue (in [`crate::flowcontrol`]) calls them under its
//! lock with plain values and keeps every piece of state itself (the round-robin cursor
//! included), so a policy can be tested with a slice and a number.

use std::time::Duration;

use tokio::time::Instant;

/// What an ordering policy sees of a waiting request.
#[derive(Debug, Clone, Copy)]
pub struct QueuedRequest {
    /// When the request entered the queue.
    pub enqueued: Instant,
    /// When the EPP received the request (its first ext_proc message).
    pub received: Instant,
    /// The queue's time limit for it (`defaultRequestTTL`); `None` without one.
    pub ttl: Option<Duration>,
    /// The TTFT objective from `x-llm-d-slo-ttft-ms` (alias `x-slo-ttft-ms`), if any.
    pub slo_ttft: Option<Duration>,
}

/// Orders requests within one flow: the request with the smallest key is served first; equal
/// keys go in arrival order.
pub trait OrderingPolicy: Send + Sync {
    /// The sort key of `req`. `None` sorts after every `Some` (a deadline that never comes).
    fn key(&self, req: &QueuedRequest) -> Option<Instant>;
}

/// The head of one non-empty flow of a band, as a fairness policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct FlowHead<'a> {
    /// The flow's fairness id.
    pub id: &'a str,
    /// Its first request's ordering key (see [`OrderingPolicy::key`]).
    pub key: Option<Instant>,
    /// Its first request's arrival sequence number (lower arrived first).
    pub seq: u64,
}

/// Chooses which flow of a band gives the next request.
pub trait FairnessPolicy: Send + Sync {
    /// An index into `flows` (non-empty, sorted by id), given the id served last in this band
    /// (`None` when none was, or it left). `None` only when `flows` is empty.
    fn select(&self, flows: &[FlowHead<'_>], last: Option<&str>) -> Option<usize>;

    /// Whether a full band makes room for a flow holding fewer requests than the largest one
    /// by pushing out that flow's newest request, so that one tenant filling the band cannot
    /// lock the others out. False by default (the reference rejects the newcomer).
    fn shares_capacity(&self) -> bool {
        false
    }
}

/// How full the pool may be while a band is served.
pub trait UsageLimitPolicy: Send + Sync {
    /// Writes into `ceilings[i]` the ceiling in [0, 1] for `priorities[i]` (sorted from the
    /// highest priority down) at `saturation`: a band whose saturation is at or above its
    /// ceiling is not served. Ceilings must not increase from one band to the next.
    fn ceilings(&self, saturation: f64, priorities: &[i32], ceilings: &mut [f64]);
}
