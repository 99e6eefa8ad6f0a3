//! The collector under paused time: polling loops follow the endpoint set, a subscribing
//! source publishes beside them without either overwriting the other, readiness waits for the
//! first round, and failures leave figures aging.

use std::any::{Any, TypeId};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{CollectorConfig, PollingPlan, Sources, spawn};
use crate::datalayer::{Endpoint, EndpointStore, METRICS, Metrics, Writes};
use crate::framework::data::{Attributes, DataKey, KeyId, Value};
use crate::framework::datalayer::{
    ExtractError, Extractor, PollError, PollFuture, Poller, PollingSource, SourceError, SubscribingSource,
    SubscriptionContext,
};
use crate::framework::plugin::Named;

/// Polls a counter; fails while `fail` is set.
struct CountingSource {
    polls: Arc<AtomicU32>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

struct CountingPoller {
    polls: Arc<AtomicU32>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl Poller for CountingPoller {
    fn poll(&mut self) -> PollFuture<'_> {
        Box::pin(async move {
            let n = self.polls.fetch_add(1, Ordering::Relaxed) + 1;
            if self.fail.load(Ordering::Relaxed) {
                return Err(PollError::Closed);
            }
            Ok(Box::new(n) as Box<dyn Any + Send>)
        })
    }

    fn target(&self) -> String {
        "counter".into()
    }
}

impl PollingSource for CountingSource {
    fn output(&self) -> TypeId {
        TypeId::of::<u32>()
    }
    fn interval(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }
    fn timeout(&self) -> Duration {
        Duration::from_millis(50)
    }
    fn poller(&self, _endpoint: &Endpoint, _hints: &[String]) -> Result<Box<dyn Poller>, SourceError> {
        Ok(Box::new(CountingPoller {
            polls: self.polls.clone(),
            fail: self.fail.clone(),
        }))
    }
}

/// Turns the counter into the waiting queue.
struct QueueExtractor;

impl Extractor for QueueExtractor {
    fn input(&self) -> TypeId {
        TypeId::of::<u32>()
    }
    fn writes(&self) -> Vec<KeyId> {
        vec![METRICS.id()]
    }
    fn extract(
        &self,
        _e: &Endpoint,
        payload: &dyn Any,
        _p: &Attributes,
        now: Instant,
    ) -> Result<Writes, ExtractError> {
        let n = payload
            .downcast_ref::<u32>()
            .ok_or(ExtractError::WrongInput("u32"))?;
        let m = Metrics {
            waiting_queue: *n,
            updated_at: Some(now),
            ..Metrics::default()
        };
        Ok(vec![(METRICS.id(), Arc::new(m) as Value)])
    }
}

/// Publishes an event count for every endpoint every 30 ms: a stand-in for an event stream.
struct Events {
    key: DataKey<u64>,
}

impl SubscribingSource for Events {
    fn writes(&self) -> Vec<KeyId> {
        vec![self.key.id()]
    }

    fn run(
        self: Arc<Self>,
        ctx: SubscriptionContext,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>> {
        Box::pin(async move {
            let mut n = 0u64;
            loop {
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_millis(30)) => {}
                }
                n += 1;
                for e in ctx.store.load().endpoints() {
                    let v: Value = Arc::new(n);
                    if !ctx
                        .publisher
                        .publish(e.endpoint.clone(), vec![(self.key.id(), v)])
                        .await
                    {
                        return Ok(());
                    }
                }
            }
        })
    }
}

fn named<T: ?Sized>(name: &str, plugin: Arc<T>) -> Named<T> {
    Named::new(name.into(), "test".into(), plugin)
}

fn ep(addr: &str) -> Endpoint {
    Endpoint::from_address(addr.parse().unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_poller_and_a_subscription_feed_one_endpoint_side_by_side() {
    let store = Arc::new(EndpointStore::new());
    let polls = Arc::new(AtomicU32::new(0));
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let events = DataKey::<u64>::named("collector-test-events");
    let sources = Sources {
        polling: vec![PollingPlan {
            source: named(
                "counter",
                Arc::new(CountingSource {
                    polls: polls.clone(),
                    fail: fail.clone(),
                }) as Arc<dyn PollingSource>,
            ),
            extractors: vec![named("queue", Arc::new(QueueExtractor) as Arc<dyn Extractor>)],
        }],
        subscribing: vec![named(
            "events",
            Arc::new(Events { key: events }) as Arc<dyn SubscribingSource>,
        )],
    };
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut ready = spawn(
        store.clone(),
        sources,
        CollectorConfig::default(),
        &tracker,
        cancel.clone(),
    )
    .unwrap();
    assert!(!*ready.borrow());
    store.set_endpoints([ep("10.0.0.1:8000")]);
    ready.wait_for(|r| *r).await.unwrap();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let snap = store.load();
    let e = &snap.endpoints()[0];
    // Both writers' data is there: neither replaced the other's.
    assert!(e.metrics().waiting_queue >= 5, "{:?}", e.metrics());
    assert!(*e.get(events).unwrap() >= 15);

    // A failing poll changes nothing: the figures age, they are not zeroed.
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let before = store.load().endpoints()[0].metrics().clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snap = store.load();
    let after = snap.endpoints()[0].metrics();
    assert_eq!(after.waiting_queue, before.waiting_queue);
    assert_eq!(after.updated_at, before.updated_at);
    assert!(*snap.endpoints()[0].get(events).unwrap() > *e.get(events).unwrap());

    // A new endpoint gets its own poller; the departed one's stops.
    fail.store(false, std::sync::atomic::Ordering::Relaxed);
    store.set_endpoints([ep("10.0.0.2:8000")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snap = store.load();
    assert_eq!(snap.endpoints().len(), 1);
    assert!(snap.endpoints()[0].metrics().updated_at.is_some());

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_polling_sources_readiness_waits_for_the_pool_only() {
    let store = Arc::new(EndpointStore::new());
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut ready = spawn(
        store.clone(),
        Sources::default(),
        CollectorConfig::default(),
        &tracker,
        cancel.clone(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!*ready.borrow());
    store.set_endpoints([ep("10.0.0.1:8000")]);
    ready.wait_for(|r| *r).await.unwrap();
    cancel.cancel();
}

/// Fails at once.
struct Broken;

impl SubscribingSource for Broken {
    fn writes(&self) -> Vec<KeyId> {
        Vec::new()
    }
    fn run(
        self: Arc<Self>,
        _ctx: SubscriptionContext,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>> {
        Box::pin(async { Err(SourceError::Failed("stream refused".into())) })
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_subscription_stops_the_epp() {
    let store = Arc::new(EndpointStore::new());
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let sources = Sources {
        polling: Vec::new(),
        subscribing: vec![named("broken", Arc::new(Broken) as Arc<dyn SubscribingSource>)],
    };
    let _ready = spawn(
        store,
        sources,
        CollectorConfig::default(),
        &tracker,
        cancel.clone(),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(1), cancel.cancelled())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_writer_cannot_publish_keys_it_did_not_declare() {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let own = DataKey::<u64>::named("collector-test-own");
    let other = DataKey::<u64>::named("collector-test-other");
    let publisher = crate::framework::datalayer::Publisher::new(tx).only(vec![own.id()], "events");
    let v: Value = Arc::new(1u64);
    assert!(
        publisher
            .publish(
                Arc::new(ep("10.0.0.1:8000")),
                vec![(own.id(), v.clone()), (other.id(), v)]
            )
            .await
    );
    let (_, writes) = rx.recv().await.unwrap();
    assert_eq!(writes.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [own.id()]);
}
