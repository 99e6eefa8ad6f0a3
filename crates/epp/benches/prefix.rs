//! Prefix hashing and index lookup/record in isolation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use endpoint_picker::plugins::prefix::PrefixIndex;
use endpoint_picker::plugins::prefix::hash::{block_hashes, chain_seed};

fn addr(i: usize) -> SocketAddr {
    format!("10.0.{}.{}:8000", i / 256, i % 256).parse().unwrap()
}

fn hashing(c: &mut Criterion) {
    let mut group = c.benchmark_group("prefix_hash");
    let seed = chain_seed("llama", None);
    for size in [1_000usize, 16_384, 200_000] {
        let input = vec![b'a'; size];
        group.throughput(Throughput::Bytes(size.min(256 * 64) as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| black_box(block_hashes(seed, black_box(&input), 64, 256)))
        });
    }
    group.finish();
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("prefix_lookup");
    let seed = chain_seed("llama", None);
    for endpoints in [8usize, 256] {
        let index = PrefixIndex::new(31_250);
        // Each endpoint holds 100 distinct 256-block prompts; the probe matches one fully.
        for e in 0..endpoints {
            for p in 0..100 {
                let prompt = format!("endpoint {e} prompt {p} ").repeat(1000);
                index.record(addr(e), &block_hashes(seed, prompt.as_bytes(), 64, 256), None);
            }
        }
        let probe = block_hashes(seed, "endpoint 3 prompt 7 ".repeat(1000).as_bytes(), 64, 256);
        let addrs: Vec<SocketAddr> = (0..endpoints).map(addr).collect();
        group.bench_function(BenchmarkId::new("leading_matches_256_blocks", endpoints), |b| {
            b.iter(|| {
                let mut best = 0;
                index.leading_matches(addrs.iter().copied(), black_box(&probe), |_, m| {
                    best = best.max(m)
                });
                black_box(best)
            })
        });
    }
    let index = PrefixIndex::new(31_250);
    let prompts: Vec<Vec<u64>> = (0..1000)
        .map(|p| block_hashes(seed, format!("prompt {p} ").repeat(2000).as_bytes(), 64, 256))
        .collect();
    let mut i = 0;
    group.bench_function("record_256_blocks", |b| {
        b.iter(|| {
            i = (i + 1) % prompts.len();
            index.record(addr(i % 8), black_box(&prompts[i]), None)
        })
    });
    group.finish();
}

criterion_group!(benches, hashing, lookup);
criterion_main!(benches);
