//! ZMQ subscriptions to vLLM's KV-event publishers.
//!
//! **Library.** libzmq, through the `zmq` binding: the implementation vLLM's own publisher
//! (pyzmq) uses, so the wire protocol needs no interop work, and the one that bounds what a
//! peer can make the EPP hold (`ZMQ_MAXMSGSIZE`: a peer that sends a larger message is
//! disconnected; `ZMQ_RCVHWM`: queued messages per socket). The pure-Rust `zeromq` crate
//! reserves memory for whatever frame length a peer announces, so a lying publisher could
//! exhaust the EPP's memory with one header.
//!
//! **Threads.** libzmq's API blocks, so every socket lives on one I/O thread that polls them
//! all (100 ms at most per wait, so that a stop or a new set of pods is seen quickly) and
//! hands decoded, in-order messages to the ingestion workers through bounded channels: a
//! slow index slows reading, and the publisher's high-water mark decides what is lost, which
//! the sequence numbers then reveal.
//!
//! **Modes** (llm-d-router v0.10's `kvEventsConfig`):
//! * central: one SUB socket bound at `zmqEndpoint`; vLLM connects to it, and the endpoint is
//!   named by the topic (`kv@<ip:port>@<model>`);
//! * per endpoint: one SUB socket connected to each endpoint's publisher
//!   (`tcp://<ip>:<socketPort + rank>`), which names the endpoint by the connection.
//!
//! **Sequences.** Per publisher: the next number is applied; a repeat is dropped; a lower
//! number is a restarted engine (its entries are dropped first); a gap, or a first message
//! after 0, is lost history. With a replay socket (`replaySocketPort`) the lost messages are
//! asked for (a DEALER sends `["", seq as 8 bytes big-endian]`, vLLM's ROUTER answers each
//! message as `["", topic, seq, payload]` and ends with an empty topic and payload); live
//! messages wait meanwhile. When replay is not configured, fails, or the publisher no longer
//! holds the lost messages, the endpoint's entries are dropped instead: no credit is kept
//! for blocks whose fate is unknown.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::decode::{EventMessage, KvEvent, decode_frames};
use super::index::PodId;
use super::ingest::{Sequence, Step};

/// Largest message accepted from a publisher: a `BlockStored` of a million-token prompt is
/// about 4 MiB of msgpack.
pub const MAX_MESSAGE_BYTES: i64 = 8 << 20;
/// Messages queued per socket before libzmq stops reading from the peer.
pub const RECEIVE_HWM: i32 = 256;
/// Live messages kept while a replay runs; past it the replay is abandoned.
const MAX_HELD_DURING_REPLAY: usize = 10_000;
/// A replay that sends nothing for this long has failed.
const REPLAY_IDLE: Duration = Duration::from_secs(2);
/// A replay is given at most this long in all.
const REPLAY_TOTAL: Duration = Duration::from_secs(30);
/// Longest wait in one poll.
const POLL_MS: i64 = 100;

/// What the ingestion workers are told.
#[derive(Debug)]
pub enum Work {
    /// Events of endpoint `pod`, in order.
    Events {
        /// The endpoint.
        pod: PodId,
        /// The subscription it came through (`local-subscriber` in central mode, else the
        /// endpoint's name), for the metric label.
        source: Arc<str>,
        /// Its events.
        events: Vec<KvEvent>,
    },
    /// Drop everything `pod` holds (restart, lost history).
    Clear {
        /// The endpoint.
        pod: PodId,
    },
    /// `pod` left the pool: drop everything and forget it (queued behind its events, so that
    /// none is applied after).
    Forget {
        /// The endpoint.
        pod: PodId,
    },
}

/// One endpoint to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The endpoint's id in the index.
    pub pod: PodId,
    /// Its name, for logs and metric labels.
    pub name: Arc<str>,
    /// `tcp://ip:port` of its publisher.
    pub endpoint: String,
    /// `tcp://ip:port` of its replay socket, when configured.
    pub replay: Option<String>,
}

/// Names the endpoint of a central-mode message from its topic and data-parallel rank.
pub type Resolver = Arc<dyn Fn(&str, Option<i64>) -> Option<PodId> + Send + Sync>;

