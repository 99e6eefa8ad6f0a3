//! The protocol floor: an ext_proc processor that does nothing but what the full-duplex protocol
//! forces on any picker. It holds the request headers until the body has arrived, answers with
//! a fixed destination, and echoes every body chunk back; response headers, body chunks and
//! trailers are answered as they come. No parsing, no scheduling, no metrics. It runs in its
//! own process, with the same TLS, gRPC stack and socket options as the EPP, so the difference
//! between the two is what the EPP's own work costs.

use std::sync::Arc;

use endpoint_picker::protocol::wire;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
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

impl Floor {
    /// The routing answer, built with the EPP's own wire helpers.
    fn headers_answer(&self, body_len: usize) -> ProcessingResponse {
        wire::request_headers(
            wire::routing_common(vec![
                wire::set_header("x-gateway-destination-endpoint", self.destination.as_bytes()),
                wire::set_header("content-length", body_len.to_string().as_bytes()),
            ]),
            None,
        )
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
                        send.push(this.headers_answer(0));
                    }
                    Some(In::RequestBody(b)) => {
                        let end = b.end_of_stream;
                        held.push(b.body);
                        if end && !answered {
                            answered = true;
                            let len = held.iter().map(Vec::len).sum();
                            send.push(this.headers_answer(len));
                            let n = held.len();
                            for (i, chunk) in held.drain(..).enumerate() {
                                send.push(wire::request_body_chunk(chunk, i + 1 == n));
                            }
                        }
                    }
                    Some(In::RequestTrailers(_)) => {
                        send.push(wire::trailers(true));
                    }
                    Some(In::ResponseHeaders(_)) => {
                        send.push(wire::response_headers_continue());
                    }
                    Some(In::ResponseBody(b)) => {
                        send.push(wire::response_body_chunk(b.body, b.end_of_stream));
                    }
                    Some(In::ResponseTrailers(_)) => {
                        send.push(wire::trailers(false));
                    }
                    _ => {}
                }
                for m in send {
                    if tx.send(Ok(m)).await.is_err() {
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
