//! Tests of `coord.toml` parsing: every problem named by projector and field.

use super::*;
use semver::Version;

const VALID: &str = r#"
database_url = "postgres://app:s3cret@db.example:5432/bank"

[event_store]
relation = "coord.events"

[[projector]]
name = "balances"
version = "2.0.0"
mode = "inline"
on_error = "park"
tables = "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);"
verify = ["SELECT count(*) > 0 FROM balances"]

[projector.handlers]
AccountOpened = "INSERT INTO balances (account) VALUES ($1)"
"#;

fn problems(text: &str) -> Vec<String> {
    Config::parse(text, "coord.toml").unwrap_err().problems
}

/// Asserts that the first problem starts with `prefix`.
#[track_caller]
fn assert_first(problems: &[String], prefix: &str) {
    assert!(problems[0].starts_with(prefix), "{problems:?}");
}

fn with(replace: &str, by: &str) -> String {
    assert!(VALID.contains(replace), "{replace}");
    VALID.replace(replace, by)
}

#[test]
fn parses_the_design_example() {
    let config = Config::parse(VALID, "coord.toml").unwrap();
    let p = &config.projectors[0];
    assert_eq!(p.name.as_str(), "balances");
    assert_eq!(p.version, Version::new(2, 0, 0));
    assert_eq!(p.on_error, OnError::Park);
    assert_eq!(p.handlers.len(), 1);
    assert_eq!(config.event_store.to_string(), "coord.events");
}

#[test]
fn debug_and_display_hide_the_password() {
    let config = Config::parse(VALID, "coord.toml").unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("app:***@db.example"), "{debug}");
    let url = config.database_url.unwrap();
    assert!(!url.to_string().contains("s3cret"));
    assert_eq!(url.expose(), "postgres://app:s3cret@db.example:5432/bank");
    let kv = DatabaseUrl::parse("host=localhost password=hunter2 user=x").unwrap();
    assert!(!format!("{kv:?}").contains("hunter2"));
}

#[test]
fn the_given_url_wins_over_the_file() {
    let config = Config::parse(VALID, "coord.toml").unwrap();
    let url = resolve_database_url(Some("postgres://postgres@127.0.0.1/x"), Some(&config)).unwrap();
    assert_eq!(url.expose(), "postgres://postgres@127.0.0.1/x");
    let url = resolve_database_url(None, Some(&config)).unwrap();
    assert!(url.expose().contains("db.example"));
    assert!(resolve_database_url(None, None).is_err());
}

#[test]
fn invalid_semver_names_projector_and_field() {
    let p = problems(&with("\"2.0.0\"", "\"2.0\""));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_first(
        &p,
        "projector balances: field `version`: \"2.0\" is not a semantic version",
    );
}

#[test]
fn invalid_name_is_refused() {
    let p = problems(&with("name = \"balances\"", "name = \"Bal-ances\""));
    assert_first(
        &p,
        "projector Bal-ances: field `name`: invalid projector name",
    );
}

#[test]
fn duplicate_names_are_refused() {
    let twice = format!(
        "{VALID}\n{}",
        &VALID[VALID.find("[[projector]]").unwrap()..]
    );
    let p = problems(&twice);
    assert_eq!(
        p,
        vec!["projector balances: field `name`: projector balances is defined more than once"]
    );
}

#[test]
fn missing_handlers_and_tables_are_refused() {
    let text = with(
        "[projector.handlers]\nAccountOpened = \"INSERT INTO balances (account) VALUES ($1)\"\n",
        "",
    );
    let text = text.replace(
        "tables = \"CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);\"\n",
        "",
    );
    let p = problems(&text);
    assert!(
        p.iter()
            .any(|m| m.starts_with("projector balances: field `tables`: missing")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("projector balances: field `handlers`: no handlers")),
        "{p:?}"
    );
}

#[test]
fn bad_mode_and_on_error_are_refused() {
    let p = problems(&with("mode = \"inline\"", "mode = \"sync\""));
    assert_eq!(
        p,
        vec!["projector balances: field `mode`: \"sync\" is not one of \"inline\", \"async\""]
    );
    let p = problems(&with("on_error = \"park\"", "on_error = \"skip\""));
    assert_eq!(
        p,
        vec!["projector balances: field `on_error`: \"skip\" is not one of \"fail\", \"park\""]
    );
}

