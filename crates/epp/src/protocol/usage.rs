//! Token usage from model-server responses, read while the bytes pass through.
//!
//! Where each API puts it: JSON responses carry `usage` at the top (chat and text
//! completions, embeddings, responses); chat and completion SSE streams carry it in a late
//! `data:` event (OpenAI `stream_options.include_usage`, always on in vLLM's final chunk);
//! a Responses-API stream carries it only in its final `response.completed` event, nested as
//! `response.usage` with `input_tokens`/`output_tokens`. The parser
//! never holds the whole stream: SSE is scanned line by line with a bounded carry-over for a
//! line split across chunks, and a JSON body is kept only up to a bound.

use serde::Deserialize;
use serde_json::Value;

/// Longest SSE line or JSON body kept for usage parsing; longer ones are skipped.
const MAX_KEPT: usize = 4 << 20;

/// Token counts of one response. Missing fields stay `None`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `prompt_tokens` (or `input_tokens`).
    pub prompt_tokens: Option<u64>,
    /// `completion_tokens` (or `output_tokens`).
    pub completion_tokens: Option<u64>,
    /// `total_tokens`.
    pub total_tokens: Option<u64>,
    /// `prompt_tokens_details.cached_tokens` (or `input_tokens_details.cached_tokens`).
    pub cached_tokens: Option<u64>,
}

/// Largest token count taken (100 M; the longest context windows are about 10 M tokens).
/// Counts above it, negative, fractional or not numbers at all are ignored: a lying server
/// must not add 1.8e19 to a token histogram.
pub const MAX_TOKENS: u64 = 100_000_000;

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    usage: Option<Value>,
    /// Responses-API stream events (`response.completed`, `response.incomplete`,
    /// `response.failed`) nest the response, and its usage, here. Only `usage` is kept: the
    /// rest of the nested response is skipped, not built.
    #[serde(default)]
    response: Option<Nested>,
}

#[derive(Deserialize)]
struct Nested {
    #[serde(default)]
    usage: Option<Value>,
}

/// A token count: a JSON integer (or an integral number such as `12.0`) in `0..=MAX_TOKENS`.
fn count(v: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| {
        let n = v.get(*k)?;
        let n = n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f <= MAX_TOKENS as f64)
                .map(|f| f as u64)
        })?;
        (n <= MAX_TOKENS).then_some(n)
    })
}

/// The usage of one JSON document, if it has one: top-level `usage` (chat and text
/// completions, embeddings, a whole Responses-API answer) or `response.usage` (a Responses-API
/// stream event). Both field spellings are read: `prompt_tokens`/`completion_tokens` (chat,
/// completions, embeddings) and `input_tokens`/`output_tokens` (responses).
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    let env: Envelope = serde_json::from_slice(json).ok()?;
    let u = env
        .usage
        .filter(Value::is_object)
        .or_else(|| env.response?.usage.filter(Value::is_object))?;
    let cached = ["prompt_tokens_details", "input_tokens_details"]
        .iter()
        .find_map(|k| u.get(*k).and_then(|d| count(d, &["cached_tokens"])));
    Some(Usage {
        prompt_tokens: count(&u, &["prompt_tokens", "input_tokens"]),
        completion_tokens: count(&u, &["completion_tokens", "output_tokens"]),
        total_tokens: count(&u, &["total_tokens"]),
        cached_tokens: cached,
    })
}

/// Incremental usage reader for one response body.
#[derive(Debug, Default)]
pub struct UsageParser {
    sse: bool,
    kept: Vec<u8>,
    overflow: bool,
    last: Option<Usage>,
}

impl UsageParser {
    /// A parser for an SSE (`text/event-stream`) or a JSON body.
    pub fn new(sse: bool) -> Self {
        Self {
            sse,
            ..Self::default()
        }
    }

