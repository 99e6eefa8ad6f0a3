//! Approximate prefix-cache routing: which endpoint probably still holds a prompt's prefix in
//! its KV cache, learned from the EPP's own routing decisions.
//!
//! [`hash`] turns a prompt into chained block hashes; [`PrefixIndex`] remembers, per endpoint,
//! a bounded LRU set of the hashes routed there. The [`PrefixProducer`]
//! (`approx-prefix-cache-producer`) owns an index, matches each request against it before
//! scheduling and records the decision after; the [`PrefixCacheScorer`]
//! (`prefix-cache-scorer`) scores what its producer found.

pub mod hash;
mod index;
mod lru;
mod producer;
mod scorer;

pub(crate) use index::AddrHasher;
pub use index::{DEFAULT_CAPACITY_PER_ENDPOINT, PrefixIndex};
pub use lru::LruSet;
pub use producer::{PRODUCER_PARAMS, PrefixProducer, ProducerParams};
pub use scorer::{PrefixCacheScorer, ScorerParamError, ScorerParams};
