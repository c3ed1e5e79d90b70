//! Issue 12 item 7: a replay whose batch connection is terminated mid-batch
//! (`pg_terminate_backend`) retries from its last committed batch and ends
//! exact; when the retries run out, the error names the projector version,
//! the step and the position
//! (docs/decisions/0061-retrying-transient-connection-loss.md).
//!
//! The tests know the replay is mid-batch without timing: the gated events'
//! handler waits for an advisory lock the test holds, and the test finds
//! the waiting backend in `pg_locks` (this test's database only).

use std::process::{Child, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coord::replay::{catch_up, start_replay, CancellationToken, ReplayOptions};
use coord::{Config, Projector, RelationName, SqlProjector};
use tokio_postgres::Client;

use crate::support::{assert_exit, eventually, stderr, TestDb};

/// The advisory lock the gated events' handler waits for.
const GATE: i64 = 6_161_061;

/// Events in the store; the ones from [`FIRST_GATED`] (0-based) on wait for
/// the gate, so a replay in batches of [`BATCH`] commits the batches
/// before it and then waits inside the next one.
const EVENTS: i64 = 1000;
const FIRST_GATED: i64 = 500;
const BATCH: &str = "100";

/// Generous: the point is "does not hang", not a timing.
const DOES_NOT_HANG: Duration = Duration::from_secs(60);

/// How often a poll looks again.
const POLL: Duration = Duration::from_millis(10);

/// A config-SQL projector `ledger`: per account, the sum of the deposits
/// and how many events it applied (an event applied twice shows). Events
/// whose data has `gate` first wait for the advisory lock [`GATE`].
fn ledger_toml() -> String {
    format!(
        r#"
[[projector]]
name = "ledger"
version = "2.0.0"
tables = """
CREATE TABLE totals (account text PRIMARY KEY, amount bigint NOT NULL, applied bigint NOT NULL);
"""

[projector.handlers]
Deposited = "INSERT INTO totals VALUES ($1, ($5->>'amount')::bigint + CASE WHEN $5 ? 'gate' THEN length(pg_advisory_xact_lock_shared({GATE})::text) ELSE 0 END, 1) ON CONFLICT (account) DO UPDATE SET amount = totals.amount + EXCLUDED.amount, applied = totals.applied + 1"
"#
    )
}

/// A migrated database holding [`EVENTS`] deposits over 20 accounts, the
/// last ones gated; returns it, a client, and the position of the first
/// gated event (where the first batch that waits starts).
async fn ledger_db() -> (TestDb, Client, i64) {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acc-' || (i % 20), i / 20 + 1, 'Deposited', \
               jsonb_build_object('amount', i + 1) \
               || CASE WHEN i >= $2::bigint THEN '{\"gate\": true}'::jsonb ELSE '{}'::jsonb END \
             FROM generate_series(0::bigint, $1::bigint - 1) AS i ORDER BY i",
            &[&EVENTS, &FIRST_GATED],
        )
        .await
        .unwrap();
    let first_gated: i64 = client
        .query_one(
            "SELECT min(position) FROM coord.events WHERE data ? 'gate'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.write_config("coord.toml", &ledger_toml());
    (db, client, first_gated)
}

/// Rows of ledger@2.0.0's totals that differ from a from-scratch computation
/// over the store (amount and number of events per account); empty when the
/// version is exact.
async fn differences(client: &Client) -> Vec<String> {
    let rows = client
        .query(
            "WITH expected AS (SELECT stream_id AS account, sum((data->>'amount')::bigint) AS amount, \
             count(*) AS applied FROM coord.events GROUP BY stream_id) \
             SELECT coalesce(e.account, t.account) || ': expected ' || coalesce(e.amount::text, 'none') \
             || ' in ' || coalesce(e.applied::text, '0') || ' events, found ' || coalesce(t.amount::text, 'none') \
             || ' in ' || coalesce(t.applied::text, '0') \
             FROM expected e FULL JOIN ledger_v2_0_0.totals t ON t.account = e.account \
             WHERE e.amount IS DISTINCT FROM t.amount OR e.applied IS DISTINCT FROM t.applied",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// ledger@2.0.0's `events_processed` (what its committed batches applied).
async fn processed(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT events_processed FROM coord.projector_versions \
             WHERE name = 'ledger' AND version = '2.0.0'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Holds [`GATE`] on its own connection until [`Gate::open`].
struct Gate(Client);

impl Gate {
    async fn close(db: &TestDb) -> Self {
        let client = db.client().await;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&GATE])
            .await
            .unwrap();
        Self(client)
    }

    async fn open(self) {
        self.0
            .execute("SELECT pg_advisory_unlock($1)", &[&GATE])
            .await
            .unwrap();
    }
}

/// The backend of this test's database waiting for an advisory lock (the
/// replay's batch, inside a gated event's handler), if any, other than the
/// ones in `ended`.
async fn waiting_backend(client: &Client, ended: &[i32]) -> Option<i32> {
    client
        .query_opt(
            "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
             WHERE a.datname = current_database() AND l.locktype = 'advisory' \
               AND NOT l.granted AND NOT a.pid = ANY($1) LIMIT 1",
            &[&ended],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Waits until a backend other than those in `ended` waits at the gate;
/// fails at once, with its output, if `replay` (a `coord` process) ended
/// instead.
async fn until_waiting(client: &Client, ended: &[i32], mut replay: Option<&mut Child>) -> i32 {
    let deadline = Instant::now() + DOES_NOT_HANG;
    loop {
        if let Some(pid) = waiting_backend(client, ended).await {
            return pid;
        }
        if let Some(child) = replay.as_deref_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut log = String::new();
                if let Some(mut err) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut err, &mut log).unwrap();
                }
                panic!("coord ended ({status}) instead of waiting at the gate:\n{log}");
            }
        }
        assert!(Instant::now() < deadline, "no batch waits at the gate");
        tokio::time::sleep(POLL).await;
    }
}

/// Terminates the backend `pid` (as `pg_terminate_backend` does when an
/// operator or a failover ends it) and waits until it is gone.
async fn terminate(client: &Client, pid: i32) {
    let ended: bool = client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(ended, "backend {pid} was not terminated");
    eventually(DOES_NOT_HANG, "the terminated backend to end", || async {
        client
            .query_one(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
}

async fn output_of(child: Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

/// Runs `coord <command> --batch-size 100` over the gated store, terminates
/// its batch's backend while it waits at the gate, and checks that it
/// retries from its checkpoint and ends exact. With `register_first`, the version
/// is registered first (for `catch-up`, which follows replaying versions).
async fn retried_and_exact(command: &str, register_first: bool) {
    let (db, client, first_gated) = ledger_db().await;
    if register_first {
        register(&db, ledger_projector().as_ref()).await;
    }
    let gate = Gate::close(&db).await;
    let mut child = db.spawn_coord(&[command, "--batch-size", BATCH]);
    let first = until_waiting(&client, &[], Some(&mut child)).await;
    assert_eq!(processed(&client).await, FIRST_GATED);
    terminate(&client, first).await;
    // The retry resumes from the committed checkpoint, on a new connection,
    // and waits at the gate again in the same batch.
    until_waiting(&client, &[first], Some(&mut child)).await;
    assert_eq!(processed(&client).await, FIRST_GATED);
    gate.open().await;
    let out = output_of(child).await;
    assert_exit(&out, 0);
    let log = stderr(&out);
    assert!(log.contains("retrying"), "{log}");
    assert!(
        log.contains(&format!("replay batch at position {first_gated}")),
        "{log}"
    );
    assert_eq!(processed(&client).await, EVENTS);
    assert_eq!(differences(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn replay_retries_a_terminated_batch_and_ends_exact() {
    retried_and_exact("replay", false).await;
}

#[tokio::test]
async fn catch_up_retries_a_terminated_batch_and_ends_exact() {
    retried_and_exact("catch-up", true).await;
}

#[tokio::test]
async fn replay_whose_retries_run_out_names_the_version_the_step_and_the_position() {
    let (db, client, first_gated) = ledger_db().await;
    let gate = Gate::close(&db).await;
    let mut child = db.spawn_coord(&["replay", "--batch-size", BATCH]);
    // Every attempt is terminated while it waits at the gate, until the
    // command gives up: the first attempt and 5 retries (the default).
    let mut ended = Vec::new();
    let deadline = Instant::now() + DOES_NOT_HANG;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the replay did not give up");
        match waiting_backend(&client, &ended).await {
            Some(pid) => {
                terminate(&client, pid).await;
                ended.push(pid);
            }
            None => tokio::time::sleep(POLL).await,
        }
    }
    assert_eq!(ended.len(), 6, "attempts terminated: {ended:?}");
    let out = output_of(child).await;
    assert_exit(&out, 1);
    let log = stderr(&out);
    let expected =
        format!("ledger@2.0.0: replay batch at position {first_gated}: connection closed (retried 5 times over");
    assert!(log.contains(&expected), "{log}");
    assert!(log.contains("run the command again to resume"), "{log}");
    // The batches before it stay committed; a re-run finishes exact.
    assert_eq!(processed(&client).await, FIRST_GATED);
    gate.open().await;
    assert_exit(&db.coord(&["replay", "--batch-size", BATCH]), 0);
    assert_eq!(differences(&client).await, Vec::<String>::new());
}

/// Registers `projector`'s version (replaying), as `coord replay` would
/// before its first pass.
async fn register(db: &TestDb, projector: &dyn Projector) {
    let mut client = db.client().await;
    let actor = coord::Actor::new("test-host", "test");
    start_replay(&mut client, projector, &actor).await.unwrap();
}

fn ledger_projector() -> Arc<dyn Projector> {
    let config = Config::parse(&ledger_toml(), "test").unwrap();
    Arc::new(SqlProjector::new(config.projectors[0].clone()))
}

#[tokio::test]
async fn catch_up_without_retries_fails_naming_the_version_the_step_and_the_position() {
    let (db, client, first_gated) = ledger_db().await;
    let projector = ledger_projector();
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let options = ReplayOptions {
        batch_size: 100,
        lag_threshold: 1,
        retries: 0,
        ..ReplayOptions::default()
    };
    let gate = Gate::close(&db).await;
    let caught = {
        let (pool, projector, options) = (pool.clone(), Arc::clone(&projector), options.clone());
        tokio::spawn(async move {
            let cancel = CancellationToken::new();
            let store = RelationName::default();
            catch_up(&pool, projector.as_ref(), &store, &options, &cancel).await
        })
    };
    let pid = until_waiting(&client, &[], None).await;
    terminate(&client, pid).await;
    let err = tokio::time::timeout(DOES_NOT_HANG, caught)
        .await
        .expect("the catch-up ends")
        .unwrap()
        .expect_err("the catch-up fails");
    assert_eq!(
        err.to_string(),
        format!(
            "ledger@2.0.0: replay batch at position {first_gated}: connection closed; \
             its checkpoint is saved: run the command again to resume"
        )
    );
    assert_eq!(err.exit_code(), 1);
    assert_eq!(processed(&client).await, FIRST_GATED);
    // With retries (the default), the same catch-up resumes and ends exact.
    gate.open().await;
    let cancel = CancellationToken::new();
    let report = catch_up(
        &pool,
        projector.as_ref(),
        &RelationName::default(),
        &ReplayOptions {
            retries: 5,
            ..options
        },
        &cancel,
    )
    .await
    .unwrap();
    assert_eq!(report.applied, (EVENTS - FIRST_GATED) as u64);
    assert_eq!(differences(&client).await, Vec::<String>::new());
}
