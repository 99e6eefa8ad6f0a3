//! The producer on the request path: what it finds per candidate from ingested events, the
//! adapter and salt rules, requests without usable tokens, speculative entries and their
//! expiry, and the endpoints it subscribes to.

use tokio::time::{Duration, Instant};

use super::*;
use crate::framework::scheduling::{ProfileRun, Target as ResultTarget, candidates};
use crate::plugins::kvevents::decode::{BlockHash, BlockStored, KvEvent};
use crate::plugins::kvevents::params::PreciseParams;
use crate::plugins::testing::{request, states_at};

fn producer(yaml: &str) -> PreciseProducer {
    let p: PreciseParams = serde_yaml::from_str(yaml).unwrap();
    PreciseProducer::new(
        "precise",
        DataKey::named("tokens-for-test"),
        p.resolve().unwrap(),
        &PluginMetrics::default(),
    )
}

fn stored(tokens: &[u32], lora: Option<&str>, salt: Option<&str>) -> KvEvent {
    let blocks = tokens.len() / 16;
    KvEvent::BlockStored(BlockStored {
        block_hashes: (0..blocks as u64).map(|i| BlockHash::U64(1000 + i)).collect(),
        parent_block_hash: None,
        token_ids: tokens[..blocks * 16].to_vec(),
        block_size: 16,
        lora_id: lora.map(|_| 1),
        medium: Some("GPU".into()),
        lora_name: lora.map(str::to_owned),
        extra_keys: (0..blocks)
            .map(|i| {
                let mut keys: Vec<rmpv::Value> = lora.into_iter().map(rmpv::Value::from).collect();
                if i == 0
                    && let Some(s) = salt
                {
                    keys.push(rmpv::Value::from(s));
                }
                if keys.is_empty() {
                    rmpv::Value::Nil
                } else {
                    rmpv::Value::Array(keys)
                }
            })
            .collect(),
        group_idx: Some(0),
        kv_cache_spec_kind: Some("full_attention".into()),
    })
}

/// The cycle state after `p` prepared `req` with `tokens` as the tokenized prompt.
fn prepared(
    p: &PreciseProducer,
    req: &SchedulingRequest<'_>,
    states: &[EndpointState],
    tokens: &[u32],
) -> CycleState {
    let mut state = CycleState::default();
    state.put(
        DataKey::<TokenizedPrompt>::named("tokens-for-test"),
        TokenizedPrompt {
            prompts: vec![tokens.to_vec()],
            ..TokenizedPrompt::default()
        },
    );
    p.prepare(req, &candidates(states), &mut state);
    state
}

fn matched(
    p: &PreciseProducer,
    req: &SchedulingRequest<'_>,
    states: &[EndpointState],
    tokens: &[u32],
) -> (Vec<u32>, usize) {
    let state = prepared(p, req, states, tokens);
    let m = state.get(p.match_key()).unwrap();
    (m.matched.clone(), m.total_blocks)
}

#[test]
fn finds_what_each_endpoint_stored() {
    let p = producer("{}");
    let s = states_at(&["10.0.0.1:8000", "10.0.0.2:8000"]);
    let tokens: Vec<u32> = (0..100).collect();
    let pod = p.ingest().index().pod(s[1].endpoint.address);
    p.ingest().apply(pod, &[stored(&tokens[..64], None, None)]);
    let headers = Default::default();
    let req = request(&headers, "tiny", b"");
    assert_eq!(matched(&p, &req, &s, &tokens), (vec![0, 4], 6));
    // A salted request never matches unsalted blocks, and finds salted ones.
    let salted = SchedulingRequest {
        cache_salt: Some("tenant-a"),
        ..request(&headers, "tiny", b"")
    };
    assert_eq!(matched(&p, &salted, &s, &tokens).0, vec![0, 0]);
    let pod0 = p.ingest().index().pod(s[0].endpoint.address);
    p.ingest().apply(pod0, &[stored(&tokens, None, Some("tenant-a"))]);
    assert_eq!(matched(&p, &salted, &s, &tokens).0, vec![6, 0]);
}

#[test]
fn adapter_requests_find_adapter_blocks_only() {
    let p = producer("{}");
    let s = states_at(&["10.0.0.1:8000", "10.0.0.2:8000"]);
    let tokens: Vec<u32> = (0..64).collect();
    let (a, b) = (
        p.ingest().index().pod(s[0].endpoint.address),
        p.ingest().index().pod(s[1].endpoint.address),
    );
    p.ingest().apply(a, &[stored(&tokens, Some("tiny-lora"), None)]);
    p.ingest().apply(b, &[stored(&tokens, None, None)]);
    let headers = Default::default();
    assert_eq!(
        matched(&p, &request(&headers, "tiny-lora", b""), &s, &tokens).0,
        vec![4, 0]
    );
    assert_eq!(
        matched(&p, &request(&headers, "tiny", b""), &s, &tokens).0,
        vec![0, 4]
    );
}

