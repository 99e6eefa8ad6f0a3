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
    /// InferenceObjective name (priority).
    pub const OBJECTIVE: &str = "x-gateway-inference-objective";
    /// Flow-control fairness id.
    pub const FAIRNESS_ID: &str = "x-gateway-inference-fairness-id";
    /// Target model override.
    pub const MODEL_REWRITE: &str = "x-gateway-model-name-rewrite";
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
    /// the destination, its subset and served keys, and the body length (the reference's
    /// "system-owned" headers, v1.3+).
    pub fn is_system_owned(name: &str) -> bool {
        matches!(
            name,
            DESTINATION
                | DESTINATION_SERVED
                | DESTINATION_SUBSET
                | "content-length"
                | ":path"
                | ":authority"
                | ":method"
        )
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

    /// A control header's value, `None` when absent or empty.
    pub fn control(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    /// The request path used to tell the API apart: `:path`, then `x-original-path`, then
    /// `x-forwarded-path`.
    pub fn path(&self) -> Option<&str> {
        self.control(keys::PATH)
            .or_else(|| self.control(keys::ORIGINAL_PATH))
            .or_else(|| self.control(keys::FORWARDED_PATH))
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
            (keys::OBJECTIVE.into(), "".into()),
            (keys::ORIGINAL_PATH.into(), "/v1/chat/completions".into()),
        ]);
        assert_eq!(h.get(keys::REQUEST_ID), None);
        assert_eq!(h.get_ignore_case(keys::REQUEST_ID), Some("abc"));
        assert_eq!(h.control(keys::OBJECTIVE), None);
        assert_eq!(h.path(), Some("/v1/chat/completions"));
    }
}
