//! The HTTP face of the simulator: vLLM's OpenAI routes, `/health`, `/metrics` and the admin
//! hooks, on axum. Handlers only translate between HTTP and the [`Engine`]; each inference
//! request's handler (or its response stream) drives the request's own [`Ticket`], so a client
//! that goes away aborts its request and nothing outlives the connection.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures_util::stream::{self, Stream, StreamExt};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh64::xxh64;

use super::admin::{self, MetricsMode, SimStats};
use super::cache::prompt_hashes;
use super::config::SimConfig;
use super::engine::{Engine, Job, SubmitError, Ticket};
use super::metrics::{self, Overrides};
use super::openai::{
    self, ApiError, ChatRequest, CompletionRequest, Envelope, PromptInput, SSE_DONE, Usage, json_response,
};

/// The header naming the instance that answered.
pub const SIM_ID_HEADER: &str = "x-vllm-sim-id";
/// Most prompts in one completion request.
pub const MAX_BATCH: usize = 1024;

/// One simulated vLLM server: configuration, engine and admin state.
#[derive(Debug)]
pub struct Simulator {
    config: SimConfig,
    engine: Arc<Engine>,
    /// The model's tokenizer and chat template, when the simulator tokenizes as vLLM does.
    prompts: Option<Arc<vllm_prompt::Model>>,
    id_header: HeaderValue,
    overrides: Mutex<Overrides>,
    mode: watch::Sender<MetricsMode>,
    next_id: AtomicU64,
    id_seed: u64,
    received: AtomicU64,
}

/// Cancelled when [`serve`]'s shutdown starts, so that stalled `/metrics` calls end.
#[derive(Debug, Clone)]
struct Closing(CancellationToken);

impl Simulator {
    /// A simulator for `config`; out-of-range values are clamped (see
    /// [`SimConfig::sanitized`]).
    pub fn new(config: SimConfig) -> Arc<Self> {
        Self::with_parts(config, None, None)
    }

