//! The publisher gate: every row of DESIGN.md's gate table through the
//! library, the SQL function and the CLI, and its concurrency properties.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coord::activation;
use coord::gate::{self, LockPolicy};
use coord::names::RelationName;
use coord::{Config, Error, ExpectedVersion, NewEvent, ProjectorSet, Publisher};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_postgres::Client;

use crate::support::{assert_exit, balances_toml, eventually, stderr, stdout, TestDb};

const TYPES: &str = "{AccountOpened,MoneyDeposited,MoneyWithdrawn}";

fn publisher(version: &str) -> Publisher {
    let config = Config::parse(&balances_toml(version), "coord.toml").unwrap();
    Publisher::new(ProjectorSet::from_config(&config))
}

/// Builds `balances@version`'s schema and table and registers the version,
/// as activation would, without touching projector_states.
async fn build_version(client: &Client, version: &str) {
    let config = Config::parse(&balances_toml(version), "coord.toml").unwrap();
    let schema = coord::schema_name(&config.projectors[0].name, &config.projectors[0].version);
    let fingerprint =
        coord::Projector::fingerprint(&coord::SqlProjector::new(config.projectors[0].clone()));
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path = {schema}; {} RESET search_path;
             INSERT INTO coord.projector_versions (name, version, status, schema_name, fingerprint, event_types, mode)
             VALUES ('balances', '{version}', 'active', '{schema}', '{fingerprint}', '{TYPES}', 'inline');",
            config.projectors[0].tables
        ))
        .await
        .unwrap();
}

async fn set_state(
    client: &Client,
    name: &str,
    active: Option<&str>,
    activating: Option<&str>,
    replaying: Option<&str>,
) {
    client
        .execute(SET_STATE, &[&name, &active, &activating, &replaying])
        .await
        .unwrap();
}

/// Writes a whole row of `coord.projector_states`, as no command would: the
/// gate's tests set up every state directly.
const SET_STATE: &str = "INSERT INTO coord.projector_states \
    (name, active_version, activating_version, replaying_version, updated_at) VALUES ($1, $2, $3, $4, now()) \
    ON CONFLICT (name) DO UPDATE SET active_version = EXCLUDED.active_version, \
    activating_version = EXCLUDED.activating_version, replaying_version = EXCLUDED.replaying_version, \
    updated_at = now()";

/// `balances@version` registered for replay by the library (its schema,
/// tables and `replaying_version`), ready for [`activation::activate_version`].
async fn replaying(db: &TestDb, version: &str) -> Arc<dyn coord::Projector> {
    let config = Config::parse(&balances_toml(version), "coord.toml").unwrap();
    let projector = ProjectorSet::from_config(&config)
        .get("balances")
        .cloned()
        .unwrap();
    let mut client = db.client().await;
    coord::start_replay(&mut client, projector.as_ref(), &actor())
        .await
        .unwrap();
    projector
}

fn actor() -> coord::Actor {
    coord::Actor::new("test-host", "gate test")
}

async fn event_count(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM coord.events", &[])
        .await
        .unwrap()
        .get(0)
}

async fn publish(
    client: &mut Client,
    p: &Publisher,
    stream: &str,
    event_type: &str,
) -> coord::Result<i64> {
    let tx = client.transaction().await.unwrap();
    let result = p
        .publish(
            &tx,
            stream,
            ExpectedVersion::Any,
            &[NewEvent::new(event_type, json!({"amount": 5}))],
        )
        .await;
    match result {
        Ok(stored) => {
            tx.commit().await.unwrap();
            Ok(stored[0].position)
        }
        Err(e) => {
            tx.rollback().await.unwrap();
            Err(e)
        }
    }
}

