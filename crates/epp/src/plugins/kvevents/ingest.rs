//! Applying decoded KV events to the index, and keeping each publisher's sequence.
//!
//! Per event, as llm-d-router v0.10 applies them, except where noted:
//! * `BlockStored` with tokens: the chain continues from the parent engine block (or starts
//!   at the adapter's root when there is none); each engine block's tokens are fed into the
//!   picker's keys ([`KeyScheme::feed`]) with its extra identifiers, the adapter's name taken
//!   out (it is in the root instead: a request for the adapter folds it there too, where the
//!   reference leaves it in the block and never matches adapter blocks). An unknown parent
//!   means earlier events were lost: the blocks cannot be keyed and are skipped.
//! * `BlockStored` without tokens: the blocks were copied to another tier; the tier is added
//!   to the keys they already have.
//! * Groups other than full attention (sliding window, mamba, ...) are skipped: a prefix of
//!   them is not a prefix of the KV cache.
//! * `BlockRemoved`: the endpoint loses the blocks in that tier.
//! * `AllBlocksCleared`: the endpoint loses everything, speculative entries included.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::decode::{BlockHash, BlockStored, KvEvent};
use super::index::{EngineBlock, PodId, PreciseIndex};
use super::keys::{ChainState, KeyScheme};

/// At most this many adapter names are remembered (from events); later ones are not
/// recognised on the request side.
pub const MAX_ADAPTERS: usize = 1024;
/// At most this many (endpoint, group) pairs are remembered.
pub const MAX_GROUPS: usize = 65_536;

/// An engine block hash as a `u64`: integers as they are, byte digests by their last 8 bytes
/// read big-endian (what vLLM publishes as the integer form of the same digest).
pub fn engine_hash(h: &BlockHash) -> u64 {
    match h {
        BlockHash::U64(v) => *v,
        BlockHash::Bytes(b) => {
            let mut last = [0u8; 8];
            let n = b.len().min(8);
            last[8 - n..].copy_from_slice(&b[b.len() - n..]);
            u64::from_be_bytes(last)
        }
    }
}

/// Why stored blocks were not indexed (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// A group whose attention kind does not make prefixes (sliding window, mamba, ...).
    UnsupportedCacheKind,
    /// The parent engine block is unknown (events were lost before).
    UnknownParent,
    /// Tokens that are not `block_size` per hash (the decoder refuses those already).
    InvalidBlockSize,
}

impl Skip {
    /// The label value.
    pub fn reason(self) -> &'static str {
        match self {
            Self::UnsupportedCacheKind => "unsupported_cache_kind",
            Self::UnknownParent => "unknown_parent",
            Self::InvalidBlockSize => "invalid_block_size",
        }
    }
}

/// What one message did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Engine blocks stored.
    pub stored: usize,
    /// Engine blocks removed.
    pub removed: usize,
    /// Resets.
    pub cleared: usize,
    /// Stored blocks skipped, with why.
    pub skipped: Vec<(Skip, &'static str)>,
    /// Removed blocks skipped (a group that is not indexed).
    pub skipped_removals: usize,
}

/// Applies events to an index; shared by the ingestion workers.
pub struct Ingest {
    index: Arc<PreciseIndex>,
    scheme: KeyScheme,
    adapters: ArcSwap<HashSet<Arc<str>>>,
    /// Per endpoint and KV-cache group: whether the group is indexed (learned from its
    /// stores; at most [`MAX_GROUPS`] remembered).
    groups: parking_lot::Mutex<std::collections::HashMap<(PodId, i64), bool>>,
    /// Messages applied.
    pub messages: AtomicU64,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// The attention kinds whose blocks form prefixes (llm-d-router v0.10 indexes these).
fn indexable(kind: Option<&str>) -> bool {
    kind.is_none_or(|k| matches!(k, "full_attention" | "mla_attention" | "sink_full_attention"))
}

/// A bounded label value for an attention kind.
fn kind_label(kind: Option<&str>) -> &'static str {
    const KNOWN: &[&str] = &[
        "full_attention",
        "mla_attention",
        "sliding_window",
        "sliding_window_mla",
        "mamba",
        "chunked_local_attention",
        "sink_full_attention",
        "encoder_only_attention",
        "cross_attention",
    ];
    match kind {
        None => "none",
        Some(k) => KNOWN.iter().find(|n| **n == k).copied().unwrap_or("other"),
    }
}

/// A block's extra identifiers as strings, without the adapter's name (it is in the root).
fn identifiers(extra: Option<&rmpv::Value>, lora: Option<&str>) -> Vec<String> {
    let Some(rmpv::Value::Array(items)) = extra else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    let mut lora_seen = false;
    for item in items {
        let id = match item {
            rmpv::Value::String(s) => s.as_str().map(str::to_owned),
            // Multimodal items are `[identifier, offset]`.
            rmpv::Value::Array(pair) => pair.first().and_then(|v| v.as_str()).map(str::to_owned),
            rmpv::Value::Binary(b) => Some(b.iter().map(|x| format!("{x:02x}")).collect()),
            _ => None,
        };
        let Some(id) = id else {
            continue;
        };
        if !lora_seen && lora == Some(id.as_str()) {
            lora_seen = true;
            continue;
        }
        out.push(id);
    }
    out
}

impl Ingest {
    /// Applies events to `index`, keyed by `scheme`.
    pub fn new(index: Arc<PreciseIndex>, scheme: KeyScheme) -> Self {
        Self {
            index,
            scheme,
            adapters: ArcSwap::from_pointee(HashSet::new()),
            groups: parking_lot::Mutex::new(std::collections::HashMap::new()),
            messages: AtomicU64::new(0),
        }
    }

    /// The index.
    pub fn index(&self) -> &Arc<PreciseIndex> {
        &self.index
    }

