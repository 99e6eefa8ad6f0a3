//! Workloads of the routing-quality benchmark, modelled on inference-perf's `shared_prefix`
//! data set: groups of requests that share a long system prompt and differ in a short
//! question. Also a multi-turn chat (each turn extends the conversation so far) and a control
//! without shared prefixes. Text is made of words from a fixed list, so one token of the
//! simulator (4 bytes) is about one word piece; everything is deterministic for a seed.
#![allow(dead_code)]

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

const WORDS: &[&str] = &[
    "alpha", "bravo", "cargo", "delta", "ember", "fjord", "gamma", "harbor", "ivory", "jade", "karma",
    "lunar", "maple", "nexus", "orbit", "prism", "quartz", "raven", "solar", "tango", "umber", "vivid",
    "wharf", "xenon", "yield", "zephyr", "amber", "basil", "cedar", "dune", "equinox", "fable",
];

/// About `tokens` × 4 bytes of words from `rng`.
pub fn text(rng: &mut SmallRng, tokens: usize) -> String {
    let mut out = String::with_capacity(tokens * 4 + 8);
    while out.len() < tokens * 4 {
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        out.push(' ');
    }
    out.truncate(tokens * 4);
    out
}

/// What to send.
#[derive(Debug, Clone)]
pub enum Workload {
    /// Groups sharing a system prompt (inference-perf `shared_prefix`).
    SharedPrefix {
        /// Number of groups (distinct system prompts).
        groups: usize,
        /// Distinct questions per group.
        prompts_per_group: usize,
        /// System prompt length in tokens.
        system_prompt_len: usize,
        /// Question length in tokens.
        question_len: usize,
        /// Output tokens per request.
        output_len: usize,
    },
    /// Conversations whose every turn resends the whole conversation.
    MultiTurn {
        /// Concurrent conversations.
        conversations: usize,
        /// Turns before a conversation starts over.
        turns: usize,
        /// System prompt length in tokens (one per conversation).
        system_prompt_len: usize,
        /// User turn length in tokens.
        turn_len: usize,
        /// Output tokens per turn.
        output_len: usize,
    },
    /// No shared prefix at all.
    Control {
        /// Prompt length in tokens.
        prompt_len: usize,
        /// Output tokens per request.
        output_len: usize,
    },
}

/// One request body and what it belongs to.
#[derive(Debug, Clone)]
pub struct Request {
    /// Chat completions body (streaming with usage).
    pub body: String,
    /// Group or conversation index (for spread analysis).
    pub group: usize,
}

