//! Which endpoint holds which block, as the engines reported it: block key → holders.
//!
//! * **Holders.** Each key lists the endpoints holding it, with the storage tier (`medium`:
//!   GPU, CPU, ...) and, for speculative entries made at pick time, an expiry and a count
//!   of the requests in flight that pin them. At most `podCacheSize` endpoints per key (the
//!   oldest entry gives way).
//! * **Engine blocks.** Per endpoint, the engine's block hash → the picker's keys it covers
//!   and the chain state after it, so that `BlockRemoved` and a later `BlockStored` continuing
//!   a chain resolve to keys. Insertion order is kept for bounding.
//! * **Bounds.** At most `max_keys` keys. An endpoint that stores past the bound loses its
//!   oldest engine blocks first (engines report evictions, so the bound only bites when
//!   events are lost or a publisher lies). Speculative entries are capped too and expire.
//!
//! Concurrency: keys live in 64 shards, each behind its own `RwLock`. A lookup (the request
//! path) takes shard read locks one key at a time; ingestion (one task per shard of
//! endpoints) takes one shard's write lock per key it changes and its endpoint's own mutex.
//! No lock covers the whole index.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};
use tokio::time::{Duration, Instant};

use super::keys::ChainState;
use crate::plugins::prefix::AddrHasher;

const SHARDS: usize = 64;

/// Default bound on keys (llm-d-router v0.10's `inMemoryConfig.size`).
pub const DEFAULT_MAX_KEYS: usize = 100_000_000;
/// Default bound on endpoints per key (`inMemoryConfig.podCacheSize`).
pub const DEFAULT_PODS_PER_KEY: usize = 10;
/// Speculative entries held at most (beyond it, picks are not recorded speculatively).
pub const MAX_SPECULATIVE: usize = 1_000_000;

/// An interned endpoint.
pub type PodId = u32;
/// An interned storage tier (index into the tier table).
pub type TierId = u8;

/// The tier of speculative entries (weight 1, counted apart).
pub const SPECULATIVE_TIER: TierId = u8::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    pod: PodId,
    tier: TierId,
    /// Requests in flight that pinned this speculative entry: it does not expire while any
    /// is (vLLM keeps a running request's blocks). Fits in the padding after `tier`.
    pins: u16,
    /// Milliseconds since the index's epoch after which an unpinned speculative entry is
    /// void; 0 for entries from events.
    expires: u64,
}

impl Holder {
    /// An entry from an event (never expires).
    fn stored(pod: PodId, tier: TierId) -> Self {
        Self {
            pod,
            tier,
            pins: 0,
            expires: 0,
        }
    }

    /// Whether the entry counts at `now` (milliseconds since the epoch).
    fn live(&self, now: u64) -> bool {
        self.expires == 0 || self.pins > 0 || self.expires > now
    }
}

type Holders = smallvec::SmallVec<[Holder; 2]>;

/// One engine block of an endpoint: the keys it completed and where the chain stands after
/// it. About 48 bytes when the picker's block size divides the engine's (no pending tokens).
#[derive(Debug, Clone, Default)]
pub struct EngineBlock {
    /// The picker's keys this engine block completed (often exactly one).
    pub keys: smallvec::SmallVec<[u64; 1]>,
    /// The last full key of the chain after the block.
    pub parent: u64,
    /// Tokens (and identifiers) after `parent` that do not fill a block yet: only when the
    /// engine's blocks do not end on the picker's block boundaries.
    pub pending: Option<Box<(Vec<u32>, Vec<String>)>>,
    /// The tiers it is held in, one bit per tier id.
    pub tiers: u32,
}

/// Takes `n` from a count without wrapping below zero.
fn saturating_sub(count: &AtomicUsize, n: usize) {
    if n > 0 {
        let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| {
            Some(k.saturating_sub(n))
        });
    }
}

fn bit(tier: TierId) -> u32 {
    1u32 << (u32::from(tier) % 32)
}

