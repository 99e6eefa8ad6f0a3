//! Chat messages as vLLM 0.32 hands them to the chat template (`vllm/renderers/`:
//! `_parse_chat_message_content`, `_postprocess_messages`, `safe_apply_chat_template`), and the
//! template variables `transformers`' `apply_chat_template` adds.
//!
//! Per message, in vLLM's order:
//! 1. content: `null` → no parts, a string → one text part, a list as given;
//! 2. system messages lose a leading `x-anthropic-billing-header...` line (a part left empty
//!    is dropped);
//! 3. parts: text-like types (`text`, `input_text`, `output_text`, `refusal`, `thinking`) keep
//!    their text (a part without text is skipped); media parts mark the request as
//!    multimodal; an unknown type is an error;
//! 4. content for the template: a list of `{"type": "text", "text": ...}` parts (plus their
//!    other keys) for templates that iterate over content (`openai` format), else the texts
//!    joined with `"\n"` (`string` format); a `tool` message whose parts are all text becomes
//!    their `"\n"`-joined string in either format;
//! 5. `tool_calls` (assistant; an empty list dropped, each `function.arguments` JSON string
//!    parsed into a mapping, `{}` when it is not an object), `tool_call_id` (tool), `name`.
//!
//! Then, only when a `developer` message is present and the template never mentions
//! `developer`: developer messages become system messages and, when a system message is not
//! first or there are several, all of them are merged into one at the front, their texts
//! joined with `"\n\n"` (empty ones skipped).

use serde_json::{Map, Value as Json};

/// Why a chat request cannot be rendered (vLLM answers these with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// `messages` is missing or not a list of objects.
    #[error("messages must be a list of objects")]
    Messages,
    /// A content part of an unknown type.
    #[error("unknown content part type {0:?}")]
    PartType(String),
    /// A malformed tool call.
    #[error("tool_calls entries must be objects with a function object")]
    ToolCall,
    /// `continue_final_message` with `add_generation_prompt`, or nothing to continue.
    #[error("{0}")]
    Continue(&'static str),
}

/// How the template reads message content (vLLM's `--chat-template-content-format auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// Content is a string: text parts joined with `"\n"`.
    String,
    /// Content is a list of typed parts (the template iterates over it).
    OpenAi,
}

impl ContentFormat {
    /// Detects the format as vLLM does: `openai` when the template has a `for` loop over a
    /// message's `content` (`for p in m['content']`, `for p in message.content | ...`, or
    /// over a variable named `content`), else `string`.
    pub fn detect(template: &str) -> Self {
        let mut rest = template;
        while let Some(at) = rest.find("{%") {
            rest = &rest[at + 2..];
            let end = rest.find("%}").unwrap_or(rest.len());
            let tag = rest[..end].trim_start_matches(['-', '+']).trim();
            rest = &rest[end..];
            let Some(body) = tag.strip_prefix("for ") else {
                continue;
            };
            let Some((_, iter)) = body.split_once(" in ") else {
                continue;
            };
            // Drop filters, tests and conditions, then a closing bracket or a trailing slice:
            // `m['content']` ends in `['content'`, `m['content'][1:]` in `['content']`.
            let target = iter.split(['|', ' ']).next().unwrap_or("").trim();
            let target = target
                .trim_end_matches(|c: char| c == ']' || c == ':' || c.is_ascii_digit() || c == '-')
                .trim_end_matches('[');
            if target == "content"
                || target.ends_with(".content")
                || target.ends_with("['content'")
                || target.ends_with("[\"content\"")
                || target.ends_with("['content']")
                || target.ends_with("[\"content\"]")
            {
                return Self::OpenAi;
            }
        }
        Self::String
    }
}

const TEXT_TYPES: &[&str] = &["text", "input_text", "output_text", "refusal", "thinking"];
const MEDIA_TYPES: &[&str] = &[
    "image_url",
    "image",
    "image_pil",
    "image_embeds",
    "audio_url",
    "input_audio",
    "audio",
    "audio_embeds",
    "video_url",
    "video",
    "file",
];

/// Messages ready for the template.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The messages as the template sees them.
    pub messages: Vec<Json>,
    /// Whether any message carries media (images, audio, video): its prompt then holds
    /// placeholder tokens only the model's processor can expand.
    pub has_media: bool,
}

