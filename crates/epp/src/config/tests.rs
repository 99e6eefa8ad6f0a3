use super::*;

const SEED: &str = include_str!("../../../../config/default-plugins.yaml");

fn load(text: &str) -> Result<crate::scheduling::Scheduler, ConfigError> {
    EndpointPickerConfig::from_text(text, "test.yaml")?.build_scheduler(Some(1))
}

fn load_err(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("config loaded but should not:\n{text}"),
        Err(e) => e.to_string(),
    }
}

const HEAD: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";

#[test]
fn seed_config_map_loads_with_defaults_filled_in() {
    let s = load(SEED).unwrap();
    assert_eq!(s.profiles().len(), 1);
    let p = &s.profiles()[0];
    assert_eq!(&*p.name, "default");
    let scorers: Vec<(&str, f64)> = p.scorers.iter().map(|w| (&*w.scorer.name, w.weight)).collect();
    assert_eq!(
        scorers,
        vec![
            ("queue-scorer", 1.0),
            ("kv-cache-utilization-scorer", 1.0),
            ("prefix-cache-scorer", 1.0)
        ]
    );
    assert_eq!(&*p.picker.name, "max-score-picker");
    assert_eq!(&*s.handler().name, "single-profile-handler");
}

#[test]
fn builtin_default_is_the_v010_optimized_baseline() {
    let s = EndpointPickerConfig::builtin_default()
        .unwrap()
        .build_scheduler(None)
        .unwrap();
    let w: Vec<(&str, f64)> = s.profiles()[0]
        .scorers
        .iter()
        .map(|w| (&*w.scorer.name, w.weight))
        .collect();
    assert_eq!(
        w,
        vec![
            ("queue-scorer", 2.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("prefix-cache-scorer", 3.0),
            ("no-hit-lru-scorer", 2.0)
        ]
    );
}

#[test]
fn no_profiles_gives_a_default_profile_in_plugin_order() {
    let s = load(&format!(
        "{HEAD}plugins:\n- type: header-based-testing-filter\n- type: kv-cache-utilization-scorer\n- type: random-picker\n  parameters: {{maxNumOfEndpoints: 2}}\n"
    ))
    .unwrap();
    let p = &s.profiles()[0];
    assert_eq!(&*p.name, "default");
    assert_eq!(&*p.filters[0].name, "header-based-testing-filter");
    assert_eq!(&*p.scorers[0].scorer.name, "kv-cache-utilization-scorer");
    assert_eq!(&*p.picker.name, "random-picker");
}

#[test]
fn newer_top_level_sections_load() {
    let text = format!(
        "{HEAD}featureGates: [dataLayer]
plugins:
- type: metrics-data-source
  parameters: {{scheme: http, path: /metrics}}
- type: core-metrics-extractor
- type: approx-prefix-cache-producer
  parameters: {{blockSizeTokens: 32}}
- type: prefix-cache-scorer
- type: queue-scorer
- type: utilization-detector
saturationDetector:
  pluginRef: utilization-detector
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors:
    - pluginRef: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2.5
  - pluginRef: prefix-cache-scorer
    weight: 3
"
    );
    let s = load(&text).unwrap();
    let w: Vec<f64> = s.profiles()[0].scorers.iter().map(|w| w.weight).collect();
    assert_eq!(w, vec![2.5, 3.0]);
    // The v1.2 threshold form and the llm-d apiVersion load too.
    load(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nsaturationDetector:\n  queueDepthThreshold: 5\n  kvCacheUtilThreshold: 0.8\n  metricsStalenessThreshold: 200ms\nplugins:\n- type: queue-scorer\n",
    )
    .unwrap();
}

#[test]
fn unknown_fields_are_named() {
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfile: []\n"
    ));
    assert!(
        e.contains("test.yaml") && e.contains("unknown field `schedulingProfile`"),
        "{e}"
    );
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    wieght: 2\n"
    ));
    assert!(e.contains("unknown field `wieght`"), "{e}");
    let e = load_err(&format!("{HEAD}plugins:\n- type: queue-scorer\n  params: {{}}\n"));
    assert!(e.contains("unknown field `params`"), "{e}");
    let e = load_err(&format!("{HEAD}plugins: []\nplugins: []\n"));
    assert!(e.contains("duplicate"), "{e}");
}

