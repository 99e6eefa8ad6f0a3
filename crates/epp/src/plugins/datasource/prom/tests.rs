//! Tests of the metrics-page parser on the captured vLLM pages and hand-written ones.
use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/vllm-0.32-cpu");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()
}

fn vllm() -> EngineMetrics {
    EngineMetrics::builtin("vllm").unwrap()
}

#[test]
fn spec_syntax() {
    assert_eq!(MetricSpec::parse("").unwrap(), None);
    let s = MetricSpec::parse(" nv_trt_llm_request_metrics{request_type=waiting, x=\"y\"} ")
        .unwrap()
        .unwrap();
    assert_eq!(s.name, "nv_trt_llm_request_metrics");
    assert_eq!(
        s.labels,
        vec![
            ("request_type".into(), "waiting".into()),
            ("x".into(), "y".into())
        ]
    );
    assert!(MetricSpec::parse("m{a=b").is_err());
    assert!(MetricSpec::parse("m{a=b}x").is_err());
    assert!(MetricSpec::parse("m{ab}").is_err());
    assert!(MetricSpec::parse("bad name").is_err());
}

#[test]
fn real_vllm_pages() {
    let now = Instant::now();
    let idle = vllm()
        .extract(
            &read("metrics_idle.txt"),
            &Metrics::default(),
            now,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!((idle.waiting_queue, idle.running), (0, 0));
    assert_eq!(idle.cache_block_size, Some(32));
    assert_eq!(idle.cache_num_blocks, Some(128));
    assert_eq!(idle.updated_at, Some(now));

    let busy = vllm()
        .extract(
            &read("metrics_busy.txt"),
            &Metrics::default(),
            now,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!((busy.waiting_queue, busy.running), (12, 8));
    assert!((busy.kv_cache_usage - 0.850_393_700_787_401_6).abs() < 1e-12);

    let after = vllm()
        .extract(&read("metrics_after.txt"), &busy, now, &mut Vec::new())
        .unwrap();
    assert_eq!((after.waiting_queue, after.running), (0, 0));
    // No LoRA family on this server: LoRA info stays as it was (empty).
    assert_eq!(after.lora, LoraInfo::default());
}

/// What vLLM answers at `/metrics/` (the path with a trailing slash) to the names this EPP
/// asks for: only those families, and everything the EPP reads from them.
#[test]
fn real_vllm_narrowed_page() {
    let page = read("metrics_idle_narrowed.txt");
    let asked = vllm().sample_names();
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(asked.iter().any(|a| a == name), "{name} was not asked for");
    }
    let now = Instant::now();
    let m = vllm()
        .extract(&page, &Metrics::default(), now, &mut Vec::new())
        .unwrap();
    assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (0, 0, 0.0));
    assert_eq!((m.cache_block_size, m.cache_num_blocks), (Some(32), Some(16_384)));
}

#[test]
fn real_lora_pages_take_the_latest_series() {
    let now = Instant::now();
    let busy = vllm()
        .extract(
            &read("variant_lora/metrics_busy.txt"),
            &Metrics::default(),
            now,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!(busy.lora.max_active, 2);
    assert_eq!(busy.lora.active, vec![Arc::<str>::from("tiny-lora")]);
    let after = vllm()
        .extract(
            &read("variant_lora/metrics_after.txt"),
            &busy,
            now,
            &mut Vec::new(),
        )
        .unwrap();
    // After the burst the newest series has empty adapter lists: nothing is running.
    assert!(after.lora.active.is_empty(), "{:?}", after.lora);
    assert_eq!(after.lora.max_active, 2);
    for name in [
        "variant_lora/metrics_idle.txt",
        "variant_lora/metrics_after_reset.txt",
    ] {
        assert!(
            vllm()
                .extract(&read(name), &Metrics::default(), now, &mut Vec::new())
                .is_some(),
            "{name}"
        );
    }
}

#[test]
fn old_vllm_kv_name_is_a_fallback() {
    let page = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25\n";
    let m = vllm()
        .extract(page, &Metrics::default(), Instant::now(), &mut Vec::new())
        .unwrap();
    assert_eq!(m.kv_cache_usage, 0.25);
}

#[test]
fn other_engines() {
    let page = "\
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model=\"m\",request_type=\"scheduled\"} 3
nv_trt_llm_request_metrics{model=\"m\",request_type=\"waiting\"} 7
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 0.5
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"tokens_per\"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"} 1000
";
    let m = EngineMetrics::builtin("triton-tensorrt-llm")
        .unwrap()
        .extract(page, &Metrics::default(), Instant::now(), &mut Vec::new())
        .unwrap();
    assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (7, 3, 0.5));
    assert_eq!((m.cache_block_size, m.cache_num_blocks), (Some(64), Some(1000)));
    let page = "sglang:num_queue_reqs 4\nsglang:num_running_reqs 2\nsglang:token_usage 0.3\nsglang:cache_config_info{page_size=\"16\",num_pages=\"900\"} 1\n";
    let m = EngineMetrics::builtin("sglang")
        .unwrap()
        .extract(page, &Metrics::default(), Instant::now(), &mut Vec::new())
        .unwrap();
    assert_eq!((m.waiting_queue, m.running), (4, 2));
    assert_eq!((m.cache_block_size, m.cache_num_blocks), (Some(16), Some(900)));
}

