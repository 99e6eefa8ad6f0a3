//! The precise prefix path's costs on one core: tokenizing a chat request as vLLM does (1 KB
//! and 200 KB bodies, cold and with the segment cache warm), computing its block keys, a
//! lookup over 16 endpoints, and ingesting KV events (decode and apply).
//!
//! `cargo bench --bench precise`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use endpoint_picker::plugins::kvevents::decode::decode_frames;
use endpoint_picker::plugins::kvevents::index::PreciseIndex;
use endpoint_picker::plugins::kvevents::ingest::Ingest;
use endpoint_picker::plugins::kvevents::keys::KeyScheme;
use tokio::time::Instant;
use vllm_prompt::{Api, Model};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm-0.32-cpu/tokenization"
);

/// A chat body of about `bytes`: a long system prompt and a short question.
fn chat(bytes: usize, salt: usize) -> Vec<u8> {
    let words = [
        "the",
        "license",
        "grants",
        "each",
        "contributor",
        "a",
        "perpetual",
        "worldwide",
        "royalty-free",
    ];
    let mut system = String::with_capacity(bytes);
    let mut i = salt;
    while system.len() < bytes.saturating_sub(120) {
        system.push_str(words[i % words.len()]);
        system.push(' ');
        i += 1;
    }
    serde_json::to_vec(&serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "what does it mean?"}]
    }))
    .unwrap()
}

fn tokenization(c: &mut Criterion) {
    let mut g = c.benchmark_group("tokenize");
    for (name, bytes) in [("1KB", 1usize << 10), ("200KB", 200 << 10)] {
        g.throughput(Throughput::Bytes(bytes as u64));
        // Cold: a model without cache, a body it never saw.
        let cold = Model::load(Path::new(MODEL), 0).unwrap();
        let mut n = 0usize;
        g.bench_function(format!("{name}/cold"), |b| {
            b.iter_batched(
                || {
                    n += 1;
                    chat(bytes, n)
                },
                |body| black_box(cold.tokenize(&body, Api::Chat).unwrap()),
                BatchSize::SmallInput,
            );
        });
        // Cached: the same system prompt again (the segment cache holds it).
        let warm = Model::load(Path::new(MODEL), 64 << 20).unwrap();
        let body = chat(bytes, 0);
        warm.tokenize(&body, Api::Chat).unwrap();
        g.bench_function(format!("{name}/cached"), |b| {
            b.iter(|| black_box(warm.tokenize(&body, Api::Chat).unwrap()));
        });
        let tokens = warm.tokenize(&body, Api::Chat).unwrap().prompts.remove(0);
        let scheme = KeyScheme::new(16, "");
        g.bench_function(format!("{name}/keys"), |b| {
            b.iter(|| {
                let mut keys = Vec::with_capacity(tokens.len() / 16);
                scheme.request_keys(&tokens, None, None, &[], 8192, &mut keys);
                black_box(keys)
            });
        });
    }
    g.finish();
}

fn lookup_and_ingest(c: &mut Criterion) {
    let index = Arc::new(PreciseIndex::new(100_000_000, 10, &[("gpu".into(), 1.0)]));
    let ingest = Ingest::new(index.clone(), KeyScheme::new(16, ""));
    // Messages as vLLM sends them: one BlockStored of 16 blocks of 16 tokens each.
    let message = |seq: u64, prompt: u32| -> Vec<Vec<u8>> {
        let events = vec![vllm_sim::kvevents::Event::Stored {
            hashes: (0..16).map(|i| u64::from(prompt) << 8 | i).collect(),
            parent: None,
            tokens: (0..256)
                .map(|t| prompt.wrapping_mul(131).wrapping_add(t))
                .collect(),
            block_size: 16,
            lora_name: None,
            extra_keys: vec![None; 16],
        }];
        vec![
            b"kv@10.0.0.1:8000@tiny".to_vec(),
            seq.to_be_bytes().to_vec(),
            vllm_sim::kvevents::payload(1.0, &events, 0),
        ]
    };
    let pods: Vec<_> = (0..16)
        .map(|e| index.pod(format!("10.0.0.{}:8000", e + 1).parse().unwrap()))
        .collect();
    let mut g = c.benchmark_group("events");
    g.throughput(Throughput::Elements(16));
    let mut n = 0u32;
    g.bench_function("decode+apply/16 blocks", |b| {
        b.iter_batched(
            || {
                n = n.wrapping_add(1);
                (n, message(u64::from(n), n))
            },
            |(n, frames)| {
                let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                let m = decode_frames(&refs).unwrap();
                black_box(ingest.apply(pods[(n % 16) as usize], &m.events))
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
    // Lookups: 16 candidates, a 1,000-block prompt held by one of them.
    let tokens: Vec<u32> = (0..16_000).collect();
    let scheme = KeyScheme::new(16, "");
    let mut keys = Vec::new();
    scheme.request_keys(&tokens, None, None, &[], 8192, &mut keys);
    let events = vec![endpoint_picker::plugins::kvevents::decode::KvEvent::BlockStored(
        endpoint_picker::plugins::kvevents::decode::BlockStored {
            block_hashes: (0..1000)
                .map(|i| endpoint_picker::plugins::kvevents::decode::BlockHash::U64(1 << 40 | i))
                .collect(),
            parent_block_hash: None,
            token_ids: tokens.clone(),
            block_size: 16,
            lora_id: None,
            medium: None,
            lora_name: None,
            extra_keys: Vec::new(),
            group_idx: None,
            kv_cache_spec_kind: None,
        },
    )];
    ingest.apply(pods[3], &events);
    let cands: Vec<Option<_>> = pods.iter().copied().map(Some).collect();
    let mut g = c.benchmark_group("lookup");
    g.bench_function("16 endpoints/1000 blocks", |b| {
        b.iter(|| black_box(index.lookup(&keys, &cands, Instant::now())));
    });
    g.finish();
}

criterion_group!(benches, tokenization, lookup_and_ingest);
criterion_main!(benches);
