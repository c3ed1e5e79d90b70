//! Replay, catch-up, ordering, crash safety, on_error policies, abort and
//! the replay commands, each against a fresh database with real concurrent
//! connections.

use std::sync::Arc;
use std::time::Duration;

use coord::records::{self, ParkedEvent, ProjectorState, Transition, VersionRecord, VersionStatus};
use coord::replay::{
    catch_up, checkpoint_through_current_snapshot, pass_in_transaction, run_pass, start_replay,
    CancellationToken, CatchUpReport, ReplayOptions, StartOutcome,
};
use coord::Actor;
use coord::{Config, Projector, ProjectorName, RelationName, SqlProjector};
use deadpool_postgres::Pool;
use tokio_postgres::Client;

use crate::reference::BalancesProjector;
use crate::support::{assert_exit, balances_toml, stderr, stdout, until_backend, TestDb};

const APPEND: &str = "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
    SELECT 'acct-' || (i % $3::bigint), i / $3::bigint + 1, \
      CASE WHEN i < $3::bigint THEN 'AccountOpened' WHEN i % 3 = 0 THEN 'MoneyWithdrawn' ELSE 'MoneyDeposited' END, \
      jsonb_build_object('amount', i % 97 + 1) \
    FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) AS i ORDER BY i";

/// Appends events `start..start+count` of a bank over `streams` accounts
/// (the first round opens the accounts).
async fn append(client: &impl tokio_postgres::GenericClient, start: i64, count: i64, streams: i64) {
    client
        .execute(APPEND, &[&start, &count, &streams])
        .await
        .expect("append events");
}

const EXPECTED: &str = "SELECT stream_id AS account, sum(CASE event_type \
      WHEN 'MoneyDeposited' THEN (data->>'amount')::bigint \
      WHEN 'MoneyWithdrawn' THEN -(data->>'amount')::bigint ELSE 0 END)::bigint AS amount \
    FROM coord.events GROUP BY stream_id";

/// Accounts whose balance in `schema` differs from a from-scratch SQL
/// computation over every committed event.
async fn mismatches(client: &Client, schema: &str) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM ({EXPECTED}) e FULL JOIN {}.balances r USING (account) \
                 WHERE e.amount IS DISTINCT FROM r.amount",
                coord::quote_ident(schema)
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn sql_projector(toml: &str) -> Arc<dyn Projector> {
    let config = Config::parse(toml, "test").unwrap();
    Arc::new(SqlProjector::new(config.projectors[0].clone()))
}

fn actor() -> Actor {
    Actor::new("test-host", "test")
}

fn options(batch_size: usize) -> ReplayOptions {
    ReplayOptions {
        batch_size,
        lag_threshold: 1,
        ..ReplayOptions::default()
    }
}

// coord's records this file reads, in one place.

async fn record(client: &Client, name: &str, version: &str) -> Option<VersionRecord> {
    records::version(client, name, version).await.unwrap()
}

async fn version_record(client: &Client, name: &str, version: &str) -> VersionRecord {
    record(client, name, version)
        .await
        .unwrap_or_else(|| panic!("{name}@{version} is not registered"))
}

async fn projector_state(client: &Client, name: &str) -> ProjectorState {
    records::projector_state(client, name)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("projector {name} has no state"))
}

async fn parked_events(client: &Client, name: &str, version: &str) -> Vec<ParkedEvent> {
    records::parked_events(client, name, version).await.unwrap()
}

async fn transitions(client: &Client, name: &str) -> Vec<Transition> {
    records::transitions(client, Some(name)).await.unwrap()
}

/// Catches `projector` up over the default event store in batches of
/// `batch_size`, never cancelled.
async fn catch_up_in(batch_size: usize, pool: &Pool, projector: &dyn Projector) -> CatchUpReport {
    catch_up(
        pool,
        projector,
        &RelationName::default(),
        &options(batch_size),
        &CancellationToken::new(),
    )
    .await
    .unwrap()
}

