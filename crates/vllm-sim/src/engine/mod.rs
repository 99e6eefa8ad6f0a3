//! The engine model: running slots, an FCFS waiting queue, the KV cache and the time each
//! request takes. This is what a router observes through latency and `/metrics`, so it follows
//! vLLM v1's scheduler where that is visible:
//!
//! * at most `max_num_seqs` requests run; the others wait in arrival order;
//! * the head of the queue is admitted only when its prompt's blocks fit in the KV cache
//!   (cached prefix blocks are reused, the rest allocated, evicting unreferenced blocks);
//!   when they do not fit, nobody behind it is admitted either. A request whose LoRA adapter
//!   cannot be loaded (all `max_loras` slots taken by other adapters) is skipped, not blocking;
//! * the first token comes after a prefill whose length is proportional to the prompt tokens
//!   *not* found in the cache; each further token takes a fixed decode time;
//! * decoding takes a new block whenever the sequence crosses a block boundary; when none is
//!   free, the most recently admitted running request is preempted (its blocks released, it
//!   goes back to the head of the queue and is recomputed when re-admitted).
//!
//! There is no engine task: each request's own future drives its [`Ticket`], sleeping with
//! `tokio::time` (so tests can pause time), and every state change happens under one lock.
//! Dropping a ticket aborts its request and frees what it holds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::cache::{BlockId, KvCache};
use super::config::SimConfig;
use super::kvevents::{Event, Publisher};
use super::metrics::{FINISHED_ABORT, FINISHED_LENGTH, Stats};

/// Longest waiting queue; further requests are refused.
pub const MAX_WAITING: usize = 1 << 16;
/// Most `vllm:lora_requests_info` label sets kept; the oldest is dropped beyond.
const MAX_LORA_STATES: usize = 64;

/// Wall-clock time derived from `tokio::time`, so that paused-time tests stay consistent.
#[derive(Debug)]
pub struct Clock {
    start: Instant,
    start_unix: f64,
}

impl Clock {
    /// A clock reading the current Unix time now.
    pub fn new() -> Self {
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self {
            start: Instant::now(),
            start_unix,
        }
    }

    /// Unix time at start.
    pub fn start_unix(&self) -> f64 {
        self.start_unix
    }

    /// Unix time now.
    pub fn unix_now(&self) -> f64 {
        self.start_unix + self.start.elapsed().as_secs_f64()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One request as the engine sees it.
#[derive(Debug, Clone)]
pub struct Job {
    /// Chained hashes of the prompt's full blocks.
    pub hashes: Vec<u64>,
    /// Prompt length in tokens (at least 1).
    pub prompt_tokens: u32,
    /// Output tokens to produce (at least 1).
    pub max_tokens: u32,
    /// The LoRA adapter, if the request names one.
    pub lora: Option<Arc<str>>,
    /// The prompt's token ids, when the simulator tokenizes (KV events carry them).
    pub tokens: Option<Arc<[u32]>>,
    /// The request's `cache_salt` (published on the first block).
    pub salt: Option<Arc<str>>,
}

/// Why a job was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubmitError {
    /// The waiting queue is at [`MAX_WAITING`].
    #[error("the waiting queue is full")]
    QueueFull,
    /// Prompt plus output would not fit in the KV cache even alone.
    #[error("{requested} tokens requested, at most {max} fit")]
    TooLong {
        /// Prompt plus output tokens.
        requested: u64,
        /// `max_model_len`.
        max: u64,
    },
}

/// A `vllm:lora_requests_info` label set: adapters with running and waiting requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LoraState {
    /// Comma-separated adapters with running requests.
    pub running: String,
    /// Comma-separated adapters with waiting requests.
    pub waiting: String,
}

/// A consistent copy of the engine's figures.
#[derive(Debug, Clone)]
pub struct EngineSnapshot {
    /// Running requests.
    pub running: usize,
    /// Waiting requests.
    pub waiting: usize,
    /// Waiting requests held back by the LoRA budget.
    pub deferred: usize,
    /// Referenced blocks over all blocks.
    pub kv_cache_usage: f64,
    /// Referenced blocks.
    pub used_blocks: usize,
    /// Blocks holding a cached prefix block.
    pub cached_blocks: usize,
    /// All blocks.
    pub num_blocks: usize,
    /// Requests finished normally.
    pub served: u64,
    /// Counters and histograms.
    pub stats: Stats,
    /// Every LoRA label set seen with the Unix time it was last current (newest = current).
    pub lora_states: Vec<(LoraState, f64)>,
}

