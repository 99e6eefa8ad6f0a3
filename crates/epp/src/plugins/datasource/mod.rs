//! Data-layer plugins: the Prometheus scraper (`metrics-data-source`) and the extractor of the
//! model-server protocol's figures (`core-metrics-extractor`).

pub mod core_metrics;
mod fetch;
pub mod figures;
pub mod metrics_source;
pub mod prom;

pub use core_metrics::{CoreMetricsExtractor, ExtractorDefaults, ExtractorParams};
pub use fetch::MAX_PAGE_BYTES;
pub use metrics_source::{MetricsDefaults, MetricsSource, MetricsSourceParams};
