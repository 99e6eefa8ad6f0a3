//! The metrics port: `/metrics` (OpenMetrics text), `/healthz` (the process answers) and
//! `/readyz` (the same readiness as gRPC health). `/metrics` can require a bearer token checked
//! by a [`MetricsAuth`] (the Kubernetes TokenReview/SubjectAccessReview one in production).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

use super::health::HealthState;
use super::metrics::EppMetrics;

/// The outcome of checking a metrics request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    /// Go ahead.
    Allowed,
    /// No or an invalid token: 401.
    Unauthenticated,
    /// A valid token without permission: 403.
    Forbidden,
    /// The check itself failed: 500.
    Error(String),
}

/// Checks `Authorization: Bearer` tokens for the metrics port.
pub trait MetricsAuth: Send + Sync {
    /// The decision for `token` (absent when the request had none) on `path`.
    fn check<'a>(
        &'a self,
        token: Option<&'a str>,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = AuthDecision> + Send + 'a>>;
}

/// What the admin routes read.
#[derive(Clone)]
pub struct AdminState {
    /// The metric families.
    pub metrics: Arc<EppMetrics>,
    /// Readiness.
    pub health: watch::Receiver<HealthState>,
    /// Token checks for `/metrics`; `None` serves everyone.
    pub auth: Option<Arc<dyn MetricsAuth>>,
}

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let Some(auth) = &state.auth else {
        return next.run(request).await;
    };
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match auth.check(token, request.uri().path()).await {
        AuthDecision::Allowed => next.run(request).await,
        AuthDecision::Unauthenticated => (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response(),
        AuthDecision::Forbidden => (StatusCode::FORBIDDEN, "Forbidden\n").into_response(),
        AuthDecision::Error(e) => {
            tracing::warn!(error = %e, "metrics authorization failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "authorization failed\n").into_response()
        }
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.health.borrow().ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(protected)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
