//! Working-day calendar for deadlines (办理时限) in mainland China.
//!
//! A [`Calendar`] is read from a small CSV file (normally
//! `workflows/calendar/cn_holidays.csv`) with one `date,kind` row per special day:
//!
//! * `holiday`: an official rest day (法定节假日 / 调休放假), including weekend days inside a
//!   holiday block;
//! * `workday`: a make-up working day (调休上班), usually a Saturday or Sunday.
//!
//! Lines starting with `#`, blank lines and a leading `date,kind` header are skipped. Every
//! date not listed follows the week: Monday to Friday are working days, Saturday and Sunday
//! are not.
//!
//! # Coverage
//!
//! The calendar covers every day from 1 January of the smallest year listed in the file to
//! 31 December of the largest one ([`Calendar::first_year`], [`Calendar::last_year`]). Any
//! computation that has to know whether a date outside that range is a working day fails
//! with [`CalendarError::OutOfRange`]; it never guesses. The State Council announces the next
//! year's holidays each winter; the new rows must then be appended to the file. Note that an
//! announcement can also set days in late December of the year before (a New Year block or
//! a make-up Saturday), so check those rows too when extending the file.
//!
//! # Version
//!
//! [`Calendar::version`] is `<file name without .csv>@<first 12 hex digits of the SHA-256 of
//! the file bytes>`, e.g. `cn_holidays@3fa2c41b09de`. Record it next to every computed
//! deadline: any change to the file (even a comment) gives a new version.
//!
//! # Time zone
//!
//! Instants are [`chrono::DateTime<Utc>`]; dates are local dates in Asia/Shanghai, a fixed
//! UTC+8 (China has not used daylight saving time since 1991). "The end of day D" is the
//! instant of Shanghai midnight at the start of day D+1, e.g. the end of 2020-02-03 is
//! 2020-02-04 00:00 +08:00 = 2020-02-03 16:00 UTC.
//!
//! # Deadlines: [`Calendar::add`]
//!
//! With `S` the Shanghai date of `start` — where a `start` exactly at midnight counts as the end
//! (24:00) of the day before, the same convention as deadlines, so that a deadline counted from
//! another deadline's expiry loses no day, and `add` and `subtract` agree:
//!
//! * [`Unit::Hours`]`(n)`: exactly `start + n` hours.
//! * [`Unit::Days`]`(n)`: the end of the n-th calendar day after `S` (`S` itself does not
//!   count), i.e. Shanghai midnight at the start of `S + n + 1`. `Days(0)` is the end of `S`.
//!   Calendar days do not look at the holiday file and have no coverage limit.
//! * [`Unit::WorkingDays`]`(n)`, n ≥ 1: "受理之日起 n 个工作日" — the start day does not
//!   count, whatever time it is. Walk over the days after `S` counting working days; the
//!   deadline is the end of the n-th one. Example: accepted Thursday 2020-01-23 10:00,
//!   1 working day: 2020-01-24..2020-02-02 are holidays (the extended Spring Festival), so
//!   the deadline is the end of Monday 2020-02-03.
//! * `WorkingDays(0)`: the end of `S` if `S` is a working day, else the end of the next
//!   working day.
//!
//! # Reminders: [`Calendar::subtract`]
//!
//! * `Hours(n)`: exactly `due - n` hours.
//! * `Days(n)`: exactly `due - n × 24` hours.
//! * `WorkingDays(n)`: the due moment is taken as the end of its day, so the due day `D` is
//!   the Shanghai date of `due - 1 ns` (a due of 2020-02-04 00:00 +08:00 is on 2020-02-03).
//!   The result is the end of the n-th working day before `D` (walking back over the days
//!   before `D`). For a `due` returned by `add(…, WorkingDays, …)` that is the end of the
//!   working day n working days before the due day. `WorkingDays(0)` is the end of `D`.
//!
//! # Days fixed on the calendar: [`Calendar::anchored`]
//!
//! Some time limits are not lengths but days of the calendar: 每月1日前（节假日顺延）, 每季度,
//! 每半年. An [`Anchor`] names such a day: the n-th day ([`AnchorDay::Nth`], 1 = the first) or
//! the last day ([`AnchorDay::Last`]) of a calendar month, quarter (January–March, …),
//! half-year (January–June, July–December) or year ([`Span`]) — the one the start falls in,
//! or the one after it ([`Anchor::next`]). The deadline is the end (24:00) of that day.
//!
//! * The span is the one containing the Shanghai date of `start` itself: unlike lengths, a
//!   `start` exactly at midnight belongs to the day it begins, so that a deadline re-entered
//!   at the end of a quarter runs to the end of the next quarter instead of expiring at once.
//! * With [`Anchor::postpone`] (节假日顺延), a day that is not a working day moves to the next
//!   working day; that needs the calendar and is [`CalendarError::OutOfRange`] when the day
//!   (or a day it moves over) is outside the covered years. Without it the holiday file is
//!   not read and there is no coverage limit.
//! * A day that does not exist (day 0, day 31 of a 30-day month) is
//!   [`CalendarError::NoSuchDay`]; it is never moved to another day.
//! * The day may lie before `start` (the 20th of this month, started on the 25th): the
//!   deadline is then already due.
//!
//! Example: a report due by the 1st of next month, postponed over holidays, for a step on
//! 2020-09-15: 2020-10-01..08 are the National Day holidays, so the deadline is the end of
//! Friday 2020-10-09.
//!
//! Everything except [`Calendar::load`] is pure and deterministic: no clock, no I/O.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveTime, TimeDelta, Utc, Weekday};
use sha2::{Digest, Sha256};

/// Asia/Shanghai: a fixed UTC+8 offset (no DST since 1991).
const SHANGHAI: FixedOffset = match FixedOffset::east_opt(8 * 3600) {
    Some(offset) => offset,
    None => panic!("UTC+8 is a valid offset"),
};

/// Unit of a deadline or reminder offset; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Working days per the holiday file ("工作日"); the start day does not count.
    WorkingDays,
    /// Calendar days in Asia/Shanghai; the start day does not count.
    Days,
    /// Exact hours.
    Hours,
}

/// A calendar span a deadline can be anchored to; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Month,
    /// January–March, April–June, July–September, October–December.
    Quarter,
    /// January–June, July–December.
    HalfYear,
    Year,
}

impl Span {
    /// Months in the span.
    fn months(self) -> u32 {
        match self {
            Span::Month => 1,
            Span::Quarter => 3,
            Span::HalfYear => 6,
            Span::Year => 12,
        }
    }

    /// Days in the shortest span of this kind: the largest day that exists in all of them.
    pub fn shortest(self) -> u32 {
        match self {
            Span::Month => 28,
            Span::Quarter => 90,
            Span::HalfYear => 181,
            Span::Year => 365,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Span::Month => "month",
            Span::Quarter => "quarter",
            Span::HalfYear => "half-year",
            Span::Year => "year",
        }
    }
}

/// Which day of the span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnchorDay {
    /// The n-th day, counted from 1 (for a month: the day of the month).
    Nth(u32),
    Last,
}

