//! Placement behaviour of the default profiles, end to end through the director (body parse,
//! snapshot, filters, scorers, picker, prefix-index update), on an idle pool where only the
//! prefix index and the tie-break decide. These are the properties the routing-quality benchmark
//! rests on: unrelated prompts must spread over the pool (a router that sends every tie to the
//! first pod piles sequential low-load traffic onto one server), and prompts that share a
//! prefix must follow it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use endpoint_picker::config::DEFAULT_CONFIG;
use endpoint_picker::datalayer::{Endpoint, Metrics};
use endpoint_picker::request::RequestHeaders;
use endpoint_picker::requestcontrol::{Director, RequestInfo, Subset};
use epp_testkit::director::ready;

const SEED: &str = include_str!("../../../config/default-plugins.yaml");
const PODS: usize = 4;

fn director(config: &str, seed: u64) -> Director {
    let (director, store) = epp_testkit::director::director(config, seed);
    store.set_endpoints(
        (0..PODS).map(|i| Endpoint::from_address(format!("10.0.0.{}:8000", i + 1).parse().unwrap())),
    );
    for e in store.load().endpoints() {
        store.update_metrics(&e.endpoint, Metrics::default());
    }
    director
}

fn info() -> RequestInfo {
    RequestInfo::from_headers(RequestHeaders::new(vec![(
        ":path".into(),
        "/v1/chat/completions".into(),
    )]))
}

/// A chat body whose system prompt is `system` repeated to about 2,000 characters.
fn chat(system: &str, question: &str) -> Vec<u8> {
    serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": system.repeat(2_000 / system.len() + 1)},
        {"role": "user", "content": question}
    ]})
    .to_string()
    .into_bytes()
}

fn pick(d: &Director, body: &[u8]) -> String {
    ready(d.route(&info(), body, &Subset::All).unwrap()).destinations
}

#[test]
fn sequential_unrelated_prompts_spread_over_an_idle_pool() {
    for (name, config) in [("seed", SEED), ("built-in default", DEFAULT_CONFIG)] {
        for seed in 1..=5 {
            let d = director(config, seed);
            let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
            for i in 0..40 {
                let body = chat(&format!("group {i} has its own instructions. "), "hello");
                *per_pod.entry(pick(&d, &body)).or_default() += 1;
            }
            assert_eq!(
                per_pod.len(),
                PODS,
                "{name}/{seed}: every pod gets work: {per_pod:?}"
            );
            let most = per_pod.values().max().copied().unwrap_or(0);
            assert!(
                most <= 20,
                "{name}/{seed}: no pod takes half of 40 prompts: {per_pod:?}"
            );
        }
    }
}

#[test]
fn prompts_that_share_a_prefix_follow_it() {
    for (name, config) in [("seed", SEED), ("built-in default", DEFAULT_CONFIG)] {
        let d = director(config, 7);
        let groups: Vec<String> = (0..8).map(|g| format!("system prompt of group {g}. ")).collect();
        let homes: Vec<String> = groups
            .iter()
            .map(|g| pick(&d, &chat(g, "first question")))
            .collect();
        for round in 0..5 {
            for (g, system) in groups.iter().enumerate() {
                let got = pick(&d, &chat(system, &format!("question {round} of group {g}")));
                assert_eq!(got, homes[g], "{name}: group {g} round {round} left its pod");
            }
        }
        let distinct: BTreeSet<&String> = homes.iter().collect();
        assert!(
            distinct.len() >= 3,
            "{name}: 8 groups land on at least 3 of 4 pods: {homes:?}"
        );
    }
}

#[test]
fn a_busy_pod_loses_new_prefixes_to_idle_ones() {
    let d = director(DEFAULT_CONFIG, 3);
    let store = d.store();
    let busy = store.load().endpoints()[0].endpoint.clone();
    store.update_metrics(
        &busy,
        Metrics {
            waiting_queue: 10,
            kv_cache_usage: 0.9,
            ..Metrics::default()
        },
    );
    for i in 0..40 {
        let got = pick(&d, &chat(&format!("fresh prompt {i}. "), "q"));
        assert_ne!(got, busy.hostport.to_string(), "prompt {i} went to the busy pod");
    }
}
