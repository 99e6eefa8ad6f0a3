//! The one mapping from errors to what Envoy is told: a local reply (ImmediateResponse) with
//! the reference's status codes and `inference gateway: <Code> - <message>` bodies, or a gRPC
//! error that makes the gateway apply its failure mode.

use crate::framework::requestcontrol::DispatchError;
use crate::request::RequestError;
use crate::requestcontrol::DirectorError;

/// Errors that end a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Routing failed.
    #[error(transparent)]
    Director(#[from] DirectorError),
    /// The gateway uses a body mode in which the EPP cannot route.
    #[error("request_body_mode {0} is not supported: use FULL_DUPLEX_STREAMED or BUFFERED")]
    UnsupportedBodyMode(&'static str),
    /// A message arrived out of protocol order.
    #[error("unexpected {0}")]
    OutOfOrder(&'static str),
    /// The bodies buffered across all streams would exceed `--max-buffered-body-bytes`.
    #[error(
        "request bodies buffered by the endpoint picker would exceed its budget of {limit} bytes (--max-buffered-body-bytes); retry later"
    )]
    BodyBudget {
        /// The budget in bytes.
        limit: usize,
    },
}

/// What the EPP answers for an error.
#[derive(Debug, Clone)]
pub enum ErrorAnswer {
    /// A local reply with this status, reference error code and message.
    Immediate {
        /// HTTP status.
        status: u16,
        /// Reference error code (`BadRequest`, ...), also the metric label.
        code: &'static str,
        /// Reply body.
        body: String,
        /// `x-llm-d-request-dropped-reason`, for flow-control outcomes.
        dropped_reason: Option<&'static str>,
    },
    /// Fail the gRPC stream; the gateway's failure mode decides.
    Abort(tonic::Status),
}

fn immediate(status: u16, code: &'static str, err: &dyn std::fmt::Display) -> ErrorAnswer {
    ErrorAnswer::Immediate {
        status,
        code,
        body: format!("inference gateway: {code} - {err}"),
        dropped_reason: None,
    }
}

impl StreamError {
    /// Whether the request reached scheduling and no endpoint could take it (the pick
    /// counter's `failure`): no candidates, a scheduling error, or shedding.
    pub fn is_scheduling_failure(&self) -> bool {
        matches!(
            self,
            Self::Director(DirectorError::NoCandidates | DirectorError::Scheduling(_) | DirectorError::Shed)
        )
    }

    /// How this error is answered.
    pub fn answer(&self) -> ErrorAnswer {
        match self {
            Self::Director(d) => match d {
                DirectorError::Request(RequestError::BodyTooLarge { .. }) => {
                    immediate(413, "PayloadTooLarge", d)
                }
                DirectorError::Request(_) => immediate(400, "BadRequest", d),
                DirectorError::NotSynced => ErrorAnswer::Abort(tonic::Status::unavailable(d.to_string())),
                DirectorError::NoEndpoints => immediate(500, "Internal", d),
                DirectorError::NoCandidates => immediate(503, "ServiceUnavailable", d),
                DirectorError::Scheduling(_) | DirectorError::Shed => {
                    immediate(429, "InferencePoolResourceExhausted", d)
                }
                DirectorError::Dispatch(e) => {
                    let mut answer = match e {
                        DispatchError::Saturated
                        | DispatchError::Expired
                        | DispatchError::PushedOut
                        | DispatchError::Rejected(_) => immediate(429, "InferencePoolResourceExhausted", d),
                        DispatchError::NoEndpoints | DispatchError::Cancelled | DispatchError::Shutdown => {
                            immediate(503, "ServiceUnavailable", d)
                        }
                    };
                    if let ErrorAnswer::Immediate { dropped_reason, .. } = &mut answer {
                        *dropped_reason = e.dropped_reason();
                    }
                    answer
                }
            },
            Self::UnsupportedBodyMode(_) => immediate(500, "Internal", self),
            Self::BodyBudget { .. } => immediate(503, "ServiceUnavailable", self),
            Self::OutOfOrder(_) => ErrorAnswer::Abort(tonic::Status::failed_precondition(self.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::scheduling::SchedulingError;

    fn status_and_body(e: DirectorError) -> (u16, String) {
        match StreamError::from(e).answer() {
            ErrorAnswer::Immediate { status, body, .. } => (status, body),
            ErrorAnswer::Abort(s) => panic!("aborted: {s}"),
        }
    }

    #[test]
    fn reference_codes_and_bodies() {
        assert_eq!(
            status_and_body(RequestError::InvalidJson.into()),
            (
                400,
                "inference gateway: BadRequest - Error unmarshaling request body".into()
            )
        );
        assert_eq!(
            status_and_body(RequestError::ModelMissing.into()),
            (
                400,
                "inference gateway: BadRequest - model not found in request body".into()
            )
        );
        assert_eq!(
            status_and_body(DirectorError::NoCandidates),
            (503, "inference gateway: ServiceUnavailable - failed to find candidate pods for serving the request".into())
        );
        assert_eq!(
            status_and_body(DirectorError::NoEndpoints),
            (
                500,
                "inference gateway: Internal - no pods available in datastore".into()
            )
        );
        assert_eq!(
            status_and_body(DirectorError::Scheduling(SchedulingError::NoCandidates)).0,
            429
        );
        assert_eq!(
            status_and_body(RequestError::BodyTooLarge { limit: 10 }.into()).0,
            413
        );
        assert_eq!(
            status_and_body(DirectorError::Dispatch(DispatchError::Rejected("full".into()))).0,
            429
        );
        assert!(matches!(
            StreamError::from(DirectorError::Dispatch(DispatchError::Rejected("full".into()))).answer(),
            ErrorAnswer::Immediate {
                dropped_reason: None,
                ..
            }
        ));
    }

    #[test]
    fn flow_control_outcomes_carry_the_reference_status_and_reason() {
        for (e, status, reason) in [
            (DispatchError::Saturated, 429, "rejected-saturated"),
            (DispatchError::NoEndpoints, 503, "rejected-no-endpoints"),
            (DispatchError::Expired, 429, "rejected-ttl-expired"),
            (DispatchError::PushedOut, 429, "evicted-queue-pressure"),
            (DispatchError::Cancelled, 503, "rejected-context-cancelled"),
            (DispatchError::Shutdown, 503, "rejected-shutting-down"),
        ] {
            let text = e.to_string();
            match StreamError::from(DirectorError::Dispatch(e)).answer() {
                ErrorAnswer::Immediate {
                    status: s,
                    body,
                    dropped_reason,
                    ..
                } => {
                    assert_eq!((s, dropped_reason), (status, Some(reason)));
                    assert!(body.ends_with(&text), "{body}");
                }
                ErrorAnswer::Abort(s) => panic!("aborted: {s}"),
            }
        }
        assert!(matches!(
            StreamError::from(DirectorError::NotSynced).answer(),
            ErrorAnswer::Abort(s) if s.code() == tonic::Code::Unavailable
        ));
    }
}