#[derive(Debug)]
struct Entry {
    hashes: Vec<u64>,
    tokens: Option<Arc<[u32]>>,
    salt: Option<Arc<str>>,
    prompt_tokens: u32,
    max_tokens: u32,
    generated: u32,
    lora: Option<Arc<str>>,
    blocks: Vec<BlockId>,
    running: bool,
    /// Bumped by every preemption, so a ticket can tell its admission is gone.
    epoch: u64,
    /// Tokens to prefill for the current admission.
    compute_tokens: u32,
    /// Prompt tokens found in the cache at the first admission.
    first_hit_tokens: u32,
    preemptions: u32,
    notify: Arc<Notify>,
    arrival: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

#[derive(Debug)]
struct State {
    cache: KvCache,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    reqs: HashMap<u64, Entry>,
    next_id: u64,
    stats: Stats,
    served: u64,
    running_loras: BTreeMap<Arc<str>, usize>,
    waiting_loras: BTreeMap<Arc<str>, usize>,
    lora_states: BTreeMap<LoraState, f64>,
    last_lora_ts: f64,
}

/// The `BlockStored` events of the blocks a request newly cached (positions in its hashes,
/// ascending): one per contiguous run, with its parent, its tokens and, per block, the extra
/// keys vLLM publishes (the adapter's name; the salt on the first block).
fn stored_events(e: &Entry, positions: &[usize], bs: usize) -> Vec<Event> {
    let Some(tokens) = e.tokens.as_ref() else {
        return Vec::new();
    };
    let mut runs: Vec<Vec<usize>> = Vec::new();
    for p in positions {
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|l| l + 1 == *p) => run.push(*p),
            _ => runs.push(vec![*p]),
        }
    }
    runs.into_iter()
        .filter_map(|run| {
            let (first, last) = (*run.first()?, *run.last()?);
            let slice = tokens.get(first * bs..(last + 1) * bs)?.to_vec();
            Some(Event::Stored {
                hashes: run.iter().filter_map(|p| e.hashes.get(*p).copied()).collect(),
                parent: first.checked_sub(1).and_then(|p| e.hashes.get(p).copied()),
                tokens: slice,
                block_size: bs as u32,
                lora_name: e.lora.as_deref().map(str::to_owned),
                extra_keys: run
                    .iter()
                    .map(|p| {
                        let mut keys: Vec<String> =
                            e.lora.as_deref().map(str::to_owned).into_iter().collect();
                        if *p == 0
                            && let Some(s) = &e.salt
                        {
                            keys.push(s.to_string());
                        }
                        (!keys.is_empty()).then_some(keys)
                    })
                    .collect(),
            })
        })
        .collect()
}

fn lora_add(map: &mut BTreeMap<Arc<str>, usize>, lora: &Option<Arc<str>>) {
    if let Some(l) = lora {
        *map.entry(l.clone()).or_default() += 1;
    }
}

fn lora_remove(map: &mut BTreeMap<Arc<str>, usize>, lora: &Option<Arc<str>>) {
    if let Some(l) = lora
        && let Some(n) = map.get_mut(l)
    {
        *n -= 1;
        if *n == 0 {
            map.remove(l);
        }
    }
}

