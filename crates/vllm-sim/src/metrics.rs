//! `/metrics` in Prometheus text format 0.0.4, written to look like vLLM 0.32's own exposition
//! (family names, label sets, `# HELP`/`# TYPE` lines, `_created` companions, number style),
//! because the point of the simulator is that a scraper cannot tell it from the real server.
//!
//! The engine keeps the raw figures in [`Stats`]; this module only formats a snapshot of them,
//! so a scrape never holds the engine lock while writing text.

use std::fmt::Write as _;

use super::config::SimConfig;
use super::engine::EngineSnapshot;

/// Content type of the exposition, as vLLM's Python client sends it.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds of vLLM's latency histograms (TTFT).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];
/// Bucket bounds of vLLM's request-phase histograms (e2e, queue, prefill, decode, inference).
pub const PHASE_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];
/// Bucket bounds of vLLM's per-token latency histograms.
pub const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/// Bucket bounds of the `n` request parameter histogram.
pub const PARAMS_N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];
/// Bucket bounds of the preemption-count histogram.
pub const PREEMPTION_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0];

/// vLLM's 1-2-5 series of token-count buckets up to `max` (its `max_model_len`).
pub fn token_buckets(max: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 1u64;
    'outer: loop {
        for m in [1, 2, 5] {
            let Some(v) = decade.checked_mul(m) else {
                break 'outer;
            };
            if v > max {
                break 'outer;
            }
            out.push(v as f64);
        }
        match decade.checked_mul(10) {
            Some(d) => decade = d,
            None => break,
        }
    }
    out
}

/// A cumulative histogram with fixed bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); the last entry is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with the given upper bounds (ascending, `+Inf` implied).
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// Why requests finished, in vLLM's `finished_reason` label order.
pub const FINISHED_REASONS: [&str; 5] = ["stop", "length", "abort", "error", "repetition"];
/// Index of `length` in [`FINISHED_REASONS`].
pub const FINISHED_LENGTH: usize = 1;
/// Index of `abort` in [`FINISHED_REASONS`].
pub const FINISHED_ABORT: usize = 2;

/// Counters and histograms the engine maintains.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Prompt tokens of requests that produced a first token.
    pub prompt_tokens: u64,
    /// Of those, tokens computed by prefill.
    pub prompt_computed: u64,
    /// Of those, tokens read from the prefix cache.
    pub prompt_cached: u64,
    /// Output tokens produced.
    pub generation_tokens: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Finished requests by [`FINISHED_REASONS`].
    pub finished: [u64; 5],
    /// Requests refused because the waiting queue was full.
    pub rejected_queue_full: u64,
    /// Arrival to first token.
    pub ttft: Histogram,
    /// Arrival to finish.
    pub e2e: Histogram,
    /// Arrival to first scheduling.
    pub queue: Histogram,
    /// First scheduling to finish.
    pub inference: Histogram,
    /// First scheduling to first token.
    pub prefill: Histogram,
    /// First token to finish.
    pub decode: Histogram,
    /// Between consecutive tokens.
    pub inter_token: Histogram,
    /// Decode time over output tokens after the first, per request.
    pub time_per_output_token: Histogram,
    /// Prompt tokens per request.
    pub prompt_len: Histogram,
    /// Output tokens per request.
    pub generation_len: Histogram,
    /// `max_tokens` per request.
    pub max_tokens: Histogram,
    /// Prompt tokens computed (not cached) per request.
    pub prefill_computed: Histogram,
    /// Preemptions per request.
    pub preemptions_per_request: Histogram,
    /// The `n` parameter per request (always 1 here).
    pub params_n: Histogram,
}

impl Stats {
    /// Empty figures; token histograms are bucketed up to `max_model_len`.
    pub fn new(max_model_len: u64) -> Self {
        let tokens = token_buckets(max_model_len);
        Self {
            prefix_queries: 0,
            prefix_hits: 0,
            prompt_tokens: 0,
            prompt_computed: 0,
            prompt_cached: 0,
            generation_tokens: 0,
            preemptions: 0,
            finished: [0; 5],
            rejected_queue_full: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            e2e: Histogram::new(PHASE_BUCKETS),
            queue: Histogram::new(PHASE_BUCKETS),
            inference: Histogram::new(PHASE_BUCKETS),
            prefill: Histogram::new(PHASE_BUCKETS),
            decode: Histogram::new(PHASE_BUCKETS),
            inter_token: Histogram::new(TOKEN_LATENCY_BUCKETS),
            time_per_output_token: Histogram::new(TOKEN_LATENCY_BUCKETS),
            prompt_len: Histogram::new(&tokens),
            generation_len: Histogram::new(&tokens),
            max_tokens: Histogram::new(&tokens),
            prefill_computed: Histogram::new(&tokens),
            preemptions_per_request: Histogram::new(PREEMPTION_BUCKETS),
            params_n: Histogram::new(PARAMS_N_BUCKETS),
        }
    }
}

