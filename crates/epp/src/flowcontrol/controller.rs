//! The flow controller: the [`Dispatcher`] the director asks for every request when the
//! `flowControl` gate is on, and the task that dispatches queued requests.
//!
//! * **Fast path.** Nothing queued and the pool below the request's band ceiling: the request
//!   goes on in the same call (two atomic loads and one saturation reading; no lock, no task).
//! * **Queue.** Otherwise it is queued (or refused: 429 `rejected-saturated`, or 503
//!   `rejected-no-endpoints` when the pool is empty; in a full round-robin band it may push
//!   out the largest tenant's newest request, which gets 429 `evicted-queue-pressure`) and
//!   waits on a oneshot channel. Its wait
//!   ends when the dispatcher sends it on, when its TTL passes (429 `rejected-ttl-expired`, or
//!   503 `rejected-no-endpoints` with an empty pool), or at shutdown (503
//!   `rejected-shutting-down`). Dropping the wait (the ext_proc stream closed: the client went
//!   away) takes the request out of the queue at once.
//! * **Dispatch.** One owned task runs a cycle after each enqueue, each completed request (the
//!   observer's `finished`), each published snapshot (new figures), and every 10 ms while
//!   requests wait. A cycle dispatches from the highest non-empty band, by its fairness
//!   policy, while the saturation stays below the band's ceiling. The reference dispatches one
//!   request per 1 ms tick and re-reads saturation from figures that do not yet show what it
//!   just sent; this controller dispatches as many as fit in one cycle and counts what it
//!   sent that the figures cannot show yet ([`Unseen`]: requests not yet scheduled, and those
//!   dispatched after each endpoint's last scrape), so one fresh scrape does not release the
//!   whole queue onto a saturated pool.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::FlowControlConfig;
use super::metrics::{FlowMetrics, Outcome, RequestLabels};
use super::queue::{Entry, Queues, Ticket};
use crate::datalayer::EndpointStore;
use crate::framework::flowcontrol::QueuedRequest;
use crate::framework::plugin::Named;
use crate::framework::requestcontrol::{
    Admit, DispatchError, DispatchRequest, Dispatcher, SaturationDetector, Unseen,
};
use crate::framework::scheduling::candidates;
use crate::observability::labels::BoundedLabel;
use crate::protocol::{RequestObserver, RequestRecord};

/// How often a cycle runs while requests wait and nothing else wakes the dispatcher (figures
/// can turn stale, recent dispatches age out).
const TICK: Duration = Duration::from_millis(10);
/// Recent dispatch times kept for [`Unseen`] at most.
const MAX_RECENT: usize = 65_536;

type Answer = Result<(), DispatchError>;

/// A queued request's side of the queue.
struct Waiter {
    tx: oneshot::Sender<Answer>,
    labels: Arc<RequestLabels>,
    enqueued: Instant,
}

struct State {
    queues: Queues<Waiter>,
    /// When recent queued requests were dispatched, oldest first.
    recent: VecDeque<Instant>,
    closed: bool,
}