/// Normalises `messages` (the request's JSON array) for a template in `format` whose source
/// is `template` (checked for the word `developer`).
pub fn conversation(
    messages: &Json,
    format: ContentFormat,
    template: &str,
) -> Result<Conversation, ChatError> {
    let list = messages.as_array().ok_or(ChatError::Messages)?;
    let mut has_media = false;
    let mut out = Vec::with_capacity(list.len());
    let mut developer = false;
    for m in list {
        let m = m.as_object().ok_or(ChatError::Messages)?;
        let role = m.get("role").and_then(Json::as_str).unwrap_or_default();
        developer |= role == "developer";
        out.push(message(m, role, format, &mut has_media)?);
    }
    if developer && !template.contains("\"developer\"") && !template.contains("'developer'") {
        out = merge_developer(out);
    }
    Ok(Conversation {
        messages: out,
        has_media,
    })
}

fn message(
    m: &Map<String, Json>,
    role: &str,
    format: ContentFormat,
    has_media: &mut bool,
) -> Result<Json, ChatError> {
    let parts: Vec<Json> = match m.get("content") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(s)) => vec![text_part(s)],
        Some(Json::Array(a)) => a.clone(),
        Some(other) => vec![other.clone()],
    };
    let parts = if role == "system" {
        strip_billing_header(parts)
    } else {
        parts
    };
    let mut texts: Vec<String> = Vec::new();
    let mut template_parts: Vec<Json> = Vec::new();
    let mut only_text = true;
    for part in parts {
        let (kind, obj) = match &part {
            Json::String(s) => {
                texts.push(s.clone());
                template_parts.push(text_part(s));
                continue;
            }
            Json::Object(o) => (
                o.get("type").and_then(Json::as_str).unwrap_or("text").to_owned(),
                o,
            ),
            _ => return Err(ChatError::PartType(part.to_string())),
        };
        if TEXT_TYPES.contains(&kind.as_str()) {
            let key = if kind == "refusal" { "refusal" } else { "text" };
            let text = obj
                .get(key)
                .or_else(|| obj.get("text"))
                .and_then(Json::as_str)
                .map(str::to_owned);
            let Some(text) = text else {
                continue;
            };
            let mut p = Map::new();
            p.insert("type".into(), Json::from("text"));
            p.insert("text".into(), Json::from(text.clone()));
            for (k, v) in obj {
                if k != "type" && k != "text" && k != key {
                    p.insert(k.clone(), v.clone());
                }
            }
            texts.push(text);
            template_parts.push(Json::Object(p));
        } else if MEDIA_TYPES.contains(&kind.as_str()) {
            *has_media = true;
            only_text = false;
            let modality = if kind.contains("audio") {
                "audio"
            } else if kind.contains("video") {
                "video"
            } else {
                "image"
            };
            template_parts.push(serde_json::json!({ "type": modality }));
        } else if kind == "tool_reference" {
            only_text = false;
            template_parts.push(serde_json::json!({"type": "tool_reference", "name": obj.get("name").cloned().unwrap_or(Json::Null)}));
        } else {
            return Err(ChatError::PartType(kind));
        }
    }
    let content = if role == "tool" && only_text {
        Json::from(texts.join("\n"))
    } else {
        match format {
            ContentFormat::OpenAi => Json::Array(template_parts),
            ContentFormat::String => Json::from(texts.join("\n")),
        }
    };
    let mut msg = Map::new();
    msg.insert("role".into(), Json::from(role));
    msg.insert("content".into(), content);
    if role == "assistant" {
        if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
            let calls = tool_calls(calls)?;
            if !calls.is_empty() {
                msg.insert("tool_calls".into(), Json::Array(calls));
            }
        }
        if let Some(r) = m
            .get("reasoning")
            .or_else(|| m.get("reasoning_content"))
            .filter(|r| !r.is_null())
        {
            msg.insert("reasoning".into(), r.clone());
            msg.insert("reasoning_content".into(), r.clone());
        }
    }
    if role == "tool"
        && let Some(id) = m.get("tool_call_id")
    {
        msg.insert("tool_call_id".into(), id.clone());
    }
    for key in ["name", "task"] {
        if let Some(v) = m.get(key).filter(|v| v.is_string()) {
            msg.insert(key.into(), v.clone());
        }
    }
    if role == "developer" {
        msg.insert("tools".into(), m.get("tools").cloned().unwrap_or(Json::Null));
    }
    Ok(Json::Object(msg))
}

