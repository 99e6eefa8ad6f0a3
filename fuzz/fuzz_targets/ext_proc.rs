//! The ext_proc stream state machine on arbitrary message sequences (any order, any body
//! mode, any headers, bodies, trailers, metadata): never panics, every answer is
//! well-formed, and the body budget is returned when the stream ends.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use endpoint_picker::config::EndpointPickerConfig;
use endpoint_picker::datalayer::{Endpoint, EndpointStore, Metrics};
use endpoint_picker::plugins::Defaults;
use endpoint_picker::protocol::budget::BodyBudget;
use endpoint_picker::protocol::{ExtProcStream, NoopObserver, Step};
use endpoint_picker::requestcontrol::{Director, DirectorConfig, ObjectiveTable};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Msg {
    RequestHeaders { headers: Vec<(u8, String)>, eos: bool },
    RequestBody { body: Vec<u8>, eos: bool },
    RequestTrailers,
    ResponseHeaders { headers: Vec<(u8, String)>, eos: bool },
    ResponseBody { body: Vec<u8>, eos: bool },
    ResponseTrailers,
}

#[derive(Debug, Arbitrary)]
struct Input {
    request_mode: u8,
    response_mode: u8,
    subset: Option<Vec<String>>,
    served: Option<String>,
    messages: Vec<Msg>,
}

/// Header names worth trying: the control headers, the path ones, and free text.
const NAMES: &[&str] = &[
    ":path",
    ":method",
    ":status",
    "content-type",
    "content-length",
    "x-request-id",
    "x-llm-d-inference-objective",
    "x-gateway-inference-objective",
    "x-llm-d-model-name-rewrite",
    "x-gateway-model-name-rewrite",
    "x-gateway-destination-endpoint",
    "x-original-path",
    "test-epp-endpoint-selection",
];

fn headers(h: &[(u8, String)]) -> Option<HeaderMap> {
    Some(HeaderMap {
        headers: h
            .iter()
            .map(|(n, v)| HeaderValue {
                key: NAMES
                    .get(usize::from(*n))
                    .map_or_else(|| format!("x-{n}"), |s| (*s).to_owned()),
                value: String::new(),
                raw_value: v.as_bytes().to_vec(),
            })
            .collect(),
    })
}

fn metadata(input: &Input) -> Option<Metadata> {
    let strings = |items: &[String]| Value {
        kind: Some(Kind::ListValue(ListValue {
            values: items
                .iter()
                .map(|s| Value {
                    kind: Some(Kind::StringValue(s.clone())),
                })
                .collect(),
        })),
    };
    let mut md = Metadata::default();
    if let Some(items) = &input.subset {
        md.filter_metadata.insert(
            "envoy.lb.subset_hint".into(),
            Struct {
                fields: [("x-gateway-destination-endpoint-subset".to_owned(), strings(items))].into(),
            },
        );
    }
    if let Some(served) = &input.served {
        md.filter_metadata.insert(
            "envoy.lb".into(),
            Struct {
                fields: [(
                    "x-gateway-destination-endpoint-served".to_owned(),
                    Value {
                        kind: Some(Kind::StringValue(served.clone())),
                    },
                )]
                .into(),
            },
        );
    }
    Some(md)
}

struct World {
    director: Arc<Director>,
    budget: Arc<BodyBudget>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let config = EndpointPickerConfig::builtin_default().expect("the built-in config loads");
        let plugins = config
            .build(&Defaults::builtin(), Some(7))
            .expect("the built-in config builds");
        let store = Arc::new(EndpointStore::with_hooks(plugins.store_hooks.clone()));
        store.set_endpoints(
            ["10.0.0.1:8000", "10.0.0.1:8001", "[fd00::2]:8000"]
                .iter()
                .map(|a| Endpoint::from_address(a.parse().expect("an address"))),
        );
        let snapshot = store.load();
        for (i, state) in snapshot.endpoints().iter().enumerate() {
            store.update_metrics(
                &state.endpoint,
                Metrics {
                    waiting_queue: i as u32,
                    kv_cache_usage: 0.1 * i as f64,
                    updated_at: Some(tokio::time::Instant::now()),
                    ..Metrics::default()
                },
            );
        }
        let config = DirectorConfig {
            max_body_bytes: 4096,
            body_budget_bytes: 1 << 20,
            ..DirectorConfig::default()
        };
        let director = Director::new(
            store,
            Arc::new(plugins.scheduler),
            config,
            plugins.control,
            Arc::new(ObjectiveTable::default()),
        );
        World {
            director: Arc::new(director),
            budget: BodyBudget::new(1 << 20),
        }
    })
}

fuzz_target!(|input: Input| {
    let w = world();
    {
        let mut stream = ExtProcStream::new(w.director.clone(), Arc::new(NoopObserver), w.budget.clone());
        let md = metadata(&input);
        let mut out = Vec::new();
        for (i, m) in input.messages.iter().take(64).enumerate() {
            let request = match m {
                Msg::RequestHeaders { headers: h, eos } => Request::RequestHeaders(HttpHeaders {
                    headers: headers(h),
                    end_of_stream: *eos,
                    ..HttpHeaders::default()
                }),
                Msg::RequestBody { body, eos } => Request::RequestBody(HttpBody {
                    body: body.clone(),
                    end_of_stream: *eos,
                    ..HttpBody::default()
                }),
                Msg::RequestTrailers => Request::RequestTrailers(HttpTrailers::default()),
                Msg::ResponseHeaders { headers: h, eos } => Request::ResponseHeaders(HttpHeaders {
                    headers: headers(h),
                    end_of_stream: *eos,
                    ..HttpHeaders::default()
                }),
                Msg::ResponseBody { body, eos } => Request::ResponseBody(HttpBody {
                    body: body.clone(),
                    end_of_stream: *eos,
                    ..HttpBody::default()
                }),
                Msg::ResponseTrailers => Request::ResponseTrailers(HttpTrailers::default()),
            };
            let msg = ProcessingRequest {
                request: Some(request),
                metadata_context: md.clone(),
                protocol_config: (i == 0).then(|| ProtocolConfiguration {
                    request_body_mode: i32::from(input.request_mode % 6),
                    response_body_mode: i32::from(input.response_mode % 6),
                    ..ProtocolConfiguration::default()
                }),
                ..ProcessingRequest::default()
            };
            out.clear();
            let step = stream.handle(msg, &mut out);
            for answer in &out {
                assert!(
                    answer.response.is_some(),
                    "an answer without a response: {answer:?}"
                );
            }
            match step {
                Step::Continue => {}
                Step::Close | Step::Fail(_) | Step::Wait(_) => break,
            }
        }
    }
    assert_eq!(
        w.budget.used(),
        0,
        "a finished stream returned its share of the budget"
    );
});
