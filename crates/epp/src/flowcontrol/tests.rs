//! The controller against a saturation detector the test drives: a pool of `cap` slots, busy
//! ones set by the test, plus what the controller reports it dispatched but nobody scheduled.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::FlowController;
use super::config::{BandConfig, FlowControlConfig, Policy};
use super::metrics::FlowMetrics;
use crate::datalayer::{Endpoint, EndpointStore};
use crate::framework::flowcontrol::{FairnessPolicy, OrderingPolicy};
use crate::framework::plugin::Named;
use crate::framework::requestcontrol::{
    Admit, DispatchError, DispatchRequest, Dispatcher, SaturationDetector, Unseen, Wait,
};
use crate::framework::scheduling::{Candidate, candidates};
use crate::observability::labels::BoundedLabel;
use crate::plugins::flowcontrol::{
    Fcfs, GlobalStrict, PriorityHoldback, RoundRobin, StaticUsageLimit, StaticUsageParams,
};
use crate::protocol::{RequestObserver, RequestRecord};

/// `busy` of `cap` slots in use, plus the unscheduled dispatches.
struct Slots {
    busy: AtomicUsize,
    cap: f64,
}

impl SaturationDetector for Slots {
    fn saturation(&self, candidates: &[Candidate<'_>], now: Instant) -> f64 {
        self.saturation_with(candidates, now, &Unseen::default())
    }

    fn saturation_with(&self, candidates: &[Candidate<'_>], _now: Instant, unseen: &Unseen<'_>) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        (self.busy.load(Ordering::SeqCst) + unseen.unscheduled) as f64 / self.cap
    }
}

fn band(max_requests: u64, fairness: Arc<dyn FairnessPolicy>) -> BandConfig {
    let ordering: Arc<dyn OrderingPolicy> = Arc::new(Fcfs);
    BandConfig {
        max_bytes: 1_000_000,
        max_requests,
        fairness: Policy {
            name: "fairness".into(),
            plugin: fairness,
        },
        ordering: Policy {
            name: "fcfs-ordering-policy".into(),
            plugin: ordering,
        },
    }
}

struct Rig {
    fc: FlowController,
    slots: Arc<Slots>,
    store: Arc<EndpointStore>,
    registry: Registry,
    cancel: CancellationToken,
}

fn rig(cap: usize, max_requests: u64, ttl: Option<Duration>, round_robin: bool) -> Rig {
    rig_with(cap, max_requests, ttl, round_robin, |_| {})
}

fn rig_with(
    cap: usize,
    max_requests: u64,
    ttl: Option<Duration>,
    round_robin: bool,
    tweak: impl FnOnce(&mut FlowControlConfig),
) -> Rig {
    let fairness: Arc<dyn FairnessPolicy> = if round_robin {
        Arc::new(RoundRobin)
    } else {
        Arc::new(GlobalStrict)
    };
    let b = band(max_requests, fairness);
    let mut cfg = FlowControlConfig {
        max_bytes: 0,
        max_requests: 0,
        ttl,
        bands: vec![(0, b.clone())],
        default_band: b,
        negative_band: None,
        usage_limit: Policy {
            name: "static-usage-limit-policy".into(),
            plugin: Arc::new(StaticUsageLimit::new(&StaticUsageParams::default()).unwrap()),
        },
    };
    tweak(&mut cfg);
    let slots = Arc::new(Slots {
        busy: AtomicUsize::new(0),
        cap: cap as f64,
    });
    let store = Arc::new(EndpointStore::new());
    store.set_endpoints([Endpoint::from_address("10.0.0.1:8000".parse().unwrap())]);
    let mut registry = Registry::default();
    let metrics = FlowMetrics::register(&mut registry, "pool");
    let fc = FlowController::new(
        cfg,
        Named::new("slots".into(), "slots".into(), slots.clone()),
        store.clone(),
        metrics,
        BoundedLabel::new(2, Default::default()),
        BoundedLabel::new(10, Default::default()),
    );
    let cancel = CancellationToken::new();
    tokio::spawn(fc.clone().run(cancel.clone()));
    Rig {
        fc,
        slots,
        store,
        registry,
        cancel,
    }
}

impl Rig {
    /// Asks admission; a request admitted at once is handed back as scheduled, as the
    /// director does right after scheduling it.
    fn ask(&self, id: &str, priority: i32, fairness: &str) -> Admit {
        let admit = self.ask_unscheduled(id, priority, fairness);
        if matches!(admit, Admit::Now) {
            self.fc.scheduled();
        }
        admit
    }

