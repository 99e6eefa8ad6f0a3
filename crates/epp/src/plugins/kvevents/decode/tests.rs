//! Golden tests on the captures of a real vLLM 0.32 server (`fixtures/vllm-0.32-cpu`): every
//! message of the three KV-event captures decodes to what the capture's JSON lines say.

use serde_json::Value as Json;

use super::*;

use crate::plugins::kvevents::testing::FIXTURES;

use crate::plugins::kvevents::testing::messages;

fn json_hash(v: &Json) -> Option<BlockHash> {
    match v {
        Json::Null => None,
        Json::Number(n) => Some(BlockHash::U64(n.as_u64().unwrap())),
        Json::Object(o) => Some(BlockHash::Bytes(
            (0..o["__bytes_hex__"].as_str().unwrap().len() / 2)
                .map(|i| {
                    u8::from_str_radix(&o["__bytes_hex__"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap()
                })
                .collect(),
        )),
        other => panic!("a hash {other}"),
    }
}

fn check_capture(dir: &str) -> (usize, usize) {
    let bin = messages(&format!("{dir}kv_events.bin"));
    let lines: Vec<Json> = std::fs::read_to_string(format!("{FIXTURES}/{dir}kv_events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(bin.len(), lines.len(), "{dir}");
    let mut stored_blocks = 0;
    for (frames, line) in bin.iter().zip(&lines) {
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let m = decode_frames(&refs).unwrap();
        assert_eq!(m.topic, line["topic"].as_str().unwrap());
        assert_eq!(m.seq, line["seq"].as_u64().unwrap());
        let payload = line["payload"].as_array().unwrap();
        // The JSON lines print the timestamp rounded.
        assert!((m.ts - payload[0].as_f64().unwrap()).abs() < 1e-6, "{}", m.ts);
        assert_eq!(m.dp_rank, payload.get(2).and_then(Json::as_i64));
        let events = payload[1].as_array().unwrap();
        assert_eq!(m.events.len(), events.len());
        for (e, j) in m.events.iter().zip(events) {
            let hashes = |j: &Json| -> Vec<BlockHash> {
                j["block_hashes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(json_hash)
                    .collect()
            };
            match (e, j["type"].as_str().unwrap()) {
                (KvEvent::BlockStored(s), "BlockStored") => {
                    assert_eq!(s.block_hashes, hashes(j));
                    assert_eq!(s.parent_block_hash, json_hash(&j["parent_block_hash"]));
                    let tokens: Vec<u32> = j["token_ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_u64().unwrap() as u32)
                        .collect();
                    assert_eq!(s.token_ids, tokens);
                    assert_eq!(u64::from(s.block_size), j["block_size"].as_u64().unwrap());
                    assert_eq!(s.lora_name.as_deref(), j["lora_name"].as_str());
                    assert_eq!(s.lora_id, j["lora_id"].as_i64());
                    assert_eq!(s.medium.as_deref(), j["medium"].as_str());
                    // Exactly block_size tokens per block.
                    assert_eq!(s.token_ids.len(), s.block_hashes.len() * s.block_size as usize);
                    stored_blocks += s.block_hashes.len();
                }
                (
                    KvEvent::BlockRemoved {
                        block_hashes, medium, ..
                    },
                    "BlockRemoved",
                ) => {
                    assert_eq!(*block_hashes, hashes(j));
                    assert_eq!(medium.as_deref(), j["medium"].as_str());
                }
                (KvEvent::AllBlocksCleared, "AllBlocksCleared") => {}
                (e, t) => panic!("{t} decoded as {e:?}"),
            }
        }
    }
    (bin.len(), stored_blocks)
}

#[test]
fn every_message_of_the_real_captures_decodes() {
    assert_eq!(check_capture("").0, 65);
    let (n, _) = check_capture("variant_lora_cbor/");
    assert_eq!(n, 50);
    let (n, blocks) = check_capture("tokenization/kv/");
    assert_eq!(n, 10);
    assert!(blocks > 0);
}

#[test]
fn the_lora_capture_names_its_adapter_and_clears_the_cache() {
    let mut lora = 0;
    let mut cleared = 0;
    for frames in messages("variant_lora_cbor/kv_events.bin") {
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        for e in decode_frames(&refs).unwrap().events {
            match e {
                KvEvent::BlockStored(s) if s.lora_name.as_deref() == Some("tiny-lora") => lora += 1,
                KvEvent::AllBlocksCleared => cleared += 1,
                _ => {}
            }
        }
    }
    assert!(lora > 0, "no BlockStored of the adapter");
    assert_eq!(cleared, 2);
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

#[test]
fn the_positional_form_and_byte_hashes() {
    let stored = Value::Array(vec![
        "BlockStored".into(),
        Value::Array(vec![Value::Binary(vec![1, 2, 3]), Value::from(u64::MAX)]),
        Value::Nil,
        Value::Array((0..4u32).map(Value::from).collect()),
        Value::from(2u32),
        Value::Nil,
        "GPU".into(),
    ]);
    let removed = Value::Array(vec![
        "BlockRemoved".into(),
        Value::Array(vec![Value::from(-1i64)]),
    ]);
    let payload = encode(&Value::Array(vec![
        Value::F64(1.5),
        Value::Array(vec![
            stored,
            removed,
            Value::Array(vec!["AllBlocksCleared".into()]),
        ]),
    ]));
    let m = decode_frames(&[b"kv@10.0.0.1:8000@m", &7u64.to_be_bytes(), &payload]).unwrap();
    assert_eq!(
        (m.topic.as_str(), m.seq, m.ts, m.dp_rank),
        ("kv@10.0.0.1:8000@m", 7, 1.5, None)
    );
    let KvEvent::BlockStored(s) = &m.events[0] else {
        panic!("{:?}", m.events[0])
    };
    assert_eq!(
        s.block_hashes,
        [BlockHash::Bytes(vec![1, 2, 3]), BlockHash::U64(u64::MAX)]
    );
    assert_eq!(
        (s.block_size, s.medium.as_deref(), s.token_ids.len()),
        (2, Some("GPU"), 4)
    );
    // A hash written as a negative (signed) integer is the same 64 bits.
    assert_eq!(
        m.events[1],
        KvEvent::BlockRemoved {
            block_hashes: vec![BlockHash::U64(u64::MAX)],
            medium: None,
            group_idx: None,
        }
    );
    assert_eq!(m.events[2], KvEvent::AllBlocksCleared);
}

#[test]
fn malformed_messages_are_errors_never_panics() {
    let ok = encode(&Value::Array(vec![Value::F64(1.0), Value::Array(vec![])]));
    assert_eq!(decode_frames(&[b"t", &[0; 8]]), Err(DecodeError::Frames(2)));
    assert_eq!(
        decode_frames(&[b"t", &[0; 4], &ok]),
        Err(DecodeError::Sequence(4))
    );
    // A truncated payload (an array of two with nothing after it).
    assert!(matches!(
        decode_frames(&[b"t", &[0; 8], &[0x92]]),
        Err(DecodeError::Msgpack(_))
    ));
    for bad in [
        Value::from(3),
        Value::Array(vec![]),
        Value::Array(vec![Value::F64(1.0), Value::from(1)]),
        Value::Array(vec![Value::F64(1.0), Value::Array(vec![Value::from(1)])]),
        Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Array(vec!["Nope".into()])]),
        ]),
        Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Array(vec![
                "BlockStored".into(),
                Value::Array(vec!["x".into()]),
            ])]),
        ]),
    ] {
        assert!(
            matches!(
                decode_frames(&[b"t", &[0; 8], &encode(&bad)]),
                Err(DecodeError::Shape(_))
            ),
            "{bad}"
        );
    }
}