/// What one gate-table row must produce.
#[derive(Debug)]
enum Expect {
    Allowed { inline: bool },
    Refused { sqlstate: &'static str, exit: i32 },
}

/// Checks one situation through the library, `coord.check_publish` and the CLI.
async fn assert_gate(db: &TestDb, running: &str, event_type: &str, expect: Expect) {
    let mut client = db.client().await;
    let p = publisher(running);
    db.write_config("coord.toml", &balances_toml(running));

    // Library.
    let before = event_count(&client).await;
    let result = publish(&mut client, &p, "account-lib", event_type).await;
    match &expect {
        Expect::Allowed { .. } => {
            result.unwrap_or_else(|e| panic!("{expect:?}: {e:?}"));
            assert_eq!(event_count(&client).await, before + 1);
        }
        Expect::Refused { sqlstate, exit } => {
            let err = result.unwrap_err();
            assert_eq!(err.sqlstate(), Some(*sqlstate), "{err}");
            assert_eq!(i32::from(err.exit_code()), *exit);
            assert!(err.is_gate_refusal());
            assert_eq!(
                event_count(&client).await,
                before,
                "a refused publish committed"
            );
        }
    }
    if let Expect::Allowed { inline } = expect {
        let rows = client
            .query(
                "SELECT 1 FROM balances_v1_0_0.balances WHERE account = 'account-lib'",
                &[],
            )
            .await;
        let ran_inline = matches!(rows, Ok(rows) if !rows.is_empty());
        assert_eq!(
            ran_inline,
            inline && event_type == "AccountOpened",
            "inline projector ran?"
        );
    }

    // SQL, as a publisher in another language would call it.
    let sql = format!(
        "BEGIN; SELECT coord.check_publish('{{\"balances\": \"{running}\"}}', ARRAY['{event_type}']); \
         INSERT INTO coord.events (stream_id, stream_version, event_type, data) VALUES ('account-sql', 1, '{event_type}', '{{}}'); COMMIT;"
    );
    let before = event_count(&client).await;
    let result = client.batch_execute(&sql).await;
    match &expect {
        Expect::Allowed { .. } => {
            result.unwrap();
            assert_eq!(event_count(&client).await, before + 1);
            client
                .batch_execute("DELETE FROM coord.events WHERE stream_id = 'account-sql'")
                .await
                .unwrap();
        }
        Expect::Refused { sqlstate, .. } => {
            let err = result.unwrap_err();
            assert_eq!(err.code().unwrap().code(), *sqlstate, "{err}");
            client.batch_execute("ROLLBACK").await.unwrap();
            assert_eq!(event_count(&client).await, before);
        }
    }

    // CLI.
    let before = event_count(&client).await;
    let out = db.coord(&[
        "publish",
        "--stream",
        "account-cli",
        "--type",
        event_type,
        "--data",
        "{\"amount\": 1}",
    ]);
    match &expect {
        Expect::Allowed { .. } => {
            assert_exit(&out, 0);
            let position: i64 = stdout(&out).trim().parse().unwrap();
            assert!(position > 0);
            assert_eq!(event_count(&client).await, before + 1);
            assert_exit(&db.coord(&["check", "--event-type", event_type]), 0);
        }
        Expect::Refused { exit, sqlstate } => {
            assert_exit(&out, *exit);
            assert!(
                stderr(&out).starts_with(&format!("coord: {} (", refusal_name(sqlstate))),
                "{}",
                stderr(&out)
            );
            assert_eq!(event_count(&client).await, before);
            assert_exit(&db.coord(&["check", "--event-type", event_type]), *exit);
        }
    }
}

/// The name every refusal's text starts with.
fn refusal_name(sqlstate: &str) -> &'static str {
    match sqlstate {
        "CO001" => "NewerProjectorIsActive",
        "CO002" => "ProjectorNotYetActive",
        "CO003" => "ProjectorIsActivating",
        "CO004" => "UnknownProjectorActive",
        "CO005" => "ProjectorDefinitionMismatch",
        _ => "StreamVersionConflict",
    }
}

#[tokio::test]
async fn an_empty_state_table_allows_publishing_without_inline_projectors() {
    let db = TestDb::migrated().await;
    assert_gate(
        &db,
        "1.0.0",
        "AccountOpened",
        Expect::Allowed { inline: false },
    )
    .await;
}

