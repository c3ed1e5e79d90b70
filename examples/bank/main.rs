//! A small bank that uses coord as an application would: a balance projector
//! written in Rust (v1 and v2 differ), publishers that go through the gate
//! and retry while an activation holds their events back, and every `coord`
//! command with its Rust projector added (`bank coord ...`, through
//! [`coord::cli::run_from`]), so a deploy pipeline runs
//! `bank --app-version 2 coord activate-current-config` exactly as it would
//! run `coord activate-current-config` for projectors defined in coord.toml.
//!
//! ```sh
//! cargo run --example bank -- --app-version 1 load --events 300000
//! cargo run --example bank -- --app-version 1 coord activate-current-config
//! cargo run --example bank -- --app-version 1 publish --seconds 20 --out v1.json &
//! cargo run --example bank -- --app-version 2 coord activate-current-config
//! cargo run --example bank -- --app-version 2 coord status
//! ```

mod projectors;

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coord::{
    DatabaseUrl, Error, ExpectedVersion, NewEvent, Projector, ProjectorSet, Publisher, RetryPolicy,
};
use rand::{Rng, SeedableRng};

/// The bank application.
#[derive(Debug, Parser)]
struct Cli {
    /// Which version of the application this instance runs (1 or 2).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    app_version: u8,
    /// PostgreSQL URL (for `load` and `publish`; `coord` has its own --database-url).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import a history of bank events straight into the store (before coord manages it).
    Load {
        /// Events in all.
        #[arg(long, default_value_t = 300_000)]
        events: i64,
        /// Accounts.
        #[arg(long, default_value_t = 10_000)]
        accounts: i64,
    },
    /// Every `coord` command, with this version's Rust projectors: `bank coord activate-current-config`, `bank coord status`, ...
    #[command(disable_help_flag = true)]
    Coord {
        /// The `coord` command line.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Publish deposits and withdrawals through the gate until told to stop or time runs out.
    Publish {
        /// Concurrent publishers.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Accounts to pick from.
        #[arg(long, default_value_t = 10_000)]
        accounts: i64,
        /// Write a JSON summary here at the end.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn projectors(app_version: u8) -> ProjectorSet {
    let balances: Arc<dyn Projector> = Arc::new(projectors::Balances::new(app_version));
    ProjectorSet::new(vec![balances]).expect("one projector")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Coord { args } = cli.command {
        let program = OsString::from(format!("bank --app-version {} coord", cli.app_version));
        return coord::cli::run_from(
            std::iter::once(program).chain(args),
            projectors(cli.app_version),
        );
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bank: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = cli.database_url.as_deref().ok_or_else(|| {
        anyhow::anyhow!("no database URL: pass --database-url or set DATABASE_URL")
    })?;
    let url = DatabaseUrl::parse(url).map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Load { events, accounts } => load(&url, events, accounts).await,
        Command::Coord { .. } => unreachable!("handled in main"),
        Command::Publish {
            publishers,
            seconds,
            accounts,
            out,
        } => {
            publish(
                &url,
                cli.app_version,
                publishers,
                Duration::from_secs_f64(seconds),
                accounts,
                out,
            )
            .await
        }
    }
}

async fn load(url: &DatabaseUrl, events: i64, accounts: i64) -> anyhow::Result<()> {
    anyhow::ensure!(
        accounts > 0 && events >= accounts,
        "--events must be at least --accounts"
    );
    let mut client = coord::connect(url, Duration::from_secs(10)).await?;
    coord::migrate(&mut client).await?;
    let started = Instant::now();
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'account-' || a, 1, 'AccountOpened', jsonb_build_object('owner', 'customer ' || a, 'currency', 'EUR') \
             FROM generate_series(1, $1::int8) AS a",
            &[&accounts],
        )
        .await?;
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'account-' || (i % $1 + 1), i / $1 + 2, \
                    CASE WHEN i % 3 = 0 THEN 'MoneyWithdrawn' ELSE 'MoneyDeposited' END, \
                    jsonb_build_object('amount', i % 97 + 1, 'reference', md5(i::text), 'channel', 'import') \
             FROM generate_series(0, $2::int8 - $1 - 1) AS i",
            &[&accounts, &events],
        )
        .await?;
    client.batch_execute("ANALYZE coord.events").await?;
    println!(
        "loaded {events} events over {accounts} accounts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    app_version: u8,
    published: u64,
    refused_newer_active: u64,
    waited_not_yet_active: u64,
    conflicts_retried: u64,
    max_publish_ms: f64,
    first_refusal: Option<String>,
}

async fn publish(
    url: &DatabaseUrl,
    app_version: u8,
    publishers: usize,
    duration: Duration,
    accounts: i64,
    out: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let publisher = Arc::new(Publisher::new(projectors(app_version)));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let mut client = coord::connect(url, Duration::from_secs(10)).await?;
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            let mut summary = Summary {
                app_version,
                ..Summary::default()
            };
            let mut rng = rand::rngs::StdRng::from_entropy();
            while Instant::now() < deadline {
                let account = format!("account-{}", rng.gen_range(1..=accounts));
                let amount: i64 = rng.gen_range(1..500);
                let event_type = if rng.gen_bool(0.7) {
                    "MoneyDeposited"
                } else {
                    "MoneyWithdrawn"
                };
                let event = NewEvent::new(
                    event_type,
                    serde_json::json!({"amount": amount, "channel": "app"}),
                );
                let started = Instant::now();
                let result = publisher
                    .publish_with_retry(
                        &mut client,
                        &account,
                        ExpectedVersion::Any,
                        &[event],
                        RetryPolicy::default(),
                    )
                    .await;
                let ms = started.elapsed().as_secs_f64() * 1e3;
                match result {
                    Ok(_) => {
                        summary.published += 1;
                        summary.max_publish_ms = summary.max_publish_ms.max(ms);
                    }
                    Err(Error::ProjectorNotYetActive { .. }) => {
                        // A new instance not yet in the load balancer: wait for readiness.
                        summary.waited_not_yet_active += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(Error::StreamVersionConflict { .. }) => summary.conflicts_retried += 1,
                    Err(e @ Error::NewerProjectorIsActive { .. }) => {
                        // Stale instance: fail fast; the load balancer takes it out.
                        summary.refused_newer_active += 1;
                        summary.max_publish_ms = summary.max_publish_ms.max(ms);
                        // Its text starts with the error's name and SQLSTATE.
                        summary.first_refusal.get_or_insert_with(|| e.to_string());
                        break;
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok(summary)
        }));
    }
    let mut total = Summary {
        app_version,
        ..Summary::default()
    };
    for task in tasks {
        let s = task.await??;
        total.published += s.published;
        total.refused_newer_active += s.refused_newer_active;
        total.waited_not_yet_active += s.waited_not_yet_active;
        total.conflicts_retried += s.conflicts_retried;
        total.max_publish_ms = total.max_publish_ms.max(s.max_publish_ms);
        if total.first_refusal.is_none() {
            total.first_refusal = s.first_refusal;
        }
    }
    let json = serde_json::to_string_pretty(&total)?;
    match out {
        Some(path) => std::fs::write(path, json)?,
        None => println!("{json}"),
    }
    Ok(())
}
