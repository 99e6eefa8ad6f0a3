//! Arbitrary KV-event messages applied to the precise index, one after the other for a few
//! endpoints: never panics, and the index's key count stays what its shards hold.
#![no_main]

use std::sync::Arc;

use endpoint_picker::plugins::kvevents::decode::decode_frames;
use endpoint_picker::plugins::kvevents::index::PreciseIndex;
use endpoint_picker::plugins::kvevents::ingest::Ingest;
use endpoint_picker::plugins::kvevents::keys::KeyScheme;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let index = Arc::new(PreciseIndex::new(64, 2, &[("gpu".into(), 1.0)]));
    let ingest = Ingest::new(index.clone(), KeyScheme::new(16, ""));
    let pods = [index.pod("10.0.0.1:1".parse().unwrap()), index.pod("10.0.0.2:1".parse().unwrap())];
    // Messages separated by 0xfe; each gives its endpoint in its first byte.
    for (i, chunk) in data.split(|b| *b == 0xfe).enumerate() {
        let Some((&who, payload)) = chunk.split_first() else {
            continue;
        };
        if let Ok(m) = decode_frames(&[b"kv@x@m", &(i as u64).to_be_bytes(), payload]) {
            ingest.apply(pods[usize::from(who) % 2], &m.events);
            // At most the bound plus what one message brings (an endpoint gives up only its own).
            assert!(index.keys() <= 64 + data.len());
        }
    }
});