#[tokio::test]
async fn an_active_projector_missing_from_the_configuration_is_unknown() {
    let db = TestDb::migrated().await;
    set_state(&db.client().await, "loyalty", Some("1.0.0"), None, None).await;
    assert_gate(
        &db,
        "1.0.0",
        "AccountOpened",
        Expect::Refused {
            sqlstate: "CO004",
            exit: 6,
        },
    )
    .await;
    let p = publisher("1.0.0");
    let err = publish(&mut db.client().await, &p, "x", "AccountOpened")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownProjectorActive { projector, active } if projector == "loyalty" && active == "1.0.0"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_projector_only_replaying_is_not_run_inline() {
    let db = TestDb::migrated().await;
    set_state(&db.client().await, "balances", None, None, Some("1.0.0")).await;
    assert_gate(
        &db,
        "1.0.0",
        "AccountOpened",
        Expect::Allowed { inline: false },
    )
    .await;
}

#[tokio::test]
async fn an_activating_projector_refuses_its_event_types_as_retryable() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    build_version(&client, "1.0.0").await;
    set_state(&client, "balances", Some("1.0.0"), Some("2.0.0"), None).await;
    assert_gate(
        &db,
        "1.0.0",
        "MoneyDeposited",
        Expect::Refused {
            sqlstate: "CO003",
            exit: 5,
        },
    )
    .await;
    let err = publish(
        &mut db.client().await,
        &publisher("1.0.0"),
        "x",
        "MoneyDeposited",
    )
    .await
    .unwrap_err();
    assert!(err.is_retryable());
    assert!(
        matches!(&err, Error::ProjectorIsActivating { projector, running, activating }
        if projector == "balances" && running == "1.0.0" && activating == "2.0.0"),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_activating_projector_lets_other_event_types_through() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    build_version(&client, "1.0.0").await;
    // The gate knows 2.0.0's event types (otherwise it holds back everything).
    build_version(&client, "2.0.0").await;
    set_state(&client, "balances", Some("1.0.0"), Some("2.0.0"), None).await;
    assert_gate(
        &db,
        "1.0.0",
        "UserRegistered",
        Expect::Allowed { inline: true },
    )
    .await;
}

#[tokio::test]
async fn the_same_active_version_publishes_and_runs_inline_in_the_same_transaction() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    build_version(&client, "1.0.0").await;
    set_state(&client, "balances", Some("1.0.0"), None, None).await;
    assert_gate(
        &db,
        "1.0.0",
        "AccountOpened",
        Expect::Allowed { inline: true },
    )
    .await;

    // The inline write and the event commit or roll back together.
    let p = publisher("1.0.0");
    let tx = client.transaction().await.unwrap();
    p.publish(
        &tx,
        "acc-rb",
        ExpectedVersion::NoStream,
        &[NewEvent::new("AccountOpened", json!({}))],
    )
    .await
    .unwrap();
    p.publish(
        &tx,
        "acc-rb",
        ExpectedVersion::Exact(1),
        &[NewEvent::new("MoneyDeposited", json!({"amount": 7}))],
    )
    .await
    .unwrap();
    let amount: i64 = tx
        .query_one(
            "SELECT amount FROM balances_v1_0_0.balances WHERE account = 'acc-rb'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(amount, 7);
    let path: String = tx.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_eq!(
        path, "\"$user\", public",
        "the publisher restores search_path"
    );
    tx.rollback().await.unwrap();
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM balances_v1_0_0.balances WHERE account = 'acc-rb'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn an_older_publisher_is_refused_as_stale_when_a_newer_version_is_active() {
    let db = TestDb::migrated().await;
    set_state(&db.client().await, "balances", Some("2.0.0"), None, None).await;
    assert_gate(
        &db,
        "1.0.0",
        "AccountOpened",
        Expect::Refused {
            sqlstate: "CO001",
            exit: 3,
        },
    )
    .await;
    // Stale code is refused whatever it publishes.
    assert_gate(
        &db,
        "1.0.0",
        "UserRegistered",
        Expect::Refused {
            sqlstate: "CO001",
            exit: 3,
        },
    )
    .await;
    let err = publish(
        &mut db.client().await,
        &publisher("1.0.0"),
        "x",
        "AccountOpened",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::NewerProjectorIsActive { projector, running, active }
        if projector == "balances" && running == "1.0.0" && active == "2.0.0"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert_eq!(
        err.to_string(),
        "NewerProjectorIsActive (CO001): projector balances 1.0.0 is stale: 2.0.0 is active; route traffic to the new deployment"
    );
}

#[tokio::test]
async fn a_newer_publisher_is_refused_before_its_version_is_active() {
    let db = TestDb::migrated().await;
    set_state(&db.client().await, "balances", Some("1.0.0"), None, None).await;
    assert_gate(
        &db,
        "2.0.0",
        "AccountOpened",
        Expect::Refused {
            sqlstate: "CO002",
            exit: 4,
        },
    )
    .await;
    // Semver precedence, not text order: 1.10.0 is newer than 1.9.0.
    set_state(&db.client().await, "balances", Some("1.9.0"), None, None).await;
    let err = publish(
        &mut db.client().await,
        &publisher("1.10.0"),
        "x",
        "AccountOpened",
    )
    .await
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("CO002"), "{err}");
    // A pre-release is older than its release.
    set_state(&db.client().await, "balances", Some("2.0.0"), None, None).await;
    let err = publish(
        &mut db.client().await,
        &publisher("2.0.0-rc.1"),
        "x",
        "AccountOpened",
    )
    .await
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("CO001"), "{err}");
}

#[tokio::test]
async fn check_publish_rejects_malformed_arguments_and_repeatable_read() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let err = client
        .batch_execute("SELECT coord.check_publish('[1]')")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22023");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("must be a JSON object"));
    let err = client
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT coord.check_publish('{}'); COMMIT",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "0A000", "{err}");
    client.batch_execute("ROLLBACK").await.unwrap();
    set_state(&client, "balances", Some("1.0.0"), None, None).await;
    let err = client
        .batch_execute("SELECT coord.check_publish('{\"balances\": \"one\"}')")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22023", "{err}");
}