/// A day fixed on the calendar relative to a start; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub day: AnchorDay,
    pub span: Span,
    /// The span after the one the start falls in (e.g. next month), not that one.
    pub next: bool,
    /// 节假日顺延: a day that is not a working day moves to the next working day.
    pub postpone: bool,
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let which = if self.next { "next" } else { "this" };
        match self.day {
            AnchorDay::Nth(n) => write!(f, "by day {n} of {which} {}", self.span.name())?,
            AnchorDay::Last => write!(f, "by the last day of {which} {}", self.span.name())?,
        }
        if self.postpone {
            write!(f, ", postponed over holidays")?;
        }
        Ok(())
    }
}

/// Errors from reading a holiday file or computing with a [`Calendar`].
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CalendarError {
    /// Working days were asked for and no calendar is loaded.
    #[error("working days need the working-day calendar, and none is loaded (calendar/*.csv)")]
    NoCalendar,

    /// The file could not be read.
    #[error("cannot read calendar file {}: {message}", path.display())]
    Io { path: PathBuf, message: String },

    /// A data line does not have exactly the two fields `date,kind`.
    #[error("{file}:{line}: expected `date,kind` (e.g. `2020-10-01,holiday`), found `{text}`")]
    Malformed {
        file: String,
        line: usize,
        text: String,
    },

    /// The date field is not a valid `YYYY-MM-DD` date.
    #[error("{file}:{line}: `{text}` is not a date (YYYY-MM-DD)")]
    BadDate {
        file: String,
        line: usize,
        text: String,
    },

    /// The kind field is neither `holiday` nor `workday`.
    #[error("{file}:{line}: unknown kind `{kind}` (expected `holiday` or `workday`)")]
    UnknownKind {
        file: String,
        line: usize,
        kind: String,
    },

    /// The same date is listed twice.
    #[error("{file}:{line}: duplicate date {date} (already listed on line {first_line})")]
    DuplicateDate {
        file: String,
        line: usize,
        date: NaiveDate,
        first_line: usize,
    },

    /// The file lists no dates, so the years it covers are unknown.
    #[error("{file}: no `date,kind` rows; cannot tell which years the calendar covers")]
    Empty { file: String },

    /// A date outside the years covered by the holiday file had to be examined.
    #[error(
        "working-day calendar {version} covers {first_year}-01-01..={last_year}-12-31 and does \
         not cover {date}: the holiday file must be extended with the State Council's \
         announcement of the public holidays for {year}",
        year = .date.year()
    )]
    OutOfRange {
        date: NaiveDate,
        first_year: i32,
        last_year: i32,
        version: String,
    },

    /// An anchored deadline names a day that does not exist in the span.
    #[error("{anchor} from {from}: there is no such day in that {}", anchor.span.name())]
    NoSuchDay { from: DateTime<Utc>, anchor: Anchor },

    /// An anchored deadline is beyond the range of dates chrono can represent.
    #[error(
        "cannot compute the deadline {anchor} from {from}: outside the representable time range"
    )]
    AnchorOverflow { from: DateTime<Utc>, anchor: Anchor },

    /// The result is beyond the range of dates chrono can represent.
    #[error("cannot compute {n} {unit:?} {direction} {from}: outside the representable time range")]
    Overflow {
        from: DateTime<Utc>,
        unit: Unit,
        n: u32,
        /// `"after"` for [`Calendar::add`], `"before"` for [`Calendar::subtract`].
        direction: &'static str,
    },
}

