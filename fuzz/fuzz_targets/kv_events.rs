//! The KV-cache event decoder on arbitrary frames: never panics, and every BlockStored it
//! returns has the shape the index relies on (a positive block size; no tokens, or exactly
//! `block_size` per hash).
#![no_main]

use endpoint_picker::plugins::kvevents::decode::{KvEvent, decode_frames};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Split into three frames at the first two bytes' offsets.
    let Some((&a, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(a).min(rest.len());
    let (topic, rest) = rest.split_at(cut);
    let (seq, payload) = rest.split_at(rest.len().min(8));
    if let Ok(m) = decode_frames(&[topic, seq, payload]) {
        for e in &m.events {
            if let KvEvent::BlockStored(s) = e {
                assert!(s.block_size > 0);
                assert!(s.token_ids.is_empty() || s.token_ids.len() == s.block_hashes.len() * s.block_size as usize);
            }
        }
    }
});
