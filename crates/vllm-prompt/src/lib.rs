//! vLLM's prompt, token for token, without vLLM: the chat template rendered as vLLM 0.32
//! renders it and the result tokenized with the model's `tokenizer.json`.
//!
//! A router that keys a prefix-cache index on token ids must produce exactly the ids the
//! engine's KV-cache events carry, or precise matching never hits. [`Model`] loads a model
//! directory as vLLM does (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`),
//! turns an OpenAI request body into token ids ([`Model::tokenize`]), and is tested token for
//! token against a real vLLM server's `/tokenize` answers and KV events
//! (`fixtures/vllm-0.32-cpu/tokenization`).
//!
//! * [`chat`]: messages normalised as vLLM does before the template runs;
//! * [`template`]: the Jinja environment of `transformers`' `apply_chat_template`;
//! * [`tokenizer`]: `tokenizers` with a bounded cache of encoded segments (a repeated system
//!   prompt is encoded once).

pub mod chat;
pub mod template;
pub mod tokenizer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value as Json};

pub use chat::{ChatError, ContentFormat};
pub use template::{ChatTemplate, TemplateError};
pub use tokenizer::{DEFAULT_CACHE_BYTES, Tokenizer, TokenizerError};

/// Why a model directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file is missing or unreadable.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer_config.json` is not valid JSON.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat template does not compile.
    #[error(transparent)]
    Template(#[from] TemplateError),
}

/// Why a request could not be turned into tokens. vLLM answers each with 400; a router
/// routes the request without precise prefix information.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The body is not JSON of the expected shape.
    #[error("invalid request body: {0}")]
    Body(String),
    /// The messages cannot be rendered.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// The model directory has no chat template.
    #[error("the model has no chat template")]
    NoTemplate,
    /// The template failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The request brings its own chat template, which vLLM refuses by default
    /// (`--trust-request-chat-template`).
    #[error("request chat templates are not trusted")]
    RequestTemplate,
    /// `chat_template_kwargs` sets a key vLLM refuses there.
    #[error("chat_template_kwargs may not set {0:?}")]
    Kwarg(String),
    /// Tokenization failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Which request shape a body has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions` (and chat `/tokenize`): `messages`.
    Chat,
    /// `/v1/completions` (and completion `/tokenize`): `prompt`.
    Completions,
}

/// A request's prompts as token ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prompt {
    /// One list of ids per prompt (a completions request may carry several).
    pub prompts: Vec<Vec<u32>>,
    /// The prompt holds media whose placeholder tokens only the model's processor expands;
    /// its ids are not the engine's.
    pub has_media: bool,
}

