//! `header-based-testing-filter`: the conformance suite's way to steer the EPP.
//!
//! Keeps the endpoints named in the request header `test-epp-endpoint-selection`
//! (comma-separated IPs, or `ip:port` to pick one rank of a multi-port pod), in header order,
//! each endpoint once. A missing or empty header keeps nothing, so the request is refused,
//! as the reference does.

use std::net::{IpAddr, SocketAddr};

use crate::framework::data::CycleState;
use crate::framework::scheduling::{Candidate, Filter, SchedulingRequest};
use crate::request::keys;

/// See the module docs.
#[derive(Debug, Default)]
pub struct HeaderBasedTestingFilter;

/// One header item: a bare IP (any port) or an exact `ip:port`.
enum Selector {
    Ip(IpAddr),
    Addr(SocketAddr),
}

fn parse_item(item: &str) -> Option<Selector> {
    if let Ok(addr) = item.parse::<SocketAddr>() {
        return Some(Selector::Addr(addr));
    }
    let bare = item.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(Selector::Ip)
}

impl Filter for HeaderBasedTestingFilter {
    fn filter<'s>(
        &self,
        req: &SchedulingRequest<'_>,
        _state: &CycleState,
        candidates: &[Candidate<'s>],
    ) -> Vec<Candidate<'s>> {
        let Some(value) = req.headers.control(&[keys::TEST_ENDPOINT_SELECTION]) else {
            return Vec::new();
        };
        let mut out: Vec<Candidate<'s>> = Vec::new();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some(sel) = parse_item(item) else {
                continue;
            };
            let found = candidates.iter().find(|c| {
                let addr = c.endpoint.address;
                let hit = match sel {
                    Selector::Ip(ip) => addr.ip() == ip,
                    Selector::Addr(a) => addr == a,
                };
                hit && !out.iter().any(|o| o.index == c.index)
            });
            if let Some(c) = found {
                out.push(*c);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::scheduling::candidates;
    use crate::plugins::testing::{request, states_at};
    use crate::request::RequestHeaders;

    #[test]
    fn keeps_named_endpoints_in_header_order() {
        let s = states_at(&[
            "10.0.0.1:8000",
            "10.0.0.2:8000",
            "[fd00::3]:8000",
            "10.0.0.2:8001",
        ]);
        let cands = candidates(&s);
        let headers = RequestHeaders::new(vec![(
            keys::TEST_ENDPOINT_SELECTION.into(),
            " fd00::3 , 10.0.0.2:8001,10.0.0.1,bogus".into(),
        )]);
        let req = request(&headers, "m", b"");
        let got: Vec<_> = HeaderBasedTestingFilter
            .filter(&req, &CycleState::default(), &cands)
            .iter()
            .map(|c| c.endpoint.hostport.to_string())
            .collect();
        assert_eq!(got, vec!["[fd00::3]:8000", "10.0.0.2:8001", "10.0.0.1:8000"]);
    }

    #[test]
    fn missing_header_keeps_nothing() {
        let s = states_at(&["10.0.0.1:8000"]);
        let cands = candidates(&s);
        let headers = RequestHeaders::default();
        let req = request(&headers, "m", b"");
        assert!(
            HeaderBasedTestingFilter
                .filter(&req, &CycleState::default(), &cands)
                .is_empty()
        );
    }
}
