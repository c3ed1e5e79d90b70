//! `coord publish`: append one event through the gate.

use std::time::Duration;

use clap::Args;
use coord::{ExpectedVersion, NewEvent, Publisher, RetryPolicy};

use crate::context::Context;
use crate::output;

/// Arguments of `coord publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Stream id.
    #[arg(long)]
    pub stream: String,
    /// Event type.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: String,
    /// Payload, a JSON document; `@PATH` reads it from a file, `-` from
    /// standard input (for payloads beyond the argument limit).
    #[arg(long, value_name = "JSON|@PATH|-")]
    pub data: String,
    /// Metadata, a JSON document.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// The version the stream must be at (0: must not exist yet).
    #[arg(long, value_name = "N")]
    pub expected_version: Option<i64>,
    /// Keep retrying while the projector is activating, for up to this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub retry_for: f64,
}

fn json_arg(flag: &str, text: &str) -> Result<serde_json::Value, coord::Error> {
    serde_json::from_str(text)
        .map_err(|e| coord::Error::InvalidInput(format!("--{flag} is not valid JSON: {e}")))
}

/// `--data`: the JSON text itself, `@PATH` (a file) or `-` (standard input).
fn data_arg(value: &str) -> Result<serde_json::Value, coord::Error> {
    let (source, text) = if value == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| {
            coord::Error::InvalidInput(format!("--data -: cannot read standard input: {e}"))
        })?;
        ("standard input", text)
    } else if let Some(path) = value.strip_prefix('@') {
        let text = std::fs::read_to_string(path).map_err(|e| {
            coord::Error::InvalidInput(format!("--data @{path}: cannot read {path}: {e}"))
        })?;
        (path, text)
    } else {
        return json_arg("data", value);
    };
    serde_json::from_str(&text)
        .map_err(|e| coord::Error::InvalidInput(format!("--data: {source} is not valid JSON: {e}")))
}

pub async fn run(ctx: &Context, args: PublishArgs) -> anyhow::Result<()> {
    let data = data_arg(&args.data)?;
    let metadata = args
        .metadata
        .as_deref()
        .map(|m| json_arg("metadata", m))
        .transpose()?;
    if metadata.as_ref().is_some_and(|m| !m.is_object()) {
        return Err(coord::Error::InvalidInput("--metadata must be a JSON object".into()).into());
    }
    if args.stream.is_empty() {
        return Err(coord::Error::InvalidInput("--stream must not be empty".into()).into());
    }
    coord::check_event_type(&args.event_type)
        .map_err(|e| coord::Error::InvalidInput(format!("--type: {e}")))?;
    let expected = match args.expected_version {
        None => ExpectedVersion::Any,
        Some(v) if v < 0 => {
            return Err(
                coord::Error::InvalidInput(format!("--expected-version {v} is negative")).into(),
            )
        }
        Some(v) => ExpectedVersion::Exact(v),
    };
    if !(args.retry_for.is_finite() && args.retry_for >= 0.0) {
        return Err(coord::Error::InvalidInput(
            "--retry-for must be a number of seconds >= 0".into(),
        )
        .into());
    }
    let config = ctx.config()?;
    let mut client = ctx.connect(Some(&config)).await?;
    coord::ensure_writable(&client).await?;
    let publisher = Publisher::new(ctx.projectors(&config));
    let event = NewEvent {
        event_type: args.event_type,
        data,
        metadata,
    };
    let policy = RetryPolicy {
        deadline: Duration::from_secs_f64(args.retry_for),
        ..RetryPolicy::default()
    };
    let stored = publisher
        .publish_with_retry(
            &mut client,
            &args.stream,
            expected,
            std::slice::from_ref(&event),
            policy,
        )
        .await?;
    let event = &stored[0];
    if ctx.json() {
        return output::json(&serde_json::json!({
            "position": event.position,
            "stream_id": event.stream_id,
            "stream_version": event.stream_version,
        }));
    }
    println!("{}", event.position);
    Ok(())
}
