//! Wall-clock times as text: milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`
//! (UTC), for the records PID 1 and machined keep and the CLI shows.
//!
//! Written by hand (Howard Hinnant's `civil_from_days`, a dozen lines) rather than
//! through a date crate: this crate is part of PID 1's static build and depends on serde
//! alone.

/// The civil date (year, month 1..=12, day 1..=31) of `days` since 1970-01-01 (negative
/// before it), by Howard Hinnant's `civil_from_days`.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are small by construction: month in 1..=12, day in 1..=31.
    (year, month as u32, day as u32)
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // u64::MAX ms is about 213 million days: it fits an i64.
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_735_689_599_000), "2024-12-31T23:59:59Z");
        assert_eq!(utc(1_796_444_100_000), "2026-12-05T04:15:00Z");
        assert_eq!(utc(1_796_559_145_000), "2026-12-06T12:12:25Z");
        assert_eq!(utc(1_796_543_126_000), "2026-12-06T07:45:26Z");
    }

    #[test]
    fn dates_before_and_after_the_epoch() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(3652), (1980, 1, 1));
        assert_eq!(civil_from_days(19_675), (2023, 11, 14));
    }
}
