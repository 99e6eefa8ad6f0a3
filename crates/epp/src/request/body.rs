//! OpenAI-style request bodies: completions, chat, responses, conversations, embeddings.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::RequestError;

/// Which API a request targets; decides which field carries the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `/v1/completions`: `prompt`.
    Completions,
    /// `/v1/chat/completions`: `messages`.
    ChatCompletions,
    /// `/v1/responses`: `input`.
    Responses,
    /// `/v1/conversations`: `items`.
    Conversations,
    /// `/v1/embeddings`: `input`.
    Embeddings,
}

impl ApiKind {
    /// The API named by the path's suffix (query string ignored), if any.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let path = path.trim_end_matches('/');
        // Longest suffix first: "/chat/completions" also ends with "/completions".
        if path.ends_with("/chat/completions") {
            Some(Self::ChatCompletions)
        } else if path.ends_with("/completions") {
            Some(Self::Completions)
        } else if path.ends_with("/responses") {
            Some(Self::Responses)
        } else if path.ends_with("/conversations") {
            Some(Self::Conversations)
        } else if path.ends_with("/embeddings") {
            Some(Self::Embeddings)
        } else {
            None
        }
    }

    /// The body field that carries the prompt.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Self::Completions => "prompt",
            Self::ChatCompletions => "messages",
            Self::Responses | Self::Embeddings => "input",
            Self::Conversations => "items",
        }
    }
}

/// A parsed request body, borrowing from the body bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedBody<'a> {
    /// The API, from the path or, failing that, from the body's fields.
    pub api: ApiKind,
    /// The body's `model`.
    pub model: Cow<'a, str>,
    /// Byte range of the `model` JSON string (quotes included) in the body, for splicing.
    pub model_span: Range<usize>,
    /// The bytes the prefix index hashes: the prompt text for a plain string prompt, else the
    /// raw JSON of the prompt-carrying field (for chat, the whole `messages` array).
    pub prefix_input: Cow<'a, [u8]>,
    /// `cache_salt`, which separates tenants' cache entries.
    pub cache_salt: Option<Cow<'a, str>>,
    /// `stream: true`.
    pub stream: bool,
    /// The client's cap on generated tokens: `max_completion_tokens`, else `max_tokens` (chat),
    /// `max_tokens` (completions), `max_output_tokens` (responses); a value that is not a
    /// whole number ≥ 0 counts as absent (llm-d-router v0.10's openai parser).
    pub max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    items: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cache_salt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
}

/// A JSON number that is a whole number ≥ 0 (`16`, `16.0`), else `None`.
fn whole(raw: Option<&RawValue>) -> Option<u64> {
    let f: f64 = serde_json::from_str(raw?.get()).ok()?;
    (f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64).then_some(f as u64)
}

/// A JSON string value, borrowed when it has no escapes.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if let Ok(s) = serde_json::from_str::<&str>(text) {
        return Some(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

/// Offset of `inner` inside `outer`, when `inner` is a sub-slice of it.
fn span_in(outer: &[u8], inner: &str) -> Option<Range<usize>> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    let end = start.checked_add(inner.len())?;
    (end <= outer.len() && outer.get(start..end) == Some(inner.as_bytes())).then_some(start..end)
}

/// The prompt-carrying field, validated: a non-empty string, or a non-empty array (or, for
/// responses/embeddings input, any non-null value).
fn prompt_input<'a>(raw: Option<&'a RawValue>, api: ApiKind) -> Result<Cow<'a, [u8]>, RequestError> {
    let missing = RequestError::PromptMissing {
        field: api.prompt_field(),
    };
    let raw = raw.ok_or(missing.clone())?;
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => {
            let s = json_str(raw).ok_or(missing.clone())?;
            if s.is_empty() {
                return Err(missing);
            }
            Ok(match s {
                Cow::Borrowed(b) => Cow::Borrowed(b.as_bytes()),
                Cow::Owned(o) => Cow::Owned(o.into_bytes()),
            })
        }
        Some(b'[') => {
            // The document is already validated JSON: one look past `[` tells an empty array
            // and, for chat, whether messages are objects, without a second full pass.
            let first = text[1..].trim_start().as_bytes().first().copied();
            match first {
                Some(b']') | None => Err(missing),
                Some(b'{') => Ok(Cow::Borrowed(text.as_bytes())),
                Some(_) if api == ApiKind::ChatCompletions => Err(missing),
                Some(_) => Ok(Cow::Borrowed(text.as_bytes())),
            }
        }
        Some(b'{') if matches!(api, ApiKind::Responses | ApiKind::Embeddings) => {
            Ok(Cow::Borrowed(text.as_bytes()))
        }
        _ => Err(missing),
    }
}

