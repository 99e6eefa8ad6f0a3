//! The protocol floor: an ext_proc processor that does nothing but what the full-duplex protocol
//! forces on any picker. It holds the request headers until the body has arrived, answers with
//! a fixed destination, and echoes every body chunk back; response headers, body chunks and
//! trailers are answered as they come. No parsing, no scheduling, no metrics. It runs in its
//! own process, with the same TLS, gRPC stack and socket options as the EPP, so the difference
//! between the two is what the EPP's own work costs.

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation,
};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Environment variable that turns the bench binary into the floor processor:
/// `<grpc port>,<destination>`.
pub const ENV: &str = "EPP_BENCH_FLOOR";

#[derive(Clone)]
struct Floor {
    destination: Arc<str>,
}

fn out(r: Out) -> Result<ProcessingResponse, Status> {
    Ok(ProcessingResponse {
        response: Some(r),
        ..ProcessingResponse::default()
    })
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

impl Floor {
    fn headers_answer(&self, body_len: usize) -> HeadersResponse {
        let set = |key: &str, value: String| HeaderValueOption {
            header: Some(HeaderValue {
                key: key.to_owned(),
                raw_value: value.into_bytes(),
                ..HeaderValue::default()
            }),
            ..HeaderValueOption::default()
        };
        HeadersResponse {
            response: Some(CommonResponse {
                clear_route_cache: true,
                header_mutation: Some(HeaderMutation {
                    set_headers: vec![
                        set("x-gateway-destination-endpoint", self.destination.to_string()),
                        set("content-length", body_len.to_string()),
                    ],
                    ..HeaderMutation::default()
                }),
                ..CommonResponse::default()
            }),
        }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Floor {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let mut held: Vec<Vec<u8>> = Vec::new();
            let mut answered = false;
            while let Ok(Some(msg)) = inbound.message().await {
                let mut send = Vec::new();
                match msg.request {
                    Some(In::RequestHeaders(h)) if h.end_of_stream => {
                        answered = true;
                        send.push(out(Out::RequestHeaders(this.headers_answer(0))));
                    }
                    Some(In::RequestBody(b)) => {
                        let end = b.end_of_stream;
                        held.push(b.body);
                        if end && !answered {
                            answered = true;
                            let len = held.iter().map(Vec::len).sum();
                            send.push(out(Out::RequestHeaders(this.headers_answer(len))));
                            let n = held.len();
                            for (i, chunk) in held.drain(..).enumerate() {
                                send.push(out(Out::RequestBody(streamed(chunk, i + 1 == n))));
                            }
                        }
                    }
                    Some(In::RequestTrailers(_)) => {
                        send.push(out(Out::RequestTrailers(TrailersResponse::default())));
                    }
                    Some(In::ResponseHeaders(_)) => {
                        send.push(out(Out::ResponseHeaders(HeadersResponse::default())));
                    }
                    Some(In::ResponseBody(b)) => {
                        send.push(out(Out::ResponseBody(streamed(b.body, b.end_of_stream))));
                    }
                    Some(In::ResponseTrailers(_)) => {
                        send.push(out(Out::ResponseTrailers(TrailersResponse::default())));
                    }
                    _ => {}
                }
                for m in send {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves the floor processor with TLS on 127.0.0.1:`port` until killed.
pub fn serve(spec: &str) -> ! {
    let (port, destination) = spec
        .split_once(',')
        .expect("EPP_BENCH_FLOOR=<port>,<destination>");
    let port: u16 = port.parse().expect("port");
    let floor = Floor {
        destination: destination.into(),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let _ = rustls::crypto::ring::default_provider().install_default();
        use endpoint_picker::protocol::tls;
        let pair = tls::self_signed().expect("certificate");
        let store = Arc::new(tls::CertStore::new(
            tls::certified_key(&pair, std::path::Path::new("generated")).expect("certificate"),
        ));
        let acceptor = tls::acceptor(store).expect("tls");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        tonic::transport::Server::builder()
            .add_service(
                ExternalProcessorServer::new(floor)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            )
            .serve_with_incoming(tls::incoming(listener, acceptor))
            .await
            .expect("serve");
    });
    std::process::exit(0)
}
