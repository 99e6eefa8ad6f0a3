//! Data contracts between producers and consumers: the types behind the [`DataKey`]s that
//! plugins share. A producer and its consumers agree on the type; the key's producer name
//! says whose data it is.
//!
//! [`DataKey`]: super::data::DataKey

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// One request's prefix-cache match on each candidate, stored in the cycle state by a prefix
/// producer (the reference's `PrefixCacheMatchInfo`, per candidate instead of per endpoint
/// clone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Blocks of the request's prefix input.
    pub total_blocks: usize,
    /// Tokens per block (as the producer counts them).
    pub block_tokens: usize,
    /// Bytes of prefix input per block.
    pub block_bytes: usize,
    /// Leading blocks held, by candidate index (see `Candidate::index`).
    pub matched: Vec<u32>,
    /// The request's chained block hashes (what the producer records after the decision).
    pub hashes: Vec<u64>,
}

impl PrefixMatch {
    /// Leading blocks candidate `index` holds (0 when unknown).
    pub fn matched(&self, index: usize) -> usize {
        self.matched.get(index).map_or(0, |m| *m as usize)
    }
}

/// A request's prompt as the model server will tokenize it, stored in the cycle state by a
/// token producer (llm-d-router v0.10's `TokenizedPrompt`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Token ids, one list per prompt (a completions request may carry several).
    pub prompts: Vec<Vec<u32>>,
    /// The prompt holds media whose placeholders were not expanded (a local tokenizer has no
    /// model processor): its ids are not the engine's, and precise matching must not trust
    /// them.
    pub has_media: bool,
    /// Media items with their placeholder positions and the engine's identifiers (from a
    /// render backend), by offset.
    pub media: Vec<MediaSpan>,
}

/// A multimodal item's placeholder tokens in a prompt, with the engine's identifier for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSpan {
    /// The item's hash as the engine names it (vLLM's `mm_hash`).
    pub identifier: String,
    /// First placeholder token.
    pub offset: usize,
    /// Placeholder tokens.
    pub length: usize,
}

/// The output tokens an in-flight producer estimates for the request and counts against its
/// endpoint (llm-d-router v0.10 adds them to the request's uncached tokens), stored in the
/// cycle state by a producer that estimates output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EstimatedOutput {
    /// Estimated generated tokens.
    pub tokens: u64,
}

/// Live load counters of one endpoint as this EPP routes to it, shared by every snapshot the
/// endpoint is in. Updated on the request path with relaxed atomic adds only.
#[derive(Debug, Default)]
pub struct LoadCounters {
    requests: AtomicI64,
    tokens: AtomicI64,
    sent: AtomicU64,
    done: AtomicU64,
}

impl LoadCounters {
    /// Counts a request of about `tokens` tokens routed to the endpoint until the returned
    /// guard drops (its response completed or its stream ended); see [`InFlightGuard::releasing`]
    /// for an earlier release.
    pub fn start(self: &Arc<Self>, tokens: u64) -> InFlightGuard {
        let signed = i64::try_from(tokens).unwrap_or(i64::MAX);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(signed, Ordering::Relaxed);
        self.sent.fetch_add(tokens, Ordering::Relaxed);
        InFlightGuard {
            counters: self.clone(),
            tokens,
            release: Release::AtEnd,
            tokens_out: false,
            request_out: false,
        }
    }

    /// Requests in flight now.
    pub fn requests(&self) -> i64 {
        self.requests.load(Ordering::Relaxed).max(0)
    }

    /// Tokens of requests in flight now.
    pub fn tokens(&self) -> i64 {
        self.tokens.load(Ordering::Relaxed).max(0)
    }

    /// Tokens routed so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Tokens of finished requests so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// When an [`InFlightGuard`] lets go of its share before it drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Everything when the guard drops (the response completed or the stream ended).
    AtEnd,
    /// The tokens at the response's first body chunk (the server has prefilled the prompt),
    /// the request when the guard drops: llm-d-router v0.10's in-flight producer without
    /// output estimation.
    TokensAtStart,
    /// Everything at the response's first body chunk: a prefill endpoint's part is done then.
    AllAtStart,
}

/// One request's share of an endpoint's load; released when dropped, or earlier as its
/// [`Release`] says.
#[derive(Debug)]
pub struct InFlightGuard {
    counters: Arc<LoadCounters>,
    tokens: u64,
    release: Release,
    tokens_out: bool,
    request_out: bool,
}

