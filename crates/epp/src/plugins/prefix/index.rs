//! Which endpoint probably holds which prompt prefix: one bounded LRU set per endpoint.
//!
//! The index learns only from the EPP's own decisions: after a pick, the request's block
//! hashes are recorded for the chosen endpoint. A lookup asks, per candidate endpoint, how
//! many *leading* blocks of the request it holds; because block hashes are chained, that is
//! the length of the longest cached prefix.
//!
//! Concurrency: the endpoint → set map is an immutable `HashMap` behind an `ArcSwap`
//! (replaced only when an endpoint appears or leaves), and each set has its own `RwLock`.
//! Lookups take only read locks of the sets they probe; a record takes one set's write lock
//! for a few microseconds. There is no index-wide lock on the request path.
//!
//! Bounds: every set holds at most its capacity (the configured `lruCapacityPerServer`, or the
//! endpoint's reported KV-cache block count), and sets of endpoints that left the pool are
//! dropped by [`PrefixIndex::retain`].

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};

use super::lru::LruSet;

/// Default per-endpoint capacity, as the reference (`lruCapacityPerServer`).
pub const DEFAULT_CAPACITY_PER_ENDPOINT: u32 = 31_250;

type Sets = HashMap<SocketAddr, Arc<RwLock<LruSet>>, BuildHasherDefault<AddrHasher>>;

/// Prefix index over all endpoints of the pool.
#[derive(Debug)]
pub struct PrefixIndex {
    sets: ArcSwap<Sets>,
    /// Serialises map replacement (new endpoint, a new pool) and holds the addresses that left
    /// the pool at its last change, so that a decision recorded after its endpoint left does
    /// not bring its set back. (A newly joined endpoint gets its set on first use: the pool
    /// change reaches the index after the scheduler may already route there.) Never taken by
    /// lookups.
    map_writer: Mutex<Departed>,
    default_capacity: u32,
}

/// The pool as the index last heard of it, and who left it then.
#[derive(Debug, Default)]
struct Departed {
    live: HashSet<SocketAddr>,
    left: HashSet<SocketAddr>,
}

impl PrefixIndex {
    /// An empty index whose new sets hold `default_capacity` hashes unless told otherwise.
    pub fn new(default_capacity: u32) -> Self {
        Self {
            sets: ArcSwap::from_pointee(Sets::default()),
            map_writer: Mutex::new(Departed::default()),
            default_capacity: default_capacity.max(1),
        }
    }

    /// For each endpoint of `endpoints`, in order, calls `each(position, matched)` with the
    /// number of leading `hashes` it holds.
    pub fn leading_matches(
        &self,
        endpoints: impl IntoIterator<Item = SocketAddr>,
        hashes: &[u64],
        mut each: impl FnMut(usize, usize),
    ) {
        let sets = self.sets.load();
        for (pos, addr) in endpoints.into_iter().enumerate() {
            let matched = match sets.get(&addr) {
                Some(set) => {
                    let set = set.read();
                    hashes.iter().take_while(|h| set.contains(**h)).count()
                }
                None => 0,
            };
            each(pos, matched);
        }
    }

    /// The number of leading `hashes` held by `endpoint`.
    pub fn leading_match(&self, endpoint: SocketAddr, hashes: &[u64]) -> usize {
        let mut out = 0;
        self.leading_matches([endpoint], hashes, |_, m| out = m);
        out
    }

    /// Records that `endpoint` now holds `hashes`. A new set gets `capacity` (the endpoint's
    /// KV-cache size when known) or the default; an existing set keeps its capacity.
    pub fn record(&self, endpoint: SocketAddr, hashes: &[u64], capacity: Option<u32>) {
        if hashes.is_empty() {
            return;
        }
        let Some(set) = self.set_for(endpoint, capacity) else {
            return;
        };
        let mut set = set.write();
        // Last block first: the first block ends most recent, so under pressure a prefix is
        // forgotten from its tail, as a model server's KV cache frees blocks.
        for h in hashes.iter().rev() {
            set.insert(*h);
        }
    }

    /// The set of `endpoint`, created on first use; `None` when it is not in the pool.
    fn set_for(&self, endpoint: SocketAddr, capacity: Option<u32>) -> Option<Arc<RwLock<LruSet>>> {
        if let Some(set) = self.sets.load().get(&endpoint) {
            return Some(set.clone());
        }
        let departed = self.map_writer.lock();
        if departed.left.contains(&endpoint) {
            return None;
        }
        let current = self.sets.load();
        if let Some(set) = current.get(&endpoint) {
            return Some(set.clone());
        }
        let set = Arc::new(RwLock::new(LruSet::new(
            capacity.filter(|c| *c > 0).unwrap_or(self.default_capacity),
        )));
        let mut next = Sets::clone(&current);
        next.insert(endpoint, set.clone());
        self.sets.store(Arc::new(next));
        Some(set)
    }

