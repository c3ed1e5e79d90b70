//! Nothing lost on any publishing path (issue 9): the Rust publisher,
//! `coord.check_publish` + INSERT, `coord.publish` and plain bulk INSERTs,
//! concurrently, while a version is active and during an activation. After
//! a catch-up (or under a running `coord run`) every active version has
//! applied each event exactly once, in stream order, and its tables equal
//! what a replay of every event produces.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coord::replay::{catch_up_configured, CancellationToken, ReplayOptions};
use coord::{Config, ExpectedVersion, NewEvent, ProjectorSet, Publisher};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_postgres::Client;

use crate::support::{assert_exit, eventually, stderr, stdout, TestDb};

/// A projector that records every application (position, stream, version,
/// in the order applied) and keeps a total per stream. `Noted` events are
/// not handled, so streams mix handled and unhandled types.
pub fn ledger_toml(version: &str) -> String {
    format!(
        r#"
[[projector]]
name = "ledger"
version = "{version}"
tables = """
CREATE TABLE applied (seq bigserial PRIMARY KEY, position bigint NOT NULL, stream_id text NOT NULL, stream_version bigint NOT NULL);
CREATE TABLE totals (stream_id text PRIMARY KEY, amount bigint NOT NULL, last_version bigint NOT NULL);
"""

[projector.handlers]
Deposited = "WITH a AS (INSERT INTO applied (position, stream_id, stream_version) VALUES ($3, $1, $2)) INSERT INTO totals VALUES ($1, ($5->>'amount')::bigint, $2) ON CONFLICT (stream_id) DO UPDATE SET amount = totals.amount + excluded.amount, last_version = excluded.last_version"
"#
    )
}

fn set_of(version: &str) -> ProjectorSet {
    ProjectorSet::from_config(&Config::parse(&ledger_toml(version), "coord.toml").unwrap())
}

fn seed() -> u64 {
    let seed: u64 = std::env::var("COORD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (set COORD_TEST_SEED to repeat)");
    seed
}

/// The four ways an event reaches the store.
#[derive(Clone, Copy, Debug)]
enum Path {
    Rust,
    CheckPublishInsert,
    SqlPublish,
    BulkInsert,
}

/// Counts of what the workload committed, per path.
#[derive(Default)]
struct Counts {
    committed: [AtomicU64; 4],
    refused: AtomicU64,
}

/// One publisher: until `stop`, picks a path and a stream at random
/// (seeded) and publishes one to three events (some unhandled) through it.
/// A publisher refused as stale (CO001) moves on to `next_version`, as a
/// load balancer would move its traffic.
async fn publisher_loop(
    url: String,
    seed: u64,
    versions: (String, Option<String>),
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut client = crate::support::connect(&url).await;
    let mut version = versions.0.clone();
    while !stop.load(Ordering::Relaxed) {
        let path = match rng.gen_range(0..4) {
            0 => Path::Rust,
            1 => Path::CheckPublishInsert,
            2 => Path::SqlPublish,
            _ => Path::BulkInsert,
        };
        let stream = format!("s{}", rng.gen_range(0..6));
        let n = rng.gen_range(1..4);
        let events: Vec<(String, i64)> = (0..n)
            .map(|_| {
                let t = if rng.gen_bool(0.8) {
                    "Deposited"
                } else {
                    "Noted"
                };
                (t.to_owned(), rng.gen_range(1..100))
            })
            .collect();
        let result = publish(&mut client, path, &version, &stream, &events).await;
        match result {
            Ok(()) => {
                counts.committed[path as usize].fetch_add(1, Ordering::Relaxed);
            }
            Err(code) if code == "CO001" => {
                if let Some(next) = &versions.1 {
                    version = next.clone();
                }
                counts.refused.fetch_add(1, Ordering::Relaxed);
            }
            // Conflicts on a shared stream, an activation holding events
            // back, a newer version not active yet: the event is not
            // committed; try something else.
            Err(code) if ["23505", "CO006", "CO003", "CO002", "40P01"].contains(&code.as_str()) => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(code) => panic!("seed {seed}: {path:?} publish failed: {code}"),
        }
    }
}

