//! Settings of one simulated server, kept apart from the model so that the binary, the tests
//! and the library share one definition and one validation.
//!
//! [`Simulator::new`](super::Simulator::new) never fails: it clamps out-of-range values with
//! [`SimConfig::sanitized`]. Front ends that want to refuse bad input instead call
//! [`SimConfig::validate`] first.

use thiserror::Error;

/// Most KV blocks a simulator models (16M tokens at the default block size); the block
/// table is kept in memory, so this bounds it.
pub const MAX_KV_BLOCKS: u32 = 1 << 20;

/// Settings of a simulated vLLM server.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The served model name (vLLM `--served-model-name`).
    pub model: String,
    /// Identity of this instance, sent in the `x-vllm-sim-id` header of every response.
    pub served_by: String,
    /// Running slots (vLLM `--max-num-seqs`).
    pub max_num_seqs: u32,
    /// KV-cache blocks (vLLM `num_gpu_blocks`).
    pub kv_blocks: u32,
    /// Tokens per KV-cache block (vLLM `--block-size`).
    pub block_size: u32,
    /// Prompt bytes that count as one token.
    pub bytes_per_token: u32,
    /// Prefill cost per prompt token that is not found in the prefix cache, in seconds.
    pub prefill_seconds_per_token: f64,
    /// Decode cost per output token after the first, in seconds.
    pub decode_seconds_per_token: f64,
    /// Output tokens of a request that sets neither `max_tokens` nor `max_completion_tokens`.
    pub default_output_tokens: u32,
    /// Factor applied to every simulated delay (0.01 runs 100 times faster, 0 never sleeps).
    pub time_scale: f64,
    /// LoRA adapters that may run at once (vLLM `--max-loras`); 0 disables LoRA.
    pub max_loras: u32,
    /// Names of the LoRA adapters served next to the base model.
    pub lora_adapters: Vec<String>,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            model: "tiny".to_owned(),
            served_by: "vllm-sim".to_owned(),
            max_num_seqs: 8,
            kv_blocks: 1024,
            block_size: 16,
            bytes_per_token: 4,
            prefill_seconds_per_token: 0.000_1,
            decode_seconds_per_token: 0.01,
            default_output_tokens: 16,
            time_scale: 1.0,
            max_loras: 0,
            lora_adapters: Vec::new(),
            max_body_bytes: 16 << 20,
        }
    }
}

/// Why a [`SimConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SimConfigError {
    /// A count that must be at least one is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// A duration or factor is negative, infinite or NaN.
    #[error("{0} must be a finite number >= 0, got {1}")]
    BadNumber(&'static str, f64),
    /// The model name is empty.
    #[error("the model name must not be empty")]
    EmptyModel,
    /// A LoRA adapter name is empty, has a comma, repeats, or equals the base model.
    #[error(
        "bad LoRA adapter name {0:?}: names must be non-empty, distinct, comma-free and differ from the model"
    )]
    BadAdapter(String),
    /// More KV blocks than [`MAX_KV_BLOCKS`].
    #[error("kv_blocks must be at most {MAX_KV_BLOCKS}, got {0}")]
    TooManyBlocks(u32),
    /// Adapters were named while LoRA is off.
    #[error("LoRA adapters need max_loras > 0")]
    AdaptersWithoutLora,
}

