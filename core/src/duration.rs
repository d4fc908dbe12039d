//! The one duration syntax of every flag: `500ms`, `30s`, `5m`, `1h`, `1h 30m` (humantime's), or a
//! bare number of seconds, so the old `--*-seconds` spellings keep their meaning.

use std::time::Duration;

/// A duration that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a duration ({why}); write it like 500ms, 30s, 5m or 1h")]
pub struct DurationError {
    input: String,
    why: String,
}

/// The longest duration any flag takes: a year. Longer ones mean nothing here, and adding one
/// near `u64::MAX` seconds to a clock reading overflows (a panic in every deadline).
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Reads `500ms`, `30s`, `5m`, `1h`, `2h 30m`, or a bare number of seconds, up to [`MAX`].
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let err = |why: String| DurationError {
        input: s.into(),
        why,
    };
    let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse()
            .map(Duration::from_secs)
            .map_err(|e| err(format!("{e}")))?
    } else {
        humantime::parse_duration(t).map_err(|e| err(e.to_string()))?
    };
    if d > MAX {
        return Err(err("longer than a year, the longest any flag takes".into()));
    }
    Ok(d)
}

/// Writes a duration the way [`parse`] reads it (`1m 30s`), for defaults and messages.
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_reads_the_same_spellings() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("7"), Ok(Duration::from_secs(7)), "bare seconds");
        assert_eq!(parse(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5 min"), Ok(Duration::from_secs(300)));
        for bad in ["", "x", "-1s", "1.5", "5 parsecs"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("write it like 500ms, 30s, 5m or 1h"),
                "{bad}: {e}"
            );
        }
        assert_eq!(format(Duration::from_secs(90)), "1m 30s");
    }

    #[test]
    fn durations_that_overflow_a_deadline_are_refused() {
        // Once accepted: `Instant::now() + d` then panicked in every command with a deadline.
        for huge in [
            "18446744073709551615",
            "99999999999999999999",
            "600000000h",
            "366days",
            "1000000y",
        ] {
            let e = parse(huge).unwrap_err().to_string();
            assert!(e.contains("write it like 500ms"), "{huge}: {e}");
            assert!(std::time::Instant::now().checked_add(MAX).is_some());
        }
        assert_eq!(parse("365days"), Ok(MAX));
        assert_eq!(parse("31536000"), Ok(MAX));
    }
}