/// Values reported instead of the real ones while set (see the admin API).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Reported `vllm:num_requests_waiting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u32>,
    /// Reported `vllm:num_requests_running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<u32>,
    /// Reported `vllm:kv_cache_usage_perc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
}

/// Formats a number the way Python's Prometheus client does: `8.0`, `0.85`, `+Inf`, and
/// large values as `1.7953135870629e+09`.
pub fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned();
    }
    let mut s = format!("{v}");
    if !s.contains(['.', 'e', 'E']) {
        s.push_str(".0");
    }
    if v > 0.0
        && let Some(dot) = s.find('.')
        && dot > 6
    {
        let digits = format!("{}{}", &s[1..dot], &s[dot + 1..]);
        let mantissa = format!("{}.{}", &s[..1], digits);
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        return format!("{mantissa}e+0{}", dot - 1);
    }
    s
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes `{k="v",...}` with the keys sorted, as the Python client does.
fn labels(out: &mut String, pairs: &[(&str, &str)]) {
    let mut sorted: Vec<&(&str, &str)> = pairs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (k, v)) in sorted.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape(v));
    }
    out.push('}');
}

struct Writer<'a> {
    out: String,
    base: [(&'a str, &'a str); 2],
    created: String,
}

impl<'a> Writer<'a> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, extra: &[(&str, &str)], value: &str) {
        let mut pairs: Vec<(&str, &str)> = self.base.to_vec();
        pairs.extend_from_slice(extra);
        self.out.push_str(name);
        labels(&mut self.out, &pairs);
        let _ = writeln!(self.out, " {value}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, "gauge", help);
        self.sample(name, &[], &fmt_value(value));
    }

    /// A counter (family `<name>_total`) with one series per label set, and its `_created`.
    fn counter(&mut self, name: &str, help: &str, series: &[(&[(&str, &str)], f64)]) {
        let total = format!("{name}_total");
        self.header(&total, "counter", help);
        for (extra, v) in series {
            self.sample(&total, extra, &fmt_value(*v));
        }
        let created_name = format!("{name}_created");
        self.header(&created_name, "gauge", help);
        let created = self.created.clone();
        for (extra, _) in series {
            self.sample(&created_name, extra, &created);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, c) in h.counts.iter().enumerate() {
            cumulative += c;
            let le = h
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| fmt_value(*b));
            self.sample(&bucket, &[("le", &le)], &fmt_value(cumulative as f64));
        }
        self.sample(&format!("{name}_count"), &[], &fmt_value(h.count as f64));
        self.sample(&format!("{name}_sum"), &[], &fmt_value(h.sum));
        let created_name = format!("{name}_created");
        self.header(&created_name, "gauge", help);
        let created = self.created.clone();
        self.sample(&created_name, &[], &created);
    }
}

