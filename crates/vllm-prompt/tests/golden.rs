//! Golden tests against a real vLLM 0.32 server (`fixtures/vllm-0.32-cpu/tokenization`):
//! every `/tokenize` case, chat and completion, token for token and, for chat, the rendered
//! prompt text character for character; the same cases with a tokenizer that adds BOS; and the
//! KV-event capture, whose `BlockStored` token slices must be the tokenization of the requests
//! that stored them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::Value as Json;
use vllm_prompt::{Api, ChatRequest, Model};

fn dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/vllm-0.32-cpu/tokenization"
    ))
}

fn lines(path: PathBuf) -> Vec<Json> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn api(kind: &str) -> Api {
    match kind {
        "chat" => Api::Chat,
        "completion" => Api::Completions,
        other => panic!("kind {other}"),
    }
}

fn check_cases(model: &Model, cases: &[Json]) -> usize {
    let mut checked = 0;
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let body = serde_json::to_vec(&case["request"]).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["response"]["tokens"].clone()).unwrap();
        if let Some(text) = case.get("prompt_text").and_then(Json::as_str) {
            let req: ChatRequest = serde_json::from_slice(&body).unwrap();
            let rendered = model.render_chat(&req).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(rendered.text, text, "{id}: rendered prompt");
        }
        let got = model
            .tokenize(&body, api(case["kind"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(got.prompts, vec![want], "{id}: token ids");
        // Again, now from the segment cache.
        let again = model
            .tokenize(&body, api(case["kind"].as_str().unwrap()))
            .unwrap();
        assert_eq!(again, got, "{id}: cached");
        checked += 1;
    }
    checked
}

#[test]
fn every_tokenize_case_matches_vllm() {
    let model = Model::load(&dir(), 8 << 20).unwrap();
    let cases = lines(dir().join("tokenize_cases.jsonl"));
    assert_eq!(check_cases(&model, &cases), 48);
    let chat_with_text = cases.iter().filter(|c| c.get("prompt_text").is_some()).count();
    assert_eq!(chat_with_text, 34);
}

#[test]
fn bos_variant_matches_vllm() {
    // The BOS variant has its own tokenizer files and shares the model's chat template.
    let tmp = std::env::temp_dir().join(format!("vllm-prompt-bos-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir().join("bos_variant").join(f), tmp.join(f)).unwrap();
    }
    std::fs::copy(dir().join("chat_template.jinja"), tmp.join("chat_template.jinja")).unwrap();
    let model = Model::load(&tmp, 8 << 20).unwrap();
    let cases = lines(dir().join("bos_variant/tokenize_cases.jsonl"));
    assert_eq!(check_cases(&model, &cases), 48);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn kv_event_token_slices_are_the_requests_tokens() {
    let model = Model::load(&dir(), 8 << 20).unwrap();
    // Every stored block's tokens, by block hash.
    let mut stored: HashMap<u64, Vec<u32>> = HashMap::new();
    for m in lines(dir().join("kv/kv_events.jsonl")) {
        for e in m["payload"][1].as_array().unwrap() {
            assert_eq!(e["type"], "BlockStored");
            let size = e["block_size"].as_u64().unwrap() as usize;
            let tokens: Vec<u32> = serde_json::from_value(e["token_ids"].clone()).unwrap();
            for (i, h) in e["block_hashes"].as_array().unwrap().iter().enumerate() {
                stored.insert(h.as_u64().unwrap(), tokens[i * size..(i + 1) * size].to_vec());
            }
        }
    }
    assert_eq!(stored.len(), 95);
    let stored_tokens: std::collections::HashSet<&[u32]> = stored.values().map(Vec::as_slice).collect();
    let mut blocks = 0;
    for r in lines(dir().join("kv/requests_with_tokens.jsonl")) {
        let name = r["name"].as_str().unwrap();
        let body = serde_json::to_vec(&r["request"]).unwrap();
        let got = model.tokenize(&body, Api::Chat).unwrap();
        let want: Vec<u32> = serde_json::from_value(r["response_prompt_token_ids"].clone()).unwrap();
        assert_eq!(got.prompts, vec![want.clone()], "{name}");
        for block in want.chunks_exact(32) {
            assert!(
                stored_tokens.contains(block),
                "{name}: a prompt block no event stored"
            );
            blocks += 1;
        }
    }
    assert_eq!(blocks, 206);
}