#[test]
fn header_mistakes_are_named() {
    let e = load_err("apiVersion: v1\nkind: EndpointPickerConfig\n");
    assert!(e.contains("apiVersion 'v1'"), "{e}");
    let e = load_err("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: ConfigMap\n");
    assert!(e.contains("kind 'ConfigMap'"), "{e}");
    let e = load_err(&format!("{HEAD}featureGates: [warpDrive]\n"));
    assert!(
        e.contains("featureGates: unknown feature gate 'warpDrive'"),
        "{e}"
    );
    let e = load_err("kind: EndpointPickerConfig\n");
    assert!(e.contains("apiVersion"), "{e}");
}

#[test]
fn plugin_mistakes_are_named() {
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\n- type: queue-scorer\n"
    ));
    assert!(e.contains("duplicate plugin name 'queue-scorer'"), "{e}");
    let e = load_err(&format!(
        "{HEAD}plugins:\n- name: a\n  type: queue-scorer\n- name: a\n  type: kv-cache-utilization-scorer\n"
    ));
    assert!(e.contains("duplicate plugin name 'a'"), "{e}");
    let e = load_err(&format!("{HEAD}plugins:\n- name: mine\n"));
    assert!(e.contains("'mine' is missing a type"), "{e}");
    let e = load_err(&format!("{HEAD}plugins:\n- name: f\n  type: low-queue-filter\n"));
    assert!(
        e.contains("plugin 'f' (type 'low-queue-filter')") && e.contains("not found in registry"),
        "{e}"
    );
    let e = load_err(&format!(
        "{HEAD}plugins:\n- name: pick\n  type: max-score-picker\n  parameters:\n    maxNumOfEndpoints: many\n"
    ));
    assert!(
        e.contains("plugin 'pick'") && e.contains("invalid parameters"),
        "{e}"
    );
}

#[test]
fn profile_mistakes_are_named() {
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: kv-scorer\n"
    ));
    assert!(
        e.contains("profile 'default': 'kv-scorer' is a reference to an undefined plugin"),
        "{e}"
    );
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: max-score-picker\n- type: random-picker\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: max-score-picker\n  - pluginRef: random-picker\n"
    ));
    assert!(
        e.contains("profile 'p' has two pickers, 'max-score-picker' and 'random-picker'"),
        "{e}"
    );
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: single-profile-handler\nschedulingProfiles:\n- name: a\n- name: b\n"
    ));
    assert!(e.contains("cannot run 2 profiles"), "{e}");
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: single-profile-handler\n- name: other\n  type: single-profile-handler\n"
    ));
    assert!(e.contains("only one profile handler is allowed"), "{e}");
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\ndataLayer:\n  sources:\n  - pluginRef: scraper\n"
    ));
    assert!(
        e.contains("dataLayer.sources: 'scraper' is a reference to an undefined plugin"),
        "{e}"
    );
}

#[test]
fn duplicate_and_empty_profile_names_are_refused() {
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins: []\n- name: a\n  plugins: []\n"
    ));
    assert!(e.contains("duplicate profile name 'a'"), "{e}");
    let e = load_err(&format!("{HEAD}schedulingProfiles:\n- name: ''\n"));
    assert!(e.contains("profile name must not be empty"), "{e}");
    let e = load_err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n- name: b\n"
    ));
    assert!(
        e.contains("no profile handler was specified for 2 profiles"),
        "{e}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let e = EndpointPickerConfig::from_file(std::path::Path::new("/nonexistent/epp.yaml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("config /nonexistent/epp.yaml: cannot read"),
        "{e}"
    );
}

fn set(text: &str) -> Result<PluginSet, ConfigError> {
    EndpointPickerConfig::from_text(text, "test.yaml")?.build(&crate::plugins::Defaults::builtin(), Some(1))
}

fn names(set: &PluginSet) -> Vec<String> {
    set.instances
        .iter()
        .map(|(n, t)| if n == t { n.to_string() } else { format!("{n}:{t}") })
        .collect()
}

