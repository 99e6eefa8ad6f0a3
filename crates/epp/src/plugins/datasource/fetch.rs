//! Fetching a `/metrics` page, as cheaply as the scrape rate demands.
//!
//! At the reference's default of 50 ms, 100 endpoints mean 2,000 requests a second. Over plain
//! HTTP each scraper keeps one HTTP/1.1 connection of its own (hyper's connection API, a
//! request URI built once): no pool lookups, no URL re-parsing, no shared state between
//! scrapers. That cut the EPP's CPU for 100 endpoints by more than half against a pooled
//! general-purpose client. HTTPS scrapes, rare in practice, go through `reqwest`.

use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::framework::datalayer::{PollError, SourceError};

/// Largest `/metrics` page read.
pub const MAX_PAGE_BYTES: usize = 16 << 20;

type Connection = Pin<Box<http1::Connection<TokioIo<tokio::net::TcpStream>, Empty<Bytes>>>>;

/// A scraper's way to its endpoint's metrics page.
pub enum Fetcher {
    /// Plain HTTP on a kept-alive connection.
    Plain(PlainFetcher),
    /// HTTPS through a shared client.
    Tls {
        /// The client.
        client: reqwest::Client,
        /// The page's URL.
        url: reqwest::Url,
    },
}

/// One kept-alive HTTP/1.1 connection to one endpoint.
pub struct PlainFetcher {
    addr: SocketAddr,
    uri: http::Uri,
    host: http::HeaderValue,
    conn: Option<(http1::SendRequest<Empty<Bytes>>, Connection)>,
}

impl Fetcher {
    /// A fetcher for `url`; plain HTTP goes straight to `addr`.
    pub fn new(url: &reqwest::Url, addr: SocketAddr, client: &reqwest::Client) -> Result<Self, SourceError> {
        if url.scheme() != "http" {
            return Ok(Self::Tls {
                client: client.clone(),
                url: url.clone(),
            });
        }
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let uri: http::Uri = path.parse().map_err(|_| SourceError::Host(path.clone()))?;
        let host_text = format!("{}:{}", url.host_str().unwrap_or(""), addr.port());
        let host = http::HeaderValue::from_str(&host_text).map_err(|_| SourceError::Host(host_text))?;
        Ok(Self::Plain(PlainFetcher {
            addr,
            uri,
            host,
            conn: None,
        }))
    }

    /// Fetches the page once.
    pub async fn fetch(&mut self) -> Result<Bytes, PollError> {
        match self {
            Self::Plain(p) => p.fetch().await,
            Self::Tls { client, url } => {
                let resp = client.get(url.clone()).send().await.map_err(PollError::Https)?;
                if !resp.status().is_success() {
                    return Err(PollError::Status(resp.status()));
                }
                if resp.content_length().is_some_and(|n| n > MAX_PAGE_BYTES as u64) {
                    return Err(PollError::TooLarge(MAX_PAGE_BYTES));
                }
                let page = resp.bytes().await.map_err(PollError::Https)?;
                if page.len() > MAX_PAGE_BYTES {
                    return Err(PollError::TooLarge(MAX_PAGE_BYTES));
                }
                Ok(page)
            }
        }
    }
}

impl PlainFetcher {
    async fn connect(&self) -> Result<(http1::SendRequest<Empty<Bytes>>, Connection), PollError> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(PollError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(PollError::Http)?;
        Ok((sender, Box::pin(conn)))
    }

    async fn fetch(&mut self) -> Result<Bytes, PollError> {
        let (mut sender, mut conn) = match self.conn.take() {
            Some(c) => c,
            None => self.connect().await?,
        };
        let request = http::Request::get(self.uri.clone())
            .header(http::header::HOST, self.host.clone())
            .body(Empty::<Bytes>::new())
            .map_err(PollError::Request)?;
        let exchange = async {
            sender.ready().await.map_err(PollError::Http)?;
            let resp = sender.send_request(request).await.map_err(PollError::Http)?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_PAGE_BYTES)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(h) => PollError::Http(*h),
                    Err(_) => PollError::TooLarge(MAX_PAGE_BYTES),
                })?
                .to_bytes();
            if !status.is_success() {
                return Err(PollError::Status(status));
            }
            Ok(body)
        };
        // The connection is driven only while a request is in flight.
        let result = tokio::select! {
            r = exchange => r,
            r = &mut conn => Err(match r {
                Ok(()) => PollError::Closed,
                Err(e) => PollError::Http(e),
            }),
        };
        if result.is_ok() && !sender.is_closed() {
            self.conn = Some((sender, conn));
        }
        result
    }
}