/// Parses a request body. `path` (from `:path` or its fallbacks) selects the API; for an
/// unknown path the API is inferred from which field is present.
pub fn parse_body<'a>(body: &'a [u8], path: Option<&str>) -> Result<ParsedBody<'a>, RequestError> {
    // A derived struct would also accept a JSON array positionally; only objects are requests.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(RequestError::InvalidJson);
    }
    let fields: Fields<'a> = serde_json::from_slice(body).map_err(|_| RequestError::InvalidJson)?;

    let model_raw = fields.model.ok_or(RequestError::ModelMissing)?;
    let model = json_str(model_raw).ok_or(RequestError::ModelMissing)?;
    if model.is_empty() {
        return Err(RequestError::ModelMissing);
    }
    let model_span = span_in(body, model_raw.get()).ok_or(RequestError::InvalidJson)?;

    let api = path
        .and_then(ApiKind::from_path)
        .unwrap_or(if fields.messages.is_some() {
            ApiKind::ChatCompletions
        } else if fields.input.is_some() {
            ApiKind::Responses
        } else if fields.items.is_some() {
            ApiKind::Conversations
        } else {
            ApiKind::Completions
        });
    let prompt_raw = match api {
        ApiKind::Completions => fields.prompt,
        ApiKind::ChatCompletions => fields.messages,
        ApiKind::Responses | ApiKind::Embeddings => fields.input,
        ApiKind::Conversations => fields.items,
    };
    let prefix_input = prompt_input(prompt_raw, api)?;
    let max_output_tokens = match api {
        ApiKind::ChatCompletions => whole(fields.max_completion_tokens).or_else(|| whole(fields.max_tokens)),
        ApiKind::Completions => whole(fields.max_tokens),
        ApiKind::Responses => whole(fields.max_output_tokens),
        ApiKind::Embeddings | ApiKind::Conversations => None,
    };

    Ok(ParsedBody {
        api,
        model,
        model_span,
        prefix_input,
        cache_salt: fields.cache_salt.and_then(json_str),
        stream: fields.stream.is_some_and(|s| s.get() == "true"),
        max_output_tokens,
    })
}