#[test]
fn defaults_are_added_and_bound() {
    let s = set(SEED).unwrap();
    // The seed declares three scorers; the rest is added the way the reference adds it.
    assert_eq!(
        names(&s),
        [
            "queue-scorer",
            "kv-cache-utilization-scorer",
            "prefix-cache-scorer",
            "inflight-load-producer",
            "approx-prefix-cache-producer",
            "single-profile-handler",
            "max-score-picker",
            "utilization-detector",
            "openai-parser",
            "metrics-data-source",
            "core-metrics-extractor",
        ]
    );
    let producers: Vec<&str> = s.control.producers.iter().map(|p| &*p.name).collect();
    assert_eq!(producers, ["approx-prefix-cache-producer"]);
    let pre: Vec<&str> = s.control.pre_request.iter().map(|p| &*p.name).collect();
    assert_eq!(pre, ["inflight-load-producer", "approx-prefix-cache-producer"]);
    assert_eq!(&*s.control.saturation.name, "utilization-detector");
    assert_eq!(s.sources.polling.len(), 1);
    assert_eq!(s.store_hooks.len(), 1);
}

#[test]
fn llm_d_v010_sections_load() {
    let s = set("apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [dataLayer=true, flowControl=false, haPopulateNonLeaderDatastore]
plugins:
- type: queue-scorer
- name: shed
  type: utilization-detector
  parameters: {queueDepthThreshold: 8}
- type: openai-parser
- type: metrics-data-source
  parameters: {scheme: http, path: /metrics, insecureSkipVerify: true}
- type: core-metrics-extractor
flowControl:
  saturationDetector: {pluginRef: shed}
requestHandler:
  parsers:
  - pluginRef: openai-parser
dataLayer:
  injectDefaults: true
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
")
    .unwrap();
    assert_eq!(&*s.control.saturation.name, "shed");
    // The declared source and extractor are used for the injected defaults.
    assert_eq!(&*s.sources.polling[0].source.name, "metrics-data-source");
    assert!(!names(&s).iter().any(|n| n.contains('/')));
}

#[test]
fn the_newer_saturation_detector_place_wins() {
    let s = set(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\n- name: a\n  type: utilization-detector\n- name: b\n  type: concurrency-detector\nsaturationDetector: {{pluginRef: a}}\nflowControl:\n  saturationDetector: {{pluginRef: b}}\nschedulingProfiles:\n- name: p\n  plugins: [{{pluginRef: queue-scorer}}]\n"
    ));
    // `a` is declared but then used by nothing: refused rather than ignored.
    let e = set_err(s);
    assert!(
        e.contains("plugin 'a' (type 'utilization-detector'") && e.contains("takes no part"),
        "{e}"
    );
    let s = set(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\n- name: b\n  type: concurrency-detector\nsaturationDetector: {{pluginRef: b}}\n"
    ))
    .unwrap();
    assert_eq!(&*s.control.saturation.name, "b");
    // The concurrency detector got an in-flight producer to read.
    assert!(
        names(&s).contains(&"inflight-load-producer".to_owned()),
        "{:?}",
        names(&s)
    );
}