    /// A simulator that tokenizes prompts with `prompts` (token counts, prefix blocks and KV
    /// events then follow the model's tokenizer) and publishes its cache's changes as vLLM's
    /// KV events through `events`.
    pub fn with_parts(
        config: SimConfig,
        prompts: Option<Arc<vllm_prompt::Model>>,
        events: Option<crate::kvevents::Publisher>,
    ) -> Arc<Self> {
        let config = config.sanitized();
        let engine = Engine::new(&config);
        let engine = Arc::new(match events {
            Some(p) => engine.with_events(p),
            None => engine,
        });
        let id_header =
            HeaderValue::from_str(&config.served_by).unwrap_or_else(|_| HeaderValue::from_static("vllm-sim"));
        let id_seed = xxh64(config.served_by.as_bytes(), engine.clock().start_unix().to_bits());
        Arc::new(Self {
            config,
            engine,
            prompts,
            id_header,
            overrides: Mutex::new(Overrides::default()),
            mode: watch::Sender::new(MetricsMode::Ok),
            next_id: AtomicU64::new(0),
            id_seed,
            received: AtomicU64::new(0),
        })
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// All routes, with the body limit and the `x-vllm-sim-id` header on every response.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .route("/health", get(|| async { StatusCode::OK }))
            .route("/version", get(version))
            .route("/metrics", get(metrics_page))
            .route("/metrics/", get(narrowed_metrics_page))
            .route(
                "/sim/overrides",
                put(admin::put_overrides).delete(admin::delete_overrides),
            )
            .route(
                "/sim/metrics-mode",
                put(admin::put_metrics_mode).get(admin::get_metrics_mode),
            )
            .route("/sim/stats", get(admin::get_stats))
            .route("/reset_prefix_cache", post(reset_prefix_cache))
            .route("/tokenize", post(tokenize))
            .route("/v1/chat/completions/render", post(render_chat))
            .route("/v1/completions/render", post(render_completion))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(self.config.max_body_bytes))
            .layer(axum::middleware::map_response_with_state(self.clone(), tag))
            .with_state(self.clone())
    }

    /// What the simulator did so far (real figures, never overridden).
    pub fn stats(&self) -> SimStats {
        let s = self.engine.snapshot();
        SimStats {
            id: self.config.served_by.clone(),
            model: self.config.model.clone(),
            requests_received: self.received.load(Ordering::Relaxed),
            requests_served: s.served,
            running: s.running,
            waiting: s.waiting,
            kv_cache_usage: s.kv_cache_usage,
            used_blocks: s.used_blocks,
            cached_blocks: s.cached_blocks,
            num_blocks: s.num_blocks,
            prefix_cache_queries: s.stats.prefix_queries,
            prefix_cache_hits: s.stats.prefix_hits,
            preemptions: s.stats.preemptions,
            generation_tokens: s.stats.generation_tokens,
            metrics_mode: self.metrics_mode(),
            metrics_calls_hanging: self.mode.receiver_count(),
            overrides: self.overrides(),
        }
    }

    /// The `/metrics` page as it would be served now (overrides applied).
    pub fn metrics_text(&self) -> String {
        let snap = self.engine.snapshot();
        metrics::render(
            &self.config,
            &snap,
            &self.overrides(),
            self.engine.clock().start_unix(),
        )
    }

    /// Replaces the reported-value overrides; `Overrides::default()` clears them.
    pub fn set_overrides(&self, overrides: Overrides) {
        *self.overrides.lock() = overrides;
    }

    /// The overrides in force.
    pub fn overrides(&self) -> Overrides {
        *self.overrides.lock()
    }

    /// Sets how `/metrics` answers; waiting `hang` calls resume at once.
    pub fn set_metrics_mode(&self, mode: MetricsMode) {
        self.mode.send_replace(mode);
    }

    /// How `/metrics` answers.
    pub fn metrics_mode(&self) -> MetricsMode {
        *self.mode.borrow()
    }

    fn envelope(&self, prefix: &str, model: String) -> Envelope {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Envelope {
            id: format!("{prefix}-{:016x}", xxh64(&n.to_le_bytes(), self.id_seed)),
            created: self.engine.clock().unix_now() as u64,
            model,
        }
    }

    /// The model a request names, and its LoRA adapter if it names one.
    fn resolve(&self, requested: Option<&str>) -> Result<(String, Option<Arc<str>>), ApiError> {
        match requested {
            None => Ok((self.config.model.clone(), None)),
            Some(m) if m == self.config.model => Ok((m.to_owned(), None)),
            Some(m) if self.config.lora_adapters.iter().any(|a| a == m) => {
                Ok((m.to_owned(), Some(Arc::from(m))))
            }
            Some(m) => Err(ApiError::unknown_model(m)),
        }
    }

    /// A job for one prompt: `prompt`'s bytes stand in for tokens unless the simulator
    /// tokenizes, in which case `tokens` are the prompt's ids.
    fn job(
        &self,
        lora: &Option<Arc<str>>,
        salt: Option<&str>,
        prompt: &[u8],
        tokens: Option<Vec<u32>>,
        max_tokens: u32,
    ) -> Result<Job, ApiError> {
        let count = match &tokens {
            Some(t) => t.len().max(1),
            None => prompt.len().div_ceil(self.config.bytes_per_token as usize).max(1),
        };
        let requested = count as u64 + u64::from(max_tokens);
        let max = self.config.max_model_len();
        if requested > max {
            return Err(ApiError::bad_request(format!(
                "This model's maximum context length is {max} tokens. However, you requested \
                 {requested} tokens ({count} in the messages, {max_tokens} in the completion). \
                 Please reduce the length of the messages or completion."
            )));
        }
        let hashes = match &tokens {
            // Blocks of token ids, hashed as the byte form of the ids.
            Some(t) => {
                let bytes: Vec<u8> = t.iter().flat_map(|id| id.to_le_bytes()).collect();
                prompt_hashes(
                    lora.as_deref(),
                    salt,
                    &bytes,
                    self.config.block_size as usize * 4,
                    self.config.kv_blocks as usize,
                )
            }
            None => prompt_hashes(
                lora.as_deref(),
                salt,
                prompt,
                self.config.block_bytes(),
                self.config.kv_blocks as usize,
            ),
        };
        Ok(Job {
            hashes,
            prompt_tokens: count as u32,
            max_tokens,
            lora: lora.clone(),
            tokens: tokens.map(Arc::from),
            salt: salt.map(Arc::from),
        })
    }

    /// Forgets every cached prefix (vLLM's `POST /reset_prefix_cache`, a dev-mode route);
    /// `false` while blocks are in use, as vLLM refuses it then, unless
    /// `reset_running_requests` preempts the running requests first.
    pub fn reset_prefix_cache(&self, reset_running_requests: bool) -> bool {
        self.engine.reset_prefix_cache(reset_running_requests)
    }

    /// Submits all jobs in order; on failure the ones already queued are aborted.
    fn submit_all(&self, jobs: Vec<Job>) -> Result<Vec<Ticket>, ApiError> {
        let mut tickets = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.engine.submit(job) {
                Ok(t) => tickets.push(t),
                Err(SubmitError::QueueFull) => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailableError",
                        "the waiting queue is full",
                    ));
                }
                Err(e @ SubmitError::TooLong { .. }) => return Err(ApiError::bad_request(e.to_string())),
            }
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        Ok(tickets)
    }
}