    /// Feeds the next body chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.overflow || self.kept.len() + chunk.len() > MAX_KEPT {
                self.overflow = true;
                self.kept = Vec::new();
            } else {
                self.kept.extend_from_slice(chunk);
            }
            return;
        }
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            if self.kept.is_empty() {
                if !self.overflow {
                    self.sse_line(line);
                }
            } else {
                let mut joined = std::mem::take(&mut self.kept);
                joined.extend_from_slice(line);
                if !self.overflow {
                    self.sse_line(&joined);
                }
            }
            self.overflow = false;
            rest = &tail[1..];
        }
        if !rest.is_empty() && !self.overflow {
            if self.kept.len() + rest.len() > MAX_KEPT {
                self.overflow = true;
                self.kept = Vec::new();
            } else {
                self.kept.extend_from_slice(rest);
            }
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" || !contains(data, b"\"usage\"") {
            return;
        }
        if let Some(u) = usage_of(data) {
            self.last = Some(u);
        }
    }

    /// The usage found, once the body is complete.
    pub fn finish(&mut self) -> Option<Usage> {
        if self.sse {
            let tail = std::mem::take(&mut self.kept);
            if !tail.is_empty() && !self.overflow {
                self.sse_line(&tail);
            }
            self.last
        } else if self.overflow {
            None
        } else {
            usage_of(&std::mem::take(&mut self.kept))
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/vllm-0.32-cpu");

    #[test]
    fn json_usage_in_any_chunking() {
        let body = br#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        for split in [1, 7, body.len()] {
            let mut p = UsageParser::new(false);
            for c in body.chunks(split) {
                p.feed(c);
            }
            assert_eq!(
                p.finish(),
                Some(Usage {
                    prompt_tokens: Some(12),
                    completion_tokens: Some(5),
                    total_tokens: Some(17),
                    cached_tokens: Some(8),
                })
            );
        }
    }

    #[test]
    fn tolerant_of_missing_or_odd_usage() {
        assert_eq!(
            usage_of(br#"{"usage":{"prompt_tokens":3}}"#)
                .unwrap()
                .completion_tokens,
            None
        );
        assert_eq!(usage_of(br#"{"usage":null}"#), None);
        assert_eq!(usage_of(br#"{"usage":"lots"}"#), None);
        assert_eq!(usage_of(b"not json"), None);
        let u = usage_of(br#"{"usage":{"input_tokens":4,"output_tokens":2}}"#).unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(4), Some(2)));
    }

    #[test]
    fn sse_usage_from_last_data_event_across_chunk_boundaries() {
        let stream = "data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\r\n\ndata: [DONE]\n\n";
        for split in [1, 5, 33, stream.len()] {
            let mut p = UsageParser::new(true);
            for c in stream.as_bytes().chunks(split) {
                p.feed(c);
            }
            let u = p.finish().unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                (Some(9), Some(4), Some(13))
            );
        }
    }

    fn fed(sse: bool, body: &str, split: usize) -> Option<Usage> {
        let mut p = UsageParser::new(sse);
        for c in body.as_bytes().chunks(split) {
            p.feed(c);
        }
        p.finish()
    }

    fn pc(u: Option<Usage>) -> (Option<u64>, Option<u64>) {
        u.map_or((None, None), |u| (u.prompt_tokens, u.completion_tokens))
    }

    #[test]
    fn counts_that_are_not_sane_integers_are_ignored() {
        let u = usage_of(br#"{"usage":{"prompt_tokens":-5,"completion_tokens":1e300,"total_tokens":7}}"#)
            .unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (None, None, Some(7))
        );
        let u =
            usage_of(br#"{"usage":{"prompt_tokens":2.5,"completion_tokens":"3","total_tokens":100000001}}"#)
                .unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (None, None, None)
        );
        let u = usage_of(br#"{"usage":{"prompt_tokens":12.0,"completion_tokens":100000000}}"#).unwrap();
        assert_eq!(pc(Some(u)), (Some(12), Some(MAX_TOKENS)));
        let u = usage_of(br#"{"usage":{"prompt_tokens":18446744073709551615}}"#).unwrap();
        assert_eq!(u.prompt_tokens, None);
    }

    #[test]
    fn usage_of_every_api_shape() {
        // (API, SSE?, body, prompt, completion)
        type Case = (&'static str, bool, &'static str, Option<u64>, Option<u64>);
        let cases: &[Case] = &[
            (
                "chat JSON",
                false,
                r#"{"object":"chat.completion","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}"#,
                Some(11),
                Some(3),
            ),
            (
                "completions JSON",
                false,
                r#"{"object":"text_completion","choices":[{"text":"hi"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#,
                Some(5),
                Some(2),
            ),
            (
                "embeddings JSON",
                false,
                r#"{"object":"list","data":[{"object":"embedding","embedding":[0.1,0.2]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#,
                Some(8),
                None,
            ),
            (
                "responses JSON",
                false,
                r#"{"object":"response","status":"completed","output":[],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4},"output_tokens":6,"total_tokens":15}}"#,
                Some(9),
                Some(6),
            ),
            (
                "chat SSE",
                true,
                "data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3,\"total_tokens\":14}}\n\ndata: [DONE]\n\n",
                Some(11),
                Some(3),
            ),
            (
                "completions SSE",
                true,
                "data: {\"object\":\"text_completion\",\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"object\":\"text_completion\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\ndata: [DONE]\n\n",
                Some(5),
                Some(1),
            ),
            (
                "responses SSE",
                true,
                "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"status\":\"in_progress\",\"usage\":null}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":9,\"output_tokens\":6,\"total_tokens\":15}}}\n\n",
                Some(9),
                Some(6),
            ),
        ];
        for (api, sse, body, prompt, completion) in cases {
            for split in [1, 13, body.len()] {
                assert_eq!(
                    pc(fed(*sse, body, split)),
                    (*prompt, *completion),
                    "{api}, split {split}"
                );
            }
        }
        let u = fed(false, cases[3].2, 7).unwrap();
        assert_eq!(u.cached_tokens, Some(4));
    }

    #[test]
    fn real_vllm_responses() {
        let chat = std::fs::read(format!("{FIXTURES}/response_chat.json")).unwrap();
        let expected: Value = serde_json::from_slice(&chat).unwrap();
        let u = usage_of(&chat).unwrap();
        let completion = std::fs::read(format!("{FIXTURES}/response_completion.json")).unwrap();
        let want: Value = serde_json::from_slice(&completion).unwrap();
        assert_eq!(
            pc(usage_of(&completion)),
            (
                want["usage"]["prompt_tokens"].as_u64(),
                want["usage"]["completion_tokens"].as_u64()
            )
        );
        assert_eq!(u.prompt_tokens, expected["usage"]["prompt_tokens"].as_u64());
        assert_eq!(
            u.completion_tokens,
            expected["usage"]["completion_tokens"].as_u64()
        );
        assert!(u.prompt_tokens.unwrap() > 0);

        let stream = std::fs::read(format!("{FIXTURES}/response_stream.txt")).unwrap();
        let mut p = UsageParser::new(true);
        for c in stream.chunks(100) {
            p.feed(c);
        }
        let text = String::from_utf8_lossy(&stream);
        let u = p.finish();
        if text.contains("\"usage\":{") {
            assert!(u.and_then(|u| u.completion_tokens).is_some(), "{u:?}");
        } else {
            assert_eq!(u, None);
        }
    }
}
