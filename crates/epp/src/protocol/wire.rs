//! Builders for the ext_proc messages the EPP sends. Every shape Envoy must see is made here.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use crate::request::keys;

/// Largest body chunk sent back in FULL_DUPLEX_STREAMED mode (some Envoy builds cap streamed
/// chunks at 64 KiB; the reference uses the same figure).
pub const MAX_CHUNK: usize = 62_000;

/// A header set that replaces any existing value. The value goes in `raw_value`: Envoy
/// ignores `value` when building the mutation and would set an empty header.
pub fn set_header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.to_vec(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": destinations}}`.
pub fn lb_metadata(destinations: &str) -> Struct {
    let inner = Struct {
        fields: HashMap::from([(
            keys::DESTINATION.to_owned(),
            Value {
                kind: Some(Kind::StringValue(destinations.to_owned())),
            },
        )]),
    };
    Struct {
        fields: HashMap::from([(
            keys::LB_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]),
    }
}

/// A response that only carries `response`.
fn message(response: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..ProcessingResponse::default()
    }
}

/// The routing answer's common part: destination (plus extra headers), cleared route cache.
pub fn routing_common(set_headers: Vec<HeaderValueOption>) -> CommonResponse {
    CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers,
            remove_headers: Vec::new(),
        }),
        clear_route_cache: true,
        ..CommonResponse::default()
    }
}

/// Request-headers answer, with the routing metadata when given.
pub fn request_headers(common: CommonResponse, metadata: Option<Struct>) -> ProcessingResponse {
    ProcessingResponse {
        dynamic_metadata: metadata,
        ..message(Response::RequestHeaders(HeadersResponse {
            response: Some(common),
        }))
    }
}

/// Request-body answer carrying a common response (BUFFERED mode), with metadata when given.
pub fn request_body(common: CommonResponse, metadata: Option<Struct>) -> ProcessingResponse {
    ProcessingResponse {
        dynamic_metadata: metadata,
        ..message(Response::RequestBody(BodyResponse {
            response: Some(common),
        }))
    }
}

fn streamed(body: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..StreamedBodyResponse::default()
                })),
            }),
            ..CommonResponse::default()
        }),
    }
}

/// One request body chunk echoed in FULL_DUPLEX_STREAMED mode.
pub fn request_body_chunk(body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    message(Response::RequestBody(streamed(body, end_of_stream)))
}

/// One response body chunk echoed in FULL_DUPLEX_STREAMED mode.
pub fn response_body_chunk(body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    message(Response::ResponseBody(streamed(body, end_of_stream)))
}

/// Response-headers answer that changes nothing.
pub fn response_headers_continue() -> ProcessingResponse {
    response_headers_set(&[])
}

/// Response-headers answer setting `headers` (overwriting a value the server sent).
pub fn response_headers_set(headers: &[(String, String)]) -> ProcessingResponse {
    let header_mutation = (!headers.is_empty()).then(|| HeaderMutation {
        set_headers: headers.iter().map(|(k, v)| set_header(k, v.as_bytes())).collect(),
        remove_headers: Vec::new(),
    });
    message(Response::ResponseHeaders(HeadersResponse {
        response: Some(CommonResponse {
            header_mutation,
            ..CommonResponse::default()
        }),
    }))
}

/// Response-body answer that changes nothing (buffered and streamed modes).
pub fn response_body_continue() -> ProcessingResponse {
    message(Response::ResponseBody(BodyResponse {
        response: Some(CommonResponse::default()),
    }))
}

/// Empty trailers answer on the request (`request == true`) or response path.
pub fn trailers(request: bool) -> ProcessingResponse {
    let t = TrailersResponse::default();
    message(if request {
        Response::RequestTrailers(t)
    } else {
        Response::ResponseTrailers(t)
    })
}

/// A local reply: the gateway answers the client with `status` and `body`.
pub fn immediate(status: u16, body: String) -> ProcessingResponse {
    message(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(status),
        }),
        body: body.into_bytes(),
        ..ImmediateResponse::default()
    }))
}

/// Adds a response header to an [`immediate`] answer (anything else is left alone).
pub fn add_immediate_header(answer: &mut ProcessingResponse, name: &str, value: &str) {
    if let Some(Response::ImmediateResponse(r)) = &mut answer.response {
        r.headers
            .get_or_insert_with(HeaderMutation::default)
            .set_headers
            .push(set_header(name, value.as_bytes()));
    }
}

/// Splits a body into chunk answers of at most [`MAX_CHUNK`] bytes, the last flagged
/// `end_of_stream` when `last`. Chunks that already fit are moved, not copied; an empty body
/// still yields one (empty) answer so the stream carries its end.
pub fn push_body_chunks(chunks: Vec<Vec<u8>>, last: bool, out: &mut Vec<ProcessingResponse>) {
    let mut pieces: Vec<Vec<u8>> = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        if chunk.is_empty() {
            continue;
        }
        if chunk.len() <= MAX_CHUNK {
            pieces.push(chunk);
        } else {
            pieces.extend(chunk.chunks(MAX_CHUNK).map(<[u8]>::to_vec));
        }
    }
    if pieces.is_empty() {
        pieces.push(Vec::new());
    }
    let n = pieces.len();
    out.extend(
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, p)| request_body_chunk(p, last && i + 1 == n)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_sizes(out: &[ProcessingResponse]) -> Vec<(usize, bool)> {
        out.iter()
            .map(|r| match &r.response {
                Some(Response::RequestBody(BodyResponse { response: Some(c) })) => match &c.body_mutation {
                    Some(BodyMutation {
                        mutation: Some(body_mutation::Mutation::StreamedResponse(s)),
                    }) => (s.body.len(), s.end_of_stream),
                    _ => panic!("not streamed"),
                },
                _ => panic!("not a body response"),
            })
            .collect()
    }

    #[test]
    fn chunks_are_bounded_ordered_and_end_once() {
        let mut out = Vec::new();
        push_body_chunks(vec![vec![1; 10], vec![], vec![2; 130_000]], true, &mut out);
        assert_eq!(
            chunk_sizes(&out),
            vec![(10, false), (62_000, false), (62_000, false), (6_000, true)]
        );
        let mut out = Vec::new();
        push_body_chunks(vec![], true, &mut out);
        assert_eq!(chunk_sizes(&out), vec![(0, true)]);
        let mut out = Vec::new();
        push_body_chunks(vec![vec![1; 5]], false, &mut out);
        assert_eq!(chunk_sizes(&out), vec![(5, false)]);
    }
}