/// Publishes `events` on `stream` through `path` as configuration
/// `ledger@version`; returns the SQLSTATE of a failure.
async fn publish(
    client: &mut Client,
    path: Path,
    version: &str,
    stream: &str,
    events: &[(String, i64)],
) -> Result<(), String> {
    let code = |e: &tokio_postgres::Error| {
        e.code()
            .map_or_else(|| e.to_string(), |c| c.code().to_owned())
    };
    match path {
        Path::Rust => {
            let publisher = Publisher::new(set_of(version));
            let new: Vec<NewEvent> = events
                .iter()
                .map(|(t, a)| NewEvent::new(t.clone(), json!({ "amount": a })))
                .collect();
            let tx = client.transaction().await.map_err(|e| code(&e))?;
            match publisher
                .publish(&tx, stream, ExpectedVersion::Any, &new)
                .await
            {
                Ok(_) => tx.commit().await.map_err(|e| code(&e)),
                Err(e) => Err(e
                    .sqlstate()
                    .map(str::to_owned)
                    .or_else(|| match &e {
                        coord::Error::Db(db) => Some(code(db)),
                        _ => None,
                    })
                    .unwrap_or_else(|| e.to_string())),
            }
        }
        Path::CheckPublishInsert | Path::BulkInsert => {
            let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
            let amounts: Vec<i64> = events.iter().map(|(_, a)| *a).collect();
            let tx = client.transaction().await.map_err(|e| code(&e))?;
            if matches!(path, Path::CheckPublishInsert) {
                tx.execute(
                    "SELECT coord.check_publish(jsonb_build_object('ledger', $1::text), $2::text[])",
                    &[&version, &types],
                )
                .await
                .map_err(|e| code(&e))?;
            }
            tx.execute(
                "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
                 SELECT $1, (SELECT coalesce(max(stream_version), 0) FROM coord.events WHERE stream_id = $1) + u.ord, \
                 u.t, jsonb_build_object('amount', u.a) \
                 FROM unnest($2::text[], $3::bigint[]) WITH ORDINALITY AS u(t, a, ord)",
                &[&stream, &types, &amounts],
            )
            .await
            .map_err(|e| code(&e))?;
            tx.commit().await.map_err(|e| code(&e))
        }
        Path::SqlPublish => {
            let events: Vec<serde_json::Value> = events
                .iter()
                .map(|(t, a)| json!({ "type": t, "data": { "amount": a } }))
                .collect();
            let tx = client.transaction().await.map_err(|e| code(&e))?;
            tx.execute(
                "SELECT coord.publish(jsonb_build_object('ledger', $1::text), $2, NULL, $3)",
                &[&version, &stream, &serde_json::Value::Array(events)],
            )
            .await
            .map_err(|e| code(&e))?;
            tx.commit().await.map_err(|e| code(&e))
        }
    }
}

/// Every `Deposited` event applied exactly once by the version in `schema`,
/// each stream in stream-version order, and the totals equal to those of a
/// replay of every event.
async fn assert_exact(client: &Client, schema: &str, seed: u64) {
    let q =
        |sql: String| async move { client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) };
    let events = q("SELECT count(*) FROM coord.events WHERE event_type = 'Deposited'".into()).await;
    assert!(events > 0, "seed {seed}: nothing was published");
    let missing_or_twice = q(format!(
        "SELECT count(*) FROM coord.events e WHERE e.event_type = 'Deposited' \
         AND (SELECT count(*) FROM {schema}.applied a WHERE a.position = e.position) <> 1"
    ))
    .await;
    let applied = q(format!("SELECT count(*) FROM {schema}.applied")).await;
    assert_eq!(
        (missing_or_twice, applied),
        (0, events),
        "seed {seed}: {schema} missed or repeated events"
    );
    let out_of_order = q(format!(
        "SELECT count(*) FROM {schema}.applied a JOIN {schema}.applied b \
         ON a.stream_id = b.stream_id AND a.seq < b.seq AND a.stream_version > b.stream_version"
    ))
    .await;
    assert_eq!(out_of_order, 0, "seed {seed}: {schema} broke stream order");
    let differing = q(format!(
        "SELECT count(*) FROM ((SELECT stream_id, amount, last_version FROM {schema}.totals) \
         EXCEPT ALL (SELECT stream_id, sum((data->>'amount')::bigint)::bigint, max(stream_version) \
                     FROM coord.events WHERE event_type = 'Deposited' GROUP BY stream_id)) d"
    ))
    .await;
    assert_eq!(
        differing, 0,
        "seed {seed}: {schema}.totals differ from a replay"
    );
}