fn set_err(r: Result<PluginSet, ConfigError>) -> String {
    match r {
        Ok(_) => panic!("config loaded but should not"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_sections_and_parameters_are_named() {
    for (doc, want) in [
        (
            "flowControl:\n  maxRequests: 10\n",
            "flowControl.maxRequests: set while the flowControl feature gate is off",
        ),
        (
            "featureGates: [flowControl]\nflowControl:\n  enableEviction: true\n",
            "flowControl.enableEviction",
        ),
        (
            "flowControl:\n  saturationDetector: {queueDepthThreshold: 3}\n",
            "only pluginRef",
        ),
        ("dataLayer:\n  discovery: {pluginRef: x}\n", "dataLayer.discovery"),
        ("dataLayer:\n  crossReplicaSyncerPluginRef: x\n", "cross-replica"),
        (
            "data: {sources: []}\ndataLayer: {sources: []}\n",
            "keep dataLayer",
        ),
        (
            "saturationDetector: {pluginRef: utilization-detector, queueDepthThreshold: 3}\nplugins:\n- type: utilization-detector\n",
            "not both",
        ),
        (
            "plugins:\n- type: queue-scorer\n  parameters: {weight: 2}\n",
            "takes no parameters",
        ),
        (
            "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokenz: 2}\n",
            "unknown field `blockSizeTokenz`",
        ),
        (
            "plugins:\n- type: metrics-data-source\n  parameters: {port: 70000}\n",
            "invalid port 70000",
        ),
        (
            "plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: nope}\n",
            "defaultEngine 'nope'",
        ),
        (
            "plugins:\n- type: utilization-detector\n  parameters: {queueDepthThreshold: 0}\n",
            "queueDepthThreshold must be strictly positive",
        ),
        (
            "requestHandler:\n  parsers: [{pluginRef: queue-scorer}]\nplugins:\n- type: queue-scorer\n",
            "is not a parser",
        ),
        (
            "parser: {pluginRef: vllm}\n",
            "parser: 'vllm' is a reference to an undefined plugin",
        ),
    ] {
        let e = set_err(set(&format!("{HEAD}{doc}")));
        assert!(e.contains(want), "{doc}: {e}");
    }
}

#[test]
fn prefix_parameters_of_older_configs_reach_their_producer() {
    // GIE v1.0–v1.4: the index is configured on the scorer.
    let s = set(&format!(
        "{HEAD}plugins:\n- type: prefix-cache-scorer\n  parameters: {{hashBlockSize: 32, lruCapacityPerServer: 10}}\n"
    ))
    .unwrap();
    assert!(
        names(&s).contains(&"approx-prefix-cache-producer".to_owned()),
        "{:?}",
        names(&s)
    );
    // v1.5 / v0.10: on the producer; the scorer binds to it.
    let s = set(&format!(
        "{HEAD}plugins:\n- name: p\n  type: approx-prefix-cache-producer\n  parameters: {{blockSizeTokens: 8}}\n- type: prefix-cache-scorer\n"
    ))
    .unwrap();
    assert_eq!(
        s.control.producers.iter().map(|p| &*p.name).collect::<Vec<_>>(),
        ["p"]
    );
    // Both at once is ambiguous.
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- name: p\n  type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters: {{blockSize: 64}}\n"
    )));
    assert!(e.contains("set them on 'p'"), "{e}");
    // Two producers need a name.
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- name: a\n  type: approx-prefix-cache-producer\n- name: b\n  type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n"
    )));
    assert!(
        e.contains("several plugins produce it (a, b); set prefixMatchInfoProducerName"),
        "{e}"
    );
    // A producer nothing reads is refused.
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- name: a\n  type: approx-prefix-cache-producer\n- name: b\n  type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters: {{prefixMatchInfoProducerName: b}}\n"
    )));
    assert!(
        e.contains("plugin 'a' (type 'approx-prefix-cache-producer') produces data no plugin reads"),
        "{e}"
    );
    let s = set(&format!(
        "{HEAD}plugins:\n- name: a\n  type: approx-prefix-cache-producer\n- name: b\n  type: approx-prefix-cache-producer\n- name: sa\n  type: prefix-cache-scorer\n  parameters: {{prefixMatchInfoProducerName: a}}\n- name: sb\n  type: prefix-cache-scorer\n  parameters: {{prefixMatchInfoProducerName: b}}\n"
    ))
    .unwrap();
    assert_eq!(s.control.producers.len(), 2);
    // Two scorers written for v1.4 with different index parameters get one producer each, and
    // the in-flight producer added for the KV scorer reads the one named after its type.
    let s = set(&format!(
        "{HEAD}plugins:\n- name: s1\n  type: prefix-cache-scorer\n  parameters: {{blockSize: 64}}\n- name: s2\n  type: prefix-cache-scorer\n  parameters: {{blockSize: 128}}\n- name: s3\n  type: prefix-cache-scorer\n  parameters: {{blockSize: 64}}\n- type: kv-cache-utilization-scorer\n"
    ))
    .unwrap();
    assert_eq!(
        s.control.producers.iter().map(|p| &*p.name).collect::<Vec<_>>(),
        ["approx-prefix-cache-producer", "s2/approx-prefix-cache-producer"]
    );
    assert!(
        names(&s).contains(&"inflight-load-producer".to_owned()),
        "{:?}",
        names(&s)
    );
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- type: prefix-cache-scorer\n  parameters: {{prefixMatchInfoProducerName: nope}}\n"
    )));
    assert!(e.contains("'nope' is not a plugin producing it"), "{e}");
}

