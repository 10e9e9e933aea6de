//! Logs, metrics and Kubernetes Events: what the agent tells the operator.
//!
//! The bottom floor of the agent: nothing here imports another module of the agent, so every
//! other module can report through it. Nothing secret is ever a label, a log field or an event.

pub mod events;
pub mod metrics;

pub(crate) use events::{EventSink, PodRef};
pub use metrics::Metrics;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object a line, for log collectors (the in-cluster default).
    Json,
    /// Human-readable lines.
    Text,
}

/// Installs the global subscriber (JSON in-cluster by default; `RUST_LOG` filters). Every line
/// names `node`, the node this agent serves.
pub fn init_logging(format: LogFormat, node: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in files or log collectors.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(json::JsonLine::new(node))
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

pub mod json;
