//! A handler's failure reads the same on every path (one
//! `handler_message`): the database's message, its SQLSTATE and its
//! DETAIL, which says what the constraint found.

use coord::{Config, ExpectedVersion, NewEvent, ProjectorSet, Publisher};
use serde_json::json;

use crate::support::{assert_exit, stderr, TestDb};

/// Opening an account twice violates the primary key; PostgreSQL's DETAIL
/// names the key: `Key (id)=(acct-1) already exists.`
const ACCOUNTS_TOML: &str = r#"
[[projector]]
name = "accounts"
version = "1.0.0"
tables = "CREATE TABLE accounts (id text PRIMARY KEY);"

[projector.handlers]
AccountOpened = "INSERT INTO accounts (id) VALUES ($1)"
"#;

const DETAIL: &str = "Key (id)=(acct-1) already exists.";

#[tokio::test]
async fn an_inline_handler_error_carries_the_database_detail() {
    let db = TestDb::migrated().await;
    db.write_config("coord.toml", ACCOUNTS_TOML);
    assert_exit(&db.coord(&["activate-current-config"]), 0);
    let set = ProjectorSet::from_config(&Config::parse(ACCOUNTS_TOML, "coord.toml").unwrap());
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let opened = || NewEvent::new("AccountOpened", json!({}));
    let err = Publisher::new(set)
        .publish(&tx, "acct-1", ExpectedVersion::Any, &[opened(), opened()])
        .await
        .unwrap_err();
    tx.rollback().await.unwrap();
    let coord::Error::Handler { message, .. } = &err else {
        panic!("not a handler error: {err:?}");
    };
    assert!(message.contains("(SQLSTATE 23505)"), "{message}");
    assert!(message.contains(DETAIL), "{message}");
}

#[tokio::test]
async fn a_replayed_handler_error_carries_the_database_detail() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO coord.events (stream_id, stream_version, event_type, data) VALUES \
             ('acct-1', 1, 'AccountOpened', '{}'), ('acct-1', 2, 'AccountOpened', '{}')",
        )
        .await
        .unwrap();
    db.write_config("coord.toml", ACCOUNTS_TOML);
    let out = db.coord(&["activate-current-config"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains(DETAIL), "{}", stderr(&out));
    let last_error: Option<String> = client
        .query_one(
            "SELECT last_error FROM coord.projector_versions WHERE name = 'accounts'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(last_error.unwrap_or_default().contains(DETAIL));
}
