//! vLLM's KV-cache event messages, decoded. A message is three ZMQ frames: the topic
//! (`kv@<ip:port>@<model>` when vLLM is configured as the reference expects), an 8-byte
//! big-endian sequence number, and a msgpack payload `[ts, events, data_parallel_rank]`.
//!
//! Events are msgspec structs tagged by type. vLLM 0.32 writes each as a map whose `"type"`
//! key names it (fields at their default left out); older releases and SGLang write the
//! positional form (`array_like`): `[tag, field, ...]` in declaration order, trailing defaults
//! left out. Both are read. Block hashes are `u64` (often above `i64::MAX`) or byte strings
//! (`sha256` hashing with byte output); either is kept as it came.
//!
//! Field order of the positional form, as vLLM's `vllm/distributed/kv_events.py` declares it:
//! `BlockStored`: block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//! lora_name, extra_keys, group_idx, kv_cache_spec_kind; `BlockRemoved`: block_hashes, medium,
//! group_idx; `AllBlocksCleared`: nothing.

use rmpv::Value;

/// One engine block hash, as the engine sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BlockHash {
    /// vLLM's default (`builtin` or `sha256_cbor` folded to 64 bits).
    U64(u64),
    /// Raw digest bytes.
    Bytes(Vec<u8>),
}

/// One stored run of contiguous blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    /// The blocks' hashes, first to last.
    pub block_hashes: Vec<BlockHash>,
    /// The hash of the block before the first; `None` at the root of a sequence.
    pub parent_block_hash: Option<BlockHash>,
    /// The blocks' tokens: exactly `block_size` per hash, or none when the engine sent none.
    pub token_ids: Vec<u32>,
    /// Tokens per block (≥ 1).
    pub block_size: u32,
    /// LoRA adapter id, when the blocks belong to one.
    pub lora_id: Option<i64>,
    /// Storage tier (`GPU`, `CPU_PINNED`, ...); `None` when the engine left it out.
    pub medium: Option<String>,
    /// LoRA adapter name, when sent (vLLM 0.11+).
    pub lora_name: Option<String>,
    /// Per-block extra keys (multimodal hashes, `cache_salt`), as sent: one entry per block,
    /// `Nil` when a block has none.
    pub extra_keys: Vec<Value>,
    /// KV-cache group (hybrid models).
    pub group_idx: Option<i64>,
    /// The group's attention kind (`full_attention`, `sliding_window`, ...), when sent.
    pub kv_cache_spec_kind: Option<String>,
}

/// One cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Blocks became resident.
    BlockStored(BlockStored),
    /// Blocks were evicted.
    BlockRemoved {
        /// The evicted blocks' hashes.
        block_hashes: Vec<BlockHash>,
        /// Storage tier.
        medium: Option<String>,
        /// KV-cache group (hybrid models).
        group_idx: Option<i64>,
    },
    /// Every block was dropped (a cache reset).
    AllBlocksCleared,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMessage {
    /// The ZMQ topic.
    pub topic: String,
    /// The publisher's sequence number (from 0; a gap means lost messages).
    pub seq: u64,
    /// Engine time of the batch (seconds since the epoch).
    pub ts: f64,
    /// The events, in order.
    pub events: Vec<KvEvent>,
    /// The data-parallel rank that published it, when sent.
    pub dp_rank: Option<i64>,
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not three frames.
    #[error("a KV-event message has 3 frames (topic, sequence, payload), not {0}")]
    Frames(usize),
    /// The sequence frame is not 8 bytes.
    #[error("the sequence frame must be 8 bytes, not {0}")]
    Sequence(usize),
    /// The payload is not msgpack.
    #[error("the payload is not msgpack: {0}")]
    Msgpack(String),
    /// The payload or an event has the wrong shape.
    #[error("unexpected payload: {0}")]
    Shape(String),
}

fn shape(what: impl Into<String>) -> DecodeError {
    DecodeError::Shape(what.into())
}

/// Decodes one message from its frames.
pub fn decode_frames(frames: &[&[u8]]) -> Result<EventMessage, DecodeError> {
    let [topic, seq, payload] = frames else {
        return Err(DecodeError::Frames(frames.len()));
    };
    let seq: [u8; 8] = (*seq).try_into().map_err(|_| DecodeError::Sequence(seq.len()))?;
    let (ts, events, dp_rank) = decode_payload(payload)?;
    Ok(EventMessage {
        topic: String::from_utf8_lossy(topic).into_owned(),
        seq: u64::from_be_bytes(seq),
        ts,
        events,
        dp_rank,
    })
}

