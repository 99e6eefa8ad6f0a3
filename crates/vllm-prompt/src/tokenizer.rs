//! The model's tokenizer, as vLLM applies it, with a bounded cache of encoded segments.
//!
//! vLLM tokenizes with Hugging Face `tokenizers` through `transformers`; this module uses the
//! same library (the `tokenizers` crate) on the same `tokenizer.json`, with truncation and
//! padding off (as `transformers` calls it for a prompt).
//!
//! **Segments.** `tokenizers` first splits the text at added tokens (`<|user|>`, `<|end|>`,
//! ...) and encodes the pieces between them independently, so a text cut right after an added
//! token encodes to the concatenation of its parts' encodings. [`Tokenizer::encode`] cuts
//! there and caches each part's ids by a 128-bit hash of its bytes: a chat's system prompt
//! and earlier turns are encoded once, then found again. Only tokens after which a cut cannot
//! change the result are cut points: not normalized, no `rstrip`, no `single_word`. Special
//! tokens the post-processor adds (BOS) are added around the whole, as its template says.

use std::path::Path;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use xxhash_rust::xxh3::xxh3_128;

/// Token ids of one encoded segment or prompt.
pub type Ids = Arc<[u32]>;

/// Why the tokenizer could not be loaded or could not encode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` could not be read or parsed.
    #[error("cannot load {path}: {message}")]
    Load {
        /// The file.
        path: String,
        /// The library's message.
        message: String,
    },
    /// Encoding failed (a text the model cannot represent).
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Bytes the segment cache may hold by default: 64 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// Segments shorter than this are encoded without looking at the cache: hashing and a cache
/// lookup cost about what encoding a few words does.
const MIN_CACHED_BYTES: usize = 64;

#[derive(Clone)]
struct IdsWeight;

impl Weighter<u128, Ids> for IdsWeight {
    fn weight(&self, _key: &u128, ids: &Ids) -> u64 {
        // The ids, the Arc's counts and the entry's key and bookkeeping.
        (ids.len() * 4 + 64) as u64
    }
}

/// What the tokenizer adds around a prompt when asked for special tokens (BOS, EOS), found
/// by encoding a probe with and without them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Specials {
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

/// See the module docs. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    cuts: Option<Cuts>,
    specials: Specials,
    cache: Cache<u128, Ids, IdsWeight>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("specials", &self.specials)
            .field("cached_segments", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// The added tokens, matched as `tokenizers` matches them (leftmost-longest), and which of
/// them a text may be cut after.
struct Cuts {
    matcher: AhoCorasick,
    cut_after: Vec<bool>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from `path` (a file), with a segment cache of `cache_bytes`.
    pub fn from_file(path: &Path, cache_bytes: u64) -> Result<Self, TokenizerError> {
        let load = |message: String| TokenizerError::Load {
            path: path.display().to_string(),
            message,
        };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| load(e.to_string()))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| load(e.to_string()))?;
        let cuts = Cuts::new(&inner);
        let mut t = Self {
            inner,
            cuts,
            specials: Specials::default(),
            cache: Cache::with_weighter(
                (cache_bytes / 256).max(16) as usize,
                cache_bytes.max(1 << 16),
                IdsWeight,
            ),
        };
        t.specials = t.probe_specials().map_err(|e| load(e.to_string()))?;
        if !t.cuts_are_exact() {
            // A pre-tokenizer that looks at a piece's offset (Metaspace's `prepend_scheme:
            // first`, say) encodes a piece differently on its own: encode whole texts.
            t.cuts = None;
        }
        Ok(t)
    }

    /// Whether cutting after added tokens gives `tokenizers`' own ids, on probes around each
    /// cut token.
    fn cuts_are_exact(&self) -> bool {
        if self.cuts.is_none() {
            return true;
        }
        let tokens: Vec<String> = self
            .inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| !t.normalized && !t.rstrip && !t.single_word && !t.content.is_empty())
            .map(|t| t.content)
            .take(32)
            .collect();
        tokens.iter().all(|t| {
            [
                format!("a{t}b c"),
                format!("{t} hello world{t}\n x"),
                format!("  {t}  two  {t}"),
                format!("x{t}{t}y"),
            ]
            .iter()
            .all(|probe| {
                let whole = self.encode_uncached(probe, false).ok();
                let mut cut = Vec::new();
                let ok = self.segments(probe).all(|seg| {
                    self.encode_uncached(seg, false)
                        .map(|ids| cut.extend(ids))
                        .is_ok()
                });
                ok && whole.as_ref() == Some(&cut)
            })
        })
    }

    /// Finds the ids the post-processor puts before and after a sequence.
    fn probe_specials(&self) -> Result<Specials, TokenizerError> {
        let plain = self.encode_uncached("a", false)?;
        let with = self.encode_uncached("a", true)?;
        let Some(at) = with.windows(plain.len().max(1)).position(|w| w == &plain[..]) else {
            return Ok(Specials::default());
        };
        Ok(Specials {
            prefix: with[..at].to_vec(),
            suffix: with[at + plain.len()..].to_vec(),
        })
    }

    fn encode_uncached(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The ids of `text`, with the tokenizer's special tokens around them when
    /// `add_special_tokens` (vLLM: `true` for completions, `false` for chat unless the request
    /// says otherwise). Equal to `tokenizers`' own `encode(text, add_special_tokens)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        if add_special_tokens {
            out.extend_from_slice(&self.specials.prefix);
        }
        for segment in self.segments(text) {
            self.encode_segment(segment, &mut out)?;
        }
        if add_special_tokens {
            out.extend_from_slice(&self.specials.suffix);
        }
        Ok(out)
    }

    /// Appends `segment`'s ids to `out`, from the cache when it has them.
    fn encode_segment(&self, segment: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        if segment.len() < MIN_CACHED_BYTES {
            out.extend(self.encode_uncached(segment, false)?);
            return Ok(());
        }
        let key = xxh3_128(segment.as_bytes());
        let ids = match self.cache.get(&key) {
            Some(ids) => ids,
            None => {
                let ids: Ids = self.encode_uncached(segment, false)?.into();
                self.cache.insert(key, ids.clone());
                ids
            }
        };
        out.extend_from_slice(&ids);
        Ok(())
    }

    /// Bytes of `text` whose segments are not in the cache: what encoding it would cost now.
    pub fn uncached_bytes(&self, text: &str) -> usize {
        self.segments(text)
            .filter(|s| s.len() >= MIN_CACHED_BYTES && self.cache.peek(&xxh3_128(s.as_bytes())).is_none())
            .map(str::len)
            .sum()
    }

    /// `text` cut after every added token it may be cut after.
    fn segments<'t>(&self, text: &'t str) -> impl Iterator<Item = &'t str> + 't {
        let mut ends: Vec<usize> = Vec::new();
        if let Some(cuts) = &self.cuts {
            for m in cuts.matcher.find_iter(text) {
                if cuts.cut_after[m.pattern().as_usize()] {
                    ends.push(m.end());
                }
            }
        }
        if ends.last() != Some(&text.len()) {
            ends.push(text.len());
        }
        let mut start = 0;
        ends.into_iter().filter_map(move |end| {
            let s = &text[start..end];
            start = end;
            (!s.is_empty()).then_some(s)
        })
    }

    /// Segments in the cache and the bytes they hold.
    pub fn cache_usage(&self) -> (usize, u64) {
        (self.cache.len(), self.cache.weight())
    }

    /// The id of `token` in the vocabulary (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