/// Replays every event into a fresh version `fresh` (the same definition)
/// and checks that `schema`'s tables hold exactly what that replay built.
async fn assert_equals_a_fresh_replay(db: &TestDb, schema: &str, fresh: &str, seed: u64) {
    let set = set_of(fresh);
    let projector = set.get("ledger").unwrap();
    let mut client = db.client().await;
    let actor = coord::Actor::new("test", "fresh replay");
    coord::replay::start_replay(&mut client, projector.as_ref(), &actor)
        .await
        .unwrap();
    let pool = coord::pool(&db.database_url(), 3).unwrap();
    coord::replay::catch_up(
        &pool,
        projector.as_ref(),
        &coord::RelationName::default(),
        &ReplayOptions::default(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let replayed = coord::schema_name(projector.name(), projector.version());
    for (table, columns) in [
        ("totals", "stream_id, amount, last_version"),
        ("applied", "position, stream_id, stream_version"),
    ] {
        let differing: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM (((SELECT {columns} FROM {schema}.{table}) \
                     EXCEPT ALL (SELECT {columns} FROM {replayed}.{table})) UNION ALL \
                     ((SELECT {columns} FROM {replayed}.{table}) \
                     EXCEPT ALL (SELECT {columns} FROM {schema}.{table}))) d"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            differing, 0,
            "seed {seed}: {schema}.{table} differs from a fresh replay"
        );
    }
}

async fn catch_up_all(db: &TestDb, set: &ProjectorSet) -> u64 {
    let pool = coord::pool(&db.database_url(), 3).unwrap();
    let options = ReplayOptions {
        lag_threshold: 1,
        ..ReplayOptions::default()
    };
    let outcomes = catch_up_configured(
        &pool,
        set,
        &coord::RelationName::default(),
        &options,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(!outcomes.is_empty(), "catch-up found no version to follow");
    outcomes
        .into_iter()
        .map(|o| o.result.unwrap().applied)
        .sum()
}

async fn activate(db: &TestDb, version: &str) {
    db.write_config("coord.toml", &ledger_toml(version));
    assert_exit(&db.coord(&["activate-current-config"]), 0);
}

fn spawn_workload(
    db: &TestDb,
    seed: u64,
    publishers: u64,
    versions: (&str, Option<&str>),
) -> (
    Arc<AtomicBool>,
    Arc<Counts>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let tasks = (0..publishers)
        .map(|i| {
            tokio::spawn(publisher_loop(
                db.url.clone(),
                seed ^ (i + 1),
                (versions.0.to_owned(), versions.1.map(str::to_owned)),
                stop.clone(),
                counts.clone(),
            ))
        })
        .collect();
    (stop, counts, tasks)
}

async fn wait_for_commits(counts: &Counts, at_least: u64) {
    eventually(Duration::from_secs(60), "publishers to commit", || async {
        counts
            .committed
            .iter()
            .all(|c| c.load(Ordering::Relaxed) >= at_least)
    })
    .await;
}

async fn finish(stop: Arc<AtomicBool>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

/// Seeded: every publishing path at once while `ledger@1.0.0` is active
/// inline; then a catch-up applies exactly what bypassed the publishers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publishing_path_reaches_an_active_inline_version_exactly_once_in_order() {
    let seed = seed();
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    // Whatever the seed, some events are applied inline: streams of their own.
    let mut first = db.client().await;
    let deposit = [("Deposited".to_owned(), 1)];
    for path in [Path::Rust, Path::SqlPublish] {
        publish(
            &mut first,
            path,
            "1.0.0",
            &format!("own-{path:?}"),
            &deposit,
        )
        .await
        .unwrap();
    }
    let (stop, counts, tasks) = spawn_workload(&db, seed, 6, ("1.0.0", None));
    wait_for_commits(&counts, 15).await;
    finish(stop, tasks).await;

    let client = db.client().await;
    let applied = catch_up_all(&db, &set_of("1.0.0")).await;
    let total: i64 = client
        .query_one(
            "SELECT count(*) FROM coord.events WHERE event_type = 'Deposited'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // SQL inserts bypassed the publishers; the Rust publisher and
    // coord.publish applied theirs inline.
    assert!(
        applied > 0 && (applied as i64) < total,
        "seed {seed}: catch-up applied {applied} of {total}"
    );
    assert_exact(&client, "ledger_v1_0_0", seed).await;
    assert_equals_a_fresh_replay(&db, "ledger_v1_0_0", "1.0.1", seed).await;

    // The status agrees: nothing left, and inline + catch-up = every event.
    let report = coord::status(&client, &coord::RelationName::default())
        .await
        .unwrap();
    let v = &report.projectors[0].versions[0];
    assert_eq!(v.lag, Some(0), "seed {seed}: {v:?}");
    assert_eq!(
        v.applied_inline + v.applied_by_catch_up,
        total,
        "seed {seed}: {v:?}"
    );
    assert!(v.applied_inline >= 2, "seed {seed}: {v:?}");
}

/// The same paths across an activation of 2.0.0: publishers of 1.0.0 move
/// to 2.0.0 once refused as stale. Afterwards 2.0.0 (built by replay,
/// then fed inline and by catch-up) and the retired 1.0.0 (caught up from
/// its own checkpoint, as a rollback would) each hold every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publishing_path_survives_an_activation_exactly_once_in_order() {
    let seed = seed();
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    let (stop, counts, tasks) = spawn_workload(&db, seed, 6, ("1.0.0", Some("2.0.0")));
    wait_for_commits(&counts, 5).await;
    activate(&db, "2.0.0").await;
    eventually(
        Duration::from_secs(60),
        "publishers to move to 2.0.0",
        || async { counts.refused.load(Ordering::Relaxed) > 0 },
    )
    .await;
    let before: Vec<u64> = counts
        .committed
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    eventually(
        Duration::from_secs(60),
        "2.0.0 publishers to commit",
        || async {
            counts
                .committed
                .iter()
                .zip(&before)
                .all(|(c, b)| c.load(Ordering::Relaxed) >= b + 3)
        },
    )
    .await;
    finish(stop, tasks).await;

    let client = db.client().await;
    catch_up_all(&db, &set_of("2.0.0")).await;
    assert_exact(&client, "ledger_v2_0_0", seed).await;
    assert_equals_a_fresh_replay(&db, "ledger_v2_0_0", "2.0.1", seed).await;

    // The retired version's checkpoint is exact: catching it up applies what
    // it missed, once.
    let pool = coord::pool(&db.database_url(), 3).unwrap();
    coord::replay::catch_up(
        &pool,
        set_of("1.0.0").get("ledger").unwrap().as_ref(),
        &coord::RelationName::default(),
        &ReplayOptions::default(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_exact(&client, "ledger_v1_0_0", seed).await;
}

/// Under a running `coord run`, what bypassed the publishers reaches the
/// active inline version within seconds, without a catch-up command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coord_run_follows_an_active_inline_version() {
    let seed = seed();
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    let mut run = db.spawn_coord(&["run"]);
    let (stop, counts, tasks) = spawn_workload(&db, seed, 4, ("1.0.0", None));
    wait_for_commits(&counts, 10).await;
    finish(stop, tasks).await;

    let client = db.client().await;
    eventually(Duration::from_secs(30), "coord run to catch up", || async {
        let report = coord::status(&client, &coord::RelationName::default())
            .await
            .unwrap();
        report.projectors[0].versions[0].lag == Some(0)
    })
    .await;
    run.kill().unwrap();
    run.wait().unwrap();
    assert_exact(&client, "ledger_v1_0_0", seed).await;
    assert_equals_a_fresh_replay(&db, "ledger_v1_0_0", "1.0.1", seed).await;
}

/// `coord.publish`: gate, append, the stored handlers run by the database
/// (read your writes), the caller's `search_path` restored, positions
/// returned; a version conflict is CO006 and appends nothing.
#[tokio::test]
async fn coord_publish_appends_and_runs_config_handlers_in_the_callers_transaction() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    let client = db.client().await;
    client
        .batch_execute("SET search_path = public")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT coord.publish('{\"ledger\": \"1.0.0\"}', 'acc-1', 0, \
             '[{\"type\": \"Deposited\", \"data\": {\"amount\": 5}}, {\"type\": \"Noted\", \"data\": {}}, \
               {\"type\": \"Deposited\", \"data\": {\"amount\": 7}, \"metadata\": {\"by\": \"test\"}}]'), \
             current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    let positions: Vec<i64> = row.get(0);
    let path: String = row.get(1);
    assert_eq!(positions.len(), 3);
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(path, "public");
    let total: i64 = client
        .query_one(
            "SELECT amount FROM ledger_v1_0_0.totals WHERE stream_id = 'acc-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 12, "the handlers ran inline");
    let inline: i64 = client
        .query_one(
            "SELECT count(*) FROM coord.applied_ahead WHERE name = 'ledger' AND inline",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inline, 2, "both handled events are recorded as applied");

    // Optimistic concurrency: the stream is at 3, not 1.
    let before = db.snapshot().await;
    let err = client
        .query_one(
            "SELECT coord.publish('{\"ledger\": \"1.0.0\"}', 'acc-1', 1, '[{\"type\": \"Deposited\", \"data\": {\"amount\": 1}}]')",
            &[],
        )
        .await
        .unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), "CO006");
    assert_eq!(
        db_err.message(),
        "StreamVersionConflict (CO006): stream acc-1 is at version 3, not 1: reload it and retry"
    );
    assert!(matches!(
        coord::Error::from(err),
        coord::Error::StreamVersionConflict {
            expected: 1,
            actual: 3,
            ..
        }
    ));
    // Malformed events are refused, naming the problem.
    let err = client
        .query_one(
            "SELECT coord.publish('{\"ledger\": \"1.0.0\"}', 'acc-1', NULL, '[{\"data\": {}}]')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22023");
    assert!(err.as_db_error().unwrap().message().contains("\"type\""));
    assert_eq!(
        db.snapshot().await,
        before,
        "a refused publish changed something"
    );

    // Nothing left for a follower: the inline application was recorded.
    assert_eq!(catch_up_all(&db, &set_of("1.0.0")).await, 0);
}

/// A changed definition under the same version (CO005, exit 9) is refused
/// by the library, both SQL functions and the CLI, and nothing is appended.
#[tokio::test]
async fn a_changed_definition_under_the_active_version_is_refused_everywhere() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    let changed =
        ledger_toml("1.0.0").replace("amount + excluded.amount", "amount + 2 * excluded.amount");
    let changed_set = ProjectorSet::from_config(&Config::parse(&changed, "coord.toml").unwrap());
    let fingerprint = coord::Projector::fingerprint(changed_set.get("ledger").unwrap().as_ref());
    let mut client = db.client().await;
    let before = db.snapshot().await;

    // Library.
    let tx = client.transaction().await.unwrap();
    let err = Publisher::new(changed_set.clone())
        .publish(
            &tx,
            "s",
            ExpectedVersion::Any,
            &[NewEvent::new("Deposited", json!({"amount": 1}))],
        )
        .await
        .unwrap_err();
    tx.rollback().await.unwrap();
    assert!(
        matches!(&err, coord::Error::ProjectorDefinitionMismatch { projector, running, .. }
            if projector == "ledger" && running == "1.0.0"),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 9);
    assert_eq!(err.sqlstate(), Some("CO005"));
    assert!(!err.is_retryable());
    assert!(
        err.to_string().starts_with(
            "ProjectorDefinitionMismatch (CO005): projector ledger 1.0.0 has another definition"
        ),
        "{err}"
    );
    assert!(err.to_string().ends_with("bump the version"), "{err}");

    // SQL: both functions, with the fingerprint in the projectors argument.
    let projectors = json!({ "ledger": { "version": "1.0.0", "fingerprint": fingerprint } });
    for sql in [
        "SELECT coord.check_publish($1, ARRAY['Deposited'])",
        "SELECT coord.publish($1, 's', NULL, '[{\"type\": \"Deposited\", \"data\": {\"amount\": 1}}]')",
    ] {
        let err = client.execute(sql, &[&projectors]).await.unwrap_err();
        let db_err = err.as_db_error().unwrap();
        assert_eq!(db_err.code().code(), "CO005", "{sql}");
        assert!(
            db_err.message().starts_with("ProjectorDefinitionMismatch (CO005): projector ledger 1.0.0"),
            "{}",
            db_err.message()
        );
    }
    // Without a fingerprint (or with the right one) the same call passes.
    client
        .execute("SELECT coord.check_publish('{\"ledger\": \"1.0.0\"}')", &[])
        .await
        .unwrap();

    // CLI: publish, check (and so /ready, which runs the same check).
    db.write_config("coord.toml", &changed);
    let out = db.coord(&[
        "publish",
        "--stream",
        "s",
        "--type",
        "Deposited",
        "--data",
        "{\"amount\": 1}",
    ]);
    assert_exit(&out, 9);
    assert!(
        stderr(&out)
            .starts_with("coord: ProjectorDefinitionMismatch (CO005): projector ledger 1.0.0"),
        "{}",
        stderr(&out)
    );
    let out = db.coord(&["check", "--output", "json"]);
    assert_exit(&out, 9);
    assert_exit(
        &db.coord(&["wait", "--until", "active", "--timeout", "5"]),
        9,
    );
    assert_eq!(
        db.snapshot().await,
        before,
        "a refused publish changed something"
    );
}

