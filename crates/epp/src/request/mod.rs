//! What a request asks for: the control headers and the OpenAI-style body.
//!
//! Parsing happens once per request, at body end-of-stream. It borrows from the body buffer
//! wherever it can (the prompt is not copied unless JSON escapes force it), keeps the byte
//! span of the `model` value so a rewrite can splice the body instead of re-serialising it,
//! and reports every malformed input as a [`RequestError`] that the protocol layer turns into
//! a 400. The director ([`crate::requestcontrol`]) turns a complete request into a routing
//! decision.

mod body;
mod headers;

pub use body::{ApiKind, ParsedBody, parse_body, rewrite_model};
pub use headers::{RequestHeaders, keys};

/// Why a request cannot be scheduled. Each variant becomes an HTTP error at the protocol edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The body is not a JSON object.
    #[error("Error unmarshaling request body")]
    InvalidJson,
    /// `model` is absent or not a string.
    #[error("model not found in request body")]
    ModelMissing,
    /// The field that carries the prompt for this API is absent, empty or of the wrong type.
    #[error("{field} not found in request")]
    PromptMissing {
        /// `prompt`, `messages`, `input` or `items`.
        field: &'static str,
    },
    /// The body exceeds the configured limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}
