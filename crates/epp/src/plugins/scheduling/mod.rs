//! Scheduling plugins: load, token-load and LoRA scorers, pickers, the profile handler and
//! the conformance test filter.

pub mod load;
pub mod lora;
pub mod pickers;
pub mod profile_handler;
pub mod test_filter;
pub mod token_load;
