//! Time values: an instant given in settings, local wall-clock readings, quiet hours.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, NaiveTime, TimeZone as _, Timelike, Utc};
use chrono_tz::Tz;

/// An instant in UTC, parsed from RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instant(pub DateTime<Utc>);

impl FromStr for Instant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| Instant(t.with_timezone(&Utc)))
            .map_err(|e| {
                format!("`{s}` is not an RFC 3339 time such as 2026-11-22T10:00:00Z ({e})")
            })
    }
}

/// The instant a local wall-clock reading happens in `tz`. In an autumn overlap (the reading
/// happens twice) it is the first; in a spring gap (it never happens) it is the reading taken
/// with the offset before the gap, so 02:30 on a night that jumps from 02:00 to 03:00 is 03:30.
/// Either way every local date has exactly one such instant: a send neither skips nor doubles.
pub(crate) fn local_instant(tz: Tz, date: NaiveDate, time: NaiveTime) -> DateTime<Utc> {
    let local = date.and_time(time);
    match tz.from_local_datetime(&local).earliest() {
        Some(t) => t.with_timezone(&Utc),
        None => {
            // Gaps last at most a few hours; a day earlier is safely before this one.
            let before = tz.offset_from_utc_datetime(&(local - chrono::Duration::days(1)));
            let offset = chrono::Offset::fix(&before);
            (local - offset).and_utc()
        }
    }
}

/// A daily window of local time in which SMS is not sent (`21:00-08:00`), or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours(Option<(NaiveTime, NaiveTime)>);

impl QuietHours {
    /// When SMS to a member in `tz` may go, if not now: the end of the window (local time,
    /// through DST changes as `local_instant` takes them).
    pub fn until(&self, tz: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let (start, end) = self.0?;
        let local = now.with_timezone(&tz);
        let time = local.time().with_nanosecond(0)?;
        let today = local.date_naive();
        let inside = if start <= end {
            start <= time && time < end
        } else {
            time >= start || time < end
        };
        if !inside {
            return None;
        }
        // After midnight the window ends today; before it, tomorrow.
        let end_date = if start > end && time >= start {
            today.succ_opt()?
        } else {
            today
        };
        Some(local_instant(tz, end_date, end))
    }
}

impl FromStr for QuietHours {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s.is_empty() {
            return Ok(QuietHours(None));
        }
        let error = || format!("{s:?} is not HH:MM-HH:MM (or off)");
        let (a, b) = s.split_once('-').ok_or_else(error)?;
        let parse = |t: &str| NaiveTime::parse_from_str(t.trim(), "%H:%M").map_err(|_| error());
        let (start, end) = (parse(a)?, parse(b)?);
        if start == end {
            return Err(format!("{s:?} is an empty window; use off"));
        }
        Ok(QuietHours(Some((start, end))))
    }
}

impl fmt::Display for QuietHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("off"),
            Some((a, b)) => write!(f, "{}-{}", a.format("%H:%M"), b.format("%H:%M")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, h, m, 0).unwrap()
    }

    #[test]
    fn quiet_hours_defer_sms_to_eight_local_time() {
        let quiet: QuietHours = "21:00-08:00".parse().unwrap();
        let istanbul: Tz = "Europe/Istanbul".parse().unwrap(); // UTC+3
        // (now, deferred until)
        let table = [
            (at(22, 17, 59), None),               // 20:59
            (at(22, 18, 0), Some(at(23, 5, 0))),  // 21:00 → 08:00 next day
            (at(22, 20, 59), Some(at(23, 5, 0))), // 23:59
            (at(22, 21, 0), Some(at(23, 5, 0))),  // 00:00 → 08:00 the same day
            (at(23, 4, 59), Some(at(23, 5, 0))),  // 07:59
            (at(23, 5, 0), None),                 // 08:00
        ];
        for (now, until) in table {
            assert_eq!(quiet.until(istanbul, now), until, "{now}");
        }
        // The same instant is daytime in Los Angeles.
        let la: Tz = "America/Los_Angeles".parse().unwrap();
        assert_eq!(quiet.until(la, at(22, 19, 30)), None);
        assert_eq!(
            "off"
                .parse::<QuietHours>()
                .unwrap()
                .until(istanbul, at(22, 20, 0)),
            None
        );
        // A window inside one day.
        let lunch: QuietHours = "12:00-13:30".parse().unwrap();
        let utc: Tz = "UTC".parse().unwrap();
        assert_eq!(lunch.until(utc, at(22, 12, 15)), Some(at(22, 13, 30)));
        assert_eq!(lunch.until(utc, at(22, 13, 30)), None);
        assert!("21:00".parse::<QuietHours>().is_err());
        assert!("08:00-08:00".parse::<QuietHours>().is_err());
    }

    #[test]
    fn quiet_hours_end_at_eight_on_a_dst_night() {
        let quiet: QuietHours = "21:00-08:00".parse().unwrap();
        let ny: Tz = "America/New_York".parse().unwrap();
        // 1 November 2026, DST ends at 02:00: 08:00 EST is 13:00 UTC.
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 3, 0, 0).unwrap(); // 23:00 EDT on 31 Oct
        assert_eq!(
            quiet.until(ny, now),
            Some(Utc.with_ymd_and_hms(2026, 11, 1, 13, 0, 0).unwrap())
        );
    }
}
