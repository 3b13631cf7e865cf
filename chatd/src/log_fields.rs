//! Span fields for the text log that keep one value per field.
//!
//! tracing-subscriber's text format appends a field recorded again to the
//! span's fields, so `nick=a nick=b …` grows with every rename and is
//! printed on every later line of that connection: ten thousand renames,
//! which flood control allows, made lines of hundreds of kilobytes.
//! [`LatestFields`] formats like the default and replaces a re-recorded
//! field instead. (The JSON format, the journal and OpenTelemetry already
//! keep the latest value.)

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields};

/// The default field formatter, without colour in span fields (so that they
/// can be edited), replacing rather than appending re-recorded fields.
#[derive(Debug, Default)]
pub struct LatestFields {
    inner: DefaultFields,
}

impl<'w> FormatFields<'w> for LatestFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut plain = String::new();
        self.inner.format_fields(Writer::new(&mut plain), fields)?;
        writer.write_str(&plain)
    }

    fn add_fields(&self, current: &mut FormattedFields<Self>, fields: &Record<'_>) -> fmt::Result {
        let mut names = Names(Vec::new());
        fields.record(&mut names);
        for name in names.0 {
            remove_field(&mut current.fields, name);
        }
        let mut added = String::new();
        self.inner.format_fields(Writer::new(&mut added), fields)?;
        if !added.is_empty() {
            if !current.fields.is_empty() {
                current.fields.push(' ');
            }
            current.fields.push_str(&added);
        }
        Ok(())
    }
}

/// Collects the names of the fields being recorded.
struct Names(Vec<&'static str>);

impl Visit for Names {
    fn record_debug(&mut self, field: &Field, _: &dyn fmt::Debug) {
        self.0.push(field.name());
    }
}

/// Removes `name=value` from space-separated `key=value` fields; a value
/// runs to the next ` key=`.
fn remove_field(fields: &mut String, name: &str) {
    let starts = field_starts(fields);
    let Some(pos) = starts.iter().position(|&i| {
        fields[i..]
            .strip_prefix(name)
            .is_some_and(|r| r.starts_with('='))
    }) else {
        return;
    };
    let start = starts[pos];
    match starts.get(pos + 1) {
        Some(&next) => fields.replace_range(start..next, ""),
        None => fields.truncate(start.saturating_sub(1)),
    }
}

/// Where each `key=` begins: at 0 or after a space, a key being an
/// identifier (letters, digits, `_`, `.`).
fn field_starts(fields: &str) -> Vec<usize> {
    let bytes = fields.as_bytes();
    let is_key_start = |i: usize| {
        let key = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b == b'.')
            .count();
        key > 0 && bytes.get(i + key) == Some(&b'=')
    };
    (0..bytes.len())
        .filter(|&i| (i == 0 || bytes[i - 1] == b' ') && is_key_start(i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_replaced_wherever_it_is() {
        let mut f = String::from("client=1 peer=127.0.0.1:4 nick=guest-1");
        remove_field(&mut f, "nick");
        assert_eq!(f, "client=1 peer=127.0.0.1:4");
        let mut f = String::from("client=1 nick=a peer=x");
        remove_field(&mut f, "nick");
        assert_eq!(f, "client=1 peer=x");
        let mut f = String::from("nick=a client=1");
        remove_field(&mut f, "nick");
        assert_eq!(f, "client=1");
        let mut f = String::from("client=1");
        remove_field(&mut f, "nick");
        assert_eq!(f, "client=1");
    }
}
