//! From a model server's Prometheus text to [`Metrics`]: metric specs, the built-in engine
//! mappings, and a sample-line parser.
//!
//! A vLLM `/metrics` page is ~50 KB and ~90 families; the EPP needs five or six series of it,
//! twenty times a second per endpoint. So each line is first checked for a wanted family name
//! (a byte comparison, no allocation), and only those sample lines are parsed. Parsing cost is
//! then independent of everything else the server exports.
//!
//! The sample-line parser is our own: `prometheus-parse` (0.2) matches metric names with
//! `\w+`, so it cannot read any `vllm:`-prefixed series, and it splits labels at the first
//! `}` even inside quoted values.
//!
//! Metric specs follow the reference: `name` or `name{label=value,...}` (values quoted or
//! not); a series matches when it carries every listed label with that value. Several
//! matching series are combined by the rules of [`super::figures`] (counts add, utilisation
//! takes the largest; for LoRA info the series with the largest value, a timestamp in vLLM,
//! which keeps old label sets, is the current state), after each value is range-checked.

use std::sync::Arc;

use std::borrow::Cow;

use tokio::time::Instant;

use super::figures::{self, Combine, Rejection};
use crate::datalayer::{LoraInfo, Metrics};

/// A parsed metric spec string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    /// Family / series name.
    pub name: String,
    /// Required label values.
    pub labels: Vec<(String, String)>,
}

/// Why a metric spec string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid metric spec '{spec}': {reason}")]
pub struct SpecError {
    spec: String,
    reason: &'static str,
}

impl MetricSpec {
    /// Parses `name` or `name{l1=v1,l2="v2"}`. An empty string means "not scraped" (`None`).
    pub fn parse(spec: &str) -> Result<Option<Self>, SpecError> {
        let err = |reason| SpecError {
            spec: spec.to_owned(),
            reason,
        };
        let s = spec.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let (name, rest) = match s.find('{') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(err("the name must be [a-zA-Z0-9_:]+"));
        }
        let mut labels = Vec::new();
        if let Some(rest) = rest {
            let inner = rest
                .strip_suffix('}')
                .ok_or_else(|| err("missing closing '}' (nothing may follow it)"))?;
            for pair in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| err("labels must be key=value"))?;
                let v = v.trim();
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                labels.push((k.trim().to_owned(), v.to_owned()));
            }
        }
        Ok(Some(Self {
            name: name.to_owned(),
            labels,
        }))
    }

    fn matches(&self, sample: &Sample<'_>) -> bool {
        sample.name == self.name
            && self
                .labels
                .iter()
                .all(|(k, v)| sample.label(k) == Some(v.as_str()))
    }
}

/// Where KV-cache block size and count come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheInfo {
    /// An info series whose labels carry the values (vLLM, SGLang).
    Labels {
        /// The info series.
        spec: MetricSpec,
        /// Label with tokens per block.
        block_size_label: String,
        /// Label with the number of blocks.
        num_blocks_label: String,
    },
    /// Two gauges (TensorRT-LLM).
    Gauges {
        /// Tokens per block.
        block_size: Option<MetricSpec>,
        /// Number of blocks.
        num_blocks: Option<MetricSpec>,
    },
}

/// The metric names of one model-server engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMetrics {
    /// Engine name (`vllm`, `sglang`, `trtllm-serve`, `triton-tensorrt-llm`, `triton`, or a
    /// configured one).
    pub engine: String,
    /// Waiting requests.
    pub queued: Option<MetricSpec>,
    /// Running requests.
    pub running: Option<MetricSpec>,
    /// KV-cache utilisation; the first spec present wins (new name, then old).
    pub kv_usage: Vec<MetricSpec>,
    /// LoRA info.
    pub lora: Option<MetricSpec>,
    /// Cache geometry.
    pub cache: Option<CacheInfo>,
}

