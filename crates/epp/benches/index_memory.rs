//! Bytes per prefix-index entry at steady state, counted by a global allocator: every heap
//! byte the index holds (tables, the endpoint map, locks) divided by the entries it holds.
//! For the approximate index, per remembered hash; for the precise index, per engine block
//! stored (the figure behind `costAwareMemoryConfig`'s bytes-to-keys conversion,
//! `BYTES_PER_KEY`).
//!
//! `cargo bench --bench index_memory`
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use std::sync::Arc;

use endpoint_picker::plugins::kvevents::decode::{BlockHash, BlockStored, KvEvent};
use endpoint_picker::plugins::kvevents::index::PreciseIndex;
use endpoint_picker::plugins::kvevents::ingest::Ingest;
use endpoint_picker::plugins::kvevents::keys::KeyScheme;
use endpoint_picker::plugins::prefix::PrefixIndex;
use endpoint_picker::plugins::prefix::hash::{block_hashes, chain_seed};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A prompt's `BlockStored`: `blocks` engine blocks of 16 tokens, hashes from `base`.
fn stored(prompt: u32, blocks: usize, base: u64) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: (0..blocks as u64).map(|i| BlockHash::U64(base + i)).collect(),
        parent_block_hash: None,
        token_ids: (0..blocks as u32 * 16)
            .map(|t| prompt.wrapping_mul(7919).wrapping_add(t))
            .collect(),
        block_size: 16,
        lora_id: None,
        medium: Some("GPU".into()),
        lora_name: None,
        extra_keys: Vec::new(),
        group_idx: Some(0),
        kv_cache_spec_kind: Some("full_attention".into()),
    })
}

fn main() {
    let seed = chain_seed("llama", None);
    for (endpoints, capacity) in [(8usize, 31_250u32), (64, 31_250), (16, 4_096)] {
        // Pre-compute hashes so only the index's own bytes are counted.
        let prompts: Vec<Vec<u64>> = (0..(capacity as usize * 2 / 256 + 1))
            .map(|p| block_hashes(seed, format!("prompt {p} ").repeat(2000).as_bytes(), 64, 256))
            .collect();
        let before = LIVE.load(Ordering::Relaxed);
        let index = PrefixIndex::new(capacity);
        for e in 0..endpoints {
            let addr = format!("10.0.{}.{}:8000", e / 256, e % 256).parse().unwrap();
            for p in &prompts {
                index.record(addr, p, None);
            }
        }
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        let entries = index.entries();
        println!(
            "prefix_index endpoints={endpoints} capacity={capacity} entries={entries} heap_bytes={bytes} bytes_per_entry={:.1}",
            bytes as f64 / entries as f64
        );
        drop(index);
    }
    // (endpoints, prompts per endpoint, blocks per prompt, endpoints sharing each prompt)
    for (endpoints, prompts, blocks, shared) in [
        (8, 2_000usize, 64usize, 1usize),
        (8, 2_000, 64, 4),
        (64, 500, 64, 1),
    ] {
        // Events are built first so that only the index's bytes are counted.
        let events: Vec<(usize, KvEvent)> = (0..endpoints)
            .flat_map(|e| {
                (0..prompts).map(move |p| {
                    let prompt = (e / shared * prompts + p) as u32;
                    (e, stored(prompt, blocks, (e as u64) << 40 | (p as u64) << 16))
                })
            })
            .collect();
        let before = LIVE.load(Ordering::Relaxed);
        let index = Arc::new(PreciseIndex::new(
            100_000_000,
            10,
            &[("gpu".into(), 1.0), ("cpu".into(), 0.8)],
        ));
        let ingest = Ingest::new(index.clone(), KeyScheme::new(16, ""));
        for (e, event) in &events {
            let pod = index.pod(format!("10.0.{}.{}:8000", e / 256, e % 256).parse().unwrap());
            ingest.apply(pod, std::slice::from_ref(event));
        }
        let bytes = LIVE.load(Ordering::Relaxed) - before;
        let stored_blocks = endpoints * prompts * blocks;
        println!(
            "precise_index endpoints={endpoints} shared_by={shared} engine_blocks={stored_blocks} keys={} heap_bytes={bytes} bytes_per_block={:.1} bytes_per_key={:.1}",
            index.keys(),
            bytes as f64 / stored_blocks as f64,
            bytes as f64 / index.keys() as f64,
        );
        drop(ingest);
        drop(index);
        drop(events);
    }
}