impl SimConfig {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        if self.model.is_empty() {
            return Err(SimConfigError::EmptyModel);
        }
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("kv_blocks", self.kv_blocks),
            ("block_size", self.block_size),
            ("bytes_per_token", self.bytes_per_token),
            ("default_output_tokens", self.default_output_tokens),
        ] {
            if v == 0 {
                return Err(SimConfigError::Zero(name));
            }
        }
        if self.kv_blocks > MAX_KV_BLOCKS {
            return Err(SimConfigError::TooManyBlocks(self.kv_blocks));
        }
        if self.max_body_bytes == 0 {
            return Err(SimConfigError::Zero("max_body_bytes"));
        }
        for (name, v) in [
            ("prefill_seconds_per_token", self.prefill_seconds_per_token),
            ("decode_seconds_per_token", self.decode_seconds_per_token),
            ("time_scale", self.time_scale),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(SimConfigError::BadNumber(name, v));
            }
        }
        if self.max_loras == 0 && !self.lora_adapters.is_empty() {
            return Err(SimConfigError::AdaptersWithoutLora);
        }
        for (i, a) in self.lora_adapters.iter().enumerate() {
            if a.is_empty() || a.contains(',') || *a == self.model || self.lora_adapters[..i].contains(a) {
                return Err(SimConfigError::BadAdapter(a.clone()));
            }
        }
        Ok(())
    }

    /// A copy with every out-of-range value replaced by the nearest usable one and bad
    /// adapter names dropped, so that a simulator can always be built.
    pub fn sanitized(&self) -> Self {
        let number = |v: f64, default: f64| if v.is_finite() && v >= 0.0 { v } else { default };
        let d = Self::default();
        let mut adapters: Vec<String> = Vec::new();
        if self.max_loras > 0 {
            for a in &self.lora_adapters {
                if !(a.is_empty() || a.contains(',') || *a == self.model || adapters.contains(a)) {
                    adapters.push(a.clone());
                }
            }
        }
        Self {
            model: if self.model.is_empty() {
                d.model
            } else {
                self.model.clone()
            },
            served_by: self.served_by.clone(),
            max_num_seqs: self.max_num_seqs.max(1),
            kv_blocks: self.kv_blocks.clamp(1, MAX_KV_BLOCKS),
            block_size: self.block_size.max(1),
            bytes_per_token: self.bytes_per_token.max(1),
            prefill_seconds_per_token: number(self.prefill_seconds_per_token, d.prefill_seconds_per_token),
            decode_seconds_per_token: number(self.decode_seconds_per_token, d.decode_seconds_per_token),
            default_output_tokens: self.default_output_tokens.max(1),
            time_scale: number(self.time_scale, d.time_scale),
            max_loras: self.max_loras,
            lora_adapters: adapters,
            max_body_bytes: self.max_body_bytes.max(1),
        }
    }

    /// The longest prompt plus output a request may ask for: the whole KV cache, as vLLM
    /// refuses to start when `max_model_len` does not fit in it.
    pub fn max_model_len(&self) -> u64 {
        u64::from(self.kv_blocks) * u64::from(self.block_size)
    }

    /// Prompt bytes per KV block.
    pub fn block_bytes(&self) -> usize {
        self.block_size as usize * self.bytes_per_token as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(SimConfig::default().validate(), Ok(()));
        assert_eq!(SimConfig::default().max_model_len(), 1024 * 16);
        assert_eq!(SimConfig::default().block_bytes(), 64);
    }

    #[test]
    fn validation_names_the_problem() {
        let c = SimConfig {
            max_num_seqs: 0,
            ..SimConfig::default()
        };
        assert_eq!(c.validate(), Err(SimConfigError::Zero("max_num_seqs")));
        let c = SimConfig {
            time_scale: f64::NAN,
            ..SimConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(SimConfigError::BadNumber("time_scale", _))
        ));
        let c = SimConfig {
            lora_adapters: vec!["a".into()],
            ..SimConfig::default()
        };
        assert_eq!(c.validate(), Err(SimConfigError::AdaptersWithoutLora));
        let c = SimConfig {
            kv_blocks: MAX_KV_BLOCKS + 1,
            ..SimConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(SimConfigError::TooManyBlocks(MAX_KV_BLOCKS + 1))
        );
        assert_eq!(c.sanitized().kv_blocks, MAX_KV_BLOCKS);
        let c = SimConfig {
            max_loras: 1,
            lora_adapters: vec!["a".into(), "a".into()],
            ..SimConfig::default()
        };
        assert_eq!(c.validate(), Err(SimConfigError::BadAdapter("a".into())));
    }

    #[test]
    fn sanitized_is_always_valid() {
        let c = SimConfig {
            model: String::new(),
            max_num_seqs: 0,
            kv_blocks: 0,
            block_size: 0,
            bytes_per_token: 0,
            prefill_seconds_per_token: -1.0,
            decode_seconds_per_token: f64::INFINITY,
            default_output_tokens: 0,
            time_scale: f64::NAN,
            max_loras: 1,
            lora_adapters: vec!["".into(), "x,y".into(), "ok".into(), "ok".into()],
            max_body_bytes: 0,
            served_by: "s".into(),
        }
        .sanitized();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.lora_adapters, vec!["ok".to_owned()]);
    }
}