#[test]
fn no_tokens_or_unexpanded_media_match_nothing() {
    let p = producer("{}");
    let s = states_at(&["10.0.0.1:8000"]);
    let tokens: Vec<u32> = (0..64).collect();
    let pod = p.ingest().index().pod(s[0].endpoint.address);
    p.ingest().apply(pod, &[stored(&tokens, None, None)]);
    let headers = Default::default();
    let req = request(&headers, "tiny", b"");
    let mut state = CycleState::default();
    p.prepare(&req, &candidates(&s), &mut state);
    assert_eq!(state.get(p.match_key()).unwrap().total_blocks, 0);
    let mut state = CycleState::default();
    state.put(
        DataKey::<TokenizedPrompt>::named("tokens-for-test"),
        TokenizedPrompt {
            prompts: vec![tokens.clone()],
            has_media: true,
            media: Vec::new(),
        },
    );
    p.prepare(&req, &candidates(&s), &mut state);
    assert_eq!(state.get(p.match_key()).unwrap().matched, vec![0]);
}

fn result_for(state: &EndpointState) -> SchedulingResult {
    SchedulingResult {
        runs: vec![ProfileRun {
            profile: 0,
            name: "default".into(),
            outcome: Ok(vec![ResultTarget {
                state: state.clone(),
                index: 0,
            }]),
        }],
        primary: 0,
    }
}

#[tokio::test(start_paused = true)]
async fn speculative_entries_last_their_ttl() {
    let s = states_at(&["10.0.0.1:8000", "10.0.0.2:8000"]);
    let tokens: Vec<u32> = (0..64).collect();
    let headers = Default::default();
    for (yaml, expect) in [
        ("{}", vec![0, 0]),
        ("{speculativeIndexing: true, speculativeTTL: 3s}", vec![0, 4]),
    ] {
        let p = producer(yaml);
        let req = request(&headers, "tiny", b"");
        let state = prepared(&p, &req, &s, &tokens);
        p.pre_request(
            &req,
            &state,
            &result_for(&s[1]),
            &mut PreRequestContext::default(),
        );
        let req = SchedulingRequest {
            now: Instant::now(),
            ..request(&headers, "tiny", b"")
        };
        assert_eq!(matched(&p, &req, &s, &tokens).0, expect, "{yaml}");
        tokio::time::advance(Duration::from_secs(4)).await;
        let later = SchedulingRequest {
            now: Instant::now(),
            ..request(&headers, "tiny", b"")
        };
        assert_eq!(matched(&p, &later, &s, &tokens).0, vec![0, 0], "{yaml}: expired");
    }
}

#[tokio::test(start_paused = true)]
async fn speculative_entries_stay_while_the_request_is_in_flight() {
    let s = states_at(&["10.0.0.1:8000", "10.0.0.2:8000"]);
    let tokens: Vec<u32> = (0..64).collect();
    let headers = Default::default();
    let p = producer("{speculativeIndexing: true, speculativeTTL: 2s}");
    let state = prepared(&p, &request(&headers, "tiny", b""), &s, &tokens);
    let mut in_flight = PreRequestContext::default();
    p.pre_request(
        &request(&headers, "tiny", b""),
        &state,
        &result_for(&s[1]),
        &mut in_flight,
    );
    assert_eq!(in_flight.held(), 1);
    let at = || SchedulingRequest {
        now: Instant::now(),
        ..request(&headers, "tiny", b"")
    };
    // Queued at the engine for 10 s, five TTLs: the pick still counts.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(matched(&p, &at(), &s, &tokens).0, vec![0, 4]);
    // The request ends (its stream drops what it held): the TTL runs from here.
    drop(in_flight);
    tokio::time::advance(Duration::from_millis(1500)).await;
    assert_eq!(matched(&p, &at(), &s, &tokens).0, vec![0, 4]);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(matched(&p, &at(), &s, &tokens).0, vec![0, 0]);
}

#[test]
fn subscribes_to_each_endpoint_at_its_rank() {
    let p = producer(
        "kvEventsConfig: {podDiscoveryConfig: {socketPort: 6000, replaySocketPort: 7000, podLabelSelector: \"kv=on\"}}",
    );
    let mut states = states_at(&["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000"]);
    let relabel = |s: &EndpointState, name: &str, kv: bool| {
        let mut e = (*s.endpoint).clone();
        e.name = name.into();
        if kv {
            e.labels.insert("kv".into(), "on".into());
        }
        EndpointState::new(Arc::new(e))
    };
    states[0] = relabel(&states[0], "pod-a-rank-0", true);
    states[1] = relabel(&states[1], "pod-a-rank-1", true);
    states[2] = relabel(&states[2], "pod-b", false);
    let t = p.targets(&states);
    assert_eq!(
        t.iter()
            .map(|t| (t.endpoint.as_str(), t.replay.as_deref()))
            .collect::<Vec<_>>(),
        vec![
            ("tcp://10.0.0.1:6000", Some("tcp://10.0.0.1:7000")),
            ("tcp://10.0.0.1:6001", Some("tcp://10.0.0.1:7001")),
        ]
    );
    // Without wiring and without a central socket it would hear nothing.
    assert!(p.idle().is_some());
    assert!(p.attach().is_ok());
    assert!(p.idle().is_none());
    let off = producer("kvEventsConfig: {discoverPods: false}");
    assert!(off.attach().unwrap_err().contains("discoverPods"));
    assert!(
        producer("kvEventsConfig: {zmqEndpoint: \"tcp://*:5557\"}")
            .idle()
            .is_none()
    );
}