fn text_part(s: &str) -> Json {
    serde_json::json!({"type": "text", "text": s})
}

/// vLLM's `_strip_claude_code_billing_header`: a text part starting with the header loses
/// everything up to its first newline; a part left empty is dropped.
fn strip_billing_header(parts: Vec<Json>) -> Vec<Json> {
    const HEADER: &str = "x-anthropic-billing-header";
    parts
        .into_iter()
        .filter_map(|part| {
            let text = match &part {
                Json::String(s) => Some(s.as_str()),
                Json::Object(o) if o.get("type").and_then(Json::as_str) == Some("text") => {
                    o.get("text").and_then(Json::as_str)
                }
                _ => None,
            };
            let Some(text) = text.filter(|t| t.starts_with(HEADER)) else {
                return Some(part);
            };
            let rest = text.split_once('\n').map_or("", |(_, rest)| rest).to_owned();
            if rest.is_empty() {
                return None;
            }
            Some(match part {
                Json::String(_) => Json::from(rest),
                Json::Object(mut o) => {
                    o.insert("text".into(), Json::from(rest));
                    Json::Object(o)
                }
                other => other,
            })
        })
        .collect()
}

/// `_postprocess_messages`: each call's `function.arguments` as a mapping.
fn tool_calls(calls: &Json) -> Result<Vec<Json>, ChatError> {
    let list = calls.as_array().ok_or(ChatError::ToolCall)?;
    list.iter()
        .map(|call| {
            let mut call = call.as_object().cloned().ok_or(ChatError::ToolCall)?;
            if call
                .get("type")
                .and_then(Json::as_str)
                .is_some_and(|t| t != "function")
            {
                return Err(ChatError::ToolCall);
            }
            let function = call
                .get_mut("function")
                .and_then(Json::as_object_mut)
                .ok_or(ChatError::ToolCall)?;
            let args = match function.get("arguments") {
                Some(Json::Object(o)) => Json::Object(o.clone()),
                Some(Json::String(s)) if !s.is_empty() => match serde_json::from_str::<Json>(s) {
                    Ok(Json::Object(o)) => Json::Object(o),
                    _ => Json::Object(Map::new()),
                },
                _ => Json::Object(Map::new()),
            };
            function.insert("arguments".into(), args);
            Ok(Json::Object(call))
        })
        .collect()
}

/// `_convert_developer_to_system` and `_consolidate_system_messages`.
fn merge_developer(messages: Vec<Json>) -> Vec<Json> {
    let mut messages: Vec<Json> = messages
        .into_iter()
        .map(|mut m| {
            if let Some(o) = m.as_object_mut()
                && o.get("role").and_then(Json::as_str) == Some("developer")
            {
                o.insert("role".into(), Json::from("system"));
                o.remove("tools");
            }
            m
        })
        .collect();
    let is_system = |m: &Json| m.get("role").and_then(Json::as_str) == Some("system");
    let systems = messages.iter().filter(|m| is_system(m)).count();
    let first_is_system = messages.first().is_some_and(is_system);
    if systems == 0 || (systems == 1 && first_is_system) {
        return messages;
    }
    let mut texts = Vec::new();
    messages.retain(|m| {
        if !is_system(m) {
            return true;
        }
        let text = match m.get("content") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(parts)) => parts
                .iter()
                .map(|p| match p {
                    Json::String(s) => s.clone(),
                    p => p
                        .get("text")
                        .and_then(Json::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                })
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        if !text.is_empty() {
            texts.push(text);
        }
        false
    });
    messages.insert(
        0,
        serde_json::json!({"role": "system", "content": texts.join("\n\n")}),
    );
    messages
}

