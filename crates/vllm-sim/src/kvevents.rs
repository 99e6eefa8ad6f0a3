//! KV-cache events published as vLLM 0.32 publishes them (`ZmqEventPublisher` in
//! `vllm/distributed/kv_events.py`), so that routers can be tested on precise prefix routing
//! without a GPU.
//!
//! * A PUB socket that **binds** when its endpoint has `*` or `::` (or is `ipc://`), else
//!   **connects** (to a router that bound it), as vLLM decides.
//! * Each batch is one message of three frames: the topic, the sequence number (8 bytes,
//!   big-endian, from 0 per process, one per batch) and a msgpack payload
//!   `[ts, [event, ...], data_parallel_rank]`, each event a map whose first key is `"type"`:
//!   `BlockStored` (`block_hashes`, `parent_block_hash`, `token_ids`, `block_size`,
//!   `lora_id`, `medium`, `lora_name`, `extra_keys`), `BlockRemoved` (`block_hashes`,
//!   `medium`), `AllBlocksCleared`.
//! * A ROUTER replay socket (always bound) keeps the last `buffer_steps` batches; a request
//!   `[identity, "", start_seq]` is answered with every kept batch from `start_seq` on as
//!   `[identity, "", topic, seq, payload]` and an end marker with an empty topic, sequence
//!   `-1` and an empty payload.
//!
//! libzmq (the `zmq` crate) is used, as pyzmq does for vLLM. The sockets live on one thread;
//! [`Publisher::publish`] queues a batch to it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rmpv::Value;

/// One cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Blocks became resident.
    Stored {
        /// Their hashes, first to last.
        hashes: Vec<u64>,
        /// The hash of the block before the first (`None` at a prompt's start).
        parent: Option<u64>,
        /// `block_size` token ids per hash.
        tokens: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// The adapter, when the blocks are an adapter's.
        lora_name: Option<String>,
        /// Per block: its extra keys as vLLM publishes them (the adapter's name, the salt on
        /// the first block), `None` when it has none.
        extra_keys: Vec<Option<Vec<String>>>,
    },
    /// Blocks were evicted.
    Removed {
        /// Their hashes.
        hashes: Vec<u64>,
    },
    /// The cache was reset.
    Cleared,
}

fn s(v: &str) -> Value {
    Value::from(v)
}

impl Event {
    fn to_msgpack(&self) -> Value {
        match self {
            Self::Stored {
                hashes,
                parent,
                tokens,
                block_size,
                lora_name,
                extra_keys,
            } => Value::Map(vec![
                (s("type"), s("BlockStored")),
                (
                    s("block_hashes"),
                    Value::Array(hashes.iter().map(|h| Value::from(*h)).collect()),
                ),
                (s("parent_block_hash"), parent.map_or(Value::Nil, Value::from)),
                (
                    s("token_ids"),
                    Value::Array(tokens.iter().map(|t| Value::from(*t)).collect()),
                ),
                (s("block_size"), Value::from(*block_size)),
                (
                    s("lora_id"),
                    lora_name.as_ref().map_or(Value::Nil, |_| Value::from(1)),
                ),
                (s("medium"), s("GPU")),
                (s("lora_name"), lora_name.as_deref().map_or(Value::Nil, s)),
                (
                    s("extra_keys"),
                    Value::Array(
                        extra_keys
                            .iter()
                            .map(|k| match k {
                                None => Value::Nil,
                                Some(keys) => Value::Array(keys.iter().map(|k| s(k)).collect()),
                            })
                            .collect(),
                    ),
                ),
                (s("group_idx"), Value::from(0)),
                (s("kv_cache_spec_kind"), s("full_attention")),
            ]),
            Self::Removed { hashes } => Value::Map(vec![
                (s("type"), s("BlockRemoved")),
                (
                    s("block_hashes"),
                    Value::Array(hashes.iter().map(|h| Value::from(*h)).collect()),
                ),
                (s("medium"), s("GPU")),
                (s("group_idx"), Value::from(0)),
            ]),
            Self::Cleared => Value::Map(vec![(s("type"), s("AllBlocksCleared"))]),
        }
    }
}

/// Encodes a batch as vLLM's msgpack payload.
pub fn payload(ts: f64, events: &[Event], dp_rank: i64) -> Vec<u8> {
    let batch = Value::Array(vec![
        Value::from(ts),
        Value::Array(events.iter().map(Event::to_msgpack).collect()),
        Value::from(dp_rank),
    ]);
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &batch);
    out
}

/// Where and how to publish (vLLM's `KVEventsConfig`).
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// `tcp://*:5557` binds; `tcp://127.0.0.1:5557` connects.
    pub endpoint: String,
    /// Bind (or connect) whatever the endpoint looks like; `None` decides as vLLM does. Tests
    /// bind loopback addresses this way.
    pub bind: Option<bool>,
    /// The replay socket (always bound), if any.
    pub replay_endpoint: Option<String>,
    /// The topic (`kv@<ip:port>@<model>` by convention).
    pub topic: String,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Data-parallel rank written in each batch.
    pub dp_rank: i64,
    /// The PUB socket's send high-water mark (vLLM's `hwm`, 100,000).
    pub hwm: i32,
    /// Batches queued for the publishing thread before `publish` blocks (vLLM's
    /// `max_queue_size`, 100,000): a stalled publisher stalls the engine, as in vLLM.
    pub max_queue_size: usize,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            endpoint: "tcp://*:5557".into(),
            bind: None,
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: 10_000,
            dp_rank: 0,
            hwm: 100_000,
            max_queue_size: 100_000,
        }
    }
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// A socket could not be set up.
    #[error("KV-event socket {endpoint}: {source}")]
    Socket {
        /// The address.
        endpoint: String,
        /// Cause.
        #[source]
        source: zmq::Error,
    },
    /// The thread could not start.
    #[error("cannot start the KV-event publisher: {0}")]
    Thread(#[source] std::io::Error),
}