#[test]
fn sample_lines() {
    let s = Sample::parse(r#"m:x_total{a="1",b="q\"}\\ z",c=""} 2.5e+00 1700000000"#).unwrap();
    assert_eq!(s.name, "m:x_total");
    assert_eq!(s.label("b"), Some("q\"}\\ z"));
    assert_eq!(s.label("c"), Some(""));
    assert_eq!(s.value, 2.5);
    assert_eq!(Sample::parse("up 1").unwrap().value, 1.0);
    assert!(Sample::parse("up NaN").unwrap().value.is_nan());
    assert_eq!(Sample::parse("up -Inf").unwrap().value, f64::NEG_INFINITY);
    assert!(Sample::parse(r#"m{a="1" 2"#).is_none());
    assert!(Sample::parse("m{a=1} 2").is_none());
}

#[test]
fn out_of_range_figures_are_refused_and_series_combined() {
    let now = Instant::now();
    // Another accelerator backend's vLLM: negative KV use. The KV figure is taken as full,
    // so the pod is never preferred for it; the queue still updates.
    let mut refused = Vec::new();
    let m = vllm()
        .extract(
            "vllm:kv_cache_usage_perc{model_name=\"m\"} -0.3875\nvllm:num_requests_waiting 2\n",
            &Metrics::default(),
            now,
            &mut refused,
        )
        .unwrap();
    assert_eq!((m.kv_cache_usage, m.waiting_queue), (1.0, 2));
    assert_eq!(
        refused,
        vec![Refused {
            family: "vllm:kv_cache_usage_perc".into(),
            reason: Rejection::Negative,
            value: -0.3875
        }]
    );
    // NaN and infinite counts keep the previous figure.
    let before = Metrics {
        waiting_queue: 5,
        running: 3,
        ..Metrics::default()
    };
    let mut refused = Vec::new();
    let m = vllm()
        .extract(
            "vllm:num_requests_waiting NaN\nvllm:num_requests_running +Inf\nvllm:kv_cache_usage_perc 1.5\n",
            &before,
            now,
            &mut refused,
        )
        .unwrap();
    assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (5, 3, 1.0));
    let reasons: Vec<_> = refused.iter().map(|r| r.reason).collect();
    assert_eq!(
        reasons,
        [Rejection::NotANumber, Rejection::Infinite, Rejection::AboveOne]
    );
    // Data-parallel engines: counts add, utilisation takes the largest, blocks add up.
    let page = "\
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 2
vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 5
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 1
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 4
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.2
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.6
vllm:cache_config_info{block_size=\"16\",engine=\"0\",num_gpu_blocks=\"100\"} 1
vllm:cache_config_info{block_size=\"16\",engine=\"1\",num_gpu_blocks=\"120\"} 1
";
    let mut refused = Vec::new();
    let m = vllm()
        .extract(page, &Metrics::default(), now, &mut refused)
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (7, 5, 0.6));
    assert_eq!((m.cache_block_size, m.cache_num_blocks), (Some(16), Some(220)));
    // Whatever the order of the series.
    let reversed: String = page.lines().rev().map(|l| format!("{l}\n")).collect();
    let r = vllm()
        .extract(&reversed, &Metrics::default(), now, &mut Vec::new())
        .unwrap();
    assert_eq!(r, m);
    // Bad cache geometry is refused, not stored.
    let mut refused = Vec::new();
    let m = vllm()
        .extract(
            "vllm:cache_config_info{block_size=\"0\",num_gpu_blocks=\"-4\"} 1\n",
            &Metrics::default(),
            now,
            &mut refused,
        )
        .unwrap();
    assert_eq!((m.cache_block_size, m.cache_num_blocks), (None, None));
    assert_eq!(refused.len(), 2);
    assert_eq!(refused[0].family, "vllm:cache_config_info{block_size}");
}

#[test]
fn a_page_without_any_configured_series_is_not_an_update() {
    assert!(
        vllm()
            .extract("up 1\n", &Metrics::default(), Instant::now(), &mut Vec::new())
            .is_none()
    );
    assert!(
        vllm()
            .extract("", &Metrics::default(), Instant::now(), &mut Vec::new())
            .is_none()
    );
}

#[test]
fn a_nan_lora_series_is_never_the_latest_and_refused_geometry_keeps_the_previous() {
    let page = "\
vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a\",waiting_lora_adapters=\"\"} 1.7e9
vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"evil\",waiting_lora_adapters=\"\"} NaN
vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"inf\",waiting_lora_adapters=\"\"} +Inf
";
    let m = vllm()
        .extract(page, &Metrics::default(), Instant::now(), &mut Vec::new())
        .unwrap();
    assert_eq!(m.lora.active, vec![Arc::<str>::from("a")]);
    let before = Metrics {
        cache_block_size: Some(16),
        cache_num_blocks: Some(100),
        ..Metrics::default()
    };
    let m = vllm()
        .extract(
            "vllm:cache_config_info{block_size=\"0\",num_gpu_blocks=\"NaN\"} 1\n",
            &before,
            Instant::now(),
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!((m.cache_block_size, m.cache_num_blocks), (Some(16), Some(100)));
    // A missing label is unknown.
    let m = vllm()
        .extract(
            "vllm:cache_config_info{block_size=\"32\"} 1\n",
            &before,
            Instant::now(),
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!((m.cache_block_size, m.cache_num_blocks), (Some(32), None));
}
