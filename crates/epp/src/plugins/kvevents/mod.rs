//! KV-cache events from vLLM and the precise prefix index built on them.
//!
//! * [`decode`]: the ZMQ message frames and msgpack payload;
//! * [`keys`]: the picker's own block keys over token ids;
//! * [`index`]: which endpoint holds which key, in which tier, bounded;
//! * [`ingest`]: events applied to the index, publishers' sequences.

pub mod decode;
pub mod index;
pub mod ingest;
pub mod keys;

#[cfg(test)]
pub(crate) mod testing;
