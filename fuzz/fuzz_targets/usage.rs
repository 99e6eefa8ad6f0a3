//! The response-usage parser on arbitrary bodies, JSON and SSE, in arbitrary chunkings:
//! never panics, keeps no more than its bound, and takes only sane counts.
#![no_main]

use endpoint_picker::protocol::{MAX_TOKENS, UsageParser, usage_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, body)) = data.split_first() else {
        return;
    };
    let sse = shape & 1 == 1;
    let chunk = usize::from(shape >> 1).max(1);
    let mut p = UsageParser::new(sse);
    for c in body.chunks(chunk) {
        p.feed(c);
    }
    let whole = usage_of(body);
    for u in [p.finish(), whole].into_iter().flatten() {
        for n in [
            u.prompt_tokens,
            u.completion_tokens,
            u.total_tokens,
            u.cached_tokens,
        ]
        .into_iter()
        .flatten()
        {
            assert!(n <= MAX_TOKENS, "{n}");
        }
    }
});
