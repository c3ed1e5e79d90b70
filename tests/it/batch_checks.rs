//! Set-based checks (`[projector.batch_checks]`, decision 0089): a query
//! over `batch_events` names the events that must not be applied, so under
//! `park` a batch with failures costs one more call instead of a search,
//! under `fail` the replay stops just before the first named event, and
//! inline (the Rust `Publisher` and `coord.publish`) the publish is refused
//! with the check's message and nothing written. A bad check is refused at
//! configuration load with nothing written.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use coord::records::{parked_events, version};
use coord::replay::ReplayOptions;
use coord::{Config, ExpectedVersion, NewEvent, ProjectorSet, Publisher, SqlProjector};
use serde_json::json;

use crate::batch_handlers::replay_with;
use crate::contents::{digest, refused_and_unchanged};
use crate::park_slices::{one_batch, replay_one_batch, store, EVENTS};
use crate::parking::Counting;
use crate::sql_publish_batch::activated;
use crate::support::TestDb;

const CHECK_MESSAGE: &str = "amount is not an integer";

/// The trailing `;` and comment are cut before the query is wrapped.
const CHECK: &str = r#"MoneyDeposited = """
SELECT position, 'amount is not an integer' FROM batch_events
WHERE jsonb_typeof(data->'amount') IS DISTINCT FROM 'number'; -- names every bad one
""""#;

fn toml(name: &str, on_error: &str) -> String {
    toml_with(name, on_error, CHECK)
}

fn toml_with(name: &str, on_error: &str, checks: &str) -> String {
    format!(
        r#"
[[projector]]
name = "{name}"
version = "1.0.0"
on_error = "{on_error}"
tables = "CREATE TABLE deposits (position bigint PRIMARY KEY, amount bigint NOT NULL);"

[projector.batch_checks]
{checks}

[projector.batch_handlers]
MoneyDeposited = "INSERT INTO deposits SELECT position, (data->>'amount')::bigint FROM batch_events"
"#
    )
}

fn counting(on_error: &str) -> Counting {
    let config = Config::parse(&toml("checked", on_error), "test").unwrap();
    let on_error = config.projectors[0].on_error;
    Counting::new(
        Arc::new(SqlProjector::new(config.projectors[0].clone())),
        on_error,
    )
}

/// Publishes `events` to stream `acct-1` through the Rust publisher.
async fn publish(
    publisher: &Publisher,
    client: &mut tokio_postgres::Client,
    events: &[NewEvent],
) -> coord::Result<()> {
    publisher
        .publish_with_retry(
            client,
            "acct-1",
            ExpectedVersion::Any,
            events,
            coord::RetryPolicy::default(),
        )
        .await
        .map(drop)
}

#[tokio::test]
async fn a_check_naming_the_failing_events_parks_them_without_a_search() {
    let db = TestDb::migrated().await;
    let bad = store(&db).await;
    assert_eq!(bad.len(), 20);
    let projector = counting("park");
    let report = replay_with(&db, &projector, one_batch()).await;
    assert_eq!((report.applied, report.parked), (EVENTS as u64 - 20, 20));

    let client = db.client().await;
    let parked = parked_events(&client, "checked", "1.0.0").await.unwrap();
    let positions: Vec<i64> = parked.iter().map(|p| p.position).collect();
    assert_eq!(positions, bad);
    assert!(
        parked.iter().all(|p| p.error.contains(CHECK_MESSAGE)),
        "{:?}",
        parked[0].error
    );
    // Exactly the good events, with their amounts.
    let wrong: i64 = client
        .query_one(
            "SELECT count(*) FROM ((SELECT position, (data->>'amount')::bigint FROM coord.events \
               WHERE jsonb_typeof(data->'amount') = 'number' EXCEPT TABLE checked_v1_0_0.deposits) \
             UNION ALL (TABLE checked_v1_0_0.deposits EXCEPT SELECT position, \
               (data->>'amount')::bigint FROM coord.events \
               WHERE jsonb_typeof(data->'amount') = 'number')) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0);
    // The failing call named all 20; the rest applied in one more call.
    // Without the names the batch is searched: about 280 calls
    // (tests/it/park_slices.rs).
    let calls = projector.calls.load(Ordering::SeqCst);
    assert!(calls <= 3, "{calls} calls of the projector");
}

/// Events a check reads, counted by `public.check_rows` (a sequence: its
/// calls survive the rollback of a failing call). With `subquery`, the check
/// also holds a subquery, so it is not one that judges each event alone.
fn counted_check(subquery: bool) -> String {
    let extra = if subquery {
        " AND EXISTS (SELECT 1)"
    } else {
        ""
    };
    format!(
        r#"MoneyDeposited = """