async fn processed(client: &Client, name: &str, version: &str) -> i64 {
    record(client, name, version)
        .await
        .map_or(0, |v| v.events_processed)
}

/// How many `MoneyDeposited` events the store holds.
async fn deposits(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM coord.events WHERE event_type = 'MoneyDeposited'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn register(db: &TestDb, projector: &dyn Projector) {
    let mut client = db.client().await;
    start_replay(&mut client, projector, &actor())
        .await
        .unwrap();
}

#[tokio::test]
async fn replay_equals_a_from_scratch_computation() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    append(&client, 0, 3000, 50).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    for projector in [
        sql_projector(&balances_toml("2.0.0")),
        Arc::new(BalancesProjector::new(
            ProjectorName::new("rust_balances").unwrap(),
            semver::Version::new(1, 0, 0),
        )) as Arc<dyn Projector>,
    ] {
        let mut c = db.client().await;
        let start = start_replay(&mut c, projector.as_ref(), &actor())
            .await
            .unwrap();
        assert_eq!(start.outcome, StartOutcome::Started);
        let report = catch_up_in(400, &pool, projector.as_ref()).await;
        assert_eq!(report.applied, 3000);
        assert_eq!(report.remaining, 0);
        let schema = coord::schema_name(projector.name(), projector.version());
        assert_eq!(mismatches(&client, &schema).await, 0);
        let name = projector.name().to_string();
        let version = projector.version().to_string();
        assert_eq!(processed(&client, &name, &version).await, 3000);
        let state = projector_state(&client, &name).await;
        assert_eq!(state.replaying_version.as_deref(), Some(version.as_str()));
        assert_eq!(state.active_version, None);
    }
}

#[tokio::test]
async fn catch_up_after_more_events_applies_only_the_new_ones_exactly_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    append(&client, 0, 1000, 20).await;
    let projector = sql_projector(&balances_toml("2.0.0"));
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let relation = RelationName::default();
    let cancel = CancellationToken::new();
    let first = catch_up(&pool, projector.as_ref(), &relation, &options(300), &cancel)
        .await
        .unwrap();
    assert_eq!(first.applied, 1000);
    append(&client, 1000, 700, 20).await;
    let second = catch_up(&pool, projector.as_ref(), &relation, &options(300), &cancel)
        .await
        .unwrap();
    assert_eq!(second.applied, 700);
    let third = catch_up(&pool, projector.as_ref(), &relation, &options(300), &cancel)
        .await
        .unwrap();
    assert_eq!(third.applied, 0);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
    assert_eq!(processed(&client, "balances", "2.0.0").await, 1700);
}

#[tokio::test]
async fn catch_up_reads_the_delta_through_the_xact_id_index() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    append(&client, 0, 3000, 20).await;
    client.batch_execute("ANALYZE coord.events").await.unwrap();
    let q = coord::PassQuery {
        name: "balances".into(),
        version: "2.0.0".into(),
        event_store: RelationName::default(),
        event_types: vec!["MoneyDeposited".into()],
        horizon: client
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await
            .unwrap()
            .get(0),
        snapshot: "1:1:".into(),
        exclude_ahead: true,
        max_bytes: i64::MAX,
        payload: true,
        metadata: true,
    };
    let plan: Vec<String> = client
        .query(
            &format!(
                "EXPLAIN {}",
                q.read_sql()
                    .replace("$1", "'1:1:'")
                    .replace("$2", "0")
                    .replace("$3", "'{MoneyDeposited}'::text[]")
                    .replace("$4", "1000")
                    .replace("$5", &format!("'{}'", q.horizon))
                    .replace("$6", "'balances'")
                    .replace("$8", "16777216")
                    .replace("$7", "'2.0.0'")
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("events_xact_id"), "{plan}");
}

