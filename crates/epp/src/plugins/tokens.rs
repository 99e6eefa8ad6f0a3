//! `token-producer`: the request's prompt as token ids, for the precise prefix-cache producer
//! (llm-d-router v0.10's plugin of that name, with a backend of ours).
//!
//! Backends (exactly one):
//! * `local: {path: <dir>}` (ours): the model's `tokenizer.json`, `tokenizer_config.json` and
//!   `chat_template.jinja` loaded in process ([`vllm_prompt::Model`]), rendered and encoded as
//!   vLLM does. Encoded segments are cached (`cacheBytes`, 64 MiB): system prompts and
//!   earlier turns are encoded once. A prompt with more than 8 KiB of text not in the cache is
//!   encoded on a blocking thread (at most two at a time per core; the request waits, as for
//!   dispatch), so long prompts never hold an async worker.
//! * `modelName` with `vllm: {url, timeout, mmTimeout}` (v0.10): vLLM's
//!   `/v1/chat/completions/render` and `/v1/completions/render`, e.g. a GPU-less
//!   `vllm launch render` sidecar. The request waits for the call (`timeout` 5s, `mmTimeout`
//!   30s when a message has content parts).
//!
//! When tokenization fails (a template error, a render call that times out) nothing is
//! written: the precise producer then finds no match, and the request is still routed.
//! v0.10's `estimate` backend (4 bytes a pseudo-token) is refused: its ids never match an
//! engine's, so precise routing would silently never hit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quick_cache::sync::Cache;
use serde::Deserialize;
use tokio::sync::Semaphore;
use vllm_prompt::{Api, Model};

use crate::config::cli::go_duration;
use crate::framework::attributes::{MediaSpan, TokenizedPrompt};
use crate::framework::data::{CycleState, DataKey};
use crate::framework::requestcontrol::{DataProducer, Wait};
use crate::framework::scheduling::{Candidate, SchedulingRequest};
use crate::request::ApiKind;

/// Text not in the segment cache that is still encoded on the request's own thread.
pub const INLINE_BYTES: usize = 8 << 10;
/// Token ids of waited-for work kept until their requests are scheduled, in bytes (a request
/// that never comes back, its client gone, gives way to newer ones).
const STASH_BYTES: u64 = 64 << 20;

#[derive(Clone)]
struct PromptWeight;

impl quick_cache::Weighter<u128, Arc<TokenizedPrompt>> for PromptWeight {
    fn weight(&self, _key: &u128, p: &Arc<TokenizedPrompt>) -> u64 {
        p.prompts.iter().map(|t| t.len() as u64 * 4).sum::<u64>() + 64
    }
}
/// Largest render answer read.
const MAX_RENDER_BYTES: usize = 64 << 20;

/// The parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenParams {
    /// The model to ask the vLLM render backend for.
    pub model_name: Option<String>,
    /// The vLLM render backend.
    pub vllm: Option<VllmParams>,
    /// The in-process backend.
    pub local: Option<LocalParams>,
    /// v0.10's estimating backend (refused).
    pub estimate: Option<serde_yaml::Value>,
    /// v0.10's deprecated tokenizer sidecar (refused).
    pub uds_tokenizer_config: Option<serde_yaml::Value>,
}

/// `vllm`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VllmParams {
    /// Base URL (`http://localhost:8000`).
    pub url: Option<String>,
    /// Limit on a text request (`5s`).
    pub timeout: Option<String>,
    /// Limit on a request with content parts (`30s`).
    pub mm_timeout: Option<String>,
}

/// `local`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalParams {
    /// Directory with `tokenizer.json` (and `tokenizer_config.json`, `chat_template.jinja`).
    pub path: String,
    /// Bytes of encoded segments cached (64 MiB).
    pub cache_bytes: Option<u64>,
}

enum Backend {
    Local {
        model: Arc<Model>,
        slots: Arc<Semaphore>,
    },
    Vllm {
        client: reqwest::Client,
        base: String,
        model: String,
        timeout: Duration,
        mm_timeout: Duration,
    },
}

/// See the module docs.
pub struct TokenProducer {
    backend: Backend,
    key: DataKey<TokenizedPrompt>,
    stash: Arc<Cache<u128, Arc<TokenizedPrompt>, PromptWeight>>,
}

impl std::fmt::Debug for TokenProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.backend {
            Backend::Local { .. } => "TokenProducer(local)",
            Backend::Vllm { .. } => "TokenProducer(vllm)",
        })
    }
}