SELECT position, 'amount is not an integer' FROM batch_events
WHERE (nextval('public.check_rows') < 0 OR jsonb_typeof(data->'amount') IS DISTINCT FROM 'number'){extra}
""""#
    )
}

/// Under `park`, a check that judges each event alone (one `SELECT` over
/// `batch_events`, nothing else; decision 0091) reads each event once: the
/// rest of a batch whose failing events it named is applied without it.
/// The same check with a subquery reads the rest again. Both park the same
/// events and apply the same rows.
#[tokio::test]
async fn a_check_judging_each_event_alone_is_not_run_again_on_the_rest() {
    let db = TestDb::migrated().await;
    let bad = store(&db).await;
    let client = db.client().await;
    client
        .batch_execute("CREATE SEQUENCE public.check_rows")
        .await
        .unwrap();
    let mut reads = Vec::new();
    for (name, subquery) in [("alone", false), ("set", true)] {
        client
            .batch_execute("ALTER SEQUENCE public.check_rows RESTART")
            .await
            .unwrap();
        let config =
            Config::parse(&toml_with(name, "park", &counted_check(subquery)), "test").unwrap();
        let on_error = config.projectors[0].on_error;
        let projector = Counting::new(
            Arc::new(SqlProjector::new(config.projectors[0].clone())),
            on_error,
        );
        let report = replay_with(&db, &projector, one_batch()).await;
        assert_eq!((report.applied, report.parked), (EVENTS as u64 - 20, 20));
        let parked = parked_events(&client, name, "1.0.0").await.unwrap();
        let positions: Vec<i64> = parked.iter().map(|p| p.position).collect();
        assert_eq!(positions, bad, "{name}");
        assert_eq!(projector.calls.load(Ordering::SeqCst), 2, "{name}");
        let (last, called): (i64, bool) = client
            .query_one("SELECT last_value, is_called FROM public.check_rows", &[])
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        reads.push(if called { last } else { 0 });
    }
    // Each event once; then each at least twice (the plan may evaluate the
    // failing rows' condition more than once).
    assert_eq!(
        reads[0], EVENTS,
        "events read by the check judging each alone"
    );
    assert!(
        reads[1] >= 2 * EVENTS - 20,
        "events read by the check with a subquery: {}",
        reads[1]
    );
    let (rows, differing): (i64, i64) = client
        .query_one(
            "SELECT (SELECT count(*) FROM alone_v1_0_0.deposits), count(*) FROM \
             ((TABLE alone_v1_0_0.deposits EXCEPT TABLE set_v1_0_0.deposits) \
              UNION ALL (TABLE set_v1_0_0.deposits EXCEPT TABLE alone_v1_0_0.deposits)) d",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((rows, differing), (EVENTS - 20, 0));
}

#[tokio::test]
async fn under_fail_a_check_stops_the_replay_just_before_the_first_named_event() {
    let db = TestDb::migrated().await;
    let bad = store(&db).await;
    let projector = counting("fail");
    let error = replay_one_batch(&db, &projector)
        .await
        .unwrap_err()
        .to_string();
    let client = db.client().await;
    assert!(
        error.contains(&format!("failed at position {}", bad[0])) && error.contains(CHECK_MESSAGE),
        "{error}"
    );
    let v = version(&client, "checked", "1.0.0").await.unwrap().unwrap();
    assert_eq!(v.events_processed, bad[0] - 1);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM checked_v1_0_0.deposits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, bad[0] - 1);
}

#[tokio::test]
async fn inline_a_check_refuses_the_publish_and_nothing_is_written() {
    let text = toml("checked", "fail");
    let db = activated(&text).await;
    let mut client = db.client().await;
    let versions = json!({"checked": "1.0.0"});
    let good = json!([{"type": "MoneyDeposited", "data": {"amount": 5}}]);
    let mixed = json!([
        {"type": "MoneyDeposited", "data": {"amount": 7}},
        {"type": "MoneyDeposited", "data": {"amount": "n/a"}},
        {"type": "MoneyDeposited", "data": {}},
    ]);
    client
        .execute(
            "SELECT coord.publish($1::jsonb, 'acct-1', NULL, $2::jsonb)",
            &[&versions, &good],
        )
        .await
        .unwrap();
    let before = digest(&db).await;

    // coord.publish (another language's publisher): CO007, naming the
    // first failing event and how many more.
    let error = client
        .execute(
            "SELECT coord.publish($1::jsonb, 'acct-1', NULL, $2::jsonb)",
            &[&versions, &mixed],
        )
        .await
        .unwrap_err();
    let db_error = error.as_db_error().expect("a database error");
    assert_eq!(db_error.code().code(), "CO007");
    assert!(
        db_error.message().contains(CHECK_MESSAGE)
            && db_error.message().contains("(and 1 more failing events)"),
        "{}",
        db_error.message()
    );
    assert_eq!(digest(&db).await, before);

    // The Rust Publisher: a handler error with the check's message.
    let config = Config::parse(&text, "coord.toml").unwrap();
    let publisher = Publisher::new(ProjectorSet::from_config(&config));
    let events: Vec<NewEvent> = mixed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| NewEvent::new("MoneyDeposited", e["data"].clone()))
        .collect();
    let error = publish(&publisher, &mut client, &events)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(CHECK_MESSAGE), "{error}");
    assert_eq!(digest(&db).await, before);

    let amounts: Vec<i64> = client
        .query("SELECT amount FROM checked_v1_0_0.deposits", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(amounts, [5]);
}

#[tokio::test]
async fn a_bad_check_is_refused_at_load_and_writes_nothing() {
    let db = TestDb::migrated().await;
    for (check, needle) in [
        (
            "MoneyWithdrawn = \"SELECT position, 'x' FROM batch_events\"",
            "field `batch_checks.MoneyWithdrawn`: event type \"MoneyWithdrawn\" has no batch handler",
        ),
        (
            "MoneyDeposited = \"DELETE FROM deposits RETURNING position, 'x'\"",
            "field `batch_checks.MoneyDeposited`: the check is not a query (DELETE)",
        ),
        (
            "MoneyDeposited = \"SELECT 1, 'x'; COMMIT\"",
            "field `batch_checks.MoneyDeposited`: the check holds 2 statements",
        ),
    ] {
        let text = toml_with("checked", "park", check);
        let path = db.write_config("bad.toml", &text);
        for command in ["activate-current-config", "replay"] {
            refused_and_unchanged(
                &db,
                &[command, "--config", path.to_str().unwrap()],
                needle,
            )
            .await;
        }
    }
}

/// Deposits and withdrawals, each check over its own type.
fn two_types_toml(name: &str) -> String {
    format!(
        r#"
[[projector]]
name = "{name}"
version = "1.0.0"
on_error = "park"
tables = "CREATE TABLE moves (position bigint PRIMARY KEY, amount bigint NOT NULL);"

[projector.batch_checks]
MoneyDeposited = "SELECT position, 'deposit without amount' FROM batch_events WHERE jsonb_typeof(data->'amount') IS DISTINCT FROM 'number'"
MoneyWithdrawn = "WITH w AS (SELECT * FROM batch_events) SELECT position, 'withdrawal without amount' FROM w WHERE jsonb_typeof(data->'amount') IS DISTINCT FROM 'number'"

[projector.batch_handlers]
MoneyDeposited = "INSERT INTO moves SELECT position, (data->>'amount')::bigint FROM batch_events"
MoneyWithdrawn = "INSERT INTO moves SELECT position, -(data->>'amount')::bigint FROM batch_events"
"#
    )
}

#[tokio::test]
async fn one_failing_call_names_the_failures_of_every_checked_type() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acct-' || (i % 10), i / 10 + 1, \
               CASE WHEN i % 2 = 0 THEN 'MoneyDeposited' ELSE 'MoneyWithdrawn' END, \
               CASE WHEN i % 100 IN (10, 11) THEN '{}'::jsonb \
                    ELSE jsonb_build_object('amount', i % 7 + 1) END \
             FROM generate_series(0, 1999) AS i ORDER BY i",
            &[],
        )
        .await
        .unwrap();
    let config = Config::parse(&two_types_toml("moves"), "test").unwrap();
    let projector = Counting::new(
        Arc::new(SqlProjector::new(config.projectors[0].clone())),
        config.projectors[0].on_error,
    );
    let report = replay_with(&db, &projector, ReplayOptions::default()).await;
    assert_eq!((report.applied, report.parked), (1960, 40));
    let parked = parked_events(&client, "moves", "1.0.0").await.unwrap();
    let withdrawals = parked
        .iter()
        .filter(|p| p.error.contains("withdrawal without amount"))
        .count();
    assert_eq!((parked.len(), withdrawals), (40, 20));
    // Checks one statement: the first call names all 40, the second
    // applies the rest. A statement per check would need a third call.
    let calls = projector.calls.load(Ordering::SeqCst);
    assert_eq!(calls, 2, "{calls} calls of the projector");
    let sum: i64 = client
        .query_one("SELECT sum(amount)::bigint FROM moves_v1_0_0.moves", &[])
        .await
        .unwrap()
        .get(0);
    let expected: i64 = client
        .query_one(
            "SELECT sum(CASE WHEN event_type = 'MoneyDeposited' THEN 1 ELSE -1 END \
             * (data->>'amount')::bigint)::bigint FROM coord.events WHERE data ? 'amount'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, expected);

    // Inline through the Rust publisher: both types' checks in one
    // statement, their parameters numbered one after the other (the good
    // publish needs both sets right).
    let text = two_types_toml("moves");
    let db = activated(&text).await;
    let config = Config::parse(&text, "coord.toml").unwrap();
    let publisher = Publisher::new(ProjectorSet::from_config(&config));
    let mut client = db.client().await;
    let good = [
        NewEvent::new("MoneyDeposited", json!({"amount": 9})),
        NewEvent::new("MoneyWithdrawn", json!({"amount": 4})),
    ];
    publish(&publisher, &mut client, &good).await.unwrap();
    let before = digest(&db).await;
    let bad = [
        NewEvent::new("MoneyWithdrawn", json!({})),
        NewEvent::new("MoneyDeposited", json!({"amount": 1})),
        NewEvent::new("MoneyDeposited", json!({"amount": "x"})),
    ];
    let error = publish(&publisher, &mut client, &bad)
        .await
        .unwrap_err()
        .to_string();
    // The first failing event (by position) is the failure.
    assert!(
        error.contains("failed at position 3 (MoneyWithdrawn): withdrawal without amount"),
        "{error}"
    );
    assert_eq!(digest(&db).await, before);
    let amounts: Vec<i64> = client
        .query(
            "SELECT amount FROM moves_v1_0_0.moves ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(amounts, [9, -4]);
}