/// A pass counts the events it has to apply when few; above a threshold it
/// takes the planner's estimate, where counting scanned the whole store
/// (decision 0075).
#[tokio::test]
async fn a_pass_counts_a_small_remainder_and_estimates_a_large_one() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    append(&client, 0, 3000, 20).await;
    // No autovacuum between the delete and the estimate.
    client
        .batch_execute(
            "ALTER TABLE coord.events SET (autovacuum_enabled = false); ANALYZE coord.events",
        )
        .await
        .unwrap();
    let handled = deposits(&client).await;
    // Half of them go, without a new ANALYZE: a count sees it, the
    // planner's estimate does not.
    client
        .batch_execute("DELETE FROM coord.events WHERE position % 2 = 0")
        .await
        .unwrap();
    let left = deposits(&client).await;
    assert!(left < handled * 2 / 3, "{left} of {handled}");
    let q = coord::PassQuery {
        name: "balances".into(),
        version: "2.0.0".into(),
        event_store: RelationName::default(),
        event_types: vec!["MoneyDeposited".into()],
        horizon: "0".into(),
        snapshot: client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .unwrap()
            .get(0),
        exclude_ahead: false,
        max_bytes: i64::MAX,
        payload: true,
        metadata: true,
    };
    assert_eq!(
        q.count_or_estimate(&client, 0, 100_000).await.unwrap(),
        left
    );
    let estimate = q.count_or_estimate(&client, 0, 100).await.unwrap();
    assert!(
        (estimate - handled).abs() <= handled / 10,
        "estimate {estimate}, {handled} before the delete, {left} after"
    );
}

#[tokio::test]
async fn a_transaction_that_commits_after_a_higher_position_was_read_is_still_applied() {
    let db = TestDb::migrated().await;
    let mut late = db.client().await;
    let client = db.client().await;
    let projector = sql_projector(&balances_toml("2.0.0"));
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let relation = RelationName::default();
    let cancel = CancellationToken::new();

    let tx = late.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO coord.events (stream_id, stream_version, event_type, data) VALUES ('late', 1, 'AccountOpened', '{}')",
        &[],
    )
    .await
    .unwrap();
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) VALUES ('early', 1, 'AccountOpened', '{}')",
            &[],
        )
        .await
        .unwrap();
    let first = run_pass(&pool, projector.as_ref(), &relation, &options(10), &cancel)
        .await
        .unwrap();
    assert_eq!(first.applied, 1, "only the committed event is visible");
    tx.commit().await.unwrap();
    let second = run_pass(&pool, projector.as_ref(), &relation, &options(10), &cancel)
        .await
        .unwrap();
    assert_eq!(second.applied, 1, "the late commit at the lower position");
    let accounts: Vec<String> = client
        .query(
            "SELECT account FROM balances_v2_0_0.balances ORDER BY account",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(accounts, ["early", "late"]);
}

/// A projector that fails when a stream's versions arrive out of order or twice.
const ORDERED_TOML: &str = r#"
[[projector]]
name = "ordered"
version = "1.0.0"
tables = """
CREATE TABLE applied (stream text, version bigint, prev bigint,
  PRIMARY KEY (stream, version), CHECK (coalesce(prev, 0) = version - 1));
"""
[projector.handlers]
Step = "INSERT INTO applied (stream, version, prev) VALUES ($1, $2, (SELECT max(version) FROM applied WHERE stream = $1))"
"#;

