//! `coord init`: write a commented `coord.toml` to start from.

use std::io::Write as _;

use crate::context::Context;
use crate::output;

/// Arguments of `coord init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {}

/// The file `coord init` writes: valid as it is, every setting explained.
pub const TEMPLATE: &str = r#"# coord.toml: the projectors this deployment runs (see README.md).
# Every command reads it: --config PATH or COORD_CONFIG name another file.

# The database; --database-url and DATABASE_URL win over it. TLS settings go in
# the URL: ?sslmode=require (encrypt) or ?sslmode=verify-full&sslrootcert=ca.pem.
# database_url = "postgres://app@127.0.0.1:5432/app"

[event_store]
# The table or view events are read from: coord.events (bundled) or a view of
# yours with the same columns.
relation = "coord.events"

# One [[projector]] per read model. Bump `version` (semver) whenever its tables
# or handlers change: coord replays the new version beside the old one, and
# `coord activate-current-config` switches to it.
[[projector]]
name = "balances"
version = "1.0.0"
# inline: runs in the publisher's transaction; async: run by `coord run`.
mode = "inline"
# fail: a replay stops at an event whose handler fails; park: it records the
# event in coord.parked_events and goes on.
on_error = "fail"
# DDL run in the version's own schema (balances_v1_0_0): name tables unqualified.
tables = """
CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);
"""
# Optional SQL assertions that must each return true before activation.
# verify = ["SELECT count(*) > 0 FROM balances"]

# One statement per handled event type. Parameters: $1 stream_id, $2
# stream_version, $3 position, $4 event_type, $5 data (jsonb), $6 metadata
# (jsonb), $7 recorded_at.
[projector.handlers]
AccountOpened = "INSERT INTO balances (account) VALUES ($1)"
MoneyDeposited = "UPDATE balances SET amount = amount + ($5->>'amount')::bigint WHERE account = $1"
"#;

pub fn run(ctx: &Context, _args: &InitArgs) -> anyhow::Result<()> {
    let path = ctx.config_path();
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(coord::Error::InvalidInput(format!(
                "{} already exists: coord init never overwrites a configuration; pass --config NEW_PATH",
                path.display()
            ))
            .into());
        }
        Err(e) => {
            return Err(anyhow::Error::from(e).context(format!("cannot create {}", path.display())))
        }
    };
    file.write_all(TEMPLATE.as_bytes())?;
    if ctx.json() {
        return output::json(&serde_json::json!({ "written": path }));
    }
    println!(
        "wrote {}: edit its projectors, then run `coord migrate` and `coord plan`",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_template_is_a_valid_configuration() {
        let config = coord::Config::parse(super::TEMPLATE, "template").expect("valid");
        assert_eq!(config.projectors.len(), 1);
    }
}