/// The whole `/metrics` page for `snap`, with `overrides` applied. `start_unix` is the
/// simulator's start time (the `_created` value).
pub fn render(config: &SimConfig, snap: &EngineSnapshot, overrides: &Overrides, start_unix: f64) -> String {
    let mut w = Writer {
        out: String::with_capacity(32 << 10),
        base: [("engine", "0"), ("model_name", config.model.as_str())],
        created: fmt_value(start_unix),
    };
    let s = &snap.stats;
    let running = overrides.running.map_or(snap.running as f64, f64::from);
    let waiting = overrides.waiting.map_or(snap.waiting as f64, f64::from);
    let deferred = if overrides.waiting.is_some() {
        0.0
    } else {
        snap.deferred as f64
    };
    let kv = overrides.kv_cache_usage.unwrap_or(snap.kv_cache_usage);

    let none: &[(&str, &str)] = &[];
    for (name, help) in [
        (
            "vllm:estimated_flops_per_gpu",
            "Estimated number of floating point operations per GPU (for Model Flops Utilization calculations).",
        ),
        (
            "vllm:estimated_read_bytes_per_gpu",
            "Estimated number of bytes read from memory per GPU (for Model Flops Utilization calculations).",
        ),
        (
            "vllm:estimated_write_bytes_per_gpu",
            "Estimated number of bytes written to memory per GPU (for Model Flops Utilization calculations).",
        ),
    ] {
        w.counter(name, help, &[(none, 0.0)]);
    }
    w.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        running,
    );
    w.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        waiting,
    );
    w.header(
        "vllm:num_requests_waiting_by_reason",
        "gauge",
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
    );
    w.sample(
        "vllm:num_requests_waiting_by_reason",
        &[("reason", "capacity")],
        &fmt_value(waiting - deferred),
    );
    w.sample(
        "vllm:num_requests_waiting_by_reason",
        &[("reason", "deferred")],
        &fmt_value(deferred),
    );
    w.header(
        "vllm:engine_sleep_state",
        "gauge",
        "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
    );
    for (state, v) in [
        ("awake", "1.0"),
        ("weights_offloaded", "0.0"),
        ("discard_all", "0.0"),
    ] {
        w.sample("vllm:engine_sleep_state", &[("sleep_state", state)], v);
    }
    w.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        kv,
    );
    w.counter(
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        &[(none, s.prefix_queries as f64)],
    );
    w.counter(
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        &[(none, s.prefix_hits as f64)],
    );
    for (name, help) in [
        (
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
        ),
        (
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
        ),
        (
            "vllm:mm_cache_queries",
            "Multi-modal cache queries, in terms of number of queried items.",
        ),
        (
            "vllm:mm_cache_hits",
            "Multi-modal cache hits, in terms of number of cached items.",
        ),
    ] {
        w.counter(name, help, &[(none, 0.0)]);
    }
    w.counter(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        &[(none, s.preemptions as f64)],
    );
    w.counter(
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        &[(none, s.prompt_tokens as f64)],
    );
    w.counter(
        "vllm:prompt_tokens_by_source",
        "Number of prompt tokens by source.",
        &[
            (&[("source", "local_compute")], s.prompt_computed as f64),
            (&[("source", "local_cache_hit")], s.prompt_cached as f64),
            (&[("source", "external_kv_transfer")], 0.0),
        ],
    );
    w.counter(
        "vllm:prompt_tokens_cached",
        "Number of cached prompt tokens (local + external).",
        &[(none, s.prompt_cached as f64)],
    );
    w.counter(
        "vllm:prompt_tokens_cached_by_source",
        "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",
        &[
            (&[("source", "device")], s.prefix_hits as f64),
            (&[("source", "host")], 0.0),
            (&[("source", "p2p")], 0.0),
            (&[("source", "disk")], 0.0),
            (&[("source", "external_unspecified")], 0.0),
        ],
    );
    w.counter(
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        &[(none, s.generation_tokens as f64)],
    );
    let reasons: Vec<([(&str, &str); 1], f64)> = FINISHED_REASONS
        .iter()
        .zip(s.finished)
        .map(|(r, n)| ([("finished_reason", *r)], n as f64))
        .collect();
    let reason_series: Vec<(&[(&str, &str)], f64)> = reasons.iter().map(|(l, n)| (&l[..], *n)).collect();
    w.counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        &reason_series,
    );
    // vLLM exports this one without the engine label.
    {
        let help = "Number of admission attempts rejected by a queue limit, by reason.";
        let model = config.model.as_str();
        w.header("vllm:admission_rejections_total", "counter", help);
        let series = [
            ("max_num_queued_reqs", s.rejected_queue_full),
            ("max_num_queued_tokens", 0),
        ];
        for (reason, n) in series {
            w.out.push_str("vllm:admission_rejections_total");
            labels(&mut w.out, &[("model_name", model), ("reason", reason)]);
            let _ = writeln!(w.out, " {}", fmt_value(n as f64));
        }
        w.header("vllm:admission_rejections_created", "gauge", help);
        for (reason, _) in series {
            w.out.push_str("vllm:admission_rejections_created");
            labels(&mut w.out, &[("model_name", model), ("reason", reason)]);
            let _ = writeln!(w.out, " {}", w.created);
        }
    }
    for (name, help, h) in [
        (
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            &s.prompt_len,
        ),
        (
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            &s.generation_len,
        ),
        (
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            &s.max_tokens,
        ),
        (
            "vllm:request_params_n",
            "Histogram of the n request parameter.",
            &s.params_n,
        ),
        (
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            &s.max_tokens,
        ),
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &s.ttft,
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &s.inter_token,
        ),
        (
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            &s.time_per_output_token,
        ),
        (
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &s.e2e,
        ),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &s.queue,
        ),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            &s.inference,
        ),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            &s.prefill,
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            &s.decode,
        ),
        (
            "vllm:request_num_preemptions",
            "Histogram of the number of times a request was preempted.",
            &s.preemptions_per_request,
        ),
        (
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            &s.prefill_computed,
        ),
    ] {
        w.histogram(name, help, h);
    }
    if config.max_loras > 0 {
        // vLLM exports this one without the engine and model labels; each state seen keeps
        // its series, and the current state is the one with the newest timestamp.
        w.header(
            "vllm:lora_requests_info",
            "gauge",
            "Running stats on lora requests.",
        );
        let max_lora = config.max_loras.to_string();
        for (state, ts) in &snap.lora_states {
            w.out.push_str("vllm:lora_requests_info");
            labels(
                &mut w.out,
                &[
                    ("max_lora", &max_lora),
                    ("running_lora_adapters", &state.running),
                    ("waiting_lora_adapters", &state.waiting),
                ],
            );
            let _ = writeln!(w.out, " {}", fmt_value(*ts));
        }
    }
    cache_config_info(&mut w, config);
    w.out
}