/// Decodes a payload: `(ts, events, data_parallel_rank)`.
pub fn decode_payload(mut payload: &[u8]) -> Result<(f64, Vec<KvEvent>, Option<i64>), DecodeError> {
    let value = rmpv::decode::read_value(&mut payload).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    let Value::Array(parts) = value else {
        return Err(shape("the payload is not an array"));
    };
    let ts = parts
        .first()
        .and_then(|v| v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)))
        .ok_or_else(|| shape("no timestamp"))?;
    let Some(Value::Array(list)) = parts.get(1) else {
        return Err(shape("no event list"));
    };
    let events = list.iter().map(event).collect::<Result<Vec<_>, _>>()?;
    let dp_rank = parts.get(2).and_then(Value::as_i64);
    Ok((ts, events, dp_rank))
}

/// The fields of an event by name: from a map (`"type"` names it) or from the positional form.
fn event(v: &Value) -> Result<KvEvent, DecodeError> {
    const STORED: [&str; 10] = [
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
    ];
    const REMOVED: [&str; 3] = ["block_hashes", "medium", "group_idx"];
    let (tag, fields): (&str, Vec<(&str, &Value)>) = match v {
        Value::Map(entries) => {
            let tag = entries
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .and_then(|(_, v)| v.as_str())
                .ok_or_else(|| shape("an event map without \"type\""))?;
            let fields = entries
                .iter()
                .filter_map(|(k, v)| Some((k.as_str()?, v)))
                .collect();
            (tag, fields)
        }
        Value::Array(items) => {
            let tag = items
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| shape("a positional event without its tag"))?;
            let names: &[&str] = match tag {
                "BlockStored" => &STORED,
                "BlockRemoved" => &REMOVED,
                _ => &[],
            };
            (tag, names.iter().copied().zip(items.iter().skip(1)).collect())
        }
        _ => return Err(shape("an event is neither a map nor an array")),
    };
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_nil())
    };
    match tag {
        "BlockStored" => {
            let block_hashes = hashes(get("block_hashes"))?;
            let token_ids = match get("token_ids") {
                Some(Value::Array(ts)) => ts
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| shape("a token id that is not a u32"))?,
                None => Vec::new(),
                Some(_) => return Err(shape("token_ids is not a list")),
            };
            let block_size = get("block_size")
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .filter(|b| *b > 0)
                .ok_or_else(|| shape("BlockStored without a positive block_size"))?;
            // vLLM sends exactly `block_size` tokens per hash; anything else cannot be keyed.
            if !token_ids.is_empty()
                && token_ids.len() != block_hashes.len().saturating_mul(block_size as usize)
            {
                return Err(shape(format!(
                    "BlockStored with {} tokens for {} blocks of {block_size}",
                    token_ids.len(),
                    block_hashes.len()
                )));
            }
            Ok(KvEvent::BlockStored(BlockStored {
                block_hashes,
                parent_block_hash: get("parent_block_hash").map(hash).transpose()?,
                token_ids,
                block_size,
                lora_id: get("lora_id").and_then(Value::as_i64),
                medium: get("medium").and_then(Value::as_str).map(str::to_owned),
                lora_name: get("lora_name").and_then(Value::as_str).map(str::to_owned),
                extra_keys: match get("extra_keys") {
                    Some(Value::Array(keys)) => keys.clone(),
                    _ => Vec::new(),
                },
                group_idx: get("group_idx").and_then(Value::as_i64),
                kv_cache_spec_kind: get("kv_cache_spec_kind")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            }))
        }
        "BlockRemoved" => Ok(KvEvent::BlockRemoved {
            block_hashes: hashes(get("block_hashes"))?,
            medium: get("medium").and_then(Value::as_str).map(str::to_owned),
            group_idx: get("group_idx").and_then(Value::as_i64),
        }),
        "AllBlocksCleared" => Ok(KvEvent::AllBlocksCleared),
        other => Err(shape(format!("unknown event type {other:?}"))),
    }
}

fn hash(v: &Value) -> Result<BlockHash, DecodeError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .map(BlockHash::U64)
            // A signed encoder writes hashes above i64::MAX as negative numbers.
            .or_else(|| i.as_i64().map(|i| BlockHash::U64(i as u64)))
            .ok_or_else(|| shape("a block hash out of range")),
        Value::Binary(b) => Ok(BlockHash::Bytes(b.clone())),
        _ => Err(shape("a block hash that is neither an integer nor bytes")),
    }
}

fn hashes(v: Option<&Value>) -> Result<Vec<BlockHash>, DecodeError> {
    match v {
        Some(Value::Array(items)) => items.iter().map(hash).collect(),
        None => Ok(Vec::new()),
        Some(_) => Err(shape("block_hashes is not a list")),
    }
}

#[cfg(test)]
mod tests;
