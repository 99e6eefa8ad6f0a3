//! The picker's own block keys over token ids, computed the same way from a request's tokens
//! and from the tokens a `BlockStored` event carries.
//!
//! Engine block hashes cannot be recomputed by a router: they depend on the engine's hash
//! algorithm and seed, and a LoRA block's hash covers the adapter's path, which events do not
//! carry. So, as llm-d-router v0.10 does, the index keys blocks by a chain of its own: tokens
//! cut into blocks of `blockSizeTokens` (whatever the engine's block size), each key a hash of
//! the previous key, the block's tokens and the block's extra identifiers. Events are
//! translated into these keys from their token ids, and engine hashes are kept only to
//! resolve later events (`BlockRemoved`, a `BlockStored` whose parent is an earlier block).
//!
//! What is folded in, on both sides:
//! * the LoRA adapter, into the chain's root: a request for adapter `a` and a block stored
//!   under `lora_name: a` share a root that base-model blocks never have (vLLM puts the adapter
//!   in every block's hash);
//! * `cache_salt`, into the first block (vLLM puts it in the first block's extra keys);
//! * other per-block identifiers (multimodal items), into the block where the engine block
//!   that carried them starts.
//!
//! The hash is xxh3-64; keys never leave the process, so any EPP replica computes the same
//! keys from the same events and requests without sharing anything.

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

pub use crate::framework::attributes::MediaSpan;

/// Tokens per block when the configuration does not say (llm-d-router v0.10's default, and
/// vLLM's default block size).
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// How keys are computed: the block size and the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScheme {
    block_tokens: usize,
    seed: u64,
}

/// Where a chain stands after some tokens: the key of its last full block and the tokens
/// after it that do not fill a block yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChainState {
    /// The last full block's key (the root key before any block).
    pub parent: u64,
    /// Tokens after it (fewer than a block).
    pub pending: Vec<u32>,
    /// Identifiers waiting for the block that will hold `pending`'s first token.
    pub pending_extra: Vec<String>,
}

