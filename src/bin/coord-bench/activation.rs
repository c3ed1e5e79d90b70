//! `coord-bench activation`: how long publishers are blocked or refused when
//! version N+1 is activated under continuous publishing by N, over a store of
//! at least a million events, and whether any event was lost or applied twice.

mod ledger;
mod publish;
mod report;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coord::activation::{self, ActivateOptions, ActivationReport};
use coord::Actor;
use coord::RetryPolicy;
use coord::{Error, ExpectedVersion, NewEvent, Projector, ProjectorSet, Publisher, RelationName};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::support::BenchDb;
use crate::OutputFormat;
use ledger::Ledger;
use publish::{spawn_publishers, Attempts};
use report::{Report, Windows};

/// Arguments of `coord-bench activation`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events in the store before the upgrade (at least 1,000,000 for the reported figure).
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Accounts (streams).
    #[arg(long, default_value_t = 10_000)]
    accounts: i64,
    /// Concurrent publishers of version N.
    #[arg(long, default_value_t = 16)]
    publishers: usize,
    /// Server to create the benchmark database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Keep a transaction of an unrelated event type open for this many
    /// seconds from the start of the activation, after N+1 is replayed (it
    /// has passed the gate, so the flip must wait for it): measures how long
    /// publishers of the activated projector wait inside the gate meanwhile.
    /// The activation is retried until it completes.
    #[arg(long, value_name = "SECONDS")]
    long_transaction: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

/// What one activation needs besides the projectors.
struct Activation {
    pool: deadpool_postgres::Pool,
    url: coord::DatabaseUrl,
    events: RelationName,
    options: ActivateOptions,
    actor: Actor,
    cancel: CancellationToken,
}

impl Activation {
    async fn activate(&self, set: &ProjectorSet) -> coord::Result<ActivationReport> {
        activation::activate_current_config(
            &self.pool,
            &self.url,
            set,
            &self.events,
            &self.options,
            &self.actor,
            &self.cancel,
        )
        .await
    }

    /// Replays `set` without activating it.
    async fn replay(&self, set: &ProjectorSet) -> anyhow::Result<()> {
        let projectors: Vec<Arc<dyn Projector>> = set.iter().cloned().collect();
        for outcome in coord::replay::replay_many(
            &self.pool,
            &projectors,
            &self.events,
            &self.options.replay,
            &self.actor,
            &self.cancel,
        )
        .await
        {
            outcome.result?;
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.accounts > 0 && args.events >= args.accounts,
        "--events must be at least --accounts"
    );
    anyhow::ensure!(args.publishers > 0, "--publishers must be at least 1");
    let db = BenchDb::create(&args.database_url, "activation").await?;
    let client = db.client().await?;
    let text = args.output == OutputFormat::Text;
    let say = |line: &str| {
        if text {
            eprintln!("{line}");
        }
    };
    say(&format!(
        "loading {} events over {} accounts...",
        args.events, args.accounts
    ));
    load_store(&client, args.accounts, args.events).await?;

    let run = Activation {
        pool: coord::pool(&db.url, 8)?,
        url: db.url.clone(),
        events: RelationName::default(),
        options: ActivateOptions::default(),
        actor: Actor::new("coord-bench", "coord-bench activation"),
        cancel: CancellationToken::new(),
    };
    let v1 = ProjectorSet::new(vec![Ledger::at(1)])?;
    let v2 = ProjectorSet::new(vec![Ledger::at(2)])?;
    say("activating N (bootstrap replay)...");
    run.activate(&v1).await?;

    // Publishers of N, continuously, until refused.
    let origin = Instant::now();
    let attempts: Attempts = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // The publishers' own runtime (see `spawn_publishers`).
    let publishing = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tasks = spawn_publishers(
        publishing.handle(),
        &db,
        &v1,
        args.publishers,
        args.accounts,
        origin,
        &attempts,
        &stop,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // a baseline of ordinary publishing
    say("replaying and activating N+1 while N publishes...");
    if args.long_transaction.is_some() {
        // Replay first, so that the long transaction overlaps the critical
        // section rather than the replay.
        run.replay(&v2).await?;
    }
    let activation_started = origin.elapsed();
    let long = match args.long_transaction {
        Some(seconds) => Some(hold_long_transaction(db.client().await?, seconds).await),
        None => None,
    };
    let mut activations_given_up = 0u32;
    let report = loop {
        match run.activate(&v2).await {
            Err(e @ Error::LockDeadline { .. }) if long.is_some() => {
                say(&format!("activation gave up ({e}); retrying"));
                activations_given_up += 1;
            }
            other => break other?,
        }
    };
    if let Some(task) = long {
        task.await??;
    }
    let flipped = origin.elapsed();
    let step = &report.steps[0];
    let switch = step.switch.as_ref().expect("an activation");
    let hold_start = flipped.saturating_sub(Duration::from_secs_f64(switch.held_back_ms / 1e3));
    let (mut published_n, mut refused) = (0, 0);
    let mut connections = Vec::new();
    for task in tasks {
        let (p, r, client) = task.await??;
        published_n += p;
        refused += r;
        connections.push(client);
    }
    drop(connections);
    stop.store(true, Ordering::SeqCst);

    // Its tasks have ended; its threads go without blocking this runtime.
    publishing.shutdown_background();
    let published_n1 = publish_after_flip(&db, &v2, args.accounts).await?;
    let attempts = attempts.lock().expect("not poisoned").clone();
    let windows = Windows::of(&attempts, hold_start, flipped, activation_started);
    let (lost, applied_twice) = lost_and_applied_twice(&client).await?;
    let events_in_store: i64 = client
        .query_one("SELECT count(*) FROM coord.events", &[])
        .await?
        .get(0);
    drop(run);
    db.drop_database().await?;

    let report = Report {
        bench: "activation",
        events_in_store,
        publishers: args.publishers,
        published_by_n: published_n,
        published_by_n_plus_1: published_n1,
        refused,
        replay_seconds: step.replay_seconds,
        replay_events_per_s: step.replayed_events as f64 / step.replay_seconds.max(1e-9),
        held_back_ms: switch.held_back_ms,
        critical_section_ms: switch.critical_ms,
        final_catch_up_events: switch.final_events,
        baseline_publish_ms_p99: windows.baseline_p99,
        publish_before_activation_ms_max: windows.before_activation_max,
        blocked_window_ms_max: windows.blocked_max,
        blocked_window_ms_p99: windows.blocked_p99,
        longest_gate_wait_ms: windows.longest_gate_wait,
        long_transaction_s: args.long_transaction,
        activations_given_up,
        lost,
        applied_twice,
    };
    if args.output == OutputFormat::Json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.text());
    }
    Ok(())
}

