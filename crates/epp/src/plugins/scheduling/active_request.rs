//! `active-request-scorer`: prefer the endpoint with fewer requests this EPP has sent and not
//! yet seen finish (llm-d-router v0.10's `scorer/activerequest`).
//!
//! It reads the live request count of each candidate's `InFlightLoad` attribute (kept by an
//! `inflight-load-producer`, added when the configuration has none). Unlike the scraped queue
//! figures, the count moves the moment a request is routed, so a burst spreads instead of
//! landing on whichever server looked emptiest at the last scrape.
//!
//! Scores, as v0.10: a candidate with at most `idleThreshold` requests is idle and scores 1;
//! a busy one scores `(max - count) / max × maxBusyScore`, where `max` is the largest count
//! among the candidates (so the busiest scores 0). With the defaults (`idleThreshold` 0,
//! `maxBusyScore` 1) that is `1 - count / max`; a `maxBusyScore` below 1 opens a gap between
//! idle and busy endpoints.
//!
//! Parameters (unknown ones are refused): `idleThreshold` (0, ≥ 0), `maxBusyScore` (1.0, in
//! [0, 1]), `inFlightLoadProducerName`. v0.10 falls back to the default on a negative
//! threshold or an out-of-range `maxBusyScore` and logs it; here both are refused. v0.10's
//! deprecated `requestTimeout` is ignored there (the in-flight producer owns the requests'
//! lifetime), so it is refused here, naming its replacement.

use serde::Deserialize;

use crate::framework::attributes::InFlightLoad;
use crate::framework::data::{CycleState, DataKey};
use crate::framework::scheduling::{Candidate, SchedulingRequest, Scorer};

/// Parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActiveRequestParams {
    /// Requests at or under which an endpoint counts as idle.
    pub idle_threshold: Option<i64>,
    /// The highest score a busy endpoint gets.
    pub max_busy_score: Option<f64>,
    /// The in-flight producer to read (bound by the configuration builder).
    pub in_flight_load_producer_name: Option<String>,
    /// v0.10's deprecated, ignored timeout (refused).
    pub request_timeout: Option<serde_yaml::Value>,
}

/// Why the parameters are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ActiveRequestParamError {
    /// Negative threshold.
    #[error("idleThreshold must be ≥ 0, got {0}")]
    IdleThreshold(i64),
    /// Score outside [0, 1].
    #[error("maxBusyScore must be in [0, 1], got {0}")]
    MaxBusyScore(f64),
    /// The deprecated timeout.
    #[error(
        "requestTimeout is deprecated and ignored by llm-d-router v0.10: an inflight-load-producer counts each request until its response ends; remove it"
    )]
    RequestTimeout,
}

/// See the module docs.
#[derive(Debug)]
pub struct ActiveRequestScorer {
    load: DataKey<InFlightLoad>,
    idle: i64,
    max_busy: f64,
}

impl ActiveRequestScorer {
    /// A scorer reading the in-flight producer named `load`.
    pub fn new(load: &str, params: &ActiveRequestParams) -> Result<Self, ActiveRequestParamError> {
        if params.request_timeout.is_some() {
            return Err(ActiveRequestParamError::RequestTimeout);
        }
        let idle = params.idle_threshold.unwrap_or(0);
        if idle < 0 {
            return Err(ActiveRequestParamError::IdleThreshold(idle));
        }
        let max_busy = params.max_busy_score.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&max_busy) {
            return Err(ActiveRequestParamError::MaxBusyScore(max_busy));
        }
        Ok(Self {
            load: DataKey::named(load),
            idle,
            max_busy,
        })
    }
}

impl Scorer for ActiveRequestScorer {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        _state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        // Each live counter is read once: requests routed meanwhile must not make a count
        // exceed the maximum it is scaled by.
        let mut max = 0;
        for (s, c) in scores.iter_mut().zip(candidates) {
            let n = c.get(self.load).map_or(0, InFlightLoad::requests);
            max = max.max(n);
            *s = n as f64;
        }
        for s in scores.iter_mut() {
            let n = *s as i64;
            *s = if n <= self.idle {
                1.0
            } else {
                // n > idle ≥ 0, so max ≥ n > 0.
                (max - n) as f64 / max as f64 * self.max_busy
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::framework::attributes::InFlightGuard;
    use crate::framework::scheduling::candidates;
    use crate::plugins::testing::{request, states};

    /// Three endpoints with 0, 2 and 4 requests in flight, scored by `params`.
    fn scored(params: ActiveRequestParams) -> Vec<f64> {
        let key = DataKey::<InFlightLoad>::named("active-test");
        let mut s = states(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
        let loads = [InFlightLoad::new(), InFlightLoad::new(), InFlightLoad::new()];
        for (st, l) in s.iter_mut().zip(&loads) {
            st.set(key, Arc::new(l.clone()));
        }
        let _held: Vec<InFlightGuard> = [(1, 2), (2, 4)]
            .into_iter()
            .flat_map(|(i, n)| (0..n).map(move |_| i))
            .map(|i| loads[i].counters.start(10))
            .collect();
        let scorer = ActiveRequestScorer::new("active-test", &params).unwrap();
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let mut out = vec![0.0; 3];
        scorer.score(&req, &CycleState::default(), &candidates(&s), &mut out);
        out
    }

    #[test]
    fn fewer_requests_in_flight_score_higher() {
        assert_eq!(scored(ActiveRequestParams::default()), vec![1.0, 0.5, 0.0]);
    }

    #[test]
    fn idle_threshold_and_busy_ceiling_open_a_gap() {
        let out = scored(ActiveRequestParams {
            idle_threshold: Some(2),
            max_busy_score: Some(0.5),
            ..ActiveRequestParams::default()
        });
        assert_eq!(out, vec![1.0, 1.0, 0.0]);
        let out = scored(ActiveRequestParams {
            max_busy_score: Some(0.5),
            ..ActiveRequestParams::default()
        });
        assert_eq!(out, vec![1.0, 0.25, 0.0]);
    }

    #[test]
    fn all_idle_all_score_one_and_a_released_request_counts_no_more() {
        let key = DataKey::<InFlightLoad>::named("active-test-release");
        let mut s = states(&[(0, 0.0), (0, 0.0)]);
        let loads = [InFlightLoad::new(), InFlightLoad::new()];
        for (st, l) in s.iter_mut().zip(&loads) {
            st.set(key, Arc::new(l.clone()));
        }
        let scorer = ActiveRequestScorer::new("active-test-release", &Default::default()).unwrap();
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let run = || {
            let mut out = vec![0.0; 2];
            scorer.score(&req, &CycleState::default(), &candidates(&s), &mut out);
            out
        };
        assert_eq!(run(), vec![1.0, 1.0]);
        let g = loads[0].counters.start(1);
        assert_eq!(run(), vec![0.0, 1.0]);
        drop(g);
        assert_eq!(run(), vec![1.0, 1.0]);
    }

    #[test]
    fn unusable_parameters_are_refused() {
        let p = |f: fn(&mut ActiveRequestParams)| {
            let mut p = ActiveRequestParams::default();
            f(&mut p);
            ActiveRequestScorer::new("x", &p).unwrap_err()
        };
        assert_eq!(
            p(|p| p.idle_threshold = Some(-1)),
            ActiveRequestParamError::IdleThreshold(-1)
        );
        assert_eq!(
            p(|p| p.max_busy_score = Some(1.5)),
            ActiveRequestParamError::MaxBusyScore(1.5)
        );
        assert_eq!(
            p(|p| p.request_timeout = Some("2m".into())),
            ActiveRequestParamError::RequestTimeout
        );
    }
}
