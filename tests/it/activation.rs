//! activate-current-config, rollback, retire, prune, wait: library and CLI,
//! with real concurrent publishers and `kill -9`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coord::activation::{self, ActivateOptions};
use coord::Actor;
use coord::{
    Config, Error, ExpectedVersion, NewEvent, ProjectorSet, Publisher, RelationName, RetryPolicy,
};
use serde_json::json;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::support::{assert_exit, balances_toml, eventually, stderr, stdout, TestDb};

pub(crate) fn set(version: &str) -> ProjectorSet {
    ProjectorSet::from_config(&Config::parse(&balances_toml(version), "coord.toml").unwrap())
}

fn actor() -> Actor {
    Actor::new("test-host", "test")
}

/// Balances computed straight from the store, the way a from-scratch replay would.
pub(crate) async fn expected_balances(client: &Client) -> Vec<(String, i64)> {
    client
        .query(
            "SELECT stream_id, sum(CASE event_type WHEN 'MoneyDeposited' THEN (data->>'amount')::bigint \
                                      WHEN 'MoneyWithdrawn' THEN -(data->>'amount')::bigint ELSE 0 END)::bigint \
             FROM coord.events WHERE stream_id IN (SELECT stream_id FROM coord.events WHERE event_type = 'AccountOpened') \
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

pub(crate) async fn balances(client: &Client, schema: &str) -> Vec<(String, i64)> {
    client
        .query(
            &format!("SELECT account, amount FROM {schema}.balances ORDER BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

pub(crate) async fn state(client: &Client) -> (Option<String>, Option<String>, Option<String>) {
    let row = client
        .query_one(
            "SELECT active_version, activating_version, replaying_version FROM coord.projector_states WHERE name = 'balances'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Appends `accounts` opened accounts with `deposits` deposits each, straight
/// into the store (as an import before coord manages it).
pub(crate) async fn import(client: &Client, accounts: i64, deposits: i64) {
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acc-' || a, 1, 'AccountOpened', '{}' FROM generate_series(1, $1::int8) a",
            &[&accounts],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
             SELECT 'acc-' || a, d + 1, CASE WHEN d % 3 = 0 THEN 'MoneyWithdrawn' ELSE 'MoneyDeposited' END, \
                    jsonb_build_object('amount', (a * d) % 50 + 1) \
             FROM generate_series(1, $1::int8) a, generate_series(1, $2::int8) d",
            &[&accounts, &deposits],
        )
        .await
        .unwrap();
}

/// Publishers of `version` depositing into the imported accounts until
/// `stop` is set or they are refused as stale; each returns whether it was
/// refused. Any other refusal fails the test.
fn spawn_publishers(
    db: &TestDb,
    version: &str,
    count: i64,
    stop: &Arc<AtomicBool>,
    published: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<bool>> {
    (0..count)
        .map(|i| {
            let (url, stop, published, version) = (
                db.url.clone(),
                stop.clone(),
                published.clone(),
                version.to_owned(),
            );
            tokio::spawn(async move {
                let mut client = crate::support::connect(&url).await;
                let p = Publisher::new(set(&version));
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let account = format!("acc-{}", (i * 7 + n) % 20 + 1);
                    let event = NewEvent::new("MoneyDeposited", json!({"amount": n % 9 + 1}));
                    match p
                        .publish_with_retry(
                            &mut client,
                            &account,
                            ExpectedVersion::Any,
                            &[event],
                            RetryPolicy::default(),
                        )
                        .await
                    {
                        Ok(_) => {
                            published.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(Error::StreamVersionConflict { .. }) => {}
                        Err(Error::NewerProjectorIsActive { .. }) => return true,
                        Err(e) => panic!("publisher {i} of {version}: {e:?}"),
                    }
                }
                false
            })
        })
        .collect()
}

pub(crate) fn activate_cli(db: &TestDb, version: &str, extra: &[&str]) -> std::process::Output {
    let file = format!("v{version}.toml");
    db.write_config(&file, &balances_toml(version));
    let mut args = vec!["activate-current-config", "--config", file.as_str()];
    args.extend_from_slice(extra);
    db.coord(&args)
}

#[tokio::test]
async fn bootstrap_on_an_empty_store_activates_with_nothing_to_replay() {
    let db = TestDb::migrated().await;
    let out = activate_cli(&db, "1.0.0", &[]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("bootstrap"), "{}", stdout(&out));
    let client = db.client().await;
    assert_eq!(state(&client).await, (Some("1.0.0".into()), None, None));
    assert!(balances(&client, "balances_v1_0_0").await.is_empty());
}

#[tokio::test]
async fn bootstrap_on_a_non_empty_store_replays_every_event() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 50, 20).await;
    let out = activate_cli(&db, "1.0.0", &["--batch-size", "100", "--output", "json"]);
    assert_exit(&out, 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"][0]["action"], "bootstrap");
    assert_eq!(report["steps"][0]["replayed_events"], 50 * 21);
    assert_eq!(
        balances(&client, "balances_v1_0_0").await,
        expected_balances(&client).await
    );
}

#[tokio::test]
async fn a_second_run_is_a_no_op() {
    let db = TestDb::migrated().await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let before = db.snapshot().await;
    let out = activate_cli(&db, "1.0.0", &[]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("nothing to do"), "{}", stdout(&out));
    assert_eq!(before, db.snapshot().await);
}

/// N+1 replays and activates while N publishes continuously: afterwards N is
/// refused, N+1 publishes, and N+1's tables equal a from-scratch computation
/// over every committed event (nothing lost, nothing applied twice).
#[tokio::test]
async fn n_to_n_plus_1_while_n_publishes() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 40, 25).await;
    let pool = coord::pool(&db.database_url(), 8).unwrap();
    let events = RelationName::default();
    let options = ActivateOptions {
        replay: coord::ReplayOptions {
            batch_size: 200,
            ..Default::default()
        },
        ..Default::default()
    };
    activation::activate_current_config(
        &pool,
        &db.database_url(),
        &set("1.0.0"),
        &events,
        &options,
        &actor(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publishers = spawn_publishers(&db, "1.0.0", 4, &stop, &published);
    eventually(Duration::from_secs(30), "v1 publishers to publish", || {
        let p = published.clone();
        async move { p.load(Ordering::SeqCst) >= 20 }
    })
    .await;
    let report = activation::activate_current_config(
        &pool,
        &db.database_url(),
        &set("2.0.0"),
        &events,
        &options,
        &actor(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.steps[0].action, "replay");
    for p in publishers {
        assert!(
            p.await.unwrap(),
            "each v1 publisher ends refused with NewerProjectorIsActive"
        );
    }
    assert_eq!(state(&client).await, (Some("2.0.0".into()), None, None));
    assert_eq!(
        balances(&client, "balances_v2_0_0").await,
        expected_balances(&client).await
    );

    db.write_config("v1.toml", &balances_toml("1.0.0"));
    db.write_config("v2.toml", &balances_toml("2.0.0"));
    let out = db.coord(&[
        "publish",
        "--config",
        "v1.toml",
        "--stream",
        "acc-1",
        "--type",
        "MoneyDeposited",
        "--data",
        "{\"amount\": 3}",
    ]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("projector balances 1.0.0 is stale: 2.0.0 is active"),
        "{}",
        stderr(&out)
    );
    let out = db.coord(&[
        "publish",
        "--config",
        "v2.toml",
        "--stream",
        "acc-1",
        "--type",
        "MoneyDeposited",
        "--data",
        "{\"amount\": 3}",
    ]);
    assert_exit(&out, 0);
    assert_eq!(
        balances(&client, "balances_v2_0_0").await,
        expected_balances(&client).await
    );
}

#[tokio::test]
async fn a_failing_verify_stops_and_leaves_the_active_version() {
    let db = TestDb::migrated().await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let failing = balances_toml("2.0.0").replace(
        "tables = \"\"\"",
        "verify = [\"SELECT count(*) > 0 FROM balances\"]\ntables = \"\"\"",
    );
    db.write_config("v2.toml", &failing);
    let out = db.coord(&["activate-current-config", "--config", "v2.toml"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("verify of balances@2.0.0 failed: assertion 1 `SELECT count(*) > 0 FROM balances` returned false; the active version is untouched"),
        "{}",
        stderr(&out)
    );
    let client = db.client().await;
    assert_eq!(
        state(&client).await,
        (Some("1.0.0".into()), None, Some("2.0.0".into()))
    );
}

#[tokio::test]
async fn a_projector_missing_from_the_config_is_retired() {
    let db = TestDb::migrated().await;
    let two = format!(
        "{}{}",
        balances_toml("1.0.0"),
        balances_toml("1.0.0").replace("name = \"balances\"", "name = \"audit\"")
    );
    db.write_config("both.toml", &two);
    assert_exit(
        &db.coord(&["activate-current-config", "--config", "both.toml"]),
        0,
    );
    let out = activate_cli(&db, "1.0.0", &[]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("retire"), "{}", stdout(&out));
    let client = db.client().await;
    let row = client
        .query_one("SELECT s.active_version, v.status FROM coord.projector_states s JOIN coord.projector_versions v USING (name) WHERE name = 'audit'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert_eq!(row.get::<_, String>(1), "retired");
    // Old code that still has `audit` may publish; it is simply not run inline.
    assert_exit(&db.coord(&["check", "--config", "both.toml"]), 0);
}

#[tokio::test]
async fn a_downgrade_is_refused_and_changes_nothing() {
    let db = TestDb::migrated().await;
    assert_exit(&activate_cli(&db, "2.0.0", &[]), 0);
    let before = db.snapshot().await;
    let out = activate_cli(&db, "1.0.0", &[]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("balances@1.0.0 is older than the active 2.0.0"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, db.snapshot().await);
    let plan = db.coord(&["plan", "--config", "v1.0.0.toml"]);
    assert_exit(&plan, 2);
    assert!(stdout(&plan).contains("REFUSED"), "{}", stdout(&plan));
}

#[tokio::test]
async fn a_changed_definition_under_the_same_version_is_refused() {
    let db = TestDb::migrated().await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let before = db.snapshot().await;
    let changed = balances_toml("1.0.0").replace("amount + ($5", "amount + 2 * ($5");
    db.write_config("changed.toml", &changed);
    let out = db.coord(&["activate-current-config", "--config", "changed.toml"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("balances@1.0.0 was built from a different definition"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, db.snapshot().await);
}

#[tokio::test]
async fn no_replay_refuses_versions_that_need_a_replay() {
    let db = TestDb::migrated().await;
    let before = db.snapshot().await;
    let out = activate_cli(&db, "1.0.0", &["--no-replay"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("--no-replay: balances@1.0.0 need a replay"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, db.snapshot().await);
}

#[tokio::test]
async fn plan_reports_each_step_without_writing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 10, 4).await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let before = db.snapshot().await;
    let out = db.coord(&["plan", "--output", "json"]);
    assert_exit(&out, 0);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["steps"][0]["action"], "bootstrap");
    assert_eq!(plan["steps"][0]["events_to_process"], 50);
    assert_eq!(before, db.snapshot().await);
}

/// Rollback re-activates N from its kept schema, catching it up with what
/// N+1 published, without a replay from the start; rolling forward again
/// catches N+1 up the same way.
#[tokio::test]
async fn rollback_catches_up_the_previous_version_without_a_replay() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 20, 10).await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    assert_exit(&activate_cli(&db, "2.0.0", &[]), 0);
    for i in 1..=5 {
        let out = db.coord(&[
            "publish",
            "--config",
            "v2.0.0.toml",
            "--stream",
            &format!("acc-{i}"),
            "--type",
            "MoneyDeposited",
            "--data",
            "{\"amount\": 100}",
        ]);
        assert_exit(&out, 0);
    }
    let out = db.coord(&["rollback", "balances", "--config", "v2.0.0.toml"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("the previous version of balances is 1.0.0"),
        "{}",
        stderr(&out)
    );

    let out = db.coord(&[
        "rollback",
        "balances",
        "--config",
        "v1.0.0.toml",
        "--output",
        "json",
    ]);
    assert_exit(&out, 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["replayed_events"], 5,
        "only N+1's events were applied: {report}"
    );
    assert_eq!(state(&client).await, (Some("1.0.0".into()), None, None));
    assert_eq!(
        balances(&client, "balances_v1_0_0").await,
        expected_balances(&client).await
    );
    assert_exit(&db.coord(&["check", "--config", "v2.0.0.toml"]), 4);

    assert_exit(
        &db.coord(&[
            "publish",
            "--config",
            "v1.0.0.toml",
            "--stream",
            "acc-9",
            "--type",
            "MoneyWithdrawn",
            "--data",
            "{\"amount\": 7}",
        ]),
        0,
    );
    let out = activate_cli(&db, "2.0.0", &["--output", "json"]);
    assert_exit(&out, 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"][0]["action"], "reactivate");
    assert_eq!(report["steps"][0]["replayed_events"], 1);
    assert_eq!(
        balances(&client, "balances_v2_0_0").await,
        expected_balances(&client).await
    );
}

#[tokio::test]
async fn rollback_without_a_previous_version_is_refused() {
    let db = TestDb::migrated().await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let out = db.coord(&["rollback", "balances", "--config", "v1.0.0.toml"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("has no retired version to roll back to"),
        "{}",
        stderr(&out)
    );
    assert_exit(
        &db.coord(&["rollback", "Bad-Name", "--config", "v1.0.0.toml"]),
        2,
    );
}

/// Invariant 6: while one activation holds the lock, another exits 7 naming
/// the holder; two started together never corrupt state.
#[tokio::test]
async fn one_activation_at_a_time() {
    let db = TestDb::migrated().await;
    let holder = db.client().await;
    holder
        .batch_execute(&format!(
            "SET application_name = 'coord activate-current-config on elsewhere'; SELECT pg_advisory_lock({}, 0)",
            coord::locks::ACTIVATION
        ))
        .await
        .unwrap();
    let before = db.snapshot().await;
    let out = activate_cli(&db, "1.0.0", &[]);
    assert_exit(&out, 7);
    assert!(
        stderr(&out).contains(
            "another activation holds the lock: coord activate-current-config on elsewhere"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, db.snapshot().await);
    holder
        .batch_execute(&format!(
            "SELECT pg_advisory_unlock({}, 0)",
            coord::locks::ACTIVATION
        ))
        .await
        .unwrap();

    let client = db.client().await;
    import(&client, 30, 30).await;
    db.write_config("v1.toml", &balances_toml("1.0.0"));
    let dir = db.dir.path().to_owned();
    let url = db.url.clone();
    let run = move || {
        let (dir, url) = (dir.clone(), url.clone());
        std::thread::spawn(move || {
            crate::support::run_coord(
                &dir,
                &[("DATABASE_URL", &url)],
                &[
                    "activate-current-config",
                    "--config",
                    "v1.toml",
                    "--batch-size",
                    "50",
                ],
            )
        })
    };
    let (a, b) = (run(), run());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let codes = [a.status.code(), b.status.code()];
    assert!(
        codes.contains(&Some(0)),
        "{codes:?}: {} {}",
        stderr(&a),
        stderr(&b)
    );
    assert!(
        codes.iter().all(|c| matches!(c, Some(0) | Some(7))),
        "{codes:?}: {} {}",
        stderr(&a),
        stderr(&b)
    );
    assert_eq!(state(&client).await, (Some("1.0.0".into()), None, None));
    assert_eq!(
        balances(&client, "balances_v1_0_0").await,
        expected_balances(&client).await
    );
}

/// A publisher between its gate check and its commit keeps the critical
/// section waiting: past the lock deadline activation exits 7 and the new
/// version returns to replaying; the active version is untouched.
#[tokio::test]
async fn a_long_transaction_makes_activation_give_up_with_exit_7() {
    let db = TestDb::migrated().await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let mut long_client = db.client().await;
    let long = long_client.transaction().await.unwrap();
    Publisher::new(set("1.0.0"))
        .publish(
            &long,
            "slow",
            ExpectedVersion::Any,
            &[NewEvent::new("AccountOpened", json!({}))],
        )
        .await
        .unwrap();
    let out = activate_cli(&db, "2.0.0", &["--lock-deadline", "0.3"]);
    assert_exit(&out, 7);
    assert!(
        stderr(&out).contains("long-running transaction"),
        "{}",
        stderr(&out)
    );
    let client = db.client().await;
    assert_eq!(
        state(&client).await,
        (Some("1.0.0".into()), None, Some("2.0.0".into()))
    );
    long.commit().await.unwrap();
    assert_exit(&activate_cli(&db, "2.0.0", &[]), 0);
    assert_eq!(
        balances(&client, "balances_v2_0_0").await,
        expected_balances(&client).await
    );
}

/// Invariant 5: `kill -9` after the version is marked activating (while the
/// critical section waits for an in-flight publisher) leaves publishers
/// told to retry; re-running completes exactly.
#[tokio::test]
async fn kill_9_during_activation_then_rerun_completes() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 20, 5).await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    let mut long_client = db.client().await;
    let long = long_client.transaction().await.unwrap();
    Publisher::new(set("1.0.0"))
        .publish(
            &long,
            "acc-1",
            ExpectedVersion::Any,
            &[NewEvent::new("MoneyDeposited", json!({"amount": 11}))],
        )
        .await
        .unwrap();

    db.write_config("v2.toml", &balances_toml("2.0.0"));
    let mut child = db.spawn_coord(&[
        "activate-current-config",
        "--config",
        "v2.toml",
        "--lock-deadline",
        "600",
    ]);
    eventually(
        Duration::from_secs(60),
        "the version to be marked activating",
        || {
            let client = &client;
            async move { state(client).await.1.as_deref() == Some("2.0.0") }
        },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The interrupted activation tells publishers of its events to retry.
    let err = Publisher::new(set("1.0.0"))
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
        .unwrap_err();
    assert!(
        matches!(err, Error::ProjectorIsActivating { .. }),
        "{err:?}"
    );
    long.commit().await.unwrap();

    let out = activate_cli(&db, "2.0.0", &["--output", "json"]);
    assert_exit(&out, 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"][0]["action"], "resume_activation");
    assert_eq!(state(&client).await, (Some("2.0.0".into()), None, None));
    assert_eq!(
        balances(&client, "balances_v2_0_0").await,
        expected_balances(&client).await
    );
}

/// Invariant 5 during the replay phase of activate-current-config.
#[tokio::test]
async fn kill_9_during_the_replay_of_an_activation_then_rerun_completes() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 100, 100).await;
    db.write_config("v1.toml", &balances_toml("1.0.0"));
    let mut child = db.spawn_coord(&[
        "activate-current-config",
        "--config",
        "v1.toml",
        "--batch-size",
        "100",
    ]);
    eventually(Duration::from_secs(60), "the replay to commit a batch", || {
        let client = &client;
        async move {
            client
                .query_opt("SELECT events_processed FROM coord.projector_versions WHERE name = 'balances' AND events_processed > 0", &[])
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let out = activate_cli(&db, "1.0.0", &["--output", "json"]);
    assert_exit(&out, 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"][0]["action"], "resume_replay");
    let processed: i64 = client
        .query_one(
            "SELECT events_processed FROM coord.projector_versions WHERE name = 'balances'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(processed, 100 * 101, "each event applied exactly once");
    assert_eq!(
        balances(&client, "balances_v1_0_0").await,
        expected_balances(&client).await
    );
}

#[tokio::test]
async fn wait_returns_when_active_and_times_out_with_exit_8() {
    let db = TestDb::migrated().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let out = db.coord(&["wait", "--until", "active", "--timeout", "0.2"]);
    assert_exit(&out, 8);
    assert!(
        stderr(&out).contains("waiting for balances@1.0.0 (active: none) to be active"),
        "{}",
        stderr(&out)
    );
    assert_exit(&db.coord(&["wait", "--timeout", "-1"]), 2);
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    assert_exit(
        &db.coord(&["wait", "--until", "active", "--timeout", "5"]),
        0,
    );
}

#[tokio::test]
async fn prune_drops_retired_schemas_after_confirmation() {
    let db = TestDb::migrated().await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    assert_exit(&activate_cli(&db, "2.0.0", &[]), 0);
    let before = db.snapshot().await;
    let out = db.coord(&["prune"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("confirm with --yes"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, db.snapshot().await);
    let out = db.coord(&["prune", "--yes"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("dropped balances_v1_0_0 (balances@1.0.0)"),
        "{}",
        stdout(&out)
    );
    let client = db.client().await;
    let schema: Option<String> = client
        .query_one("SELECT to_regnamespace('balances_v1_0_0')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, None);
    let out = db.coord(&["rollback", "balances", "--config", "v1.0.0.toml"]);
    assert_exit(&out, 2);
    assert!(stdout(&db.coord(&["prune", "--yes"])).contains("nothing to prune"));
}

/// `coord rebuild` resets the active version in place while its publishers
/// keep publishing: none is refused, and the rebuilt tables equal a
/// from-scratch computation (here repairing a corrupted read model).
#[tokio::test]
async fn rebuild_replaces_the_active_tables_while_publishers_run() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    import(&client, 30, 20).await;
    assert_exit(&activate_cli(&db, "1.0.0", &[]), 0);
    client
        .batch_execute("UPDATE balances_v1_0_0.balances SET amount = -1")
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publishers = spawn_publishers(&db, "1.0.0", 3, &stop, &published);
    eventually(Duration::from_secs(30), "publishers to publish", || {
        let p = published.clone();
        async move { p.load(Ordering::SeqCst) >= 10 }
    })
    .await;
    let pool = coord::pool(&db.database_url(), 6).unwrap();
    let projector = set("1.0.0").get("balances").unwrap().clone();
    let options = ActivateOptions {
        replay: coord::ReplayOptions {
            batch_size: 100,
            ..Default::default()
        },
        ..Default::default()
    };
    let report = activation::rebuild(
        &pool,
        &db.database_url(),
        &projector,
        &RelationName::default(),
        &options,
        &actor(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.action, "rebuild");
    let before_stop = published.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(30),
        "publishers to publish after the swap",
        || {
            let p = published.clone();
            async move { p.load(Ordering::SeqCst) >= before_stop + 10 }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for p in publishers {
        p.await.unwrap();
    }
    assert_eq!(
        balances(&client, "balances_v1_0_0").await,
        expected_balances(&client).await
    );
    assert_eq!(state(&client).await, (Some("1.0.0".into()), None, None));
    let leftovers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'balances_v1_0_0_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "the shadow and the old tables are gone");
    let versions: i64 = client
        .query_one("SELECT count(*) FROM coord.projector_versions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 1);

    // Only the active version can be rebuilt.
    db.write_config("v2.toml", &balances_toml("2.0.0"));
    let before = db.snapshot().await;
    let out = db.coord(&["rebuild", "balances", "--config", "v2.toml"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out)
            .contains("balances@2.0.0 is not the active version of balances (active: 1.0.0)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, db.snapshot().await);
}
