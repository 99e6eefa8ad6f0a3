//! Token usage from model-server responses, read while the bytes pass through.
//!
//! JSON responses carry `usage` in the body; SSE streams carry it in a late `data:` event
//! (OpenAI `stream_options.include_usage`, always on in vLLM's final chunk). The parser
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

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    usage: Option<Value>,
}

fn count(v: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| {
        let n = v.get(*k)?;
        n.as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
    })
}

/// The usage object of one JSON document, if it has one.
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    let env: Envelope = serde_json::from_slice(json).ok()?;
    let u = env.usage?;
    if !u.is_object() {
        return None;
    }
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

    #[test]
    fn real_vllm_responses() {
        let chat = std::fs::read(format!("{FIXTURES}/response_chat.json")).unwrap();
        let expected: Value = serde_json::from_slice(&chat).unwrap();
        let u = usage_of(&chat).unwrap();
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
