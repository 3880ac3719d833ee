//! Logs and traces: the process-wide `tracing` subscriber.
//!
//! Logs go to stderr as text (default) or JSON, one object per line
//! (`--log-format json`), filtered by `RUST_LOG`. In builds with the `otlp`
//! feature, `--otlp-endpoint URL` also exports spans over OTLP/gRPC; the
//! default build carries no OpenTelemetry code and refuses the flag with a
//! message saying how to get it. Nothing here ever records a token, a key
//! or a request body: spans carry the route and method, never the query.

use serde::{Deserialize, Serialize};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (colour on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the
    /// event's fields flattened, and the current span.
    Json,
}

/// The default filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,openraft=warn,sled=warn";

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `--otlp-endpoint` on a build without the `otlp` feature.
    #[error(
        "this build has no OTLP export: rebuild with `cargo build --features tollgate-node/otlp`"
    )]
    OtlpNotBuilt,
    /// The OTLP exporter could not be built (a malformed endpoint, say).
    #[error("OTLP exporter: {0}")]
    Otlp(String),
}

/// Keeps the OTLP exporter alive; [`Self::shutdown`] flushes it.
#[derive(Default)]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops span export (nothing without OTLP).
    pub async fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            // Shutting down waits for the export task on the runtime: wait
            // on a blocking thread, not on a worker that task may need.
            let stopped = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = stopped {
                eprintln!("OTLP export did not shut down cleanly: {e}");
            }
        }
    }
}

/// Installs the subscriber. Call once, inside the Tokio runtime (the OTLP
/// exporter runs on it). A second call leaves the first subscriber in place.
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<TelemetryGuard, TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json);

    #[cfg(feature = "otlp")]
    {
        let provider = otlp_endpoint.map(otlp::provider).transpose()?;
        let layer = provider.as_ref().map(|p| {
            use opentelemetry::trace::TracerProvider as _;
            tracing_opentelemetry::layer().with_tracer(p.tracer("tollgate"))
        });
        let _ = registry.with(layer).try_init();
        Ok(TelemetryGuard { provider })
    }
    #[cfg(not(feature = "otlp"))]
    {
        if otlp_endpoint.is_some() {
            return Err(TelemetryError::OtlpNotBuilt);
        }
        let _ = registry.try_init();
        Ok(TelemetryGuard::default())
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;

    use super::TelemetryError;

    /// A tracer provider exporting batches to `endpoint` (OTLP/gRPC, e.g.
    /// `http://127.0.0.1:4317`). Batches are sent from a task on the Tokio
    /// runtime, which the gRPC client needs.
    pub fn provider(endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        Ok(SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(Resource::builder().with_service_name("tollgate").build())
            .build())
    }
}
