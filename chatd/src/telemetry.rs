//! Logging and tracing setup. The same `tracing` events and spans feed every
//! sink:
//!
//! - **stderr**: human-readable text or JSON lines (`[log] format`);
//! - **the systemd journal**, instead of stderr, when stderr is connected to
//!   it (`JOURNAL_STREAM`, as under systemd) or `[log] target = "journald"`:
//!   native records with the structured fields as journal fields (see
//!   [`journal`](crate::journal));
//! - **OpenTelemetry traces** over OTLP/gRPC when `[telemetry] otlp_endpoint`
//!   or `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Spans are batched on a
//!   dedicated thread with a bounded queue: when the collector is slow or
//!   down, spans are dropped (and the drop is logged), never waited for.
//!
//! The level filter sits in front of every sink and can be changed at run
//! time ([`LogLevel`]), which is how a config reload changes `log.level`.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::layer::Layered;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::journal::JournalLayer;
use chatd_config::{LogConfig, LogFormat, LogTarget, TelemetryConfig};

/// Spans waiting for export; beyond it new spans are dropped.
const SPAN_QUEUE: usize = 4096;
/// How long shutdown waits for the last spans to be exported.
const FLUSH_DEADLINE: Duration = Duration::from_secs(3);

/// Changes the log filter of the running daemon.
#[derive(Debug, Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it wins over `log.level`, also on reload.
    pinned: bool,
}

impl LogLevel {
    /// Applies `level` (already validated); false when `RUST_LOG` pins the
    /// filter or the subscriber is gone.
    pub fn set(&self, level: &str) -> bool {
        if self.pinned {
            return false;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => self.handle.reload(filter).is_ok(),
            Err(_) => false,
        }
    }
}

/// Whether the text log may be coloured: only on a terminal, and never when
/// `NO_COLOR` is set (<https://no-color.org>). Colour codes in a file or a
/// pipe are noise to whoever reads it.
fn colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// What [`init`] set up that needs a clean stop.
#[must_use = "call shutdown() to export the last spans"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    log: LogLevel,
}

impl Telemetry {
    /// The handle a config reload uses to change the log level.
    pub fn log_level(&self) -> LogLevel {
        self.log.clone()
    }

    /// Exports what spans remain, within a short deadline.
    pub async fn shutdown(self) {
        let Some(provider) = self.tracer else { return };
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        let _ = tokio::time::timeout(FLUSH_DEADLINE, flush).await;
    }
}

/// The subscriber every sink layers onto: the registry behind the
/// reloadable level filter.
type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type BoxedLayer = Box<dyn Layer<Filtered> + Send + Sync>;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides
/// `log.level`. Must run inside the tokio runtime when tracing is on (the
/// gRPC channel lives there).
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> Telemetry {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok());
    let pinned = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&log.level));
    let (filter, handle) = reload::Layer::new(filter);
    let mut layers: Vec<BoxedLayer> = Vec::new();
    let mut problems = Vec::new();

    let journald = match log.target {
        LogTarget::Stderr => false,
        LogTarget::Journald => true,
        LogTarget::Auto => systemd_journal_logger::connected_to_journal(),
    };
    let journal = journald.then(JournalLayer::connect).and_then(|r| match r {
        Ok(layer) => Some(layer),
        Err(e) => {
            problems.push(format!(
                "cannot write to the systemd journal ({e}); logging to stderr"
            ));
            None
        }
    });
    match journal {
        Some(layer) => layers.push(layer.boxed()),
        None => {
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour());
            layers.push(match log.format {
                LogFormat::Text => fmt
                    .fmt_fields(crate::log_fields::LatestFields::default())
                    .boxed(),
                LogFormat::Json => fmt
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .boxed(),
            });
        }
    }

    let tracer = if tracing_wanted(telemetry) {
        match tracer_provider(telemetry) {
            Ok(provider) => {
                let tracer = provider.tracer("chatd");
                layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
                Some(provider)
            }
            Err(e) => {
                problems.push(format!("cannot set up OpenTelemetry tracing: {e}"));
                None
            }
        }
    } else {
        None
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .init();
    for problem in problems {
        tracing::warn!("{problem}");
    }
    Telemetry {
        tracer,
        log: LogLevel { handle, pinned },
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn tracing_wanted(telemetry: &TelemetryConfig) -> bool {
    telemetry.otlp_endpoint.is_some()
        || env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
        || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
}

fn tracer_provider(
    telemetry: &TelemetryConfig,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = &telemetry.otlp_endpoint {
        exporter = exporter.with_endpoint(endpoint.clone());
    }
    let processor = BatchSpanProcessor::builder(exporter.build()?)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(SPAN_QUEUE)
                .build(),
        )
        .build();
    // The standard variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)
    // are read by the builder; "chatd" is only the fallback name.
    let named = env_set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if !named {
        resource = resource.with_service_name("chatd");
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}