impl EngineBlock {
    /// The chain state after this block.
    pub fn chain(&self) -> ChainState {
        let (pending, pending_extra) = self.pending.as_deref().cloned().unwrap_or_default();
        ChainState {
            parent: self.parent,
            pending,
            pending_extra,
        }
    }

    /// A block that completed `keys`, left the chain at `state`, stored in `tier`.
    pub fn new(keys: smallvec::SmallVec<[u64; 1]>, state: &ChainState, tier: TierId) -> Self {
        let pending = (!state.pending.is_empty() || !state.pending_extra.is_empty())
            .then(|| Box::new((state.pending.clone(), state.pending_extra.clone())));
        Self {
            keys,
            parent: state.parent,
            pending,
            tiers: bit(tier),
        }
    }
}

#[derive(Debug, Default)]
struct PodBlocks {
    engine: HashMap<u64, EngineBlock>,
    order: VecDeque<u64>,
}

/// Counters of what the index did (reported by the producer's metrics).
#[derive(Debug, Default)]
pub struct IndexStats {
    /// Keys added (each key an endpoint stored, speculative ones included).
    pub admissions: AtomicU64,
    /// Keys an endpoint lost (evictions, clears, the bound).
    pub evictions: AtomicU64,
    /// Lookups.
    pub lookups: AtomicU64,
    /// Blocks found for the best endpoint, summed over lookups.
    pub hits: AtomicU64,
}

/// The result of one lookup for one candidate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Match {
    /// Leading blocks held (in any tier).
    pub blocks: u32,
    /// The same blocks weighted by their best tier.
    pub weighted: f64,
    /// Of those, blocks held only speculatively.
    pub speculative: u32,
}

/// See the module docs.
pub struct PreciseIndex {
    shards: Box<[RwLock<HashMap<u64, Holders>>]>,
    keys: AtomicUsize,
    speculative: AtomicUsize,
    pods: ArcSwap<HashMap<SocketAddr, PodId>>,
    /// Serialises interning; the next id to give.
    pod_writer: Mutex<PodId>,
    blocks: RwLock<HashMap<PodId, Arc<Mutex<PodBlocks>>>>,
    /// Tier names and weights: read on every lookup, changed when an engine names a new tier.
    tiers: ArcSwap<Tiers>,
    max_keys: usize,
    pods_per_key: usize,
    epoch: Instant,
    /// What the index did.
    pub stats: IndexStats,
}

/// The tiers seen so far: names by id, and each id's weight (1 for unnamed ids).
#[derive(Debug, Clone)]
struct Tiers {
    names: Vec<String>,
    weights: [f64; 32],
}

impl Tiers {
    fn position(&self, name: &str) -> Option<TierId> {
        self.names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .map(|i| i as TierId)
    }
}

impl std::fmt::Debug for PreciseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreciseIndex")
            .field("keys", &self.keys())
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

fn shard_of(key: u64) -> usize {
    // Keys are hashes already; the high bits pick the shard.
    (key >> 58) as usize % SHARDS
}

