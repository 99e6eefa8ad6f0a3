//! The index fed with the real captures: every prompt block of the linked requests is found on
//! the endpoint that stored it, at several block sizes of the picker's; evictions and resets
//! leave exactly what the engine still holds; adapter blocks live under the adapter's root.

use std::collections::HashSet;

use serde_json::Value as Json;
use tokio::time::Instant;

use super::*;
use crate::plugins::kvevents::decode::EventMessage;
use crate::plugins::kvevents::index::{DEFAULT_PODS_PER_KEY, PreciseIndex};
use crate::plugins::kvevents::testing::{FIXTURES, decoded};

fn ingest(block_tokens: usize) -> Ingest {
    let index = Arc::new(PreciseIndex::new(
        1 << 20,
        DEFAULT_PODS_PER_KEY,
        &[("gpu".into(), 1.0), ("cpu".into(), 0.8)],
    ));
    Ingest::new(index, KeyScheme::new(block_tokens, ""))
}

fn feed(ix: &Ingest, pod: PodId, messages: &[EventMessage]) -> Applied {
    let mut total = Applied::default();
    for m in messages {
        let a = ix.apply(pod, &m.events);
        total.stored += a.stored;
        total.removed += a.removed;
        total.cleared += a.cleared;
        total.skipped.extend(a.skipped);
    }
    total
}

fn requests() -> Vec<(String, Vec<u32>)> {
    let model =
        vllm_prompt::Model::load(std::path::Path::new(&format!("{FIXTURES}/tokenization")), 1 << 20).unwrap();
    std::fs::read_to_string(format!("{FIXTURES}/tokenization/kv/requests_with_tokens.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: Json = serde_json::from_str(l).unwrap();
            let body = serde_json::to_vec(&r["request"]).unwrap();
            let prompt = model.tokenize(&body, vllm_prompt::Api::Chat).unwrap();
            (r["name"].as_str().unwrap().to_owned(), prompt.prompts[0].clone())
        })
        .collect()
}

#[test]
fn every_prompt_block_of_the_capture_is_found_at_any_block_size() {
    let messages = decoded("tokenization/kv/kv_events.bin");
    let reqs = requests();
    for block_tokens in [16, 32, 48, 64] {
        let ix = ingest(block_tokens);
        let a = ix.index().pod("127.0.0.1:8000".parse().unwrap());
        let b = ix.index().pod("127.0.0.1:8001".parse().unwrap());
        let applied = feed(&ix, a, &messages);
        assert_eq!(applied.stored, 95);
        assert!(applied.skipped.is_empty(), "{:?}", applied.skipped);
        let mut total = 0;
        for (name, tokens) in &reqs {
            let mut keys = Vec::new();
            ix.scheme()
                .request_keys(tokens, None, None, &[], usize::MAX, &mut keys);
            let m = ix.index().lookup(&keys, &[Some(a), Some(b)], Instant::now());
            // The engine stores full blocks of 32: a block of ours that ends past the
            // prompt's last full engine block can be missing, nothing before it.
            let engine_full = tokens.len() / 32 * 32;
            let expected = keys.len().min(engine_full / block_tokens);
            assert!(
                m[0].blocks as usize >= expected,
                "{name} at {block_tokens}: {} of {} blocks (expected {expected})",
                m[0].blocks,
                keys.len()
            );
            assert_eq!(m[1].blocks, 0);
            assert_eq!(m[0].weighted, f64::from(m[0].blocks));
            total += m[0].blocks as usize * block_tokens;
        }
        assert!(
            total >= 206 * 32 - 12 * 32,
            "{total} tokens matched at {block_tokens}"
        );
    }
}

#[test]
fn evictions_leave_what_the_engine_still_holds() {
    let messages = decoded("kv_events.bin");
    let ix = ingest(16);
    let pod = ix.index().pod("127.0.0.1:8000".parse().unwrap());
    let mut live: HashSet<u64> = HashSet::new();
    for m in &messages {
        for e in &m.events {
            match e {
                KvEvent::BlockStored(s) => live.extend(s.block_hashes.iter().map(engine_hash)),
                KvEvent::BlockRemoved { block_hashes, .. } => {
                    for h in block_hashes {
                        live.remove(&engine_hash(h));
                    }
                }
                KvEvent::AllBlocksCleared => live.clear(),
            }
        }
        let applied = ix.apply(pod, &m.events);
        assert!(applied.skipped.is_empty(), "{:?}", applied.skipped);
        assert_eq!(ix.index().engine_blocks(pod), live.len(), "after seq {}", m.seq);
    }
    assert!(ix.index().keys() > 0);
}

#[test]
fn adapter_blocks_live_under_the_adapter_and_resets_clear_them() {
    let messages = decoded("variant_lora_cbor/kv_events.bin");
    let ix = ingest(32);
    let pod = ix.index().pod("127.0.0.1:8000".parse().unwrap());
    let mut checked = 0;
    for m in &messages {
        let cleared = m.events.iter().any(|e| matches!(e, KvEvent::AllBlocksCleared));
        let before = ix.index().keys();
        let applied = ix.apply(pod, &m.events);
        assert!(applied.skipped.is_empty(), "{:?}", applied.skipped);
        if cleared && applied.stored == 0 {
            assert_eq!(ix.index().keys(), 0, "reset left {before} keys");
        }
        for e in &m.events {
            let KvEvent::BlockStored(s) = e else { continue };
            if s.parent_block_hash.is_some() {
                continue;
            }
            // A root chain: the request side computes the same keys from the same tokens,
            // under the adapter when the blocks are an adapter's.
            let lora = s.lora_name.as_deref();
            let mut keys = Vec::new();
            ix.scheme()
                .request_keys(&s.token_ids, lora, None, &[], usize::MAX, &mut keys);
            let found = ix.index().lookup(&keys, &[Some(pod)], Instant::now())[0].blocks as usize;
            assert_eq!(found, keys.len(), "seq {}", m.seq);
            if lora.is_some() {
                let mut base = Vec::new();
                ix.scheme()
                    .request_keys(&s.token_ids, None, None, &[], usize::MAX, &mut base);
                // (The capture also sent the same prompts to the base model.)
                assert!(keys.iter().zip(&base).all(|(a, b)| a != b));
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
    assert!(ix.is_adapter("tiny-lora"));
    assert!(!ix.is_adapter("tiny"));
}

#[test]
fn sequences() {
    let mut s = Sequence::default();
    assert_eq!(s.check(3), Step::Gap { from: 0 });
    assert_eq!(s.check(0), Step::Next);
    s.applied(0);
    assert_eq!(s.check(1), Step::Next);
    s.applied(1);
    assert_eq!(s.check(1), Step::Repeat);
    assert_eq!(s.check(5), Step::Gap { from: 2 });
    assert_eq!(s.check(0), Step::Restart);
}

#[test]
fn byte_hashes_use_their_last_eight_bytes() {
    let mut digest = vec![0xaa; 24];
    digest.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
    assert_eq!(engine_hash(&BlockHash::Bytes(digest)), 0x0102);
    assert_eq!(engine_hash(&BlockHash::Bytes(vec![7])), 7);
    assert_eq!(engine_hash(&BlockHash::U64(u64::MAX)), u64::MAX);
}