impl Cuts {
    fn new(t: &tokenizers::Tokenizer) -> Option<Self> {
        let mut added: Vec<(u32, tokenizers::AddedToken)> =
            t.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        // Normalized added tokens are matched in normalized text, after these; they are never
        // cut points and need not be matched here.
        let added: Vec<tokenizers::AddedToken> = added
            .into_iter()
            .map(|(_, t)| t)
            .filter(|t| !t.normalized && !t.content.is_empty())
            .collect();
        if added.is_empty() {
            return None;
        }
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(added.iter().map(|t| t.content.as_str()))
            .ok()?;
        Some(Self {
            matcher,
            cut_after: added.iter().map(|t| !t.rstrip && !t.single_word).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Tokenizer {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/vllm-0.32-cpu/tokenization"
        );
        Tokenizer::from_file(Path::new(&format!("{dir}/{name}")), 1 << 20).unwrap()
    }

    #[test]
    fn segments_encode_as_the_whole() {
        let t = fixture("tokenizer.json");
        let text = "<|system|>You are helpful and kind, very kind, and you answer in full sentences.<|end|><|user|>hi there  \n\n<|end|><|assistant|>";
        let whole = t.encode_uncached(text, false).unwrap();
        assert_eq!(t.encode(text, false).unwrap(), whole);
        // Twice: the second time from the cache.
        assert_eq!(t.encode(text, false).unwrap(), whole);
        assert!(t.cache_usage().0 >= 1);
        let segs: Vec<&str> = t.segments(text).collect();
        assert_eq!(segs.concat(), text);
        assert!(segs.len() >= 5, "{segs:?}");
        assert_eq!(t.uncached_bytes(text), 0);
        assert!(t.uncached_bytes("a brand new text that nobody encoded before, long enough to count") > 0);
    }

    #[test]
    fn offset_dependent_pre_tokenizers_are_not_cut() {
        // Metaspace with `prepend_scheme: first` adds "▁" only at the start of the whole text:
        // a piece encoded alone would get it too.
        let dir = std::env::temp_dir().join(format!("vllm-prompt-metaspace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 0, "content": "[INST]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": true},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {}, "unk_token": "[UNK]"}
        });
        let mut json = json;
        let mut vocab = serde_json::Map::new();
        vocab.insert("[INST]".into(), 0.into());
        vocab.insert("[UNK]".into(), 1.into());
        for w in ["a", "b", "c", "hello", "world", "two", "x", "y", "hi"] {
            let n = vocab.len();
            vocab.insert(w.into(), n.into());
            vocab.insert(format!("\u{2581}{w}"), (n + 1).into());
        }
        json["model"]["vocab"] = serde_json::Value::Object(vocab);
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let t = Tokenizer::from_file(&path, 1 << 20).unwrap();
        assert!(t.cuts.is_none(), "cutting would change the ids");
        let text = "[INST]hi x";
        assert_eq!(
            t.encode(text, false).unwrap(),
            t.encode_uncached(text, false).unwrap()
        );
        let _ = std::fs::remove_dir_all(&dir);
        // The fixture's byte-level tokenizer is cut.
        assert!(fixture("tokenizer.json").cuts.is_some());
    }

    #[test]
    fn specials_come_from_the_post_processor() {
        let plain = fixture("tokenizer.json");
        assert_eq!(plain.specials, Specials::default());
        let bos = fixture("bos_variant/tokenizer.json");
        assert_eq!(bos.specials.prefix, vec![1]);
        assert_eq!(bos.encode("", true).unwrap(), vec![1]);
        assert_eq!(
            bos.encode("hello", true).unwrap(),
            bos.encode_uncached("hello", true).unwrap()
        );
    }
}
