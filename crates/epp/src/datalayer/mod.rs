//! The data layer: which endpoints exist and what is known about each one.
//!
//! Discovery ([`discovery`]: static lists, files; Kubernetes in [`crate::k8s`]) writes endpoint
//! sets, the [`collector`] runs the configured data sources and writes their attributes, and
//! the request path only ever *reads* one immutable [`Snapshot`] per request. The snapshot is
//! published through an [`arc_swap::ArcSwap`], so a scheduling cycle costs one atomic load and
//! sees a consistent view: all plugins of one cycle read the same figures, and no writer can
//! stall a reader.

pub mod collector;
pub mod discovery;
mod endpoint;
pub mod health;
mod store;

pub use endpoint::{Endpoint, EndpointState, LoraInfo, METRICS, Metrics, format_hostport};
pub use store::{EndpointStore, Snapshot, StoreHook, Writes};

/// Bytes of prompt text per token: the usual figure for English text under BPE tokenisers.
/// The EPP does not tokenise; the prefix index's block size and the load estimates use this.
pub const BYTES_PER_TOKEN: usize = 4;

/// Prompt tokens in about `bytes` bytes of prompt text. Used only to weigh requests against
/// each other and against a server's KV capacity, where being off by a fraction matters little.
pub fn estimate_tokens(bytes: usize) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN) as u64
}