async fn ordering_case_2(pass_between_b_and_a: bool) {
    let db = TestDb::migrated().await;
    let projector = sql_projector(ORDERED_TOML);
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let relation = RelationName::default();
    let cancel = CancellationToken::new();
    let opts = options(10);
    let pass = || run_pass(&pool, projector.as_ref(), &relation, &opts, &cancel);

    let mut a = db.client().await;
    let mut c = db.client().await;
    let b = db.client().await;
    let ta = a.transaction().await.unwrap();
    ta.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    let tc = c.transaction().await.unwrap();
    tc.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    b.execute(
        "INSERT INTO coord.events (stream_id, stream_version, event_type, data) VALUES ('s', 1, 'Step', '{}')",
        &[],
    )
    .await
    .unwrap();
    if pass_between_b_and_a {
        assert_eq!(pass().await.unwrap().applied, 1);
    }
    ta.execute(
        "INSERT INTO coord.events (stream_id, stream_version, event_type, data) VALUES ('s', 2, 'Step', '{}')",
        &[],
    )
    .await
    .unwrap();
    ta.commit().await.unwrap();
    // T_C still holds the horizon below T_B: a horizon-only reader would
    // apply v2 here and v1 later.
    pass().await.unwrap();
    tc.commit().await.unwrap();
    pass().await.unwrap();
    let client = db.client().await;
    let rows: Vec<i64> = client
        .query(
            "SELECT version FROM ordered_v1_0_0.applied ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, [1, 2]);
    assert_eq!(processed(&client, "ordered", "1.0.0").await, 2);
}

#[tokio::test]
async fn stream_order_holds_when_an_early_transaction_appends_after_a_later_one_committed() {
    ordering_case_2(false).await;
}

#[tokio::test]
async fn stream_order_holds_with_a_pass_between_the_two_commits() {
    ordering_case_2(true).await;
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_a_gap_that_does_not_stall_replay() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    append(&client, 0, 100, 10).await;
    let tx = client.transaction().await.unwrap();
    append(&tx, 100, 50, 10).await;
    tx.rollback().await.unwrap();
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             VALUES ('acct-1', 11, 'MoneyDeposited', '{\"amount\": 5}')",
            &[],
        )
        .await
        .unwrap();
    let projector = sql_projector(&balances_toml("2.0.0"));
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let report = catch_up_in(7, &pool, projector.as_ref()).await;
    assert_eq!(report.applied, 101);
    assert_eq!(report.remaining, 0);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
}

#[tokio::test]
async fn a_cancelled_replay_stops_at_a_batch_boundary_and_resumes_exactly_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    append(&client, 0, 1000, 10).await;
    let projector = sql_projector(&balances_toml("2.0.0"));
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let mut opts = options(100);
    opts.progress = Some(Arc::new(move |_p| token.cancel()));
    let first = run_pass(
        &pool,
        projector.as_ref(),
        &RelationName::default(),
        &opts,
        &cancel,
    )
    .await
    .unwrap();
    assert!(first.cancelled);
    assert_eq!(first.applied, 100);
    assert_eq!(processed(&client, "balances", "2.0.0").await, 100);
    let rest = catch_up_in(100, &pool, projector.as_ref()).await;
    assert_eq!(rest.applied, 900);
    assert_eq!(processed(&client, "balances", "2.0.0").await, 1000);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
}

#[tokio::test]
async fn pass_in_transaction_applies_the_final_delta_with_the_callers_commit() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    append(&client, 0, 500, 10).await;
    let projector = sql_projector(&balances_toml("2.0.0"));
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let relation = RelationName::default();
    catch_up_in(100, &pool, projector.as_ref()).await;
    append(&client, 500, 120, 10).await;
    let tx = client.transaction().await.unwrap();
    let applied = pass_in_transaction(&tx, projector.as_ref(), &relation)
        .await
        .unwrap();
    assert_eq!(applied, 120);
    tx.rollback().await.unwrap();
    assert_eq!(
        processed(&client, "balances", "2.0.0").await,
        500,
        "rolled back with the caller"
    );
    let tx = client.transaction().await.unwrap();
    assert_eq!(
        pass_in_transaction(&tx, projector.as_ref(), &relation)
            .await
            .unwrap(),
        120
    );
    tx.commit().await.unwrap();
    assert_eq!(processed(&client, "balances", "2.0.0").await, 620);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
}

