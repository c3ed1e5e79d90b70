//! Shared flags and what every command derives from them: the configuration,
//! the database URL, connections and the actor recorded in the history.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use coord::Actor;
use coord::{Config, DatabaseUrl, ProjectorSet};

/// The default of every command's `--batch-size`: the library's
/// (`ReplayOptions::default().batch_size`, checked by a test).
pub const BATCH_SIZE: u32 = 50_000;

/// The default of every command's `--batch-bytes`: the library's
/// ([`coord::replay::DEFAULT_BATCH_BYTES`], 16 MiB).
pub const BATCH_BYTES: u64 = coord::replay::DEFAULT_BATCH_BYTES as u64;

/// `--batch-bytes` as the library takes it (saturating on 32-bit targets).
pub fn batch_bytes(flag: u64) -> usize {
    usize::try_from(flag).unwrap_or(usize::MAX)
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Text,
    /// One JSON document, for pipelines.
    Json,
}

/// Flags every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Configuration file [default: coord.toml].
    #[arg(long, global = true, env = "COORD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL; wins over the configuration's `database_url`.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Seconds to wait for the database server to accept a connection before
    /// failing (a `connect_timeout` in the URL wins).
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 5.0)]
    pub connect_timeout: f64,
}

/// What a command runs with.
pub struct Context {
    pub args: GlobalArgs,
    pub actor: Actor,
    /// The application's Rust projectors (none for the `coord` binary).
    rust_projectors: ProjectorSet,
}

impl Context {
    pub fn new(args: GlobalArgs, command: &str, rust_projectors: ProjectorSet) -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let mut context = Self {
            args,
            actor: Actor::new(host, format!("coord {command}")),
            rust_projectors,
        };
        crate::db::name_connections(&context.actor.command, &context.actor.host);
        // Every version a command registers gets the configured roles'
        // privileges. An unreadable file is reported by `config()`, which
        // every command that registers calls before writing anything.
        if let Ok(config) = Config::load(&context.config_path()) {
            context.actor.privileges = config.privileges;
        }
        context
    }

    pub fn json(&self) -> bool {
        self.args.output == OutputFormat::Json
    }

    pub fn config_path(&self) -> PathBuf {
        self.args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("coord.toml"))
    }

    /// The configuration; an error when the file is missing or invalid, or
    /// when it defines a projector the application also defines in Rust. An
    /// application with Rust projectors may run without a file (an empty
    /// configuration) unless one is named.
    pub fn config(&self) -> anyhow::Result<Config> {
        let path = self.config_path();
        if !path.exists() {
            if self.args.config.is_none() && !self.rust_projectors.is_empty() {
                return Ok(Config {
                    source_name: "the application (no coord.toml)".to_owned(),
                    database_url: None,
                    event_store: coord::RelationName::default(),
                    projectors: Vec::new(),
                    privileges: Default::default(),
                });
            }
            return Err(coord::Error::InvalidInput(format!(
                "configuration file {} not found: pass --config PATH, set COORD_CONFIG, or run `coord init`",
                path.display()
            ))
            .into());
        }
        let config = Config::load(&path).map_err(coord::Error::from)?;
        self.merge(&config)?;
        Ok(config)
    }

    fn merge(&self, config: &Config) -> coord::Result<ProjectorSet> {
        ProjectorSet::from_config(config)
            .merge(self.rust_projectors.clone())
            .map_err(|e| {
                coord::Error::InvalidInput(format!(
                    "{e}: once in {} and once in the application's Rust code; remove one",
                    config.source_name
                ))
            })
    }

    /// The configuration when the file exists or was named with `--config`
    /// (for commands that can work without one).
    pub fn optional_config(&self) -> anyhow::Result<Option<Config>> {
        if self.args.config.is_some() || self.config_path().exists() {
            self.config().map(Some)
        } else {
            Ok(None)
        }
    }

    /// The projectors of the configuration and the application's Rust ones.
    pub fn projectors(&self, config: &Config) -> ProjectorSet {
        // `config()` refused a configuration whose names clash with the
        // Rust projectors, so the merge cannot fail here.
        self.merge(config)
            .unwrap_or_else(|_| ProjectorSet::from_config(config))
    }

    /// The database URL, with `--connect-timeout` as its `connect_timeout`
    /// unless it has one: every connection a command makes, single or pooled,
    /// gives up on an unreachable server within it.
    pub fn database_url(&self, config: Option<&Config>) -> anyhow::Result<DatabaseUrl> {
        let url = coord::resolve_database_url(self.args.database_url.as_deref(), config)?;
        let timeout = self.connect_timeout()?;
        Ok(coord::with_connect_timeout(&url, timeout)?)
    }

    fn connect_timeout(&self) -> coord::Result<Duration> {
        let seconds = self.args.connect_timeout;
        if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
            return Err(coord::Error::InvalidInput(format!(
                "--connect-timeout must be a number of seconds above 0 and at most 3600, not {seconds}"
            )));
        }
        Ok(Duration::from_secs_f64(seconds))
    }

    pub async fn connect(&self, config: Option<&Config>) -> anyhow::Result<tokio_postgres::Client> {
        let url = self.database_url(config)?;
        let timeout = url
            .pg_config()
            .get_connect_timeout()
            .copied()
            .unwrap_or(self.connect_timeout()?);
        coord::connect(&url, timeout).await.map_err(|e| match e {
            coord::Error::Db(_) => {
                anyhow::Error::from(e).context(format!("cannot connect to {url}"))
            }
            other => other.into(),
        })
    }

    /// A pool of `size` connections to `config`'s database, after checking
    /// that coord may write there and that the event store is usable (for
    /// the commands that replay and catch up).
    pub async fn writable_pool(
        &self,
        config: &Config,
        size: usize,
    ) -> anyhow::Result<deadpool_postgres::Pool> {
        let url = self.database_url(Some(config))?;
        let pool = coord::pool(&url, size)?;
        {
            let client = pool.get().await.map_err(coord::Error::from)?;
            coord::ensure_writable(&**client).await?;
            coord::check_event_store(&**client, &config.event_store).await?;
        }
        Ok(pool)
    }

    /// `err` with the host and port named when it is a pooled connection that
    /// could not be made (the pool's own message names neither).
    pub fn explain_connection_failure(&self, err: anyhow::Error) -> anyhow::Error {
        let failure = err.chain().find_map(|cause| match cause.downcast_ref() {
            Some(coord::Error::Pool(p)) => Some(p),
            _ => None,
        });
        let tls = match failure {
            Some(deadpool_postgres::PoolError::Backend(e)) if e.as_db_error().is_none() => {
                crate::db::is_tls_failure(e)
            }
            Some(deadpool_postgres::PoolError::Timeout(_)) => false,
            _ => return err,
        };
        let what = if tls {
            "the TLS handshake failed: check the URL's sslmode and sslrootcert"
        } else {
            crate::db::WHAT_TO_CHECK
        };
        let config = self.optional_config().ok().flatten();
        match self.database_url(config.as_ref()) {
            Ok(url) => err.context(format!(
                "cannot connect to {url} at {}; {what}",
                crate::db::endpoints(&url)
            )),
            Err(_) => err,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_batch_size_default_is_the_librarys() {
        assert_eq!(
            super::BATCH_SIZE as usize,
            coord::ReplayOptions::default().batch_size
        );
    }
}
