//! The simulated KV cache: a fixed pool of blocks with automatic prefix caching, because a
//! router's prefix-aware scoring is only testable against a server that really keeps and
//! forgets prefixes the way vLLM v1 does.
//!
//! * A prompt's *full* blocks are named by chained hashes ([`prompt_hashes`]), the way vLLM v1
//!   names them (`hash_block_tokens` in `vllm/v1/core/kv_cache_utils.py`): block `i`'s hash
//!   covers block `i - 1`'s hash, the block's contents and its "extra keys", which are the LoRA
//!   adapter's name on every block and the request's `cache_salt` on the first block only. The
//!   simulator has no tokenizer, so the prompt's bytes stand in for token ids. Equal hashes mean
//!   equal prefixes under the same adapter and salt. The scheme is the simulator's own: it
//!   shares nothing with the picker's prefix index, which must earn its hits against it.
//! * A running request references its blocks. When it finishes, its blocks are released but
//!   keep their hashes: they stay cached and can be hit by a later request, yet count as free.
//! * Free blocks sit in one queue, least recently released first. Allocation takes blocks
//!   from its head and forgets whatever they cached, so only unreferenced blocks are ever
//!   evicted, least recently used first. A request releases its blocks tail first, so a
//!   prefix's later blocks are evicted before its earlier ones, as in vLLM.
//! * Usage is referenced blocks over all blocks: cached but unreferenced blocks are free.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::Xxh3;

/// Index of a block in the pool.
pub type BlockId = u32;

/// The parent hash of a prompt's first block (vLLM's `NONE_HASH`, which vLLM seeds at random
/// per process unless `PYTHONHASHSEED` is set; a fixed value keeps the simulator
/// reproducible).
const NONE_HASH: u64 = 0x6e6f_6e65_5f68_6173;

/// The chained hashes of `prompt`'s full blocks of `block_bytes` bytes, at most `max_blocks`
/// of them. `lora` is the adapter serving the request (`None` for the base model) and
/// `cache_salt` the request's salt; a partial last block is not hashed, as vLLM only caches
/// full blocks.
pub fn prompt_hashes(
    lora: Option<&str>,
    cache_salt: Option<&str>,
    prompt: &[u8],
    block_bytes: usize,
    max_blocks: usize,
) -> Vec<u64> {
    let block_bytes = block_bytes.max(1);
    let blocks = (prompt.len() / block_bytes).min(max_blocks);
    let mut out = Vec::with_capacity(blocks);
    let mut parent = NONE_HASH;
    for (i, block) in prompt.chunks_exact(block_bytes).take(blocks).enumerate() {
        let mut h = Xxh3::new();
        h.update(&parent.to_le_bytes());
        // Lengths keep (contents, keys) pairs apart: "ab"+"c" never hashes as "a"+"bc".
        h.update(&(block.len() as u64).to_le_bytes());
        h.update(block);
        let mut extra = |tag: u8, key: &str| {
            h.update(&[tag]);
            h.update(&(key.len() as u64).to_le_bytes());
            h.update(key.as_bytes());
        };
        if let Some(name) = lora {
            extra(b'L', name);
        }
        if i == 0
            && let Some(salt) = cache_salt
        {
            extra(b'S', salt);
        }
        parent = h.digest();
        out.push(parent);
    }
    out
}

#[derive(Debug, Clone, Copy, Default)]
struct Block {
    /// The prefix hash this block caches, if it holds a full prompt block.
    hash: Option<u64>,
    /// Running requests using the block.
    refs: u32,
    /// Position in the free queue while unreferenced.
    free_seq: Option<u64>,
}

/// Blocks granted to a request by [`KvCache::allocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// All blocks of the request, in order: cache hits first.
    pub blocks: Vec<BlockId>,
    /// How many leading blocks were found in the cache.
    pub hit_blocks: usize,
    /// Positions (indices into the request's hashes) whose blocks were newly cached: what a
    /// `BlockStored` event reports.
    pub stored: Vec<usize>,
}

/// A pool of KV blocks with prefix caching and LRU eviction of unreferenced blocks.
#[derive(Debug)]
pub struct KvCache {
    blocks: Vec<Block>,
    by_hash: HashMap<u64, BlockId>,
    /// The free queue: sequence number → block; the first entry is evicted next.
    free: BTreeMap<u64, BlockId>,
    next_seq: u64,
    used: usize,
    /// Hashes evicted since [`KvCache::take_evicted`] was last called: what `BlockRemoved`
    /// events report.
    evicted: Vec<u64>,
}

impl KvCache {
    /// A cache of `num_blocks` empty, free blocks.
    pub fn new(num_blocks: u32) -> Self {
        let n = num_blocks as usize;
        let mut cache = Self {
            blocks: vec![Block::default(); n],
            by_hash: HashMap::new(),
            free: BTreeMap::new(),
            next_seq: 0,
            used: 0,
            evicted: Vec::new(),
        };
        for id in 0..num_blocks {
            cache.push_free(id);
        }
        cache
    }

