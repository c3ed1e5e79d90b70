//! Async projectors: not run inline by publishers; `coord run` applies their
//! events with one leader per version, hands over when the leader dies, and
//! stops when a newer version is active.

use std::process::Child;
use std::time::Duration;

use crate::support::{assert_exit, balances_toml, eventually, until_backend, TestDb};

fn async_toml(version: &str) -> String {
    balances_toml(version).replace(
        &format!("version = \"{version}\""),
        &format!("version = \"{version}\"\nmode = \"async\""),
    )
}

/// `coord publish` of one event to stream `a` with the configuration of v1.
fn publish(db: &TestDb, event_type: &str, data: &str) {
    let args = ["publish", "--config", "v1.toml", "--stream", "a"];
    assert_exit(
        &db.coord(&[&args[..], &["--type", event_type, "--data", data]].concat()),
        0,
    );
}

/// Starts `coord run --config config`, its connections named `name`.
fn spawn_run(db: &TestDb, name: &str, config: &str) -> Child {
    db.spawn_coord_as(name, &["run", "--config", config])
}

async fn amount(db: &TestDb, schema: &str, account: &str) -> Option<i64> {
    db.client()
        .await
        .query_opt(
            &format!("SELECT amount FROM {schema}.balances WHERE account = $1"),
            &[&account],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// The runners holding the leader lock of a version, by application name.
async fn leaders(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND l.classid::bigint = $1 AND l.granted \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY 1",
            &[&i64::from(coord::locks::RUNNER_LEADER)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn coord_run_applies_async_events_hands_over_and_stops_when_superseded() {
    let db = TestDb::migrated().await;
    db.write_config("v1.toml", &async_toml("1.0.0"));
    db.write_config("v2.toml", &async_toml("2.0.0"));
    assert_exit(
        &db.coord(&["activate-current-config", "--config", "v1.toml"]),
        0,
    );

    // Publishers do not run async projectors inline.
    publish(&db, "AccountOpened", "{}");
    publish(&db, "MoneyDeposited", "{\"amount\": 5}");
    assert_eq!(amount(&db, "balances_v1_0_0", "a").await, None);

    let mut first = spawn_run(&db, "first-runner", "v1.toml");
    eventually(
        Duration::from_secs(60),
        "coord run to apply the events",
        || async { amount(&db, "balances_v1_0_0", "a").await == Some(5) },
    )
    .await;
    let second = spawn_run(&db, "second-runner", "v1.toml");
    // Only one leader for the version, however many runners: once the
    // second runner has tried to lead (its leader connection ran the lock
    // attempt), the first still leads alone.
    until_backend(&db, "second-runner", "pg_try_advisory_lock(", false).await;
    assert_eq!(leaders(&db).await, ["first-runner"]);

    // The leader dies; the standby takes over.
    first.kill().unwrap();
    first.wait().unwrap();
    publish(&db, "MoneyDeposited", "{\"amount\": 7}");
    eventually(
        Duration::from_secs(60),
        "the standby to take over",
        || async { amount(&db, "balances_v1_0_0", "a").await == Some(12) },
    )
    .await;
    assert_eq!(leaders(&db).await, ["second-runner"]);

    // A newer version becomes active: the runner of v1 stops by itself.
    assert_exit(
        &db.coord(&["activate-current-config", "--config", "v2.toml"]),
        0,
    );
    assert_eq!(amount(&db, "balances_v2_0_0", "a").await, Some(12));
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || second.wait_with_output()),
    )
    .await
    .expect("coord run did not stop")
    .unwrap()
    .unwrap();
    assert!(output.status.success());
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        out.contains("balances@1.0.0: applied 1 events; stopped: superseded by 2.0.0"),
        "{out}"
    );
}