    /// Asks admission and leaves a request admitted at once not yet scheduled.
    fn ask_unscheduled(&self, id: &str, priority: i32, fairness: &str) -> Admit {
        let snapshot = self.store.load();
        let pool = candidates(snapshot.endpoints());
        self.fc.dispatch(&DispatchRequest {
            request_id: id,
            priority,
            fairness_id: fairness,
            bytes: 100,
            model: "m",
            target_model: "m",
            received: Instant::now(),
            slo_ttft: None,
            pool: &pool,
        })
    }

    fn wait(&self, id: &str, priority: i32, fairness: &str) -> Wait {
        match self.ask(id, priority, fairness) {
            Admit::Wait(w) => w,
            Admit::Now => panic!("{id} went on at once"),
        }
    }

    /// A request ended: one slot frees and the controller hears of it.
    fn complete(&self) {
        self.slots.busy.fetch_sub(1, Ordering::SeqCst);
        self.fc.finished(&RequestRecord::default());
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

fn poll_once(w: &mut Wait) -> Poll<Result<(), DispatchError>> {
    let waker = std::task::Waker::noop();
    w.as_mut().poll(&mut Context::from_waker(waker))
}

/// Resolves the waits that are ready, in the given order, marking a slot busy for each
/// dispatched one (as scheduling would).
async fn settle(rig: &Rig, waits: &mut Vec<(String, Wait)>) -> Vec<(String, Result<(), DispatchError>)> {
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    let mut done = Vec::new();
    let mut i = 0;
    while i < waits.len() {
        if let Poll::Ready(r) = poll_once(&mut waits[i].1) {
            if r.is_ok() {
                rig.slots.busy.fetch_add(1, Ordering::SeqCst);
            }
            done.push((waits.remove(i).0, r));
        } else {
            i += 1;
        }
    }
    done
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_counts_the_requests_admitted_but_not_yet_scheduled() {
    let rig = rig(2, 100, None, false);
    rig.slots.busy.store(1, Ordering::SeqCst);
    // One slot left: the first takes it, and until it is scheduled a second one waits.
    assert!(matches!(rig.ask_unscheduled("a", 0, "t"), Admit::Now));
    let b = rig.ask_unscheduled("b", 0, "t");
    assert!(matches!(b, Admit::Wait(_)));
    assert_eq!(rig.fc.queued(), 1);
    // Once scheduled, the first counts in the figures instead: the pool is still full.
    rig.slots.busy.fetch_add(1, Ordering::SeqCst);
    rig.fc.scheduled();
    assert!(matches!(rig.ask_unscheduled("c", 0, "t"), Admit::Wait(_)));
    // A slot frees and the queue is empty: nothing is left reserved (the count went back to
    // zero), so a newcomer goes at once.
    rig.slots.busy.store(1, Ordering::SeqCst);
    drop(b);
    assert!(matches!(rig.ask("d", 0, "t"), Admit::Now));
}

#[tokio::test(start_paused = true)]
async fn nothing_waits_until_the_pool_is_full_then_requests_queue_and_go_as_slots_free() {
    let rig = rig(2, 100, None, false);
    assert!(matches!(rig.ask("a", 0, "t"), Admit::Now));
    rig.slots.busy.store(2, Ordering::SeqCst);
    let mut waits = vec![
        ("b".to_owned(), rig.wait("b", 0, "t")),
        ("c".into(), rig.wait("c", 0, "t")),
    ];
    assert_eq!(rig.fc.queued(), 2);
    assert!(settle(&rig, &mut waits).await.is_empty());
    rig.complete();
    let done = settle(&rig, &mut waits).await;
    assert_eq!(done, vec![("b".to_owned(), Ok(()))]);
    // The slot b took is busy again: c still waits, queued.
    assert_eq!(rig.fc.queued(), 1);
    rig.complete();
    assert_eq!(settle(&rig, &mut waits).await, vec![("c".to_owned(), Ok(()))]);
    let m = rig.metrics();
    assert!(
        m.contains("llm_d_epp_flow_control_requests_total{outcome=\"Dispatched\",priority=\"0\",inference_pool=\"pool\"} 3"),
        "{m}"
    );
    assert!(m.contains("llm_d_epp_flow_control_queue_size{fairness_id=\"t\",priority=\"0\",inference_pool=\"pool\",model_name=\"m\",target_model_name=\"m\"} 0"));
    assert!(m.contains("inference_extension_flow_control_pool_saturation"));
    rig.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn once_one_waits_newcomers_queue_behind_it_and_higher_bands_go_first() {
    let rig = rig(1, 100, None, false);
    rig.slots.busy.store(1, Ordering::SeqCst);
    let mut waits = vec![("low".to_owned(), rig.wait("low", -1, "t"))];
    // Room appears, but a queue exists: the newcomer does not overtake through the fast path.
    waits.push(("high".into(), rig.wait("high", 5, "t")));
    waits.push(("mid".into(), rig.wait("mid", 0, "t")));
    let mut order = Vec::new();
    for _ in 0..3 {
        rig.complete();
        order.extend(settle(&rig, &mut waits).await.into_iter().map(|(id, r)| {
            assert_eq!(r, Ok(()));
            id
        }));
    }
    assert_eq!(order, vec!["high", "mid", "low"]);
    rig.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn round_robin_shares_dispatches_between_tenants() {
    let rig = rig(1, 100, None, true);
    rig.slots.busy.store(1, Ordering::SeqCst);
    let mut waits = Vec::new();
    for i in 0..6 {
        waits.push((format!("a{i}"), rig.wait(&format!("a{i}"), 0, "a")));
    }
    for i in 0..2 {
        waits.push((format!("b{i}"), rig.wait(&format!("b{i}"), 0, "b")));
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        rig.complete();
        order.extend(settle(&rig, &mut waits).await.into_iter().map(|(id, _)| id));
    }
    assert_eq!(order, vec!["a0", "b0", "a1", "b1"]);
    rig.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn limits_ttl_cancellation_and_shutdown_each_end_a_request_their_way() {
    let rig = rig(1, 2, Some(Duration::from_secs(60)), false);
    rig.slots.busy.store(1, Ordering::SeqCst);
    let mut waits = vec![
        ("a".to_owned(), rig.wait("a", 0, "t")),
        ("b".into(), rig.wait("b", 0, "t")),
    ];
    // The band holds two.
    let mut full = rig.wait("c", 0, "t");
    assert_eq!(poll_once(&mut full), Poll::Ready(Err(DispatchError::Saturated)));
    // The client of b goes away: b leaves the queue at once.
    drop(waits.pop());
    assert_eq!(rig.fc.queued(), 1);
    let d = rig.wait("d", 0, "t");
    waits.push(("d".into(), d));
    // a's and d's TTL passes.
    tokio::time::advance(Duration::from_secs(61)).await;
    let done = settle(&rig, &mut waits).await;
    assert_eq!(
        done,
        vec![
            ("a".to_owned(), Err(DispatchError::Expired)),
            ("d".to_owned(), Err(DispatchError::Expired))
        ]
    );
    assert_eq!(rig.fc.queued(), 0);
    let m = rig.metrics();
    for outcome in [
        "RejectedCapacity\",priority=\"0\",inference_pool=\"pool\"} 1",
        "EvictedContextCancelled\",priority=\"0\",inference_pool=\"pool\"} 1",
        "EvictedTTL\",priority=\"0\",inference_pool=\"pool\"} 2",
    ] {
        assert!(m.contains(outcome), "{outcome}\n{m}");
    }
    // Shutdown answers the waiting and refuses newcomers.
    let mut waits = vec![("e".to_owned(), rig.wait("e", 0, "t"))];
    rig.cancel.cancel();
    let done = settle(&rig, &mut waits).await;
    assert_eq!(done, vec![("e".to_owned(), Err(DispatchError::Shutdown))]);
    let mut late = rig.wait("f", 0, "t");
    assert_eq!(poll_once(&mut late), Poll::Ready(Err(DispatchError::Shutdown)));
}

#[tokio::test(start_paused = true)]
async fn an_empty_pool_is_a_waiting_room_until_endpoints_come() {
    let rig = rig(1, 1, Some(Duration::from_secs(5)), false);
    rig.store.set_endpoints([]);
    let mut waits = vec![("a".to_owned(), rig.wait("a", 0, "t"))];
    let mut full = rig.wait("b", 0, "t");
    assert_eq!(poll_once(&mut full), Poll::Ready(Err(DispatchError::NoEndpoints)));
    // Endpoints appear: the publication wakes the dispatcher.
    rig.store
        .set_endpoints([Endpoint::from_address("10.0.0.1:8000".parse().unwrap())]);
    assert_eq!(settle(&rig, &mut waits).await, vec![("a".to_owned(), Ok(()))]);
    // With the pool gone again, a request that waits out its TTL hears there are none.
    rig.store.set_endpoints([]);
    let mut waits = vec![("c".to_owned(), rig.wait("c", 0, "t"))];
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(
        settle(&rig, &mut waits).await,
        vec![("c".to_owned(), Err(DispatchError::NoEndpoints))]
    );
    rig.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_burst_is_released_only_as_far_as_the_pool_has_room() {
    let rig = rig(4, 100, None, false);
    rig.slots.busy.store(4, Ordering::SeqCst);
    let mut waits: Vec<(String, Wait)> = (0..10)
        .map(|i| (format!("r{i}"), rig.wait(&format!("r{i}"), 0, "t")))
        .collect();
    // Three slots free at once; nobody has scheduled the dispatched ones yet, so exactly three
    // go, not the whole queue.
    rig.slots.busy.store(1, Ordering::SeqCst);
    rig.fc.finished(&RequestRecord::default());
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    assert_eq!(rig.fc.queued(), 7);
    let done = settle(&rig, &mut waits).await;
    assert_eq!(done.len(), 3);
    rig.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn holdback_keeps_room_for_the_higher_band() {
    let rig = rig_with(4, 100, None, false, |cfg| {
        cfg.bands.push((10, cfg.default_band.clone()));
        cfg.bands.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
        cfg.usage_limit = Policy {
            name: "priority-holdback-policy".into(),
            plugin: Arc::new(
                PriorityHoldback::new(&serde_yaml::from_str("minCeiling: 0.5").unwrap()).unwrap(),
            ),
        };
    });
    // Band 0 stops at half the slots: its third request waits though two slots are free ...
    assert!(matches!(rig.ask("a", 0, "t"), Admit::Now));
    rig.slots.busy.store(2, Ordering::SeqCst);
    let mut waits = vec![("b".to_owned(), rig.wait("b", 0, "t"))];
    assert!(settle(&rig, &mut waits).await.is_empty());
    // ... which band 10 uses (it queues behind b, and is dispatched first).
    waits.push(("c".into(), rig.wait("c", 10, "t")));
    assert_eq!(settle(&rig, &mut waits).await, vec![("c".to_owned(), Ok(()))]);
    rig.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_full_round_robin_band_makes_room_for_the_smaller_tenant() {
    let rig = rig(1, 3, None, true);
    rig.slots.busy.store(1, Ordering::SeqCst);
    let mut waits: Vec<(String, Wait)> = (0..3)
        .map(|i| (format!("a{i}"), rig.wait(&format!("a{i}"), 0, "a")))
        .collect();
    waits.push(("b0".into(), rig.wait("b0", 0, "b")));
    assert_eq!(
        settle(&rig, &mut waits).await,
        vec![("a2".to_owned(), Err(DispatchError::PushedOut))]
    );
    assert_eq!(rig.fc.queued(), 3);
    assert!(
        rig.metrics()
            .contains("outcome=\"EvictedQueuePressure\",priority=\"0\",inference_pool=\"pool\"} 1")
    );
    rig.cancel.cancel();
}

#[test]
fn fairness_labels_are_bounded() {
    let fairness = BoundedLabel::new(1, Default::default());
    let models = BoundedLabel::new(1, Default::default());
    assert_eq!(
        FlowMetrics::labels(&fairness, &models, "a", 0, "m", "m").fairness_id,
        "a"
    );
    assert_eq!(
        FlowMetrics::labels(&fairness, &models, "b", 0, "m", "m").fairness_id,
        "other"
    );
}
