//! Envoy ext_proc: `envoy.service.ext_proc.v3.ExternalProcessor/Process`.
//!
//! Each gRPC stream is one HTTP request/response. The response stream is driven directly by
//! the inbound stream (no task per stream): when tonic stops polling it (the gateway went
//! away, or the server shuts down) the state is dropped and the request is reported. An
//! RST_STREAM from Envoy after the response is the normal end of a stream, not an error.

pub mod budget;
mod error;
mod observer;
mod stream;
pub mod tls;
mod usage;
pub mod wire;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures_util::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use error::{ErrorAnswer, StreamError};
pub use observer::{NoopObserver, RequestObserver, RequestRecord};
pub use stream::{ExtProcStream, Step};
pub use usage::{MAX_TOKENS, Usage, UsageParser, usage_of};

use self::budget::BodyBudget;
use crate::framework::requestcontrol::{DispatchError, Wait};
use crate::requestcontrol::Director;

/// gRPC service name of ext_proc (also a health-check service name).
pub const SERVICE_NAME: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// Extra room over the body limit for one gRPC message (headers, framing).
const MESSAGE_OVERHEAD: usize = 1 << 20;

/// The ext_proc service.
#[derive(Clone)]
pub struct ExtProcService {
    director: Arc<Director>,
    observer: Arc<dyn RequestObserver>,
    shutdown: CancellationToken,
    budget: Arc<BodyBudget>,
}

impl std::fmt::Debug for ExtProcService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtProcService").finish_non_exhaustive()
    }
}

impl ExtProcService {
    /// A service routing with `director` and reporting to `observer`, buffering bodies
    /// within the director's `body_budget_bytes` ([`budget`]).
    pub fn new(director: Arc<Director>, observer: Arc<dyn RequestObserver>) -> Self {
        let budget = BodyBudget::new(director.config().body_budget_bytes);
        Self {
            director,
            observer,
            shutdown: CancellationToken::new(),
            budget,
        }
    }

    /// The body budget shared by this service's streams.
    pub fn budget(&self) -> &Arc<BodyBudget> {
        &self.budget
    }

    /// Ends dispatch waits with [`DispatchError::Shutdown`] (503) once `token` fires, so that a
    /// request waiting in a dispatcher does not hold the server's drain open.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// The tonic server for this service, accepting messages as large as the body limit (a
    /// BUFFERED body arrives in one message).
    pub fn into_server(self) -> ExternalProcessorServer<Self> {
        let max = self
            .director
            .config()
            .max_body_bytes
            .saturating_add(MESSAGE_OVERHEAD);
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }
}

/// Whether a stream error is Envoy's usual reset at the end of a request.
fn is_normal_end(status: &Status) -> bool {
    if matches!(status.code(), tonic::Code::Cancelled) {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_reset() || h2.is_go_away() || h2.is_remote();
        }
        source = err.source();
    }
    false
}

struct Driver {
    inbound: Streaming<ProcessingRequest>,
    stream: ExtProcStream,
    queue: VecDeque<ProcessingResponse>,
    batch: Vec<ProcessingResponse>,
    end: Option<Result<(), Status>>,
    done: bool,
    /// A request waiting for dispatch.
    waiting: Option<Wait>,
    /// Messages Envoy sent while the request waited, handled once it goes on.
    deferred: VecDeque<ProcessingRequest>,
    /// Fires when the EPP stops; a waiting request is then answered 503.
    shutdown: CancellationToken,
}

impl Driver {
    fn apply(&mut self, step: Step) {
        self.queue.extend(self.batch.drain(..));
        match step {
            Step::Continue => {}
            Step::Close => self.end = Some(Ok(())),
            Step::Fail(status) => self.end = Some(Err(status)),
            Step::Wait(wait) => self.waiting = Some(wait),
        }
    }

    /// The next message from Envoy: a deferred one first. `None` when the stream is over.
    async fn next_message(&mut self) -> Option<ProcessingRequest> {
        if let Some(msg) = self.deferred.pop_front() {
            return Some(msg);
        }
        match self.inbound.message().await {
            Ok(Some(msg)) => Some(msg),
            Ok(None) => None,
            Err(status) => {
                if is_normal_end(&status) {
                    tracing::trace!(%status, "ext_proc stream reset by the gateway");
                } else {
                    tracing::warn!(%status, "ext_proc stream failed");
                }
                None
            }
        }
    }

    /// Awaits a dispatch wait, keeping what Envoy sends meanwhile. `None` when the gateway
    /// went away first: the wait is dropped, which withdraws the request. On shutdown the wait
    /// is dropped too and the request ends with [`DispatchError::Shutdown`].
    async fn await_dispatch(&mut self, mut wait: Wait) -> Option<Result<(), DispatchError>> {
        loop {
            tokio::select! {
                outcome = &mut wait => return Some(outcome),
                () = self.shutdown.cancelled() => {
                    tracing::debug!("shutting down while the request waited for dispatch");
                    return Some(Err(DispatchError::Shutdown));
                }
                msg = self.inbound.message() => match msg {
                    Ok(Some(msg)) => self.deferred.push_back(msg),
                    Ok(None) | Err(_) => {
                        tracing::debug!("gateway went away while the request waited for dispatch");
                        return None;
                    }
                },
            }
        }
    }
}

/// Response stream type of [`ExtProcService`].
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let driver = Driver {
            inbound: request.into_inner(),
            stream: ExtProcStream::new(self.director.clone(), self.observer.clone(), self.budget.clone()),
            queue: VecDeque::new(),
            batch: Vec::new(),
            end: None,
            done: false,
            waiting: None,
            deferred: VecDeque::new(),
            shutdown: self.shutdown.clone(),
        };
        let out = futures_util::stream::unfold(driver, |mut d| async move {
            loop {
                if let Some(msg) = d.queue.pop_front() {
                    return Some((Ok(msg), d));
                }
                if d.done {
                    return None;
                }
                match d.end.take() {
                    Some(Ok(())) => return None,
                    Some(Err(status)) => {
                        d.done = true;
                        return Some((Err(status), d));
                    }
                    None => {}
                }
                if let Some(wait) = d.waiting.take() {
                    let outcome = d.await_dispatch(wait).await?;
                    let step = d.stream.resume(outcome, &mut d.batch);
                    d.apply(step);
                    continue;
                }
                let msg = d.next_message().await?;
                let step = d.stream.handle(msg, &mut d.batch);
                d.apply(step);
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves ext_proc over plaintext HTTP/2 (h2c) on `listener` until `shutdown` resolves, then
/// drains open streams.
pub async fn serve_plaintext(
    listener: tokio::net::TcpListener,
    service: ExtProcService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
}

/// Accepted connections with Nagle's algorithm off. ext_proc answers are small writes that
/// must leave at once: with Nagle on, a body answer can wait for the peer's delayed ACK
/// (40 ms on Linux), which showed as a 40 ms floor on 220 KB requests.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use futures_util::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    })
}
