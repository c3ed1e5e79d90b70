//! `coord wait` / `wait_until_active` (issue 13): a newer version activating
//! while a configuration waits ends the wait at once with
//! `NewerProjectorIsActive`, not at the timeout.

use std::time::{Duration, Instant};

use coord::{Config, ProjectorSet};

use crate::support::{assert_exit, balances_toml, TestDb};

#[tokio::test]
async fn a_newer_version_activating_ends_the_wait_at_once() {
    let db = TestDb::migrated().await;
    db.write_config("v1.toml", &balances_toml("1.0.0"));
    db.write_config("v3.toml", &balances_toml("3.0.0"));
    assert_exit(
        &db.coord(&["activate-current-config", "--config", "v1.toml"]),
        0,
    );
    let v2 = ProjectorSet::from_config(
        &Config::parse(&balances_toml("2.0.0"), "v2.toml").expect("v2 config"),
    );
    let client = db.client().await;
    // Generous: the wait must end long before it, on the activation of 3.0.0.
    let timeout = Duration::from_secs(60);
    let started = Instant::now();
    let wait = tokio::spawn(async move {
        coord::activation::wait_until_active(&client, &v2, timeout, Duration::from_millis(20)).await
    });
    // 2.0.0 is newer than the active 1.0.0: the wait keeps polling (this
    // function has no check at its start; the loop is what ends it).
    let db_dir = db.dir.path().to_owned();
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        crate::support::run_coord(
            &db_dir,
            &[("DATABASE_URL", &url)],
            &["activate-current-config", "--config", "v3.toml"],
        )
    })
    .await
    .unwrap();
    assert_exit(&out, 0);
    let result = tokio::time::timeout(Duration::from_secs(50), wait)
        .await
        .expect("the wait did not end when 3.0.0 activated")
        .unwrap();
    match result {
        Err(coord::Error::NewerProjectorIsActive {
            projector,
            running,
            active,
        }) => {
            assert_eq!(
                (projector.as_str(), running.as_str(), active.as_str()),
                ("balances", "2.0.0", "3.0.0")
            );
        }
        other => panic!("expected NewerProjectorIsActive, got {other:?}"),
    }
    assert!(started.elapsed() < timeout, "ended by the timeout");
}