#[tokio::test]
async fn the_cli_refuses_bad_publish_arguments_without_writing() {
    let db = TestDb::migrated().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let before = db.snapshot().await;
    for args in [
        vec![
            "publish",
            "--stream",
            "s",
            "--type",
            "T",
            "--data",
            "{not json",
        ],
        vec![
            "publish",
            "--stream",
            "s",
            "--type",
            "T",
            "--data",
            "{}",
            "--metadata",
            "[1]",
        ],
        vec!["publish", "--stream", "", "--type", "T", "--data", "{}"],
        vec![
            "publish",
            "--stream",
            "s",
            "--type",
            "T",
            "--data",
            "{}",
            "--expected-version",
            "-1",
        ],
        vec!["publish", "--stream", "s", "--type", "T"],
    ] {
        assert_exit(&db.coord(&args), 2);
    }
    assert_eq!(before, db.snapshot().await);
}

#[tokio::test]
async fn optimistic_concurrency_refuses_a_wrong_expected_version() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    let p = publisher("1.0.0");
    let tx = client.transaction().await.unwrap();
    p.publish(
        &tx,
        "s",
        ExpectedVersion::NoStream,
        &[NewEvent::new("A", json!({})), NewEvent::new("B", json!({}))],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let err = p
        .publish(
            &tx,
            "s",
            ExpectedVersion::Exact(1),
            &[NewEvent::new("C", json!({}))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StreamVersionConflict {
                expected: 1,
                actual: 2,
                ..
            }
        ),
        "{err:?}"
    );
    tx.rollback().await.unwrap();
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let out = db.coord(&[
        "publish",
        "--stream",
        "s",
        "--type",
        "C",
        "--data",
        "{}",
        "--expected-version",
        "5",
    ]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("StreamVersionConflict (CO006): stream s is at version 2, not 5"),
        "{}",
        stderr(&out)
    );
    let out = db.coord(&[
        "publish",
        "--stream",
        "s",
        "--type",
        "C",
        "--data",
        "{}",
        "--expected-version",
        "2",
        "--output",
        "json",
    ]);
    assert_exit(&out, 0);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["stream_version"], 3);
}

/// Sixteen publishers are all between their gate check and their commit at
/// the same moment: the gate does not serialise them.
#[tokio::test]
async fn publishers_do_not_serialise_against_each_other() {
    let db = TestDb::migrated().await;
    set_state(&db.client().await, "balances", None, None, None).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (url, barrier) = (db.url.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = crate::support::connect(&url).await;
            let tx = client.transaction().await.unwrap();
            publisher("1.0.0")
                .publish(
                    &tx,
                    &format!("s{i}"),
                    ExpectedVersion::Any,
                    &[NewEvent::new("AccountOpened", json!({}))],
                )
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(30), barrier.wait())
                .await
                .expect("publishers were serialised: not all reached the barrier");
            tx.commit().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(event_count(&db.client().await).await, 16);
}