    /// The pool is now `live`: drops the sets of endpoints that left, and creates none for
    /// them until the pool changes again.
    pub fn set_live(&self, live: HashSet<SocketAddr>) {
        let mut departed = self.map_writer.lock();
        let current = self.sets.load();
        let left: HashSet<SocketAddr> = departed
            .live
            .iter()
            .chain(current.keys())
            .filter(|a| !live.contains(*a))
            .copied()
            .collect();
        if !current.keys().all(|a| live.contains(a)) {
            let next: Sets = current
                .iter()
                .filter(|(a, _)| live.contains(*a))
                .map(|(a, s)| (*a, s.clone()))
                .collect();
            self.sets.store(Arc::new(next));
        }
        *departed = Departed { live, left };
    }

    /// Total hashes held across endpoints.
    pub fn entries(&self) -> usize {
        self.sets.load().values().map(|s| s.read().len()).sum()
    }

    /// Number of endpoints with a set.
    pub fn endpoints(&self) -> usize {
        self.sets.load().len()
    }

    /// Heap bytes held by the sets' tables.
    pub fn allocated_bytes(&self) -> usize {
        self.sets
            .load()
            .values()
            .map(|s| s.read().allocated_bytes())
            .sum()
    }
}

/// FxHash-style hasher for small keys that come from discovery, not clients (socket
/// addresses, endpoint ids): maps probed per candidate per request, where SipHash's DoS
/// resistance buys nothing.
#[derive(Default)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.add(u64::from(*b));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

impl AddrHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn leading_match_stops_at_first_gap() {
        let index = PrefixIndex::new(100);
        let a = addr("10.0.0.1:8000");
        let b = addr("10.0.0.2:8000");
        index.record(a, &[1, 2, 3, 4], None);
        index.record(b, &[1, 2], None);
        assert_eq!(index.leading_match(a, &[1, 2, 3, 9]), 3);
        assert_eq!(index.leading_match(b, &[1, 2, 3, 9]), 2);
        assert_eq!(index.leading_match(b, &[9, 1, 2]), 0);
        assert_eq!(index.leading_match(addr("10.0.0.3:8000"), &[1]), 0);
        let mut out = [0; 3];
        index.leading_matches([a, b, addr("10.0.0.3:8000")], &[1, 2, 3], |i, m| out[i] = m);
        assert_eq!(out, [3, 2, 0]);
    }

    #[test]
    fn capacity_bounds_each_endpoint_and_forgets_tails_first() {
        let index = PrefixIndex::new(4);
        let a = addr("10.0.0.1:8000");
        index.record(a, &[1, 2, 3, 4, 5, 6], None);
        assert_eq!(index.entries(), 4);
        // The first blocks survive, so the leading match of the prefix is kept.
        assert_eq!(index.leading_match(a, &[1, 2, 3, 4, 5, 6]), 4);
        // An explicit capacity applies to a new set.
        let b = addr("10.0.0.2:8000");
        index.record(b, &[1, 2, 3, 4, 5, 6], Some(2));
        assert_eq!(index.leading_match(b, &[1, 2, 3]), 2);
    }

    #[test]
    fn a_new_pool_forgets_departed_endpoints() {
        let index = PrefixIndex::new(10);
        let a = addr("10.0.0.1:8000");
        let b = addr("[fd00::1]:8000");
        index.record(a, &[1], None);
        index.record(b, &[1], None);
        assert_eq!(index.endpoints(), 2);
        index.set_live(HashSet::from([b]));
        assert_eq!(index.endpoints(), 1);
        assert_eq!(index.leading_match(a, &[1]), 0);
        assert_eq!(index.leading_match(b, &[1]), 1);
        // A decision recorded after its endpoint left does not bring it back...
        index.record(a, &[2], None);
        assert_eq!(index.endpoints(), 1);
        // ...but one to an endpoint that joined before the index heard of it is kept.
        let c = addr("10.0.0.3:8000");
        index.record(c, &[3], None);
        assert_eq!(index.leading_match(c, &[3]), 1);
        // Once `a` rejoins, it gets a set again.
        index.set_live(HashSet::from([a, b, c]));
        index.record(a, &[4], None);
        assert_eq!(index.leading_match(a, &[4]), 1);
    }
}
