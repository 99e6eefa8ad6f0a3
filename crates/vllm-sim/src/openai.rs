//! The OpenAI-compatible wire shapes: what the simulator accepts and what it answers, field
//! for field in vLLM 0.32's order, so that clients, gateways and usage parsers see the same
//! bodies as from a real server. No behaviour lives here, only parsing and formatting.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// `system_fingerprint` of every answer.
pub const SYSTEM_FINGERPRINT: &str = "vllm-0.32.0-sim";

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage` and no choices.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// A completion's `prompt`: one string or a batch of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    One(String),
    /// A batch; each prompt becomes its own request and choice.
    Many(Vec<String>),
}

/// `POST /v1/completions` (the fields the simulator uses; others are ignored).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Base model or LoRA adapter; the base model when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt(s).
    pub prompt: PromptInput,
    /// Output tokens.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Separates prefix-cache entries between tenants, as in vLLM.
    #[serde(default)]
    pub cache_salt: Option<String>,
    /// Whether the tokenizer adds its special tokens (BOS); vLLM's default for completions
    /// is `true`. Only used when the simulator tokenizes.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

/// One content part of a chat message.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// `text` for text parts; other parts are ignored.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    #[serde(default)]
    pub text: Option<String>,
}

/// A chat message's `content`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Text or parts; absent or null for some assistant messages.
    #[serde(default)]
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions` (the fields the simulator uses; others are ignored).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Base model or LoRA adapter; the base model when absent.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Output tokens (legacy name).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Output tokens (preferred over `max_tokens`).
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Separates prefix-cache entries between tenants, as in vLLM.
    #[serde(default)]
    pub cache_salt: Option<String>,
}

impl ChatRequest {
    /// The text the simulator treats as the prompt: each message's role then its text.
    pub fn prompt_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for m in &self.messages {
            out.extend_from_slice(m.role.as_bytes());
            match &m.content {
                Some(Content::Text(t)) => out.extend_from_slice(t.as_bytes()),
                Some(Content::Parts(parts)) => {
                    for p in parts.iter().filter(|p| p.kind == "text") {
                        if let Some(t) = &p.text {
                            out.extend_from_slice(t.as_bytes());
                        }
                    }
                }
                None => {}
            }
        }
        out
    }
}

/// The deterministic text of output token `index`.
pub fn token_text(index: u32) -> &'static str {
    const WORDS: [&str; 8] = [
        " sim", "ulated", " tokens", " from", " a", " pretend", " model", ".",
    ];
    WORDS[index as usize % WORDS.len()]
}

/// The text of `n` output tokens.
pub fn filler(n: u32) -> String {
    (0..n).map(token_text).collect()
}

/// An OpenAI-style error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status (also the `code` field).
    pub status: StatusCode,
    /// `type`, e.g. `BadRequestError`.
    pub kind: &'static str,
    /// `message`.
    pub message: String,
    /// `param`.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// 400 `BadRequestError`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "BadRequestError",
            message: message.into(),
            param: None,
        }
    }

    /// 404 `NotFoundError` for an unknown model.
    pub fn unknown_model(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "NotFoundError",
            message: format!("The model `{model}` does not exist."),
            param: Some("model"),
        }
    }

    /// Any other status.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: u16,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        serde_json::to_string(&Outer {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.status.as_u16(),
            },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, self.body())
    }
}

/// A JSON answer with `status`.
pub fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt plus completion.
    pub total_tokens: u32,
    /// Output tokens.
    pub completion_tokens: u32,
}

#[derive(Serialize)]
struct FullUsage {
    #[serde(flatten)]
    usage: Usage,
    prompt_tokens_details: Option<()>,
    completion_tokens_details: Option<()>,
}

/// What every answer of one request shares.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model as requested (base or adapter).
    pub model: String,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
    token_ids: Option<()>,
    prompt_logprobs: Option<()>,
    prompt_token_ids: Option<()>,
    routed_experts: Option<()>,
}

