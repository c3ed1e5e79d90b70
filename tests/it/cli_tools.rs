//! `coord init`, `coord completions` and `COORD_CONFIG`.

use crate::support::{assert_exit, run_coord, stderr, stdout, TestDb};

#[tokio::test]
async fn init_writes_a_valid_configuration_and_never_overwrites() {
    let db = TestDb::new().await;
    let out = db.coord(&["init"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("wrote coord.toml"),
        "{}",
        stdout(&out)
    );
    let written = std::fs::read_to_string(db.dir.path().join("coord.toml")).unwrap();
    assert!(written.starts_with("# coord.toml"));
    // What it wrote is usable as it is.
    assert_exit(&db.coord(&["migrate"]), 0);
    let plan = db.coord(&["plan"]);
    assert_exit(&plan, 0);
    assert!(stdout(&plan).contains("balances"), "{}", stdout(&plan));
    // A second init refuses and leaves the file alone.
    std::fs::write(db.dir.path().join("coord.toml"), "# mine\n").unwrap();
    let again = db.coord(&["init"]);
    assert_exit(&again, 2);
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let kept = std::fs::read_to_string(db.dir.path().join("coord.toml")).unwrap();
    assert_eq!(kept, "# mine\n");
}

#[tokio::test]
async fn coord_config_names_the_configuration_file() {
    let db = TestDb::new().await;
    assert_exit(&db.coord(&["migrate"]), 0);
    let missing = run_coord(
        db.dir.path(),
        &[
            ("DATABASE_URL", &db.url),
            ("COORD_CONFIG", "elsewhere.toml"),
        ],
        &["plan"],
    );
    assert_exit(&missing, 2);
    assert!(
        stderr(&missing).contains("elsewhere.toml"),
        "{}",
        stderr(&missing)
    );
    db.write_config("elsewhere.toml", &crate::support::balances_toml("1.0.0"));
    let found = run_coord(
        db.dir.path(),
        &[
            ("DATABASE_URL", &db.url),
            ("COORD_CONFIG", "elsewhere.toml"),
        ],
        &["plan"],
    );
    assert_exit(&found, 0);
    assert!(stdout(&found).contains("balances"), "{}", stdout(&found));
}

#[test]
fn completions_are_printed_for_each_shell() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run_coord(dir.path(), &[], &["completions", shell]);
        assert_exit(&out, 0);
        assert!(
            stdout(&out).contains("activate-current-config"),
            "{shell}: {}",
            stdout(&out)
        );
    }
    assert_exit(&run_coord(dir.path(), &[], &["completions", "tcsh"]), 2);
}

#[test]
fn every_batch_size_flag_has_one_default() {
    let dir = tempfile::tempdir().unwrap();
    for command in [
        "activate-current-config",
        "replay",
        "catch-up",
        "rollback",
        "rebuild",
    ] {
        let out = run_coord(dir.path(), &[], &[command, "--help"]);
        assert_exit(&out, 0);
        let help = stdout(&out);
        let line = help
            .lines()
            .skip_while(|l| !l.contains("--batch-size"))
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(line.contains("[default: 50000]"), "{command}: {line}");
    }
}

#[tokio::test]
async fn wait_for_a_superseded_configuration_fails_at_once_with_the_gate_error() {
    let db = TestDb::new().await;
    db.write_config("v1.toml", &crate::support::balances_toml("1.0.0"));
    db.write_config("v2.toml", &crate::support::balances_toml("2.0.0"));
    assert_exit(&db.coord(&["migrate"]), 0);
    assert_exit(
        &db.coord(&["activate-current-config", "--config", "v2.toml"]),
        0,
    );
    let started = std::time::Instant::now();
    let out = db.coord(&["wait", "--config", "v1.toml", "--timeout", "600"]);
    // Generous: the point is that it does not wait for its timeout.
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
    assert_exit(&out, 3);
    assert!(stderr(&out).contains("1.0.0 is stale"), "{}", stderr(&out));
    // The configuration that is active does not wait either.
    assert_exit(
        &db.coord(&["wait", "--config", "v2.toml", "--timeout", "5"]),
        0,
    );
}

#[tokio::test]
async fn prune_without_a_terminal_lists_what_it_would_drop_before_refusing() {
    let db = TestDb::new().await;
    db.write_config("v1.toml", &crate::support::balances_toml("1.0.0"));
    db.write_config("v2.toml", &crate::support::balances_toml("2.0.0"));
    assert_exit(&db.coord(&["migrate"]), 0);
    for config in ["v1.toml", "v2.toml"] {
        assert_exit(
            &db.coord(&["activate-current-config", "--config", config]),
            0,
        );
    }
    let out = db.coord(&["prune", "--config", "v2.toml"]);
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("balances_v1_0_0 (balances@1.0.0"), "{err}");
    assert!(err.contains("nothing dropped: confirm with --yes"), "{err}");
}

#[test]
fn a_toml_syntax_error_keeps_its_line_and_caret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("coord.toml"),
        "[[projector]]\nname = \"balances\"\nversion = 1.0.0\"\n",
    )
    .unwrap();
    let out = run_coord(dir.path(), &[], &["plan"]);
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("line 3"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.trim_start().starts_with('|') && l.contains('^')),
        "{err}"
    );
}