/// `transformers`' `continue_final_message`: a marker appended to the final message's text
/// (its last text part, for lists) tells where to cut the rendered prompt.
pub const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// Appends [`CONTINUE_TAG`] to the final message's text.
pub fn mark_final_message(messages: &mut [Json]) -> Result<(), ChatError> {
    let last = messages
        .last_mut()
        .and_then(|m| m.get_mut("content"))
        .ok_or(ChatError::Continue(
            "continue_final_message needs a final message",
        ))?;
    match last {
        Json::String(s) => {
            s.push_str(CONTINUE_TAG);
            Ok(())
        }
        Json::Array(parts) => {
            let part = parts
                .iter_mut()
                .rev()
                .find_map(|p| p.get_mut("text").and_then(|t| t.as_str().is_some().then_some(t)))
                .ok_or(ChatError::Continue(
                    "continue_final_message is set but the final message has no text to continue",
                ))?;
            if let Json::String(s) = part {
                s.push_str(CONTINUE_TAG);
            }
            Ok(())
        }
        _ => Err(ChatError::Continue(
            "continue_final_message needs text in the final message",
        )),
    }
}

/// Cuts a rendered prompt at the marker [`mark_final_message`] placed; `None` when the
/// template dropped it.
pub fn cut_at_marker(rendered: &str) -> Option<String> {
    if let Some(at) = rendered.rfind(CONTINUE_TAG) {
        return Some(rendered[..at].to_owned());
    }
    // The template trimmed the marker's trailing space.
    let tag = CONTINUE_TAG.trim_end();
    rendered.rfind(tag).map(|at| rendered[..at].trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_format_detection() {
        let fixture =
            "{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}";
        assert_eq!(ContentFormat::detect(fixture), ContentFormat::OpenAi);
        assert_eq!(
            ContentFormat::detect(
                "{%- for part in message.content | selectattr('type', 'equalto', 'text') %}"
            ),
            ContentFormat::OpenAi
        );
        assert_eq!(
            ContentFormat::detect("{% for message in messages %}{{ message['content'] }}{% endfor %}"),
            ContentFormat::String
        );
        assert_eq!(
            ContentFormat::detect("{% for c in message[\"content\"][1:] %}"),
            ContentFormat::OpenAi
        );
    }

    #[test]
    fn tool_call_arguments_become_mappings() {
        let messages = serde_json::json!([
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": [2]}"}},
                {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                {"id": "3", "type": "function", "function": {"name": "h", "arguments": "[1]"}}
            ]},
            {"role": "assistant", "content": "x", "tool_calls": []}
        ]);
        let c = conversation(&messages, ContentFormat::OpenAi, "").unwrap();
        let calls = c.messages[0]["tool_calls"].as_array().unwrap();
        assert_eq!(
            calls[0]["function"]["arguments"],
            serde_json::json!({"b": 1, "a": [2]})
        );
        assert_eq!(calls[1]["function"]["arguments"], serde_json::json!({}));
        assert_eq!(calls[2]["function"]["arguments"], serde_json::json!({}));
        assert_eq!(c.messages[0]["content"], serde_json::json!([]));
        assert!(c.messages[1].get("tool_calls").is_none());
        let e = conversation(
            &serde_json::json!([{"role": "user", "content": [{"type": "bogus"}]}]),
            ContentFormat::OpenAi,
            "",
        );
        assert_eq!(e.unwrap_err(), ChatError::PartType("bogus".into()));
    }

    #[test]
    fn media_is_flagged() {
        let messages = serde_json::json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "what is it"}
        ]}]);
        let c = conversation(&messages, ContentFormat::String, "").unwrap();
        assert!(c.has_media);
        assert_eq!(c.messages[0]["content"], "what is it");
    }

    #[test]
    fn continue_marker_cuts_after_the_final_text() {
        let mut m =
            vec![serde_json::json!({"role": "assistant", "content": [{"type": "text", "text": "Hello"}]})];
        mark_final_message(&mut m).unwrap();
        let rendered = format!(
            "<|assistant|>{}<|end|>",
            m[0]["content"][0]["text"].as_str().unwrap()
        );
        assert_eq!(cut_at_marker(&rendered).unwrap(), "<|assistant|>Hello");
        assert_eq!(
            cut_at_marker("<|a|>HelloCONTINUE_FINAL_MESSAGE_TAG<|end|>").unwrap(),
            "<|a|>Hello"
        );
    }
}
