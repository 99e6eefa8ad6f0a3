//! Bytes per prefix-index entry at steady state, counted by a global allocator: every heap
//! byte the index holds (tables, the endpoint map, locks) divided by the entries it holds.
//!
//! `cargo bench --bench index_memory`
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

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
}