/// Serves `sim` on `listener` until `shutdown` completes, then stops accepting and waits for
/// in-flight requests (including streams) to finish. Stalled `/metrics` calls (mode `hang`)
/// are answered with 503 when shutdown starts, so they never hold it up.
pub async fn serve(
    listener: TcpListener,
    sim: Arc<Simulator>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let closing = CancellationToken::new();
    let app = sim.router().layer(Extension(Closing(closing.clone())));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            closing.cancel();
        })
        .await
}

async fn tag(State(sim): State<Arc<Simulator>>, mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(HeaderName::from_static(SIM_ID_HEADER), sim.id_header.clone());
    response
}

async fn reset_prefix_cache(
    State(sim): State<Arc<Simulator>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let running = query.as_deref().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "reset_running_requests=true" || kv == "reset_running_requests=True")
    });
    let ok = sim.reset_prefix_cache(running);
    json_response(StatusCode::OK, format!("{{\"success\":{ok}}}"))
}

/// The model's tokens for a request body, or 404 when the simulator does not tokenize (a
/// router then falls back as it would for a vLLM build without these routes).
fn token_ids(sim: &Simulator, body: &[u8], api: vllm_prompt::Api) -> Result<Vec<Vec<u32>>, Box<Response>> {
    let Some(model) = &sim.prompts else {
        return Err(Box::new(json_response(
            StatusCode::NOT_FOUND,
            r#"{"detail":"Not Found"}"#.to_owned(),
        )));
    };
    model
        .tokenize(body, api)
        .map(|p| p.prompts)
        .map_err(|e| Box::new(ApiError::bad_request(e.to_string()).into_response()))
}

/// vLLM's `POST /tokenize`: `messages` (chat) or `prompt` (completion) → `{count,
/// max_model_len, tokens, token_strs}`.
async fn tokenize(State(sim): State<Arc<Simulator>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e).into_response(),
    };
    let is_chat =
        serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v.get("messages").is_some());
    let api = if is_chat {
        vllm_prompt::Api::Chat
    } else {
        vllm_prompt::Api::Completions
    };
    match token_ids(&sim, &body, api) {
        Ok(mut p) => {
            let tokens = if p.is_empty() {
                Vec::new()
            } else {
                p.swap_remove(0)
            };
            let out = serde_json::json!({
                "count": tokens.len(),
                "max_model_len": sim.config.max_model_len(),
                "tokens": tokens,
                "token_strs": null,
            });
            json_response(StatusCode::OK, out.to_string())
        }
        Err(r) => *r,
    }
}

/// vLLM's `POST /v1/chat/completions/render`: the prompt's `token_ids` (no media here).
async fn render_chat(State(sim): State<Arc<Simulator>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e).into_response(),
    };
    match token_ids(&sim, &body, vllm_prompt::Api::Chat) {
        Ok(p) => json_response(
            StatusCode::OK,
            serde_json::json!({"token_ids": p.concat(), "features": null}).to_string(),
        ),
        Err(r) => *r,
    }
}

/// vLLM's `POST /v1/completions/render`: one `{token_ids}` per prompt.
async fn render_completion(
    State(sim): State<Arc<Simulator>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e).into_response(),
    };
    match token_ids(&sim, &body, vllm_prompt::Api::Completions) {
        Ok(p) => {
            let list: Vec<serde_json::Value> = p
                .into_iter()
                .map(|t| serde_json::json!({"token_ids": t}))
                .collect();
            json_response(StatusCode::OK, serde_json::Value::Array(list).to_string())
        }
        Err(r) => *r,
    }
}

async fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, r#"{"detail":"Not Found"}"#.to_owned())
}

async fn version() -> Response {
    json_response(StatusCode::OK, r#"{"version":"0.32.0"}"#.to_owned())
}

fn body_error(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "RequestEntityTooLargeError"
    } else {
        "BadRequestError"
    };
    ApiError::new(status, kind, rejection.body_text())
}

fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(body_error)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn output_tokens(requested: Option<i64>, default: u32) -> Result<u32, ApiError> {
    match requested {
        None => Ok(default),
        Some(n) if n < 1 => Err(ApiError::bad_request(format!(
            "max_tokens must be at least 1, got {n}."
        ))),
        Some(n) => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

fn sse_response(body: impl Stream<Item = String> + Send + 'static) -> Response {
    let body = Body::from_stream(body.map(|s| Ok::<_, Infallible>(Bytes::from(s))));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
        body,
    )
        .into_response()
}

/// One request's chunks: `render(index, last)` for each token it produces.
fn token_stream<F>(ticket: Ticket, max_tokens: u32, render: F) -> impl Stream<Item = String> + Send
where
    F: Fn(u32, bool) -> String + Send + 'static,
{
    stream::unfold(Some((ticket, render)), move |state| async move {
        let (mut ticket, render) = state?;
        let index = ticket.next_token().await?;
        let chunk = render(index, index + 1 >= max_tokens);
        Some((chunk, Some((ticket, render))))
    })
}

async fn collect(mut ticket: Ticket) -> String {
    let mut text = String::new();
    while let Some(i) = ticket.next_token().await {
        text.push_str(openai::token_text(i));
    }
    text
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Usage {
    Usage {
        prompt_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
        completion_tokens,
    }
}

async fn completions(
    State(sim): State<Arc<Simulator>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let (model, lora) = sim.resolve(req.model.as_deref())?;
    let specials = req.add_special_tokens.unwrap_or(true);
    let prompts = match req.prompt {
        PromptInput::One(p) => vec![p],
        PromptInput::Many(ps) => ps,
    };
    if prompts.is_empty() || prompts.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "prompt must be a string or a list of 1 to {MAX_BATCH} strings"
        )));
    }
    let max_tokens = output_tokens(req.max_tokens, sim.config.default_output_tokens)?;
    let jobs = prompts
        .iter()
        .map(|p| {
            let tokens = match &sim.prompts {
                Some(m) => Some(
                    m.tokenizer()
                        .encode(p, specials)
                        .map_err(|e| ApiError::bad_request(e.to_string()))?,
                ),
                None => None,
            };
            sim.job(&lora, req.cache_salt.as_deref(), p.as_bytes(), tokens, max_tokens)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prompt_tokens = jobs
        .iter()
        .map(|j| j.prompt_tokens)
        .fold(0u32, u32::saturating_add);
    let completion_tokens = max_tokens.saturating_mul(jobs.len() as u32);
    let usage = usage(prompt_tokens, completion_tokens);
    let tickets = sim.submit_all(jobs)?;
    let env = sim.envelope("cmpl", model);
    tracing::debug!(id = %env.id, prompts = tickets.len(), max_tokens, "completion");

    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let streams = tickets.into_iter().enumerate().map(|(i, t)| {
            let env = env.clone();
            token_stream(t, max_tokens, move |index, last| {
                openai::completion_token_chunk(&env, i as u32, openai::token_text(index), last)
            })
            .boxed()
        });
        let mut tail = Vec::with_capacity(2);
        if include_usage {
            tail.push(openai::usage_chunk(&env, false, usage));
        }
        tail.push(SSE_DONE.to_owned());
        return Ok(sse_response(
            stream::select_all(streams).chain(stream::iter(tail)),
        ));
    }
    let texts = futures_util::future::join_all(tickets.into_iter().map(collect)).await;
    Ok(json_response(
        StatusCode::OK,
        openai::completion_body(&env, &texts, usage),
    ))
}