#[test]
fn data_layer_injection_follows_v010() {
    // injectDefaults: false collects nothing.
    let s = set(&format!(
        "{HEAD}dataLayer: {{injectDefaults: false}}\nplugins:\n- type: queue-scorer\n"
    ))
    .unwrap();
    assert!(s.sources.is_empty());
    // An empty source list still gets the defaults (GIE v1.5 read it as "collect nothing").
    let s = set(&format!(
        "{HEAD}dataLayer: {{sources: []}}\nplugins:\n- type: queue-scorer\n"
    ))
    .unwrap();
    assert_eq!(s.sources.polling.len(), 1);
    // Two extractors of one attribute are refused.
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\n- type: metrics-data-source\n- name: x1\n  type: core-metrics-extractor\n- name: x2\n  type: core-metrics-extractor\ndataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n    extractors: [{{pluginRef: x1}}, {{pluginRef: x2}}]\n"
    )));
    assert!(e.contains("two writers, 'x1' and 'x2'"), "{e}");
    // A source that is not a source.
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\ndataLayer:\n  sources:\n  - pluginRef: queue-scorer\n"
    )));
    assert!(e.contains("is not a data source"), "{e}");
}

#[test]
fn token_load_scorer_gets_its_producer() {
    // Alone: an in-flight producer is added for it.
    let s = set(&format!(
        "{HEAD}plugins:\n- type: token-load-scorer\n  parameters: {{queueThresholdTokens: 1000}}\n"
    ))
    .unwrap();
    assert!(
        names(&s).contains(&"inflight-load-producer".to_owned()),
        "{:?}",
        names(&s)
    );
    // Named: that one.
    let s = set(&format!(
        "{HEAD}plugins:\n- name: mine\n  type: inflight-load-producer\n- type: token-load-scorer\n  parameters: {{inFlightLoadProducerName: mine}}\n"
    ))
    .unwrap();
    assert_eq!(s.store_hooks.len(), 1);
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- type: token-load-scorer\n  parameters: {{inFlightLoadProducerName: nobody}}\n"
    )));
    assert!(e.contains("'nobody' is not a plugin producing it"), "{e}");
}

/// llm-d-router v0.10's "optimized-baseline" profile, as its guides and its config tests write it.
#[test]
fn the_v010_optimized_baseline_loads_with_its_producers() {
    let s = set(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: prefix-cache-scorer\n- type: no-hit-lru-scorer\n- type: active-request-scorer\n  parameters: {{idleThreshold: 1, maxBusyScore: 0.5}}\nschedulingProfiles:\n- name: default\n  plugins:\n  - {{pluginRef: queue-scorer, weight: 2}}\n  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}\n  - {{pluginRef: prefix-cache-scorer, weight: 3}}\n  - {{pluginRef: no-hit-lru-scorer, weight: 2}}\n  - {{pluginRef: active-request-scorer, weight: 1}}\n"
    ))
    .unwrap();
    let n = names(&s);
    // One prefix producer serves both the prefix scorer and the no-hit LRU; one in-flight
    // producer serves the KV and active-request scorers.
    assert_eq!(
        n.iter().filter(|n| *n == "approx-prefix-cache-producer").count(),
        1,
        "{n:?}"
    );
    assert_eq!(
        n.iter().filter(|n| *n == "inflight-load-producer").count(),
        1,
        "{n:?}"
    );
    let pre: Vec<&str> = s.control.pre_request.iter().map(|p| &*p.name).collect();
    assert!(pre.contains(&"no-hit-lru-scorer"), "{pre:?}");
    // The LRU's stamp and the in-flight counters ride on the endpoints.
    assert_eq!(s.store_hooks.len(), 2);
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- type: no-hit-lru-scorer\n  parameters: {{prefixMatchInfoProducerName: nobody}}\n"
    )));
    assert!(e.contains("'nobody' is not a plugin producing it"), "{e}");
    // Declared but in no profile: its recording would serve nothing.
    for t in ["no-hit-lru-scorer", "session-affinity-scorer"] {
        let e = set_err(set(&format!(
            "{HEAD}plugins:\n- type: queue-scorer\n- type: {t}\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n"
        )));
        assert!(e.contains(t) && e.contains("takes no part"), "{e}");
    }
    // A session scorer pinning a profile that does not exist.
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- type: session-affinity-scorer\n  parameters: {{profileName: prefil}}\n"
    )));
    assert!(
        e.contains("names profile 'prefil', which is not among schedulingProfiles (default)"),
        "{e}"
    );
}

