//! The request-body parser on arbitrary bytes: never panics, and a parsed body's model span
//! is exact (rewriting the model and parsing again yields the new name and the same API).
#![no_main]

use endpoint_picker::request::{parse_body, rewrite_model};
use libfuzzer_sys::fuzz_target;

const PATHS: [Option<&str>; 6] = [
    None,
    Some("/v1/chat/completions"),
    Some("/v1/completions"),
    Some("/v1/responses"),
    Some("/v1/embeddings"),
    Some("/v1/conversations/x/items"),
];

fuzz_target!(|data: &[u8]| {
    let Some((selector, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[usize::from(*selector) % PATHS.len()];
    let Ok(parsed) = parse_body(body, path) else {
        return;
    };
    let rewritten = rewrite_model(body, parsed.model_span.clone(), "fuzz\"model");
    let again = parse_body(&rewritten, path).expect("a rewritten body parses");
    assert_eq!(again.model, "fuzz\"model");
    assert_eq!(again.api, parsed.api);
});