/// A version activating with event types coord does not know holds back
/// every event type (CO003, retryable, exit 5) in the library, both SQL
/// functions and the CLI; nothing is appended.
#[tokio::test]
async fn an_activating_version_with_unknown_types_holds_back_every_event_type() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    let mut client = db.client().await;
    // A state no command makes (9.0.0 of an unknown definition activating),
    // written directly.
    client
        .execute(
            "UPDATE coord.projector_states SET activating_version = '9.0.0', replaying_version = NULL \
             WHERE name = 'ledger' AND active_version = '1.0.0'",
            &[],
        )
        .await
        .unwrap();
    let before = db.snapshot().await;

    let tx = client.transaction().await.unwrap();
    let err = Publisher::new(set_of("1.0.0"))
        .publish(
            &tx,
            "s",
            ExpectedVersion::Any,
            &[NewEvent::new("SomeType", json!({}))],
        )
        .await
        .unwrap_err();
    tx.rollback().await.unwrap();
    assert!(
        matches!(&err, coord::Error::ProjectorIsActivating { projector, activating, .. }
            if projector == "ledger" && activating == "9.0.0"),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(
        err.to_string()
            .starts_with("ProjectorIsActivating (CO003): projector ledger is activating 9.0.0"),
        "{err}"
    );
    for sql in [
        "SELECT coord.check_publish('{\"ledger\": \"1.0.0\"}', ARRAY['SomeType'])",
        "SELECT coord.publish('{\"ledger\": \"1.0.0\"}', 's', NULL, '[{\"type\": \"SomeType\", \"data\": {}}]')",
    ] {
        let err = client.execute(sql, &[]).await.unwrap_err();
        assert_eq!(err.code().unwrap().code(), "CO003", "{sql}");
        assert!(err
            .as_db_error()
            .unwrap()
            .message()
            .starts_with("ProjectorIsActivating (CO003): "));
    }
    db.write_config("coord.toml", &ledger_toml("1.0.0"));
    let out = db.coord(&[
        "publish",
        "--stream",
        "s",
        "--type",
        "SomeType",
        "--data",
        "{}",
        "--retry-for",
        "0",
    ]);
    assert_exit(&out, 5);
    assert!(
        stderr(&out).starts_with("coord: ProjectorIsActivating (CO003): "),
        "{}",
        stderr(&out)
    );
    assert_exit(&db.coord(&["check", "--event-type", "SomeType"]), 5);
    assert_eq!(
        db.snapshot().await,
        before,
        "a held-back publish changed something"
    );
}

