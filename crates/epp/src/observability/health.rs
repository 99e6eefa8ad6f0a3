//! gRPC health (`grpc.health.v1.Health`) with the reference's answers.
//!
//! Without leader election every service name gets the same answer, so probes written for
//! the reference (service `inference-extension`) work unchanged: SERVING once the pool is
//! known and every endpoint has been scraped once, NOT_SERVING before. With leader election,
//! `liveness` is always SERVING; `readiness`, `""` and the ext_proc service name are SERVING
//! only on the leader; other names are SERVICE_UNKNOWN.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::protocol::SERVICE_NAME;

/// What health depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthState {
    /// Discovery delivered the pool.
    pub synced: bool,
    /// Every endpoint present at sync was scraped once.
    pub scraped: bool,
    /// Leader election is on.
    pub leader_election: bool,
    /// This replica leads (meaningful with leader election).
    pub leader: bool,
}

impl HealthState {
    /// Ready to take traffic.
    pub fn ready(&self) -> bool {
        self.synced && self.scraped && (!self.leader_election || self.leader)
    }

    /// The answer for `service`.
    pub fn status_for(&self, service: &str) -> ServingStatus {
        let serving = |b: bool| {
            if b {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        if !self.leader_election {
            return serving(self.ready());
        }
        match service {
            "liveness" => ServingStatus::Serving,
            "readiness" | "" => serving(self.ready()),
            s if s == SERVICE_NAME => serving(self.ready()),
            _ => ServingStatus::ServiceUnknown,
        }
    }
}

/// The health service, answering from a watched [`HealthState`].
#[derive(Debug, Clone)]
pub struct HealthService {
    state: watch::Receiver<HealthState>,
}

impl HealthService {
    /// A service reading `state`.
    pub fn new(state: watch::Receiver<HealthState>) -> Self {
        Self { state }
    }

    /// The tonic server.
    pub fn into_server(self) -> HealthServer<Self> {
        HealthServer::new(self)
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        Ok(Response::new(response(self.state.borrow().status_for(&service))))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let mut last: Option<ServingStatus> = None;
        let stream = WatchStream::new(self.state.clone()).filter_map(move |state| {
            let status = state.status_for(&service);
            let changed = last != Some(status);
            last = Some(status);
            async move { changed.then(|| Ok(response(status))) }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let mut s = HealthState::default();
        assert_eq!(s.status_for("inference-extension"), ServingStatus::NotServing);
        s.synced = true;
        assert_eq!(s.status_for("inference-extension"), ServingStatus::NotServing);
        s.scraped = true;
        assert_eq!(s.status_for("inference-extension"), ServingStatus::Serving);
        assert_eq!(s.status_for(""), ServingStatus::Serving);
        s.leader_election = true;
        assert_eq!(s.status_for("liveness"), ServingStatus::Serving);
        assert_eq!(s.status_for("readiness"), ServingStatus::NotServing);
        assert_eq!(s.status_for("inference-extension"), ServingStatus::ServiceUnknown);
        s.leader = true;
        assert_eq!(s.status_for(SERVICE_NAME), ServingStatus::Serving);
    }
}
