//! The metrics-page parser of every built-in engine on arbitrary text: never panics, and every
//! figure it stores is within its range (the checks of `figures.rs`).
#![no_main]

use endpoint_picker::datalayer::Metrics;
use endpoint_picker::plugins::datasource::figures::MAX_BLOCK_SIZE;
use endpoint_picker::plugins::datasource::prom::{ENGINES, EngineMetrics};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = tokio::time::Instant::now();
    for engine in ENGINES {
        let Some(mapping) = EngineMetrics::builtin(engine) else {
            continue;
        };
        let mut refused = Vec::new();
        if let Some(m) = mapping.extract(text, &Metrics::default(), now, &mut refused) {
            assert!(
                (0.0..=1.0).contains(&m.kv_cache_usage),
                "{engine}: {}",
                m.kv_cache_usage
            );
            if let Some(b) = m.cache_block_size {
                assert!(b >= 1 && f64::from(b) <= MAX_BLOCK_SIZE, "{engine}: {b}");
            }
        }
        for r in &refused {
            assert!(!r.family.is_empty());
        }
    }
});