fn spec(name: &str, labels: &[(&str, &str)]) -> MetricSpec {
    MetricSpec {
        name: name.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

fn label_cache(name: &str, block_size: &str, num_blocks: &str) -> Option<CacheInfo> {
    Some(CacheInfo::Labels {
        spec: spec(name, &[]),
        block_size_label: block_size.to_owned(),
        num_blocks_label: num_blocks.to_owned(),
    })
}

/// Engines with built-in mappings.
pub const ENGINES: &[&str] = &["vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton"];

impl EngineMetrics {
    /// The built-in mapping of `engine`, if it is one of [`ENGINES`].
    pub fn builtin(engine: &str) -> Option<Self> {
        let m = match engine {
            "vllm" => Self {
                engine: engine.to_owned(),
                queued: Some(spec("vllm:num_requests_waiting", &[])),
                running: Some(spec("vllm:num_requests_running", &[])),
                kv_usage: vec![
                    spec("vllm:kv_cache_usage_perc", &[]),
                    spec("vllm:gpu_cache_usage_perc", &[]),
                ],
                lora: Some(spec("vllm:lora_requests_info", &[])),
                cache: label_cache("vllm:cache_config_info", "block_size", "num_gpu_blocks"),
            },
            "sglang" => Self {
                engine: engine.to_owned(),
                queued: Some(spec("sglang:num_queue_reqs", &[])),
                running: Some(spec("sglang:num_running_reqs", &[])),
                kv_usage: vec![spec("sglang:token_usage", &[])],
                lora: None,
                cache: label_cache("sglang:cache_config_info", "page_size", "num_pages"),
            },
            "trtllm-serve" => Self {
                engine: engine.to_owned(),
                queued: Some(spec("trtllm_num_requests_waiting", &[])),
                running: Some(spec("trtllm_num_requests_running", &[])),
                kv_usage: vec![spec("trtllm_kv_cache_utilization", &[])],
                lora: None,
                cache: Some(CacheInfo::Gauges {
                    block_size: Some(spec("trtllm_kv_cache_tokens_per_block", &[])),
                    num_blocks: Some(spec("trtllm_kv_cache_max_blocks", &[])),
                }),
            },
            "triton-tensorrt-llm" => Self {
                engine: engine.to_owned(),
                queued: Some(spec("nv_trt_llm_request_metrics", &[("request_type", "waiting")])),
                running: Some(spec(
                    "nv_trt_llm_request_metrics",
                    &[("request_type", "scheduled")],
                )),
                kv_usage: vec![spec(
                    "nv_trt_llm_kv_cache_block_metrics",
                    &[("kv_cache_block_type", "fraction")],
                )],
                lora: None,
                cache: Some(CacheInfo::Gauges {
                    block_size: Some(spec(
                        "nv_trt_llm_kv_cache_block_metrics",
                        &[("kv_cache_block_type", "tokens_per")],
                    )),
                    num_blocks: Some(spec(
                        "nv_trt_llm_kv_cache_block_metrics",
                        &[("kv_cache_block_type", "max")],
                    )),
                }),
            },
            // Triton Inference Server without an LLM backend (llm-d-router v0.10): queue and
            // executions only.
            "triton" => Self {
                engine: engine.to_owned(),
                queued: Some(spec("nv_inference_pending_request_count", &[])),
                running: Some(spec("nv_inference_exec_count", &[])),
                kv_usage: Vec::new(),
                lora: None,
                cache: None,
            },
            _ => return None,
        };
        Some(m)
    }

    /// Sample names to ask a server for (`name[]=`): the families, and `_total` for counters.
    pub fn sample_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in self.families() {
            out.push(f.to_owned());
            out.push(format!("{f}_total"));
        }
        out
    }

    /// Every family name this mapping reads.
    fn families(&self) -> Vec<&str> {
        let mut names: Vec<&str> = [&self.queued, &self.running, &self.lora]
            .into_iter()
            .flatten()
            .map(|s| s.name.as_str())
            .collect();
        match &self.cache {
            Some(CacheInfo::Labels { spec, .. }) => names.push(&spec.name),
            Some(CacheInfo::Gauges {
                block_size,
                num_blocks,
            }) => {
                for s in [block_size, num_blocks].into_iter().flatten() {
                    names.push(&s.name);
                }
            }
            None => {}
        }
        names.extend(self.kv_usage.iter().map(|s| s.name.as_str()));
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Extracts metrics from a `/metrics` page. `previous` supplies values for series that are
    /// absent (e.g. LoRA info on a server without LoRA). Returns `None` when not one
    /// configured series was found: the page is not from this engine, and the endpoint's
    /// figures should age rather than be replaced by zeros. Values are range-checked and
    /// series combined as [`super::figures`] says; every refused value is pushed to `refused`.
    pub fn extract(
        &self,
        text: &str,
        previous: &Metrics,
        now: Instant,
        refused: &mut Vec<Refused>,
    ) -> Option<Metrics> {
        let wanted = self.families();
        let samples: Vec<Sample<'_>> = wanted_lines(text, &wanted).filter_map(Sample::parse).collect();
        let mut found = false;
        let mut m = previous.clone();

        // The combined, checked figure of `spec`: `None` without a series; `Some(Err)` refused.
        let mut figure = |spec: &MetricSpec, check: Check, how: Combine| {
            let values = samples.iter().filter(|s| spec.matches(s)).map(|s| s.value);
            checked(values, check, how, || spec.name.clone(), refused)
        };
        let counts = |v| figures::count(v, f64::from(u32::MAX));
        if let Some(r) = self.queued.as_ref().and_then(|s| figure(s, counts, Combine::Sum)) {
            if let Ok(v) = r {
                m.waiting_queue = v as u32;
            }
            found = true;
        }
        if let Some(r) = self
            .running
            .as_ref()
            .and_then(|s| figure(s, counts, Combine::Sum))
        {
            if let Ok(v) = r {
                m.running = v as u32;
            }
            found = true;
        }
        // The first KV spec with a series (new name, then old).
        if let Some(r) = self
            .kv_usage
            .iter()
            .find_map(|s| figure(s, figures::fraction, Combine::Max))
        {
            m.kv_cache_usage = r.unwrap_or(1.0);
            found = true;
        }
        if let Some(lora) = self.lora.as_ref().and_then(|spec| lora_info(&samples, spec)) {
            m.lora = lora;
            found = true;
        }
        let blocks = |v| figures::count(v, u64::MAX as f64);
        match &self.cache {
            Some(CacheInfo::Labels {
                spec,
                block_size_label,
                num_blocks_label,
            }) => {
                let series: Vec<&Sample<'_>> = samples.iter().filter(|s| spec.matches(s)).collect();
                if !series.is_empty() {
                    let label = |s: &Sample<'_>, l: &str| {
                        s.label(l).map(|v| v.trim().parse::<f64>().unwrap_or(f64::NAN))
                    };
                    let mut one = |label_name: &str, check: Check, how| {
                        let values = series.iter().filter_map(|s| label(s, label_name));
                        checked(
                            values,
                            check,
                            how,
                            || format!("{}{{{label_name}}}", spec.name),
                            refused,
                        )
                    };
                    // Every engine of one server pages with one block size; blocks add up.
                    // A missing label leaves the figure unknown; a refused one keeps the previous.
                    match one(block_size_label, figures::block_size, Combine::Max) {
                        None => m.cache_block_size = None,
                        Some(Ok(v)) => m.cache_block_size = Some(v as u32),
                        Some(Err(_)) => {}
                    }
                    match one(num_blocks_label, blocks, Combine::Sum) {
                        None => m.cache_num_blocks = None,
                        Some(Ok(v)) => m.cache_num_blocks = Some(v as u64),
                        Some(Err(_)) => {}
                    }
                    found = true;
                }
            }
            Some(CacheInfo::Gauges {
                block_size,
                num_blocks,
            }) => {
                if let Some(r) = block_size
                    .as_ref()
                    .and_then(|s| figure(s, figures::block_size, Combine::Max))
                {
                    if let Ok(v) = r {
                        m.cache_block_size = Some(v as u32);
                    }
                    found = true;
                }
                if let Some(r) = num_blocks.as_ref().and_then(|s| figure(s, blocks, Combine::Sum)) {
                    if let Ok(v) = r {
                        m.cache_num_blocks = Some(v as u64);
                    }
                    found = true;
                }
            }
            None => {}
        }
        if !found {
            return None;
        }
        m.updated_at = Some(now);
        Some(m)
    }
}

/// A range check of [`super::figures`].
type Check = fn(f64) -> Result<f64, Rejection>;

/// One checked figure from `values`: `None` without any, `Some(Err)` when refused. Each refused
/// value is pushed to `refused` under the name `family` gives (built only then).
fn checked(
    values: impl IntoIterator<Item = f64>,
    check: Check,
    how: Combine,
    family: impl Fn() -> String,
    refused: &mut Vec<Refused>,
) -> Option<Result<f64, Rejection>> {
    figures::combine(values, check, how, |value, reason| {
        refused.push(Refused {
            family: family(),
            reason,
            value,
        })
    })
    .transpose()
}

/// A scraped value not taken (see [`super::figures`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The family (for label-carried figures, `family{label}`).
    pub family: String,
    /// Why.
    pub reason: Rejection,
    /// The value as scraped.
    pub value: f64,
}