fn api(kind: ApiKind) -> Option<Api> {
    match kind {
        ApiKind::ChatCompletions => Some(Api::Chat),
        ApiKind::Completions => Some(Api::Completions),
        _ => None,
    }
}

/// Identifies a request's work in the stash: its id and body (ids may repeat).
fn stash_key(req: &SchedulingRequest<'_>) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(req.request_id.as_bytes());
    h.update(&[0]);
    h.update(req.body);
    h.digest128()
}

impl TokenProducer {
    /// A producer named `name` with `params`; loads the local model now (a missing or bad
    /// directory stops the EPP at start-up).
    pub fn new(name: &str, params: &TokenParams) -> Result<Self, String> {
        if params.estimate.is_some() {
            return Err("the estimate backend gives pseudo-tokens that never match an engine's KV events; use local (the model's tokenizer files) or vllm (a render endpoint)".into());
        }
        if params.uds_tokenizer_config.is_some() {
            return Err(
                "udsTokenizerConfig (a tokenizer sidecar) is not supported; use local (in process) or vllm"
                    .into(),
            );
        }
        let backend = match (&params.local, &params.model_name, &params.vllm) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err("set either local or modelName/vllm, not both".into());
            }
            (Some(local), None, None) => {
                let dir = PathBuf::from(&local.path);
                let model = Model::load(
                    &dir,
                    local.cache_bytes.unwrap_or(vllm_prompt::DEFAULT_CACHE_BYTES),
                )
                .map_err(|e| format!("local.path {}: {e}", dir.display()))?;
                if model.content_format().is_none() {
                    tracing::warn!(path = %dir.display(), "the model has no chat template: chat requests get no tokens");
                }
                let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                Backend::Local {
                    model: Arc::new(model),
                    slots: Arc::new(Semaphore::new(cores * 2)),
                }
            }
            (None, None, _) => {
                return Err(
                    "needs a backend: local: {path: <model directory>} or modelName with vllm: {url}".into(),
                );
            }
            (None, Some(model), vllm) => {
                let v = vllm.clone().unwrap_or_default();
                let base = v.url.unwrap_or_else(|| "http://localhost:8000".into());
                let base = base.trim_end_matches('/').to_owned();
                if !base.starts_with("http://") {
                    return Err(format!(
                        "vllm.url {base:?} must be http://host:port (TLS is not supported, as in v0.10)"
                    ));
                }
                let dur = |name: &str, v: Option<String>, default: u64| -> Result<Duration, String> {
                    match v {
                        None => Ok(Duration::from_secs(default)),
                        Some(s) => go_duration(&s)
                            .ok()
                            .filter(|d| !d.is_zero())
                            .ok_or_else(|| format!("vllm.{name}: {s:?} is not a positive duration")),
                    }
                };
                let _ = rustls::crypto::ring::default_provider().install_default();
                let client = reqwest::Client::builder()
                    .http1_only()
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
                Backend::Vllm {
                    client,
                    base,
                    model: model.clone(),
                    timeout: dur("timeout", v.timeout, 5)?,
                    mm_timeout: dur("mmTimeout", v.mm_timeout, 30)?,
                }
            }
        };
        Ok(Self {
            backend,
            key: DataKey::named(name),
            stash: Arc::new(Cache::with_weighter(4096, STASH_BYTES, PromptWeight)),
        })
    }

    /// The key it writes.
    pub fn key(&self) -> DataKey<TokenizedPrompt> {
        self.key
    }

    /// The local model, when the backend is local.
    pub fn model(&self) -> Option<&Arc<Model>> {
        match &self.backend {
            Backend::Local { model, .. } => Some(model),
            Backend::Vllm { .. } => None,
        }
    }
}

fn convert(p: vllm_prompt::Prompt) -> TokenizedPrompt {
    TokenizedPrompt {
        prompts: p.prompts,
        has_media: p.has_media,
        media: Vec::new(),
    }
}

