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
