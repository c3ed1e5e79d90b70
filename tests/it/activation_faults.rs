//! Issue 12, items 1 to 3: losing the activation lock is noticed, no version
//! stays activating, and the critical section never keeps publishers queued
//! behind a long transaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coord::activation::{self, ActivateOptions};
use coord::gate::LockPolicy;
use coord::Actor;
use coord::{Error, ExpectedVersion, NewEvent, Publisher, RelationName, RetryPolicy};
use serde_json::json;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::activation::{activate_cli, balances, expected_balances, import, set, state};
use crate::support::{assert_exit, eventually, stderr, stdout, TestDb};

/// Transitions of balances@`version` into `to`.
async fn transitions(client: &Client, version: &str, to: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM coord.transitions WHERE name = 'balances' AND version = $1 AND to_status = $2",
            &[&version, &to],
        )
        .await
        .unwrap()
        .get(0)
}

/// Publishers of the active version proceed (no retry allowed).
async fn publish_v1_without_retrying(db: &TestDb) {
    Publisher::new(set("1.0.0"))
        .publish_with_retry(
            &mut db.client().await,
            "acc-2",
            ExpectedVersion::Any,
            &[NewEvent::new("MoneyDeposited", json!({"amount": 1}))],
            RetryPolicy {
                deadline: Duration::ZERO,
                ..RetryPolicy::default()
            },
        )
        .await
        .unwrap();
}

/// The versions a balances@1.0.0 publisher runs.
const BALANCES_V1: &str = r#"{"balances": "1.0.0"}"#;

/// A publisher (running `versions`) of an unrelated event type between its
/// gate check and its commit: the flip must wait for it (invariant 3).
pub(crate) async fn long_unrelated_transaction<'a>(
    client: &'a mut Client,
    versions: &str,
) -> tokio_postgres::Transaction<'a> {
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "SELECT coord.check_publish($1::text::jsonb, ARRAY['SomethingElse'])",
        &[&versions],
    )
    .await
    .unwrap();
    tx
}

