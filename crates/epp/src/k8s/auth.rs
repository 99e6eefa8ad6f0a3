//! Metrics-port authentication and authorization through the Kubernetes API, as the
//! reference's metrics server: the bearer token is checked with a TokenReview, then the user
//! is asked about with a SubjectAccessReview for the non-resource URL and verb `get`.
//! Unauthenticated requests get 401, forbidden ones 403.
//!
//! Decisions are cached for a short time per (token, path), so a Prometheus scraping every few
//! seconds costs the API server two reviews per cache period, not per scrape.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::observability::admin::{AuthDecision, MetricsAuth};

const TTL: Duration = Duration::from_secs(10);
const MAX_ENTRIES: usize = 1024;

/// TokenReview + SubjectAccessReview authorizer.
pub struct KubeAuth {
    client: Client,
    cache: Mutex<HashMap<(u64, String), (AuthDecision, Instant)>>,
}

impl std::fmt::Debug for KubeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuth").finish_non_exhaustive()
    }
}

impl KubeAuth {
    /// An authorizer asking `client`'s API server.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn review(&self, token: &str, path: &str) -> AuthDecision {
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let status = match reviews.create(&PostParams::default(), &review).await {
            Ok(r) => r.status.unwrap_or_default(),
            Err(e) => return AuthDecision::Error(format!("TokenReview failed: {e}")),
        };
        if status.authenticated != Some(true) {
            return AuthDecision::Unauthenticated;
        }
        let user = status.user.unwrap_or_default();
        let sars: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_owned()),
                    verb: Some("get".to_owned()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        match sars.create(&PostParams::default(), &sar).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => AuthDecision::Allowed,
            Ok(_) => AuthDecision::Forbidden,
            Err(e) => AuthDecision::Error(format!("SubjectAccessReview failed: {e}")),
        }
    }
}

impl MetricsAuth for KubeAuth {
    fn check<'a>(
        &'a self,
        token: Option<&'a str>,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = AuthDecision> + Send + 'a>> {
        Box::pin(async move {
            let Some(token) = token.filter(|t| !t.is_empty()) else {
                return AuthDecision::Unauthenticated;
            };
            let key = (xxhash_rust::xxh64::xxh64(token.as_bytes(), 0), path.to_owned());
            if let Some((decision, at)) = self.cache.lock().get(&key)
                && at.elapsed() < TTL
            {
                return decision.clone();
            }
            let decision = self.review(token, path).await;
            if !matches!(decision, AuthDecision::Error(_)) {
                let mut cache = self.cache.lock();
                if cache.len() >= MAX_ENTRIES {
                    cache.clear();
                }
                cache.insert(key, (decision.clone(), Instant::now()));
            }
            decision
        })
    }
}
