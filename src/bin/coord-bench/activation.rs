//! `coord-bench activation`: how long publishers are blocked or refused when
//! version N+1 is activated under continuous publishing by N, over a store of
//! at least a million events, and whether any event was lost or applied twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use coord::activation::{self, ActivateOptions};
use coord::store::Actor;
use coord::{
    ApplyContext, Error, Event, ExpectedVersion, HandlerError, NewEvent, Projector, ProjectorName,
    ProjectorSet, Publisher, RelationName, RetryPolicy,
};
use semver::Version;
use serde::Serialize;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::support::BenchDb;
use crate::OutputFormat;

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

/// The figures.
#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    events_in_store: i64,
    publishers: usize,
    published_by_n: u64,
    published_by_n_plus_1: u64,
    refused: u64,
    replay_seconds: f64,
    replay_events_per_s: f64,
    held_back_ms: f64,
    critical_section_ms: f64,
    final_catch_up_events: u64,
    baseline_publish_ms_p99: f64,
    blocked_window_ms_max: f64,
    blocked_window_ms_p99: f64,
    /// The longest single publish attempt (gate, append, inline handler)
    /// while the activation ran: the time a publisher waited inside the gate.
    longest_gate_wait_ms: f64,
    /// Seconds the unrelated long transaction stayed open (`--long-transaction`).
    long_transaction_s: Option<f64>,
    /// Activation attempts that gave up on the lock deadline before one completed.
    activations_given_up: u32,
    lost: i64,
    applied_twice: i64,
}

/// Balance and event count per account, folded per batch.
struct Ledger {
    name: ProjectorName,
    version: Version,
}

impl Ledger {
    fn at(major: u64) -> Arc<dyn Projector> {
        Arc::new(Self {
            name: ProjectorName::new("ledger").expect("valid"),
            version: Version::new(major, 0, 0),
        })
    }
}

#[async_trait]
impl Projector for Ledger {
    fn name(&self) -> &ProjectorName {
        &self.name
    }
    fn version(&self) -> &Version {
        &self.version
    }
    fn event_types(&self) -> Vec<String> {
        ["AccountOpened", "MoneyDeposited"]
            .map(String::from)
            .to_vec()
    }
    fn tables(&self) -> &str {
        "CREATE TABLE ledger (account text PRIMARY KEY, amount bigint NOT NULL, events bigint NOT NULL);"
    }
    async fn apply(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
        _: &ApplyContext,
    ) -> Result<(), HandlerError> {
        let mut fold: HashMap<&str, (i64, i64)> = HashMap::new();
        for e in events {
            let entry = fold.entry(e.stream_id.as_str()).or_default();
            entry.0 += e.data.get("amount").and_then(|a| a.as_i64()).unwrap_or(0);
            entry.1 += 1;
        }
        let accounts: Vec<&str> = fold.keys().copied().collect();
        let amounts: Vec<i64> = accounts.iter().map(|a| fold[a].0).collect();
        let counts: Vec<i64> = accounts.iter().map(|a| fold[a].1).collect();
        tx.execute(
            "INSERT INTO ledger SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[]) \
             ON CONFLICT (account) DO UPDATE SET amount = ledger.amount + EXCLUDED.amount, events = ledger.events + EXCLUDED.events",
            &[&accounts, &amounts, &counts],
        )
        .await?;
        Ok(())
    }
}

/// One publish (with its retries): when it started and ended (since the
/// bench began), and its longest single attempt.
#[derive(Clone, Copy)]
struct Attempt {
    start: Duration,
    end: Duration,
    longest_try: Duration,
}

