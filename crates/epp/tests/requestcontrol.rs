//! The request-control pipeline's seams over real gRPC: a dispatcher that makes requests wait
//! (where flow control goes), a profile handler that sees the request and runs several
//! profiles, and pre-request plugins that add request headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use endpoint_picker::datalayer::EndpointStore;
use endpoint_picker::framework::data::CycleState;
use endpoint_picker::framework::plugin::Named;
use endpoint_picker::framework::requestcontrol::{
    Admit, DispatchError, DispatchRequest, Dispatcher, PreRequest, PreRequestContext,
};
use endpoint_picker::framework::scheduling::{
    ProfileHandler, ProfileRun, SchedulingError, SchedulingRequest, SchedulingResult,
};
use endpoint_picker::plugins::saturation::Utilization;
use endpoint_picker::plugins::scheduling::pickers::RandomPicker;
use endpoint_picker::protocol::{ExtProcService, NoopObserver, serve_plaintext};
use endpoint_picker::requestcontrol::{Director, DirectorConfig, ObjectiveTable, RequestControl};
use endpoint_picker::scheduling::{Profile, Scheduler};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use epp_testkit::extproc::*;
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Makes every request wait until the test answers it.
#[derive(Default)]
struct Gate {
    waiting: Mutex<Vec<oneshot::Sender<Result<(), DispatchError>>>>,
    withdrawn: Arc<AtomicUsize>,
    seen: Mutex<Vec<(String, i32, String, usize)>>,
}

/// Counts a wait dropped before it was answered: the client went away.
struct Withdrawal(Option<Arc<AtomicUsize>>);

