//! The `vllm-sim` command line, in the library so that the deployment manifests' arguments can
//! be checked against it without running the binary.

use clap::Parser;

use crate::SimConfig;

fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a finite number >= 0, got {s}"))
    }
}

/// A simulated vLLM server (OpenAI API, /metrics, prefix cache, queueing, LoRA).
#[derive(Debug, Parser)]
#[command(name = "vllm-sim", version)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Instance id for the x-vllm-sim-id header (default: HOST:PORT).
    #[arg(long)]
    pub id: Option<String>,
    /// Running slots.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,
    /// KV-cache blocks.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub kv_blocks: u32,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub block_size: u32,
    /// Prompt bytes counted as one token.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub bytes_per_token: u32,
    /// Prefill milliseconds per prompt token not found in the prefix cache.
    #[arg(long, default_value_t = 0.1, value_parser = non_negative)]
    pub prefill_ms_per_token: f64,
    /// Decode milliseconds per output token after the first.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    pub decode_ms_per_token: f64,
    /// Output tokens when a request sets no max_tokens.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub output_tokens: u32,
    /// Multiplies every simulated delay (0.01 runs 100 times faster).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    pub time_scale: f64,
    /// LoRA adapters that may run at once; 0 disables LoRA.
    #[arg(long, default_value_t = 0)]
    pub max_loras: u32,
    /// Comma-separated LoRA adapter names (needs --max-loras > 0).
    #[arg(long, value_delimiter = ',')]
    pub lora_adapters: Vec<String>,
    /// Largest accepted request body in bytes.
    #[arg(long, default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_body_bytes: u64,
    /// A model directory (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`):
    /// prompts are rendered and tokenized as vLLM does, and counted in real tokens.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// vLLM's `--kv-events-config` JSON, e.g.
    /// `{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv@127.0.0.1:8000@tiny"}`
    /// (needs --tokenizer: events carry token ids).
    #[arg(long)]
    pub kv_events_config: Option<String>,
}

/// vLLM's `KVEventsConfig` fields the simulator reads.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KvEventsConfig {
    #[serde(default)]
    enable_kv_cache_events: bool,
    #[serde(default)]
    publisher: Option<String>,
    #[serde(default = "default_endpoint")]
    endpoint: String,
    #[serde(default)]
    replay_endpoint: Option<String>,
    #[serde(default = "default_buffer_steps")]
    buffer_steps: usize,
    #[serde(default)]
    topic: String,
    #[serde(default = "default_hwm")]
    hwm: i32,
    #[serde(default = "default_queue")]
    max_queue_size: usize,
}

fn default_hwm() -> i32 {
    100_000
}

fn default_queue() -> usize {
    100_000
}

fn default_endpoint() -> String {
    "tcp://*:5557".into()
}

fn default_buffer_steps() -> usize {
    10_000
}

impl Cli {
    /// The KV-event publisher `--kv-events-config` asks for (vLLM's defaults for what it
    /// leaves out), or `None` when events are off.
    pub fn kv_events(&self) -> Result<Option<crate::kvevents::PublisherConfig>, String> {
        let Some(text) = &self.kv_events_config else {
            return Ok(None);
        };
        let c: KvEventsConfig = serde_json::from_str(text).map_err(|e| format!("--kv-events-config: {e}"))?;
        if !c.enable_kv_cache_events || c.publisher.as_deref() == Some("null") {
            return Ok(None);
        }
        if let Some(p) = c.publisher.as_deref().filter(|p| *p != "zmq") {
            return Err(format!("--kv-events-config: publisher {p:?} (zmq or null)"));
        }
        if self.tokenizer.is_none() {
            return Err("--kv-events-config needs --tokenizer: KV events carry token ids".into());
        }
        Ok(Some(crate::kvevents::PublisherConfig {
            endpoint: c.endpoint,
            bind: None,
            replay_endpoint: c.replay_endpoint,
            topic: c.topic,
            buffer_steps: c.buffer_steps,
            dp_rank: 0,
            hwm: c.hwm,
            max_queue_size: c.max_queue_size,
        }))
    }

    /// The simulator settings these flags give (`served_by` is left empty: it depends on the
    /// bound port).
    pub fn sim_config(&self) -> SimConfig {
        let cli = self;
        SimConfig {
            model: cli.model.clone(),
            served_by: String::new(),
            max_num_seqs: cli.max_num_seqs,
            kv_blocks: cli.kv_blocks,
            block_size: cli.block_size,
            bytes_per_token: cli.bytes_per_token,
            prefill_seconds_per_token: cli.prefill_ms_per_token / 1000.0,
            decode_seconds_per_token: cli.decode_ms_per_token / 1000.0,
            default_output_tokens: cli.output_tokens,
            time_scale: cli.time_scale,
            max_loras: cli.max_loras,
            lora_adapters: cli.lora_adapters.clone(),
            max_body_bytes: usize::try_from(cli.max_body_bytes).unwrap_or(usize::MAX),
        }
    }
}