#[tokio::test]
async fn a_version_checkpointed_through_the_current_snapshot_applies_only_later_events() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    append(&client, 0, 300, 10).await;
    let projector = sql_projector(&balances_toml("1.0.0"));
    register(&db, projector.as_ref()).await;
    // As if its publishers had applied these events inline.
    client
        .batch_execute(&format!(
            "INSERT INTO balances_v1_0_0.balances SELECT account, amount FROM ({EXPECTED}) e"
        ))
        .await
        .unwrap();
    let relation = RelationName::default();
    let tx = client.transaction().await.unwrap();
    checkpoint_through_current_snapshot(
        &tx,
        "balances",
        "1.0.0",
        &projector.event_types(),
        &relation,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    append(&client, 300, 90, 10).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let report = catch_up_in(50, &pool, projector.as_ref()).await;
    assert_eq!(report.applied, 90);
    assert_eq!(mismatches(&client, "balances_v1_0_0").await, 0);
}

/// Balances whose handler fails (check constraint) on a deposit of 5000.
fn picky_toml(on_error: &str) -> String {
    format!(
        r#"
[[projector]]
name = "picky"
version = "1.0.0"
on_error = "{on_error}"
tables = """
CREATE TABLE deposits (position bigint PRIMARY KEY, amount bigint NOT NULL CHECK (amount < 1000));
"""
[projector.handlers]
MoneyDeposited = "INSERT INTO deposits VALUES ($3, ($5->>'amount')::bigint)"
"#
    )
}

pub(crate) async fn picky_store(client: &Client) -> i64 {
    client
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'a', i, 'MoneyDeposited', jsonb_build_object('amount', CASE WHEN i = 37 THEN 5000 ELSE i END) \
             FROM generate_series(1, 60) AS i",
        )
        .await
        .unwrap();
    client
        .query_one(
            "SELECT position FROM coord.events WHERE stream_version = 37",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_failing_event_is_parked_and_replay_goes_on_under_the_park_policy() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let bad = picky_store(&client).await;
    let projector = sql_projector(&picky_toml("park"));
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let report = catch_up_in(25, &pool, projector.as_ref()).await;
    assert_eq!((report.applied, report.parked), (59, 1));
    let parked = parked_events(&client, "picky", "1.0.0").await;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].position, bad);
    assert!(
        parked[0].error.contains("check constraint"),
        "{}",
        parked[0].error
    );
    let v = version_record(&client, "picky", "1.0.0").await;
    assert_eq!((v.events_processed, v.events_parked), (59, 1));
    let rows: i64 = client
        .query_one("SELECT count(*) FROM picky_v1_0_0.deposits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 59);
    // A parked event is not retried by the next pass.
    let again = catch_up_in(25, &pool, projector.as_ref()).await;
    assert_eq!((again.applied, again.parked), (0, 0));
}

#[tokio::test]
async fn a_failing_event_stops_replay_just_before_it_under_the_fail_policy() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let bad = picky_store(&client).await;
    db.write_config("coord.toml", &picky_toml("fail"));
    let out = db.coord(&["replay", "--batch-size", "25", "--output", "json"]);
    assert_exit(&out, 1);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = value["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "picky@1.0.0 failed at position {bad} (MoneyDeposited)"
        )),
        "{error}"
    );
    assert!(error.contains("check constraint"), "{error}");
    let v = version_record(&client, "picky", "1.0.0").await;
    assert_eq!(
        v.events_processed, 36,
        "the events before the failing one are committed"
    );
    assert!(v.last_error.unwrap().contains("check constraint"));
    let rows: i64 = client
        .query_one("SELECT count(*) FROM picky_v1_0_0.deposits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 36);
    // Running it again fails at the same event and applies nothing twice.
    let again = db.coord(&["replay", "--batch-size", "25"]);
    assert_exit(&again, 1);
    assert!(stderr(&again).contains(&format!("failed at position {bad}")));
    assert_eq!(processed(&client, "picky", "1.0.0").await, 36);
}

