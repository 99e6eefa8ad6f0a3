//! Bounds on label values that clients choose. A request's `model` (and its rewrite header)
//! comes from the client: keyed by it as is, a client sending random model names would grow
//! the metrics page, and the EPP's memory, without bound.
//!
//! Rule: the first [`BoundedLabel::cap`] distinct values (`--max-model-label-values`, 100 by
//! default) keep their own series, in order of first use, for the life of the process; every
//! later value is reported as [`OVERFLOW`] and counted in
//! `inference_extension_metric_label_overflow_total{label}`. The empty value (a header-only
//! request) is always kept. Reads are lock-free (an immutable set behind an `ArcSwap`); the
//! lock is taken only to admit a value, at most `cap` times.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;

/// The value reported for values beyond the cap.
pub const OVERFLOW: &str = "other";

/// One bounded label.
#[derive(Debug)]
pub struct BoundedLabel {
    admitted: ArcSwap<HashSet<Arc<str>>>,
    cap: usize,
    admit: Mutex<()>,
    overflowed: Counter,
}

impl BoundedLabel {
    /// A label keeping at most `cap` distinct values; `overflowed` counts values reported as
    /// [`OVERFLOW`].
    pub fn new(cap: usize, overflowed: Counter) -> Self {
        Self {
            admitted: ArcSwap::from_pointee(HashSet::new()),
            cap,
            admit: Mutex::new(()),
            overflowed,
        }
    }

    /// How many distinct values keep their own series.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The value to report for `value`: itself when admitted (or admissible), else
    /// [`OVERFLOW`] (the caller counts the request once with [`Self::count_overflow`]).
    pub fn value(&self, value: &str) -> String {
        if value.is_empty() || self.admitted.load().contains(value) {
            return value.to_owned();
        }
        if self.admitted.load().len() < self.cap {
            let _admitting = self.admit.lock();
            let current = self.admitted.load();
            if current.contains(value) {
                return value.to_owned();
            }
            if current.len() < self.cap {
                let mut next = HashSet::clone(&current);
                next.insert(Arc::from(value));
                self.admitted.store(Arc::new(next));
                return value.to_owned();
            }
        }
        OVERFLOW.to_owned()
    }

    /// The value to report for `value` without admitting it: itself when admitted, else
    /// [`OVERFLOW`].
    pub fn known(&self, value: &str) -> String {
        if self.is_admitted(value) {
            value.to_owned()
        } else {
            OVERFLOW.to_owned()
        }
    }

    /// The admitted values.
    pub fn values(&self) -> Vec<String> {
        self.admitted.load().iter().map(|v| v.to_string()).collect()
    }

    /// Counts one request reported under [`OVERFLOW`].
    pub fn count_overflow(&self) {
        self.overflowed.inc();
    }

    /// Whether `value` keeps its own series.
    pub fn is_admitted(&self, value: &str) -> bool {
        value.is_empty() || self.admitted.load().contains(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_beyond_the_cap_share_one_series() {
        let overflowed = Counter::default();
        let l = BoundedLabel::new(2, overflowed.clone());
        assert_eq!(l.value("a"), "a");
        assert_eq!(l.value("b"), "b");
        assert_eq!(l.value("a"), "a");
        assert_eq!(l.value("c"), OVERFLOW);
        assert_eq!(l.value("d"), OVERFLOW);
        assert_eq!(l.value(""), "");
        l.count_overflow();
        assert_eq!(overflowed.get(), 1);
        assert!(l.is_admitted("b") && !l.is_admitted("c"));
        assert_eq!(
            (l.known("a"), l.known("zz")),
            ("a".to_owned(), OVERFLOW.to_owned())
        );
        let mut v = l.values();
        v.sort();
        assert_eq!(v, ["a", "b"]);
    }

    #[test]
    fn concurrent_admission_never_exceeds_the_cap() {
        let l = Arc::new(BoundedLabel::new(10, Counter::default()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        l.value(&format!("m-{t}-{i}"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.admitted.load().len(), 10);
    }
}
