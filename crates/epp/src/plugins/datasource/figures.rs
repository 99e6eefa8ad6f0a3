//! Range checks and combination rules for scraped figures: a model server's page is input
//! from outside, and one build that reports `vllm:kv_cache_usage_perc -0.3875` must not make
//! the KV scorer prefer it.
//!
//! Checks (each failure is a [`Rejection`], counted and logged by the extractor):
//! - every value must be a number (`NaN` is refused) and finite (`±Inf` is refused);
//! - counts (queue, running, block counts) must be ≥ 0 and at most `u32::MAX` (`u64` for
//!   block counts); fractions are rounded to the nearest integer;
//! - utilisations must lie in `0..=1`; values up to [`FRACTION_SLACK`] above 1 (floating-point
//!   error of `1 - free/total`) are clamped to 1;
//! - tokens per block must lie in `1..=`[`MAX_BLOCK_SIZE`].
//!
//! Several series of one family that differ only in labels the spec does not select on (vLLM
//! writes one per engine with data parallelism, `engine="0"`, `engine="1"`) are combined, never
//! taken "whichever comes first": counts are summed (the server's total), utilisation is the
//! largest (a request may land on the fullest engine), LoRA state is the series with the
//! largest value (vLLM writes a timestamp there). When any series of a figure is refused, the
//! whole figure is: a count keeps its previous value, and utilisation is taken as 1 (full), so
//! a server whose figures cannot be trusted is never preferred for them.

/// How far above 1 a utilisation may be and still be read as 1.
pub const FRACTION_SLACK: f64 = 1e-6;

/// Largest tokens-per-block figure taken (vLLM allows up to 256; engines page up to 64 Ki).
pub const MAX_BLOCK_SIZE: f64 = 65_536.0;

/// Why a scraped value was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// `NaN`.
    NotANumber,
    /// `+Inf` or `-Inf`.
    Infinite,
    /// Below 0.
    Negative,
    /// A utilisation above 1.
    AboveOne,
    /// A count or size beyond its bound.
    TooLarge,
    /// Zero where only a positive size makes sense (tokens per block).
    Zero,
}

impl Rejection {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotANumber => "nan",
            Self::Infinite => "infinite",
            Self::Negative => "negative",
            Self::AboveOne => "above_one",
            Self::TooLarge => "too_large",
            Self::Zero => "zero",
        }
    }
}

fn finite_non_negative(v: f64) -> Result<f64, Rejection> {
    if v.is_nan() {
        Err(Rejection::NotANumber)
    } else if v.is_infinite() {
        Err(Rejection::Infinite)
    } else if v < 0.0 {
        Err(Rejection::Negative)
    } else {
        Ok(v)
    }
}

/// A count: finite, ≥ 0, ≤ `max`; rounded.
pub fn count(v: f64, max: f64) -> Result<f64, Rejection> {
    let v = finite_non_negative(v)?.round();
    if v > max { Err(Rejection::TooLarge) } else { Ok(v) }
}

/// A utilisation in `0..=1` (clamped within [`FRACTION_SLACK`] above 1).
pub fn fraction(v: f64) -> Result<f64, Rejection> {
    let v = finite_non_negative(v)?;
    if v > 1.0 + FRACTION_SLACK {
        Err(Rejection::AboveOne)
    } else {
        Ok(v.min(1.0))
    }
}

/// Tokens per block: a count in `1..=`[`MAX_BLOCK_SIZE`].
pub fn block_size(v: f64) -> Result<f64, Rejection> {
    let v = count(v, MAX_BLOCK_SIZE)?;
    if v == 0.0 { Err(Rejection::Zero) } else { Ok(v) }
}

/// How the series of one figure combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Counts: the sum.
    Sum,
    /// Utilisation: the largest.
    Max,
}

/// Checks every value with `check` and combines them; `Ok(None)` when there are none. The
/// first refusal refuses the figure, and every refused value is passed to `refused`.
pub fn combine(
    values: impl IntoIterator<Item = f64>,
    check: impl Fn(f64) -> Result<f64, Rejection>,
    how: Combine,
    mut refused: impl FnMut(f64, Rejection),
) -> Result<Option<f64>, Rejection> {
    let mut out: Option<f64> = None;
    let mut first_refusal = None;
    for v in values {
        match check(v) {
            Ok(v) => {
                out = Some(match (out, how) {
                    (None, _) => v,
                    (Some(a), Combine::Sum) => a + v,
                    (Some(a), Combine::Max) => a.max(v),
                });
            }
            Err(r) => {
                refused(v, r);
                first_refusal.get_or_insert(r);
            }
        }
    }
    match first_refusal {
        Some(r) => Err(r),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert_eq!(fraction(-0.3875), Err(Rejection::Negative));
        assert_eq!(fraction(f64::NAN), Err(Rejection::NotANumber));
        assert_eq!(fraction(f64::INFINITY), Err(Rejection::Infinite));
        assert_eq!(fraction(f64::NEG_INFINITY), Err(Rejection::Infinite));
        assert_eq!(fraction(1.5), Err(Rejection::AboveOne));
        assert_eq!(fraction(1.000_000_000_1), Ok(1.0));
        assert_eq!(fraction(-0.0), Ok(-0.0));
        assert_eq!(fraction(0.25), Ok(0.25));
        assert_eq!(count(-1.0, 10.0), Err(Rejection::Negative));
        assert_eq!(count(11.0, 10.0), Err(Rejection::TooLarge));
        assert_eq!(count(2.6, 10.0), Ok(3.0));
        assert_eq!(count(1e300, f64::from(u32::MAX)), Err(Rejection::TooLarge));
        assert_eq!(block_size(16.0), Ok(16.0));
        assert_eq!(block_size(0.0), Err(Rejection::Zero));
        assert!(block_size(1e6).is_err());
    }

    #[test]
    fn series_combine_by_rule_and_one_bad_series_refuses_the_figure() {
        let ok = |v| count(v, 100.0);
        let none = |_: f64, _: Rejection| {};
        assert_eq!(combine([3.0, 4.0], ok, Combine::Sum, none), Ok(Some(7.0)));
        assert_eq!(
            combine([0.2, 0.7, 0.5], fraction, Combine::Max, none),
            Ok(Some(0.7))
        );
        assert_eq!(combine([], fraction, Combine::Max, none), Ok(None));
        let mut seen = Vec::new();
        let r = combine([0.2, -0.5, f64::NAN], fraction, Combine::Max, |v, r| {
            seen.push((v, r))
        });
        assert_eq!(r, Err(Rejection::Negative));
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], (-0.5, Rejection::Negative));
    }
}