/// Item 1: terminating the backend that holds the activation lock during a
/// replay stops that run before it commits anything more (no flip); a second
/// run started meanwhile proceeds alone and completes exactly.
#[tokio::test]
async fn losing_the_activation_lock_stops_the_run_and_the_next_proceeds_alone() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 200, 100).await;
    db.write_config("v1.toml", &crate::support::balances_toml("1.0.0"));
    let first = db.spawn_coord(&[
        "activate-current-config",
        "--config",
        "v1.toml",
        "--batch-size",
        "50",
    ]);
    eventually(Duration::from_secs(60), "the replay to commit a batch", || {
        let client = &client;
        async move {
            client
                .query_opt("SELECT 1 FROM coord.projector_versions WHERE name = 'balances' AND events_processed > 0", &[])
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;
    let holder: i32 = client
        .query_one(
            &format!(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = {} AND objid = 0 \
                 AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                coord::locks::ACTIVATION
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute("SELECT pg_terminate_backend($1)", &[&holder])
        .await
        .unwrap();
    let second = db.spawn_coord(&[
        "activate-current-config",
        "--config",
        "v1.toml",
        "--lock-wait",
        "120",
    ]);
    let first = tokio::task::spawn_blocking(move || first.wait_with_output().unwrap());
    let second = tokio::task::spawn_blocking(move || second.wait_with_output().unwrap());
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_ne!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("lost the activation lock"),
        "{}",
        stderr(&first)
    );
    assert_exit(&second, 0);
    assert_eq!(state(&client).await, (Some("1.0.0".into()), None, None));
    assert_eq!(transitions(&client, "1.0.0", "active").await, 1, "one flip");
    assert_eq!(transitions(&client, "1.0.0", "activating").await, 1);
    let processed: i64 = client
        .query_one(
            "SELECT events_processed FROM coord.projector_versions WHERE name = 'balances'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(processed, 200 * 101, "each event applied exactly once");
    assert_eq!(
        balances(&client, "balances_v1_0_0").await,
        expected_balances(&client).await
    );
}

/// Item 2: terminating the critical section's backend returns the version to
/// replaying (in a transaction of its own), so publishers of the active
/// version proceed; a re-run then activates it.
#[tokio::test]
async fn terminating_the_critical_section_returns_the_version_to_replaying() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 20, 5).await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let mut long_client = db.client().await;
    let long = long_unrelated_transaction(&mut long_client, BALANCES_V1).await;
    db.write_config("v2.toml", &crate::support::balances_toml("2.0.0"));
    let child = db.spawn_coord(&[
        "activate-current-config",
        "--config",
        "v2.toml",
        "--lock-deadline",
        "600",
    ]);
    // The critical section's backend: the one requesting the global key
    // exclusively (it retries in attempts, each waiting on the long transaction).
    let started = Instant::now();
    let pid: i32 = loop {
        let row = client
            .query_opt(
                &format!(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = {} AND objid = 0 \
                     AND mode = 'ExclusiveLock' AND NOT granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1",
                    coord::locks::GATE_PUBLISHERS
                ),
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get(0);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the critical section never waited"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(
        state(&client).await,
        (Some("1.0.0".into()), None, Some("2.0.0".into())),
        "{}",
        stderr(&out)
    );
    publish_v1_without_retrying(&db).await;
    long.commit().await.unwrap();
    assert_exit(&activate_cli(&db, "2.0.0", &[]), 0);
    assert_eq!(
        balances(&client, "balances_v2_0_0").await,
        expected_balances(&client).await
    );
}

/// Item 2: after `kill -9` of an activation whose critical section was
/// retrying behind a long transaction, `plan`, `rollback` and `abort`
/// recommend commands that work, and `coord abort --projector` backs the
/// interrupted activation out; v1 publishers then proceed.
#[tokio::test]
async fn an_interrupted_activation_is_backed_out_by_abort() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 20, 5).await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let mut long_client = db.client().await;
    let long = long_unrelated_transaction(&mut long_client, BALANCES_V1).await;
    db.write_config("v2.toml", &crate::support::balances_toml("2.0.0"));
    db.write_config("v1.toml", &crate::support::balances_toml("1.0.0"));
    let mut child = db.spawn_coord(&[
        "activate-current-config",
        "--config",
        "v2.toml",
        "--lock-deadline",
        "600",
    ]);
    eventually(
        Duration::from_secs(60),
        "the version to be activating",
        || {
            let client = &client;
            async move { state(client).await.1.as_deref() == Some("2.0.0") }
        },
    )
    .await;
    // While it runs, abort refuses (exit 7) and changes nothing.
    let busy = db.coord(&["abort", "--projector", "balances"]);
    assert_exit(&busy, 7);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(state(&client).await.1.as_deref(), Some("2.0.0"));

    let plan = db.coord(&["plan", "--config", "v1.toml"]);
    let text = format!("{}{}", stdout(&plan), stderr(&plan));
    assert!(text.contains("coord abort --projector balances"), "{text}");
    let rollback = db.coord(&["rollback", "balances", "--config", "v1.toml"]);
    assert_ne!(rollback.status.code(), Some(0));
    assert!(
        stderr(&rollback).contains("coord abort --projector balances"),
        "{}",
        stderr(&rollback)
    );

    let abort = db.coord(&["abort", "--projector", "balances"]);
    assert_exit(&abort, 0);
    assert!(
        stdout(&abort).contains("balances@2.0.0"),
        "{}",
        stdout(&abort)
    );
    assert_eq!(state(&client).await, (Some("1.0.0".into()), None, None));
    publish_v1_without_retrying(&db).await;
    long.commit().await.unwrap();
    assert_exit(&activate_cli(&db, "2.0.0", &[]), 0);
    assert_eq!(
        balances(&client, "balances_v2_0_0").await,
        expected_balances(&client).await
    );
}

/// Item 3: while the critical section cannot complete (an unrelated
/// transaction holds the flip back), publishers of the activated projector's
/// types never wait inside the gate for long: they get the retryable
/// ProjectorIsActivating. The bound here is generous (seconds); the figure is
/// measured by `coord-bench activation --long-transaction`.
#[tokio::test]
async fn publishers_do_not_queue_behind_a_critical_section_waiting_for_a_long_transaction() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 20, 5).await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let mut long_client = db.client().await;
    let long = long_unrelated_transaction(&mut long_client, BALANCES_V1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (url, stop) = (db.url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut client = crate::support::connect(&url).await;
            let publisher = Publisher::new(set("1.0.0"));
            let (mut longest, mut refused) = (Duration::ZERO, 0u32);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let started = Instant::now();
                let tx = client.transaction().await.unwrap();
                let result = publisher
                    .publish(
                        &tx,
                        &format!("acc-{}", n % 20 + 1),
                        ExpectedVersion::Any,
                        &[NewEvent::new("MoneyDeposited", json!({"amount": 1}))],
                    )
                    .await;
                longest = longest.max(started.elapsed());
                match result {
                    Ok(_) => tx.commit().await.unwrap(),
                    Err(Error::ProjectorIsActivating { .. }) => refused += 1,
                    Err(Error::StreamVersionConflict { .. }) => {}
                    Err(e) => panic!("{e:?}"),
                }
                tokio::task::yield_now().await;
            }
            (longest, refused)
        })
    };
    let pool = coord::pool(&db.database_url(), 4).unwrap();
    let options = ActivateOptions {
        locks: LockPolicy {
            deadline: Duration::from_secs(10),
            ..LockPolicy::default()
        },
        ..ActivateOptions::default()
    };
    let err = activation::activate_current_config(
        &pool,
        &db.database_url(),
        &set("2.0.0"),
        &RelationName::default(),
        &options,
        &Actor::new("test-host", "test"),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::LockDeadline { attempts, .. } if attempts > 1),
        "{err:?}"
    );
    stop.store(true, Ordering::SeqCst);
    let (longest, refused) = probe.await.unwrap();
    assert!(
        refused > 0,
        "the probe never met the activation (longest wait {longest:?})"
    );
    assert!(
        longest < Duration::from_secs(5),
        "a publisher waited {longest:?} inside the gate"
    );
    assert_eq!(
        state(&client).await,
        (Some("1.0.0".into()), None, Some("2.0.0".into()))
    );
    long.commit().await.unwrap();
}

