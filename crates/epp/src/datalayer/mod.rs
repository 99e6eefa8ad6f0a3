//! The data layer: which endpoints exist and how loaded each one is.
//!
//! Discovery ([`source`]: static lists, files, Kubernetes) writes endpoint sets, scrapers
//! ([`scrape`]) write metrics, and the request path only ever *reads* one immutable
//! [`Snapshot`] per request. The snapshot is published through an [`arc_swap::ArcSwap`], so a
//! scheduling cycle costs one atomic load and sees a consistent view: all scorers of one cycle
//! read the same numbers, and no writer can stall a reader.

mod endpoint;
pub mod extract;
mod fetch;
pub mod scrape;
pub mod source;
mod store;

pub use endpoint::{Endpoint, LoraInfo, Metrics, format_hostport};
pub use store::{Dispatched, EndpointState, EndpointStore, InFlight, Snapshot};

/// Bytes of prompt text per token: the usual figure for English text under BPE tokenisers.
/// The EPP never tokenises; the prefix index's block size and the load estimates use this.
pub const BYTES_PER_TOKEN: usize = 4;

/// Prompt tokens in about `bytes` bytes of prompt text. Used only to weigh requests against
/// each other and against a server's KV capacity, where being off by a fraction matters little.
pub fn estimate_tokens(bytes: usize) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN) as u64
}