#[derive(Serialize)]
struct CompletionBody<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    service_tier: Option<()>,
    system_fingerprint: &'static str,
    usage: FullUsage,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_logprobs: Option<Option<()>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<Option<()>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_text: Option<Option<()>>,
    kv_transfer_params: Option<()>,
    ec_transfer_params: Option<()>,
    metrics: Option<()>,
}

/// The body of a non-streamed completion with one choice per text.
pub fn completion_body(env: &Envelope, texts: &[String], usage: Usage) -> String {
    let choices = texts
        .iter()
        .enumerate()
        .map(|(i, text)| CompletionChoice {
            index: i as u32,
            text,
            logprobs: None,
            finish_reason: "length",
            stop_reason: None,
            token_ids: None,
            prompt_logprobs: None,
            prompt_token_ids: None,
            routed_experts: None,
        })
        .collect();
    serde_json::to_string(&CompletionBody {
        id: &env.id,
        object: "text_completion",
        created: env.created,
        model: &env.model,
        choices,
        service_tier: None,
        system_fingerprint: SYSTEM_FINGERPRINT,
        usage: full(usage),
        prompt_logprobs: None,
        prompt_token_ids: None,
        prompt_text: None,
        kv_transfer_params: None,
        ec_transfer_params: None,
        metrics: None,
    })
    .unwrap_or_default()
}

fn full(usage: Usage) -> FullUsage {
    FullUsage {
        usage,
        prompt_tokens_details: None,
        completion_tokens_details: None,
    }
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: Option<()>,
    audio: Option<()>,
    function_call: Option<()>,
    reasoning: Option<()>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: ChatMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
    token_ids: Option<()>,
    routed_experts: Option<()>,
}

/// The body of a non-streamed chat completion.
pub fn chat_body(env: &Envelope, text: &str, usage: Usage) -> String {
    serde_json::to_string(&CompletionBody {
        id: &env.id,
        object: "chat.completion",
        created: env.created,
        model: &env.model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessage {
                role: "assistant",
                content: text,
                refusal: None,
                annotations: None,
                audio: None,
                function_call: None,
                reasoning: None,
            },
            logprobs: None,
            finish_reason: "length",
            stop_reason: None,
            token_ids: None,
            routed_experts: None,
        }],
        service_tier: None,
        system_fingerprint: SYSTEM_FINGERPRINT,
        usage: full(usage),
        prompt_logprobs: Some(None),
        prompt_token_ids: Some(None),
        prompt_text: Some(None),
        kv_transfer_params: None,
        ec_transfer_params: None,
        metrics: None,
    })
    .unwrap_or_default()
}

fn sse(json: &str) -> String {
    format!("data: {json}\n\n")
}

/// The stream terminator.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<Option<()>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_text: Option<Option<()>>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

#[derive(Serialize)]
struct ChatDeltaChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<Option<()>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<Option<()>>,
}

/// The first chat chunk: the assistant role with empty content.
pub fn chat_role_chunk(env: &Envelope) -> String {
    let c = Chunk {
        id: &env.id,
        object: "chat.completion.chunk",
        created: env.created,
        model: &env.model,
        choices: vec![ChatDeltaChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: "",
            },
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
            token_ids: None,
        }],
        usage: None,
        system_fingerprint: None,
        prompt_token_ids: Some(None),
        prompt_text: Some(None),
    };
    sse(&serde_json::to_string(&c).unwrap_or_default())
}

/// A chat chunk with one token; the last one carries `finish_reason`.
pub fn chat_token_chunk(env: &Envelope, text: &str, last: bool) -> String {
    let c = Chunk {
        id: &env.id,
        object: "chat.completion.chunk",
        created: env.created,
        model: &env.model,
        choices: vec![ChatDeltaChoice {
            index: 0,
            delta: Delta {
                role: None,
                content: text,
            },
            logprobs: None,
            finish_reason: last.then_some("length"),
            stop_reason: last.then_some(None),
            token_ids: Some(None),
        }],
        usage: None,
        system_fingerprint: None,
        prompt_token_ids: None,
        prompt_text: None,
    };
    sse(&serde_json::to_string(&c).unwrap_or_default())
}