/// Makes `balances@1.0.0` active the way activation will (activation is not
/// this module's job): replayed, then flipped by hand.
async fn with_active_v1(db: &TestDb) {
    let client = db.client().await;
    append(&client, 0, 400, 10).await;
    db.write_config("v1.toml", &balances_toml("1.0.0"));
    assert_exit(&db.coord(&["--config", "v1.toml", "replay"]), 0);
    client
        .batch_execute(
            "UPDATE coord.projector_states SET active_version = '1.0.0', replaying_version = NULL;
             UPDATE coord.projector_versions SET status = 'active' WHERE version = '1.0.0';",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn abort_drops_the_replaying_schema_and_leaves_the_active_version_untouched() {
    let db = TestDb::migrated().await;
    with_active_v1(&db).await;
    let client = db.client().await;
    db.write_config("coord.toml", &balances_toml("2.0.0"));
    let replay = db.coord(&["replay"]);
    assert_exit(&replay, 0);
    assert!(
        stdout(&replay)
            .contains("balances@2.0.0: replayed into schema balances_v2_0_0: 400 events applied"),
        "{}",
        stdout(&replay)
    );

    let out = db.coord(&["abort", "--projector", "balances", "--output", "json"]);
    assert_exit(&out, 0);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["aborted"][0]["version"], "2.0.0");
    let schemas: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'balances_v2_0_0'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0);
    let state = projector_state(&client, "balances").await;
    assert_eq!(state.active_version.as_deref(), Some("1.0.0"));
    assert_eq!(state.replaying_version, None);
    assert_eq!(mismatches(&client, "balances_v1_0_0").await, 0);
    let v2 = version_record(&client, "balances", "2.0.0").await;
    assert_eq!(v2.status, VersionStatus::Aborted);
    let last = transitions(&client, "balances").await;
    assert_eq!(last.last().unwrap().to_status, "aborted");

    let nothing = db.coord(&["abort", "--projector", "balances"]);
    assert_exit(&nothing, 2);
    assert!(stderr(&nothing).contains("no version of projector balances is replaying"));

    // An aborted version is rebuilt from scratch.
    let again = db.coord(&["replay", "--output", "json"]);
    assert_exit(&again, 0);
    let value: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(value["projectors"][0]["start"]["outcome"], "restarted");
    assert_eq!(value["projectors"][0]["catch_up"]["applied"], 400);
    assert_eq!(processed(&client, "balances", "2.0.0").await, 400);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
}

#[tokio::test]
async fn replay_refuses_a_second_version_a_changed_definition_and_an_unknown_projector() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    append(&client, 0, 100, 10).await;
    db.write_config("coord.toml", &balances_toml("2.0.0"));
    assert_exit(&db.coord(&["replay"]), 0);

    let before = db.snapshot().await;
    let unknown = db.coord(&["replay", "--projector", "nope"]);
    assert_exit(&unknown, 2);
    assert!(
        stderr(&unknown).contains("unknown projector \"nope\""),
        "{}",
        stderr(&unknown)
    );

    db.write_config("v3.toml", &balances_toml("3.0.0"));
    let second = db.coord(&["--config", "v3.toml", "replay"]);
    assert_exit(&second, 2);
    assert!(
        stderr(&second).contains("coord abort --projector balances"),
        "{}",
        stderr(&second)
    );

    let changed = balances_toml("2.0.0").replace("amount + ($5", "amount + 2 * ($5");
    db.write_config("changed.toml", &changed);
    let refused = db.coord(&["--config", "changed.toml", "replay", "--output", "json"]);
    assert_exit(&refused, 2);
    let value: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert!(value["error"]
        .as_str()
        .unwrap()
        .contains("balances@2.0.0 was built with a different definition; bump the version"));
    assert_eq!(
        db.snapshot().await,
        before,
        "refused commands change nothing"
    );

    // The same definition resumes (here: nothing left to apply).
    let resumed = db.coord(&["replay", "--output", "json"]);
    assert_exit(&resumed, 0);
    let value: serde_json::Value = serde_json::from_slice(&resumed.stdout).unwrap();
    assert_eq!(value["projectors"][0]["start"]["outcome"], "resumed");
    assert_eq!(value["projectors"][0]["catch_up"]["applied"], 0);

    append(&client, 100, 30, 10).await;
    let caught = db.coord(&["catch-up", "--output", "json"]);
    assert_exit(&caught, 0);
    let value: serde_json::Value = serde_json::from_slice(&caught.stdout).unwrap();
    assert_eq!(value["projectors"][0]["applied"], 30);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
}

