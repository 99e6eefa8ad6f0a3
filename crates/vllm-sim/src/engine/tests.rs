//! Engine behaviour under paused `tokio::time`: slots, the FCFS queue, KV pressure,
//! prefix-cache timing, preemption, aborts and the LoRA budget, checked to the millisecond
//! without waiting in real time.

use super::super::cache::prompt_hashes;
use super::*;

fn config() -> SimConfig {
    SimConfig {
        max_num_seqs: 2,
        kv_blocks: 64,
        block_size: 4,
        bytes_per_token: 1,
        prefill_seconds_per_token: 0.001,
        decode_seconds_per_token: 0.01,
        ..SimConfig::default()
    }
}

fn job(prompt: &str, max_tokens: u32) -> Job {
    Job {
        hashes: prompt_hashes(None, None, prompt.as_bytes(), 4, 1024),
        prompt_tokens: prompt.len() as u32,
        max_tokens,
        lora: None,
        tokens: None,
        salt: None,
    }
}

async fn drain(mut t: Ticket) -> u32 {
    let mut n = 0;
    while t.next_token().await.is_some() {
        n += 1;
    }
    n
}

#[tokio::test(start_paused = true)]
async fn max_num_seqs_bounds_running_and_the_rest_wait_in_order() {
    let engine = Arc::new(Engine::new(&config()));
    let mut tasks = Vec::new();
    for i in 0..5usize {
        let t = engine.submit(job(&format!("prompt number {i}"), 4)).unwrap();
        let s = engine.snapshot();
        assert_eq!((s.running, s.waiting), ((i + 1).min(2), i.saturating_sub(1)));
        tasks.push(tokio::spawn(drain(t)));
    }
    let mut max_running = 0;
    for _ in 0..1000 {
        let s = engine.snapshot();
        max_running = max_running.max(s.running);
        assert!(s.running <= 2);
        if s.served == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(max_running, 2);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 4);
    }
    let s = engine.snapshot();
    assert_eq!((s.running, s.waiting, s.served, s.used_blocks), (0, 0, 5, 0));
    assert_eq!(s.stats.generation_tokens, 20);
    assert_eq!(s.stats.finished[FINISHED_LENGTH], 5);
    assert_eq!(s.stats.e2e.count(), 5);
    // Three of them queued behind the first two.
    assert!(s.stats.queue.sum() > 0.0);
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_are_admitted_in_arrival_order() {
    let engine = Arc::new(Engine::new(&SimConfig {
        max_num_seqs: 1,
        ..config()
    }));
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // Longest first: first come, first served, not shortest first.
    for (i, p) in ["a long prompt of many many tokens", "short", "mid prompt"]
        .into_iter()
        .enumerate()
    {
        let mut t = engine.submit(job(p, 2)).unwrap();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            t.next_token().await;
            order.lock().push(i);
            drain(t).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1);
    }
    assert_eq!(*order.lock(), vec![0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_prompt_that_does_not_fit_waits_with_free_slots() {
    let engine = Arc::new(Engine::new(&SimConfig {
        kv_blocks: 8,
        ..config()
    }));
    // 5 blocks each; only 8 exist.
    let a = engine.submit(job("aaaaaaaaaaaaaaaaaaaa", 2)).unwrap();
    let b = engine.submit(job("bbbbbbbbbbbbbbbbbbbb", 2)).unwrap();
    let s = engine.snapshot();
    assert_eq!((s.running, s.waiting, s.used_blocks), (1, 1, 5));
    let a = tokio::spawn(drain(a));
    let b = tokio::spawn(drain(b));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(engine.snapshot().waiting, 1);
    assert_eq!(a.await.unwrap(), 2);
    assert_eq!(engine.snapshot().running, 1);
    assert_eq!(b.await.unwrap(), 2);
    assert_eq!(engine.snapshot().served, 2);
}

#[tokio::test(start_paused = true)]
async fn a_cached_prefix_shortens_time_to_first_token() {
    let engine = Arc::new(Engine::new(&config()));
    let prompt = "0123456789abcdef0123456789abcdef"; // 32 tokens, 8 blocks
    let mut ttfts = Vec::new();
    for _ in 0..2 {
        let start = Instant::now();
        let mut t = engine.submit(job(prompt, 3)).unwrap();
        assert_eq!(t.next_token().await, Some(0));
        ttfts.push(start.elapsed());
        assert_eq!(drain(t).await, 2);
    }
    // Cold: 32 tokens of prefill. Warm: 7 blocks hit (the last token is always recomputed).
    let near = |d: Duration, ms: u64| d.as_millis().abs_diff(u128::from(ms)) <= 1;
    assert!(near(ttfts[0], 32), "{ttfts:?}");
    assert!(near(ttfts[1], 4), "{ttfts:?}");
    let s = engine.snapshot().stats;
    assert_eq!((s.prefix_queries, s.prefix_hits), (64, 28));
    assert_eq!(
        (s.prompt_tokens, s.prompt_cached, s.prompt_computed),
        (64, 28, 36)
    );
    assert_eq!(s.ttft.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn decode_growth_preempts_the_latest_request_and_both_finish() {
    let engine = Arc::new(Engine::new(&SimConfig {
        kv_blocks: 4,
        ..config()
    }));
    // Each needs 1 block for its prompt and grows to 3 while decoding 8 tokens.
    let a = tokio::spawn(drain(engine.submit(job("aaaa", 8)).unwrap()));
    let b = tokio::spawn(drain(engine.submit(job("bbbb", 8)).unwrap()));
    assert_eq!(engine.snapshot().running, 2);
    assert_eq!(a.await.unwrap(), 8);
    assert_eq!(b.await.unwrap(), 8);
    let s = engine.snapshot();
    assert!(s.stats.preemptions >= 1, "{:?}", s.stats.preemptions);
    assert_eq!(s.stats.generation_tokens, 16);
    assert_eq!((s.served, s.used_blocks, s.kv_cache_usage), (2, 0, 0.0));
}

#[tokio::test(start_paused = true)]
async fn output_tokens_take_blocks_while_running() {
    let engine = Arc::new(Engine::new(&config()));
    let mut t = engine.submit(job("abcd", 9)).unwrap();
    assert_eq!(engine.snapshot().used_blocks, 1);
    for _ in 0..6 {
        t.next_token().await;
    }
    // 4 prompt + 5 fed-back output tokens held during the 6th token's step: 3 blocks.
    assert_eq!(engine.snapshot().used_blocks, 3);
    assert!((engine.snapshot().kv_cache_usage - 3.0 / 64.0).abs() < 1e-12);
    drain(t).await;
    let s = engine.snapshot();
    assert_eq!(s.used_blocks, 0);
    assert_eq!(s.cached_blocks, 1, "the full prompt block stays cached");
}

#[tokio::test(start_paused = true)]
async fn dropping_tickets_aborts_and_frees() {
    let engine = Arc::new(Engine::new(&SimConfig {
        max_num_seqs: 1,
        ..config()
    }));
    let mut running = engine.submit(job("running prompt", 10)).unwrap();
    let waiting = engine.submit(job("waiting prompt", 10)).unwrap();
    running.next_token().await;
    assert_eq!((engine.snapshot().running, engine.snapshot().waiting), (1, 1));
    drop(waiting);
    assert_eq!((engine.snapshot().running, engine.snapshot().waiting), (1, 0));
    drop(running);
    let s = engine.snapshot();
    assert_eq!((s.running, s.waiting, s.used_blocks), (0, 0, 0));
    assert_eq!(s.stats.finished[FINISHED_ABORT], 2);
    assert_eq!(s.served, 0);
}

#[tokio::test(start_paused = true)]
async fn lora_budget_defers_other_adapters_without_blocking_the_queue() {
    let engine = Arc::new(Engine::new(&SimConfig {
        max_num_seqs: 4,
        max_loras: 1,
        lora_adapters: vec!["a".into(), "b".into()],
        ..config()
    }));
    let with = |name: &str, p: &str| Job {
        lora: Some(Arc::from(name)),
        ..job(p, 2)
    };
    let a = engine.submit(with("a", "first")).unwrap();
    let b = engine.submit(with("b", "second")).unwrap();
    let base = engine.submit(job("third", 2)).unwrap();
    let s = engine.snapshot();
    assert_eq!((s.running, s.waiting, s.deferred), (2, 1, 1));
    let current = s
        .lora_states
        .iter()
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(k, _)| k.clone())
        .unwrap();
    assert_eq!(
        current,
        LoraState {
            running: "a".into(),
            waiting: "b".into()
        }
    );
    let (a, b, base) = tokio::join!(drain(a), drain(b), drain(base));
    assert_eq!((a, b, base), (2, 2, 2));
    let s = engine.snapshot();
    let current = s.lora_states.iter().max_by(|x, y| x.1.total_cmp(&y.1)).unwrap();
    assert_eq!(current.0, LoraState::default());
    assert!(s.lora_states.len() >= 3);
}

#[test]
fn too_long_requests_are_refused() {
    let engine = Arc::new(Engine::new(&SimConfig {
        kv_blocks: 2,
        ..config()
    }));
    assert_eq!(
        engine.submit(job("abcdef", 3)).err(),
        Some(SubmitError::TooLong { requested: 9, max: 8 })
    );
    assert!(engine.submit(job("abcdef", 2)).is_ok());
}
