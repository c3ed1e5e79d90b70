//! Shared flags and what every command derives from them: the configuration,
//! the database URL, connections and the actor recorded in the history.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use coord::store::Actor;
use coord::{Config, DatabaseUrl, ProjectorSet};

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
    #[arg(long, global = true, value_name = "PATH")]
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
}

/// What a command runs with.
pub struct Context {
    pub args: GlobalArgs,
    pub actor: Actor,
}

impl Context {
    pub fn new(args: GlobalArgs, command: &str) -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        Self {
            args,
            actor: Actor::new(host, format!("coord {command}")),
        }
    }

    pub fn json(&self) -> bool {
        self.args.output == OutputFormat::Json
    }

    fn config_path(&self) -> PathBuf {
        self.args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("coord.toml"))
    }

    /// The configuration; an error when the file is missing or invalid.
    pub fn config(&self) -> anyhow::Result<Config> {
        let path = self.config_path();
        if !path.exists() {
            return Err(coord::Error::InvalidInput(format!(
                "configuration file {} not found: pass --config PATH",
                path.display()
            ))
            .into());
        }
        Ok(Config::load(&path).map_err(coord::Error::from)?)
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

    /// The projectors of the configuration.
    pub fn projectors(&self, config: &Config) -> ProjectorSet {
        ProjectorSet::from_config(config)
    }

    pub fn database_url(&self, config: Option<&Config>) -> anyhow::Result<DatabaseUrl> {
        Ok(coord::resolve_database_url(
            self.args.database_url.as_deref(),
            config,
        )?)
    }

    pub async fn connect(&self, config: Option<&Config>) -> anyhow::Result<tokio_postgres::Client> {
        let url = self.database_url(config)?;
        coord::connect(&url, Duration::from_secs(10))
            .await
            .with_context(|| format!("cannot connect to {url}"))
    }
}