#[test]
fn a_reference_to_a_default_type_adds_it() {
    for section in [
        "flowControl:\n  saturationDetector: {pluginRef: utilization-detector}\n",
        "saturationDetector: {pluginRef: utilization-detector}\n",
    ] {
        let s = set(&format!("{HEAD}{section}plugins:\n- type: queue-scorer\n")).unwrap();
        assert_eq!(&*s.control.saturation.name, "utilization-detector");
    }
    for section in [
        "requestHandler:\n  parsers: [{pluginRef: openai-parser}]\n",
        "parser: {pluginRef: openai-parser}\n",
    ] {
        let s = set(&format!("{HEAD}{section}plugins:\n- type: queue-scorer\n")).unwrap();
        assert!(names(&s).contains(&"openai-parser".to_owned()), "{:?}", names(&s));
    }
    // Another detector type is not added for a reference.
    let e = set_err(set(&format!(
        "{HEAD}flowControl:\n  saturationDetector: {{pluginRef: concurrency-detector}}\nplugins:\n- type: queue-scorer\n"
    )));
    assert!(e.contains("'concurrency-detector'"), "{e}");
}

#[test]
fn settings_that_would_not_act_are_refused() {
    let refused = |body: &str, want: &str| {
        let e = set_err(set(&format!("{HEAD}{body}")));
        assert!(e.contains(want), "{want:?} not in {e}");
    };
    // The v1.2–v1.4 thresholds only configure the detector added when none is declared.
    refused(
        "saturationDetector: {queueDepthThreshold: 3}\nflowControl:\n  saturationDetector: {pluginRef: c}\nplugins:\n- name: c\n  type: concurrency-detector\n- type: queue-scorer\n",
        "the v1.2–v1.4 thresholds configure the detector added",
    );
    refused(
        "saturationDetector: {queueDepthThreshold: 3}\nplugins:\n- type: utilization-detector\n  parameters: {queueDepthThreshold: 9}\n- type: queue-scorer\n",
        "the v1.2–v1.4 thresholds configure the detector added",
    );
    // A polling source without extractors.
    refused(
        "plugins:\n- type: queue-scorer\n- name: scraper\n  type: metrics-data-source\ndataLayer:\n  sources: [{pluginRef: scraper}]\n",
        "dataLayer.sources[scraper].extractors",
    );
    // Producer numbers that cannot mean what they say.
    for (params, want) in [
        ("blockSizeTokens: 0", "blockSizeTokens must be > 0"),
        ("maxPrefixBlocksToMatch: 0", "maxPrefixBlocksToMatch must be > 0"),
        (
            "maxPrefixTokensToMatch: -1",
            "maxPrefixTokensToMatch must be >= 0",
        ),
        ("lruCapacityPerServer: -5", "lruCapacityPerServer must be > 0"),
    ] {
        refused(
            &format!(
                "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {{{params}}}\n- type: prefix-cache-scorer\n"
            ),
            want,
        );
        refused(
            &format!("plugins:\n- name: old\n  type: prefix-cache-scorer\n  parameters: {{{params}}}\n"),
            want,
        );
    }
    // A weight only a scorer reads; a profile entry that runs nothing.
    refused(
        "plugins:\n- type: queue-scorer\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n  - pluginRef: max-score-picker\n    weight: 2\n",
        "schedulingProfiles[default].plugins[max-score-picker].weight",
    );
    refused(
        "plugins:\n- type: prefix-cache-scorer\n- type: approx-prefix-cache-producer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefix-cache-scorer\n  - pluginRef: approx-prefix-cache-producer\n",
        "'approx-prefix-cache-producer' is not a filter, scorer or picker",
    );
    // Settings another setting overrides or leaves unused.
    for (plugins, want) in [
        (
            "- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 64, blockSize: 128}\n- type: prefix-cache-scorer\n",
            "blockSizeTokens and blockSize each set the block size",
        ),
        (
            "- type: approx-prefix-cache-producer\n  parameters: {maxPrefixTokensToMatch: 1000, maxPrefixBlocksToMatch: 7}\n- type: prefix-cache-scorer\n",
            "maxPrefixTokensToMatch > 0 wins over maxPrefixBlocksToMatch",
        ),
        (
            "- type: inflight-load-producer\n  parameters: {maxEstimatedOutputTokens: 10}\n- type: token-load-scorer\n",
            "maxEstimatedOutputTokens only acts with addEstimatedOutputTokens: true",
        ),
        (
            "- type: no-hit-lru-scorer\n  parameters: {prefixPluginType: prefix-cache-scorer}\n",
            "prefixPluginType is deprecated and was never read by llm-d-router v0.10",
        ),
        (
            "- type: no-hit-lru-scorer\n  parameters: {lruSize: 0}\n",
            "lruSize must be > 0",
        ),
        (
            "- type: active-request-scorer\n  parameters: {requestTimeout: 2m}\n",
            "requestTimeout is deprecated and ignored",
        ),
        (
            "- type: active-request-scorer\n  parameters: {maxBusyScore: 2}\n",
            "maxBusyScore must be in [0, 1], got 2",
        ),
        (
            "- type: prefix-cache-scorer\n  parameters: {matchLengthScaleTokens: 100}\n",
            "matchLengthScaleTokens only acts with matchLengthWeight > 0",
        ),
    ] {
        refused(&format!("plugins:\n{plugins}"), want);
    }
    refused(
        "plugins:\n- type: queue-scorer\n- name: od\n  type: openai-parser\nrequestHandler:\n  parsers: [{pluginRef: od}, {pluginRef: openai-parser}]\n",
        "2 parsers are listed",
    );
    refused(
        "plugins:\n- type: queue-scorer\nrequestHandler:\n  parsers: [{pluginRef: token-load-scorer}]\n",
        "'token-load-scorer' is a reference to an undefined plugin",
    );
    // A CA bundle with verification turned off.
    refused(
        "plugins:\n- type: queue-scorer\n- type: metrics-data-source\n  parameters: {scheme: https, caCertPath: /ca.pem, insecureSkipVerify: true}\n",
        "caCertPath and insecureSkipVerify: true contradict",
    );
}