/// Item 3: a publisher that meets a critical section in progress (the
/// version activating, its type keys held exclusively) gets the retryable
/// ProjectorIsActivating at once instead of queueing on the lock; without a
/// recorded activation (rebuild, retire) it still waits for the lock.
#[tokio::test]
async fn a_publisher_meeting_a_critical_section_is_refused_at_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 5, 1).await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    db.write_config("v2.toml", &crate::support::balances_toml("2.0.0"));
    assert_exit(&db.coord(&["replay", "--config", "v2.toml"]), 0);
    client
        .batch_execute(
            "UPDATE coord.projector_states SET activating_version = '2.0.0', replaying_version = NULL \
             WHERE name = 'balances'",
        )
        .await
        .unwrap();
    let mut holder = db.client().await;
    let mut critical = holder.transaction().await.unwrap();
    let types: Vec<String> = ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn"]
        .map(String::from)
        .to_vec();
    coord::gate::hold_back_publishers(&mut critical, &types, LockPolicy::default())
        .await
        .unwrap();

    let mut publisher_client = db.client().await;
    let publish = async {
        let tx = publisher_client.transaction().await.unwrap();
        Publisher::new(set("1.0.0"))
            .publish(
                &tx,
                "acc-1",
                ExpectedVersion::Any,
                &[NewEvent::new("MoneyDeposited", json!({"amount": 1}))],
            )
            .await
    };
    // A generous "does not hang" bound: the lock stays held until afterwards.
    let result = tokio::time::timeout(Duration::from_secs(20), publish)
        .await
        .expect("the publisher queued on the critical section's lock");
    assert!(
        matches!(result, Err(Error::ProjectorIsActivating { ref projector, ref running, ref activating })
            if projector == "balances" && running == "1.0.0" && activating == "2.0.0"),
        "{result:?}"
    );
    // SQL publishers likewise.
    let sql = publisher_client
        .batch_execute(
            "BEGIN; SELECT coord.check_publish('{\"balances\": \"1.0.0\"}', ARRAY['MoneyDeposited']); COMMIT",
        )
        .await
        .unwrap_err();
    assert_eq!(sql.code().map(|c| c.code()), Some("CO003"), "{sql}");
    publisher_client.batch_execute("ROLLBACK").await.unwrap();
    critical.rollback().await.unwrap();
}