/// Publishes like [`Publisher::publish_with_retry`] (retrying
/// `ProjectorIsActivating` with a short backoff), timing each attempt:
/// returns the result and the longest attempt.
async fn publish_timed(
    publisher: &Publisher,
    client: &mut tokio_postgres::Client,
    account: &str,
    event: NewEvent,
    policy: RetryPolicy,
) -> (Result<(), Error>, Duration) {
    let started = Instant::now();
    let mut pause = policy.first_pause;
    let mut longest = Duration::ZERO;
    loop {
        let attempt = Instant::now();
        let outcome = async {
            let tx = client.transaction().await?;
            publisher
                .publish(
                    &tx,
                    account,
                    ExpectedVersion::Any,
                    std::slice::from_ref(&event),
                )
                .await?;
            tx.commit().await?;
            Ok::<(), Error>(())
        }
        .await;
        longest = longest.max(attempt.elapsed());
        match outcome {
            Err(Error::ProjectorIsActivating { .. })
                if started.elapsed() + pause <= policy.deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(policy.max_pause);
            }
            other => return (other, longest),
        }
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
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acct-' || a, 1, 'AccountOpened', '{}' FROM generate_series(1, $1::int8) a",
            &[&args.accounts],
        )
        .await?;
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acct-' || (i % $1 + 1), i / $1 + 2, 'MoneyDeposited', \
                    jsonb_build_object('amount', i % 100 + 1, 'reference', md5(i::text)) \
             FROM generate_series(0, $2::int8 - $1 - 1) i",
            &[&args.accounts, &args.events],
        )
        .await?;
    client.batch_execute("ANALYZE coord.events").await?;

    let pool = coord::pool(&db.url, 8)?;
    let actor = Actor::new("coord-bench", "coord-bench activation");
    let events = RelationName::default();
    let options = ActivateOptions::default();
    let cancel = CancellationToken::new();
    let v1 = ProjectorSet::new(vec![Ledger::at(1)])?;
    let v2 = ProjectorSet::new(vec![Ledger::at(2)])?;
    say("activating N (bootstrap replay)...");
    activation::activate_current_config(&pool, &db.url, &v1, &events, &options, &actor, &cancel)
        .await?;

    // Publishers of N, continuously, until refused.
    let origin = Instant::now();
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..args.publishers {
        let mut client = db.client().await?;
        let (attempts, stop) = (attempts.clone(), stop.clone());
        let publisher = Publisher::new(v1.clone());
        let accounts = args.accounts;
        tasks.push(tokio::spawn(async move {
            let (mut published, mut refused) = (0u64, 0u64);
            let mut n = i as i64;
            while !stop.load(Ordering::SeqCst) {
                n += 7919;
                let account = format!("acct-{}", n % accounts + 1);
                let event =
                    NewEvent::new("MoneyDeposited", serde_json::json!({"amount": n % 50 + 1}));
                let start = origin.elapsed();
                let policy = RetryPolicy {
                    deadline: Duration::from_secs(30),
                    first_pause: Duration::from_millis(1),
                    max_pause: Duration::from_millis(5),
                };
                let (result, longest_try) =
                    publish_timed(&publisher, &mut client, &account, event, policy).await;
                attempts.lock().expect("not poisoned").push(Attempt {
                    start,
                    end: origin.elapsed(),
                    longest_try,
                });
                match result {
                    Ok(_) => published += 1,
                    Err(Error::StreamVersionConflict { .. }) => {}
                    Err(Error::NewerProjectorIsActive { .. }) => {
                        refused += 1;
                        break;
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok((published, refused))
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // a baseline of ordinary publishing
    say("replaying and activating N+1 while N publishes...");
    if args.long_transaction.is_some() {
        // Replay first, so that the long transaction overlaps the critical
        // section rather than the replay.
        let v2_projectors: Vec<Arc<dyn Projector>> = v2.iter().cloned().collect();
        for outcome in coord::replay::replay_many(
            &pool,
            &v2_projectors,
            &events,
            &options.replay,
            &actor,
            &cancel,
        )
        .await
        {
            outcome.result?;
        }
    }
    let activation_started = origin.elapsed();
    let long = match args.long_transaction {
        Some(seconds) => {
            let mut long_client = db.client().await?;
            let ready = Arc::new(tokio::sync::Notify::new());
            let notified = ready.clone();
            let task = tokio::spawn(async move {
                let tx = long_client.transaction().await?;
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
            Some(task)
        }
        None => None,
    };
    let mut activations_given_up = 0u32;
    let report = loop {
        match activation::activate_current_config(
            &pool, &db.url, &v2, &events, &options, &actor, &cancel,
        )
        .await
        {
            Err(Error::Busy(why)) if long.is_some() => {
                say(&format!("activation gave up ({why}); retrying"));
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
    for task in tasks {
        let (p, r) = task.await??;
        published_n += p;
        refused += r;
    }
    stop.store(true, Ordering::SeqCst);

    // N+1 publishes after the flip.
    let publisher = Publisher::new(v2.clone());
    let mut client2 = db.client().await?;
    let mut published_n1 = 0;
    for i in 0..100 {
        let event = NewEvent::new("MoneyDeposited", serde_json::json!({"amount": 1}));
        publisher
            .publish_with_retry(
                &mut client2,
                &format!("acct-{}", i % args.accounts + 1),
                ExpectedVersion::Any,
                &[event],
                RetryPolicy::default(),
            )
            .await?;
        published_n1 += 1;
    }

    // Blocked or refused: attempts that overlapped the hold-back window.
    let attempts = attempts.lock().expect("not poisoned").clone();
    let mut during: Vec<f64> = attempts
        .iter()
        .filter(|a| a.end >= hold_start && a.start <= flipped)
        .map(|a| (a.end - a.start).as_secs_f64() * 1e3)
        .collect();
    let longest_gate_wait_ms = attempts
        .iter()
        .filter(|a| a.end >= activation_started)
        .map(|a| a.longest_try.as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    let mut baseline: Vec<f64> = attempts
        .iter()
        .filter(|a| a.end < hold_start.saturating_sub(Duration::from_secs(1)) || a.start > flipped)
        .map(|a| (a.end - a.start).as_secs_f64() * 1e3)
        .collect();
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
    let (lost, applied_twice): (i64, i64) = (row.get(0), row.get(1));
    let events_in_store: i64 = client
        .query_one("SELECT count(*) FROM coord.events", &[])
        .await?
        .get(0);
    drop(pool);
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
        baseline_publish_ms_p99: percentile(&mut baseline, 0.99),
        blocked_window_ms_max: during.iter().copied().fold(0.0, f64::max),
        blocked_window_ms_p99: percentile(&mut during, 0.99),
        longest_gate_wait_ms,
        long_transaction_s: args.long_transaction,
        activations_given_up,
        lost,
        applied_twice,
    };
    if args.output == OutputFormat::Json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "activation over {} events with {} publishers of N:\n  replay of N+1: {:.1} s ({:.0} events/s) while N published {} events\n  \
         publishers held back {:.1} ms (critical section {:.1} ms, {} events caught up inside)\n  \
         blocked window: max {:.1} ms, p99 {:.1} ms (ordinary publish p99 {:.1} ms)\n  \
         longest wait inside the gate during the activation: {:.1} ms{}\n  \
         refused N publishers: {}; N+1 published {}\n  lost: {}, applied twice: {}",
        report.events_in_store,
        report.publishers,
        report.replay_seconds,
        report.replay_events_per_s,
        report.published_by_n,
        report.held_back_ms,
        report.critical_section_ms,
        report.final_catch_up_events,
        report.blocked_window_ms_max,
        report.blocked_window_ms_p99,
        report.baseline_publish_ms_p99,
        report.longest_gate_wait_ms,
        match report.long_transaction_s {
            Some(s) => format!(
                " (an unrelated transaction open {s} s; activations given up: {})",
                report.activations_given_up
            ),
            None => String::new(),
        },
        report.refused,
        report.published_by_n_plus_1,
        report.lost,
        report.applied_twice
    );
    Ok(())
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index]
}
