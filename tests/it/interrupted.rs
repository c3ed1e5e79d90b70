//! Issue 12: the faults the fault suite found, made deterministic. A
//! `rollback` killed during its catch-up leaves its target replaying, one
//! killed in its critical section leaves it activating, and a `rebuild`
//! killed between its swap and the drop of `{schema}_old` leaves that
//! schema: running the same command again (or, for the rollback, the
//! command its refusal recommended) completes, exactly.

use std::time::Duration;

use tokio_postgres::Client;

use crate::activation_faults::long_unrelated_transaction;
use crate::faults::{deposits, differences, kill_9, ledger_toml, schema};
use crate::support::{assert_exit, eventually, stderr, TestDb};

/// The advisory lock the gated ledger's handler waits for.
const GATE: i64 = 4_242_612;

/// The ledger whose deposits wait for the advisory lock [`GATE`] (shared,
/// until their transaction ends): free unless a test holds it.
fn gated_ledger_toml(version: &str) -> String {
    let plain = "($5->>'amount')::bigint";
    let toml = ledger_toml(version, false);
    assert!(toml.contains(plain), "{toml}");
    toml.replacen(
        plain,
        &format!("($5->>'amount')::bigint + length(pg_advisory_xact_lock_shared({GATE})::text)"),
        1,
    )
}

/// `count` deposits over 20 accounts, published as ledger@`version` through
/// SQL in one transaction.
async fn deposits_as(client: &Client, version: &str, count: i32) {
    client
        .execute(
            "SELECT coord.publish(jsonb_build_object('ledger', $2::text), 'acc-' || (i % 20), NULL, \
             jsonb_build_array(jsonb_build_object('type', 'Deposited', 'data', \
             jsonb_build_object('amount', i)))) FROM generate_series(1, $1) i",
            &[&count, &version],
        )
        .await
        .unwrap();
}