/// `accounts` opened accounts, then deposits up to `events` events in all.
async fn load_store(client: &Client, accounts: i64, events: i64) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acct-' || a, 1, 'AccountOpened', '{}' FROM generate_series(1, $1::int8) a",
            &[&accounts],
        )
        .await?;
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acct-' || (i % $1 + 1), i / $1 + 2, 'MoneyDeposited', \
                    jsonb_build_object('amount', i % 100 + 1, 'reference', md5(i::text)) \
             FROM generate_series(0, $2::int8 - $1 - 1) i",
            &[&accounts, &events],
        )
        .await?;
    client.batch_execute("ANALYZE coord.events").await?;
    Ok(())
}

/// Opens a transaction that passes the gate for an unrelated event type and
/// keeps it open `seconds`; returns once it holds the gate.
async fn hold_long_transaction(mut client: Client, seconds: f64) -> JoinHandle<anyhow::Result<()>> {
    let ready = Arc::new(tokio::sync::Notify::new());
    let notified = ready.clone();
    let task = tokio::spawn(async move {
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT coord.check_publish('{\"ledger\": \"1.0.0\"}'::jsonb, ARRAY['SomethingElse'])",
            &[],
        )
        .await?;
        notified.notify_one();
        // The scenario's length, not an ordering device.
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        tx.commit().await?;
        anyhow::Ok(())
    });
    ready.notified().await;
    task
}

/// N+1 publishes 100 events after the flip; returns how many it published.
async fn publish_after_flip(db: &BenchDb, v2: &ProjectorSet, accounts: i64) -> anyhow::Result<u64> {
    let publisher = Publisher::new(v2.clone());
    let mut client = db.client().await?;
    let mut published = 0;
    for i in 0..100 {
        let event = NewEvent::new("MoneyDeposited", serde_json::json!({"amount": 1}));
        publisher
            .publish_with_retry(
                &mut client,
                &format!("acct-{}", i % accounts + 1),
                ExpectedVersion::Any,
                &[event],
                RetryPolicy::default(),
            )
            .await?;
        published += 1;
    }
    Ok(published)
}

/// Events of the store N+1's ledger lacks, and events it counted twice.
async fn lost_and_applied_twice(client: &Client) -> anyhow::Result<(i64, i64)> {
    let row = client
        .query_one(
            "WITH truth AS (SELECT stream_id AS account, count(*) AS events FROM coord.events GROUP BY 1), \
                  built AS (SELECT account, events FROM ledger_v2_0_0.ledger) \
             SELECT coalesce(sum(greatest(t.events - coalesce(b.events, 0), 0)), 0)::int8, \
                    coalesce(sum(greatest(coalesce(b.events, 0) - coalesce(t.events, 0), 0)), 0)::int8 \
             FROM truth t FULL JOIN built b USING (account)",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
