//! KV-cache events from vLLM: the message decoder. The subscribing data source and the
//! precise prefix index build on it.

pub mod decode;