fn join(map: &BTreeMap<Arc<str>, usize>) -> String {
    map.keys().map(|k| &**k).collect::<Vec<_>>().join(",")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The simulated engine of one server.
#[derive(Debug)]
pub struct Engine {
    max_num_seqs: usize,
    block_size: usize,
    max_model_len: u64,
    prefill_seconds_per_token: f64,
    decode_seconds_per_token: f64,
    time_scale: f64,
    max_loras: usize,
    clock: Clock,
    state: Mutex<State>,
    events: Option<Publisher>,
}

enum Admission {
    Admitted { epoch: u64, compute_tokens: u32 },
    Waiting,
    Gone,
}

enum Step {
    Token { index: u32, last: bool },
    Preempted,
    Gone,
}

impl Engine {
    /// An idle engine for `config` (expected to be sanitized).
    pub fn new(config: &SimConfig) -> Self {
        Self {
            max_num_seqs: config.max_num_seqs.max(1) as usize,
            block_size: config.block_size.max(1) as usize,
            max_model_len: config.max_model_len(),
            prefill_seconds_per_token: config.prefill_seconds_per_token,
            decode_seconds_per_token: config.decode_seconds_per_token,
            time_scale: config.time_scale,
            max_loras: config.max_loras as usize,
            clock: Clock::new(),
            events: None,
            state: Mutex::new(State {
                cache: KvCache::new(config.kv_blocks.max(1)),
                waiting: VecDeque::new(),
                running: Vec::new(),
                reqs: HashMap::new(),
                next_id: 0,
                stats: Stats::new(config.max_model_len()),
                served: 0,
                running_loras: BTreeMap::new(),
                waiting_loras: BTreeMap::new(),
                lora_states: BTreeMap::new(),
                last_lora_ts: 0.0,
            }),
        }
    }

    /// The same engine, publishing its cache's changes as vLLM's KV events through
    /// `publisher` (one message per scheduling step that changed the cache).
    pub fn with_events(mut self, publisher: Publisher) -> Self {
        self.events = Some(publisher);
        self
    }

    /// Forgets every cached prefix (vLLM's `/reset_prefix_cache`); `false` while blocks are
    /// in use, unless `reset_running_requests` preempts the running requests first (vLLM's
    /// query parameter of that name). Publishes `AllBlocksCleared`.
    pub fn reset_prefix_cache(&self, reset_running_requests: bool) -> bool {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if reset_running_requests {
            // vLLM preempts every running request first; they are recomputed when admitted
            // again.
            for victim in st.running.clone().into_iter().rev() {
                self.preempt(st, victim);
            }
        }
        let ok = st.cache.reset();
        if ok && let Some(p) = &self.events {
            p.publish(vec![Event::Cleared], self.clock.unix_now());
        }
        if reset_running_requests {
            self.schedule(st, Instant::now());
        }
        ok
    }

    /// The engine's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Queues `job` and admits whatever can run now. The returned ticket drives the request.
    pub fn submit(self: &Arc<Self>, job: Job) -> Result<Ticket, SubmitError> {
        let now = Instant::now();
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let max_tokens = job.max_tokens.max(1);
        let requested = u64::from(job.prompt_tokens) + u64::from(max_tokens);
        if requested > self.max_model_len {
            return Err(SubmitError::TooLong {
                requested,
                max: self.max_model_len,
            });
        }
        if st.waiting.len() >= MAX_WAITING {
            st.stats.rejected_queue_full += 1;
            return Err(SubmitError::QueueFull);
        }
        let id = st.next_id;
        st.next_id += 1;
        let notify = Arc::new(Notify::new());
        lora_add(&mut st.waiting_loras, &job.lora);
        st.reqs.insert(
            id,
            Entry {
                hashes: job.hashes,
                tokens: job.tokens,
                salt: job.salt,
                prompt_tokens: job.prompt_tokens.max(1),
                max_tokens,
                generated: 0,
                lora: job.lora,
                blocks: Vec::new(),
                running: false,
                epoch: 0,
                compute_tokens: 0,
                first_hit_tokens: 0,
                preemptions: 0,
                notify: notify.clone(),
                arrival: now,
                first_scheduled: None,
                first_token: None,
                last_token: None,
            },
        );
        st.waiting.push_back(id);
        self.schedule(st, now);
        self.touch_lora(st);
        Ok(Ticket {
            engine: self.clone(),
            id,
            notify,
            phase: Phase::Queued,
        })
    }

    /// A copy of the current figures.
    pub fn snapshot(&self) -> EngineSnapshot {
        let st = self.state.lock();
        let deferred = if self.max_loras == 0 {
            0
        } else {
            st.waiting
                .iter()
                .filter_map(|id| st.reqs.get(id)?.lora.as_ref())
                .filter(|l| !st.running_loras.contains_key(*l) && st.running_loras.len() >= self.max_loras)
                .count()
        };
        EngineSnapshot {
            running: st.running.len(),
            waiting: st.waiting.len(),
            deferred,
            kv_cache_usage: st.cache.usage(),
            used_blocks: st.cache.used_blocks(),
            cached_blocks: st.cache.cached_blocks(),
            num_blocks: st.cache.num_blocks(),
            served: st.served,
            stats: st.stats.clone(),
            lora_states: st.lora_states.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }

    /// Admits waiting requests in order while a slot is free and the head's blocks fit.
    fn schedule(&self, st: &mut State, now: Instant) {
        let bs = self.block_size;
        let mut i = 0;
        while i < st.waiting.len() && st.running.len() < self.max_num_seqs {
            let id = st.waiting[i];
            let Some(e) = st.reqs.get(&id) else {
                st.waiting.remove(i);
                continue;
            };
            if let Some(l) = &e.lora
                && !st.running_loras.contains_key(l)
                && st.running_loras.len() >= self.max_loras
            {
                i += 1;
                continue;
            }
            let tokens = e.prompt_tokens as usize + e.generated as usize;
            let total = tokens.div_ceil(bs);
            let cap = tokens.saturating_sub(1) / bs;
            let Some(alloc) = st.cache.allocate(&e.hashes, cap, total) else {
                break;
            };
            st.waiting.remove(i);
            let Some(e) = st.reqs.get_mut(&id) else {
                st.cache.release(&alloc.blocks);
                continue;
            };
            let hit_tokens = (alloc.hit_blocks * bs).min(tokens) as u32;
            if let Some(p) = &self.events {
                let mut events: Vec<Event> = st
                    .cache
                    .take_evicted()
                    .into_iter()
                    .map(|h| Event::Removed { hashes: vec![h] })
                    .collect();
                events.extend(stored_events(e, &alloc.stored, bs));
                p.publish(events, self.clock.unix_now());
            }
            e.blocks = alloc.blocks;
            e.running = true;
            e.compute_tokens = tokens as u32 - hit_tokens;
            if e.first_scheduled.is_none() {
                e.first_scheduled = Some(now);
                e.first_hit_tokens = hit_tokens.min(e.prompt_tokens);
            }
            st.stats.prefix_queries += tokens as u64;
            st.stats.prefix_hits += u64::from(hit_tokens);
            lora_remove(&mut st.waiting_loras, &e.lora);
            lora_add(&mut st.running_loras, &e.lora);
            st.running.push(id);
            e.notify.notify_one();
        }
    }

    /// Moves running request `victim` back to the head of the queue, releasing its blocks.
    fn preempt(&self, st: &mut State, victim: u64) {
        st.running.retain(|r| *r != victim);
        if let Some(e) = st.reqs.get_mut(&victim) {
            st.cache.release(&e.blocks);
            e.blocks.clear();
            e.running = false;
            e.epoch += 1;
            e.preemptions += 1;
            lora_remove(&mut st.running_loras, &e.lora);
            lora_add(&mut st.waiting_loras, &e.lora);
            st.waiting.push_front(victim);
            st.stats.preemptions += 1;
        }
    }

    /// Records the current LoRA state as the newest.
    fn touch_lora(&self, st: &mut State) {
        if self.max_loras == 0 {
            return;
        }
        let key = LoraState {
            running: join(&st.running_loras),
            waiting: join(&st.waiting_loras),
        };
        let ts = self.clock.unix_now().max(st.last_lora_ts + 1e-6);
        st.last_lora_ts = ts;
        st.lora_states.insert(key, ts);
        if st.lora_states.len() > MAX_LORA_STATES {
            let oldest = st
                .lora_states
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                st.lora_states.remove(&k);
            }
        }
    }

    /// Takes request `id` out of the engine, releasing its blocks, and admits others.
    fn finish(&self, st: &mut State, id: u64, reason: usize, now: Instant) {
        let Some(e) = st.reqs.remove(&id) else {
            return;
        };
        if e.running {
            st.running.retain(|r| *r != id);
            st.cache.release(&e.blocks);
            lora_remove(&mut st.running_loras, &e.lora);
        } else {
            st.waiting.retain(|r| *r != id);
            lora_remove(&mut st.waiting_loras, &e.lora);
        }
        if let Some(n) = st.stats.finished.get_mut(reason) {
            *n += 1;
        }
        if reason == FINISHED_LENGTH {
            let s = &mut st.stats;
            st.served += 1;
            s.e2e.observe(secs(now - e.arrival));
            if let Some(sched) = e.first_scheduled {
                s.queue.observe(secs(sched - e.arrival));
                s.inference.observe(secs(now - sched));
                if let Some(first) = e.first_token {
                    s.prefill.observe(secs(first.saturating_duration_since(sched)));
                    s.decode.observe(secs(now - first));
                    if e.generated > 1 {
                        s.time_per_output_token
                            .observe(secs(now - first) / f64::from(e.generated - 1));
                    }
                }
            }
            s.prompt_len.observe(f64::from(e.prompt_tokens));
            s.generation_len.observe(f64::from(e.generated));
            s.max_tokens.observe(f64::from(e.max_tokens));
            s.prefill_computed
                .observe(f64::from(e.prompt_tokens - e.first_hit_tokens));
            s.preemptions_per_request.observe(f64::from(e.preemptions));
            s.params_n.observe(1.0);
        }
        self.schedule(st, now);
        self.touch_lora(st);
    }

    fn admission(&self, id: u64) -> Admission {
        let st = self.state.lock();
        match st.reqs.get(&id) {
            None => Admission::Gone,
            Some(e) if e.running => Admission::Admitted {
                epoch: e.epoch,
                compute_tokens: e.compute_tokens,
            },
            Some(_) => Admission::Waiting,
        }
    }

    /// Makes sure request `id` holds blocks for every token it has, preempting the most
    /// recently admitted request (possibly itself) when no block is free. `false` when `id`
    /// is no longer running under `epoch`.
    fn reserve(&self, id: u64, epoch: u64) -> bool {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        loop {
            let Some(e) = st.reqs.get_mut(&id) else {
                return false;
            };
            if e.epoch != epoch || !e.running {
                return false;
            }
            let need = (e.prompt_tokens as usize + e.generated as usize).div_ceil(self.block_size);
            if e.blocks.len() >= need {
                return true;
            }
            if let Some(b) = st.cache.grow() {
                e.blocks.push(b);
                continue;
            }
            let Some(&victim) = st.running.last() else {
                return false;
            };
            self.preempt(st, victim);
            if victim == id {
                self.schedule(st, Instant::now());
                self.touch_lora(st);
                return false;
            }
        }
    }

    /// Records the token that request `id` just produced.
    fn step(&self, id: u64, epoch: u64) -> Step {
        let now = Instant::now();
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let Some(e) = st.reqs.get_mut(&id) else {
            return Step::Gone;
        };
        if e.epoch != epoch || !e.running {
            return Step::Preempted;
        }
        let index = e.generated;
        e.generated += 1;
        st.stats.generation_tokens += 1;
        match e.last_token {
            None => {
                e.first_token = Some(now);
                st.stats.ttft.observe(secs(now - e.arrival));
                st.stats.prompt_tokens += u64::from(e.prompt_tokens);
                st.stats.prompt_cached += u64::from(e.first_hit_tokens);
                st.stats.prompt_computed += u64::from(e.prompt_tokens - e.first_hit_tokens);
            }
            Some(t) => st.stats.inter_token.observe(secs(now - t)),
        }
        e.last_token = Some(now);
        let last = e.generated >= e.max_tokens;
        if last {
            self.finish(st, id, FINISHED_LENGTH, now);
        }
        Step::Token { index, last }
    }

    fn abort(&self, id: u64) {
        let mut guard = self.state.lock();
        self.finish(&mut guard, id, FINISHED_ABORT, Instant::now());
    }

    async fn sleep(&self, seconds: f64) {
        let s = seconds * self.time_scale;
        if s > 0.0 {
            let d = Duration::try_from_secs_f64(s).unwrap_or(Duration::from_secs(86_400));
            tokio::time::sleep(d).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Queued,
    Running(u64),
    Done,
}

/// One request in the engine. Call [`Ticket::next_token`] until it returns `None`; dropping
/// the ticket earlier aborts the request.
#[derive(Debug)]
pub struct Ticket {
    engine: Arc<Engine>,
    id: u64,
    notify: Arc<Notify>,
    phase: Phase,
}

impl Ticket {
    /// Waits for the next output token and returns its index (0 for the first); `None` once
    /// all tokens were produced. Cancel-safe: a dropped call is redone by the next one.
    pub async fn next_token(&mut self) -> Option<u32> {
        let engine = self.engine.clone();
        loop {
            let epoch = match self.phase {
                Phase::Done => return None,
                Phase::Queued => {
                    let (epoch, compute_tokens) = loop {
                        match engine.admission(self.id) {
                            Admission::Admitted {
                                epoch,
                                compute_tokens,
                            } => break (epoch, compute_tokens),
                            Admission::Waiting => self.notify.notified().await,
                            Admission::Gone => {
                                self.phase = Phase::Done;
                                return None;
                            }
                        }
                    };
                    engine
                        .sleep(engine.prefill_seconds_per_token * f64::from(compute_tokens))
                        .await;
                    epoch
                }
                Phase::Running(epoch) => {
                    if !engine.reserve(self.id, epoch) {
                        self.phase = Phase::Queued;
                        continue;
                    }
                    engine.sleep(engine.decode_seconds_per_token).await;
                    epoch
                }
            };
            match engine.step(self.id, epoch) {
                Step::Token { index, last } => {
                    self.phase = if last { Phase::Done } else { Phase::Running(epoch) };
                    return Some(index);
                }
                Step::Preempted => self.phase = Phase::Queued,
                Step::Gone => {
                    self.phase = Phase::Done;
                    return None;
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !matches!(self.phase, Phase::Done) {
            self.engine.abort(self.id);
        }
    }
}

#[cfg(test)]
mod tests;
