use super::*;
use crate::datalayer::EndpointState;
use crate::framework::scheduling::{ProfileRun, Target, candidates};
use crate::plugins::testing::states;
use crate::request::RequestHeaders;

fn scorer(params: SessionAffinityParams) -> SessionAffinityScorer {
    SessionAffinityScorer::new("sa-test", "team-a", &params).unwrap()
}

fn session_id() -> SessionAffinityParams {
    SessionAffinityParams {
        strategy: Some("session_id".into()),
        ..SessionAffinityParams::default()
    }
}

fn headers(h: &[(&str, &str)]) -> RequestHeaders {
    RequestHeaders::new(
        h.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

/// A result whose `runs` chose `eps[i]` for each `(profile, i)`, the first being primary.
fn result(eps: &[EndpointState], runs: &[(&str, usize)]) -> SchedulingResult {
    SchedulingResult {
        runs: runs
            .iter()
            .enumerate()
            .map(|(n, (name, i))| ProfileRun {
                profile: n,
                name: (*name).into(),
                outcome: Ok(vec![Target {
                    state: eps[*i].clone(),
                    index: *i,
                }]),
            })
            .collect(),
        primary: 0,
    }
}

/// One request through the plugin: prepare, score `eps`, then a decision for `chose`.
/// Returns the scores and the response headers set.
fn cycle(
    s: &SessionAffinityScorer,
    h: &RequestHeaders,
    eps: &[EndpointState],
    chose: &[(&str, usize)],
    all: &[EndpointState],
) -> (Vec<f64>, Vec<(String, String)>) {
    let req = SchedulingRequest::new("r", "m", b"", None, h);
    let mut state = CycleState::default();
    let c = candidates(eps);
    s.prepare(&req, &c, &mut state);
    let mut out = vec![0.0; eps.len()];
    s.score(&req, &state, &c, &mut out);
    let mut ctx = PreRequestContext::default();
    s.pre_request(&req, &state, &result(all, chose), &mut ctx);
    (out, ctx.response_headers().to_vec())
}

#[test]
fn the_encoded_token_names_the_endpoint_that_served_and_brings_the_next_request_back() {
    let s = scorer(SessionAffinityParams::default());
    let eps = states(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
    let (out, written) = cycle(&s, &headers(&[]), &eps, &[("default", 1)], &eps);
    assert_eq!(out, vec![0.0; 3], "no token, no preference");
    let token = BASE64.encode("team-a/10.0.0.2:8000");
    assert_eq!(written, vec![(DEFAULT_TOKEN_HEADER.to_owned(), token.clone())]);
    let (out, _) = cycle(
        &s,
        &headers(&[("x-session-token", &token)]),
        &eps,
        &[("default", 1)],
        &eps,
    );
    assert_eq!(out, vec![0.0, 1.0, 0.0]);
    // Another namespace's pod, garbage, and an oversized token name nothing.
    for bad in [
        BASE64.encode("team-b/10.0.0.2:8000"),
        "not base64!".to_owned(),
        "A".repeat(4096),
    ] {
        let (out, _) = cycle(
            &s,
            &headers(&[("x-session-token", &bad)]),
            &eps,
            &[("default", 0)],
            &eps,
        );
        assert_eq!(out, vec![0.0; 3], "{bad:.40}");
    }
}

#[test]
fn a_configured_header_and_profile_pin_that_profile_s_endpoint() {
    let s = scorer(SessionAffinityParams {
        encoded_endpoint_header_config: Some(EncodedHeaderConfig {
            header: Some(" X-Prefill-Token ".into()),
        }),
        profile_name: Some("prefill".into()),
        ..SessionAffinityParams::default()
    });
    let eps = states(&[(0, 0.0), (0, 0.0)]);
    let (_, written) = cycle(&s, &headers(&[]), &eps, &[("decode", 0), ("prefill", 1)], &eps);
    let token = BASE64.encode("team-a/10.0.0.2:8000");
    assert_eq!(written, vec![("x-prefill-token".to_owned(), token)]);
    // A request that did not run the profile pins nothing.
    let (_, written) = cycle(&s, &headers(&[]), &eps, &[("decode", 0)], &eps);
    assert!(written.is_empty());
}

#[test]
fn a_session_id_binds_to_its_first_endpoint_and_moves_only_when_it_is_gone() {
    let s = scorer(session_id());
    let eps = states(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
    let h = headers(&[("x-session-id", "chat-42")]);
    // Unbound: no preference; the decision binds it. Nothing is written back.
    let (out, written) = cycle(&s, &h, &eps, &[("default", 2)], &eps);
    assert_eq!(out, vec![0.0; 3]);
    assert!(written.is_empty());
    let (out, _) = cycle(&s, &h, &eps, &[("default", 2)], &eps);
    assert_eq!(out, vec![0.0, 0.0, 1.0]);
    // It was a candidate and lost to other scorers: the binding stays.
    cycle(&s, &h, &eps, &[("default", 0)], &eps);
    let (out, _) = cycle(&s, &h, &eps, &[("default", 0)], &eps);
    assert_eq!(out, vec![0.0, 0.0, 1.0]);
    // Filtered out (not among the candidates): the session follows the request.
    let (out, _) = cycle(&s, &h, &eps[..2], &[("default", 1)], &eps);
    assert_eq!(out, vec![0.0, 0.0]);
    let (out, _) = cycle(&s, &h, &eps, &[("default", 1)], &eps);
    assert_eq!(out, vec![0.0, 1.0, 0.0]);
    // Other sessions and requests without one are untouched.
    let (out, _) = cycle(
        &s,
        &headers(&[("x-session-id", "other")]),
        &eps,
        &[("default", 0)],
        &eps,
    );
    assert_eq!(out, vec![0.0; 3]);
    let (out, _) = cycle(
        &s,
        &headers(&[("x-session-id", "  ")]),
        &eps,
        &[("default", 0)],
        &eps,
    );
    assert_eq!(out, vec![0.0; 3]);
    assert_eq!(s.bindings().unwrap().len(), 2);
}

#[test]
fn sources_are_read_in_order_and_max_sessions_bounds_the_bindings() {
    let s = scorer(SessionAffinityParams {
        session_id_config: Some(SessionIdConfig {
            sources: Some(vec![
                SessionIdSource {
                    header: Some("X-Conversation".into()),
                    ..SessionIdSource::default()
                },
                SessionIdSource {
                    header: Some("x-user".into()),
                    ..SessionIdSource::default()
                },
            ]),
            max_sessions: Some(2),
            ..SessionIdConfig::default()
        }),
        ..session_id()
    });
    let eps = states(&[(0, 0.0), (0, 0.0)]);
    cycle(&s, &headers(&[("x-user", "u1")]), &eps, &[("default", 1)], &eps);
    // The first source wins when both are there: a new session.
    let both = headers(&[("x-user", "u1"), ("x-conversation", "c1")]);
    let (out, _) = cycle(&s, &both, &eps, &[("default", 0)], &eps);
    assert_eq!(out, vec![0.0, 0.0]);
    let (out, _) = cycle(&s, &headers(&[("x-user", "u1")]), &eps, &[("default", 0)], &eps);
    assert_eq!(out, vec![0.0, 1.0]);
    // Two sessions are bound: a third is placed but not remembered.
    cycle(&s, &headers(&[("x-user", "u3")]), &eps, &[("default", 0)], &eps);
    let (out, _) = cycle(&s, &headers(&[("x-user", "u3")]), &eps, &[("default", 0)], &eps);
    assert_eq!(out, vec![0.0, 0.0]);
    assert_eq!(s.bindings().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn unused_bindings_are_swept_after_their_ttl() {
    let s = scorer(SessionAffinityParams {
        session_id_config: Some(SessionIdConfig {
            eviction_ttl_seconds: Some(60.0),
            eviction_sweep_seconds: Some(10.0),
            ..SessionIdConfig::default()
        }),
        ..session_id()
    });
    let b = s.bindings().unwrap();
    let cancel = CancellationToken::new();
    let sweeper = tokio::spawn(b.clone().run(cancel.clone()));
    let eps = states(&[(0, 0.0), (0, 0.0)]);
    let (old, kept) = (
        headers(&[("x-session-id", "old")]),
        headers(&[("x-session-id", "kept")]),
    );
    cycle(&s, &old, &eps, &[("default", 0)], &eps);
    cycle(&s, &kept, &eps, &[("default", 1)], &eps);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Used every 10 s: never expires.
        cycle(&s, &kept, &eps, &[("default", 1)], &eps);
    }
    // At 60 s the idle one is not older than its TTL yet: both are kept.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(b.len(), 2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(b.len(), 1, "the idle session is gone after TTL + one sweep");
    let (out, _) = cycle(&s, &kept, &eps, &[("default", 1)], &eps);
    assert_eq!(out, vec![0.0, 1.0]);
    cancel.cancel();
    sweeper.await.unwrap();
}

#[test]
fn unusable_parameters_are_refused() {
    let err = |p: SessionAffinityParams| SessionAffinityScorer::new("x", "ns", &p).unwrap_err();
    assert_eq!(
        err(SessionAffinityParams {
            strategy: Some("cookie".into()),
            ..SessionAffinityParams::default()
        }),
        SessionAffinityParamError::Strategy("cookie".into())
    );
    assert_eq!(
        err(SessionAffinityParams {
            session_id_config: Some(SessionIdConfig::default()),
            ..SessionAffinityParams::default()
        }),
        SessionAffinityParamError::OtherStrategy("sessionIdConfig", "session_id")
    );
    let with = |c: SessionIdConfig| SessionAffinityParams {
        session_id_config: Some(c),
        ..session_id()
    };
    assert_eq!(
        err(with(SessionIdConfig {
            sources: Some(vec![SessionIdSource {
                attribute: Some("agent-identity".into()),
                ..SessionIdSource::default()
            }]),
            ..SessionIdConfig::default()
        })),
        SessionAffinityParamError::Source(0)
    );
    for (v, name) in [
        (-1.0, "evictionTtlSeconds"),
        (1e30, "evictionTtlSeconds"),
        (f64::NAN, "evictionTtlSeconds"),
        (1e-12, "evictionSweepSeconds"),
    ] {
        let c = if name == "evictionTtlSeconds" {
            SessionIdConfig {
                eviction_ttl_seconds: Some(v),
                ..SessionIdConfig::default()
            }
        } else {
            SessionIdConfig {
                eviction_sweep_seconds: Some(v),
                ..SessionIdConfig::default()
            }
        };
        match err(with(c)) {
            SessionAffinityParamError::Seconds(n, _) => assert_eq!(n, name, "{v}"),
            other => panic!("{v}: {other:?}"),
        }
    }
    // 0 is the default, as v0.10 reads it.
    let zero = SessionAffinityScorer::new(
        "x",
        "ns",
        &with(SessionIdConfig {
            eviction_ttl_seconds: Some(0.0),
            eviction_sweep_seconds: Some(0.0),
            ..SessionIdConfig::default()
        }),
    )
    .unwrap();
    let b = zero.bindings().unwrap();
    assert_eq!(
        (b.ttl, b.sweep),
        (Duration::from_secs(300), Duration::from_secs(10))
    );
    for bad in [
        "content-length",
        ":status",
        "x-gateway-destination-endpoint",
        "x session",
        "x-llm-d-request-dropped-reason",
    ] {
        assert_eq!(
            err(SessionAffinityParams {
                encoded_endpoint_header_config: Some(EncodedHeaderConfig {
                    header: Some(bad.into()),
                }),
                ..SessionAffinityParams::default()
            }),
            SessionAffinityParamError::Header(bad.into())
        );
    }
    assert_eq!(
        err(with(SessionIdConfig {
            max_sessions: Some(0),
            ..SessionIdConfig::default()
        })),
        SessionAffinityParamError::MaxSessions(0)
    );
}

#[test]
fn a_session_moved_by_another_request_meanwhile_is_not_moved_back() {
    let s = scorer(session_id());
    let eps = states(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
    let h = headers(&[("x-session-id", "chat-7")]);
    cycle(&s, &h, &eps, &[("default", 0)], &eps);
    // Request A sees the session bound to 0, which is filtered out of its candidates.
    let req = SchedulingRequest::new("a", "m", b"", None, &h);
    let mut a = CycleState::default();
    let c = candidates(&eps[1..]);
    s.prepare(&req, &c, &mut a);
    s.score(&req, &a, &c, &mut [0.0; 2]);
    // Meanwhile request B, under the same conditions, moves the session to 1.
    cycle(&s, &h, &eps[1..], &[("default", 1)], &eps);
    // A's decision (2) does not undo B's move.
    s.pre_request(
        &req,
        &a,
        &result(&eps, &[("default", 2)]),
        &mut PreRequestContext::default(),
    );
    let (out, _) = cycle(&s, &h, &eps, &[("default", 1)], &eps);
    assert_eq!(out, vec![0.0, 1.0, 0.0]);
}
