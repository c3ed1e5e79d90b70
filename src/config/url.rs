//! [`DatabaseUrl`]: a connection URL that never shows its password, and
//! the choice between the given URL and the configuration file's.

use std::fmt;

use super::Config;
use crate::url_redact::redact;

/// A PostgreSQL connection URL whose `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Validates a URL or key=value connection string.
    ///
    /// # Errors
    /// A message (without the password) when PostgreSQL's client cannot parse it.
    pub fn parse(url: &str) -> Result<Self, String> {
        crate::db::parse_pg_config(url).map_err(|e| {
            format!("invalid database URL (not shown: it may hold a password): {e}")
        })?;
        Ok(Self(url.to_owned()))
    }

    /// The full URL, password included: pass it to a client, never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The connection settings.
    pub fn pg_config(&self) -> tokio_postgres::Config {
        crate::db::parse_pg_config(&self.0).expect("validated in DatabaseUrl::parse")
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", redact(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// Picks the database URL: `--database-url` or `DATABASE_URL` (the caller
/// passes whichever it has, flag first), else the configuration file's.
///
/// # Errors
/// [`crate::Error::InvalidInput`] when none is given or the given one is invalid.
pub fn resolve_database_url(
    given: Option<&str>,
    config: Option<&Config>,
) -> crate::Result<DatabaseUrl> {
    match (given, config.and_then(|c| c.database_url.clone())) {
        (Some(url), _) => DatabaseUrl::parse(url).map_err(crate::Error::InvalidInput),
        (None, Some(url)) => Ok(url),
        (None, None) => Err(crate::Error::InvalidInput(
            "no database URL: pass --database-url, set DATABASE_URL, or set database_url in the configuration".into(),
        )),
    }
}
