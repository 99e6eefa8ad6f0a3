//! vLLM-style chat rendering and tokenization of arbitrary request bodies (with the real
//! fixture model's tokenizer and template): never panics, never runs away (template fuel),
//! and cached encoding equals uncached.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use vllm_prompt::{Api, Model};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/vllm-0.32-cpu/tokenization");

static CACHED: LazyLock<Model> = LazyLock::new(|| Model::load(std::path::Path::new(DIR), 1 << 20).unwrap());
static PLAIN: LazyLock<Model> = LazyLock::new(|| Model::load(std::path::Path::new(DIR), 0).unwrap());

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let api = if kind % 2 == 0 { Api::Chat } else { Api::Completions };
    let a = CACHED.tokenize(body, api);
    let b = PLAIN.tokenize(body, api);
    match (a, b) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("cached and uncached disagree: {a:?} / {b:?}"),
    }
});
