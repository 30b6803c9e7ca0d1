//! Settings read from the environment, with the checks and messages every caller shares.

use std::time::Duration;

use crate::error::{Error, Result};

/// Reads variable `name` with `lookup` and parses it with `parse`; `Ok(None)` when unset or
/// empty. `what` says what is accepted, for the error message.
pub(crate) fn parse_var<T>(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &str,
    what: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>> {
    match lookup(name) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => parse(v.trim())
            .map(Some)
            .ok_or_else(|| Error::config(name, v.clone(), format!("expected {what}"))),
    }
}

/// The process environment as a lookup function.
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A duration in seconds (fractions allowed). `0` means "no limit" when `zero_is_none`.
pub(crate) fn seconds(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<Duration>> {
    parse_var(lookup, name, "a number of seconds, e.g. 30 or 0.5", |v| {
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
            .map(Duration::from_secs_f64)
    })
}

/// A non-negative integer; `k`, `m`, `g` suffixes (powers of 1024) accepted for sizes.
pub(crate) fn size(lookup: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    parse_var(lookup, name, "a byte count, e.g. 65536 or 64k", parse_size)
}

/// Parses `123`, `64k`, `4M`, `1g` (binary multiples).
pub fn parse_size(v: &str) -> Option<usize> {
    let v = v.trim();
    let (digits, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1usize << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        (i, 'g' | 'G') => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    digits.trim().parse::<usize>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1"), None);
    }

    #[test]
    fn variables_parse_or_explain() {
        let env = |k: &str| match k {
            "A" => Some("2.5".to_string()),
            "B" => Some("soon".to_string()),
            "C" => Some(" ".to_string()),
            _ => None,
        };
        assert_eq!(
            seconds(&env, "A").unwrap(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(seconds(&env, "C").unwrap(), None);
        assert_eq!(seconds(&env, "D").unwrap(), None);
        let err = seconds(&env, "B").unwrap_err().to_string();
        assert!(err.contains("B=\"soon\""), "{err}");
        assert!(err.contains("seconds"), "{err}");
    }
}