/// The named special tokens `transformers` passes to every chat template.
const SPECIAL_NAMES: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A model's tokenizer and chat template, loaded from its directory. Shared behind an `Arc`.
pub struct Model {
    tokenizer: Tokenizer,
    template: Option<(ChatTemplate, String, ContentFormat, HashSet<String>)>,
    tool_template: Option<ChatTemplate>,
    specials: Map<String, Json>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("tokenizer", &self.tokenizer)
            .field("template", &self.template.as_ref().map(|t| t.2))
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateEntry {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl Model {
    /// Loads `dir` as vLLM (through `transformers`) loads a model's tokenizer: `tokenizer.json`
    /// (required), `tokenizer_config.json` (special tokens, `chat_template`) and
    /// `chat_template.jinja`, which wins over the config's template. Encoded segments are
    /// cached up to `cache_bytes`.
    pub fn load(dir: &Path, cache_bytes: u64) -> Result<Self, LoadError> {
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), cache_bytes)?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Map<String, Json> = if config_path.exists() {
            serde_json::from_str(&read(&config_path)?).map_err(|e| LoadError::Config {
                path: config_path.clone(),
                message: e.to_string(),
            })?
        } else {
            Map::new()
        };
        let mut specials = Map::new();
        for name in SPECIAL_NAMES {
            let value = match config.get(*name) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_owned),
                _ => None,
            };
            if let Some(v) = value {
                specials.insert((*name).to_owned(), Json::from(v));
            }
        }
        let jinja = dir.join("chat_template.jinja");
        let (default, tool_use) = if jinja.exists() {
            (Some(read(&jinja)?), None)
        } else {
            match config
                .get("chat_template")
                .cloned()
                .map(serde_json::from_value::<TemplateEntry>)
            {
                Some(Ok(TemplateEntry::One(s))) => (Some(s), None),
                Some(Ok(TemplateEntry::Named(list))) => {
                    let get = |n: &str| list.iter().find(|t| t.name == n).map(|t| t.template.clone());
                    (get("default"), get("tool_use"))
                }
                Some(Err(e)) => {
                    return Err(LoadError::Config {
                        path: config_path,
                        message: format!("chat_template: {e}"),
                    });
                }
                None => (None, None),
            }
        };
        let template = match default {
            Some(src) => {
                let t = ChatTemplate::new(&src)?;
                let vars = t.variables();
                let format = ContentFormat::detect(&src);
                Some((t, src, format, vars))
            }
            None => None,
        };
        let tool_template = tool_use.map(|s| ChatTemplate::new(&s)).transpose()?;
        Ok(Self {
            tokenizer,
            template,
            tool_template,
            specials,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The template's content format, when the model has a template.
    pub fn content_format(&self) -> Option<ContentFormat> {
        self.template.as_ref().map(|t| t.2)
    }

    /// A request body's prompts as token ids, as vLLM tokenizes them for `api`.
    pub fn tokenize(&self, body: &[u8], api: Api) -> Result<Prompt, PromptError> {
        self.encode(&self.texts(body, api)?)
    }

    /// A request body's prompts before encoding: rendered text (or the ids a completions
    /// request gave). Rendering is cheap next to encoding a long prompt, so a caller can
    /// render on its thread and encode elsewhere.
    pub fn texts(&self, body: &[u8], api: Api) -> Result<PromptTexts, PromptError> {
        match api {
            Api::Chat => {
                let req: ChatRequest =
                    serde_json::from_slice(body).map_err(|e| PromptError::Body(e.to_string()))?;
                let text = self.render_chat(&req)?;
                Ok(PromptTexts {
                    parts: vec![PromptPart::Text(text.text)],
                    add_special_tokens: req.add_special_tokens.unwrap_or(false),
                    has_media: text.has_media,
                })
            }
            Api::Completions => {
                let req: CompletionRequest =
                    serde_json::from_slice(body).map_err(|e| PromptError::Body(e.to_string()))?;
                Ok(PromptTexts {
                    parts: completion_parts(&req.prompt)?,
                    add_special_tokens: req.add_special_tokens.unwrap_or(true),
                    has_media: false,
                })
            }
        }
    }

    /// Encodes rendered prompts.
    pub fn encode(&self, texts: &PromptTexts) -> Result<Prompt, PromptError> {
        let prompts = texts
            .parts
            .iter()
            .map(|p| match p {
                PromptPart::Text(t) => self.tokenizer.encode(t, texts.add_special_tokens),
                PromptPart::Ids(ids) => Ok(ids.clone()),
            })
            .collect::<Result<_, _>>()?;
        Ok(Prompt {
            prompts,
            has_media: texts.has_media,
        })
    }

    /// Bytes of `texts` whose segments are not cached: about what encoding them would cost
    /// now.
    pub fn uncached_bytes(&self, texts: &PromptTexts) -> usize {
        texts
            .parts
            .iter()
            .map(|p| match p {
                PromptPart::Text(t) => self.tokenizer.uncached_bytes(t),
                PromptPart::Ids(_) => 0,
            })
            .sum()
    }

    /// The prompt text vLLM renders for a chat request.
    pub fn render_chat(&self, req: &ChatRequest) -> Result<RenderedChat, PromptError> {
        if req.chat_template.is_some() {
            return Err(PromptError::RequestTemplate);
        }
        let (default, source, format, vars) = self.template.as_ref().ok_or(PromptError::NoTemplate)?;
        let tools = req.tools.as_ref().filter(|_| {
            req.tool_choice
                .as_ref()
                .is_none_or(|c| c.as_str() != Some("none"))
        });
        let template = match (&self.tool_template, tools) {
            (Some(t), Some(_)) => t,
            _ => default,
        };
        let mut conv = chat::conversation(&req.messages, *format, source)?;
        let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
        let continue_final = req.continue_final_message.unwrap_or(false);
        if continue_final && add_generation_prompt {
            return Err(ChatError::Continue(
                "continue_final_message cannot be used with add_generation_prompt (set it to false)",
            )
            .into());
        }
        if continue_final {
            chat::mark_final_message(&mut conv.messages)?;
        }
        let mut ctx = self.specials.clone();
        if let Some(kwargs) = &req.chat_template_kwargs {
            for (k, v) in kwargs {
                if k == "chat_template" || k == "tokenize" {
                    return Err(PromptError::Kwarg(k.clone()));
                }
                if vars.contains(k) || APPLY_PARAMS.contains(&k.as_str()) {
                    ctx.insert(k.clone(), v.clone());
                }
            }
        }
        ctx.insert("add_generation_prompt".into(), Json::from(add_generation_prompt));
        if let Some(d) = req.documents.as_ref().filter(|d| !d.is_null()) {
            ctx.insert("documents".into(), d.clone());
        }
        if let Some(effort) = req.reasoning_effort.as_deref() {
            ctx.insert("reasoning_effort".into(), Json::from(effort));
            ctx.entry("enable_thinking")
                .or_insert_with(|| Json::from(effort != "none"));
        }
        ctx.insert("messages".into(), Json::Array(conv.messages));
        ctx.insert("tools".into(), tools.map_or(Json::Null, tool_dicts));
        let rendered = template.render(minijinja::Value::from(minijinja::value::Serde(Json::Object(ctx))))?;
        let text = if continue_final {
            chat::cut_at_marker(&rendered).ok_or(ChatError::Continue(
                "the template dropped the final message to continue",
            ))?
        } else {
            rendered
        };
        Ok(RenderedChat {
            text,
            has_media: conv.has_media,
        })
    }
}

/// `apply_chat_template` parameters a request's `chat_template_kwargs` may set even when the
/// template does not read them.
const APPLY_PARAMS: &[&str] = &[
    "tools",
    "documents",
    "add_generation_prompt",
    "continue_final_message",
    "return_assistant_tokens_mask",
];

/// Tools as vLLM hands them to the template (`tool.model_dump()`): `type` and a `function`
/// with `name`, `description` and `parameters` (`null` when absent), `strict` when set.
fn tool_dicts(tools: &Json) -> Json {
    let Some(list) = tools.as_array() else {
        return tools.clone();
    };
    Json::Array(
        list.iter()
            .map(|t| {
                let f = t.get("function").cloned().unwrap_or(Json::Null);
                let mut func = Map::new();
                func.insert("name".into(), f.get("name").cloned().unwrap_or(Json::Null));
                func.insert(
                    "description".into(),
                    f.get("description").cloned().unwrap_or(Json::Null),
                );
                func.insert(
                    "parameters".into(),
                    f.get("parameters").cloned().unwrap_or(Json::Null),
                );
                for key in ["strict", "defer_loading"] {
                    if let Some(v) = f.get(key).filter(|v| !v.is_null()) {
                        func.insert(key.into(), v.clone());
                    }
                }
                serde_json::json!({
                    "type": t.get("type").cloned().unwrap_or_else(|| Json::from("function")),
                    "function": Json::Object(func),
                })
            })
            .collect(),
    )
}

/// One prompt before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptPart {
    /// Text to encode.
    Text(String),
    /// Ids the request gave.
    Ids(Vec<u32>),
}