/// `coord check` lists only inline projectors as running inline; `coord
/// catch-up` catches up active versions and reports what it applied.
#[tokio::test]
async fn check_lists_inline_projectors_only_and_catch_up_reports_active_versions() {
    let db = TestDb::migrated().await;
    let both = format!(
        "{}{}",
        ledger_toml("1.0.0"),
        ledger_toml("1.0.0").replace("name = \"ledger\"", "name = \"audit\"\nmode = \"async\"")
    );
    db.write_config("coord.toml", &both);
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    let out = db.coord(&["check", "--output", "json"]);
    assert_exit(&out, 0);
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["inline"], json!(["ledger"]));

    db.client()
        .await
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             VALUES ('bulk', 1, 'Deposited', '{\"amount\": 3}'), ('bulk', 2, 'Deposited', '{\"amount\": 4}')",
        )
        .await
        .unwrap();
    let out = db.coord(&["catch-up"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("ledger@1.0.0: 2 events applied"), "{text}");
    assert!(text.contains("audit@1.0.0: 2 events applied"), "{text}");
    let out = db.coord(&["catch-up"]);
    assert!(
        stdout(&out).contains("ledger@1.0.0: 0 events applied"),
        "{}",
        stdout(&out)
    );
    assert_exact(&db.client().await, "ledger_v1_0_0", 0).await;
}