/// The advisory lock the gated balances handlers wait for.
const GATE: i64 = 4_242_424;

/// `balances_toml(version)` whose deposits wait for the advisory lock
/// [`GATE`] (shared, until their transaction ends): while a test holds it, a
/// replay of a store from [`append`] applies the batches that open the
/// accounts, then waits inside the first batch with a deposit.
fn gated_balances_toml(version: &str) -> String {
    let plain = "MoneyDeposited = \"UPDATE balances SET amount = amount + ($5->>'amount')::bigint WHERE account = $1\"";
    let toml = balances_toml(version);
    assert!(toml.contains(plain), "{toml}");
    toml.replace(
        plain,
        &format!(
            "MoneyDeposited = \"UPDATE balances SET amount = amount + ($5->>'amount')::bigint \
             WHERE account = $1 AND pg_advisory_xact_lock_shared({GATE})::text = ''\""
        ),
    )
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

/// Starts `coord replay --batch-size 10` of [`gated_balances_toml`] over
/// 4,000 events on 40 accounts behind a closed [`Gate`], and returns once
/// it has committed the 4 batches that open the accounts and waits for the
/// gate inside the fifth.
async fn replay_held_at_the_gate(db: &TestDb, client: &Client) -> (std::process::Child, Gate) {
    append(client, 0, 4000, 40).await;
    db.write_config("coord.toml", &gated_balances_toml("2.0.0"));
    let gate = Gate::close(db).await;
    let child = db.spawn_coord_as("held-replay", &["replay", "--batch-size", "10"]);
    until_backend(db, "held-replay", "UPDATE balances", true).await;
    assert_eq!(processed(client, "balances", "2.0.0").await, 40);
    (child, gate)
}

#[tokio::test]
async fn replay_survives_kill_9_and_a_rerun_applies_every_event_exactly_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let (mut child, gate) = replay_held_at_the_gate(&db, &client).await;
    child.kill().unwrap();
    child.wait().unwrap();
    gate.open().await;
    // The batch in flight died with the process: nothing of it is applied.
    assert_eq!(processed(&client, "balances", "2.0.0").await, 40);
    let rerun = db.coord(&["replay", "--batch-size", "500"]);
    assert_exit(&rerun, 0);
    assert_eq!(processed(&client, "balances", "2.0.0").await, 4000);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
}

#[tokio::test]
async fn replay_runs_several_projectors_concurrently_and_reports_each() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    append(&client, 0, 600, 15).await;
    let counts = r#"
[[projector]]
name = "counts"
version = "1.0.0"
tables = """
CREATE TABLE counts (stream text PRIMARY KEY, n bigint NOT NULL);
"""
[projector.handlers]
AccountOpened = "INSERT INTO counts VALUES ($1, 1)"
MoneyDeposited = "UPDATE counts SET n = n + 1 WHERE stream = $1"
"#;
    db.write_config(
        "coord.toml",
        &format!("{}\n{counts}", balances_toml("2.0.0")),
    );
    let out = db.coord(&[
        "replay",
        "--jobs",
        "2",
        "--batch-size",
        "100",
        "--output",
        "json",
    ]);
    assert_exit(&out, 0);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["projectors"][0]["start"]["projector"], "balances");
    assert_eq!(value["projectors"][0]["catch_up"]["applied"], 600);
    assert_eq!(value["projectors"][1]["start"]["projector"], "counts");
    let handled: i64 = client
        .query_one(
            "SELECT count(*) FROM coord.events WHERE event_type IN ('AccountOpened', 'MoneyDeposited')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(value["projectors"][1]["catch_up"]["applied"], handled);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
    let wrong: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT stream_id, count(*) AS n FROM coord.events \
             WHERE event_type IN ('AccountOpened', 'MoneyDeposited') GROUP BY stream_id) e \
             FULL JOIN counts_v1_0_0.counts c ON c.stream = e.stream_id WHERE c.n IS DISTINCT FROM e.n",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0);
    let text = db.coord(&["replay"]);
    assert_exit(&text, 0);
    assert!(
        stdout(&text).contains("counts@1.0.0: resumed"),
        "{}",
        stdout(&text)
    );
}