#[test]
fn several_producers_without_a_name_fall_back_as_v010_does() {
    // The KV scorer has no producer parameter: it reads the one named after the type...
    let s = set(&format!(
        "{HEAD}plugins:\n- type: inflight-load-producer\n- name: other\n  type: inflight-load-producer\n- type: kv-cache-utilization-scorer\n- type: token-load-scorer\n  parameters: {{inFlightLoadProducerName: other}}\n"
    ))
    .unwrap();
    assert_eq!(s.store_hooks.len(), 2);
    // ...and gets its own when none is; the unnamed choice is then refused for a consumer that
    // can name one.
    let e = set_err(set(&format!(
        "{HEAD}plugins:\n- name: a\n  type: inflight-load-producer\n- name: b\n  type: inflight-load-producer\n- type: token-load-scorer\n"
    )));
    assert!(
        e.contains("several plugins produce it (a, b); set inFlightLoadProducerName"),
        "{e}"
    );
    // token-load's prefix input has no parameter: with two prefix producers it reads the one
    // named after the type.
    let s = set(&format!(
        "{HEAD}plugins:\n- type: approx-prefix-cache-producer\n- name: p2\n  type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters: {{prefixMatchInfoProducerName: p2}}\n- type: token-load-scorer\n"
    ))
    .unwrap();
    assert_eq!(s.control.producers.len(), 2, "{:?}", names(&s));
    assert_eq!(s.store_hooks.len(), 1, "{:?}", names(&s));
}

#[test]
fn flow_control_resolves_with_v010_defaults() {
    let s = set(&format!(
        "{HEAD}featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n"
    ))
    .unwrap();
    let fc = s.flow_control.expect("gate on");
    assert_eq!(fc.ttl, Some(std::time::Duration::from_secs(60)));
    assert_eq!((fc.max_bytes, fc.max_requests), (0, 0));
    assert_eq!(fc.bands.len(), 1);
    let (p, band) = &fc.bands[0];
    assert_eq!((*p, band.max_requests, band.max_bytes), (0, 5000, 1_000_000_000));
    assert_eq!(&*band.fairness.name, "global-strict-fairness-policy");
    assert_eq!(&*band.ordering.name, "fcfs-ordering-policy");
    assert_eq!(&*fc.usage_limit.name, "static-usage-limit-policy");
    // Without the gate there is none.
    assert!(
        set(&format!("{HEAD}plugins:\n- type: queue-scorer\n"))
            .unwrap()
            .flow_control
            .is_none()
    );
}

