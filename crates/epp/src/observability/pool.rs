//! Pool gauges, computed from the current snapshot when `/metrics` is scraped, and the gauges
//! plugins register to be computed then too: always current, and no background task to own.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::time::Instant;

use crate::datalayer::EndpointStore;
use crate::framework::plugin::PluginMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    name: String,
    model_server_pod: String,
}

/// Averages over endpoints whose metrics are fresher than the staleness threshold.
pub struct PoolCollector {
    store: Arc<EndpointStore>,
    pool: String,
    staleness: Duration,
    plugins: PluginMetrics,
}

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCollector")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl PoolCollector {
    /// A collector for `pool`.
    pub fn new(store: Arc<EndpointStore>, pool: &str, staleness: Duration, plugins: PluginMetrics) -> Self {
        Self {
            store,
            pool: pool.to_owned(),
            staleness,
            plugins,
        }
    }
}

fn gauge<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(L, f64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        let metric = family.encode_family(labels)?;
        ConstGauge::new(*value).encode(metric)?;
    }
    Ok(())
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.store.load();
        let now = Instant::now();
        let fresh: Vec<_> = snapshot
            .endpoints()
            .iter()
            .filter(|e| e.metrics().is_fresh(now, self.staleness))
            .collect();
        let pool = PoolLabels {
            name: self.pool.clone(),
        };
        let n = fresh.len() as f64;
        let (kv, queue) = if fresh.is_empty() {
            (0.0, 0.0)
        } else {
            (
                fresh.iter().map(|e| e.metrics().kv_cache_usage).sum::<f64>() / n,
                fresh
                    .iter()
                    .map(|e| f64::from(e.metrics().waiting_queue))
                    .sum::<f64>()
                    / n,
            )
        };
        let a = "[ALPHA] ";
        gauge(
            &mut encoder,
            "inference_pool_average_kv_cache_utilization",
            &format!("{a}The average kv cache utilization for an inference server pool"),
            &[(pool.clone(), kv)],
        )?;
        gauge(
            &mut encoder,
            "inference_pool_average_queue_size",
            &format!("{a}The average number of requests pending in the model server queue"),
            &[(pool.clone(), queue)],
        )?;
        gauge(
            &mut encoder,
            "inference_pool_ready_pods",
            &format!("{a}The number of ready pods in the inference server pool"),
            &[(pool, n)],
        )?;
        let per_pod: Vec<(PodLabels, f64)> = snapshot
            .endpoints()
            .iter()
            .map(|e| {
                (
                    PodLabels {
                        name: self.pool.clone(),
                        model_server_pod: e.endpoint.name.to_string(),
                    },
                    f64::from(e.metrics().waiting_queue),
                )
            })
            .collect();
        gauge(
            &mut encoder,
            "inference_pool_per_pod_queue_size",
            &format!(
                "{a}The total number of requests pending in the model server queue for each underlying pod"
            ),
            &per_pod,
        )?;
        // Gauges plugins compute at scrape time (the prefix index size, say).
        self.plugins.with(|families| {
            for (name, (help, reads)) in &families.gauges {
                let total: i64 = reads.iter().map(|r| r()).sum();
                let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(total as f64).encode(family)?;
            }
            for (name, (help, reads)) in &families.counter_fns {
                let total: i64 = reads.iter().map(|r| r()).sum();
                let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(total.max(0) as u64).encode(family)?;
            }
            Ok::<(), std::fmt::Error>(())
        })?;
        Ok(())
    }
}