    /// Forgets an endpoint that left the pool: its entries, its engine map and the groups
    /// learned from it (so that departed endpoints never fill the group table).
    pub fn forget(&self, pod: PodId) {
        self.index.forget(pod);
        self.groups.lock().retain(|(p, _), _| *p != pod);
    }

    /// The key scheme.
    pub fn scheme(&self) -> &KeyScheme {
        &self.scheme
    }

    /// Whether `model` names a LoRA adapter some endpoint stored blocks under.
    pub fn is_adapter(&self, model: &str) -> bool {
        self.adapters.load().contains(model)
    }

    fn learn_adapter(&self, name: &str) {
        if self.adapters.load().contains(name) {
            return;
        }
        self.adapters.rcu(|set| {
            let mut set = HashSet::clone(set);
            if set.len() < MAX_ADAPTERS {
                set.insert(name.into());
            }
            set
        });
    }

    /// Applies one message's events for endpoint `pod`.
    pub fn apply(&self, pod: PodId, events: &[KvEvent]) -> Applied {
        self.messages.fetch_add(1, Ordering::Relaxed);
        let mut out = Applied::default();
        for event in events {
            match event {
                KvEvent::BlockStored(s) => self.stored(pod, s, &mut out),
                KvEvent::BlockRemoved {
                    block_hashes,
                    medium,
                    group_idx,
                } => {
                    // A group other than a full-attention one (or one never seen storing)
                    // evicts on its own schedule: its hashes may name full-attention blocks
                    // that are still there.
                    if let Some(g) = group_idx
                        && self.groups.lock().get(&(pod, *g)) != Some(&true)
                    {
                        out.skipped_removals += block_hashes.len();
                        continue;
                    }
                    let hashes: Vec<u64> = block_hashes.iter().map(engine_hash).collect();
                    let tier = self.index.tier(medium.as_deref());
                    self.index.remove(pod, &hashes, Some(tier));
                    out.removed += hashes.len();
                }
                KvEvent::AllBlocksCleared => {
                    self.index.clear(pod);
                    out.cleared += 1;
                }
            }
        }
        out
    }

    fn stored(&self, pod: PodId, s: &BlockStored, out: &mut Applied) {
        let kind = s.kv_cache_spec_kind.as_deref();
        if let Some(g) = s.group_idx {
            let mut groups = self.groups.lock();
            if groups.len() < MAX_GROUPS || groups.contains_key(&(pod, g)) {
                groups.insert((pod, g), indexable(kind));
            }
        }
        if !indexable(kind) {
            out.skipped.push((Skip::UnsupportedCacheKind, kind_label(kind)));
            return;
        }
        let tier = self.index.tier(s.medium.as_deref());
        let hashes: Vec<u64> = s.block_hashes.iter().map(engine_hash).collect();
        if s.token_ids.is_empty() {
            self.index.add_tier(pod, &hashes, tier);
            return;
        }
        let size = s.block_size as usize;
        if size == 0 || s.token_ids.len() != hashes.len() * size {
            out.skipped.push((Skip::InvalidBlockSize, kind_label(kind)));
            return;
        }
        let lora = s.lora_name.as_deref().filter(|n| !n.is_empty());
        if let Some(name) = lora {
            self.learn_adapter(name);
        }
        let mut state = match &s.parent_block_hash {
            None => ChainState {
                parent: self.scheme.root(lora),
                ..ChainState::default()
            },
            Some(parent) => match self.index.chain_after(pod, engine_hash(parent)) {
                Some(state) => state,
                None => {
                    out.skipped.push((Skip::UnknownParent, kind_label(kind)));
                    return;
                }
            },
        };
        let mut blocks = Vec::with_capacity(hashes.len());
        let mut keys = Vec::new();
        for (i, hash) in hashes.iter().enumerate() {
            keys.clear();
            let extra = identifiers(s.extra_keys.get(i), lora);
            self.scheme.feed(
                &mut state,
                &s.token_ids[i * size..(i + 1) * size],
                extra,
                &mut keys,
            );
            blocks.push((
                *hash,
                EngineBlock::new(keys.iter().copied().collect(), &state, tier),
            ));
        }
        out.stored += blocks.len();
        self.index.store(pod, blocks);
    }
}

/// One publisher's sequence numbers, to tell lost messages, repeats and restarts apart.
#[derive(Debug, Clone, Default)]
pub struct Sequence {
    last: Option<u64>,
}

/// What a message's sequence number means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next one (or the first, from 0): apply it.
    Next,
    /// Seen already: drop it.
    Repeat,
    /// Lower than the last: the publisher restarted (its cache is new).
    Restart,
    /// Messages `from..seq` were lost (`from` is 0 for a first message after 0: joined late).
    Gap {
        /// The first lost sequence number.
        from: u64,
    },
}

impl Sequence {
    /// Classifies `seq`; does not record it.
    pub fn check(&self, seq: u64) -> Step {
        match self.last {
            None if seq == 0 => Step::Next,
            None => Step::Gap { from: 0 },
            Some(last) if seq == last.wrapping_add(1) => Step::Next,
            // A second 0 is a new process that published once (PUB/SUB does not repeat).
            Some(0) if seq == 0 => Step::Restart,
            Some(last) if seq == last => Step::Repeat,
            // vLLM starts every publisher at 0 and PUB/SUB does not repeat messages: a lower
            // number is a new process.
            Some(last) if seq < last => Step::Restart,
            Some(last) => Step::Gap { from: last + 1 },
        }
    }

    /// Records `seq` as applied.
    pub fn applied(&mut self, seq: u64) {
        self.last = Some(seq);
    }

    /// The last applied sequence number.
    pub fn last(&self) -> Option<u64> {
        self.last
    }
}

#[cfg(test)]
mod tests;
