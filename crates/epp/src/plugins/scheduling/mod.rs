//! Scheduling plugins: load, token-load, active-request, no-hit-LRU, session-affinity and LoRA
//! scorers, pickers, the profile handler and the conformance test filter.

pub mod active_request;
pub mod load;
pub mod lora;
pub mod no_hit_lru;
pub mod pickers;
pub mod profile_handler;
pub mod session_affinity;
pub mod test_filter;
pub mod token_load;