impl PreciseIndex {
    /// An empty index of at most `max_keys` keys and `pods_per_key` endpoints per key, with
    /// `tiers` weights (`medium` names, lowercase; unknown tiers weigh 1).
    pub fn new(max_keys: usize, pods_per_key: usize, tiers: &[(String, f64)]) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            keys: AtomicUsize::new(0),
            speculative: AtomicUsize::new(0),
            pods: ArcSwap::from_pointee(HashMap::new()),
            pod_writer: Mutex::new(0),
            blocks: RwLock::new(HashMap::new()),
            tiers: ArcSwap::from_pointee({
                let names: Vec<String> = tiers
                    .iter()
                    .take(32)
                    .map(|(n, _)| n.to_ascii_lowercase())
                    .collect();
                let mut weights = [1.0; 32];
                for (i, (_, w)) in tiers.iter().take(32).enumerate() {
                    weights[i] = *w;
                }
                Tiers { names, weights }
            }),
            max_keys: max_keys.max(1),
            pods_per_key: pods_per_key.max(1),
            epoch: Instant::now(),
            stats: IndexStats::default(),
        }
    }

    /// Keys held.
    pub fn keys(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    /// Speculative entries held (expired ones until swept).
    pub fn speculative_entries(&self) -> usize {
        self.speculative.load(Ordering::Relaxed)
    }

    /// The id of `addr`, interning it.
    pub fn pod(&self, addr: SocketAddr) -> PodId {
        if let Some(id) = self.pods.load().get(&addr) {
            return *id;
        }
        let mut next = self.pod_writer.lock();
        let current = self.pods.load();
        if let Some(id) = current.get(&addr) {
            return *id;
        }
        let id = *next;
        *next += 1;
        let mut addrs = HashMap::clone(&current);
        addrs.insert(addr, id);
        self.pods.store(Arc::new(addrs));
        id
    }

    /// The id of `addr` if it was ever interned.
    pub fn known_pod(&self, addr: &SocketAddr) -> Option<PodId> {
        self.pods.load().get(addr).copied()
    }

    /// The tier id of a `medium` (`None` is GPU, as the engine's default). At most 32 tiers
    /// are told apart; later ones share the last id.
    pub fn tier(&self, medium: Option<&str>) -> TierId {
        let name = medium.unwrap_or("gpu");
        if let Some(i) = self.tiers.load().position(name) {
            return i;
        }
        let mut id = 31;
        self.tiers.rcu(|t| {
            let mut t = Tiers::clone(t);
            id = match t.position(name) {
                Some(i) => i,
                None if t.names.len() < 32 => {
                    t.names.push(name.to_ascii_lowercase());
                    (t.names.len() - 1) as TierId
                }
                None => 31,
            };
            t
        });
        id
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX / 2)
    }

    /// For each of `pods` (in order; `None` for an endpoint the index never heard of), the
    /// leading `keys` it holds, weighted by tier. Expired speculative entries do not count.
    pub fn lookup(&self, keys: &[u64], pods: &[Option<PodId>], now: Instant) -> Vec<Match> {
        let mut out = vec![Match::default(); pods.len()];
        if keys.is_empty() || pods.iter().all(Option::is_none) {
            return out;
        }
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let tiers = self.tiers.load();
        let weights = &tiers.weights;
        let now = self.now_ms(now);
        // Candidates by endpoint id: the first candidate of each id, and the next candidate
        // with the same id (an endpoint listed twice). Sized by the candidates, not by the
        // ids ever given (departed endpoints keep theirs).
        let mut first: HashMap<PodId, u32, BuildHasherDefault<AddrHasher>> =
            HashMap::with_capacity_and_hasher(pods.len(), BuildHasherDefault::default());
        let mut next: Vec<u32> = vec![u32::MAX; pods.len()];
        for (c, p) in pods.iter().enumerate().rev() {
            if let Some(p) = p {
                next[c] = first.insert(*p, c as u32).unwrap_or(u32::MAX);
            }
        }
        // Per candidate at this key: best weight and whether only speculative.
        let mut best: Vec<Option<(f64, bool)>> = vec![None; pods.len()];
        let mut touched: smallvec::SmallVec<[usize; 16]> = smallvec::SmallVec::new();
        for (i, key) in keys.iter().enumerate() {
            let shard = self.shards[shard_of(*key)].read();
            let Some(holders) = shard.get(key) else {
                break;
            };
            for h in holders {
                if !h.live(now) {
                    continue;
                }
                let Some(&c0) = first.get(&h.pod) else {
                    continue;
                };
                let spec = h.tier == SPECULATIVE_TIER;
                let w = if spec {
                    1.0
                } else {
                    weights[usize::from(h.tier) % 32]
                };
                let mut c = c0;
                while c != u32::MAX {
                    let ci = c as usize;
                    if out[ci].blocks as usize == i {
                        if best[ci].is_none() {
                            touched.push(ci);
                        }
                        best[ci] = Some(match best[ci] {
                            Some((bw, bs)) => (bw.max(w), bs && spec),
                            None => (w, spec),
                        });
                    }
                    c = next[ci];
                }
            }
            drop(shard);
            if touched.is_empty() {
                break;
            }
            for ci in touched.drain(..) {
                if let Some((w, spec)) = best[ci].take() {
                    out[ci].blocks += 1;
                    out[ci].weighted += w;
                    out[ci].speculative += u32::from(spec);
                }
            }
        }
        let top = out.iter().map(|m| m.blocks).max().unwrap_or(0);
        self.stats.hits.fetch_add(u64::from(top), Ordering::Relaxed);
        out
    }

    fn pod_blocks(&self, pod: PodId) -> Arc<Mutex<PodBlocks>> {
        if let Some(b) = self.blocks.read().get(&pod) {
            return b.clone();
        }
        self.blocks.write().entry(pod).or_default().clone()
    }

    /// The chain state after `pod`'s engine block `engine_hash`, if the index knows it.
    pub fn chain_after(&self, pod: PodId, engine_hash: u64) -> Option<ChainState> {
        let blocks = self.pod_blocks(pod);
        let b = blocks.lock();
        b.engine.get(&engine_hash).map(EngineBlock::chain)
    }

    /// Records that `pod` stored the engine blocks `blocks` (hash and what it covers), in
    /// order.
    pub fn store(&self, pod: PodId, blocks: Vec<(u64, EngineBlock)>) {
        let pod_blocks = self.pod_blocks(pod);
        let mut pb = pod_blocks.lock();
        for (hash, mut block) in blocks {
            let tier = block.tiers.trailing_zeros() as TierId;
            for key in &block.keys {
                self.add_holder(*key, Holder::stored(pod, tier));
            }
            match pb.engine.get_mut(&hash) {
                // Stored again (vLLM may store a hash twice, or in another tier): keys the
                // new record does not cover lose this endpoint.
                Some(old) => {
                    for key in old.keys.iter().filter(|k| !block.keys.contains(k)) {
                        self.remove_holder(*key, pod, None);
                    }
                    block.tiers |= old.tiers;
                    *old = block;
                }
                None => {
                    pb.engine.insert(hash, block);
                    pb.order.push_back(hash);
                }
            }
        }
        // The bounds: this endpoint gives up its oldest blocks while the index holds too many
        // keys, or the endpoint too many engine blocks (a publisher repeating tokens under new
        // hashes adds engine blocks without keys).
        while self.keys.load(Ordering::Relaxed) > self.max_keys || pb.engine.len() > self.max_keys {
            let Some(oldest) = pb.order.pop_front() else {
                break;
            };
            if let Some(old) = pb.engine.remove(&oldest) {
                for key in &old.keys {
                    self.remove_holder(*key, pod, None);
                }
            }
        }
    }

    /// Adds `tier` to keys `pod` already holds through `engine_hashes` (a `BlockStored` with
    /// no tokens: the blocks were copied to another tier, e.g. CPU offload).
    pub fn add_tier(&self, pod: PodId, engine_hashes: &[u64], tier: TierId) -> usize {
        let pod_blocks = self.pod_blocks(pod);
        let mut pb = pod_blocks.lock();
        let mut n = 0;
        for h in engine_hashes {
            if let Some(b) = pb.engine.get_mut(h) {
                b.tiers |= bit(tier);
                for key in &b.keys {
                    self.add_holder(*key, Holder::stored(pod, tier));
                    n += 1;
                }
            }
        }
        n
    }

    /// `pod` evicted its engine blocks `engine_hashes` from `tier` (`None`: every tier). A
    /// block is forgotten once no tier holds it.
    pub fn remove(&self, pod: PodId, engine_hashes: &[u64], tier: Option<TierId>) -> usize {
        let pod_blocks = self.pod_blocks(pod);
        let mut pb = pod_blocks.lock();
        let mut n = 0;
        for h in engine_hashes {
            let Some(b) = pb.engine.get_mut(h) else {
                continue;
            };
            for key in &b.keys {
                n += usize::from(self.remove_holder(*key, pod, tier));
            }
            b.tiers &= !tier.map_or(u32::MAX, bit);
            if b.tiers == 0 {
                pb.engine.remove(h);
            }
        }
        if pb.engine.len() * 2 < pb.order.len() {
            let engine = &pb.engine;
            let order: VecDeque<u64> = pb
                .order
                .iter()
                .copied()
                .filter(|h| engine.contains_key(h))
                .collect();
            pb.order = order;
        }
        n
    }

    /// Forgets everything `pod` holds, speculative entries included (a cache reset, a
    /// publisher restart, lost events, the endpoint leaving). Every shard is swept, so holders
    /// recorded by a store that raced with the clear go too.
    pub fn clear(&self, pod: PodId) {
        let pod_blocks = self.pod_blocks(pod);
        let mut pb = pod_blocks.lock();
        pb.engine = HashMap::new();
        pb.order = VecDeque::new();
        for shard in self.shards.iter() {
            let mut shard = shard.write();
            let (mut spec, mut evicted, mut emptied) = (0, 0, 0);
            shard.retain(|_, holders| {
                let before = holders.len();
                holders.retain(|h| {
                    let mine = h.pod == pod;
                    if mine {
                        if h.tier == SPECULATIVE_TIER {
                            spec += 1;
                        } else {
                            evicted += 1;
                        }
                    }
                    !mine
                });
                let keep = !holders.is_empty();
                emptied += usize::from(!keep && before > 0);
                keep
            });
            self.sub_speculative(spec);
            self.sub_keys(emptied);
            self.stats.evictions.fetch_add(evicted as u64, Ordering::Relaxed);
        }
    }

    fn sub_keys(&self, n: usize) {
        saturating_sub(&self.keys, n);
    }

    fn sub_speculative(&self, n: usize) {
        saturating_sub(&self.speculative, n);
    }

    /// Forgets an endpoint that left: everything it held ([`Self::clear`]) and its engine map.
    pub fn forget(&self, pod: PodId) {
        self.clear(pod);
        self.blocks.write().remove(&pod);
    }

    /// Records speculatively that `pod` will hold `keys` for `ttl` from `now` (the pick was
    /// just made; the engine's events follow). With `pin`, the entries also stay while the
    /// request is in flight: the caller calls [`Self::unpin`] when it ends. Skipped (false)
    /// when too many speculative entries are held.
    pub fn speculate(&self, pod: PodId, keys: &[u64], ttl: Duration, now: Instant, pin: bool) -> bool {
        if self.speculative.load(Ordering::Relaxed) + keys.len() > MAX_SPECULATIVE {
            return false;
        }
        let expires = self.expiry(ttl, now);
        for key in keys {
            let mut shard = self.shards[shard_of(*key)].write();
            let is_new = !shard.contains_key(key);
            let holders = shard.entry(*key).or_default();
            match holders
                .iter_mut()
                .find(|h| h.pod == pod && h.tier == SPECULATIVE_TIER)
            {
                Some(h) => {
                    h.expires = h.expires.max(expires);
                    h.pins = h.pins.saturating_add(u16::from(pin));
                }
                None => {
                    holders.push(Holder {
                        pod,
                        tier: SPECULATIVE_TIER,
                        pins: u16::from(pin),
                        expires,
                    });
                    self.speculative.fetch_add(1, Ordering::Relaxed);
                }
            }
            if is_new {
                self.keys.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats
            .admissions
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        true
    }

    /// Releases one pin of a request that [`Self::speculate`]d with `pin` and has ended: the
    /// entries live `ttl` from `now` unless another request still pins them. Entries gone
    /// meanwhile (a cache reset, the endpoint left, pushed out by `podCacheSize`) are skipped.
    pub fn unpin(&self, pod: PodId, keys: &[u64], ttl: Duration, now: Instant) {
        let expires = self.expiry(ttl, now);
        for key in keys {
            let mut shard = self.shards[shard_of(*key)].write();
            if let Some(h) = shard
                .get_mut(key)
                .and_then(|hs| hs.iter_mut().find(|h| h.pod == pod && h.tier == SPECULATIVE_TIER))
            {
                h.pins = h.pins.saturating_sub(1);
                h.expires = h.expires.max(expires);
            }
        }
    }

    fn expiry(&self, ttl: Duration, now: Instant) -> u64 {
        self.now_ms(now)
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 4))
            .max(1)
    }

    /// Removes expired speculative entries from shard `i` (of 64; a sweeper walks them in
    /// turn).
    pub fn sweep(&self, i: usize, now: Instant) {
        let now = self.now_ms(now);
        let mut shard = self.shards[i % SHARDS].write();
        let mut dropped = 0;
        let mut emptied = 0;
        shard.retain(|_, holders| {
            let before = holders.len();
            holders.retain(|h| h.live(now));
            dropped += before - holders.len();
            let keep = !holders.is_empty();
            emptied += usize::from(!keep);
            keep
        });
        self.sub_speculative(dropped);
        self.sub_keys(emptied);
    }

    /// Number of shards (for the sweeper).
    pub const SHARDS: usize = SHARDS;

    fn add_holder(&self, key: u64, holder: Holder) {
        let mut shard = self.shards[shard_of(key)].write();
        let is_new = !shard.contains_key(&key);
        let holders = shard.entry(key).or_default();
        if holders
            .iter()
            .any(|h| h.pod == holder.pod && h.tier == holder.tier)
        {
            return;
        }
        let pods = {
            let mut seen: smallvec::SmallVec<[PodId; 8]> = smallvec::SmallVec::new();
            for h in holders.iter() {
                if !seen.contains(&h.pod) {
                    seen.push(h.pod);
                }
            }
            seen
        };
        if !pods.contains(&holder.pod) && pods.len() >= self.pods_per_key {
            // The oldest endpoint's entries give way.
            let oldest = pods[0];
            let spec = holders
                .iter()
                .filter(|h| h.pod == oldest && h.tier == SPECULATIVE_TIER)
                .count();
            let before = holders.len();
            holders.retain(|h| h.pod != oldest);
            self.sub_speculative(spec);
            self.stats
                .evictions
                .fetch_add((before - holders.len() - spec) as u64, Ordering::Relaxed);
        }
        holders.push(holder);
        self.stats.admissions.fetch_add(1, Ordering::Relaxed);
        if is_new {
            self.keys.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes `pod`'s entry for `key` in `tier` (any non-speculative tier when `None`).
    fn remove_holder(&self, key: u64, pod: PodId, tier: Option<TierId>) -> bool {
        let mut shard = self.shards[shard_of(key)].write();
        let Some(holders) = shard.get_mut(&key) else {
            return false;
        };
        let before = holders.len();
        holders.retain(|h| !(h.pod == pod && h.tier != SPECULATIVE_TIER && tier.is_none_or(|t| t == h.tier)));
        let removed = before - holders.len();
        if holders.is_empty() {
            shard.remove(&key);
            self.sub_keys(1);
        }
        self.stats.evictions.fetch_add(removed as u64, Ordering::Relaxed);
        removed > 0
    }

    /// Engine blocks `pod` has recorded.
    pub fn engine_blocks(&self, pod: PodId) -> usize {
        self.pod_blocks(pod).lock().engine.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(keys: &[u64], tier: TierId) -> EngineBlock {
        EngineBlock::new(keys.iter().copied().collect(), &ChainState::default(), tier)
    }

    fn index() -> PreciseIndex {
        PreciseIndex::new(1000, 10, &[("gpu".into(), 1.0), ("cpu".into(), 0.8)])
    }

    #[test]
    fn leading_blocks_by_tier() {
        let ix = index();
        let now = Instant::now();
        let (a, b) = (
            ix.pod("10.0.0.1:8000".parse().unwrap()),
            ix.pod("10.0.0.2:8000".parse().unwrap()),
        );
        let cpu = ix.tier(Some("CPU"));
        ix.store(a, vec![(100, block(&[1, 2], 0)), (101, block(&[3], 0))]);
        ix.store(b, vec![(100, block(&[1], cpu)), (102, block(&[5], 0))]);
        let m = ix.lookup(&[1, 2, 3, 4], &[Some(a), Some(b), None], now);
        assert_eq!((m[0].blocks, m[0].weighted), (3, 3.0));
        assert_eq!(m[1].blocks, 1);
        assert!((m[1].weighted - 0.8).abs() < 1e-9);
        assert_eq!(m[2], Match::default());
        // The first key missing anywhere ends the walk.
        assert_eq!(ix.lookup(&[9, 1], &[Some(a)], now)[0].blocks, 0);
        // Eviction by engine hash, in its tier only.
        assert_eq!(ix.remove(a, &[100], Some(cpu)), 0);
        assert_eq!(ix.remove(a, &[100], Some(0)), 2);
        assert_eq!(ix.lookup(&[1, 2, 3], &[Some(a), Some(b)], now)[0].blocks, 0);
        // A tier added to blocks already known.
        assert_eq!(ix.add_tier(b, &[102], cpu), 1);
        ix.clear(b);
        assert_eq!(ix.lookup(&[1], &[Some(b)], now)[1 - 1].blocks, 0);
        assert_eq!(ix.keys(), 1, "only a's key 3 is left");
    }

    #[test]
    fn tiers_come_and_go_one_by_one() {
        let ix = index();
        let now = Instant::now();
        let p = ix.pod("10.0.0.1:8000".parse().unwrap());
        let cpu = ix.tier(Some("cpu"));
        ix.store(p, vec![(100, block(&[1], 0))]);
        // Offloaded to CPU, then dropped from GPU: the CPU copy still counts, at its weight.
        assert_eq!(ix.add_tier(p, &[100], cpu), 1);
        ix.remove(p, &[100], Some(0));
        let m = ix.lookup(&[1], &[Some(p)], now)[0];
        assert_eq!(m.blocks, 1);
        assert!((m.weighted - 0.8).abs() < 1e-9);
        // Then from CPU: gone, engine block and all.
        ix.remove(p, &[100], Some(cpu));
        assert_eq!(ix.lookup(&[1], &[Some(p)], now)[0].blocks, 0);
        assert_eq!((ix.engine_blocks(p), ix.keys()), (0, 0));
    }

    #[test]
    fn counters_stay_exact_when_holders_give_way() {
        let ix = PreciseIndex::new(1000, 1, &[]);
        let now = Instant::now();
        let (a, b) = (
            ix.pod("10.0.0.1:1".parse().unwrap()),
            ix.pod("10.0.0.2:1".parse().unwrap()),
        );
        ix.speculate(a, &[7], Duration::from_secs(5), now, false);
        assert_eq!(ix.speculative_entries(), 1);
        // One endpoint per key: b's store pushes a's speculative entry out.
        ix.store(b, vec![(1, block(&[7], 0))]);
        assert_eq!((ix.speculative_entries(), ix.keys()), (0, 1));
        ix.clear(b);
        assert_eq!((ix.speculative_entries(), ix.keys()), (0, 0));
        // Clearing what was never there does not wrap the count.
        ix.clear(a);
        assert_eq!(ix.keys(), 0);
    }

    #[test]
    fn bounded_in_keys_and_holders() {
        let ix = PreciseIndex::new(10, 2, &[]);
        let p = ix.pod("10.0.0.1:1".parse().unwrap());
        ix.store(p, (0..30u64).map(|i| (i, block(&[1000 + i], 0))).collect());
        assert_eq!(ix.keys(), 10);
        // The newest survive.
        let now = Instant::now();
        assert_eq!(ix.lookup(&[1029], &[Some(p)], now)[0].blocks, 1);
        assert_eq!(ix.lookup(&[1000], &[Some(p)], now)[0].blocks, 0);
        // At most two endpoints per key: the oldest gives way.
        let q = ix.pod("10.0.0.2:1".parse().unwrap());
        let r = ix.pod("10.0.0.3:1".parse().unwrap());
        ix.store(q, vec![(7, block(&[1029], 0))]);
        ix.store(r, vec![(7, block(&[1029], 0))]);
        let m = ix.lookup(&[1029], &[Some(p), Some(q), Some(r)], now);
        assert_eq!(m.iter().map(|m| m.blocks).collect::<Vec<_>>(), vec![0, 1, 1]);
    }

    #[test]
    fn speculative_entries_expire_and_are_swept() {
        let ix = index();
        let p = ix.pod("10.0.0.1:1".parse().unwrap());
        let now = Instant::now();
        assert!(ix.speculate(p, &[1, 2], Duration::from_secs(2), now, false));
        let m = ix.lookup(&[1, 2], &[Some(p)], now);
        assert_eq!((m[0].blocks, m[0].speculative), (2, 2));
        let later = now + Duration::from_secs(3);
        assert_eq!(ix.lookup(&[1, 2], &[Some(p)], later)[0].blocks, 0);
        for i in 0..PreciseIndex::SHARDS {
            ix.sweep(i, later);
        }
        assert_eq!((ix.keys(), ix.speculative_entries()), (0, 0));
        // A confirmed entry and a speculative one: clearing the endpoint drops both.
        ix.speculate(p, &[1], Duration::from_secs(2), now, false);
        ix.store(p, vec![(1, block(&[1], 0))]);
        ix.clear(p);
        assert_eq!((ix.keys(), ix.speculative_entries()), (0, 0));
    }

    #[test]
    fn pinned_entries_live_while_any_request_is_in_flight_then_ttl() {
        let ix = index();
        let p = ix.pod("10.0.0.1:1".parse().unwrap());
        let ttl = Duration::from_secs(2);
        let t0 = Instant::now();
        // Two requests in flight for the same prefix.
        assert!(ix.speculate(p, &[1, 2], ttl, t0, true));
        assert!(ix.speculate(p, &[1, 2], ttl, t0 + Duration::from_secs(1), true));
        assert_eq!(ix.speculative_entries(), 2);
        // Queued at the engine far longer than the TTL: still credited, and not swept.
        let t = t0 + Duration::from_secs(30);
        for i in 0..PreciseIndex::SHARDS {
            ix.sweep(i, t);
        }
        assert_eq!(ix.lookup(&[1, 2], &[Some(p)], t)[0].blocks, 2);
        // The first ends: the second still pins.
        ix.unpin(p, &[1, 2], ttl, t);
        assert_eq!(
            ix.lookup(&[1, 2], &[Some(p)], t + Duration::from_secs(10))[0].blocks,
            2
        );
        // The second ends: the TTL runs from its end.
        let end = t + Duration::from_secs(10);
        ix.unpin(p, &[1, 2], ttl, end);
        assert_eq!(
            ix.lookup(&[1, 2], &[Some(p)], end + Duration::from_secs(1))[0].blocks,
            2
        );
        let later = end + Duration::from_secs(3);
        assert_eq!(ix.lookup(&[1, 2], &[Some(p)], later)[0].blocks, 0);
        for i in 0..PreciseIndex::SHARDS {
            ix.sweep(i, later);
        }
        assert_eq!((ix.keys(), ix.speculative_entries()), (0, 0));
        // Unpinning what a cache reset removed is a no-op.
        assert!(ix.speculate(p, &[3], ttl, later, true));
        ix.clear(p);
        ix.unpin(p, &[3], ttl, later);
        assert_eq!((ix.keys(), ix.speculative_entries()), (0, 0));
    }

    #[test]
    fn a_holder_stays_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Holder>(), 16);
    }
}