/// The sample lines of wanted families (sample names may carry a `_total` suffix). Lines are
/// found with `memchr` and rejected on their first bytes, so the ~900 lines of a vLLM page
/// cost a few microseconds.
fn wanted_lines<'t>(text: &'t str, wanted: &'t [&'t str]) -> impl Iterator<Item = &'t str> + 't {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut ends = memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len()));
    std::iter::from_fn(move || {
        loop {
            let end = ends.next()?;
            let line = &bytes[start..end];
            let line_start = start;
            start = end + 1;
            if line.first().is_none_or(|b| *b == b'#') {
                continue;
            }
            let hit = wanted.iter().any(|w| {
                let w = w.as_bytes();
                // Cheap rejects before the comparison: the name's last byte and the byte after
                // it (families share long prefixes like `vllm:`).
                let (Some(last), Some(next)) = (
                    w.len().checked_sub(1).and_then(|i| line.get(i)),
                    line.get(w.len()),
                ) else {
                    return false;
                };
                w.last() == Some(last)
                    && matches!(next, b'{' | b' ' | b'\t' | b'_')
                    && line.starts_with(w)
                    && (*next != b'_' || line[w.len()..].starts_with(b"_total"))
            });
            if hit {
                // Line boundaries are ASCII, so the slice is valid UTF-8.
                return text.get(line_start..end);
            }
        }
    })
}

