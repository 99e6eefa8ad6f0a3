//! Data-layer extension points: where per-endpoint data comes from (the reference's
//! `framework/interface/datalayer`: `DataSource`, `PollingDataSource`, `Extractor`).
//!
//! A source fetches or receives raw data for endpoints; its extractors turn the data into
//! typed attributes. Two kinds of source:
//! * [`PollingSource`]: asked at an interval, one [`Poller`] per endpoint (the Prometheus
//!   scraper, `metrics-data-source`);
//! * [`SubscribingSource`]: runs on its own and publishes as data arrives (a stream such as
//!   vLLM's KV-cache events).
//!
//! Every writer declares the attribute keys it writes, and the configuration is refused when
//! two writers claim one key, so sources never clobber each other. The collector
//! (`crate::datalayer::collector`) owns the tasks: polling loops per endpoint, subscriptions,
//! and one publisher that batches writes into snapshots.

use std::any::{Any, TypeId};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::data::{Attributes, KeyId};
use crate::datalayer::{Endpoint, EndpointStore, Writes};

/// What one poll returns, handed to the source's extractors.
pub type Payload = Box<dyn Any + Send>;

/// A poll in progress.
pub type PollFuture<'a> = Pin<Box<dyn Future<Output = Result<Payload, PollError>> + Send + 'a>>;

