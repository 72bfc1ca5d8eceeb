//! Time on the server's terms: its timestamps (RFC 3339 text, as JetStream writes it) as
//! nanoseconds since the Unix epoch, durations in nanoseconds, and the wait between two attempts
//! of a contended compare-and-set (leases and claims alike).

use std::time::Duration;

/// The longest wait between two attempts of a contended compare-and-set; each wait is random
/// (full jitter) up to 1 ms doubling up to this.
pub(crate) const MAX_CONFLICT_BACKOFF: Duration = Duration::from_millis(32);

/// A random wait before retry `n` (from 1) of a contended write.
pub(crate) fn conflict_backoff(n: u32) -> Duration {
    let cap = Duration::from_millis(1)
        .saturating_mul(1 << n.saturating_sub(1).min(10))
        .min(MAX_CONFLICT_BACKOFF);
    let micros = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX).max(1);
    Duration::from_micros(rand::random::<u64>() % micros)
}

/// `d` in nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds since the Unix epoch of `text`, an RFC 3339 timestamp such as
/// `2024-05-01T12:34:56.123456789Z` or `2024-05-01T14:34:56+02:00`. `None` when it does not
/// parse or lies before 1970.
pub(crate) fn parse_rfc3339_nanos(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // A leap second (60) counts as the next second's start, as Go would never write it anyway.
    if second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos: i64 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac.bytes().take(digits).enumerate() {
            if i < 9 {
                nanos = nanos * 10 + i64::from(c - b'0');
            }
        }
        for _ in digits..9 {
            nanos *= 10;
        }
        rest = &frac[digits..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    let total = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
    u64::try_from(total).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_backoff_is_bounded() {
        for n in [1, 2, 5, 40, u32::MAX] {
            assert!(conflict_backoff(n) <= MAX_CONFLICT_BACKOFF);
        }
        assert!(conflict_backoff(1) <= Duration::from_millis(1));
    }

    #[test]
    fn parses_jetstream_timestamps() {
        assert_eq!(parse_rfc3339_nanos("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_nanos("2026-11-29T12:17:32.426297234Z"),
            Some(1_795_954_652_426_297_234)
        );
        assert_eq!(
            parse_rfc3339_nanos("2000-02-29T00:00:01.5Z"),
            Some(951_782_401_500_000_000)
        );
        assert_eq!(
            parse_rfc3339_nanos("2000-02-29T02:00:01.5+02:00"),
            parse_rfc3339_nanos("2000-02-29T00:00:01.5Z")
        );
        assert_eq!(
            parse_rfc3339_nanos("2024-01-01T00:00:00.1234567891Z"),
            Some(1_704_067_200_123_456_789)
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "0001-01-01T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01X00:00:00Z",
            "2024-01-01T00:00:00+0100",
            "abcd-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_nanos(bad), None, "{bad}");
        }
    }
}
