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
fn builtin_default_has_v14_weights() {
    let s = EndpointPickerConfig::builtin_default()
        .unwrap()
        .build_scheduler(None)
        .unwrap();
    let w: Vec<f64> = s.profiles()[0].scorers.iter().map(|w| w.weight).collect();
    assert_eq!(w, vec![2.0, 2.0, 3.0]);
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
flowControl:
  maxBytes: 1Gi
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
    assert!(e.contains("'warpDrive'"), "{e}");
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
        e.contains("dataLayer: 'scraper' is a reference to an undefined plugin"),
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
