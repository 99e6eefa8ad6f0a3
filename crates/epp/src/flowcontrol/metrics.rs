//! Flow-control metric families under llm-d-router v0.10's names
//! (`pkg/epp/metrics/llm_d_router_metrics.go`: subsystem `llm_d_epp`), each also exposed under
//! its deprecated `inference_extension_` twin where v0.10 keeps one (`pkg/epp/metrics/
//! metrics.go`), with the reference's labels and buckets:
//!
//! | family (`llm_d_epp_flow_control_…`) | type | labels |
//! |---|---|---|
//! | `request_queue_duration_seconds` † | histogram | fairness_id, priority, outcome, inference_pool, model_name, target_model_name |
//! | `request_enqueue_duration_seconds` † | histogram | fairness_id, priority, outcome |
//! | `dispatch_cycle_duration_seconds` † | histogram | – |
//! | `queue_size`, `queue_bytes` † | gauge | fairness_id, priority, inference_pool, model_name, target_model_name |
//! | `pool_saturation` † | gauge | inference_pool |
//! | `requests_total` | counter | outcome, priority, inference_pool |
//!
//! `fairness_id` comes from a client header: the first 1,000 distinct values keep their own
//! series and later ones are reported as `other` (v0.10's cap, `pkg/epp/metrics/
//! cardinality.go`), counted in `inference_extension_metric_label_overflow_total{label=
//! "fairness_id"}`. Model names share the EPP's model-label cap.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::observability::labels::BoundedLabel;

/// Distinct fairness ids with their own series (v0.10's cap).
pub const MAX_FAIRNESS_LABEL_VALUES: usize = 1000;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// How a request left flow control (v0.10's `QueueOutcome` strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent on to scheduling.
    Dispatched,
    /// Refused: the queue was full.
    RejectedCapacity,
    /// Refused: the queue was full and the pool empty.
    RejectedNoEndpoints,
    /// Waited its TTL.
    EvictedTtl,
    /// Pushed out of a full band by a smaller tenant's request (round-robin fairness).
    EvictedQueuePressure,
    /// The client went away while it waited.
    EvictedContextCancelled,
    /// Dropped at shutdown.
    EvictedOther,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dispatched => "Dispatched",
            Self::RejectedCapacity => "RejectedCapacity",
            Self::RejectedNoEndpoints => "RejectedNoEndpoints",
            Self::EvictedTtl => "EvictedTTL",
            Self::EvictedQueuePressure => "EvictedQueuePressure",
            Self::EvictedContextCancelled => "EvictedContextCancelled",
            Self::EvictedOther => "EvictedOther",
        }
    }
}

/// The labels one request carries through flow control.
#[derive(Debug, Clone)]
pub struct RequestLabels {
    /// Bounded fairness id.
    pub fairness_id: String,
    /// Priority as text.
    pub priority: String,
    /// Bounded model name.
    pub model_name: String,
    /// Bounded target model name.
    pub target_model_name: String,
}

/// The families (cheap to clone: every family is shared).
#[derive(Debug, Clone)]
pub struct FlowMetrics {
    pool: String,
    queue_duration: HistogramFamily,
    enqueue_duration: HistogramFamily,
    dispatch_cycle: Histogram,
    queue_size: Family<Labels, Gauge>,
    queue_bytes: Family<Labels, Gauge>,
    saturation: Family<Labels, Gauge<f64, AtomicU64>>,
    requests: Family<Labels, Counter>,
}

fn queue_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

fn cycle_histogram() -> Histogram {
    Histogram::new([0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1])
}