/// `activate-current-config` brings an unchanged active version up to date
/// with what bypassed its publishers (a `catch_up` step), and a run with
/// nothing pending still writes nothing.
#[tokio::test]
async fn activate_current_config_catches_up_an_unchanged_active_version() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             VALUES ('bulk', 1, 'Deposited', '{\"amount\": 3}'), ('bulk', 2, 'Noted', '{}')",
        )
        .await
        .unwrap();
    let plan = db.coord(&["plan", "--output", "json"]);
    assert_exit(&plan, 0);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&plan)).unwrap();
    assert_eq!(plan["steps"][0]["events_to_process"], 1, "{plan}");
    let out = db.coord(&["activate-current-config", "--output", "json"]);
    assert_exit(&out, 0);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["steps"][0]["action"], "catch_up", "{report}");
    assert_eq!(report["steps"][0]["replayed_events"], 1, "{report}");
    assert_exact(&db.client().await, "ledger_v1_0_0", 0).await;

    let before = db.snapshot().await;
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    assert_eq!(db.snapshot().await, before);
}

/// Publishers built before V4 call `coord.gate` and apply what it returns
/// without recording it: it still refuses, but returns no projector, so
/// their events go to the follower instead of being applied twice.
#[tokio::test]
async fn the_pre_v4_gate_still_refuses_but_runs_nothing_inline() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    let client = db.client().await;
    let inline: Vec<String> = client
        .query_one("SELECT coord.gate('{\"ledger\": \"1.0.0\"}')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(inline.is_empty(), "{inline:?}");
    let current: Vec<String> = client
        .query_one("SELECT coord.gate_inline('{\"ledger\": \"1.0.0\"}')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, ["ledger"]);
    let err = client
        .query_one("SELECT coord.gate('{\"ledger\": \"0.9.0\"}')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "CO001");
}

/// Upgrading: a version active inline before V4 applied its events without
/// recording them. The migration's step records them as applied once, so a
/// follower applies only what comes after, not everything again.
#[tokio::test]
async fn the_v4_upgrade_records_what_pre_v4_inline_versions_applied() {
    let db = TestDb::migrated().await;
    activate(&db, "1.0.0").await;
    let client = db.client().await;
    // As before V4: events applied inline (here: by hand) and not recorded.
    client
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             VALUES ('old', 1, 'Deposited', '{\"amount\": 2}'), ('old', 2, 'Deposited', '{\"amount\": 3}');
             INSERT INTO ledger_v1_0_0.applied (position, stream_id, stream_version)
               SELECT position, stream_id, stream_version FROM coord.events ORDER BY position;
             INSERT INTO ledger_v1_0_0.totals VALUES ('old', 5, 2);
             UPDATE coord.projector_versions SET horizon = '1';
             DELETE FROM coord.applied_ahead;",
        )
        .await
        .unwrap();
    client
        .batch_execute("SELECT coord.v4_record_inline_applied()")
        .await
        .unwrap();
    // After the upgrade, a bulk insert: only it is left to apply.
    client
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             VALUES ('old', 3, 'Deposited', '{\"amount\": 4}')",
        )
        .await
        .unwrap();
    assert_eq!(catch_up_all(&db, &set_of("1.0.0")).await, 1);
    assert_exact(&client, "ledger_v1_0_0", 0).await;
}