impl CalendarError {
    /// The line of the calendar file at fault, for an error in one.
    pub fn line(&self) -> Option<usize> {
        match self {
            CalendarError::Malformed { line, .. }
            | CalendarError::BadDate { line, .. }
            | CalendarError::UnknownKind { line, .. }
            | CalendarError::DuplicateDate { line, .. } => Some(*line),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Holiday,
    Workday,
}

/// A working-day calendar loaded from a holiday file; see the module documentation.
#[derive(Debug, Clone)]
pub struct Calendar {
    version: String,
    first_year: i32,
    last_year: i32,
    days: BTreeMap<NaiveDate, Kind>,
}

impl Calendar {
    /// Parses the text of a holiday file. `name` is the file name (e.g. `cn_holidays.csv`),
    /// used in error messages and in the [version](Calendar::version).
    pub fn parse(name: &str, text: &str) -> Result<Calendar, CalendarError> {
        let body = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut days: BTreeMap<NaiveDate, (Kind, usize)> = BTreeMap::new();
        let mut seen_data_line = false;

        for (index, raw) in body.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = trimmed.split(',').map(str::trim).collect();
            let first_data_line = !seen_data_line;
            seen_data_line = true;
            let [date_text, kind_text] = fields.as_slice() else {
                return Err(CalendarError::Malformed {
                    file: name.to_string(),
                    line,
                    text: trimmed.to_string(),
                });
            };
            if first_data_line
                && date_text.eq_ignore_ascii_case("date")
                && kind_text.eq_ignore_ascii_case("kind")
            {
                continue;
            }
            let date = parse_date(date_text).ok_or_else(|| CalendarError::BadDate {
                file: name.to_string(),
                line,
                text: date_text.to_string(),
            })?;
            let kind = match *kind_text {
                "holiday" => Kind::Holiday,
                "workday" => Kind::Workday,
                other => {
                    return Err(CalendarError::UnknownKind {
                        file: name.to_string(),
                        line,
                        kind: other.to_string(),
                    });
                }
            };
            if let Some(&(_, first_line)) = days.get(&date) {
                return Err(CalendarError::DuplicateDate {
                    file: name.to_string(),
                    line,
                    date,
                    first_line,
                });
            }
            days.insert(date, (kind, line));
        }

        let (Some((first, _)), Some((last, _))) = (days.first_key_value(), days.last_key_value())
        else {
            return Err(CalendarError::Empty {
                file: name.to_string(),
            });
        };
        let (first_year, last_year) = (first.year(), last.year());

        let digest = Sha256::digest(text.as_bytes());
        let hash = hex::encode(digest);
        let stem = name.strip_suffix(".csv").unwrap_or(name);
        let version = format!("{stem}@{}", &hash[..12]);

        Ok(Calendar {
            version,
            first_year,
            last_year,
            days: days
                .into_iter()
                .map(|(date, (kind, _))| (date, kind))
                .collect(),
        })
    }

    /// Reads and parses a holiday file; the file name (without directories) is the `name`
    /// passed to [`Calendar::parse`].
    pub fn load(path: &Path) -> Result<Calendar, CalendarError> {
        let io_error = |message: String| CalendarError::Io {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| io_error(e.to_string()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| io_error(format!("not valid UTF-8: {}", e.utf8_error())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Calendar::parse(&name, &text)
    }

    /// `<file name without .csv>@<first 12 hex digits of SHA-256 of the file bytes>`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// First year covered (the smallest year of a date in the file).
    pub fn first_year(&self) -> i32 {
        self.first_year
    }

    /// Last year covered (the largest year of a date in the file).
    pub fn last_year(&self) -> i32 {
        self.last_year
    }

    /// How many days after the Shanghai date of `now` the covered years end
    /// (0 on their last day, negative once they have ended), when that is at
    /// most `horizon_days`: soon, a deadline counted from `now` will need a
    /// year the file does not hold, and be [`CalendarError::OutOfRange`].
    pub fn ends_within(&self, now: DateTime<Utc>, horizon_days: i64) -> Option<i64> {
        let today = shanghai_date(now)?;
        let last = NaiveDate::from_ymd_opt(self.last_year, 12, 31)?;
        let left = (last - today).num_days();
        (left <= horizon_days).then_some(left)
    }

    /// Whether `d` is a working day: a listed make-up workday, or a Monday to Friday that is
    /// not a listed holiday. [`CalendarError::OutOfRange`] outside the covered years.
    pub fn is_working_day(&self, d: NaiveDate) -> Result<bool, CalendarError> {
        if d.year() < self.first_year || d.year() > self.last_year {
            return Err(CalendarError::OutOfRange {
                date: d,
                first_year: self.first_year,
                last_year: self.last_year,
                version: self.version.clone(),
            });
        }
        Ok(match self.days.get(&d) {
            Some(Kind::Holiday) => false,
            Some(Kind::Workday) => true,
            None => !matches!(d.weekday(), Weekday::Sat | Weekday::Sun),
        })
    }

    /// Deadline: `n` units after `start`, with Asia/Shanghai local dates (fixed UTC+8, China
    /// has had no DST since 1991). See the module documentation for the exact rules.
    pub fn add(
        &self,
        start: DateTime<Utc>,
        unit: Unit,
        n: u32,
    ) -> Result<DateTime<Utc>, CalendarError> {
        let overflow = || overflow(start, unit, n, "after");
        match unit {
            Unit::Hours | Unit::Days => add_without_holidays(start, unit, n),
            Unit::WorkingDays => {
                let mut day = day_of(start).ok_or_else(overflow)?;
                if n == 0 {
                    while !self.is_working_day(day)? {
                        day = day.succ_opt().ok_or_else(overflow)?;
                    }
                } else {
                    let mut remaining = n;
                    while remaining > 0 {
                        day = day.succ_opt().ok_or_else(overflow)?;
                        if self.is_working_day(day)? {
                            remaining -= 1;
                        }
                    }
                }
                end_of_day(day).ok_or_else(overflow)
            }
        }
    }

    /// Deadline: the end of the day `anchor` names, counted from `start`, moved to the next
    /// working day when the anchor postpones over holidays. See the module documentation.
    pub fn anchored(
        &self,
        start: DateTime<Utc>,
        anchor: Anchor,
    ) -> Result<DateTime<Utc>, CalendarError> {
        let mut day = anchored_day(start, anchor)?;
        if anchor.postpone {
            while !self.is_working_day(day)? {
                day = day.succ_opt().ok_or(CalendarError::AnchorOverflow {
                    from: start,
                    anchor,
                })?;
            }
        }
        end_of_day(day).ok_or(CalendarError::AnchorOverflow {
            from: start,
            anchor,
        })
    }

    /// The moment `n` units before `due` (for reminders). See the module documentation.
    pub fn subtract(
        &self,
        due: DateTime<Utc>,
        unit: Unit,
        n: u32,
    ) -> Result<DateTime<Utc>, CalendarError> {
        let overflow = || overflow(due, unit, n, "before");
        match unit {
            Unit::Hours | Unit::Days => subtract_without_holidays(due, unit, n),
            Unit::WorkingDays => {
                let last_instant = due
                    .checked_sub_signed(TimeDelta::nanoseconds(1))
                    .ok_or_else(overflow)?;
                let mut day = shanghai_date(last_instant).ok_or_else(overflow)?;
                let mut remaining = n;
                while remaining > 0 {
                    day = day.pred_opt().ok_or_else(overflow)?;
                    if self.is_working_day(day)? {
                        remaining -= 1;
                    }
                }
                end_of_day(day).ok_or_else(overflow)
            }
        }
    }
}

fn overflow(from: DateTime<Utc>, unit: Unit, n: u32, direction: &'static str) -> CalendarError {
    CalendarError::Overflow {
        from,
        unit,
        n,
        direction,
    }
}

/// `start` + n hours or calendar days: these need no holiday data, so they
/// work with no calendar loaded (the rules are those of [`Calendar::add`]).
/// Working days are [`CalendarError::NoCalendar`].
pub fn add_without_holidays(
    start: DateTime<Utc>,
    unit: Unit,
    n: u32,
) -> Result<DateTime<Utc>, CalendarError> {
    let overflow = || overflow(start, unit, n, "after");
    match unit {
        Unit::Hours => TimeDelta::try_hours(i64::from(n))
            .and_then(|delta| start.checked_add_signed(delta))
            .ok_or_else(overflow),
        Unit::Days => day_of(start)
            .and_then(|day| day.checked_add_days(chrono::Days::new(u64::from(n) + 1)))
            .and_then(start_of_day)
            .ok_or_else(overflow),
        Unit::WorkingDays => Err(CalendarError::NoCalendar),
    }
}

/// An anchored deadline that does not postpone over holidays needs no holiday
/// data (the rules are those of [`Calendar::anchored`]); one that does is
/// [`CalendarError::NoCalendar`].
pub fn anchored_without_holidays(
    start: DateTime<Utc>,
    anchor: Anchor,
) -> Result<DateTime<Utc>, CalendarError> {
    if anchor.postpone {
        return Err(CalendarError::NoCalendar);
    }
    let day = anchored_day(start, anchor)?;
    end_of_day(day).ok_or(CalendarError::AnchorOverflow {
        from: start,
        anchor,
    })
}

/// The day an anchor names, before any postponement.
fn anchored_day(start: DateTime<Utc>, anchor: Anchor) -> Result<NaiveDate, CalendarError> {
    let overflow = || CalendarError::AnchorOverflow {
        from: start,
        anchor,
    };
    // A midnight belongs to the day it begins (see the module documentation).
    let today = shanghai_date(start).ok_or_else(overflow)?;
    let months = anchor.span.months();
    let first_month = (today.month0() / months) * months;
    let mut first =
        NaiveDate::from_ymd_opt(today.year(), first_month + 1, 1).ok_or_else(overflow)?;
    if anchor.next {
        first = first
            .checked_add_months(chrono::Months::new(months))
            .ok_or_else(overflow)?;
    }
    let after = first
        .checked_add_months(chrono::Months::new(months))
        .ok_or_else(overflow)?;
    match anchor.day {
        AnchorDay::Last => after.pred_opt().ok_or_else(overflow),
        AnchorDay::Nth(n) => {
            let day = n
                .checked_sub(1)
                .and_then(|k| first.checked_add_days(chrono::Days::new(u64::from(k))))
                .filter(|d| *d < after);
            day.ok_or(CalendarError::NoSuchDay {
                from: start,
                anchor,
            })
        }
    }
}

/// `due` − n hours or calendar days (see [`Calendar::subtract`]); working days
/// are [`CalendarError::NoCalendar`].
pub fn subtract_without_holidays(
    due: DateTime<Utc>,
    unit: Unit,
    n: u32,
) -> Result<DateTime<Utc>, CalendarError> {
    let overflow = || overflow(due, unit, n, "before");
    let delta = match unit {
        Unit::Hours => TimeDelta::try_hours(i64::from(n)),
        Unit::Days => TimeDelta::try_days(i64::from(n)),
        Unit::WorkingDays => return Err(CalendarError::NoCalendar),
    };
    delta
        .and_then(|d| due.checked_sub_signed(d))
        .ok_or_else(overflow)
}

/// Strict `YYYY-MM-DD` (four-digit year, zero-padded month and day).
fn parse_date(text: &str) -> Option<NaiveDate> {
    let bytes = text.as_bytes();
    let shape_ok = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return None;
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
}

/// The Asia/Shanghai local date of an instant (`None` only at the very end of chrono's range).
/// The Shanghai day a moment belongs to for counting: a moment exactly at
/// midnight is the end of the day before (24:00), the same convention deadlines
/// use, so that a deadline counted from another deadline's expiry loses no day
/// and `add` and `subtract` agree.
fn day_of(t: DateTime<Utc>) -> Option<NaiveDate> {
    shanghai_date(t.checked_sub_signed(TimeDelta::nanoseconds(1))?)
}

fn shanghai_date(t: DateTime<Utc>) -> Option<NaiveDate> {
    t.naive_utc()
        .checked_add_offset(SHANGHAI)
        .map(|local| local.date())
}

/// Shanghai midnight at the start of `d`, as a UTC instant.
fn start_of_day(d: NaiveDate) -> Option<DateTime<Utc>> {
    d.and_time(NaiveTime::MIN)
        .and_local_timezone(SHANGHAI)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// The end of `d` in Shanghai: midnight at the start of the following day.
fn end_of_day(d: NaiveDate) -> Option<DateTime<Utc>> {
    d.succ_opt().and_then(start_of_day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Timelike};

    const CN: &str = include_str!("../workflows/calendar/cn_holidays.csv");

    fn cn() -> Calendar {
        Calendar::parse("cn_holidays.csv", CN).expect("bundled calendar parses")
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
    }

    /// A Shanghai wall-clock time as a UTC instant.
    fn sh(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        SHANGHAI
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("valid Shanghai time")
            .with_timezone(&Utc)
    }

    /// End of a Shanghai date = midnight starting the next day.
    fn end_of(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        let next = date(y, m, d).succ_opt().expect("next day");
        sh(next.year(), next.month(), next.day(), 0, 0)
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().expect("valid RFC 3339 instant")
    }

    #[test]
    fn the_end_of_the_covered_years_is_announced_within_the_horizon_only() {
        let cal = Calendar::parse("t.csv", "2026-10-01,holiday\n").expect("parses");
        let at = |t: &str| t.parse::<DateTime<Utc>>().expect("time");
        assert_eq!(cal.ends_within(at("2026-10-01T00:00:00Z"), 60), None);
        assert_eq!(cal.ends_within(at("2026-11-27T04:00:00Z"), 60), Some(34));
        // 16:00 UTC on the 31st is already 1 January in Shanghai.
        assert_eq!(cal.ends_within(at("2026-12-31T15:59:59Z"), 60), Some(0));
        assert_eq!(cal.ends_within(at("2026-12-31T16:00:00Z"), 60), Some(-1));
    }

    #[test]
    fn bundled_file_covers_2020_to_2026() {
        let cal = cn();
        assert_eq!(cal.first_year(), 2020);
        assert_eq!(cal.last_year(), 2026);
        assert!(cal.version().starts_with("cn_holidays@"));
    }

    #[test]
    fn spring_festival_2020_extended_to_feb_2() {
        let cal = cn();
        // Original block 01-24..01-30, extended by the State Council to 02-02.
        for d in 24..=31 {
            assert_eq!(
                cal.is_working_day(date(2020, 1, d)),
                Ok(false),
                "2020-01-{d}"
            );
        }
        assert_eq!(cal.is_working_day(date(2020, 1, 31)), Ok(false)); // Friday, extension
        assert_eq!(cal.is_working_day(date(2020, 2, 1)), Ok(false)); // Saturday, make-up cancelled
        assert_eq!(cal.is_working_day(date(2020, 2, 2)), Ok(false));
        assert_eq!(cal.is_working_day(date(2020, 2, 3)), Ok(true)); // Monday
        assert_eq!(cal.is_working_day(date(2020, 1, 23)), Ok(true)); // Thursday
    }

    #[test]
    fn make_up_working_days_2020() {
        let cal = cn();
        assert_eq!(date(2020, 1, 19).weekday(), Weekday::Sun);
        assert_eq!(cal.is_working_day(date(2020, 1, 19)), Ok(true));
        assert_eq!(date(2020, 4, 26).weekday(), Weekday::Sun);
        assert_eq!(cal.is_working_day(date(2020, 4, 26)), Ok(true));
        assert_eq!(date(2020, 5, 9).weekday(), Weekday::Sat);
        assert_eq!(cal.is_working_day(date(2020, 5, 9)), Ok(true));
        // Ordinary weekend days are not working days.
        assert_eq!(cal.is_working_day(date(2020, 1, 18)), Ok(false));
        assert_eq!(cal.is_working_day(date(2020, 5, 10)), Ok(false));
    }

    #[test]
    fn national_day_2020() {
        let cal = cn();
        for d in 1..=8 {
            assert_eq!(
                cal.is_working_day(date(2020, 10, d)),
                Ok(false),
                "2020-10-0{d}"
            );
        }
        assert_eq!(cal.is_working_day(date(2020, 9, 27)), Ok(true)); // Sunday make-up
        assert_eq!(cal.is_working_day(date(2020, 10, 10)), Ok(true)); // Saturday make-up
        assert_eq!(cal.is_working_day(date(2020, 10, 9)), Ok(true)); // Friday
        assert_eq!(cal.is_working_day(date(2020, 10, 11)), Ok(false)); // Sunday
    }

    #[test]
    fn is_working_day_matches_csv_rows_for_every_covered_date() {
        let cal = cn();
        let mut d = date(2020, 1, 1);
        let mut checked = 0;
        while d.year() <= 2026 {
            let key = d.format("%Y-%m-%d").to_string();
            let expected = if CN.contains(&format!("{key},holiday")) {
                false
            } else if CN.contains(&format!("{key},workday")) {
                true
            } else {
                d.weekday().number_from_monday() <= 5
            };
            assert_eq!(cal.is_working_day(d), Ok(expected), "{key}");
            checked += 1;
            d = d.succ_opt().expect("next day");
        }
        assert_eq!(checked, 2557); // 2020-01-01..=2026-12-31
    }

    #[test]
    fn working_days_across_extended_spring_festival_2020() {
        let cal = cn();
        let due = cal.add(sh(2020, 1, 23, 10, 0), Unit::WorkingDays, 1);
        assert_eq!(due, Ok(end_of(2020, 2, 3)));
        assert_eq!(due, Ok(utc("2020-02-03T16:00:00Z")));
    }

    #[test]
    fn working_days_include_sunday_make_up_day_2020_04_26() {
        let cal = cn();
        // Fri 04-24 -> Sun 04-26 (1), 27, 28, 29, 30 (5); May 1-5 are holidays.
        let due = cal.add(sh(2020, 4, 24, 9, 30), Unit::WorkingDays, 5);
        assert_eq!(due, Ok(end_of(2020, 4, 30)));
        // One more lands on the next working day after the May Day holiday.
        let due = cal.add(sh(2020, 4, 24, 9, 30), Unit::WorkingDays, 6);
        assert_eq!(due, Ok(end_of(2020, 5, 6)));
    }

    #[test]
    fn working_days_include_saturday_make_up_day_2020_05_09() {
        let cal = cn();
        // Thu 04-30 -> May 1-5 holidays, 6 (1), 7 (2), 8 (3), Sat 9 (4).
        let due = cal.add(sh(2020, 4, 30, 16, 0), Unit::WorkingDays, 4);
        assert_eq!(due, Ok(end_of(2020, 5, 9)));
    }

    #[test]
    fn working_days_include_sunday_make_up_day_2020_01_19() {
        let cal = cn();
        let due = cal.add(sh(2020, 1, 17, 9, 0), Unit::WorkingDays, 1);
        assert_eq!(due, Ok(end_of(2020, 1, 19)));
    }

    #[test]
    fn seventeen_working_days_across_national_day_2020() {
        let cal = cn();
        // From Fri 2020-09-25: Sep 27 (Sun make-up), 28, 29, 30, Oct 9, Oct 10 (Sat
        // make-up), 12-16, 19-23, 26 -> the 17th is Mon 2020-10-26.
        let due = cal.add(sh(2020, 9, 25, 11, 0), Unit::WorkingDays, 17);
        assert_eq!(due, Ok(end_of(2020, 10, 26)));
        assert_eq!(due, Ok(utc("2020-10-26T16:00:00Z")));
    }

    #[test]
    fn working_days_zero() {
        let cal = cn();
        // Working day: end of the same day.
        assert_eq!(
            cal.add(sh(2020, 2, 3, 8, 0), Unit::WorkingDays, 0),
            Ok(end_of(2020, 2, 3))
        );
        // Holiday: end of the next working day.
        assert_eq!(
            cal.add(sh(2020, 1, 25, 8, 0), Unit::WorkingDays, 0),
            Ok(end_of(2020, 2, 3))
        );
        // Saturday make-up day is a working day.
        assert_eq!(
            cal.add(sh(2020, 5, 9, 8, 0), Unit::WorkingDays, 0),
            Ok(end_of(2020, 5, 9))
        );
    }

    #[test]
    fn start_date_is_the_shanghai_date_not_the_utc_date() {
        let cal = cn();
        // 2020-01-22 20:00 UTC is Thursday 2020-01-23 04:00 in Shanghai.
        let start = utc("2020-01-22T20:00:00Z");
        assert_eq!(cal.add(start, Unit::WorkingDays, 1), Ok(end_of(2020, 2, 3)));
        assert_eq!(cal.add(start, Unit::Days, 0), Ok(end_of(2020, 1, 23)));
        // 2020-01-23 15:59:59 UTC is still 23:59:59 on the 23rd in Shanghai ...
        assert_eq!(
            cal.add(utc("2020-01-23T15:59:59Z"), Unit::Days, 0),
            Ok(end_of(2020, 1, 23))
        );
        // ... and exactly midnight is its end (24:00), not yet the 24th ...
        assert_eq!(
            cal.add(utc("2020-01-23T16:00:00Z"), Unit::Days, 0),
            Ok(end_of(2020, 1, 23))
        );
        // ... which the 24th is a nanosecond later.
        assert_eq!(
            cal.add(utc("2020-01-23T16:00:00.000000001Z"), Unit::Days, 0),
            Ok(end_of(2020, 1, 24))
        );
    }

    #[test]
    fn calendar_days() {
        let cal = cn();
        let start = sh(2020, 1, 23, 10, 0);
        assert_eq!(cal.add(start, Unit::Days, 0), Ok(end_of(2020, 1, 23)));
        assert_eq!(cal.add(start, Unit::Days, 1), Ok(end_of(2020, 1, 24)));
        assert_eq!(cal.add(start, Unit::Days, 15), Ok(end_of(2020, 2, 7)));
        assert_eq!(
            cal.add(start, Unit::Days, 15),
            Ok(utc("2020-02-07T16:00:00Z"))
        );
        // Leap day 2020.
        assert_eq!(
            cal.add(sh(2020, 2, 28, 12, 0), Unit::Days, 1),
            Ok(end_of(2020, 2, 29))
        );
        // Calendar days do not consult the holiday file.
        assert_eq!(
            cal.add(sh(2030, 12, 31, 12, 0), Unit::Days, 1),
            Ok(end_of(2031, 1, 1))
        );
    }

    #[test]
    fn hours() {
        let cal = cn();
        let start = sh(2020, 1, 23, 10, 0);
        assert_eq!(cal.add(start, Unit::Hours, 0), Ok(start));
        assert_eq!(cal.add(start, Unit::Hours, 48), Ok(sh(2020, 1, 25, 10, 0)));
        assert_eq!(
            cal.add(utc("2030-06-01T00:00:00Z"), Unit::Hours, 5),
            Ok(utc("2030-06-01T05:00:00Z"))
        );
        assert_eq!(
            cal.subtract(sh(2020, 1, 25, 10, 0), Unit::Hours, 48),
            Ok(start)
        );
    }

    #[test]
    fn subtract_working_days_for_reminders() {
        let cal = cn();
        let due = end_of(2020, 2, 3);
        // One working day before Mon 02-03 is Thu 01-23 (the festival in between).
        assert_eq!(
            cal.subtract(due, Unit::WorkingDays, 1),
            Ok(end_of(2020, 1, 23))
        );
        // A due moment during the day is on that day too.
        assert_eq!(
            cal.subtract(sh(2020, 2, 3, 15, 0), Unit::WorkingDays, 1),
            Ok(end_of(2020, 1, 23))
        );
        assert_eq!(cal.subtract(due, Unit::WorkingDays, 0), Ok(due));
        // Back across National Day: Oct 10 (Sat make-up), Oct 9, Sep 30.
        assert_eq!(
            cal.subtract(end_of(2020, 10, 12), Unit::WorkingDays, 3),
            Ok(end_of(2020, 9, 30))
        );
        // Back over the Sunday make-up day 2020-04-26.
        assert_eq!(
            cal.subtract(end_of(2020, 4, 27), Unit::WorkingDays, 1),
            Ok(end_of(2020, 4, 26))
        );
        assert_eq!(
            cal.subtract(end_of(2020, 4, 27), Unit::WorkingDays, 2),
            Ok(end_of(2020, 4, 24))
        );
    }

    #[test]
    fn subtract_days_is_plain_24_hours() {
        let cal = cn();
        let due = end_of(2020, 2, 3);
        assert_eq!(cal.subtract(due, Unit::Days, 0), Ok(due));
        assert_eq!(cal.subtract(due, Unit::Days, 3), Ok(end_of(2020, 1, 31)));
        assert_eq!(
            cal.subtract(sh(2020, 3, 1, 9, 0), Unit::Days, 1),
            Ok(sh(2020, 2, 29, 9, 0))
        );
    }

    #[test]
    fn out_of_range_2027() {
        let cal = cn();
        let err = cal.is_working_day(date(2027, 1, 4)).unwrap_err();
        assert_eq!(
            err,
            CalendarError::OutOfRange {
                date: date(2027, 1, 4),
                first_year: 2020,
                last_year: 2026,
                version: cal.version().to_string(),
            }
        );
        let message = err.to_string();
        assert!(message.contains("does not cover 2027-01-04"), "{message}");
        assert!(message.contains("State Council"), "{message}");
        assert!(message.contains(cal.version()), "{message}");
        // Thu 2026-12-31 is the 1st working day; the 2nd would need 2027.
        assert_eq!(
            cal.add(sh(2026, 12, 30, 10, 0), Unit::WorkingDays, 1),
            Ok(end_of(2026, 12, 31))
        );
        assert!(matches!(
            cal.add(sh(2026, 12, 30, 10, 0), Unit::WorkingDays, 2),
            Err(CalendarError::OutOfRange { date, .. }) if date == date_2027_01_01()
        ));
        assert!(matches!(
            cal.add(sh(2027, 3, 1, 10, 0), Unit::WorkingDays, 0),
            Err(CalendarError::OutOfRange { .. })
        ));
    }

    fn date_2027_01_01() -> NaiveDate {
        date(2027, 1, 1)
    }

    #[test]
    fn out_of_range_2019() {
        let cal = cn();
        assert!(matches!(
            cal.is_working_day(date(2019, 12, 31)),
            Err(CalendarError::OutOfRange {
                first_year: 2020,
                last_year: 2026,
                ..
            })
        ));
        // The start day itself is not examined for n >= 1 ...
        assert_eq!(
            cal.add(sh(2019, 12, 31, 10, 0), Unit::WorkingDays, 1),
            Ok(end_of(2020, 1, 2))
        );
        // ... but it is for n = 0.
        assert!(matches!(
            cal.add(sh(2019, 12, 31, 10, 0), Unit::WorkingDays, 0),
            Err(CalendarError::OutOfRange { .. })
        ));
        // Walking back from Thu 2020-01-02: 2020-01-01 is a holiday, so 2019-12-31 is needed.
        assert_eq!(
            cal.subtract(end_of(2020, 1, 2), Unit::WorkingDays, 1),
            Err(CalendarError::OutOfRange {
                date: date(2019, 12, 31),
                first_year: 2020,
                last_year: 2026,
                version: cal.version().to_string(),
            })
        );
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let cal = cn();
        let max = DateTime::<Utc>::MAX_UTC;
        let min = DateTime::<Utc>::MIN_UTC;
        for unit in [Unit::WorkingDays, Unit::Days, Unit::Hours] {
            for n in [0, 1, u32::MAX] {
                assert!(cal.add(max, unit, n).is_err() || n == 0);
                let _ = cal.add(min, unit, n);
                let _ = cal.subtract(max, unit, n);
                assert!(cal.subtract(min, unit, n).is_err() || n == 0);
            }
        }
        // Large counts stop at the end of coverage instead of looping forever.
        assert!(matches!(
            cal.add(sh(2020, 1, 1, 0, 0), Unit::WorkingDays, u32::MAX),
            Err(CalendarError::OutOfRange { date, .. }) if date == date_2027_01_01()
        ));
        assert!(matches!(
            cal.add(max, Unit::Days, 1),
            Err(CalendarError::Overflow {
                direction: "after",
                ..
            })
        ));
    }

    #[test]
    fn parse_skips_comments_blank_lines_header_and_crlf() {
        let text = "\u{feff}# comment\r\n\r\ndate,kind\r\n  # indented comment\r\n2021-01-01,holiday\r\n\r\n2021-02-07 , workday\r\n";
        let cal = Calendar::parse("t.csv", text).expect("parses");
        assert_eq!(cal.first_year(), 2021);
        assert_eq!(cal.last_year(), 2021);
        assert_eq!(cal.is_working_day(date(2021, 1, 1)), Ok(false)); // Friday holiday
        assert_eq!(cal.is_working_day(date(2021, 2, 7)), Ok(true)); // Sunday make-up
        assert_eq!(cal.is_working_day(date(2021, 2, 8)), Ok(true)); // Monday
        // Header is optional.
        assert!(Calendar::parse("t.csv", "2021-01-01,holiday\n").is_ok());
    }

    #[test]
    fn parse_error_bad_date_has_line_number() {
        let text = "# c\ndate,kind\n2020-01-01,holiday\n2020-13-01,holiday\n";
        let err = Calendar::parse("cn_holidays.csv", text).unwrap_err();
        assert_eq!(
            err,
            CalendarError::BadDate {
                file: "cn_holidays.csv".into(),
                line: 4,
                text: "2020-13-01".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "cn_holidays.csv:4: `2020-13-01` is not a date (YYYY-MM-DD)"
        );
        for bad in [
            "2021-02-29",
            "2020-1-05",
            "20-01-05",
            "2020/01/05",
            "+2020-01-05",
            "",
        ] {
            let text = format!("2020-01-01,holiday\n{bad},holiday\n");
            assert!(
                matches!(
                    Calendar::parse("t.csv", &text),
                    Err(CalendarError::BadDate { line: 2, .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parse_error_unknown_kind() {
        let err = Calendar::parse("t.csv", "date,kind\n2020-01-01,vacation\n").unwrap_err();
        assert_eq!(
            err,
            CalendarError::UnknownKind {
                file: "t.csv".into(),
                line: 2,
                kind: "vacation".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "t.csv:2: unknown kind `vacation` (expected `holiday` or `workday`)"
        );
    }

    #[test]
    fn parse_error_duplicate_date() {
        let text = "2020-01-01,holiday\n# x\n2020-01-01,workday\n";
        let err = Calendar::parse("t.csv", text).unwrap_err();
        assert_eq!(
            err,
            CalendarError::DuplicateDate {
                file: "t.csv".into(),
                line: 3,
                date: date(2020, 1, 1),
                first_line: 1,
            }
        );
        assert!(
            err.to_string()
                .starts_with("t.csv:3: duplicate date 2020-01-01")
        );
    }

    #[test]
    fn parse_error_malformed_and_empty() {
        for (text, line) in [
            ("2020-01-01\n", 1),
            ("2020-01-01,holiday\n2020-01-02,holiday,extra\n", 2),
            ("2020-01-01,holiday\ndate,kind\n", 2),
        ] {
            let err = Calendar::parse("t.csv", text).unwrap_err();
            assert!(
                matches!(err, CalendarError::Malformed { line: l, .. } | CalendarError::BadDate { line: l, .. } if l == line),
                "{text:?}: {err:?}"
            );
        }
        for text in ["", "# only comments\n\n", "date,kind\n"] {
            assert_eq!(
                Calendar::parse("t.csv", text).unwrap_err(),
                CalendarError::Empty {
                    file: "t.csv".into()
                }
            );
        }
    }

    #[test]
    fn version_is_stable_and_tracks_content() {
        // printf '2020-01-01,holiday\n' | sha256sum
        let cal = Calendar::parse("x.csv", "2020-01-01,holiday\n").expect("parses");
        assert_eq!(cal.version(), "x@f8b3ba6a4a18");
        let again = Calendar::parse("x.csv", "2020-01-01,holiday\n").expect("parses");
        assert_eq!(again.version(), cal.version());
        let changed = Calendar::parse("x.csv", "2020-01-02,holiday\n").expect("parses");
        assert_ne!(changed.version(), cal.version());
        assert!(changed.version().starts_with("x@"));

        let bundled = cn().version().to_string();
        let (stem, hash) = bundled.split_once('@').expect("name@hash");
        assert_eq!(stem, "cn_holidays");
        assert_eq!(hash.len(), 12);
        assert!(hash.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        assert_eq!(cn().version(), bundled);
        let appended = format!("{CN}2027-01-01,holiday\n");
        assert_ne!(
            Calendar::parse("cn_holidays.csv", &appended)
                .expect("parses")
                .version(),
            bundled
        );
    }

    #[test]
    fn load_reads_file_and_reports_io_errors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/calendar/cn_holidays.csv");
        let cal = Calendar::load(&path).expect("bundled file loads");
        assert_eq!(cal.version(), cn().version());

        let missing = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/calendar/nope.csv");
        let err = Calendar::load(&missing).unwrap_err();
        assert!(
            matches!(&err, CalendarError::Io { path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("nope.csv"));
    }

    /// For many start moments in 2020-2025 and n in 0..=30: the deadline is a Shanghai
    /// midnight ending a working day, exactly n working days lie in (start date, due day],
    /// and subtracting k < n working days from it gives `add(start, n - k)`.
    #[test]
    fn property_working_day_deadlines() {
        let cal = cn();
        let is_working = |d: NaiveDate| cal.is_working_day(d).expect("covered");
        let mut start_day = date(2020, 1, 1);
        let mut cases = 0;
        while start_day.year() <= 2025 {
            let index = start_day.num_days_from_ce();
            let (h, m) = [(0, 0), (9, 30), (23, 59)][index.rem_euclid(3) as usize];
            let start = sh(start_day.year(), start_day.month(), start_day.day(), h, m);
            // Independent Shanghai date: UTC + 8 hours.
            assert_eq!((start.naive_utc() + Duration::hours(8)).date(), start_day);
            // Midnight is the end of the day before (24:00): counting starts from that day.
            let count_day = if (h, m) == (0, 0) {
                start_day.pred_opt().expect("previous day")
            } else {
                start_day
            };

            let mut dues = Vec::new();
            for n in 0..=30u32 {
                let due = cal.add(start, Unit::WorkingDays, n).expect("in range");
                let local = due.with_timezone(&SHANGHAI);
                assert_eq!(
                    (
                        local.hour(),
                        local.minute(),
                        local.second(),
                        local.nanosecond()
                    ),
                    (0, 0, 0, 0),
                    "{start} +{n}: {local} is not midnight"
                );
                let due_day = local.date_naive().pred_opt().expect("previous day");
                assert!(
                    is_working(due_day),
                    "{start} +{n}: {due_day} is not a working day"
                );
                assert!(due_day >= count_day);
                let counted = count_day
                    .iter_days()
                    .skip(1)
                    .take_while(|d| *d <= due_day)
                    .filter(|d| is_working(*d))
                    .count();
                if n == 0 {
                    // First working day on or after the start date.
                    let before = count_day
                        .iter_days()
                        .take_while(|d| *d < due_day)
                        .filter(|d| is_working(*d))
                        .count();
                    assert_eq!(before, 0, "{start} +0: skipped a working day");
                } else {
                    assert_eq!(counted, n as usize, "{start} +{n}: due {due_day}");
                }
                // WorkingDays(0) and (1) coincide when the start day is not a working day.
                match n {
                    0 => {}
                    1 => assert!(due >= dues[0]),
                    _ => assert!(due > dues[dues.len() - 1]),
                }
                dues.push(due);
                cases += 1;
            }
            for (n, due) in dues.iter().enumerate() {
                for k in 0..n {
                    if k % 7 == 0 || k + 1 == n {
                        let back = cal
                            .subtract(*due, Unit::WorkingDays, k as u32)
                            .expect("in range");
                        assert_eq!(back, dues[n - k], "{start}: +{n} -{k}");
                    }
                }
            }
            start_day = start_day.succ_opt().expect("next day");
        }
        assert_eq!(cases, 2192 * 31);
    }

    fn anchor(day: AnchorDay, span: Span, next: bool, postpone: bool) -> Anchor {
        Anchor {
            day,
            span,
            next,
            postpone,
        }
    }

    /// 每月1日前（节假日顺延）: the report on September is due before 1 October 2020, a
    /// holiday (2020-10-01..08), so it is postponed to Friday 2020-10-09.
    #[test]
    fn first_of_next_month_postponed_over_national_day() {
        let cal = cn();
        let report = anchor(AnchorDay::Nth(1), Span::Month, true, true);
        for start in [
            sh(2020, 9, 1, 0, 0),
            sh(2020, 9, 15, 10, 0),
            sh(2020, 9, 30, 23, 59),
        ] {
            assert_eq!(
                cal.anchored(start, report),
                Ok(end_of(2020, 10, 9)),
                "{start}"
            );
        }
        // Without 顺延 the day itself is the deadline, and no holiday data is needed.
        let strict = Anchor {
            postpone: false,
            ..report
        };
        assert_eq!(
            cal.anchored(sh(2020, 9, 15, 10, 0), strict),
            Ok(end_of(2020, 10, 1))
        );
        assert_eq!(
            anchored_without_holidays(sh(2020, 9, 15, 10, 0), strict),
            Ok(end_of(2020, 10, 1))
        );
        assert_eq!(
            anchored_without_holidays(sh(2020, 9, 15, 10, 0), report),
            Err(CalendarError::NoCalendar)
        );
        // A weekend: Saturday 2020-08-01 → Monday 08-03; New Year 2021-01-01..03 → 01-04.
        assert_eq!(
            cal.anchored(sh(2020, 7, 10, 9, 0), report),
            Ok(end_of(2020, 8, 3))
        );
        assert_eq!(
            cal.anchored(sh(2020, 12, 20, 9, 0), report),
            Ok(end_of(2021, 1, 4))
        );
        // A working day stays: Thursday 2020-10-01 is a holiday, but Monday 2020-06-01 is not.
        assert_eq!(
            cal.anchored(sh(2020, 5, 6, 9, 0), report),
            Ok(end_of(2020, 6, 1))
        );
        // The make-up Saturday 2020-10-10 would count, had 10-09 not been a working day.
        assert_eq!(cal.is_working_day(date(2020, 10, 10)), Ok(true));
        assert_eq!(
            report.to_string(),
            "by day 1 of next month, postponed over holidays"
        );
    }

    #[test]
    fn last_day_of_quarter_half_year_month_and_year() {
        let cal = cn();
        let quarter = anchor(AnchorDay::Last, Span::Quarter, false, false);
        assert_eq!(
            cal.anchored(sh(2020, 8, 15, 9, 0), quarter),
            Ok(end_of(2020, 9, 30))
        );
        assert_eq!(
            cal.anchored(sh(2020, 1, 1, 9, 0), quarter),
            Ok(end_of(2020, 3, 31))
        );
        // A midnight belongs to the day it begins: 2020-10-01 00:00 is in the fourth quarter,
        // so a quarterly deadline re-entered at the end of a quarter does not expire at once.
        assert_eq!(
            cal.anchored(sh(2020, 10, 1, 0, 0), quarter),
            Ok(end_of(2020, 12, 31))
        );
        assert_eq!(
            cal.anchored(sh(2020, 9, 30, 23, 59), quarter),
            Ok(end_of(2020, 9, 30))
        );
        let half = anchor(AnchorDay::Last, Span::HalfYear, false, false);
        assert_eq!(
            cal.anchored(sh(2020, 3, 3, 9, 0), half),
            Ok(end_of(2020, 6, 30))
        );
        assert_eq!(
            cal.anchored(sh(2020, 7, 1, 0, 0), half),
            Ok(end_of(2020, 12, 31))
        );
        let next_half = Anchor { next: true, ..half };
        assert_eq!(
            cal.anchored(sh(2020, 12, 31, 9, 0), next_half),
            Ok(end_of(2021, 6, 30))
        );
        // Leap February.
        let month = anchor(AnchorDay::Last, Span::Month, false, false);
        assert_eq!(
            cal.anchored(sh(2020, 2, 10, 9, 0), month),
            Ok(end_of(2020, 2, 29))
        );
        let year = anchor(AnchorDay::Last, Span::Year, false, false);
        assert_eq!(
            cal.anchored(sh(2020, 2, 10, 9, 0), year),
            Ok(end_of(2020, 12, 31))
        );
        // The last day of the first quarter of 2024 is Sunday 03-31: postponed to Monday 04-01.
        let postponed = Anchor {
            postpone: true,
            ..quarter
        };
        assert_eq!(
            cal.anchored(sh(2024, 2, 1, 9, 0), postponed),
            Ok(end_of(2024, 4, 1))
        );
        assert_eq!(quarter.to_string(), "by the last day of this quarter");
    }

    #[test]
    fn nth_day_of_a_span() {
        let cal = cn();
        // The 90th day of the first quarter of 2021 (not a leap year) is its last.
        let day90 = anchor(AnchorDay::Nth(90), Span::Quarter, false, false);
        assert_eq!(
            cal.anchored(sh(2021, 2, 1, 9, 0), day90),
            Ok(end_of(2021, 3, 31))
        );
        // In 2020 (leap) it is 03-30.
        assert_eq!(
            cal.anchored(sh(2020, 2, 1, 9, 0), day90),
            Ok(end_of(2020, 3, 30))
        );
        // The 1st of next year, postponed: 2022-01-01..03 are the New Year holidays.
        let new_year = anchor(AnchorDay::Nth(1), Span::Year, true, true);
        assert_eq!(
            cal.anchored(sh(2021, 6, 1, 9, 0), new_year),
            Ok(end_of(2022, 1, 4))
        );
        // A day already past this month: the deadline is already due.
        let twentieth = anchor(AnchorDay::Nth(20), Span::Month, false, false);
        let start = sh(2020, 9, 25, 9, 0);
        let due = cal.anchored(start, twentieth).expect("computes");
        assert_eq!(due, end_of(2020, 9, 20));
        assert!(due < start);
    }

    #[test]
    fn anchors_that_name_no_day_or_leave_the_calendar_are_errors() {
        let cal = cn();
        let start = sh(2020, 1, 15, 9, 0);
        for a in [
            anchor(AnchorDay::Nth(0), Span::Month, true, false),
            anchor(AnchorDay::Nth(30), Span::Month, true, false), // February 2020
            anchor(AnchorDay::Nth(92), Span::Quarter, false, false),
            anchor(AnchorDay::Nth(u32::MAX), Span::Year, false, false),
        ] {
            assert_eq!(
                cal.anchored(start, a),
                Err(CalendarError::NoSuchDay {
                    from: start,
                    anchor: a
                }),
                "{a}"
            );
        }
        let err = cal
            .anchored(start, anchor(AnchorDay::Nth(30), Span::Month, true, false))
            .unwrap_err();
        assert!(
            err.to_string().contains("by day 30 of next month")
                && err.to_string().contains("no such day"),
            "{err}"
        );
        // 顺延 needs the holiday file: 2027-01-01 is not covered ...
        let report = anchor(AnchorDay::Nth(1), Span::Month, true, true);
        assert!(matches!(
            cal.anchored(sh(2026, 12, 10, 9, 0), report),
            Err(CalendarError::OutOfRange { date, .. }) if date == date_2027_01_01()
        ));
        // ... but without it the day needs no coverage.
        assert_eq!(
            cal.anchored(
                sh(2026, 12, 10, 9, 0),
                Anchor {
                    postpone: false,
                    ..report
                }
            ),
            Ok(end_of(2027, 1, 1))
        );
        // Extreme instants do not panic.
        for t in [DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC] {
            for a in [report, anchor(AnchorDay::Last, Span::Year, true, false)] {
                let _ = cal.anchored(t, a);
                let _ = anchored_without_holidays(t, a);
            }
        }
        assert!(matches!(
            anchored_without_holidays(
                DateTime::<Utc>::MAX_UTC,
                anchor(AnchorDay::Last, Span::Year, true, false)
            ),
            Err(CalendarError::AnchorOverflow { .. })
        ));
    }

    /// Regression: a count starting exactly at midnight (typically another
    /// deadline's expiry) skipped the working day that midnight begins.
    #[test]
    fn a_count_from_midnight_loses_no_working_day() {
        let cal = cn();
        let midnight = sh(2020, 9, 30, 0, 0);
        assert_eq!(
            cal.add(midnight, Unit::WorkingDays, 1),
            Ok(end_of(2020, 9, 30))
        );
        // Chained counts equal one count: 7 then 1 working days is 8.
        let seven = cal
            .add(sh(2020, 9, 21, 9, 0), Unit::WorkingDays, 7)
            .expect("covered");
        assert_eq!(
            cal.add(seven, Unit::WorkingDays, 1),
            cal.add(sh(2020, 9, 21, 9, 0), Unit::WorkingDays, 8)
        );
        // And add and subtract agree on a midnight.
        let due = cal.add(midnight, Unit::WorkingDays, 3).expect("covered");
        assert_eq!(cal.subtract(due, Unit::WorkingDays, 3), Ok(midnight));
    }

    /// Regression: with no calendar loaded, the engine counted calendar days
    /// with its own copy of the rule, which missed the midnight convention.
    #[test]
    fn days_and_hours_without_a_calendar_follow_the_calendars_rules() {
        let cal = cn();
        for start in [
            sh(2020, 9, 30, 0, 0),
            sh(2020, 9, 30, 9, 30),
            sh(2020, 9, 30, 23, 59),
        ] {
            for n in [0, 1, 7, 30] {
                for unit in [Unit::Days, Unit::Hours] {
                    assert_eq!(
                        cal.add(start, unit, n),
                        add_without_holidays(start, unit, n),
                        "{start} +{n} {unit:?}"
                    );
                    assert_eq!(
                        cal.subtract(start, unit, n),
                        subtract_without_holidays(start, unit, n),
                        "{start} -{n} {unit:?}"
                    );
                }
            }
        }
        assert_eq!(
            add_without_holidays(sh(2020, 9, 30, 0, 0), Unit::WorkingDays, 1),
            Err(CalendarError::NoCalendar)
        );
    }
}