#[test]
fn unknown_keys_are_refused() {
    let p = problems(&with(
        "mode = \"inline\"",
        "mode = \"inline\"\ncolour = \"red\"",
    ));
    assert_first(&p, "projector balances: unknown field `colour`");
    let p = problems(&format!("verbose = true\n{VALID}"));
    assert!(p[0].contains("unknown field `verbose`"), "{p:?}");
    let p = problems(&with(
        "relation = \"coord.events\"",
        "relation = \"coord.events\"\ntable = \"x\"",
    ));
    assert!(p[0].contains("unknown field `table`"), "{p:?}");
}

#[test]
fn bad_relation_and_url_are_refused() {
    let p = problems(&with("\"coord.events\"", "\"coord.events; drop table x\""));
    assert_first(&p, "field `event_store.relation`: invalid relation");
    let p = problems(&with(
        "postgres://app:s3cret@db.example:5432/bank",
        "postgres://app:s3cret@db:notaport/x",
    ));
    assert_first(&p, "field `database_url`: invalid database URL");
    assert!(!p[0].contains("s3cret"), "{p:?}");
}

#[test]
fn an_empty_file_is_refused() {
    assert_eq!(
        problems(""),
        vec!["no [[projector]] entries: configure at least one projector"]
    );
    assert!(problems("[[projector").len() == 1);
}

#[test]
fn batch_handlers_keep_file_order_and_cannot_share_a_type_with_handlers() {
    let text = with(
        "[projector.handlers]",
        "[projector.batch_handlers]\nZeta = \"SELECT 1 FROM batch_events\"\n\
         Alpha = \"SELECT 2 FROM batch_events\"\n[projector.handlers]",
    );
    let config = Config::parse(&text, "coord.toml").unwrap();
    let order: Vec<&str> = config.projectors[0]
        .batch_handlers
        .iter()
        .map(|h| h.event_type.as_str())
        .collect();
    assert_eq!(order, ["Zeta", "Alpha"]);

    let text = with(
        "[projector.handlers]",
        "[projector.batch_handlers]\nAccountOpened = \"SELECT 1 FROM batch_events\"\n[projector.handlers]",
    );
    assert_eq!(
        problems(&text),
        vec![
            "projector balances: field `batch_handlers.AccountOpened`: event type AccountOpened \
             also has a per-event handler in `handlers`; give each event type either a \
             per-event or a batch handler, not both"
        ]
    );
}

#[test]
fn batch_checks_are_queries_of_types_with_a_batch_handler() {
    let batch = "[projector.batch_handlers]\nDeposited = \"SELECT 1 FROM batch_events\"\n\
                 [projector.handlers]";
    let text = with(
        "[projector.handlers]",
        &format!(
        "[projector.batch_checks]\nDeposited = \"SELECT position, 'no amount' FROM batch_events \
         WHERE data->>'amount' IS NULL;\"\n{batch}"
    ),
    );
    let config = Config::parse(&text, "coord.toml").unwrap();
    assert_eq!(config.projectors[0].batch_checks.len(), 1);
    assert_eq!(config.projectors[0].batch_checks[0].event_type, "Deposited");

    for (check, problem) in [
        (
            "Withdrawn = \"SELECT position, 'x' FROM batch_events\"",
            "projector balances: field `batch_checks.Withdrawn`: event type \"Withdrawn\" has no \
             batch handler in `batch_handlers`; a check runs before its event type's batch handler",
        ),
        (
            "AccountOpened = \"SELECT position, 'x' FROM batch_events\"",
            "projector balances: field `batch_checks.AccountOpened`: event type \"AccountOpened\" \
             has no batch handler",
        ),
        (
            "Deposited = \"DELETE FROM balances\"",
            "projector balances: field `batch_checks.Deposited`: the check is not a query (DELETE); \
             give a query returning (position, message)",
        ),
        (
            "Deposited = \"SELECT 1; SELECT 2\"",
            "projector balances: field `batch_checks.Deposited`: the check holds 2 statements",
        ),
        (
            "Deposited = \"COMMIT\"",
            "projector balances: field `batch_checks.Deposited`: the check is transaction control",
        ),
        (
            "Deposited = \"SELECT position, 'x' FROM batch_events WHERE position > $1\"",
            "projector balances: field `batch_checks.Deposited`: checks take no $n parameters",
        ),
        (
            "Deposited = \" \"",
            "projector balances: field `batch_checks.Deposited`: the query is empty",
        ),
    ] {
        let text = with(
            "[projector.handlers]",
            &format!("[projector.batch_checks]\n{check}\n{batch}"),
        );
        assert_first(&problems(&text), problem);
    }
}

#[test]
fn errors_name_the_file() {
    let err = Config::parse("x = 1", "deploy/coord.toml").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid configuration deploy/coord.toml: "),
        "{err}"
    );
}