impl FlowMetrics {
    /// Registers the families in `registry`, labelled with `pool`.
    pub fn register(registry: &mut Registry, pool: &str) -> Self {
        let m = Self {
            pool: pool.to_owned(),
            queue_duration: HistogramFamily::new_with_constructor(queue_histogram),
            enqueue_duration: HistogramFamily::new_with_constructor(cycle_histogram),
            dispatch_cycle: cycle_histogram(),
            queue_size: Family::default(),
            queue_bytes: Family::default(),
            saturation: Family::default(),
            requests: Family::default(),
        };
        for prefix in ["llm_d_epp", "inference_extension"] {
            let a = if prefix == "inference_extension" {
                "[ALPHA] (deprecated twin) "
            } else {
                ""
            };
            registry.register(
                format!("{prefix}_flow_control_request_queue_duration_seconds"),
                format!("{a}Time requests spent in the flow-control queue, by outcome"),
                m.queue_duration.clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_request_enqueue_duration_seconds"),
                format!("{a}Time taken to admit a request into the flow-control queue"),
                m.enqueue_duration.clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_dispatch_cycle_duration_seconds"),
                format!("{a}Duration of one flow-control dispatch cycle"),
                m.dispatch_cycle.clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_queue_size"),
                format!("{a}Requests waiting in the flow-control queue"),
                m.queue_size.clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_queue_bytes"),
                format!("{a}Request body bytes waiting in the flow-control queue"),
                m.queue_bytes.clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_pool_saturation"),
                format!("{a}Pool saturation as the flow-control saturation detector last saw it (1 or more is saturated)"),
                m.saturation.clone(),
            );
        }
        registry.register(
            "llm_d_epp_flow_control_requests",
            "Requests that went through flow control, by outcome",
            m.requests.clone(),
        );
        m
    }

    /// Labels for a request: `fairness` and `models` bound the client-chosen values.
    pub fn labels(
        fairness: &BoundedLabel,
        models: &BoundedLabel,
        fairness_id: &str,
        priority: i32,
        model: &str,
        target_model: &str,
    ) -> RequestLabels {
        RequestLabels {
            fairness_id: fairness.value(fairness_id),
            priority: priority.to_string(),
            model_name: models.value(model),
            target_model_name: models.value(target_model),
        }
    }

    fn size_labels(&self, l: &RequestLabels) -> Labels {
        vec![
            ("fairness_id", l.fairness_id.clone()),
            ("priority", l.priority.clone()),
            ("inference_pool", self.pool.clone()),
            ("model_name", l.model_name.clone()),
            ("target_model_name", l.target_model_name.clone()),
        ]
    }

    /// A request entered the queue with `bytes` of body after `took` of admission.
    pub fn queued(&self, l: &RequestLabels, bytes: u64, took: Duration) {
        let labels = self.size_labels(l);
        self.queue_size.get_or_create(&labels).inc();
        self.queue_bytes.get_or_create(&labels).inc_by(bytes as i64);
        self.enqueue_duration
            .get_or_create(&vec![
                ("fairness_id", l.fairness_id.clone()),
                ("priority", l.priority.clone()),
                ("outcome", "NotYetFinalized".to_owned()),
            ])
            .observe(took.as_secs_f64());
    }

    /// A queued request of `bytes` left the queue.
    pub fn left(&self, l: &RequestLabels, bytes: u64) {
        let labels = self.size_labels(l);
        self.queue_size.get_or_create(&labels).dec();
        self.queue_bytes.get_or_create(&labels).dec_by(bytes as i64);
    }

    /// A request's flow-control outcome after `waited` in the queue (zero when it never
    /// queued).
    pub fn finished(&self, l: &RequestLabels, outcome: Outcome, waited: Duration) {
        let o = outcome.as_str().to_owned();
        self.queue_duration
            .get_or_create(&vec![
                ("fairness_id", l.fairness_id.clone()),
                ("priority", l.priority.clone()),
                ("outcome", o.clone()),
                ("inference_pool", self.pool.clone()),
                ("model_name", l.model_name.clone()),
                ("target_model_name", l.target_model_name.clone()),
            ])
            .observe(waited.as_secs_f64());
        self.requests
            .get_or_create(&vec![
                ("outcome", o),
                ("priority", l.priority.clone()),
                ("inference_pool", self.pool.clone()),
            ])
            .inc();
        if matches!(outcome, Outcome::RejectedCapacity | Outcome::RejectedNoEndpoints) {
            self.enqueue_duration
                .get_or_create(&vec![
                    ("fairness_id", l.fairness_id.clone()),
                    ("priority", l.priority.clone()),
                    ("outcome", outcome.as_str().to_owned()),
                ])
                .observe(0.0);
        }
    }

    /// One dispatch cycle took `took`, seeing `saturation`.
    pub fn cycle(&self, took: Duration, saturation: f64) {
        self.dispatch_cycle.observe(took.as_secs_f64());
        self.saturation
            .get_or_create(&vec![("inference_pool", self.pool.clone())])
            .set(saturation);
    }
}