/// A request's prompts before encoding (see [`Model::texts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTexts {
    /// The prompts.
    pub parts: Vec<PromptPart>,
    /// Whether the tokenizer adds its special tokens (BOS).
    pub add_special_tokens: bool,
    /// Whether the messages carry media.
    pub has_media: bool,
}

fn completion_parts(prompt: &Json) -> Result<Vec<PromptPart>, PromptError> {
    let ids = |items: &[Json]| -> Result<Vec<u32>, PromptError> {
        items
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| PromptError::Body("token ids must be u32".into()))
    };
    match prompt {
        Json::String(s) => Ok(vec![PromptPart::Text(s.clone())]),
        Json::Array(items) if items.iter().all(Json::is_number) && !items.is_empty() => {
            Ok(vec![PromptPart::Ids(ids(items)?)])
        }
        Json::Array(items) => items
            .iter()
            .map(|item| match item {
                Json::String(s) => Ok(PromptPart::Text(s.clone())),
                Json::Array(inner) => Ok(PromptPart::Ids(ids(inner)?)),
                _ => Err(PromptError::Body(
                    "prompt entries must be strings or token lists".into(),
                )),
            })
            .collect(),
        _ => Err(PromptError::Body("prompt must be a string or a list".into())),
    }
}

/// The fields of a chat request that decide its prompt.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Json,
    /// Tool definitions.
    #[serde(default)]
    pub tools: Option<Json>,
    /// `"none"` leaves the tools out of the template... as vLLM does when told to.
    #[serde(default)]
    pub tool_choice: Option<Json>,
    /// Default `true`.
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// Default `false`.
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    /// Default `false` for chat.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// Extra template variables.
    #[serde(default)]
    pub chat_template_kwargs: Option<Map<String, Json>>,
    /// RAG documents.
    #[serde(default)]
    pub documents: Option<Json>,
    /// Passed to the template as `reasoning_effort` (and `enable_thinking`).
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    /// A request-supplied template (refused).
    #[serde(default)]
    pub chat_template: Option<Json>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Json,
    #[serde(default)]
    add_special_tokens: Option<bool>,
}

/// A rendered chat prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    /// The text the tokenizer encodes.
    pub text: String,
    /// Whether the messages carry media.
    pub has_media: bool,
}