enum Msg {
    Batch(Vec<Event>, f64),
    /// Test hook: the next `n` batches get sequence numbers and enter the replay buffer but
    /// are not sent, as if the network lost them.
    Lose(u64),
}

/// The publisher; dropping it stops its thread.
pub struct Publisher {
    tx: std::sync::mpsc::SyncSender<Msg>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sent: Arc<AtomicU64>,
    /// The PUB endpoint as bound or connected (a bound port 0 resolved).
    pub endpoint: String,
    /// The replay endpoint as bound.
    pub replay_endpoint: Option<String>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("endpoint", &self.endpoint)
            .field("replay_endpoint", &self.replay_endpoint)
            .finish_non_exhaustive()
    }
}

fn bound_or(s: &zmq::Socket, fallback: &str) -> String {
    s.get_last_endpoint()
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| fallback.to_owned())
}

impl Publisher {
    /// Opens the sockets and starts the publishing thread.
    pub fn start(config: PublisherConfig) -> Result<Self, PublisherError> {
        let err = |endpoint: &str| {
            let endpoint = endpoint.to_owned();
            move |source| PublisherError::Socket {
                endpoint: endpoint.clone(),
                source,
            }
        };
        let ctx = zmq::Context::new();
        let pub_socket = ctx.socket(zmq::PUB).map_err(err(&config.endpoint))?;
        pub_socket.set_sndhwm(config.hwm).map_err(err(&config.endpoint))?;
        pub_socket.set_linger(0).map_err(err(&config.endpoint))?;
        let binds = config.bind.unwrap_or_else(|| {
            config.endpoint.contains('*')
                || config.endpoint.contains("::")
                || config.endpoint.starts_with("ipc://")
        });
        let endpoint = if binds {
            pub_socket.bind(&config.endpoint).map_err(err(&config.endpoint))?;
            bound_or(&pub_socket, &config.endpoint)
        } else {
            pub_socket
                .connect(&config.endpoint)
                .map_err(err(&config.endpoint))?;
            config.endpoint.clone()
        };
        let replay = match &config.replay_endpoint {
            Some(r) => {
                let router = ctx.socket(zmq::ROUTER).map_err(err(r))?;
                router.set_linger(0).map_err(err(r))?;
                router.bind(r).map_err(err(r))?;
                let bound = bound_or(&router, r);
                Some((router, bound))
            }
            None => None,
        };
        let replay_endpoint = replay.as_ref().map(|(_, b)| b.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(config.max_queue_size.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_sent) = (stop.clone(), sent.clone());
        let thread = std::thread::Builder::new()
            .name("kv-publisher".into())
            .spawn(move || {
                let _ctx = ctx;
                run(
                    &pub_socket,
                    replay.map(|(r, _)| r).as_ref(),
                    &config,
                    &rx,
                    &thread_stop,
                    &thread_sent,
                );
            })
            .map_err(PublisherError::Thread)?;
        Ok(Self {
            tx,
            stop,
            thread: Some(thread),
            sent,
            endpoint,
            replay_endpoint,
        })
    }

    /// Queues one engine step's events (nothing is sent for an empty step).
    pub fn publish(&self, events: Vec<Event>, ts: f64) {
        if !events.is_empty() {
            let _ = self.tx.send(Msg::Batch(events, ts));
        }
    }

    /// Test hook: the next `n` batches are numbered and kept for replay but not sent.
    pub fn lose_next(&self, n: u64) {
        let _ = self.tx.send(Msg::Lose(n));
    }

    /// Batches numbered so far.
    pub fn batches(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const END_SEQ: [u8; 8] = [0xff; 8];

fn run(
    pub_socket: &zmq::Socket,
    replay: Option<&zmq::Socket>,
    config: &PublisherConfig,
    rx: &std::sync::mpsc::Receiver<Msg>,
    stop: &AtomicBool,
    sent: &AtomicU64,
) {
    let mut seq: u64 = 0;
    let mut lose = 0u64;
    let mut buffer: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let topic = config.topic.as_bytes();
    while !stop.load(Ordering::Relaxed) {
        if let Some(r) = replay
            && r.poll(zmq::POLLIN, 0).unwrap_or(0) > 0
            && let Ok(frames) = r.recv_multipart(zmq::DONTWAIT)
            && let [identity, empty, start] = frames.as_slice()
            && empty.is_empty()
        {
            let start = start.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            for (s, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
                let _ = r.send_multipart(
                    [
                        identity.as_slice(),
                        b"",
                        topic,
                        &s.to_be_bytes(),
                        payload.as_slice(),
                    ],
                    0,
                );
            }
            let _ = r.send_multipart([identity.as_slice(), b"", b"", &END_SEQ[..], b""], 0);
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Msg::Lose(n)) => lose += n,
            Ok(Msg::Batch(events, ts)) => {
                let payload = payload(ts, &events, config.dp_rank);
                if lose > 0 {
                    lose -= 1;
                } else {
                    let _ = pub_socket.send_multipart([topic, &seq.to_be_bytes(), payload.as_slice()], 0);
                }
                buffer.push_back((seq, payload));
                if buffer.len() > config.buffer_steps.max(1) {
                    buffer.pop_front();
                }
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}