async fn chat(
    State(sim): State<Arc<Simulator>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let req: ChatRequest = parse(Ok(body.clone()))?;
    let (model, lora) = sim.resolve(req.model.as_deref())?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let max_tokens = output_tokens(
        req.max_completion_tokens.or(req.max_tokens),
        sim.config.default_output_tokens,
    )?;
    let tokens = match &sim.prompts {
        // vLLM renders the chat template and tokenizes; a template error is a 400.
        Some(m) => Some(
            m.tokenize(&body, vllm_prompt::Api::Chat)
                .map_err(|e| ApiError::bad_request(e.to_string()))?
                .prompts
                .concat(),
        ),
        None => None,
    };
    let job = sim.job(
        &lora,
        req.cache_salt.as_deref(),
        &req.prompt_bytes(),
        tokens,
        max_tokens,
    )?;
    let usage = usage(job.prompt_tokens, max_tokens);
    let mut tickets = sim.submit_all(vec![job])?;
    let Some(ticket) = tickets.pop() else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "request was not queued",
        ));
    };
    let env = sim.envelope("chatcmpl", model);
    tracing::debug!(id = %env.id, max_tokens, "chat completion");

    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let chunk_env = env.clone();
        let tokens = token_stream(ticket, max_tokens, move |index, last| {
            let mut out = if index == 0 {
                openai::chat_role_chunk(&chunk_env)
            } else {
                String::new()
            };
            out.push_str(&openai::chat_token_chunk(
                &chunk_env,
                openai::token_text(index),
                last,
            ));
            out
        });
        let mut tail = Vec::with_capacity(2);
        if include_usage {
            tail.push(openai::usage_chunk(&env, true, usage));
        }
        tail.push(SSE_DONE.to_owned());
        return Ok(sse_response(tokens.chain(stream::iter(tail))));
    }
    let text = collect(ticket).await;
    Ok(json_response(
        StatusCode::OK,
        openai::chat_body(&env, &text, usage),
    ))
}

async fn models(State(sim): State<Arc<Simulator>>) -> Response {
    let created = sim.engine.clock().unix_now() as u64;
    let card = |id: &str, parent: Option<&str>, max_len: Option<u64>| {
        serde_json::json!({
            "id": id,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": id,
            "parent": parent,
            "max_model_len": max_len,
            "permission": [{
                "id": format!("modelperm-{:016x}", xxh64(id.as_bytes(), sim.id_seed)),
                "object": "model_permission",
                "created": created,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false,
            }],
        })
    };
    let mut data = vec![card(&sim.config.model, None, Some(sim.config.max_model_len()))];
    for a in &sim.config.lora_adapters {
        data.push(card(a, Some(&sim.config.model), None));
    }
    let body = serde_json::json!({ "object": "list", "data": data });
    json_response(StatusCode::OK, body.to_string())
}

fn metrics_ok(sim: &Simulator) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        sim.metrics_text(),
    )
        .into_response()
}

/// `/metrics/`, as vLLM serves it: the `prometheus_client` app vLLM mounts at the path with a
/// trailing slash honours `name[]=` and sends only those samples, while `/metrics` (the
/// instrumentator's route) ignores the filter. `# HELP`/`# TYPE` lines stay for the families
/// asked for by their own name or as `<family>_total` (a histogram's, asked for by its
/// sample names, lose them; the EPP reads only samples).
async fn narrowed_metrics_page(
    state: State<Arc<Simulator>>,
    closing: Option<Extension<Closing>>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let names: Vec<String> = query
        .into_iter()
        .filter(|(k, _)| k == "name[]")
        .map(|(_, v)| v)
        .collect();
    let page = metrics_page(state, closing).await;
    if names.is_empty() || page.status() != StatusCode::OK {
        return page;
    }
    let (parts, body) = page.into_parts();
    let Ok(text) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let text = String::from_utf8_lossy(&text);
    let asked = |name: &str| names.iter().any(|n| n == name);
    let kept: String = text
        .lines()
        .filter(|line| match line.strip_prefix("# ") {
            // `# HELP name …` / `# TYPE name …`: kept with the family's samples.
            Some(comment) => comment
                .split(' ')
                .nth(1)
                .is_some_and(|family| asked(family) || asked(&format!("{family}_total"))),
            None => asked(line.split(['{', ' ']).next().unwrap_or("")),
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    Response::from_parts(parts, Body::from(kept))
}

async fn metrics_page(State(sim): State<Arc<Simulator>>, closing: Option<Extension<Closing>>) -> Response {
    let closing = closing.map(|Extension(c)| c.0).unwrap_or_default();
    let unavailable = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "metrics are switched off by /sim/metrics-mode",
        )
        .into_response()
    };
    // Only hanging calls subscribe, so the receiver count is the number of hanging calls.
    let mut mode = match *sim.mode.borrow() {
        MetricsMode::Hang => sim.mode.subscribe(),
        MetricsMode::Ok => return metrics_ok(&sim),
        MetricsMode::Error => return unavailable(),
    };
    loop {
        let current = *mode.borrow_and_update();
        match current {
            MetricsMode::Ok => return metrics_ok(&sim),
            MetricsMode::Error => return unavailable(),
            MetricsMode::Hang => {
                tokio::select! {
                    changed = mode.changed() => {
                        if changed.is_err() {
                            return unavailable();
                        }
                    }
                    () = closing.cancelled() => return unavailable(),
                }
            }
        }
    }
}