struct Inner {
    cfg: Arc<FlowControlConfig>,
    detector: Named<dyn SaturationDetector>,
    store: Arc<EndpointStore>,
    state: Mutex<State>,
    /// Requests queued (read without the lock by the fast path).
    queued: AtomicU64,
    /// Dispatched, not yet received by their stream.
    unscheduled: AtomicUsize,
    /// The last cycle saw no endpoint.
    pool_empty: AtomicBool,
    /// The priorities with a band, highest first (the fast path's copy).
    priorities: ArcSwap<Vec<i32>>,
    wake: Notify,
    metrics: FlowMetrics,
    fairness: BoundedLabel,
    models: BoundedLabel,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct FlowController {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FlowController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowController")
            .field("queued", &self.inner.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl FlowController {
    /// A controller over `store`'s pool, gating with `detector`. `fairness` and `models`
    /// bound the label values of the metrics.
    pub fn new(
        cfg: FlowControlConfig,
        detector: Named<dyn SaturationDetector>,
        store: Arc<EndpointStore>,
        metrics: FlowMetrics,
        fairness: BoundedLabel,
        models: BoundedLabel,
    ) -> Self {
        let cfg = Arc::new(cfg);
        let queues = Queues::new(cfg.clone());
        Self {
            inner: Arc::new(Inner {
                priorities: ArcSwap::from_pointee(queues.priorities().to_vec()),
                state: Mutex::new(State {
                    queues,
                    recent: VecDeque::new(),
                    closed: false,
                }),
                cfg,
                detector,
                store,
                queued: AtomicU64::new(0),
                unscheduled: AtomicUsize::new(0),
                pool_empty: AtomicBool::new(false),
                wake: Notify::new(),
                metrics,
                fairness,
                models,
            }),
        }
    }

    /// Requests waiting now.
    pub fn queued(&self) -> u64 {
        self.inner.queued.load(Ordering::Acquire)
    }

    /// Dispatches queued requests until `cancel` fires, then answers every waiting request
    /// 503 `rejected-shutting-down` and refuses new ones the same way.
    pub async fn run(self, cancel: CancellationToken) {
        let inner = &self.inner;
        loop {
            let woken = inner.wake.notified();
            let published = inner.store.published();
            tokio::pin!(woken, published);
            woken.as_mut().enable();
            published.as_mut().enable();
            inner.cycle();
            let waiting = inner.queued.load(Ordering::Acquire) > 0;
            tokio::select! {
                () = cancel.cancelled() => break,
                () = &mut woken => {}
                () = &mut published, if waiting => {}
                () = tokio::time::sleep(TICK), if waiting => {}
            }
        }
        inner.shut();
    }
}

impl Inner {
    fn labels(&self, req: &DispatchRequest<'_>) -> RequestLabels {
        FlowMetrics::labels(
            &self.fairness,
            &self.models,
            req.fairness_id,
            req.priority,
            req.model,
            req.target_model,
        )
    }

    /// One dispatch cycle: see the module docs.
    fn cycle(&self) {
        if self.queued.load(Ordering::Acquire) == 0 {
            return;
        }
        let started = std::time::Instant::now();
        let snapshot = self.store.load();
        let pool = candidates(snapshot.endpoints());
        let now = Instant::now();
        self.pool_empty.store(pool.is_empty(), Ordering::Release);
        let oldest_scrape = pool.iter().filter_map(|c| c.metrics().updated_at).min();
        let mut st = self.state.lock();
        let State { queues, recent, .. } = &mut *st;
        while recent.len() > MAX_RECENT || recent.front().zip(oldest_scrape).is_some_and(|(d, s)| *d <= s) {
            recent.pop_front();
        }
        let mut saturation;
        loop {
            let unseen = Unseen {
                unscheduled: self.unscheduled.load(Ordering::Acquire),
                dispatched_at: recent.make_contiguous(),
            };
            saturation = self.detector.plugin.saturation_with(&pool, now, &unseen);
            let Some((_, _, entry)) = queues.pop(saturation) else {
                break;
            };
            // Counted before the queue may read empty: the fast path, which admits only when
            // nothing is queued, must already see this request.
            self.unscheduled.fetch_add(1, Ordering::AcqRel);
            self.queued.store(queues.len(), Ordering::Release);
            let w = entry.value;
            self.metrics.left(&w.labels, entry.bytes);
            if w.tx.send(Ok(())).is_ok() {
                recent.push_back(now);
                self.metrics.finished(
                    &w.labels,
                    Outcome::Dispatched,
                    now.saturating_duration_since(w.enqueued),
                );
            } else {
                // Its stream is being dropped and will find it gone.
                self.unscheduled.fetch_sub(1, Ordering::AcqRel);
                self.metrics.finished(
                    &w.labels,
                    Outcome::EvictedContextCancelled,
                    now.saturating_duration_since(w.enqueued),
                );
            }
        }
        drop(st);
        self.metrics.cycle(started.elapsed(), saturation);
    }

    /// Shutdown: every waiting request is answered, new ones are refused.
    fn shut(&self) {
        let drained = {
            let mut st = self.state.lock();
            st.closed = true;
            let d = st.queues.drain();
            self.queued.store(0, Ordering::Release);
            d
        };
        let now = Instant::now();
        for (_, _, entry) in drained {
            self.evict(entry, Outcome::EvictedOther, DispatchError::Shutdown, now);
        }
    }

    /// Answers a request taken out of the queue with `err`, counting it as `outcome`.
    fn evict(&self, entry: Entry<Waiter>, outcome: Outcome, err: DispatchError, now: Instant) {
        let w = entry.value;
        self.metrics.left(&w.labels, entry.bytes);
        self.metrics
            .finished(&w.labels, outcome, now.saturating_duration_since(w.enqueued));
        let _ = w.tx.send(Err(err));
    }

    fn enqueue(self: &Arc<Self>, req: &DispatchRequest<'_>, now: Instant) -> Admit {
        let labels = Arc::new(self.labels(req));
        let (tx, rx) = oneshot::channel();
        let queued = QueuedRequest {
            enqueued: now,
            received: req.received,
            ttl: self.cfg.ttl,
            slo_ttft: req.slo_ttft,
        };
        let bytes = req.bytes as u64;
        let waiter = Waiter {
            tx,
            labels: labels.clone(),
            enqueued: now,
        };
        let pushed = {
            let mut st = self.state.lock();
            if st.closed {
                Err(None)
            } else {
                let r = st
                    .queues
                    .push(req.priority, req.fairness_id, &queued, bytes, waiter)
                    .map_err(|(full, _)| Some(full));
                self.queued.store(st.queues.len(), Ordering::Release);
                if st.queues.priorities().len() != self.priorities.load().len() {
                    self.priorities.store(Arc::new(st.queues.priorities().to_vec()));
                }
                r
            }
        };
        let ticket = match pushed {
            Ok((ticket, pushed_out)) => {
                if let Some(out) = pushed_out {
                    self.evict(out, Outcome::EvictedQueuePressure, DispatchError::PushedOut, now);
                }
                ticket
            }
            Err(None) => return refused(DispatchError::Shutdown),
            Err(Some(full)) => {
                let (outcome, err) = if req.pool.is_empty() {
                    (Outcome::RejectedNoEndpoints, DispatchError::NoEndpoints)
                } else {
                    (Outcome::RejectedCapacity, DispatchError::Saturated)
                };
                tracing::debug!(
                    request_id = req.request_id,
                    ?full,
                    priority = req.priority,
                    "flow control queue full"
                );
                self.metrics.finished(&labels, outcome, Duration::ZERO);
                return refused(err);
            }
        };
        self.metrics
            .queued(&labels, bytes, now.elapsed().min(Duration::from_secs(1)));
        self.wake.notify_one();
        let waiting = Waiting {
            inner: self.clone(),
            ticket: Some(ticket),
            rx,
            labels,
            bytes,
            enqueued: now,
        };
        let deadline = self.cfg.ttl.map(|ttl| now + ttl);
        Admit::Wait(Box::pin(waiting.wait(deadline)))
    }
}

fn refused(err: DispatchError) -> Admit {
    Admit::Wait(Box::pin(std::future::ready(Err(err))))
}

/// A queued request's wait. Dropped before its answer (the client went away), it takes the
/// request out of the queue.
struct Waiting {
    inner: Arc<Inner>,
    /// `Some` while the request may still be in the queue.
    ticket: Option<Ticket>,
    rx: oneshot::Receiver<Answer>,
    labels: Arc<RequestLabels>,
    bytes: u64,
    enqueued: Instant,
}

impl Waiting {
    async fn wait(mut self, deadline: Option<Instant>) -> Answer {
        let answer = match deadline {
            None => (&mut self.rx).await,
            Some(deadline) => tokio::select! {
                answer = &mut self.rx => answer,
                () = tokio::time::sleep_until(deadline) => {
                    if self.withdraw(Outcome::EvictedTtl) {
                        return Err(if self.inner.pool_empty.load(Ordering::Acquire) {
                            DispatchError::NoEndpoints
                        } else {
                            DispatchError::Expired
                        });
                    }
                    // Dispatched (or drained) just now: its answer is on the way.
                    (&mut self.rx).await
                }
            },
        };
        self.ticket = None;
        match answer {
            Ok(Ok(())) => {
                self.inner.unscheduled.fetch_sub(1, Ordering::AcqRel);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DispatchError::Shutdown),
        }
    }

    /// Takes the request out of the queue, recording `outcome`; `false` when it had left.
    fn withdraw(&mut self, outcome: Outcome) -> bool {
        let Some(ticket) = self.ticket.take() else {
            return false;
        };
        let removed = {
            let mut st = self.inner.state.lock();
            let r = st.queues.remove(&ticket);
            self.inner.queued.store(st.queues.len(), Ordering::Release);
            r
        };
        if removed.is_none() {
            return false;
        }
        self.inner.metrics.left(&self.labels, self.bytes);
        self.inner
            .metrics
            .finished(&self.labels, outcome, self.enqueued.elapsed());
        true
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.ticket.is_some() && !self.withdraw(Outcome::EvictedContextCancelled) {
            // Dispatched while its stream went away: undo the count the stream never took.
            if let Ok(Ok(())) = self.rx.try_recv() {
                self.inner.unscheduled.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Dispatcher for FlowController {
    fn dispatch(&self, req: &DispatchRequest<'_>) -> Admit {
        let inner = &self.inner;
        let now = Instant::now();
        let priorities = inner.priorities.load();
        // A priority without a band yet takes the queue once, which makes one.
        if inner.queued.load(Ordering::Acquire) == 0
            && let Some(band) = priorities.iter().position(|p| *p == req.priority)
        {
            // Requests let through but not yet scheduled are not in the figures: without them
            // two newcomers (or a newcomer and a request the dispatcher just released) could
            // take one free slot, and the second would find every endpoint full. This one
            // reserves its place first, so that concurrent ones count each other.
            let others = inner.unscheduled.fetch_add(1, Ordering::AcqRel);
            let unseen = Unseen {
                unscheduled: others,
                dispatched_at: &[],
            };
            let saturation = inner
                .detector
                .timed(|d| d.saturation_with(req.pool, now, &unseen));
            let mut ceilings: SmallVec<[f64; 8]> = SmallVec::from_elem(1.0, priorities.len());
            inner
                .cfg
                .usage_limit
                .plugin
                .ceilings(saturation, &priorities, &mut ceilings);
            if saturation < ceilings[band] {
                inner
                    .metrics
                    .finished(&inner.labels(req), Outcome::Dispatched, Duration::ZERO);
                return Admit::Now;
            }
            inner.unscheduled.fetch_sub(1, Ordering::AcqRel);
        }
        inner.enqueue(req, now)
    }

    fn scheduled(&self) {
        self.inner.unscheduled.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RequestObserver for FlowController {
    /// A request ended: capacity may have freed.
    fn finished(&self, _record: &RequestRecord) {
        if self.inner.queued.load(Ordering::Acquire) > 0 {
            self.inner.wake.notify_one();
        }
    }
}