impl Withdrawal {
    fn answered(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Withdrawal {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Dispatcher for Gate {
    fn dispatch(&self, req: &DispatchRequest<'_>) -> Admit {
        self.seen.lock().push((
            req.request_id.to_owned(),
            req.priority,
            req.fairness_id.to_owned(),
            req.bytes,
        ));
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().push(tx);
        let guard = Withdrawal(Some(self.withdrawn.clone()));
        Admit::Wait(Box::pin(async move {
            let outcome = rx.await.unwrap_or(Err(DispatchError::Shutdown));
            guard.answered();
            outcome
        }))
    }
}

impl Gate {
    async fn answer(&self, outcome: Result<(), DispatchError>) {
        for _ in 0..200 {
            if let Some(tx) = self.waiting.lock().pop() {
                let _ = tx.send(outcome);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no request waited");
    }
}

async fn gated() -> (Epp, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let epp = start_with(SEED_CONFIG, &[], Some(gate.clone())).await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0), ("10.0.0.2:8000", 3, 0.5)]);
    (epp, gate)
}

#[tokio::test]
async fn a_waiting_request_is_routed_when_dispatched() {
    let (epp, gate) = gated().await;
    let body = chat_body("m", "hello");
    let mut c = epp.open().await;
    let mut headers = post("/v1/chat/completions");
    headers.push(("x-gateway-inference-fairness-id", "tenant-a"));
    headers.push(("x-request-id", "r-1"));
    c.send(request_headers(&headers, false)).await;
    c.send(request_body(body.as_bytes(), true)).await;
    c.assert_silent().await;
    gate.answer(Ok(())).await;
    let head = c.recv().await;
    assert_eq!(destination(&head), "10.0.0.1:8000");
    let (bytes, eos) = streamed(&c.recv().await);
    assert!(eos);
    assert_eq!(bytes, body.as_bytes());
    assert_eq!(
        gate.seen.lock()[0],
        ("r-1".to_owned(), 0, "tenant-a".to_owned(), body.len())
    );
}

#[tokio::test]
async fn a_rejected_or_expired_request_gets_the_reference_status() {
    let (epp, gate) = gated().await;
    let body = chat_body("m", "hello");
    for (outcome, status, reason) in [
        (Err(DispatchError::Rejected("queue full".into())), 429, None),
        (Err(DispatchError::Expired), 429, Some("rejected-ttl-expired")),
        (
            Err(DispatchError::NoEndpoints),
            503,
            Some("rejected-no-endpoints"),
        ),
    ] {
        let mut c = epp.open().await;
        c.send(request_headers(&post("/v1/chat/completions"), false))
            .await;
        c.send(request_body(body.as_bytes(), true)).await;
        gate.answer(outcome).await;
        let answer = c.recv().await;
        assert_eq!(immediate(&answer).0, status);
        assert_eq!(
            immediate_header(&answer, "x-llm-d-request-dropped-reason").as_deref(),
            reason
        );
        assert!(c.end().await.unwrap().is_none());
    }
}

#[tokio::test]
async fn shutdown_answers_a_waiting_request_503_and_withdraws_it() {
    let (epp, gate) = gated().await;
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(chat_body("m", "x").as_bytes(), true)).await;
    c.assert_silent().await;
    epp.shutdown();
    assert_eq!(immediate(&c.recv().await).0, 503);
    assert_eq!(gate.withdrawn.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_client_that_goes_away_withdraws_its_waiting_request() {
    let (epp, gate) = gated().await;
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(chat_body("m", "x").as_bytes(), true)).await;
    c.assert_silent().await;
    drop(c);
    for _ in 0..200 {
        if gate.withdrawn.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(gate.withdrawn.load(Ordering::Relaxed), 1);
    // The stream was reported finished without a decision.
    let records = epp.records.finished.lock();
    assert!(records.iter().all(|r| r.destinations.is_none()));
}

#[tokio::test]
async fn buffered_bodies_and_trailers_wait_too_and_keep_their_order() {
    let (epp, gate) = gated().await;
    let body = chat_body("m", "hi");
    // BUFFERED: headers are answered at once; the body answer carries the route.
    let mut c = epp
        .open()
        .await
        .with_modes(BodySendMode::Buffered, BodySendMode::None);
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    assert!(is_request_headers(&c.recv().await));
    c.send(request_body(body.as_bytes(), true)).await;
    c.assert_silent().await;
    gate.answer(Ok(())).await;
    assert_eq!(destination(&c.recv().await), "10.0.0.1:8000");

    // Full duplex with trailers ending the body: headers, chunks, then the trailers answer.
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(body.as_bytes(), false)).await;
    c.send(request_trailers()).await;
    c.assert_silent().await;
    gate.answer(Ok(())).await;
    destination(&c.recv().await);
    let (bytes, eos) = streamed(&c.recv().await);
    assert_eq!((bytes.as_slice(), eos), (body.as_bytes(), false));
    assert!(is_request_trailers(&c.recv().await));
}

/// Runs `decode`, and `prefill` too when the request carries `x-disaggregate`; the decode
/// target is primary.
struct Disaggregating;

impl ProfileHandler for Disaggregating {
    fn pick_profiles(
        &self,
        req: &SchedulingRequest<'_>,
        names: &[Arc<str>],
        runs: &[ProfileRun],
    ) -> Vec<usize> {
        if !runs.is_empty() {
            return Vec::new();
        }
        let wanted: &[&str] = if req.headers.get("x-disaggregate").is_some() {
            &["decode", "prefill"]
        } else {
            &["decode"]
        };
        (0..names.len())
            .filter(|i| wanted.contains(&&*names[*i]))
            .collect()
    }

    fn process_results(
        &self,
        _req: &SchedulingRequest<'_>,
        runs: Vec<ProfileRun>,
    ) -> Result<SchedulingResult, SchedulingError> {
        let primary = runs
            .iter()
            .position(|r| &*r.name == "decode")
            .ok_or_else(|| SchedulingError::Handler("decode did not run".into()))?;
        Ok(SchedulingResult { runs, primary })
    }
}

/// Tells the decode server where the prefill ran, and tries to redirect the request (which
/// the framework refuses).
struct PrefillHeader;

impl PreRequest for PrefillHeader {
    fn pre_request(
        &self,
        _req: &SchedulingRequest<'_>,
        _s: &CycleState,
        result: &SchedulingResult,
        ctx: &mut PreRequestContext,
    ) {
        if let Some(prefill) = result.targets_of("prefill").and_then(<[_]>::first) {
            ctx.set_header("x-prefiller-host-port", prefill.endpoint.hostport.to_string());
        }
        ctx.set_header("x-gateway-destination-endpoint", "6.6.6.6:80");
    }
}

fn named<T: ?Sized>(name: &str, plugin: Arc<T>) -> Named<T> {
    Named::new(name.into(), "test".into(), plugin)
}

#[tokio::test]
async fn a_profile_handler_runs_several_profiles_and_pre_request_adds_headers() {
    let picker = |n: &str| {
        named(
            n,
            Arc::new(RandomPicker { max_endpoints: 1 })
                as Arc<dyn endpoint_picker::framework::scheduling::Picker>,
        )
    };
    let profile = |name: &str| Profile {
        name: name.into(),
        filters: Vec::new(),
        scorers: Vec::new(),
        picker: picker(name),
    };
    let scheduler = Scheduler::new(
        vec![profile("prefill"), profile("decode")],
        named("pd", Arc::new(Disaggregating) as Arc<dyn ProfileHandler>),
        Some(7),
    );
    let store = Arc::new(EndpointStore::new());
    store.set_endpoints([endpoint_picker::datalayer::Endpoint::from_address(
        "10.0.0.1:8000".parse().unwrap(),
    )]);
    let director = Director::new(
        store,
        Arc::new(scheduler),
        DirectorConfig::default(),
        RequestControl {
            saturation: named(
                "sd",
                Arc::new(Utilization::default())
                    as Arc<dyn endpoint_picker::framework::requestcontrol::SaturationDetector>,
            ),
            producers: Vec::new(),
            pre_request: vec![named(
                "prefill-header",
                Arc::new(PrefillHeader) as Arc<dyn PreRequest>,
            )],
        },
        Arc::new(ObjectiveTable::default()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ExtProcService::new(Arc::new(director), Arc::new(NoopObserver));
    tokio::spawn(serve_plaintext(listener, service, std::future::pending()));

    let body = chat_body("m", "hello");
    let (head, _) = chat_on(open(addr).await, &body, &[("x-disaggregate", "1")]).await;
    assert_eq!(destination(&head), "10.0.0.1:8000");
    assert_eq!(set_header(&head, "x-prefiller-host-port"), Some("10.0.0.1:8000"));
    // The plugin's attempt at the destination header was refused: it is set once, by the EPP.
    let destinations = common(&head)
        .header_mutation
        .as_ref()
        .unwrap()
        .set_headers
        .iter()
        .filter(|h| {
            h.header
                .as_ref()
                .is_some_and(|h| h.key == "x-gateway-destination-endpoint")
        })
        .count();
    assert_eq!(destinations, 1);
    let (head, _) = chat_on(open(addr).await, &body, &[]).await;
    assert_eq!(destination(&head), "10.0.0.1:8000");
    assert_eq!(set_header(&head, "x-prefiller-host-port"), None);
}

/// The in-flight producer behind the KV scorer of the default configuration, as v0.10 counts
/// it: the request's tokens until the first response bytes, the request until the response
/// completes.
#[tokio::test]
async fn in_flight_tokens_go_at_the_first_response_bytes_and_the_request_at_the_end() {
    use endpoint_picker::framework::attributes::InFlightLoad;
    use endpoint_picker::framework::data::DataKey;
    let epp = start_with(SEED_CONFIG, &[], None).await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let key = DataKey::<InFlightLoad>::named("inflight-load-producer");
    let load = || {
        let snap = epp.store.load();
        let l = snap.endpoints()[0]
            .get(key)
            .expect("the producer's attribute")
            .clone();
        (l.requests(), l.tokens())
    };
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(
        chat_body("m", &"word ".repeat(200)).as_bytes(),
        true,
    ))
    .await;
    c.recv().await;
    c.recv().await;
    let (requests, tokens) = load();
    assert_eq!(requests, 1);
    assert!(tokens > 200, "{tokens}");
    c.send(response_headers(&[(":status", "200")], false)).await;
    c.recv().await;
    // Response headers alone are not the first token.
    assert_eq!(load(), (1, tokens));
    c.send(response_body(b"data: {\"choices\":[]}\n\n", false)).await;
    c.recv().await;
    assert_eq!(load(), (1, 0));
    c.send(response_body(b"data: [DONE]\n\n", true)).await;
    c.recv().await;
    assert_eq!(load(), (0, 0));
}
