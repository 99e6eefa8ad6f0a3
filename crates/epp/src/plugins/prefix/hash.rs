//! Chained block hashes of a prompt.
//!
//! The prompt bytes are cut into fixed-size blocks (a stand-in for the model server's
//! KV-cache blocks: 16 tokens at roughly 4 bytes per token gives the default 64 bytes). Block
//! `i`'s hash covers block `i` *and* the hash of block `i - 1`, so equal hashes at position `i`
//! mean an equal prefix of `i + 1` blocks, which is exactly what a KV cache can reuse.
//!
//! The chain starts from a seed derived from the target model (and the request's
//! `cache_salt`), so different models, adapters or tenants never share entries. A trailing
//! partial block is not hashed: the model server cannot reuse a partial block either.
//!
//! The hashes never leave this process, so they need not equal the reference EPP's; they
//! must only be stable for the life of the index. Each block is one xxh64 call seeded with the
//! previous hash, which chains without copying the prompt.

use xxhash_rust::xxh64::xxh64;

/// Default bytes per block: 16 tokens × 4 bytes.
pub const DEFAULT_BLOCK_BYTES: usize = 64;
/// Default limit on blocks hashed per request.
pub const DEFAULT_MAX_BLOCKS: usize = 256;

/// The seed of a request's chain: the target model, then the cache salt if any.
pub fn chain_seed(model: &str, cache_salt: Option<&str>) -> u64 {
    let seed = xxh64(model.as_bytes(), 0);
    match cache_salt {
        Some(salt) => xxh64(salt.as_bytes(), seed),
        None => seed,
    }
}

/// Appends to `out` the chained hashes of the first `max_blocks` full blocks of `input`.
/// `block_bytes` of 0 is treated as 1.
pub fn block_hashes_into(seed: u64, input: &[u8], block_bytes: usize, max_blocks: usize, out: &mut Vec<u64>) {
    let block_bytes = block_bytes.max(1);
    let blocks = (input.len() / block_bytes).min(max_blocks);
    out.reserve(blocks);
    let mut prev = seed;
    for block in input.chunks_exact(block_bytes).take(blocks) {
        prev = xxh64(block, prev);
        out.push(prev);
    }
}

/// The chained hashes of `input` (see [`block_hashes_into`]).
pub fn block_hashes(seed: u64, input: &[u8], block_bytes: usize, max_blocks: usize) -> Vec<u64> {
    let mut out = Vec::new();
    block_hashes_into(seed, input, block_bytes, max_blocks, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_shares_leading_hashes_only() {
        let seed = chain_seed("llama", None);
        let a = block_hashes(seed, &[b'a'; 64 * 4], 64, 256);
        let mut other = vec![b'a'; 64 * 4];
        other[64 * 2 + 5] = b'b';
        let b = block_hashes(seed, &other, 64, 256);
        assert_eq!(a.len(), 4);
        assert_eq!(a[..2], b[..2]);
        // Chaining: a change in block 2 changes every later hash too.
        assert_ne!(a[2], b[2]);
        assert_ne!(a[3], b[3]);
    }

    #[test]
    fn partial_blocks_and_limits() {
        let seed = chain_seed("m", None);
        assert!(block_hashes(seed, &[1; 63], 64, 256).is_empty());
        assert_eq!(block_hashes(seed, &[1; 64 * 3 + 10], 64, 256).len(), 3);
        assert_eq!(block_hashes(seed, &[1; 64 * 300], 64, 256).len(), 256);
        assert_eq!(block_hashes(seed, &[1; 10], 0, 256).len(), 10);
    }

    #[test]
    fn model_and_salt_separate_chains() {
        let input = [7u8; 128];
        let base = block_hashes(chain_seed("m1", None), &input, 64, 256);
        assert_ne!(base, block_hashes(chain_seed("m2", None), &input, 64, 256));
        assert_ne!(
            base,
            block_hashes(chain_seed("m1", Some("tenant")), &input, 64, 256)
        );
        assert_eq!(base, block_hashes(chain_seed("m1", None), &input, 64, 256));
    }
}