impl KeyScheme {
    /// A scheme of `block_tokens` per block (at least 1) seeded by `hash_seed` (the
    /// `tokenProcessorConfig.hashSeed` string; empty by default).
    pub fn new(block_tokens: usize, hash_seed: &str) -> Self {
        Self {
            block_tokens: block_tokens.max(1),
            seed: xxh3_64(hash_seed.as_bytes()),
        }
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The root of a chain: the seed, and the LoRA adapter when the blocks belong to one.
    pub fn root(&self, lora: Option<&str>) -> u64 {
        let mut h = Xxh3::new();
        h.update(&self.seed.to_le_bytes());
        if let Some(name) = lora {
            h.update(b"L");
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
        }
        h.digest()
    }

    /// The key of a block with `tokens` after `parent`, with `extra` identifiers.
    pub fn block_key<S: AsRef<str>>(&self, parent: u64, tokens: &[u32], extra: &[S]) -> u64 {
        let mut h = Xxh3::new();
        h.update(&parent.to_le_bytes());
        // Tokens as little-endian bytes, in one update per 64 tokens.
        let mut buf = [0u8; 256];
        for chunk in tokens.chunks(64) {
            for (i, t) in chunk.iter().enumerate() {
                buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
            }
            h.update(&buf[..chunk.len() * 4]);
        }
        for e in extra {
            let e = e.as_ref();
            // Lengths keep (tokens, identifiers) apart.
            h.update(&(e.len() as u64 | 1 << 63).to_le_bytes());
            h.update(e.as_bytes());
        }
        h.digest()
    }

    /// A request's keys: `tokens` cut into full blocks (a partial last block has no key), at
    /// most `max_blocks`, rooted at the adapter `lora`; each block carries the identifiers of
    /// the `media` items whose placeholder tokens overlap it (in offset order), and the first
    /// block `salt` after them, in vLLM's order of extra keys.
    pub fn request_keys(
        &self,
        tokens: &[u32],
        lora: Option<&str>,
        salt: Option<&str>,
        media: &[MediaSpan],
        max_blocks: usize,
        out: &mut Vec<u64>,
    ) {
        let mut parent = self.root(lora);
        let mut extra: Vec<&str> = Vec::new();
        for (i, block) in tokens
            .chunks_exact(self.block_tokens)
            .take(max_blocks)
            .enumerate()
        {
            extra.clear();
            let (start, end) = (i * self.block_tokens, (i + 1) * self.block_tokens);
            extra.extend(
                media
                    .iter()
                    .filter(|m| m.offset < end && m.offset + m.length > start)
                    .map(|m| m.identifier.as_str()),
            );
            if i == 0
                && let Some(s) = salt
            {
                extra.push(s);
            }
            parent = self.block_key(parent, block, &extra);
            out.push(parent);
        }
    }

    /// Feeds one engine block's `tokens` (with its `extra` identifiers) into `state`,
    /// appending the keys of the blocks it completes to `out`. The identifiers belong to the
    /// block that holds the engine block's first token.
    pub fn feed(&self, state: &mut ChainState, tokens: &[u32], extra: Vec<String>, out: &mut Vec<u64>) {
        let mut extra = Some(extra).filter(|e| !e.is_empty());
        let mut rest = tokens;
        while !rest.is_empty() {
            if let Some(e) = extra.take() {
                state.pending_extra.extend(e);
            }
            let need = self.block_tokens - state.pending.len();
            if rest.len() < need {
                state.pending.extend_from_slice(rest);
                return;
            }
            let (head, tail) = rest.split_at(need);
            rest = tail;
            let key = if state.pending.is_empty() {
                self.block_key(state.parent, head, &state.pending_extra)
            } else {
                state.pending.extend_from_slice(head);
                let k = self.block_key(state.parent, &state.pending, &state.pending_extra);
                state.pending.clear();
                k
            };
            state.pending_extra.clear();
            state.parent = key;
            out.push(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_requests_give_the_same_keys_whatever_the_engine_block_size() {
        let tokens: Vec<u32> = (0..200).collect();
        for ours in [8, 16, 32, 48] {
            let k = KeyScheme::new(ours, "");
            let mut want = Vec::new();
            k.request_keys(&tokens, None, None, &[], usize::MAX, &mut want);
            assert_eq!(want.len(), 200 / ours);
            for engine in [16, 32, 7] {
                let mut state = ChainState {
                    parent: k.root(None),
                    ..ChainState::default()
                };
                let mut got = Vec::new();
                for block in tokens.chunks(engine) {
                    k.feed(&mut state, block, Vec::new(), &mut got);
                }
                assert_eq!(got, want, "ours {ours}, engine {engine}");
            }
        }
    }

    #[test]
    fn salt_adapter_and_seed_separate_chains() {
        let tokens: Vec<u32> = (0..64).collect();
        let keys = |k: &KeyScheme, lora, salt| {
            let mut v = Vec::new();
            k.request_keys(&tokens, lora, salt, &[], usize::MAX, &mut v);
            v
        };
        let k = KeyScheme::new(16, "");
        let base = keys(&k, None, None);
        assert_ne!(keys(&k, Some("a"), None)[0], base[0]);
        let salted = keys(&k, None, Some("s"));
        assert!(salted.iter().zip(&base).all(|(a, b)| a != b));
        assert_ne!(keys(&KeyScheme::new(16, "42"), None, None)[0], base[0]);
        // The event side folds the salt the engine sends on its first block into ours.
        let mut state = ChainState {
            parent: k.root(None),
            ..ChainState::default()
        };
        let mut got = Vec::new();
        k.feed(&mut state, &tokens[..32], vec!["s".into()], &mut got);
        k.feed(&mut state, &tokens[32..], Vec::new(), &mut got);
        assert_eq!(got, salted);
        // Limits.
        assert_eq!(keys(&k, None, None).len(), 4);
        let mut v = Vec::new();
        k.request_keys(&tokens, None, None, &[], 2, &mut v);
        assert_eq!(v, base[..2]);
        // A media item over blocks 1 and 2 (of 16): the engine names it on those blocks.
        let media = [MediaSpan {
            identifier: "img".into(),
            offset: 20,
            length: 20,
        }];
        let mut with = Vec::new();
        k.request_keys(&tokens, None, None, &media, usize::MAX, &mut with);
        assert_eq!(with[0], base[0]);
        assert_ne!(with[1], base[1]);
        let mut state = ChainState {
            parent: k.root(None),
            ..ChainState::default()
        };
        let mut got = Vec::new();
        for (i, block) in tokens.chunks(16).enumerate() {
            let extra = if i == 1 || i == 2 {
                vec!["img".to_owned()]
            } else {
                Vec::new()
            };
            k.feed(&mut state, block, extra, &mut got);
        }
        assert_eq!(got, with);
    }
}