/// Counters of the subscriptions.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Messages received (live and replayed).
    pub received: AtomicU64,
    /// Messages that did not decode.
    pub malformed: AtomicU64,
    /// Central-mode messages whose topic names no endpoint of the pool.
    pub unknown_topic: AtomicU64,
    /// Lost-history events (gaps, late joins, restarts).
    pub gaps: AtomicU64,
    /// Replays asked for.
    pub replays: AtomicU64,
    /// Replays that failed (timeout, too far behind).
    pub replay_failures: AtomicU64,
    /// Socket errors (bind, connect, receive).
    pub socket_errors: AtomicU64,
    /// Subscriptions open.
    pub active: AtomicU64,
}

/// How the subscriber runs.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Central mode: the address to bind (`tcp://*:5557`).
    pub central: Option<String>,
    /// The subscription prefix (`kv@`).
    pub topic_filter: String,
}

enum Command {
    Targets(Vec<Target>),
}

/// The I/O thread and its handle. Dropping it stops the thread and waits for it.
pub struct Subscriber {
    commands: std::sync::mpsc::Sender<Command>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Counters.
    pub stats: Arc<SubscriberStats>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Why the subscriber could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// The central socket could not be bound.
    #[error("cannot bind the KV-event socket at {endpoint}: {source}")]
    Bind {
        /// The address.
        endpoint: String,
        /// Cause.
        #[source]
        source: zmq::Error,
    },
    /// A socket could not be made.
    #[error("cannot create a ZMQ socket: {0}")]
    Socket(#[source] zmq::Error),
    /// The thread could not be started.
    #[error("cannot start the KV-event thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn sub_socket(ctx: &zmq::Context, filter: &str) -> Result<zmq::Socket, zmq::Error> {
    let s = ctx.socket(zmq::SUB)?;
    s.set_maxmsgsize(MAX_MESSAGE_BYTES)?;
    s.set_rcvhwm(RECEIVE_HWM)?;
    s.set_linger(0)?;
    s.set_reconnect_ivl(200)?;
    s.set_reconnect_ivl_max(5_000)?;
    s.set_subscribe(filter.as_bytes())?;
    Ok(s)
}

impl Subscriber {
    /// Starts the I/O thread. In central mode the socket is bound before this returns, so a
    /// bad address stops the EPP at start-up; it returns the bound address too (a port 0
    /// resolved). Decoded messages go to `workers[pod % workers.len()]`.
    pub fn start(
        config: SubscriberConfig,
        resolver: Resolver,
        workers: Vec<mpsc::Sender<Work>>,
    ) -> Result<(Self, Option<String>), SubscriberError> {
        let ctx = zmq::Context::new();
        let central = match &config.central {
            Some(endpoint) => {
                let s = sub_socket(&ctx, &config.topic_filter).map_err(SubscriberError::Socket)?;
                s.bind(endpoint).map_err(|source| SubscriberError::Bind {
                    endpoint: endpoint.clone(),
                    source,
                })?;
                let bound = s
                    .get_last_endpoint()
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_else(|| endpoint.clone());
                Some((s, bound))
            }
            None => None,
        };
        let bound = central.as_ref().map(|(_, b)| b.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(SubscriberStats::default());
        let mut io = Io {
            ctx,
            filter: config.topic_filter,
            central: central.map(|(s, _)| s),
            central_name: "local-subscriber".into(),
            central_seq: HashMap::new(),
            pods: HashMap::new(),
            resolver,
            workers,
            stats: stats.clone(),
        };
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kv-events".into())
            .spawn(move || io.run(&rx, &thread_stop))
            .map_err(SubscriberError::Thread)?;
        Ok((
            Self {
                commands: tx,
                stop,
                thread: Some(thread),
                stats,
            },
            bound,
        ))
    }

    /// Subscribes to exactly `targets` (per-endpoint mode): new ones are connected, departed
    /// ones closed and cleared.
    pub fn set_targets(&self, targets: Vec<Target>) {
        let _ = self.commands.send(Command::Targets(targets));
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A replay in progress.
struct Replay {
    dealer: zmq::Socket,
    /// The next sequence number wanted.
    next: u64,
    started: Instant,
    last_heard: Instant,
    /// Live messages that arrived meanwhile.
    held: VecDeque<EventMessage>,
}

struct PodSub {
    target: Target,
    socket: zmq::Socket,
    seq: Sequence,
    replay: Option<Replay>,
}

struct Io {
    ctx: zmq::Context,
    filter: String,
    central: Option<zmq::Socket>,
    central_name: Arc<str>,
    /// Central mode: sequences per topic and rank.
    central_seq: HashMap<(String, Option<i64>), (PodId, Sequence)>,
    pods: HashMap<PodId, PodSub>,
    resolver: Resolver,
    workers: Vec<mpsc::Sender<Work>>,
    stats: Arc<SubscriberStats>,
}

/// Which socket a poll item belongs to.
#[derive(Clone, Copy)]
enum Source {
    Central,
    Pod(PodId),
    Replay(PodId),
}

impl Io {
    fn run(&mut self, commands: &std::sync::mpsc::Receiver<Command>, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            while let Ok(cmd) = commands.try_recv() {
                match cmd {
                    Command::Targets(t) => self.set_targets(t),
                }
            }
            let ready = self.poll();
            for source in ready {
                match source {
                    Source::Central => self.drain_central(),
                    Source::Pod(pod) => self.drain_pod(pod),
                    Source::Replay(pod) => self.drain_replay(pod),
                }
            }
            self.check_replays();
            if self.workers.iter().all(mpsc::Sender::is_closed) {
                return;
            }
        }
    }

    /// Waits for input on any socket; the sockets that have some.
    fn poll(&self) -> Vec<Source> {
        let mut sources = Vec::with_capacity(self.pods.len() * 2 + 1);
        let mut items = Vec::with_capacity(self.pods.len() * 2 + 1);
        if let Some(c) = &self.central {
            sources.push(Source::Central);
            items.push(c.as_poll_item(zmq::POLLIN));
        }
        for (pod, sub) in &self.pods {
            sources.push(Source::Pod(*pod));
            items.push(sub.socket.as_poll_item(zmq::POLLIN));
            if let Some(r) = &sub.replay {
                sources.push(Source::Replay(*pod));
                items.push(r.dealer.as_poll_item(zmq::POLLIN));
            }
        }
        if items.is_empty() {
            std::thread::sleep(Duration::from_millis(POLL_MS as u64));
            return Vec::new();
        }
        if zmq::poll(&mut items, POLL_MS).is_err() {
            self.stats.socket_errors.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        sources
            .into_iter()
            .zip(items.iter())
            .filter(|(_, i)| i.is_readable())
            .map(|(s, _)| s)
            .collect()
    }

    fn send(&self, work: Work) {
        let pod = match &work {
            Work::Events { pod, .. } | Work::Clear { pod } | Work::Forget { pod } => *pod,
        };
        let n = self.workers.len().max(1);
        if let Some(w) = self.workers.get(pod as usize % n) {
            // Blocks while the worker is behind: reading slows down, the publisher's
            // high-water mark decides what is lost.
            let _ = w.blocking_send(work);
        }
    }

    /// Events of a followed endpoint, labelled with its name.
    fn send_events(&self, pod: PodId, events: Vec<KvEvent>) {
        let source = self
            .pods
            .get(&pod)
            .map_or_else(|| self.central_name.clone(), |s| s.target.name.clone());
        self.send(Work::Events { pod, source, events });
    }

    /// Receives one message without waiting; `None` when there is none.
    fn receive(&self, socket: &zmq::Socket) -> Option<Vec<Vec<u8>>> {
        match socket.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                Some(frames)
            }
            Err(zmq::Error::EAGAIN) => None,
            Err(_) => {
                self.stats.socket_errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn decode(&self, frames: &[Vec<u8>]) -> Option<EventMessage> {
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        match decode_frames(&refs) {
            Ok(m) => Some(m),
            Err(e) => {
                if self.stats.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %e, "a KV-event message did not decode; dropped (logged once)");
                }
                None
            }
        }
    }

    fn drain_central(&mut self) {
        for _ in 0..1024 {
            let Some(frames) = self.central.as_ref().and_then(|c| self.receive(c)) else {
                return;
            };
            let Some(m) = self.decode(&frames) else {
                continue;
            };
            let key = (m.topic.clone(), m.dp_rank);
            let Some(pod) = (self.resolver)(&m.topic, m.dp_rank) else {
                self.stats.unknown_topic.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let entry = self.central_seq.entry(key).or_insert((pod, Sequence::default()));
            if entry.0 != pod {
                // The topic now names another endpoint (a pod replaced at the same address).
                *entry = (pod, Sequence::default());
            }
            let step = entry.1.check(m.seq);
            entry.1.applied(m.seq);
            match step {
                Step::Next => {}
                Step::Repeat => continue,
                Step::Restart | Step::Gap { .. } => {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    // No replay in central mode: what was lost is unknown, so nothing the
                    // endpoint held before is trusted (a late join had nothing yet).
                    if !matches!(step, Step::Gap { from: 0 }) {
                        self.send(Work::Clear { pod });
                    }
                }
            }
            self.send(Work::Events {
                pod,
                source: self.central_name.clone(),
                events: m.events,
            });
        }
    }

    fn drain_pod(&mut self, pod: PodId) {
        for _ in 0..1024 {
            let Some(frames) = self.pods.get(&pod).and_then(|s| self.receive(&s.socket)) else {
                return;
            };
            let Some(m) = self.decode(&frames) else {
                continue;
            };
            self.live(pod, m);
        }
    }

    /// A live message of `pod`.
    fn live(&mut self, pod: PodId, m: EventMessage) {
        let Some(sub) = self.pods.get_mut(&pod) else {
            return;
        };
        if let Some(r) = &mut sub.replay {
            if r.held.len() >= MAX_HELD_DURING_REPLAY {
                self.abandon_replay(pod);
                self.live(pod, m);
                return;
            }
            r.held.push_back(m);
            return;
        }
        match sub.seq.check(m.seq) {
            Step::Next => {
                sub.seq.applied(m.seq);
                self.send_events(pod, m.events);
            }
            Step::Repeat => {}
            step @ (Step::Restart | Step::Gap { .. }) => {
                self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                let from = match step {
                    Step::Gap { from } => from,
                    _ => 0,
                };
                if matches!(step, Step::Restart) {
                    // A new process: what it held is dropped once, and it is followed from
                    // its start as if joining now.
                    self.send(Work::Clear { pod });
                    if let Some(sub) = self.pods.get_mut(&pod) {
                        sub.seq = Sequence::default();
                    }
                }
                let replay = self.pods.get(&pod).and_then(|s| s.target.replay.clone());
                match replay {
                    Some(endpoint) => match self.start_replay(&endpoint, from) {
                        Ok(dealer) => {
                            self.stats.replays.fetch_add(1, Ordering::Relaxed);
                            let now = Instant::now();
                            let mut held = VecDeque::new();
                            held.push_back(m);
                            let Some(sub) = self.pods.get_mut(&pod) else {
                                return;
                            };
                            sub.replay = Some(Replay {
                                dealer,
                                next: from,
                                started: now,
                                last_heard: now,
                                held,
                            });
                        }
                        Err(_) => {
                            self.stats.socket_errors.fetch_add(1, Ordering::Relaxed);
                            self.lost(pod, m);
                        }
                    },
                    None => self.lost(pod, m),
                }
            }
        }
    }

    /// History before `m` is lost for good: drop what `pod` held (unless it had nothing yet)
    /// and go on from `m`.
    fn lost(&mut self, pod: PodId, m: EventMessage) {
        let Some(sub) = self.pods.get_mut(&pod) else {
            return;
        };
        let had_history = sub.seq.last().is_some();
        sub.seq.applied(m.seq);
        if had_history {
            self.send(Work::Clear { pod });
        }
        self.send_events(pod, m.events);
    }

    fn start_replay(&self, endpoint: &str, from: u64) -> Result<zmq::Socket, zmq::Error> {
        let d = self.ctx.socket(zmq::DEALER)?;
        d.set_maxmsgsize(MAX_MESSAGE_BYTES)?;
        d.set_rcvhwm(RECEIVE_HWM * 4)?;
        d.set_linger(0)?;
        d.connect(endpoint)?;
        d.send_multipart([&b""[..], &from.to_be_bytes()[..]], zmq::DONTWAIT)?;
        Ok(d)
    }

    fn drain_replay(&mut self, pod: PodId) {
        for _ in 0..4096 {
            let Some(frames) = self
                .pods
                .get(&pod)
                .and_then(|s| s.replay.as_ref())
                .and_then(|r| self.receive(&r.dealer))
            else {
                return;
            };
            // A DEALER sees the ROUTER's empty delimiter first.
            let frames = match frames.split_first() {
                Some((first, rest)) if first.is_empty() => rest.to_vec(),
                _ => frames,
            };
            let end = frames.len() == 3 && frames[0].is_empty() && frames[2].is_empty();
            if end {
                self.finish_replay(pod);
                return;
            }
            let Some(m) = self.decode(&frames) else {
                continue;
            };
            let Some(r) = self.pods.get_mut(&pod).and_then(|s| s.replay.as_mut()) else {
                return;
            };
            r.last_heard = Instant::now();
            if m.seq < r.next {
                continue;
            }
            if m.seq > r.next {
                // The publisher no longer holds what was lost.
                self.stats.replay_failures.fetch_add(1, Ordering::Relaxed);
                r.next = m.seq;
                let had_history = self.pods.get(&pod).is_some_and(|s| s.seq.last().is_some());
                if had_history {
                    self.send(Work::Clear { pod });
                }
            }
            if let Some(sub) = self.pods.get_mut(&pod) {
                sub.seq.applied(m.seq);
                if let Some(r) = &mut sub.replay {
                    r.next = m.seq.saturating_add(1);
                }
            }
            self.send_events(pod, m.events);
        }
    }

    /// The replay ended: the live messages held meanwhile go through the sequence check.
    fn finish_replay(&mut self, pod: PodId) {
        let Some(held) = self
            .pods
            .get_mut(&pod)
            .and_then(|s| s.replay.take())
            .map(|r| r.held)
        else {
            return;
        };
        for m in held {
            let Some(sub) = self.pods.get_mut(&pod) else {
                return;
            };
            match sub.seq.check(m.seq) {
                Step::Repeat => {}
                Step::Next => {
                    sub.seq.applied(m.seq);
                    self.send_events(pod, m.events);
                }
                _ => {
                    // Still a hole after the replay: history is lost.
                    self.stats.replay_failures.fetch_add(1, Ordering::Relaxed);
                    self.lost(pod, m);
                }
            }
        }
    }

    fn abandon_replay(&mut self, pod: PodId) {
        self.stats.replay_failures.fetch_add(1, Ordering::Relaxed);
        let Some(sub) = self.pods.get_mut(&pod) else {
            return;
        };
        let Some(r) = sub.replay.take() else {
            return;
        };
        let mut held = r.held.into_iter();
        if let Some(first) = held.next() {
            self.lost(pod, first);
        }
        for m in held {
            self.live(pod, m);
        }
    }

    fn check_replays(&mut self) {
        let now = Instant::now();
        let late: Vec<PodId> = self
            .pods
            .iter()
            .filter_map(|(pod, s)| {
                let r = s.replay.as_ref()?;
                (now.duration_since(r.last_heard) > REPLAY_IDLE
                    || now.duration_since(r.started) > REPLAY_TOTAL)
                    .then_some(*pod)
            })
            .collect();
        for pod in late {
            tracing::warn!(
                pod,
                "a KV-event replay did not finish; the endpoint's entries are dropped"
            );
            self.abandon_replay(pod);
        }
    }

    fn set_targets(&mut self, targets: Vec<Target>) {
        let wanted: HashMap<PodId, Target> = targets.into_iter().map(|t| (t.pod, t)).collect();
        let gone: Vec<PodId> = self
            .pods
            .iter()
            .filter(|(pod, sub)| wanted.get(pod) != Some(&sub.target))
            .map(|(pod, _)| *pod)
            .collect();
        for pod in gone {
            self.pods.remove(&pod);
            self.send(Work::Clear { pod });
        }
        for (pod, target) in wanted {
            if self.pods.contains_key(&pod) {
                continue;
            }
            let socket = match sub_socket(&self.ctx, &self.filter).and_then(|s| {
                s.connect(&target.endpoint)?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    self.stats.socket_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(endpoint = %target.endpoint, error = %e, "cannot subscribe to KV events");
                    continue;
                }
            };
            self.pods.insert(
                pod,
                PodSub {
                    target,
                    socket,
                    seq: Sequence::default(),
                    replay: None,
                },
            );
        }
        self.stats.active.store(self.pods.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