#[tokio::test]
async fn ctrl_c_stops_coord_replay_at_a_batch_boundary_with_the_checkpoint_saved() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let (mut child, gate) = replay_held_at_the_gate(&db, &client).await;
    let mut stderr_lines = lines_of(child.stderr.take().unwrap());
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // coord says it took the interrupt; only then may the batch go on.
    let mut err = String::new();
    while !err.contains("interrupted") {
        let line = tokio::time::timeout(Duration::from_secs(60), stderr_lines.recv())
            .await
            .expect("coord replay to report the interrupt on stderr")
            .unwrap_or_else(|| panic!("stderr closed: {err}"));
        err.push_str(&line);
        err.push('\n');
    }
    gate.open().await;
    let out = child.wait_with_output().unwrap();
    while let Some(line) = stderr_lines.recv().await {
        err.push_str(&line);
        err.push('\n');
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("checkpoint"), "{err}");
    let at_stop = processed(&client, "balances", "2.0.0").await;
    // The batch in flight commits, then the replay stops: no further batch.
    assert_eq!(at_stop, 50, "stopped after the batch in flight");
    let v = version_record(&client, "balances", "2.0.0").await;
    assert_eq!(v.status, VersionStatus::Replaying);
    let rerun = db.coord(&["replay"]);
    assert_exit(&rerun, 0);
    assert!(stdout(&rerun).contains("resumed"), "{}", stdout(&rerun));
    assert_eq!(processed(&client, "balances", "2.0.0").await, 4000);
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
}

/// The lines `stream` yields, read on a thread, as they come.
fn lines_of(
    stream: impl std::io::Read + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use std::io::BufRead;
    let (send, receive) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

#[tokio::test]
async fn abort_during_a_running_replay_stops_it_without_applying_into_a_dropped_schema() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let (child, gate) = replay_held_at_the_gate(&db, &client).await;
    // The abort waits for the batch in flight (it locks the version's row
    // first); the batch waits for the gate.
    let abort = db.spawn_coord_as("test-abort", &["abort"]);
    until_backend(&db, "test-abort", "projector_versions", true).await;
    gate.open().await;
    let abort = abort.wait_with_output().unwrap();
    assert_exit(&abort, 0);
    assert!(stdout(&abort).contains("aborted the replay of balances@2.0.0"));
    let out = child.wait_with_output().unwrap();
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("was aborted"), "{}", stderr(&out));
    let state = projector_state(&client, "balances").await;
    assert_eq!(state.replaying_version, None);
    let v = version_record(&client, "balances", "2.0.0").await;
    assert_eq!(v.status, VersionStatus::Aborted);
    let schemas: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'balances_v2_0_0'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0);
}

#[tokio::test]
async fn a_pass_cancelled_before_it_reads_anything_does_not_move_the_horizon() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    append(&client, 0, 300, 10).await;
    let projector = sql_projector(&balances_toml("2.0.0"));
    register(&db, projector.as_ref()).await;
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let relation = RelationName::default();
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let report = run_pass(
        &pool,
        projector.as_ref(),
        &relation,
        &options(50),
        &cancelled,
    )
    .await
    .unwrap();
    assert!(report.cancelled);
    assert_eq!(report.applied, 0);
    let rest = catch_up_in(50, &pool, projector.as_ref()).await;
    assert_eq!(rest.applied, 300, "no event was skipped");
    assert_eq!(mismatches(&client, "balances_v2_0_0").await, 0);
}