/// `body` with the JSON string at `span` replaced by `model`: every other byte is kept, so the
/// model server sees the client's body except for the model name.
pub fn rewrite_model(body: &[u8], span: Range<usize>, model: &str) -> Vec<u8> {
    let quoted = serde_json::Value::String(model.to_owned()).to_string();
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(body.get(..span.start).unwrap_or_default());
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(body.get(span.end..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<'a>(body: &'a str, path: Option<&str>) -> Result<ParsedBody<'a>, RequestError> {
        parse_body(body.as_bytes(), path)
    }

    #[test]
    fn completions_string_prompt_is_borrowed() {
        let p = parse(
            r#"{"model":"m","prompt":"hello","stream":true}"#,
            Some("/v1/completions"),
        )
        .unwrap();
        assert_eq!(p.api, ApiKind::Completions);
        assert_eq!(p.model, "m");
        assert!(matches!(p.model, Cow::Borrowed(_)));
        assert!(matches!(p.prefix_input, Cow::Borrowed(b"hello")));
        assert!(p.stream);
    }

    #[test]
    fn the_output_cap_follows_the_api() {
        let cap = |body: &str, path: &str| parse(body, Some(path)).unwrap().max_output_tokens;
        let chat = "/v1/chat/completions";
        let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
        assert_eq!(
            cap(&format!(r#"{{"model":"m",{msgs},"max_tokens":7}}"#), chat),
            Some(7)
        );
        assert_eq!(
            cap(
                &format!(r#"{{"model":"m",{msgs},"max_tokens":7,"max_completion_tokens":9}}"#),
                chat
            ),
            Some(9)
        );
        // Malformed values are skipped, not errors.
        assert_eq!(
            cap(
                &format!(r#"{{"model":"m",{msgs},"max_completion_tokens":-1,"max_tokens":3.0}}"#),
                chat
            ),
            Some(3)
        );
        assert_eq!(
            cap(
                r#"{"model":"m","prompt":"x","max_tokens":"5"}"#,
                "/v1/completions"
            ),
            None
        );
        assert_eq!(
            cap(r#"{"model":"m","prompt":"x","max_tokens":0}"#, "/v1/completions"),
            Some(0)
        );
        assert_eq!(
            cap(
                r#"{"model":"m","input":"x","max_output_tokens":12}"#,
                "/v1/responses"
            ),
            Some(12)
        );
        assert_eq!(
            cap(r#"{"model":"m","input":"x","max_tokens":12}"#, "/v1/responses"),
            None
        );
    }

    #[test]
    fn escaped_prompt_is_unescaped() {
        let p = parse(r#"{"model":"m","prompt":"a\nb"}"#, None).unwrap();
        assert_eq!(&*p.prefix_input, b"a\nb");
    }

    #[test]
    fn list_prompt_and_chat_use_raw_json() {
        let p = parse(r#"{"model":"m","prompt":["a","b"]}"#, Some("/v1/completions")).unwrap();
        assert_eq!(&*p.prefix_input, br#"["a","b"]"#);
        let body = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
        let p = parse(body, Some("/v1/chat/completions")).unwrap();
        assert_eq!(p.api, ApiKind::ChatCompletions);
        assert!(
            std::str::from_utf8(&p.prefix_input)
                .unwrap()
                .starts_with("[{\"role\"")
        );
    }

    #[test]
    fn api_from_path_or_body() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions?x=1"),
            Some(ApiKind::ChatCompletions)
        );
        assert_eq!(ApiKind::from_path("/v1/embeddings"), Some(ApiKind::Embeddings));
        assert_eq!(ApiKind::from_path("/v1/responses/"), Some(ApiKind::Responses));
        assert_eq!(ApiKind::from_path("/generate"), None);
        let p = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            Some("/x"),
        )
        .unwrap();
        assert_eq!(p.api, ApiKind::ChatCompletions);
        let p = parse(r#"{"model":"m","input":"text"}"#, Some("/v1/embeddings")).unwrap();
        assert_eq!(p.api, ApiKind::Embeddings);
        assert_eq!(&*p.prefix_input, b"text");
    }

    #[test]
    fn malformed_bodies_are_rejected_with_reasons() {
        assert_eq!(parse("{not json", None), Err(RequestError::InvalidJson));
        assert_eq!(parse(r#"["m","p"]"#, None), Err(RequestError::InvalidJson));
        assert_eq!(
            parse(r#"{"model":"m","prompt":"x"} trailing"#, None),
            Err(RequestError::InvalidJson)
        );
        assert_eq!(parse(r#"{"prompt":"x"}"#, None), Err(RequestError::ModelMissing));
        assert_eq!(
            parse(r#"{"model":5,"prompt":"x"}"#, None),
            Err(RequestError::ModelMissing)
        );
        assert_eq!(
            parse(r#"{"model":"m"}"#, Some("/v1/completions")),
            Err(RequestError::PromptMissing { field: "prompt" })
        );
        assert_eq!(
            parse(r#"{"model":"m","prompt":""}"#, None),
            Err(RequestError::PromptMissing { field: "prompt" })
        );
        assert_eq!(
            parse(r#"{"model":"m","messages":[]}"#, Some("/v1/chat/completions")),
            Err(RequestError::PromptMissing { field: "messages" })
        );
        assert_eq!(
            parse(r#"{"model":"m","messages":["x"]}"#, Some("/v1/chat/completions")),
            Err(RequestError::PromptMissing { field: "messages" })
        );
        assert_eq!(
            parse(r#"{"model":"m","model":"n","prompt":"x"}"#, None),
            Err(RequestError::InvalidJson)
        );
    }

    #[test]
    fn rewrite_splices_only_the_model() {
        let body = "{ \"temperature\": 0.10,\n  \"model\" : \"a\\u0062\", \"prompt\":\"p\"}";
        let p = parse(body, None).unwrap();
        assert_eq!(p.model, "ab");
        let out = rewrite_model(body.as_bytes(), p.model_span.clone(), "new\"model");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{ \"temperature\": 0.10,\n  \"model\" : \"new\\\"model\", \"prompt\":\"p\"}"
        );
    }
}