fn chat_body(messages: Vec<serde_json::Value>, output_len: usize) -> String {
    serde_json::json!({
        "model": "tiny",
        "messages": messages,
        "max_tokens": output_len,
        // Real servers stop at an end-of-sequence token; the length is the workload's.
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

impl Workload {
    /// The benchmark's default shared-prefix workload.
    pub fn shared_prefix() -> Self {
        Self::SharedPrefix {
            groups: 12,
            prompts_per_group: 32,
            system_prompt_len: 1200,
            question_len: 32,
            output_len: 24,
        }
    }

    /// Short label.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SharedPrefix { .. } => "shared_prefix",
            Self::MultiTurn { .. } => "multi_turn",
            Self::Control { .. } => "control",
        }
    }

    /// Whether a group's requests wait for the previous one's response (a conversation's next
    /// turn is written after the answer, as inference-perf's multi-turn sessions do).
    pub fn closed_loop(&self) -> bool {
        matches!(self, Self::MultiTurn { .. })
    }

    /// Requests that differ: each question of each group, each turn of each conversation;
    /// for the control, 100.
    pub fn distinct(&self) -> usize {
        match *self {
            Self::SharedPrefix {
                groups,
                prompts_per_group,
                ..
            } => groups * prompts_per_group,
            Self::MultiTurn {
                conversations, turns, ..
            } => conversations * turns,
            Self::Control { .. } => 100,
        }
    }

    /// `count` requests for a closed loop, deterministic for `seed`: for `shared_prefix`, every
    /// question of every group once in a shuffled order (then again, reshuffled, while `count`
    /// asks for more), so that a group's first request is its only cold one under perfect
    /// affinity; otherwise as [`Self::requests`].
    pub fn requests_once(&self, count: usize, seed: u64) -> Vec<Request> {
        let Self::SharedPrefix {
            groups,
            prompts_per_group,
            system_prompt_len,
            question_len,
            output_len,
        } = *self
        else {
            return self.requests(count, seed);
        };
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut order = Vec::with_capacity(count);
        while order.len() < count {
            let mut pass: Vec<(usize, usize)> = (0..groups)
                .flat_map(|g| (0..prompts_per_group).map(move |q| (g, q)))
                .collect();
            pass.shuffle(&mut rng);
            order.extend(pass);
        }
        order.truncate(count);
        order
            .into_iter()
            .map(|(g, q)| {
                let system = text(&mut SmallRng::seed_from_u64(1000 + g as u64), system_prompt_len);
                // The group's questions come from one generator, as in `requests`.
                let mut r = SmallRng::seed_from_u64(5000 + g as u64);
                let question = (0..=q)
                    .map(|_| text(&mut r, question_len))
                    .last()
                    .unwrap_or_default();
                Request {
                    body: chat_body(
                        vec![
                            serde_json::json!({"role": "system", "content": system}),
                            serde_json::json!({"role": "user", "content": question}),
                        ],
                        output_len,
                    ),
                    group: g,
                }
            })
            .collect()
    }

    /// `count` requests in arrival order, deterministic for `seed`.
    pub fn requests(&self, count: usize, seed: u64) -> Vec<Request> {
        let mut rng = SmallRng::seed_from_u64(seed);
        match *self {
            Self::SharedPrefix {
                groups,
                prompts_per_group,
                system_prompt_len,
                question_len,
                output_len,
            } => {
                let systems: Vec<String> = (0..groups)
                    .map(|g| text(&mut SmallRng::seed_from_u64(1000 + g as u64), system_prompt_len))
                    .collect();
                let questions: Vec<Vec<String>> = (0..groups)
                    .map(|g| {
                        let mut r = SmallRng::seed_from_u64(5000 + g as u64);
                        (0..prompts_per_group)
                            .map(|_| text(&mut r, question_len))
                            .collect()
                    })
                    .collect();
                (0..count)
                    .map(|_| {
                        let g = rng.random_range(0..groups);
                        let q = rng.random_range(0..prompts_per_group);
                        Request {
                            body: chat_body(
                                vec![
                                    serde_json::json!({"role": "system", "content": systems[g]}),
                                    serde_json::json!({"role": "user", "content": questions[g][q]}),
                                ],
                                output_len,
                            ),
                            group: g,
                        }
                    })
                    .collect()
            }
            Self::MultiTurn {
                conversations,
                turns,
                system_prompt_len,
                turn_len,
                output_len,
            } => {
                let mut history: Vec<Vec<serde_json::Value>> = (0..conversations)
                    .map(|c| {
                        let sys = text(&mut SmallRng::seed_from_u64(9000 + c as u64), system_prompt_len);
                        vec![serde_json::json!({"role": "system", "content": sys})]
                    })
                    .collect();
                (0..count)
                    .map(|_| {
                        let c = rng.random_range(0..conversations);
                        if history[c].len() > 2 * turns {
                            history[c].truncate(1);
                        }
                        if history[c].len() > 1 {
                            let reply = text(&mut rng, output_len);
                            history[c].push(serde_json::json!({"role": "assistant", "content": reply}));
                        }
                        history[c]
                            .push(serde_json::json!({"role": "user", "content": text(&mut rng, turn_len)}));
                        Request {
                            body: chat_body(history[c].clone(), output_len),
                            group: c,
                        }
                    })
                    .collect()
            }
            Self::Control {
                prompt_len,
                output_len,
            } => (0..count)
                .map(|i| Request {
                    body: chat_body(
                        vec![serde_json::json!({"role": "user", "content": text(&mut rng, prompt_len)})],
                        output_len,
                    ),
                    group: i,
                })
                .collect(),
        }
    }
}

/// Poisson arrival offsets (seconds from start) for `count` requests at `rate` per second.
pub fn poisson_arrivals(rate: f64, count: usize, seed: u64) -> Vec<f64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..count)
        .map(|_| {
            let u: f64 = rng.random::<f64>().max(1e-12);
            t += -u.ln() / rate;
            t
        })
        .collect()
}
