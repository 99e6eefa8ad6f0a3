//! The subscriber against a publisher speaking vLLM's protocol over real libzmq sockets on
//! loopback (the simulator's, which follows `vllm/distributed/kv_events.py`): per-endpoint
//! and central modes, lost messages recovered by replay or answered by a clear, restarts.

use std::time::Duration;

use epp_testkit::free_port;
use tokio::sync::mpsc;
use vllm_sim::kvevents::{Event, Publisher, PublisherConfig};

use super::*;

fn stored(h: u64) -> Event {
    Event::Stored {
        hashes: vec![h],
        parent: None,
        tokens: vec![1, 2, 3, 4],
        block_size: 4,
        lora_name: None,
        extra_keys: vec![None],
    }
}

/// What the worker saw: stored hashes in order, with `0` for a clear.
async fn collect(rx: &mut mpsc::Receiver<Work>, want: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.iter().filter(|h| **h != 0).count() < want {
        let work = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out with {out:?}"))
            .unwrap();
        match work {
            Work::Clear { .. } | Work::Forget { .. } => out.push(0),
            Work::Events { events, .. } => {
                for e in events {
                    if let KvEvent::BlockStored(s) = e {
                        out.push(super::super::ingest::engine_hash(&s.block_hashes[0]));
                    }
                }
            }
        }
    }
    out
}

fn start_pod_mode(port: u16, replay: Option<u16>) -> (Subscriber, mpsc::Receiver<Work>) {
    let (tx, rx) = mpsc::channel(64);
    let (sub, bound) = Subscriber::start(
        SubscriberConfig {
            central: None,
            topic_filter: "kv@".into(),
        },
        Arc::new(|_: &str, _: Option<i64>| None),
        vec![tx],
    )
    .unwrap();
    assert!(bound.is_none());
    sub.set_targets(vec![Target {
        pod: 7,
        name: "pod-a".into(),
        endpoint: format!("tcp://127.0.0.1:{port}"),
        replay: replay.map(|p| format!("tcp://127.0.0.1:{p}")),
    }]);
    (sub, rx)
}

fn publisher(port: u16, replay: Option<u16>) -> Publisher {
    Publisher::start(PublisherConfig {
        endpoint: format!("tcp://127.0.0.1:{port}"),
        bind: Some(true),
        replay_endpoint: replay.map(|p| format!("tcp://127.0.0.1:{p}")),
        topic: "kv@127.0.0.1:8000@tiny".into(),
        buffer_steps: 100,
        dp_rank: 0,
        ..Default::default()
    })
    .unwrap()
}

/// Publishes until the subscriber sees a message (PUB drops what is sent before a subscriber
/// has joined, as vLLM's does), then drains what the joining left.
async fn join(p: &Publisher, rx: &mut mpsc::Receiver<Work>) {
    for i in 0..100u64 {
        p.publish(vec![Event::Cleared], i as f64);
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            tokio::time::sleep(Duration::from_millis(300)).await;
            while rx.try_recv().is_ok() {}
            return;
        }
    }
    panic!("the subscriber never joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_messages_are_replayed_in_order() {
    let (port, replay) = (free_port(), free_port());
    let p = publisher(port, Some(replay));
    let (_sub, mut rx) = start_pod_mode(port, Some(replay));
    join(&p, &mut rx).await;
    p.publish(vec![stored(1)], 1.0);
    p.lose_next(2);
    p.publish(vec![stored(2)], 2.0);
    p.publish(vec![stored(3)], 3.0);
    p.publish(vec![stored(4)], 4.0);
    // 2 and 3 never reached the subscriber: it asked the replay socket for them.
    assert_eq!(collect(&mut rx, 4).await, vec![1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replay_a_gap_clears_the_endpoint() {
    let port = free_port();
    let p = publisher(port, None);
    let (sub, mut rx) = start_pod_mode(port, None);
    join(&p, &mut rx).await;
    p.publish(vec![stored(1)], 1.0);
    p.lose_next(1);
    p.publish(vec![stored(2)], 2.0);
    p.publish(vec![stored(3)], 3.0);
    assert_eq!(collect(&mut rx, 2).await, vec![1, 0, 3]);
    assert!(sub.stats.gaps.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_clears_the_endpoint() {
    let port = free_port();
    let p = publisher(port, None);
    let (_sub, mut rx) = start_pod_mode(port, None);
    join(&p, &mut rx).await;
    // Far enough along that the new process (numbering from 0) is still below when the
    // subscriber reconnects. (A restart whose numbers happen to continue exactly where the
    // old process stopped is not told apart, as in the reference.)
    for h in 1..=40 {
        p.publish(vec![stored(h)], 1.0);
    }
    assert_eq!(collect(&mut rx, 40).await, (1..=40).collect::<Vec<u64>>());
    drop(p);
    // A new process numbers from 0 again.
    let p = publisher(port, None);
    let mut first = None;
    for i in 0..100 {
        p.publish(vec![stored(100 + i)], 1.0);
        if let Ok(Some(w)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            first = Some(matches!(w, Work::Clear { .. }));
            break;
        }
    }
    assert_eq!(first, Some(true), "the first word after a restart is a clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_mode_names_endpoints_by_topic() {
    let port = free_port();
    let (tx, mut rx) = mpsc::channel(64);
    let (sub, bound) = Subscriber::start(
        SubscriberConfig {
            central: Some(format!("tcp://127.0.0.1:{port}")),
            topic_filter: "kv@".into(),
        },
        Arc::new(|topic: &str, _: Option<i64>| (topic == "kv@127.0.0.1:8000@tiny").then_some(3)),
        vec![tx],
    )
    .unwrap();
    assert_eq!(bound.as_deref(), Some(&*format!("tcp://127.0.0.1:{port}")));
    // vLLM connects to an address without `*`.
    let p = Publisher::start(PublisherConfig {
        endpoint: format!("tcp://127.0.0.1:{port}"),
        bind: None,
        replay_endpoint: None,
        topic: "kv@127.0.0.1:8000@tiny".into(),
        buffer_steps: 10,
        dp_rank: 0,
        ..Default::default()
    })
    .unwrap();
    join(&p, &mut rx).await;
    p.publish(vec![stored(5)], 1.0);
    let got = collect(&mut rx, 1).await;
    assert_eq!(got.last(), Some(&5));
    // Another pool's publisher: counted, dropped.
    let other = Publisher::start(PublisherConfig {
        endpoint: format!("tcp://127.0.0.1:{port}"),
        bind: None,
        replay_endpoint: None,
        topic: "kv@10.9.9.9:8000@tiny".into(),
        buffer_steps: 10,
        dp_rank: 0,
        ..Default::default()
    })
    .unwrap();
    for _ in 0..50 {
        other.publish(vec![stored(6)], 1.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if sub.stats.unknown_topic.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    assert!(sub.stats.unknown_topic.load(Ordering::Relaxed) > 0);
    // A bad bind fails at once.
    let e = Subscriber::start(
        SubscriberConfig {
            central: Some("tcp://256.0.0.1:1".into()),
            topic_filter: "kv@".into(),
        },
        Arc::new(|_: &str, _: Option<i64>| None),
        vec![],
    )
    .unwrap_err();
    assert!(e.to_string().contains("256.0.0.1"), "{e}");
}