#[test]
fn flow_control_section_acts_field_by_field() {
    let s = set(&format!(
        "{HEAD}featureGates: [flowControl=true]
plugins:
- type: queue-scorer
- name: rr
  type: round-robin-fairness-policy
- name: slo
  type: slo-deadline-ordering-policy
- name: limit
  type: static-usage-limit-policy
  parameters: {{threshold: 0.7}}
flowControl:
  maxBytes: 1Gi
  maxRequests: 1k
  defaultRequestTTL: 0s
  usageLimitPolicyPluginRef: limit
  defaultPriorityBand: {{maxRequests: 50, fairnessPolicyRef: rr}}
  defaultNegativePriorityBand: {{maxRequests: 5}}
  priorityBands:
  - {{priority: 10, maxRequests: 100, fairnessPolicyRef: rr, orderingPolicyRef: slo}}
  - {{priority: -1, maxBytes: 10M}}
"
    ))
    .unwrap();
    let fc = s.flow_control.unwrap();
    assert_eq!((fc.max_bytes, fc.max_requests, fc.ttl), (1 << 30, 1000, None));
    let prios: Vec<i32> = fc.bands.iter().map(|(p, _)| *p).collect();
    assert_eq!(prios, vec![10, 0, -1]);
    assert_eq!(&*fc.band(10).ordering.name, "slo");
    assert_eq!(fc.band(10).max_requests, 100);
    // Band 0 comes from the template; an unlisted priority too.
    assert_eq!((fc.band(0).max_requests, &*fc.band(0).fairness.name), (50, "rr"));
    assert_eq!(fc.band(3).max_requests, 50);
    assert_eq!(fc.band(-1).max_bytes, 10_000_000);
    assert_eq!(fc.band(-7).max_requests, 5);
    assert_eq!(&*fc.usage_limit.name, "limit");
}

#[test]
fn flow_control_mistakes_are_named() {
    let gate = "featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n";
    for (doc, want) in [
        (
            "flowControl:\n  priorityBands: [{priority: 1}, {priority: 1}]\n",
            "duplicate priority level 1",
        ),
        (
            "flowControl:\n  priorityBands: [{maxRequests: 3}]\n",
            "priorityBands[0].priority",
        ),
        (
            "flowControl:\n  maxRequests: -1\n",
            "flowControl.maxRequests: must be non-negative",
        ),
        ("flowControl:\n  maxBytes: lots\n", "flowControl.maxBytes"),
        (
            "flowControl:\n  defaultRequestTTL: soon\n",
            "flowControl.defaultRequestTTL",
        ),
        (
            "flowControl:\n  defaultPriorityBand: {priority: 2}\n",
            "defaultPriorityBand.priority",
        ),
        (
            "flowControl:\n  priorityBands: [{priority: 1, fairnessPolicyRef: nope}]\n",
            "'nope' is a reference to an undefined plugin",
        ),
        (
            "flowControl:\n  usageLimitPolicyPluginRef: queue-scorer\n",
            "not a usage limit policy",
        ),
        (
            "flowControl:\n  priorityBands: [{priority: 1, weight: 3}]\n",
            "weight",
        ),
    ] {
        let e = set_err(set(&format!("{HEAD}{gate}{doc}")));
        assert!(e.contains(want), "{doc}: {e}");
    }
    // A declared policy nothing references is refused, not ignored.
    let e = set_err(set(&format!("{HEAD}{gate}- type: round-robin-fairness-policy\n")));
    assert!(
        e.contains("round-robin-fairness-policy") && e.contains("takes no part"),
        "{e}"
    );
    let e = set_err(set(&format!(
        "{HEAD}{gate}- type: static-usage-limit-policy\n  parameters: {{threshold: 2}}\n"
    )));
    assert!(e.contains("threshold must be in (0, 1]"), "{e}");
}