/// A render answer's media items: `mm_hashes` and `mm_placeholders` per modality, paired in
/// order, sorted by offset.
fn media_items(features: Option<&serde_json::Value>) -> Vec<MediaSpan> {
    let Some(f) = features else {
        return Vec::new();
    };
    let (Some(hashes), Some(places)) = (
        f.get("mm_hashes").and_then(serde_json::Value::as_object),
        f.get("mm_placeholders").and_then(serde_json::Value::as_object),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (modality, list) in hashes {
        let (Some(list), Some(pos)) = (
            list.as_array(),
            places.get(modality).and_then(serde_json::Value::as_array),
        ) else {
            continue;
        };
        for (h, p) in list.iter().zip(pos) {
            let (Some(h), Some(offset), Some(length)) = (
                h.as_str(),
                p.get("offset").and_then(serde_json::Value::as_u64),
                p.get("length").and_then(serde_json::Value::as_u64),
            ) else {
                continue;
            };
            out.push(MediaSpan {
                identifier: h.to_owned(),
                offset: offset as usize,
                length: length as usize,
            });
        }
    }
    out.sort_by_key(|m| m.offset);
    out
}

impl DataProducer for TokenProducer {
    fn prefetch(&self, req: &SchedulingRequest<'_>) -> Option<Wait> {
        let api = api(req.api)?;
        match &self.backend {
            Backend::Local { model, slots } => {
                if req.body.len() <= INLINE_BYTES {
                    return None;
                }
                let texts = model.texts(req.body, api).ok()?;
                if model.uncached_bytes(&texts) <= INLINE_BYTES {
                    return None;
                }
                let handle = tokio::runtime::Handle::try_current().ok()?;
                let (model, slots, stash, key) =
                    (model.clone(), slots.clone(), self.stash.clone(), stash_key(req));
                Some(Box::pin(async move {
                    let Ok(_slot) = slots.acquire_owned().await else {
                        return Ok(());
                    };
                    let done = handle
                        .spawn_blocking(move || {
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.encode(&texts)))
                        })
                        .await;
                    if let Ok(Ok(Ok(prompt))) = done {
                        stash.insert(key, Arc::new(convert(prompt)));
                    }
                    Ok(())
                }))
            }
            Backend::Vllm {
                client,
                base,
                model,
                timeout,
                mm_timeout,
            } => {
                let mut body: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(req.body).ok()?;
                let media = body
                    .get("messages")
                    .and_then(serde_json::Value::as_array)
                    .is_some_and(|m| {
                        m.iter()
                            .any(|m| m.get("content").is_some_and(serde_json::Value::is_array))
                    });
                body.insert("model".into(), serde_json::Value::from(model.as_str()));
                let path = match api {
                    Api::Chat => "/v1/chat/completions/render",
                    Api::Completions => "/v1/completions/render",
                };
                let request = client
                    .post(format!("{base}{path}"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .timeout(if media { *mm_timeout } else { *timeout })
                    .body(serde_json::to_vec(&body).ok()?);
                let (stash, key) = (self.stash.clone(), stash_key(req));
                Some(Box::pin(async move {
                    match render(request, api).await {
                        Ok(p) => {
                            stash.insert(key, Arc::new(p));
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "vLLM render failed; no tokens for this request")
                        }
                    }
                    Ok(())
                }))
            }
        }
    }

    fn prepare(&self, req: &SchedulingRequest<'_>, _candidates: &[Candidate<'_>], state: &mut CycleState) {
        if let Some((_, found)) = self.stash.remove(&stash_key(req)) {
            state.put(self.key, Arc::unwrap_or_clone(found));
            return;
        }
        let (Backend::Local { model, .. }, Some(api)) = (&self.backend, api(req.api)) else {
            return;
        };
        let tokenized =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.tokenize(req.body, api)));
        match tokenized {
            Ok(Ok(p)) => state.put(self.key, convert(p)),
            Ok(Err(e)) => tracing::debug!(error = %e, "no tokens for this request"),
            Err(_) => tracing::warn!("the tokenizer panicked on a request; no tokens for it"),
        }
    }
}

/// Calls a render endpoint and reads its token ids.
async fn render(request: reqwest::RequestBuilder, api: Api) -> Result<TokenizedPrompt, String> {
    let mut resp = request.send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_RENDER_BYTES {
            return Err("render answer too large".into());
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
        return Err(format!("vLLM render returned status {}: {text}", status.as_u16()));
    }
    #[derive(Deserialize)]
    struct Rendered {
        token_ids: Vec<u32>,
        #[serde(default)]
        features: Option<serde_json::Value>,
    }
    match api {
        Api::Chat => {
            let r: Rendered = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            Ok(TokenizedPrompt {
                has_media: false,
                media: media_items(r.features.as_ref()),
                prompts: vec![r.token_ids],
            })
        }
        Api::Completions => {
            let list: Vec<Rendered> = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            Ok(TokenizedPrompt {
                has_media: false,
                media: Vec::new(),
                prompts: list.into_iter().map(|r| r.token_ids).collect(),
            })
        }
    }
}

#[cfg(test)]
mod tests;
