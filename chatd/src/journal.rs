//! A `tracing` layer that writes each event to the systemd journal as a
//! native record, through `systemd-journal-logger`.
//!
//! The event's message becomes `MESSAGE`, its level `PRIORITY`, and every
//! field of the event and of the spans it is in (the connection span carries
//! `client`, `peer` and `nick`) becomes a journal field of its own (`CLIENT`,
//! `PEER`, `NICK`, `ROOM`…), so `journalctl NICK=alice` finds a user's
//! records. The innermost value wins when an event and a span share a name.

use std::fmt::{self, Write as _};

use systemd_journal_logger::JournalLog;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The layer; build it with [`JournalLayer::connect`].
pub struct JournalLayer {
    journal: JournalLog,
}

impl JournalLayer {
    /// Opens the journal socket; fails when no journal is listening.
    pub fn connect() -> std::io::Result<JournalLayer> {
        Ok(JournalLayer {
            journal: JournalLog::new()?.with_syslog_identifier("chatd".to_string()),
        })
    }
}

/// A span's fields, kept in its extensions as `(name, value)` pairs.
#[derive(Default)]
struct Fields(Vec<(&'static str, String)>);

impl Fields {
    fn set(&mut self, name: &'static str, value: String) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.set(field.name(), text);
    }
}

impl<S> Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<Fields>() {
            values.record(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(span_fields) = span.extensions().get::<Fields>() {
                    for (name, value) in &span_fields.0 {
                        fields.set(name, value.clone());
                    }
                }
            }
        }
        event.record(&mut fields);
        let message = fields
            .0
            .iter()
            .position(|(n, _)| *n == "message")
            .map(|i| fields.0.swap_remove(i).1)
            .unwrap_or_default();
        // Dotted names (`otel.name`) and the `log` bridge's own fields are
        // not worth a journal field.
        fields
            .0
            .retain(|(n, _)| !n.starts_with("otel.") && !n.starts_with("log."));
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => log::Level::Error,
            Level::WARN => log::Level::Warn,
            Level::INFO => log::Level::Info,
            Level::DEBUG => log::Level::Debug,
            Level::TRACE => log::Level::Trace,
        };
        let kvs: &[(&str, String)] = &fields.0;
        // A journal that went away cannot be told about it; the record is
        // lost, never retried, so logging cannot block or grow.
        let _ = self.journal.journal_send(
            &log::Record::builder()
                .args(format_args!("{message}"))
                .level(level)
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kvs)
                .build(),
        );
    }
}
