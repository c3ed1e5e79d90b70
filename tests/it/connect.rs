//! Connection failures are fast and name the server: `--connect-timeout`
//! bounds single connections and pooled ones, also against a server that
//! accepts TCP connections and never answers.

use std::time::{Duration, Instant};

use crate::support::{assert_exit, balances_toml, run_coord, stderr, TestDb};

/// A TCP listener on loopback that accepts connections and never answers
/// (a hung server or a black-holing firewall); kept open while alive.
fn silent_server() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// Generous: the point is "does not hang", not a timing.
const DOES_NOT_HANG: Duration = Duration::from_secs(60);

/// Runs coord in `dir` and checks that it failed (exit 1) without hanging,
/// naming `127.0.0.1:{port}` and what to check; returns its stderr.
fn fails_naming(dir: &std::path::Path, port: u16, args: &[&str]) -> String {
    let started = Instant::now();
    let out = run_coord(dir, &[], args);
    assert!(
        started.elapsed() < DOES_NOT_HANG,
        "took {:?}",
        started.elapsed()
    );
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("check that the server is running"), "{err}");
    err
}

#[tokio::test]
async fn a_silent_server_fails_within_the_connect_timeout_naming_host_and_port() {
    let (_listener, port) = silent_server();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://u@127.0.0.1:{port}/x");
    let err = fails_naming(
        dir.path(),
        port,
        &["status", "--database-url", &url, "--connect-timeout", "1"],
    );
    assert!(err.contains("within 1.0 s"), "{err}");
}

#[tokio::test]
async fn pooled_commands_fail_naming_host_and_port() {
    let (_listener, port) = silent_server();
    let db = TestDb::new().await;
    db.write_config("coord.toml", &balances_toml("1.0.0"));
    let url = format!("postgres://u@127.0.0.1:{port}/x");
    let err = fails_naming(
        db.dir.path(),
        port,
        &[
            "activate-current-config",
            "--database-url",
            &url,
            "--connect-timeout",
            "1",
        ],
    );
    assert!(err.contains(&format!("at 127.0.0.1:{port}")), "{err}");
}

#[tokio::test]
async fn a_refused_port_fails_naming_it_and_a_bad_timeout_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_coord(
        dir.path(),
        &[],
        &[
            "status",
            "--database-url",
            "postgres://u@127.0.0.1:1/x",
            "--connect-timeout",
            "1",
        ],
    );
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("127.0.0.1:1"), "{}", stderr(&out));
    for bad in ["0", "-1", "nan"] {
        let flag = format!("--connect-timeout={bad}");
        let out = run_coord(
            dir.path(),
            &[],
            &[
                "status",
                "--database-url",
                "postgres://u@127.0.0.1:1/x",
                &flag,
            ],
        );
        assert_exit(&out, 2);
        assert!(
            stderr(&out).contains("--connect-timeout"),
            "{}",
            stderr(&out)
        );
    }
}
