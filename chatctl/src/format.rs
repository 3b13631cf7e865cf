//! Turning values into text for people: durations, sizes, times, and
//! aligned tables. Everything a peer controls goes through [`clean`] before
//! it reaches a terminal.

use std::borrow::Cow;
use std::io::{self, Write};
use std::time::{Duration, SystemTime};

/// A span in its two largest units: `45s`, `3m12s`, `2h05m`, `3d04h`.
pub fn duration(span: Duration) -> String {
    let secs = span.as_secs();
    let (days, hours, mins, secs) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{mins:02}m")
    } else if mins > 0 {
        format!("{mins}m{secs:02}s")
    } else {
        format!("{secs}s")
    }
}

/// A byte count in binary units: `512B`, `1.5KiB`, `20.0MiB`.
/// `lines 3 in, 5 out` and `bytes 1.0KiB in, 2.0KiB out`: the in/out pair
/// of the `client` and `stats` detail views.
pub fn in_out(input: impl std::fmt::Display, output: impl std::fmt::Display) -> String {
    format!("{input} in, {output} out")
}

pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if count < 1024 {
        return format!("{count}B");
    }
    // Precision loss above 2^53 bytes is irrelevant at one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut value = count as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// A count and its noun, in the singular for exactly one: `1 event`,
/// `2 events`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// A protobuf timestamp as a `SystemTime`; `None` when unset or out of range.
pub fn system_time(ts: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    ts.and_then(|ts| SystemTime::try_from(*ts).ok())
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-01-31T12:00:00.000Z`.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// How long ago `then` was, or `-` when unknown; a time in the future (clock
/// skew) counts as now.
pub fn ago(then: Option<SystemTime>, now: SystemTime) -> String {
    match then {
        Some(then) => duration(now.duration_since(then).unwrap_or_default()),
        None => "-".to_owned(),
    }
}

/// Replaces control characters (and escape sequences with them) by visible
/// escapes, so text from chat users cannot drive the terminal.
pub fn clean(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table with a fixed header; columns are separated by two spaces and
/// padded to their widest cell. An empty table prints its header only.
#[derive(Debug)]
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one cell per column.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .map(|(h, _)| h.chars().count())
            .collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, ((cell, width), (_, align))) in
                row.iter().zip(&widths).zip(&self.columns).enumerate()
            {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = width.saturating_sub(cell.chars().count());
                match align {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// Prints `key: value` lines with the values aligned.
pub fn write_fields(out: &mut dyn Write, fields: &[(&str, String)]) -> io::Result<()> {
    let width = fields
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (key, value) in fields {
        writeln!(
            out,
            "{:<width$}  {value}",
            format!("{key}:"),
            width = width + 1
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(count(1, "event", "events"), "1 event");
        assert_eq!(count(0, "event", "events"), "0 events");
        assert_eq!(count(7, "event", "events"), "7 events");
    }

    #[test]
    fn table_aligns_and_trims() {
        let mut table = Table::new(&[
            ("ID", Align::Right),
            ("NICK", Align::Left),
            ("ROOM", Align::Left),
        ]);
        table.row(vec!["7".into(), "alice".into(), "lobby".into()]);
        table.row(vec!["12".into(), "bo".into(), "".into()]);
        let mut out = Vec::new();
        table.write(&mut out).expect("writing to a Vec cannot fail");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "ID  NICK   ROOM\n 7  alice  lobby\n12  bo\n"
        );
    }

    #[test]
    fn clean_escapes_controls() {
        assert_eq!(clean("hi"), "hi");
        assert_eq!(clean("a\u{1b}[31mb"), "a\\u{1b}[31mb");
        assert_eq!(clean("x\u{202e}y"), "x\\u{202e}y");
    }
}
