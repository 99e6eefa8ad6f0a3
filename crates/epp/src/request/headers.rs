//! Request headers as Envoy delivers them, and the control headers the EPP reads.

/// Header names of the EPP protocol and the control headers.
pub mod keys {
    /// The chosen endpoint(s): response header and `envoy.lb` metadata key.
    pub const DESTINATION: &str = "x-gateway-destination-endpoint";
    /// Metadata key under which the gateway reports the endpoint that served the request.
    pub const DESTINATION_SERVED: &str = "x-gateway-destination-endpoint-served";
    /// Metadata key of the subset hint.
    pub const DESTINATION_SUBSET: &str = "x-gateway-destination-endpoint-subset";
    /// Metadata namespace of the destination and the served report.
    pub const LB_NAMESPACE: &str = "envoy.lb";
    /// Metadata namespace of the subset hint.
    pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
    /// InferenceObjective name (priority): llm-d-router v0.10's name, then GIE's, which v0.10
    /// keeps as a deprecated alias.
    pub const OBJECTIVE: &[&str] = &["x-llm-d-inference-objective", "x-gateway-inference-objective"];
    /// Flow-control fairness id (current name, then the alias).
    pub const FAIRNESS_ID: &[&str] = &["x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id"];
    /// Target model override (current name, then the alias).
    pub const MODEL_REWRITE: &[&str] = &["x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite"];
    /// Time-to-first-token objective in milliseconds (current name, then the alias).
    pub const SLO_TTFT_MS: &[&str] = &["x-llm-d-slo-ttft-ms", "x-slo-ttft-ms"];
    /// Time-per-output-token objective in milliseconds (current name, then the alias).
    pub const SLO_TPOT_MS: &[&str] = &["x-llm-d-slo-tpot-ms", "x-slo-tpot-ms"];
    /// Response header naming why flow control dropped a request (llm-d-router v0.10).
    pub const REQUEST_DROPPED_REASON: &str = "x-llm-d-request-dropped-reason";
    /// Request id; generated when absent.
    pub const REQUEST_ID: &str = "x-request-id";
    /// Conformance test filter input.
    pub const TEST_ENDPOINT_SELECTION: &str = "test-epp-endpoint-selection";
    /// HTTP/2 pseudo-header with the request path.
    pub const PATH: &str = ":path";
    /// Fallbacks for the path behind path-rewriting proxies.
    pub const ORIGINAL_PATH: &str = "x-original-path";
    /// Second fallback for the path.
    pub const FORWARDED_PATH: &str = "x-forwarded-path";
    /// Default fairness id when a request names none (the reference's `default-flow`).
    pub const DEFAULT_FAIRNESS_ID: &str = "default-flow";

    /// Whether `name` (lowercase) is a header the protocol owns, which plugins must not set:
    /// the destination, its subset and served keys, the body length, the pseudo-headers, the
    /// control headers the gateway or client sends the EPP (both spellings) and the drop
    /// reason (the reference's "system-owned" headers, GIE v1.3+ and llm-d-router v0.10).
    pub fn is_system_owned(name: &str) -> bool {
        matches!(
            name,
            DESTINATION
                | DESTINATION_SERVED
                | DESTINATION_SUBSET
                | REQUEST_DROPPED_REASON
                | "content-length"
                | ":path"
                | ":authority"
                | ":method"
        ) || [OBJECTIVE, FAIRNESS_ID, MODEL_REWRITE, SLO_TTFT_MS, SLO_TPOT_MS]
            .iter()
            .any(|names| names.contains(&name))
    }
}

/// The request's headers in arrival order. Envoy sends lowercase names (HTTP/2 form).
#[derive(Debug, Clone, Default)]
pub struct RequestHeaders {
    entries: Vec<(String, String)>,
}

impl RequestHeaders {
    /// Headers from `(name, value)` pairs.
    pub fn new(entries: Vec<(String, String)>) -> Self {
        Self { entries }
    }

    /// Appends one header.
    pub fn push(&mut self, name: String, value: String) {
        self.entries.push((name, value));
    }

    /// The first value of `name`, compared exactly (control headers are lowercase on the wire).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `name`, compared case-insensitively.
    pub fn get_ignore_case(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A control header's value under the first of `names` present with a value (the current
    /// name, then deprecated aliases, as llm-d-router v0.10 reads them); names compare
    /// case-insensitively (HTTP/1 clients behind a proxy may not lowercase them). `None` when
    /// absent or empty.
    pub fn control(&self, names: &[&str]) -> Option<&str> {
        names
            .iter()
            .find_map(|n| self.get_ignore_case(n).filter(|v| !v.is_empty()))
    }

    /// The request path used to tell the API apart: `:path`, then `x-original-path`, then
    /// `x-forwarded-path`.
    pub fn path(&self) -> Option<&str> {
        self.control(&[keys::PATH, keys::ORIGINAL_PATH, keys::FORWARDED_PATH])
    }

    /// All headers.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let h = RequestHeaders::new(vec![
            ("X-Request-Id".into(), "abc".into()),
            ("x-llm-d-inference-objective".into(), "".into()),
            ("x-gateway-inference-objective".into(), "old".into()),
            (keys::ORIGINAL_PATH.into(), "/v1/chat/completions".into()),
        ]);
        assert_eq!(h.get(keys::REQUEST_ID), None);
        assert_eq!(h.get_ignore_case(keys::REQUEST_ID), Some("abc"));
        // An empty current name falls back to the alias.
        assert_eq!(h.control(keys::OBJECTIVE), Some("old"));
        assert_eq!(h.path(), Some("/v1/chat/completions"));
    }

    #[test]
    fn the_current_name_wins_over_its_alias() {
        for names in [
            keys::OBJECTIVE,
            keys::FAIRNESS_ID,
            keys::MODEL_REWRITE,
            keys::SLO_TTFT_MS,
            keys::SLO_TPOT_MS,
        ] {
            let [current, alias] = names else {
                panic!("{names:?}")
            };
            assert!(current.starts_with("x-llm-d-"), "{current}");
            let h = RequestHeaders::new(vec![
                ((*alias).into(), "old".into()),
                ((*current).into(), "new".into()),
            ]);
            assert_eq!(h.control(names), Some("new"));
            let h = RequestHeaders::new(vec![(alias.to_uppercase(), "old".into())]);
            assert_eq!(h.control(names), Some("old"));
            assert!(keys::is_system_owned(current) && keys::is_system_owned(alias));
        }
    }
}
