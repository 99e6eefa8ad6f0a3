//! Approximate prefix-cache index: which endpoint probably still holds a prompt's prefix in
//! its KV cache, learned from the EPP's own routing decisions.
//!
//! [`hash`] turns a prompt into chained block hashes; [`PrefixIndex`] remembers, per endpoint,
//! a bounded LRU set of the hashes routed there. The `prefix-cache-scorer` plugin uses both.

pub mod hash;
mod index;
mod lru;

pub use index::{DEFAULT_CAPACITY_PER_ENDPOINT, PrefixIndex};
pub use lru::LruSet;
