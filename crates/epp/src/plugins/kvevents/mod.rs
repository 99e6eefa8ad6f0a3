//! KV-cache events from vLLM and the precise prefix index built on them.
//!
//! * [`decode`]: the ZMQ message frames and msgpack payload;
//! * [`keys`]: the picker's own block keys over token ids;
//! * [`index`]: which endpoint holds which key, in which tier, bounded;
//! * [`ingest`]: events applied to the index, publishers' sequences;
//! * [`subscriber`]: the ZMQ subscriptions (libzmq), gaps and replay;
//! * [`params`], [`producer`]: the `precise-prefix-cache-producer` plugin.

pub mod decode;
pub mod index;
pub mod ingest;
pub mod keys;
pub mod params;
pub mod producer;
pub mod subscriber;

#[cfg(test)]
pub(crate) mod testing;