/// Whether backend `pid` waits for a lock (false once it has ended).
async fn waiting_on_lock(client: &Client, pid: i32) -> bool {
    client
        .query_opt(
            "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .is_some_and(|row| row.get(0))
}

async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A flip of `active_version` waits for a publisher that passed the gate,
/// and that publisher's event commits before the flip; after it, the old
/// version is refused.
#[tokio::test]
async fn a_state_change_waits_for_a_publisher_between_check_and_commit() {
    let db = TestDb::migrated().await;
    let observer = db.client().await;
    build_version(&observer, "1.0.0").await;
    set_state(&observer, "balances", Some("1.0.0"), None, None).await;
    let v2 = replaying(&db, "2.0.0").await;

    let mut publisher_client = db.client().await;
    let tx = publisher_client.transaction().await.unwrap();
    publisher("1.0.0")
        .publish(
            &tx,
            "acc",
            ExpectedVersion::Any,
            &[NewEvent::new("AccountOpened", json!({}))],
        )
        .await
        .unwrap();

    // The library's critical section, on a pool of one connection whose
    // backend is known.
    let pool = coord::pool(&db.database_url(), 1).unwrap();
    let activation_pid = backend_pid(&pool.get().await.unwrap()).await;
    let activation = tokio::spawn(async move {
        let policy = LockPolicy {
            deadline: Duration::from_secs(60),
            ..LockPolicy::default()
        };
        activation::activate_version(
            &pool,
            v2.as_ref(),
            &RelationName::default(),
            policy,
            &actor(),
        )
        .await
        .unwrap()
    });
    eventually(
        Duration::from_secs(30),
        "the flip to wait for the publisher's lock",
        || waiting_on_lock(&observer, activation_pid),
    )
    .await;
    assert!(!activation.is_finished());
    let active: Option<String> = observer
        .query_one(
            "SELECT active_version FROM coord.projector_states WHERE name = 'balances'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active.as_deref(), Some("1.0.0"));
    tx.commit().await.unwrap();
    let flip = activation.await.unwrap();
    assert_eq!(flip.to.as_deref(), Some("2.0.0"));
    assert_eq!(
        flip.final_events, 1,
        "the publisher's event applied to 2.0.0"
    );

    assert_eq!(
        event_count(&observer).await,
        1,
        "the publisher's event committed before the flip"
    );
    let err = publish(
        &mut publisher_client,
        &publisher("1.0.0"),
        "acc2",
        "AccountOpened",
    )
    .await
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("CO001"));
}

/// While an activation holds back a projector's event types, other event
/// types publish freely and its own types wait until it ends.
#[tokio::test]
async fn holding_back_a_projector_blocks_only_its_event_types() {
    let db = TestDb::migrated().await;
    let observer = db.client().await;
    set_state(&observer, "balances", None, None, None).await;

    let mut activation_client = db.client().await;
    let mut activation = activation_client.transaction().await.unwrap();
    let types: Vec<String> = ["AccountOpened", "MoneyDeposited"]
        .map(String::from)
        .to_vec();
    gate::hold_back_publishers(&mut activation, &types, LockPolicy::default())
        .await
        .unwrap();

    // Unrelated event types go through while the hold lasts.
    let mut other = db.client().await;
    tokio::time::timeout(
        Duration::from_secs(30),
        publish(&mut other, &publisher("1.0.0"), "u", "UserRegistered"),
    )
    .await
    .expect("an unrelated publisher was blocked")
    .unwrap();

    // A publisher of a held type waits.
    let mut held_client = db.client().await;
    let held_pid = backend_pid(&held_client).await;
    let held = tokio::spawn(async move {
        publish(&mut held_client, &publisher("1.0.0"), "a", "MoneyDeposited").await
    });
    eventually(
        Duration::from_secs(30),
        "the held publisher to wait",
        || waiting_on_lock(&observer, held_pid),
    )
    .await;
    assert!(!held.is_finished());
    activation.commit().await.unwrap();
    held.await.unwrap().unwrap();
    assert_eq!(event_count(&observer).await, 2);
}

/// A long-running publisher transaction makes activation give up with
/// `Busy` (exit code 7) instead of queueing everyone behind it; while it
/// retries, other publishers get through.
#[tokio::test]
async fn lock_waits_are_bounded() {
    let db = TestDb::migrated().await;
    let mut long_client = db.client().await;
    let long = long_client.transaction().await.unwrap();
    publisher("1.0.0")
        .publish(
            &long,
            "slow",
            ExpectedVersion::Any,
            &[NewEvent::new("AccountOpened", json!({}))],
        )
        .await
        .unwrap();

    let mut activation_client = db.client().await;
    let mut tx = activation_client.transaction().await.unwrap();
    let policy = LockPolicy {
        attempt_timeout: Duration::from_millis(10),
        pause: Duration::from_millis(1),
        deadline: Duration::from_millis(100),
    };
    let err = gate::drain_all_publishers(&mut tx, policy)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockDeadline { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 7);
    assert!(
        err.to_string().contains("long-running transaction"),
        "{err}"
    );
    tx.rollback().await.unwrap();

    // While an activation keeps retrying (its deadline far away), other
    // publishers get through between its attempts instead of queueing
    // behind its exclusive request.
    let activation_pid = backend_pid(&activation_client).await;
    let retrying = tokio::spawn(async move {
        let mut tx = activation_client.transaction().await.unwrap();
        let policy = LockPolicy {
            attempt_timeout: Duration::from_millis(10),
            pause: Duration::from_millis(20),
            deadline: Duration::from_secs(120),
        };
        gate::drain_all_publishers(&mut tx, policy).await.unwrap();
        tx.commit().await.unwrap();
    });
    let observer = db.client().await;
    eventually(
        Duration::from_secs(30),
        "the activation to wait for the long transaction",
        || waiting_on_lock(&observer, activation_pid),
    )
    .await;
    let mut other = db.client().await;
    // A generous "does not hang" bound: without bounded attempts the
    // publisher would wait for the long transaction (until the end of the test).
    tokio::time::timeout(
        Duration::from_secs(20),
        publish(&mut other, &publisher("1.0.0"), "fast", "MoneyDeposited"),
    )
    .await
    .expect("a publisher queued behind the retrying activation")
    .unwrap();
    assert!(
        !retrying.is_finished(),
        "the activation gave up or got through before the publisher"
    );
    long.commit().await.unwrap();
    retrying.await.unwrap();
}

/// Invariant 3 under load: publishers of N publish continuously, with random
/// pauses between their gate check and their commit, while the state flips
/// to N+1. No N event may commit after the flip.
#[tokio::test]
async fn no_stale_event_commits_after_the_flip() {
    let seed: u64 = std::env::var("COORD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (set COORD_TEST_SEED to repeat)");
    let db = TestDb::migrated().await;
    let observer = db.client().await;
    build_version(&observer, "1.0.0").await;
    set_state(&observer, "balances", Some("1.0.0"), None, None).await;
    let v2 = replaying(&db, "2.0.0").await;

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let (url, stop, committed, refused) = (
            db.url.clone(),
            stop.clone(),
            committed.clone(),
            refused.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ i);
            let mut client = crate::support::connect(&url).await;
            let p = publisher("1.0.0");
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let tx = client.transaction().await.unwrap();
                let event_type = if rng.gen_bool(0.5) {
                    "MoneyDeposited"
                } else {
                    "UserRegistered"
                };
                let result = p
                    .publish(
                        &tx,
                        &format!("p{i}-{n}"),
                        ExpectedVersion::Any,
                        &[NewEvent::new(event_type, json!({"amount": 1}))],
                    )
                    .await;
                if let Err(e) = result {
                    // While 2.0.0 is activating its types are held back
                    // (retryable); after the flip 1.0.0 is stale.
                    if e.sqlstate() == Some("CO001") {
                        refused.fetch_add(1, Ordering::SeqCst);
                    } else {
                        assert_eq!(e.sqlstate(), Some("CO003"), "{e}");
                    }
                    tx.rollback().await.unwrap();
                    continue;
                }
                // Random work between the gate check and the commit: the
                // window in which a flip must not slip through.
                if rng.gen_bool(0.5) {
                    let ms = rng.gen_range(0..3);
                    tx.execute("SELECT pg_sleep($1::float8 / 1000)", &[&f64::from(ms)])
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                committed.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let started = committed.load(Ordering::SeqCst);
    eventually(Duration::from_secs(30), "publishers to commit", || {
        let c = committed.clone();
        async move { c.load(Ordering::SeqCst) > started + 50 }
    })
    .await;

    // The library's critical section, as activation runs it.
    let pool = coord::pool(&db.database_url(), 2).unwrap();
    activation::activate_version(
        &pool,
        v2.as_ref(),
        &RelationName::default(),
        LockPolicy::default(),
        &actor(),
    )
    .await
    .unwrap();
    let at_flip = event_count(&observer).await;

    let after = committed.load(Ordering::SeqCst);
    // Every publisher keeps trying, and is refused, after the flip.
    eventually(
        Duration::from_secs(30),
        "publishers to be refused after the flip",
        || {
            let r = refused.clone();
            async move { r.load(Ordering::SeqCst) >= 40 }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        event_count(&observer).await,
        at_flip,
        "seed {seed}: an N event committed after the flip"
    );
    assert!(after > started, "publishers ran");
}

/// Two publishers race for the same stream version: the loser gets a
/// retryable conflict saying a concurrent publisher appended first.
#[tokio::test]
async fn a_concurrent_append_to_the_same_stream_is_a_retryable_conflict() {
    let db = TestDb::migrated().await;
    let observer = db.client().await;
    let mut first_client = db.client().await;
    let first = first_client.transaction().await.unwrap();
    publisher("1.0.0")
        .publish(
            &first,
            "s",
            ExpectedVersion::Any,
            &[NewEvent::new("A", json!({}))],
        )
        .await
        .unwrap();

    let mut second_client = db.client().await;
    let second_pid = backend_pid(&second_client).await;
    let second = tokio::spawn(async move {
        let tx = second_client.transaction().await.unwrap();
        let result = publisher("1.0.0")
            .publish(
                &tx,
                "s",
                ExpectedVersion::Any,
                &[NewEvent::new("B", json!({}))],
            )
            .await;
        tx.rollback().await.unwrap();
        result
    });
    eventually(
        Duration::from_secs(30),
        "the second append to wait on the first",
        || waiting_on_lock(&observer, second_pid),
    )
    .await;
    first.commit().await.unwrap();
    let err = second.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::StreamVersionConflict { actual: -1, .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(
        err.to_string(),
        "StreamVersionConflict (CO006): stream s was appended to by a concurrent publisher: reload it and retry"
    );
}

/// A publisher refused with `ProjectorIsActivating` sleeps on the
/// activation's marker, in a transaction of its own that holds nothing
/// else, for as long as the activation runs (here before its critical
/// section takes any gate key), and publishes as soon as the marker is
/// released: it does not poll the gate (decision 0067).
#[tokio::test]
async fn a_refused_publisher_sleeps_on_the_activation_marker_until_it_ends() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    build_version(&client, "1.0.0").await;
    set_state(&client, "balances", Some("1.0.0"), Some("2.0.0"), None).await;

    // The activation: its marker held, no gate key held yet.
    let marker = db.client().await;
    marker
        .query_one(
            "SELECT pg_advisory_lock($1, hashtext('balances'))",
            &[&coord::locks::ACTIVATING],
        )
        .await
        .unwrap();

    let mut publishing = db.client().await;
    let pid = backend_pid(&publishing).await;
    let task = tokio::spawn(async move {
        publisher("1.0.0")
            .publish_with_retry(
                &mut publishing,
                "acct-1",
                ExpectedVersion::Any,
                &[NewEvent::new("MoneyDeposited", json!({"amount": 5}))],
                coord::RetryPolicy {
                    deadline: Duration::from_secs(60),
                    ..coord::RetryPolicy::default()
                },
            )
            .await
    });
    // Refused, it waits on the marker (a polling publisher never waits on a lock).
    eventually(
        Duration::from_secs(30),
        "the refused publisher to wait on the activation marker",
        || waiting_on_lock(&client, pid),
    )
    .await;
    assert_eq!(event_count(&client).await, 0);

    // The activation is given up: back to replaying, then the marker goes.
    client
        .execute(
            "UPDATE coord.projector_states SET activating_version = NULL WHERE name = 'balances'",
            &[],
        )
        .await
        .unwrap();
    marker
        .query_one(
            "SELECT pg_advisory_unlock($1, hashtext('balances'))",
            &[&coord::locks::ACTIVATING],
        )
        .await
        .unwrap();

    let stored = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the publisher ends once the activation has")
        .unwrap()
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(event_count(&client).await, 1);
}

/// Which backends hold the activation marker of `balances`.
async fn marker_holders(client: &Client) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int::oid \
             AND objid = hashtext('balances')::oid AND mode = 'ExclusiveLock' AND granted",
            &[&coord::locks::ACTIVATING],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// An activation holds its marker from before it marks the version
/// activating until it ends, on its one connection, and releases it when
/// it gives up as when it completes: the connection goes back to the pool
/// without it.
#[tokio::test]
async fn an_activation_holds_its_marker_until_it_ends() {
    let db = TestDb::migrated().await;
    let observer = db.client().await;
    build_version(&observer, "1.0.0").await;
    set_state(&observer, "balances", Some("1.0.0"), None, None).await;
    let v2 = replaying(&db, "2.0.0").await;

    // A publisher between its gate check and its commit.
    let mut publisher_client = db.client().await;
    let tx = publisher_client.transaction().await.unwrap();
    publisher("1.0.0")
        .publish(
            &tx,
            "acc",
            ExpectedVersion::Any,
            &[NewEvent::new("AccountOpened", json!({}))],
        )
        .await
        .unwrap();

    // One connection: the marker, step 1 and the critical section share it.
    let pool = coord::pool(&db.database_url(), 1).unwrap();
    let activation_pid = backend_pid(&pool.get().await.unwrap()).await;
    let (go, gone) = tokio::sync::oneshot::channel::<()>();
    let activation = {
        let (pool, v2) = (pool.clone(), v2.clone());
        tokio::spawn(async move {
            // Retries until the test lets it give up.
            let policy = LockPolicy {
                deadline: Duration::from_secs(120),
                ..LockPolicy::default()
            };
            let (events, actor) = (RelationName::default(), actor());
            tokio::select! {
                result = activation::activate_version(
                    &pool,
                    v2.as_ref(),
                    &events,
                    policy,
                    &actor,
                ) => Some(result),
                _ = gone => None,
            }
        })
    };
    eventually(
        Duration::from_secs(30),
        "the activation to hold its marker",
        || async { marker_holders(&observer).await == vec![activation_pid] },
    )
    .await;
    // Given up: the future is dropped mid-attempt. The marker goes with
    // its connection, which the pool does not get back holding it.
    go.send(()).unwrap();
    assert!(activation.await.unwrap().is_none());
    eventually(
        Duration::from_secs(30),
        "the abandoned activation's marker to be released",
        || async { marker_holders(&observer).await.is_empty() },
    )
    .await;

    // A second activation completes once the publisher commits, and
    // leaves no marker behind on the pooled connection.
    let activation = {
        let pool = pool.clone();
        tokio::spawn(async move {
            activation::activate_version(
                &pool,
                v2.as_ref(),
                &RelationName::default(),
                LockPolicy {
                    deadline: Duration::from_secs(120),
                    ..LockPolicy::default()
                },
                &actor(),
            )
            .await
        })
    };
    eventually(
        Duration::from_secs(30),
        "the second activation to hold its marker",
        || async { marker_holders(&observer).await.len() == 1 },
    )
    .await;
    tx.commit().await.unwrap();
    let flip = activation.await.unwrap().unwrap();
    assert_eq!(flip.to.as_deref(), Some("2.0.0"));
    assert!(marker_holders(&observer).await.is_empty());
    let pooled = pool.get().await.unwrap();
    let held: i64 = pooled
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "the pooled connection came back holding a lock");
}

/// `Publisher::wait_out_activation` tells a refused publisher the outcome in
/// the statement that wakes it (decision 0085): a stale configuration gets
/// `NewerProjectorIsActive` from the wait itself, with no publishing attempt
/// after it; an interrupted activation (marker gone, version still
/// activating) means pause and retry; a free marker returns at once.
#[tokio::test]
async fn a_refused_publisher_learns_the_outcome_in_the_statement_that_wakes_it() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    build_version(&client, "1.0.0").await;
    build_version(&client, "2.0.0").await;
    set_state(&client, "balances", Some("1.0.0"), Some("2.0.0"), None).await;
    let marker = db.client().await;
    let hold = "SELECT pg_advisory_lock($1, hashtext('balances'))";
    let release = "SELECT pg_advisory_unlock($1, hashtext('balances'))";
    let key = [&coord::locks::ACTIVATING as &(dyn tokio_postgres::types::ToSql + Sync)];

    // Woken by an activation that flipped to 2.0.0: refused as stale by the wait.
    marker.query_one(hold, &key).await.unwrap();
    let mut waiting = db.client().await;
    let pid = backend_pid(&waiting).await;
    let task = tokio::spawn(async move {
        let outcome = publisher("1.0.0")
            .wait_out_activation(&mut waiting, "balances", Duration::from_secs(60))
            .await;
        (outcome, waiting)
    });
    eventually(
        Duration::from_secs(30),
        "the publisher to wait on the activation marker",
        || waiting_on_lock(&client, pid),
    )
    .await;
    set_state(&client, "balances", Some("2.0.0"), None, None).await;
    marker.query_one(release, &key).await.unwrap();
    let (outcome, mut waiting) = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the wait ends with the activation")
        .unwrap();
    match outcome {
        Err(Error::NewerProjectorIsActive {
            running, active, ..
        }) => {
            assert_eq!((running.as_str(), active.as_str()), ("1.0.0", "2.0.0"));
        }
        other => panic!("expected NewerProjectorIsActive from the wait, got {other:?}"),
    }
    assert_eq!(event_count(&client).await, 0);

    // No activation holds the marker: `false` at once, whatever the state.
    let free = publisher("1.0.0")
        .wait_out_activation(&mut waiting, "balances", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!free, "a free marker means no activation runs");

    // Interrupted: the marker goes while the version is still activating.
    set_state(&client, "balances", Some("1.0.0"), Some("2.0.0"), None).await;
    marker.query_one(hold, &key).await.unwrap();
    let task = tokio::spawn(async move {
        publisher("1.0.0")
            .wait_out_activation(&mut waiting, "balances", Duration::from_secs(60))
            .await
    });
    eventually(
        Duration::from_secs(30),
        "the publisher to wait on the activation marker",
        || waiting_on_lock(&client, pid),
    )
    .await;
    marker.query_one(release, &key).await.unwrap();
    let interrupted = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the wait ends with the marker")
        .unwrap()
        .unwrap();
    assert!(
        !interrupted,
        "a version left activating means pause and retry, not an error"
    );
}

/// `Publisher::publish_and_commit` commits the events with the inline
/// projection, leaves the connection's `search_path` as it was (the
/// handlers' one was local to the transaction), and rolls back a refusal.
#[tokio::test]
async fn publish_and_commit_commits_with_the_projection_and_leaves_the_session_as_it_was() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    build_version(&client, "1.0.0").await;
    build_version(&client, "2.0.0").await;
    set_state(&client, "balances", Some("1.0.0"), None, None).await;
    client
        .batch_execute("SET search_path = public")
        .await
        .unwrap();

    let p = publisher("1.0.0");
    let tx = client.transaction().await.unwrap();
    p.publish_and_commit(
        tx,
        "acc-1",
        ExpectedVersion::NoStream,
        &[
            NewEvent::new("AccountOpened", json!({})),
            NewEvent::new("MoneyDeposited", json!({"amount": 7})),
        ],
    )
    .await
    .unwrap();
    let row = client
        .query_one(
            "SELECT (SELECT amount FROM balances_v1_0_0.balances WHERE account = 'acc-1'), \
                    current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 7);
    assert_eq!(row.get::<_, String>(1), "public");
    assert_eq!(event_count(&client).await, 2);

    // Refused as stale: nothing written, the connection usable.
    set_state(&client, "balances", Some("2.0.0"), None, None).await;
    let tx = client.transaction().await.unwrap();
    let refused = p
        .publish_and_commit(
            tx,
            "acc-1",
            ExpectedVersion::Any,
            &[NewEvent::new("MoneyDeposited", json!({"amount": 1}))],
        )
        .await;
    assert!(
        matches!(refused, Err(Error::NewerProjectorIsActive { .. })),
        "{refused:?}"
    );
    assert_eq!(event_count(&client).await, 2);
    let amount: i64 = client
        .query_one(
            "SELECT amount FROM balances_v1_0_0.balances WHERE account = 'acc-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(amount, 7);
}