/// Why one poll failed. The endpoint's attributes keep their age: stale, never zeroed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// No connection.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// HTTP protocol failure.
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    /// HTTPS client failure (TLS, connection, protocol).
    #[error("HTTPS: {0}")]
    Https(#[source] reqwest::Error),
    /// The server answered with a non-success status.
    #[error("HTTP status {0}")]
    Status(http::StatusCode),
    /// The answer exceeded the size limit.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    /// The server closed the connection mid-answer.
    #[error("connection closed by the server")]
    Closed,
    /// The request could not be built.
    #[error("invalid request: {0}")]
    Request(#[source] http::Error),
}

/// Why a source or poller could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The target URL is invalid.
    #[error("invalid URL '{url}': {source}")]
    Url {
        /// The URL text.
        url: String,
        /// Cause.
        #[source]
        source: url::ParseError,
    },
    /// A header value could not be formed.
    #[error("invalid host header '{0}'")]
    Host(String),
    /// The HTTPS client could not be built.
    #[error("cannot build the HTTPS client: {0}")]
    Client(#[source] reqwest::Error),
    /// A file the source needs could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A subscription failed and cannot go on.
    #[error("{0}")]
    Failed(String),
}

/// Fetches data for one endpoint; keeps whatever it needs between polls (a connection).
pub trait Poller: Send {
    /// One poll.
    fn poll(&mut self) -> PollFuture<'_>;
    /// What is polled, for logs (a URL).
    fn target(&self) -> String;
}

/// A source asked at an interval, per endpoint.
pub trait PollingSource: Send + Sync {
    /// The type `poll` returns, checked against each extractor's input at start-up.
    fn output(&self) -> TypeId;
    /// Time between polls of one endpoint; `None` uses `--refresh-metrics-interval`.
    fn interval(&self) -> Option<Duration>;
    /// Limit on one poll.
    fn timeout(&self) -> Duration;
    /// A poller for `endpoint`. `hints` are what the extractors want from it (metric names):
    /// a source that can ask for less may use them.
    fn poller(&self, endpoint: &Endpoint, hints: &[String]) -> Result<Box<dyn Poller>, SourceError>;
}

/// Why an extractor found nothing to write. Like a failed poll, it leaves attributes aging.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// The payload is not what the extractor reads.
    #[error("payload is not {0}")]
    WrongInput(&'static str),
    /// The payload is not UTF-8 text.
    #[error("payload is not UTF-8")]
    NotUtf8,
    /// None of the configured series was in the payload.
    #[error("no {0} metric found on the page")]
    NothingFound(String),
}

/// Turns a source's payload into attributes.
pub trait Extractor: Send + Sync {
    /// The payload type it reads (a source's [`PollingSource::output`]).
    fn input(&self) -> TypeId;
    /// The keys it writes.
    fn writes(&self) -> Vec<KeyId>;
    /// What it wants from `endpoint`'s source (metric names), see [`PollingSource::poller`].
    fn hints(&self, _endpoint: &Endpoint) -> Vec<String> {
        Vec::new()
    }
    /// The attributes found in `payload`. `previous` holds what this source's extractors last
    /// wrote for the endpoint (an extractor may keep a value the payload lacks).
    fn extract(
        &self,
        endpoint: &Endpoint,
        payload: &dyn Any,
        previous: &Attributes,
        now: Instant,
    ) -> Result<Writes, ExtractError>;
}

/// A running subscription's handle to the store.
#[derive(Clone)]
pub struct SubscriptionContext {
    /// The store: its current snapshot, and notifications when the endpoint set changes.
    pub store: Arc<EndpointStore>,
    /// Where to send writes; they are batched into snapshots with everyone else's.
    pub publisher: Publisher,
    /// Fires at shutdown.
    pub cancel: CancellationToken,
}

/// A clonable handle to the collector's publisher.
#[derive(Clone, Debug)]
pub struct Publisher {
    tx: mpsc::Sender<(Arc<Endpoint>, Writes)>,
    /// The keys this handle may write, and who writes (a subscribing source gets a handle
    /// limited to the keys it declared: the one-writer rule holds at run time too).
    only: Option<(Arc<[KeyId]>, Arc<str>)>,
    warned: Arc<AtomicBool>,
}

impl Publisher {
    /// A publisher sending to `tx`.
    pub fn new(tx: mpsc::Sender<(Arc<Endpoint>, Writes)>) -> Self {
        Self {
            tx,
            only: None,
            warned: Arc::default(),
        }
    }

    /// The same queue, dropping (and logging once) writes of keys other than `keys` that
    /// `writer` did not declare.
    pub fn only(&self, keys: Vec<KeyId>, writer: &str) -> Self {
        Self {
            tx: self.tx.clone(),
            only: Some((keys.into(), writer.into())),
            warned: Arc::default(),
        }
    }

    /// Queues writes for `endpoint`; waits while the queue is full (it is bounded, so a
    /// stalled store slows writers down instead of growing). `false` once the collector has
    /// stopped.
    pub async fn publish(&self, endpoint: Arc<Endpoint>, mut writes: Writes) -> bool {
        if let Some((keys, writer)) = &self.only {
            keep_declared(&mut writes, keys, writer, &self.warned);
        }
        self.tx.send((endpoint, writes)).await.is_ok()
    }
}

/// Drops from `writes` the keys `writer` did not declare, warning the first time.
pub fn keep_declared(writes: &mut Writes, declared: &[KeyId], writer: &str, warned: &AtomicBool) {
    let before = writes.len();
    writes.retain(|(k, _)| declared.contains(k));
    if writes.len() != before && !warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            writer,
            "a data plugin wrote attributes it did not declare; they are dropped"
        );
    }
}

/// A source that runs on its own and publishes as data arrives.
pub trait SubscribingSource: Send + Sync {
    /// The keys it writes.
    fn writes(&self) -> Vec<KeyId>;
    /// Runs until `ctx.cancel` fires; an error stops the EPP (it is an essential task).
    fn run(
        self: Arc<Self>,
        ctx: SubscriptionContext,
    ) -> Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;
}

/// A plugin an `endpoint-notification-source` lists as its extractor: from then on it
/// follows the pool's endpoints itself (llm-d-router v0.10's endpoint extractors, which the
/// precise prefix producer uses to subscribe to each endpoint's KV events).
pub trait EndpointExtractor: Send + Sync {
    /// Wires it to the notifications; `Err(why)` when its own configuration would leave the
    /// wiring idle (a producer with `discoverPods: false`).
    fn attach(&self) -> Result<(), String>;

    /// Why the plugin would be idle as wired, if it would: checked once the data layer is
    /// settled (a precise producer that receives events from nowhere).
    fn idle(&self) -> Option<String>;
}
