use crate::support::{assert_exit, balances_toml, stderr, stdout, TestDb};

#[tokio::test]
async fn migrate_reports_what_it_applied_and_is_idempotent() {
    let db = TestDb::new().await;
    let first = db.coord(&["migrate"]);
    assert_exit(&first, 0);
    assert_eq!(
        stdout(&first),
        "applied V1__coord_schema\napplied V2__publisher_gate\napplied V3__pruned_status\napplied V4__exact_inline_checkpoints\n\
         applied V5__sql_publish_batch_handlers\napplied V8__gate_refuses_during_critical_section\napplied V9__event_errors\n"
    );
    let second = db.coord(&["migrate"]);
    assert_exit(&second, 0);
    assert!(stdout(&second).contains("up to date"));
    let json = db.coord(&["migrate", "--output", "json"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["applied"], serde_json::json!([]));
}

#[tokio::test]
async fn status_lists_projectors_as_text_and_json() {
    let db = TestDb::migrated().await;
    let empty = db.coord(&["status"]);
    assert_exit(&empty, 0);
    assert!(
        stdout(&empty).contains("no projectors yet"),
        "{}",
        stdout(&empty)
    );

    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO coord.projector_states (name, active_version, replaying_version) VALUES ('balances', '1.0.0', '2.0.0');
             INSERT INTO coord.projector_versions (name, version, status, schema_name, fingerprint, event_types, mode)
             VALUES ('balances', '1.0.0', 'active', 'balances_v1_0_0', 'f1', '{AccountOpened}', 'inline'),
                    ('balances', '2.0.0', 'replaying', 'balances_v2_0_0', 'f2', '{AccountOpened}', 'inline');
             INSERT INTO coord.events (stream_id, stream_version, event_type, data) VALUES ('a', 1, 'AccountOpened', '{}');",
        )
        .await
        .unwrap();
    let text = db.coord(&["status"]);
    assert_exit(&text, 0);
    let out = stdout(&text);
    assert!(out.contains("event store head: position 1"), "{out}");
    assert!(
        out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["balances", "1.0.0", "-", "2.0.0", "-"]),
        "{out}"
    );
    assert!(out.contains("balances_v2_0_0"), "{out}");

    let json = db.coord(&["status", "--output", "json"]);
    assert_exit(&json, 0);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["projectors"][0]["active_version"], "1.0.0");
    assert_eq!(value["projectors"][0]["replaying_version"], "2.0.0");
    assert_eq!(value["projectors"][0]["versions"][1]["status"], "replaying");
    assert_eq!(value["projectors"][0]["versions"][1]["lag"], 1);
    // The active inline version never saw the SQL-inserted event: it lags
    // by it, visibly.
    assert_eq!(value["projectors"][0]["versions"][0]["lag"], 1);
    assert_eq!(value["projectors"][0]["versions"][0]["applied_inline"], 0);
    assert!(out.contains("1 BEHIND"), "{out}");
}

#[tokio::test]
async fn a_config_file_database_url_is_used_when_no_flag_or_env_is_given() {
    let db = TestDb::new().await;
    db.write_config(
        "coord.toml",
        &format!("database_url = \"{}\"\n{}", db.url, balances_toml("1.0.0")),
    );
    let out = crate::support::run_coord(db.dir.path(), &[], &["migrate"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("applied V1__coord_schema"));
}

#[tokio::test]
async fn the_flag_wins_over_the_environment() {
    let db = TestDb::new().await;
    let out = crate::support::run_coord(
        db.dir.path(),
        &[("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")],
        &["migrate", "--database-url", &db.url],
    );
    assert_exit(&out, 0);
}

#[tokio::test]
async fn unreachable_database_fails_with_exit_1_and_no_password_in_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::support::run_coord(
        dir.path(),
        &[],
        &[
            "status",
            "--database-url",
            "postgres://u:topsecret@127.0.0.1:1/x?connect_timeout=2",
        ],
    );
    assert_exit(&out, 1);
    assert!(
        stderr(&out).starts_with("coord: cannot connect to postgres://u:***@127.0.0.1:1/x"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("topsecret"));
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let db = TestDb::new().await;
    assert_exit(&db.coord(&["frobnicate"]), 2);
    assert_exit(&db.coord(&["status", "--output", "yaml"]), 2);
    let out = db.coord(&["status", "--database-url", "postgres://x@h:notaport/db"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("invalid database URL"),
        "{}",
        stderr(&out)
    );
}
