//! TLS with libpq's `sslmode` meanings, against a throwaway PostgreSQL
//! cluster this test starts on a free port with a self-signed certificate it
//! generates (the machine's own server is never reconfigured). Its
//! pg_hba.conf rejects connections without TLS, so a connection that works
//! is an encrypted one. Skipped, saying why, when initdb or openssl is absent.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{assert_exit, run_coord, stderr, stdout};

/// A cluster started by this test; stopped (its own postmaster, through
/// pg_ctl and its data directory) when dropped.
struct TlsCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl TlsCluster {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `name` in the test's directory (certificates).
    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", self.port)
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = run(
            self.as_postgres,
            &self.bin.join("pg_ctl"),
            &["stop", "-m", "immediate", "-D", &data.display().to_string()],
        );
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    dirs.into_iter()
        .find(|d| d.join(program).is_file())
        .map(|d| d.join(program))
}

/// Runs `program` (as user postgres when `as_postgres`: initdb refuses root).
fn run(as_postgres: bool, program: &Path, args: &[&str]) -> std::process::Output {
    let mut command = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed test authority (`ca.crt`), a server certificate it signs
/// for `localhost` only (no IP address, so that connecting to 127.0.0.1
/// passes `verify-ca` but not `verify-full`), and an unrelated authority
/// (`other.crt`).
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, cn) in [("ca", "coord test ca"), ("other", "another ca")] {
        let (key, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.crt"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req", "-x509", "-days", "2"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt, "-subj", &subj]);
        openssl(dir, &args);
    }
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ],
    );
}

fn start() -> Option<TlsCluster> {
    let Some(initdb) = which("initdb") else {
        eprintln!(
            "skipped: initdb not found (install PostgreSQL's server binaries to run the TLS test)"
        );
        return None;
    };
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: openssl not found (needed to generate the test certificate)");
        return None;
    }
    let bin = initdb.parent().unwrap().to_owned();
    // initdb refuses to run as root: run the cluster as user postgres then.
    let as_postgres = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    if as_postgres {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres", &dir.path().display().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cluster = TlsCluster {
        dir,
        bin,
        port,
        as_postgres,
    };
    let data = cluster.data().display().to_string();
    let out = run(
        as_postgres,
        &initdb,
        &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
    );
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        cluster.data().join("pg_hba.conf"),
        "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n\
         hostnossl all all 127.0.0.1/32 reject\nhostnossl all all ::1/128 reject\n",
    )
    .unwrap();
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{dir}' -c ssl=on \
         -c ssl_cert_file='{cert}' -c ssl_key_file='{key}' -c max_connections=20",
        dir = cluster.dir.path().display(),
        cert = cluster.file("server.crt"),
        key = cluster.file("server.key"),
    );
    let log = cluster.file("log");
    let out = run(
        as_postgres,
        &cluster.bin.join("pg_ctl"),
        &[
            "start", "-w", "-t", "120", "-D", &data, "-l", &log, "-o", &options,
        ],
    );
    if !out.status.success() {
        let log = std::fs::read_to_string(cluster.file("log")).unwrap_or_default();
        panic!(
            "pg_ctl start: {}\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(cluster)
}

async fn encrypted(url: &str) -> coord::Result<bool> {
    let url = coord::DatabaseUrl::parse(url).map_err(coord::Error::InvalidInput)?;
    let client = coord::connect(&url, std::time::Duration::from_secs(20)).await?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(coord::Error::Db)?;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmode_and_sslrootcert_have_libpqs_meanings() {
    let Some(cluster) = start() else { return };
    let ca = cluster.file("ca.crt");
    let other = cluster.file("other.crt");

    // Without TLS the server refuses (pg_hba.conf: hostnossl reject).
    let err = encrypted(&cluster.url("127.0.0.1", "sslmode=disable"))
        .await
        .unwrap_err();
    let message = match &err {
        coord::Error::Db(e) => e.as_db_error().map(|d| d.message().to_owned()),
        _ => None,
    };
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("no encryption")),
        "{err:?}"
    );
    // prefer (the default) and require encrypt without checking the certificate.
    assert!(encrypted(&cluster.url("127.0.0.1", "")).await.unwrap());
    assert!(encrypted(&cluster.url("127.0.0.1", "sslmode=require"))
        .await
        .unwrap());
    // verify-full checks the chain and the host name.
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert!(encrypted(&cluster.url("localhost", &full)).await.unwrap());
    let err = encrypted(&cluster.url("127.0.0.1", &full))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
    // verify-ca checks the chain only.
    let chain = format!("sslmode=verify-ca&sslrootcert={ca}");
    assert!(encrypted(&cluster.url("127.0.0.1", &chain)).await.unwrap());
    // A certificate from another authority is refused, also for require with
    // an explicit sslrootcert (libpq: then as verify-ca).
    for params in [
        format!("sslmode=verify-ca&sslrootcert={other}"),
        format!("sslmode=require&sslrootcert={other}"),
    ] {
        let err = encrypted(&cluster.url("127.0.0.1", &params))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{params}: {err}");
    }

    // The command line, single connections and pooled ones (activation).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("coord.toml"),
        crate::support::balances_toml("1.0.0"),
    )
    .unwrap();
    let url = cluster.url("localhost", &full);
    for args in [
        vec!["migrate"],
        vec!["activate-current-config"],
        vec!["check"],
    ] {
        let out = run_coord(dir.path(), &[("DATABASE_URL", &url)], &args);
        assert_exit(&out, 0);
    }
    let out = run_coord(
        dir.path(),
        &[("DATABASE_URL", &url)],
        &["status", "--output", "json"],
    );
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("\"active_version\": \"1.0.0\""),
        "{}",
        stdout(&out)
    );
    let wrong = cluster.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    );
    // A single connection and a pooled one both say what failed and what to check.
    for command in ["status", "activate-current-config"] {
        let out = run_coord(dir.path(), &[("DATABASE_URL", &wrong)], &[command]);
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(err.contains("UnknownIssuer"), "{command}: {err}");
        assert!(err.contains("sslrootcert"), "{command}: {err}");
    }
}