impl InFlightGuard {
    /// The same guard, letting go as `release` says.
    pub fn releasing(mut self, release: Release) -> Self {
        self.release = release;
        self
    }

    fn release_tokens(&mut self) {
        if !std::mem::replace(&mut self.tokens_out, true) {
            self.counters
                .tokens
                .fetch_sub(i64::try_from(self.tokens).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
    }

    fn release_request(&mut self) {
        if !std::mem::replace(&mut self.request_out, true) {
            // Finished before the request count falls: a concurrent reader that sees the
            // request gone also sees it done.
            self.counters.done.fetch_add(self.tokens, Ordering::Relaxed);
            self.counters.requests.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl crate::framework::requestcontrol::Hold for InFlightGuard {
    fn response_started(&mut self) {
        match self.release {
            Release::AtEnd => {}
            Release::TokensAtStart => self.release_tokens(),
            Release::AllAtStart => {
                self.release_request();
                self.release_tokens();
            }
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.release_request();
        self.release_tokens();
    }
}

/// An endpoint's in-flight load attribute: the live counters, and their totals at the moment
/// the endpoint's latest model-server figures were published (the in-flight producer restamps
/// it in the same publication). The difference is what the server has been sent and has
/// finished since it reported its load: scrapes are 50 ms apart, and without the correction
/// every request of a burst sees the same figures and goes to the same server.
#[derive(Debug, Clone, Default)]
pub struct InFlightLoad {
    /// The live counters.
    pub counters: Arc<LoadCounters>,
    /// Tokens sent when the figures were published.
    pub sent_at_scrape: u64,
    /// Tokens finished when the figures were published.
    pub done_at_scrape: u64,
}

impl InFlightLoad {
    /// Fresh counters, nothing stamped.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same counters stamped with their totals now. Finished is read first: a request
    /// that ends between the two loads counts as still running.
    pub fn stamped(&self) -> Self {
        let done = self.counters.done();
        let sent = self.counters.sent();
        Self {
            counters: self.counters.clone(),
            sent_at_scrape: sent,
            done_at_scrape: done,
        }
    }

    /// Requests in flight now.
    pub fn requests(&self) -> i64 {
        self.counters.requests()
    }

    /// Tokens in flight now.
    pub fn tokens(&self) -> i64 {
        self.counters.tokens()
    }

    /// The change in the endpoint's load, in tokens, since its figures were published: sent
    /// since, minus finished since. Negative when more finished than arrived.
    pub fn tokens_since_scrape(&self) -> i64 {
        let sent = self.counters.sent().saturating_sub(self.sent_at_scrape);
        let done = self.counters.done().saturating_sub(self.done_at_scrape);
        i64::try_from(sent).unwrap_or(i64::MAX) - i64::try_from(done).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_guards_and_stamps() {
        let load = InFlightLoad::new();
        let a = load.counters.start(300);
        let b = load.counters.start(200);
        assert_eq!((load.requests(), load.tokens()), (2, 500));
        assert_eq!(load.tokens_since_scrape(), 500);
        drop(b);
        assert_eq!(load.tokens_since_scrape(), 300);
        // A scrape published now has seen the one still running.
        let stamped = load.stamped();
        assert_eq!(stamped.tokens_since_scrape(), 0);
        // It finishes after the scrape: the scraped load overstates by that much.
        drop(a);
        assert_eq!(stamped.tokens_since_scrape(), -300);
        assert_eq!((stamped.requests(), stamped.tokens()), (0, 0));
    }

    #[test]
    fn guards_let_go_early_as_asked() {
        use crate::framework::requestcontrol::Hold;
        let load = InFlightLoad::new();
        let mut end = load.counters.start(100);
        let mut tokens = load.counters.start(10).releasing(Release::TokensAtStart);
        let mut all = load.counters.start(1).releasing(Release::AllAtStart);
        assert_eq!((load.requests(), load.tokens()), (3, 111));
        for g in [&mut end, &mut tokens, &mut all] {
            g.response_started();
            g.response_started();
        }
        assert_eq!((load.requests(), load.tokens()), (2, 100));
        assert_eq!(load.tokens_since_scrape(), 110);
        drop(tokens);
        assert_eq!((load.requests(), load.tokens()), (1, 100));
        drop((end, all));
        assert_eq!(
            (load.requests(), load.tokens(), load.tokens_since_scrape()),
            (0, 0, 0)
        );
    }
}