/// `(status, active_version, replaying_version)` of ledger@`version`.
async fn state(client: &Client, version: &str) -> (String, Option<String>, Option<String>) {
    let row = client
        .query_one(
            "SELECT v.status, s.active_version, s.replaying_version FROM coord.projector_versions v \
             JOIN coord.projector_states s ON s.name = v.name WHERE v.name = 'ledger' AND v.version = $1",
            &[&version],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// 400 deposits, then ledger@1.0.0 and ledger@2.0.0 activated in turn,
/// each from `{version}.toml` written with `toml`.
async fn v1_then_v2(db: &TestDb, client: &Client, toml: impl Fn(&str) -> String) {
    deposits(client, 400).await;
    for version in ["1.0.0", "2.0.0"] {
        let file = format!("{version}.toml");
        db.write_config(&file, &toml(version));
        let out = db.coord(&["activate-current-config", "--config", &file]);
        assert_exit(&out, 0);
    }
}

/// After a rollback to ledger@1.0.0: 2.0.0 is retired, 1.0.0 equals a
/// from-scratch computation, and so it does after publishing reaches it.
async fn rolled_back_exactly(client: &mut Client) {
    assert_eq!(state(client, "2.0.0").await.0, "retired");
    let diffs = differences(client, &schema("1.0.0")).await;
    assert!(diffs.is_empty(), "{diffs:?}");
    // Publishing after the flip reaches the rolled-back version.
    deposits_as(client, "1.0.0", 50).await;
    let diffs = differences(client, &schema("1.0.0")).await;
    assert!(diffs.is_empty(), "{diffs:?}");
}

#[tokio::test]
async fn a_rollback_killed_during_its_catch_up_is_finished_by_running_it_again() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    v1_then_v2(&db, &client, gated_ledger_toml).await;
    // Events 1.0.0 (retired) has not seen: its rollback must catch them up.
    deposits_as(&client, "2.0.0", 300).await;
    let gate = db.client().await;
    gate.execute("SELECT pg_advisory_lock($1)", &[&GATE])
        .await
        .unwrap();
    let mut child = db.spawn_coord(&[
        "rollback",
        "ledger",
        "--config",
        "1.0.0.toml",
        "--batch-size",
        "10",
    ]);
    // Its catch-up waits for the gate inside its first batch.
    let owner = format!("% pid {}", child.id());
    eventually(
        Duration::from_secs(60),
        "the rollback's catch-up to wait for the gate",
        || async {
            client
                .query_one(
                    "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name LIKE $1 AND wait_event_type = 'Lock' \
                     AND strpos(query, 'INSERT INTO totals') > 0",
                    &[&owner],
                )
                .await
                .unwrap()
                .get(0)
        },
    )
    .await;
    kill_9(&mut child);
    gate.execute("SELECT pg_advisory_unlock($1)", &[&GATE])
        .await
        .unwrap();
    assert_eq!(
        state(&client, "1.0.0").await,
        (
            "replaying".into(),
            Some("2.0.0".into()),
            Some("1.0.0".into())
        ),
        "the killed rollback left its target replaying"
    );

    let again = db.coord(&["rollback", "ledger", "--config", "1.0.0.toml"]);
    assert_exit(&again, 0);
    assert_eq!(
        state(&client, "1.0.0").await,
        ("active".into(), Some("1.0.0".into()), None)
    );
    rolled_back_exactly(&mut client).await;
    // Nothing left to roll back to but 2.0.0, which this configuration is not.
    let refused = db.coord(&["rollback", "ledger", "--config", "1.0.0.toml"]);
    assert_exit(&refused, 2);
    assert!(
        stderr(&refused).contains("coord rollback ledger` with the configuration of ledger 2.0.0"),
        "{}",
        stderr(&refused)
    );
}

/// `(active_version, activating_version, replaying_version)` of the ledger.
async fn ledger_state(client: &Client) -> (Option<String>, Option<String>, Option<String>) {
    let row = client
        .query_one(
            "SELECT active_version, activating_version, replaying_version \
             FROM coord.projector_states WHERE name = 'ledger'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// `coord rollback ledger` to 1.0.0 (active: 2.0.0), killed with `kill -9`
/// while its critical section retries behind `long`: leaves 1.0.0 activating.
async fn rollback_killed_while_activating(db: &TestDb, client: &Client) {
    let mut child = db.spawn_coord(&[
        "rollback",
        "ledger",
        "--config",
        "1.0.0.toml",
        "--lock-deadline",
        "600",
    ]);
    eventually(
        Duration::from_secs(60),
        "the rollback's target to be activating",
        || async { ledger_state(client).await.1.as_deref() == Some("1.0.0") },
    )
    .await;
    kill_9(&mut child);
    assert_eq!(
        ledger_state(client).await,
        (Some("2.0.0".into()), Some("1.0.0".into()), None),
        "the killed rollback left its target activating"
    );
}

/// Seed 9517100792732140966 of the fault suite, trial 8: a rollback cut short
/// inside its critical section left its target (older than the active
/// version) activating; `coord rollback` refused, recommending
/// `activate-current-config`, which returned the target to replaying and
/// then refused it as a downgrade, as did every re-run. Now `coord rollback`
/// finishes it, and so does `activate-current-config` with its
/// configuration, also after a critical section that gave up left it
/// replaying.
#[tokio::test]
async fn a_rollback_killed_in_its_critical_section_is_finished_by_either_command() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    v1_then_v2(&db, &client, |v| ledger_toml(v, false)).await;
    let mut long_client = db.client().await;

    // Finished by running the rollback again.
    deposits_as(&client, "2.0.0", 100).await;
    let long = long_unrelated_transaction(&mut long_client, r#"{"ledger": "2.0.0"}"#).await;
    rollback_killed_while_activating(&db, &client).await;
    long.commit().await.unwrap();
    let again = db.coord(&["rollback", "ledger", "--config", "1.0.0.toml"]);
    assert_exit(&again, 0);
    assert_eq!(
        ledger_state(&client).await,
        (Some("1.0.0".into()), None, None)
    );
    let diffs = differences(&mut client, &schema("1.0.0")).await;
    assert!(diffs.is_empty(), "{diffs:?}");

    // Forward to 2.0.0 again (a re-activation), and the same fault.
    assert_exit(
        &db.coord(&["activate-current-config", "--config", "2.0.0.toml"]),
        0,
    );
    deposits_as(&client, "2.0.0", 100).await;
    let long = long_unrelated_transaction(&mut long_client, r#"{"ledger": "2.0.0"}"#).await;
    rollback_killed_while_activating(&db, &client).await;
    // The recommended activate-current-config with 1.0.0's configuration
    // cannot flip while the long transaction runs: its critical section
    // gives up and returns 1.0.0 to replaying (older than the active 2.0.0).
    let gave_up = db.coord(&[
        "activate-current-config",
        "--config",
        "1.0.0.toml",
        "--lock-deadline",
        "0.2",
    ]);
    assert_exit(&gave_up, 7);
    assert_eq!(
        ledger_state(&client).await,
        (Some("2.0.0".into()), None, Some("1.0.0".into()))
    );
    long.commit().await.unwrap();
    let plan = db.coord(&["plan", "--config", "1.0.0.toml", "--output", "json"]);
    assert_exit(&plan, 0);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["steps"][0]["action"], "reactivate", "{plan}");
    let finished = db.coord(&["activate-current-config", "--config", "1.0.0.toml"]);
    assert_exit(&finished, 0);
    assert_eq!(
        ledger_state(&client).await,
        (Some("1.0.0".into()), None, None)
    );
    rolled_back_exactly(&mut client).await;
}

/// ledger@1.0.0 active over 400 deposits, and the `{schema}_old` schema a
/// rebuild killed between its swap and the drop would leave (its tables).
async fn with_leftover_old_schema(db: &TestDb, client: &Client) -> String {
    deposits(client, 400).await;
    db.write_config("1.0.0.toml", &ledger_toml("1.0.0", false));
    assert_exit(
        &db.coord(&["activate-current-config", "--config", "1.0.0.toml"]),
        0,
    );
    let old = format!("{}_old", schema("1.0.0"));
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {old}; CREATE TABLE {old}.totals AS TABLE {}.totals",
            schema("1.0.0")
        ))
        .await
        .unwrap();
    old
}

async fn schema_exists(client: &Client, schema: &str) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_rebuild_drops_the_old_schema_an_interrupted_rebuild_left() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    let old = with_leftover_old_schema(&db, &client).await;
    let out = db.coord(&["rebuild", "ledger", "--config", "1.0.0.toml"]);
    assert_exit(&out, 0);
    let diffs = differences(&mut client, &schema("1.0.0")).await;
    assert!(diffs.is_empty(), "{diffs:?}");
    assert!(!schema_exists(&client, &old).await, "{old} is dropped");
    // And the next rebuild too.
    assert_exit(
        &db.coord(&["rebuild", "ledger", "--config", "1.0.0.toml"]),
        0,
    );
    let diffs = differences(&mut client, &schema("1.0.0")).await;
    assert!(diffs.is_empty(), "{diffs:?}");
}

#[tokio::test]
async fn a_rebuild_refuses_to_drop_a_leftover_old_schema_something_outside_depends_on() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    let old = with_leftover_old_schema(&db, &client).await;
    client
        .batch_execute(&format!(
            "CREATE VIEW public.old_report AS SELECT * FROM {old}.totals"
        ))
        .await
        .unwrap();
    let before = db.snapshot().await;
    let refused = db.coord(&["rebuild", "ledger", "--config", "1.0.0.toml"]);
    assert_exit(&refused, 2);
    let err = stderr(&refused);
    assert!(
        err.contains(&old) && err.contains("view public.old_report") && err.contains("--cascade"),
        "{err}"
    );
    assert_eq!(db.snapshot().await, before, "nothing changed");
    let out = db.coord(&["rebuild", "ledger", "--config", "1.0.0.toml", "--cascade"]);
    assert_exit(&out, 0);
    assert!(!schema_exists(&client, &old).await);
    let diffs = differences(&mut client, &schema("1.0.0")).await;
    assert!(diffs.is_empty(), "{diffs:?}");
}