#[derive(Serialize)]
struct CompletionDeltaChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    stop_reason: Option<()>,
}

/// A completion chunk with one token of choice `index`.
pub fn completion_token_chunk(env: &Envelope, index: u32, text: &str, last: bool) -> String {
    let c = Chunk {
        id: &env.id,
        object: "text_completion",
        created: env.created,
        model: &env.model,
        choices: vec![CompletionDeltaChoice {
            index,
            text,
            logprobs: None,
            finish_reason: last.then_some("length"),
            stop_reason: None,
        }],
        usage: None,
        system_fingerprint: None,
        prompt_token_ids: None,
        prompt_text: None,
    };
    sse(&serde_json::to_string(&c).unwrap_or_default())
}

/// The final `stream_options.include_usage` chunk: no choices, only usage.
pub fn usage_chunk(env: &Envelope, chat: bool, usage: Usage) -> String {
    let c: Chunk<'_, ()> = Chunk {
        id: &env.id,
        object: if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        },
        created: env.created,
        model: &env.model,
        choices: Vec::new(),
        usage: Some(usage),
        system_fingerprint: Some(SYSTEM_FINGERPRINT),
        prompt_token_ids: None,
        prompt_text: None,
    };
    sse(&serde_json::to_string(&c).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn env() -> Envelope {
        Envelope {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "tiny".into(),
        }
    }

    const USAGE: Usage = Usage {
        prompt_tokens: 3,
        total_tokens: 5,
        completion_tokens: 2,
    };

    #[test]
    fn chat_prompt_is_roles_and_text_parts() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{}},{"type":"text","text":"!"}]},
                {"role":"assistant","content":null}]}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_bytes(), b"systembe briefuserhi!assistant");
    }

    #[test]
    fn bodies_have_vllm_shapes() {
        let chat: Value = serde_json::from_str(&chat_body(&env(), "hello", USAGE)).unwrap();
        assert_eq!(chat["object"], "chat.completion");
        assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
        assert_eq!(chat["choices"][0]["finish_reason"], "length");
        assert_eq!(chat["usage"]["total_tokens"], 5);
        assert!(chat["usage"]["prompt_tokens_details"].is_null());
        let texts = ["a".to_owned(), "b".to_owned()];
        let cmpl: Value = serde_json::from_str(&completion_body(&env(), &texts, USAGE)).unwrap();
        assert_eq!(cmpl["object"], "text_completion");
        assert_eq!(cmpl["choices"][1]["index"], 1);
        assert_eq!(cmpl["choices"][1]["text"], "b");
        assert!(cmpl.get("prompt_text").is_none());
        let err: Value = serde_json::from_str(&ApiError::unknown_model("x").body()).unwrap();
        assert_eq!(err["error"]["code"], 404);
        assert_eq!(err["error"]["param"], "model");
        assert_eq!(err["error"]["type"], "NotFoundError");
    }

    #[test]
    fn stream_chunks_are_sse_events() {
        let role = chat_role_chunk(&env());
        assert!(role.starts_with("data: {") && role.ends_with("}\n\n"));
        assert!(role.contains(r#""delta":{"role":"assistant","content":""}"#));
        let last = chat_token_chunk(&env(), "x", true);
        assert!(last.contains(r#""finish_reason":"length","stop_reason":null"#));
        let usage = usage_chunk(&env(), true, USAGE);
        let v: Value = serde_json::from_str(usage.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(v["choices"], Value::Array(vec![]));
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert_eq!(filler(3), " simulated tokens");
    }
}