fn cache_config_info(w: &mut Writer<'_>, c: &SimConfig) {
    w.header(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    let block_size = c.block_size.to_string();
    let blocks = c.kv_blocks.to_string();
    let tokens = c.max_model_len().to_string();
    let memory = (c.max_model_len() * 1024).to_string();
    let pairs: &[(&str, &str)] = &[
        ("_block_size_resolved", "True"),
        ("block_size", &block_size),
        ("cache_dtype", "auto"),
        ("cache_hit_alignment_tokens", "None"),
        ("effective_attention_block_size", &block_size),
        ("enable_mamba_shared_prefix_checkpoint", "False"),
        ("enable_prefix_caching", "True"),
        ("engine", "0"),
        ("gpu_memory_utilization", "0.92"),
        ("hash_block_size", "None"),
        ("is_attention_free", "False"),
        ("kv_cache_dtype_skip_layers", "[]"),
        ("kv_cache_layout", "None"),
        ("kv_cache_max_concurrency", "1.0"),
        ("kv_cache_memory_bytes", &memory),
        ("kv_cache_size_tokens", &tokens),
        ("kv_offloading_backend", "native"),
        ("kv_offloading_size", "None"),
        ("kv_sharing_fast_prefill", "False"),
        ("mamba_block_size", "None"),
        ("mamba_cache_dtype", "auto"),
        ("mamba_cache_mode", "none"),
        ("mamba_page_size_padded", "None"),
        ("mamba_ssm_cache_dtype", "float32"),
        ("num_cpu_blocks", "None"),
        ("num_gpu_blocks", &blocks),
        ("num_gpu_blocks_override", &blocks),
        ("prefix_cache_retention_interval", "0"),
        ("prefix_caching_hash_algo", "xxhash"),
        ("prefix_match_unit", "None"),
        ("replayssm_buffer_len", "16"),
        ("skip_page_size_padded", "None"),
        ("sliding_window", "None"),
        ("swa_bounded_replay", "True"),
        ("use_kda_recoverssm", "False"),
        ("use_replayssm", "False"),
        ("user_specified_block_size", "True"),
    ];
    w.out.push_str("vllm:cache_config_info");
    labels(&mut w.out, pairs);
    w.out.push_str(" 1.0\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_look_like_the_python_client() {
        assert_eq!(fmt_value(0.0), "0.0");
        assert_eq!(fmt_value(8.0), "8.0");
        assert_eq!(fmt_value(0.8503937007874016), "0.8503937007874016");
        assert_eq!(fmt_value(1795313587.062993), "1.795313587062993e+09");
        assert_eq!(fmt_value(1795313587.0), "1.795313587e+09");
        assert_eq!(fmt_value(7420.0), "7420.0");
        assert_eq!(fmt_value(f64::INFINITY), "+Inf");
    }

    #[test]
    fn token_buckets_follow_max_model_len() {
        assert_eq!(
            token_buckets(2048),
            vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0
            ]
        );
        assert_eq!(token_buckets(1), vec![1.0]);
    }

    #[test]
    fn histogram_is_cumulative_with_inf() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(2.0);
        h.observe(9.0);
        let mut w = Writer {
            out: String::new(),
            base: [("engine", "0"), ("model_name", "m")],
            created: "1.0".into(),
        };
        w.histogram("vllm:x", "X.", &h);
        let text = w.out;
        assert!(text.contains("vllm:x_bucket{engine=\"0\",le=\"1.0\",model_name=\"m\"} 1.0\n"));
        assert!(text.contains("vllm:x_bucket{engine=\"0\",le=\"2.0\",model_name=\"m\"} 2.0\n"));
        assert!(text.contains("vllm:x_bucket{engine=\"0\",le=\"+Inf\",model_name=\"m\"} 3.0\n"));
        assert!(text.contains("vllm:x_count{engine=\"0\",model_name=\"m\"} 3.0\n"));
        assert!(text.contains("vllm:x_sum{engine=\"0\",model_name=\"m\"} 11.5\n"));
        assert_eq!((h.count(), h.sum()), (3, 11.5));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        labels(&mut out, &[("b", "x\"y\\z\n"), ("a", "1")]);
        assert_eq!(out, r#"{a="1",b="x\"y\\z\n"}"#);
    }
}
