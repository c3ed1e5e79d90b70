//! Every configuration error: the message names file, projector and field,
//! the exit code is 2, and the database is untouched.

use crate::support::{assert_exit, balances_toml, stderr, TestDb};

async fn refused(text: &str, expected: &str) {
    let db = TestDb::migrated().await;
    db.write_config("coord.toml", text);
    let before = db.snapshot().await;
    // Every command that reads the configuration refuses it the same way.
    for command in ["status", "migrate"] {
        let out = db.coord(&[command]);
        assert_exit(&out, 2);
        let err = stderr(&out);
        assert!(
            err.starts_with("coord: invalid configuration coord.toml"),
            "{err}"
        );
        assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
    }
    assert_eq!(before, db.snapshot().await, "the database changed");
}

#[tokio::test]
async fn invalid_semver_is_refused() {
    refused(
        &balances_toml("2.0"),
        "projector balances: field `version`: \"2.0\" is not a semantic version",
    )
    .await;
}

#[tokio::test]
async fn invalid_name_is_refused() {
    let text = balances_toml("1.0.0").replace(
        "name = \"balances\"",
        "name = \"Balances; DROP SCHEMA coord\"",
    );
    refused(
        &text,
        "projector Balances; DROP SCHEMA coord: field `name`: invalid projector name",
    )
    .await;
}

#[tokio::test]
async fn duplicate_names_are_refused() {
    let text = format!("{}{}", balances_toml("1.0.0"), balances_toml("2.0.0"));
    refused(
        &text,
        "projector balances: field `name`: projector balances is defined more than once",
    )
    .await;
}

#[tokio::test]
async fn missing_handlers_are_refused() {
    let text = balances_toml("1.0.0");
    let text = &text[..text.find("[projector.handlers]").unwrap()];
    refused(text, "projector balances: field `handlers`: no handlers").await;
}

#[tokio::test]
async fn missing_tables_are_refused() {
    let text = r#"
[[projector]]
name = "balances"
version = "1.0.0"
[projector.handlers]
AccountOpened = "SELECT 1"
"#;
    refused(text, "projector balances: field `tables`: missing").await;
}

#[tokio::test]
async fn bad_mode_is_refused() {
    let text = balances_toml("1.0.0").replace(
        "version = \"1.0.0\"",
        "version = \"1.0.0\"\nmode = \"eager\"",
    );
    refused(
        &text,
        "projector balances: field `mode`: \"eager\" is not one of \"inline\", \"async\"",
    )
    .await;
}

#[tokio::test]
async fn bad_on_error_is_refused() {
    let text = balances_toml("1.0.0").replace(
        "version = \"1.0.0\"",
        "version = \"1.0.0\"\non_error = \"ignore\"",
    );
    refused(
        &text,
        "projector balances: field `on_error`: \"ignore\" is not one of \"fail\", \"park\"",
    )
    .await;
}

#[tokio::test]
async fn unknown_keys_are_refused() {
    let text =
        balances_toml("1.0.0").replace("version = \"1.0.0\"", "version = \"1.0.0\"\nretries = 3");
    refused(&text, "projector balances: unknown field `retries`").await;
}

#[tokio::test]
async fn a_missing_explicit_config_file_is_a_usage_error() {
    let db = TestDb::migrated().await;
    let out = db.coord(&["status", "--config", "nope.toml"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("configuration file nope.toml not found"),
        "{}",
        stderr(&out)
    );
}
