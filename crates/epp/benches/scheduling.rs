//! A full scheduling cycle as the request path runs it: parse the body, load the snapshot,
//! run the profile (queue + KV + prefix scorers, max-score picker), record the pick in the
//! prefix index. Pools of 8, 256 and 1,024 endpoints; chat bodies of 1 KB and 200 KB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use endpoint_picker::datalayer::{Endpoint, Metrics};
use endpoint_picker::request::RequestHeaders;
use endpoint_picker::requestcontrol::{Director, RequestInfo, Routing, Subset};

const SEED: &str = include_str!("../../../config/default-plugins.yaml");

fn director(endpoints: usize) -> Director {
    let (director, store) = epp_testkit::director::director(SEED, 1);
    store.set_endpoints((0..endpoints).map(|i| {
        Endpoint::from_address(
            format!("10.{}.{}.{}:8000", i / 65536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap(),
        )
    }));
    let snap = store.load();
    for (i, e) in snap.endpoints().iter().enumerate() {
        store.update_metrics(
            &e.endpoint,
            Metrics {
                waiting_queue: (i * 7 % 13) as u32,
                kv_cache_usage: (i * 11 % 17) as f64 / 17.0,
                ..Metrics::default()
            },
        );
    }
    director
}

/// 64 chat bodies of about `size` bytes sharing a system prompt (the first half).
fn bodies(size: usize) -> Vec<Vec<u8>> {
    let system = "You are a careful assistant who answers briefly. ".repeat(size / 40 + 1);
    let system = &system[..size / 2];
    (0..64)
        .map(|i| {
            let user = format!("question {i}: ").repeat(size / 10 + 1);
            let user = &user[..size / 2];
            serde_json::json!({"model": "llama", "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user}
            ]})
            .to_string()
            .into_bytes()
        })
        .collect()
}

fn cycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduling_cycle");
    for endpoints in [8usize, 256, 1024] {
        for size in [1_000usize, 200_000] {
            let director = director(endpoints);
            let bodies = bodies(size);
            let info = RequestInfo::from_headers(RequestHeaders::new(vec![
                (":path".into(), "/v1/chat/completions".into()),
                ("x-request-id".into(), "bench".into()),
            ]));
            // Warm the index so lookups find entries, as in steady state.
            for b in &bodies {
                director.route(&info, b, &Subset::All).unwrap();
            }
            let id = format!("{endpoints}ep/{}KB", size / 1000);
            group.throughput(Throughput::Elements(1));
            let mut i = 0;
            group.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter(|| {
                    i = (i + 1) % bodies.len();
                    let routed = director
                        .route(&info, black_box(&bodies[i]), &Subset::All)
                        .unwrap();
                    assert!(matches!(routed, Routing::Ready(_)));
                    black_box(routed)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, cycle);
criterion_main!(benches);