    /// All blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks referenced by at least one running request.
    pub fn used_blocks(&self) -> usize {
        self.used
    }

    /// Blocks that can be allocated (free, whether or not they cache something).
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks holding a cached prefix block, referenced or not.
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// `vllm:kv_cache_usage_perc`: referenced blocks over all blocks.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            0.0
        } else {
            self.used as f64 / self.blocks.len() as f64
        }
    }

    /// How many of `hashes`' leading blocks are cached.
    pub fn cached_prefix(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.by_hash.contains_key(h)).count()
    }

    /// Grants `total_blocks` blocks to a request whose full prompt blocks are `hashes`.
    ///
    /// Up to `hit_cap` leading blocks are reused from the cache; the rest are taken from the
    /// head of the free queue, evicting what they cached, and the new full blocks are
    /// registered under their hashes. Returns `None`, changing nothing, when the free blocks
    /// do not suffice.
    pub fn allocate(&mut self, hashes: &[u64], hit_cap: usize, total_blocks: usize) -> Option<Allocation> {
        let hit_ids: Vec<BlockId> = hashes
            .iter()
            .take(hit_cap.min(total_blocks))
            .map_while(|h| self.by_hash.get(h).copied())
            .collect();
        let hit_free = hit_ids
            .iter()
            .filter(|id| self.blocks[**id as usize].refs == 0)
            .count();
        let new = total_blocks - hit_ids.len();
        if new > self.free.len() - hit_free {
            return None;
        }
        let mut blocks = Vec::with_capacity(total_blocks);
        let mut stored = Vec::new();
        for id in &hit_ids {
            self.take_ref(*id);
            blocks.push(*id);
        }
        for pos in hit_ids.len()..total_blocks {
            let id = self.pop_free()?;
            if let Some(h) = hashes.get(pos)
                && !self.by_hash.contains_key(h)
            {
                self.by_hash.insert(*h, id);
                self.blocks[id as usize].hash = Some(*h);
                stored.push(pos);
            }
            blocks.push(id);
        }
        Some(Allocation {
            blocks,
            hit_blocks: hit_ids.len(),
            stored,
        })
    }

    /// The hashes evicted since the last call.
    pub fn take_evicted(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.evicted)
    }

    /// Forgets every cached prefix, as vLLM's `/reset_prefix_cache`; refused (`false`, nothing
    /// changed) while any block is in use, as vLLM refuses it.
    pub fn reset(&mut self) -> bool {
        if self.used > 0 {
            return false;
        }
        self.by_hash.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.evicted.clear();
        true
    }

    /// One more (empty) block for a growing request, evicting the least recently used free
    /// block; `None` when no block is free.
    pub fn grow(&mut self) -> Option<BlockId> {
        self.pop_free()
    }

    /// Drops one reference to each of `blocks`. Blocks no longer referenced join the free
    /// queue tail first and keep what they cache.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for id in blocks.iter().rev() {
            let Some(b) = self.blocks.get_mut(*id as usize) else {
                continue;
            };
            if b.refs == 0 {
                continue;
            }
            b.refs -= 1;
            if b.refs == 0 {
                self.used -= 1;
                self.push_free(*id);
            }
        }
    }

    fn push_free(&mut self, id: BlockId) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.blocks[id as usize].free_seq = Some(seq);
        self.free.insert(seq, id);
    }

    /// Takes a reference to a cached block, pulling it out of the free queue if needed.
    fn take_ref(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if b.refs == 0 {
            if let Some(seq) = b.free_seq.take() {
                self.free.remove(&seq);
            }
            self.used += 1;
        }
        b.refs += 1;
    }

    /// Pops the least recently used free block, forgets its hash and references it.
    fn pop_free(&mut self) -> Option<BlockId> {
        let (_, id) = self.free.pop_first()?;
        let b = &mut self.blocks[id as usize];
        b.free_seq = None;
        if let Some(h) = b.hash.take()
            && self.by_hash.get(&h) == Some(&id)
        {
            self.by_hash.remove(&h);
            self.evicted.push(h);
        }
        b.refs = 1;
        self.used += 1;
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(prompt: &str) -> Vec<u64> {
        prompt_hashes(None, None, prompt.as_bytes(), 4, 1024)
    }

    #[test]
    fn chained_hashes_name_prefixes() {
        let a = hashes("aaaabbbbcccc");
        assert_eq!(a.len(), 3);
        // Same block bytes at another position, or after another prefix, hash differently.
        let b = hashes("bbbbaaaacccc");
        assert_ne!(a[0], b[1]);
        assert_ne!(a[2], b[2]);
        // A shared prefix shares exactly its hashes; a partial block is not hashed.
        let c = hashes("aaaabbbbdddd");
        assert_eq!(a[..2], c[..2]);
        assert_ne!(a[2], c[2]);
        assert_eq!(hashes("aaaabb").len(), 1);
        // Another model (or adapter) starts another chain.
        assert_ne!(prompt_hashes(Some("adapter"), None, b"aaaa", 4, 8)[0], a[0]);
        assert_ne!(prompt_hashes(None, Some("salt"), b"aaaa", 4, 8)[0], a[0]);
        // The salt only seeds the first block; later blocks still chain through it.
        let salted = prompt_hashes(None, Some("salt"), b"aaaabbbb", 4, 8);
        assert_ne!(salted[1], prompt_hashes(None, None, b"aaaabbbb", 4, 8)[1]);
    }

    #[test]
    fn finished_prefix_is_reused() {
        let mut c = KvCache::new(16);
        let a = hashes("aaaabbbbcccc");
        let first = c.allocate(&a, usize::MAX, 4).unwrap();
        assert_eq!(first.hit_blocks, 0);
        assert_eq!(c.used_blocks(), 4);
        c.release(&first.blocks);
        assert_eq!(c.used_blocks(), 0);
        assert_eq!(c.cached_blocks(), 3);

        let b = hashes("aaaabbbbxxxx");
        assert_eq!(c.cached_prefix(&b), 2);
        let second = c.allocate(&b, usize::MAX, 4).unwrap();
        assert_eq!(second.hit_blocks, 2);
        assert_eq!(second.blocks[..2], first.blocks[..2]);
        assert_eq!(c.used_blocks(), 4);
        // The hit cap keeps the last blocks from being reused.
        c.release(&second.blocks);
        let capped = c.allocate(&a, 1, 3).unwrap();
        assert_eq!(capped.hit_blocks, 1);
    }

    #[test]
    fn running_requests_share_blocks_and_usage_counts_them_once() {
        let mut c = KvCache::new(10);
        let h = hashes("aaaabbbb");
        let one = c.allocate(&h, usize::MAX, 3).unwrap();
        let two = c.allocate(&h, usize::MAX, 3).unwrap();
        assert_eq!(two.hit_blocks, 2);
        assert_eq!(c.used_blocks(), 4);
        assert!((c.usage() - 0.4).abs() < 1e-12);
        c.release(&one.blocks);
        // The shared blocks are still referenced by the second request.
        assert_eq!(c.used_blocks(), 3);
        c.release(&two.blocks);
        assert_eq!(c.used_blocks(), 0);
        assert_eq!(c.usage(), 0.0);
        assert_eq!(c.free_blocks(), 10);
        // Releasing again changes nothing.
        c.release(&two.blocks);
        assert_eq!(c.free_blocks(), 10);
    }

    #[test]
    fn eviction_takes_unreferenced_blocks_least_recently_used_first() {
        let mut c = KvCache::new(6);
        let running = c.allocate(&hashes("rrrrssss"), usize::MAX, 2).unwrap();
        let old = c.allocate(&hashes("oooopppp"), usize::MAX, 2).unwrap();
        let new = c.allocate(&hashes("nnnnqqqq"), usize::MAX, 2).unwrap();
        assert_eq!(c.free_blocks(), 0);
        assert!(c.allocate(&[], 0, 1).is_none(), "no free block, nothing to evict");
        c.release(&old.blocks);
        c.release(&new.blocks);

        // One block: the old prompt's tail block goes first.
        let one = c.allocate(&[], 0, 1).unwrap();
        assert_eq!(one.blocks, vec![old.blocks[1]]);
        assert_eq!(c.cached_prefix(&hashes("oooopppp")), 1);
        assert_eq!(c.cached_prefix(&hashes("nnnnqqqq")), 2);
        // More than the free blocks: refused, and nothing changes.
        assert!(c.allocate(&[], 0, 4).is_none());
        assert_eq!(c.cached_prefix(&hashes("nnnnqqqq")), 2);
        // Three blocks: the rest of the old prompt, then the new prompt's tail.
        let three = c.allocate(&[], 0, 3).unwrap();
        assert_eq!(three.blocks, vec![old.blocks[0], new.blocks[1], new.blocks[0]]);
        assert_eq!(c.cached_prefix(&hashes("oooopppp")), 0);
        assert_eq!(c.cached_prefix(&hashes("nnnnqqqq")), 0);
        // The running request's blocks were never touched.
        assert_eq!(c.cached_prefix(&hashes("rrrrssss")), 2);
        assert_eq!(c.used_blocks(), 6);
        c.release(&running.blocks);
        assert_eq!(c.used_blocks(), 4);
    }

    #[test]
    fn hits_on_free_blocks_are_not_counted_twice() {
        let mut c = KvCache::new(3);
        let h = hashes("aaaabbbb");
        let a = c.allocate(&h, usize::MAX, 2).unwrap();
        c.release(&a.blocks);
        // Two hits come out of the free queue; only one block is left for the third.
        assert!(c.allocate(&h, usize::MAX, 4).is_none());
        let b = c.allocate(&h, usize::MAX, 3).unwrap();
        assert_eq!(b.hit_blocks, 2);
        assert_eq!(c.free_blocks(), 0);
        assert!(c.grow().is_none());
        c.release(&b.blocks);
        assert!(c.grow().is_some());
        assert_eq!(c.used_blocks(), 1);
    }
}