/// The name of a sample line (up to its labels or value).
fn name_of(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .position(|b| matches!(b, b'{' | b' ' | b'\t'))
        .unwrap_or(line.len());
    &line[..end]
}

/// The sample names of a page of the text exposition format, in order, comments and blank
/// lines skipped.
pub fn sample_names(page: &[u8]) -> impl Iterator<Item = &[u8]> {
    page.split(|b| *b == b'\n').filter_map(|line| {
        let line = line.trim_ascii();
        (!line.is_empty() && line[0] != b'#').then(|| name_of(line))
    })
}

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, Cow<'a, str>)>,
    value: f64,
}

impl<'a> Sample<'a> {
    /// Parses a sample line of the text exposition format; `None` if malformed. `NaN` and
    /// `±Inf` are read as such, for the range checks to refuse and count.
    fn parse(line: &'a str) -> Option<Self> {
        let line = line.trim();
        let name_end = name_of(line.as_bytes()).len();
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                // Skip separators, find `key="`.
                while chars.peek().is_some_and(|(_, c)| *c == ',' || c.is_whitespace()) {
                    chars.next();
                }
                let (start, c) = chars.next()?;
                if c == '}' {
                    rest = &body[start + 1..];
                    break;
                }
                let eq = body[start..].find('=')? + start;
                let key = body[start..eq].trim();
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next()?.1 != '"' {
                    return None;
                }
                let value_start = chars.peek()?.0;
                let mut owned: Option<String> = None;
                let value_end;
                loop {
                    let (i, c) = chars.next()?;
                    match c {
                        '"' => {
                            value_end = i;
                            break;
                        }
                        '\\' => {
                            let (_, esc) = chars.next()?;
                            let s = owned.get_or_insert_with(|| body[value_start..i].to_owned());
                            s.push(match esc {
                                'n' => '\n',
                                other => other,
                            });
                        }
                        c => {
                            if let Some(s) = owned.as_mut() {
                                s.push(c);
                            }
                        }
                    }
                }
                let value = match owned {
                    Some(s) => Cow::Owned(s),
                    None => Cow::Borrowed(&body[value_start..value_end]),
                };
                labels.push((key, value));
            }
        }
        let value_text = rest.split_whitespace().next()?;
        // `NaN` and `±Inf` are read (the range checks refuse and count them).
        let value = match value_text {
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse::<f64>().ok()?,
        };
        Some(Self { name, labels, value })
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_ref())
    }
}

fn adapters(s: Option<&str>) -> Vec<Arc<str>> {
    s.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(Arc::from)
        .collect()
}

/// The current LoRA state: the series with the largest value.
fn lora_info(samples: &[Sample<'_>], spec: &MetricSpec) -> Option<LoraInfo> {
    // NaN or infinite values (which the parser now reads) never make a series the latest.
    let latest = samples
        .iter()
        .filter(|s| spec.matches(s) && s.value.is_finite())
        .max_by(|a, b| a.value.total_cmp(&b.value))?;
    Some(LoraInfo {
        active: adapters(latest.label("running_lora_adapters")),
        waiting: adapters(latest.label("waiting_lora_adapters")),
        max_active: latest
            .label("max_lora")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    })
}

#[cfg(test)]
mod tests;
