//! Privileges for application roles (`coord.toml` `[privileges]`): the
//! roles that read and write a version's tables get them inside the
//! registration transaction, so a new version is usable by the application
//! the moment it activates (docs/decisions/0038-privileges-for-application-roles.md).

use std::fmt;

use tokio_postgres::Transaction;

use crate::names::quote_ident;
use crate::{Error, Result};

/// A PostgreSQL role name from `[privileges]`: 1 to 63 bytes of ASCII
/// letters, digits, `_`, `-`, `.`, `@` or `$`, not starting with a digit,
/// and not `public` (write no role to leave a version's tables private).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RoleName(String);

impl RoleName {
    /// Validates a role name.
    ///
    /// # Errors
    /// A message naming the role and the rule it breaks.
    pub fn new(name: &str) -> std::result::Result<Self, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.@$".contains(c);
        if name.is_empty() || name.len() > 63 {
            return Err(format!(
                "role name {name:?} must be 1 to 63 bytes long (PostgreSQL's limit)"
            ));
        }
        if let Some(c) = name.chars().find(|c| !allowed(*c)) {
            return Err(format!(
                "role name {name:?} contains {c:?}: use ASCII letters, digits, `_`, `-`, `.`, `@` or `$`"
            ));
        }
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("role name {name:?} must not start with a digit"));
        }
        if name.eq_ignore_ascii_case("public") {
            return Err(format!(
                "role name {name:?}: granting to every role is not supported; name the application's roles"
            ));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[privileges]`: roles granted access to every version's schema and tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Privileges {
    /// `read`: `USAGE` on the schema, `SELECT` on its tables and sequences.
    pub read: Vec<RoleName>,
    /// `write`: `USAGE` on the schema; `SELECT`, `INSERT`, `UPDATE`,
    /// `DELETE` on its tables; `USAGE`, `SELECT`, `UPDATE` on its sequences.
    pub write: Vec<RoleName>,
}

impl Privileges {
    /// Validates the `read` and `write` lists; problems name the field.
    ///
    /// # Errors
    /// Every invalid role name, prefixed by its field.
    pub fn parse(read: &[String], write: &[String]) -> std::result::Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut list = |field: &str, names: &[String]| -> Vec<RoleName> {
            names
                .iter()
                .filter_map(|n| {
                    RoleName::new(n)
                        .map_err(|e| problems.push(format!("field `privileges.{field}`: {e}")))
                        .ok()
                })
                .collect()
        };
        let read = list("read", read);
        let write = list("write", write);
        if problems.is_empty() {
            Ok(Self { read, write })
        } else {
            Err(problems)
        }
    }

    /// Whether no role is named.
    pub fn is_empty(&self) -> bool {
        self.read.is_empty() && self.write.is_empty()
    }
}

/// Grants `privileges` on `schema` and everything in it, inside the
/// registration transaction `tx`. Refuses before granting anything when a
/// role does not exist.
///
/// # Errors
/// [`Error::InvalidInput`] naming every role that does not exist; database
/// errors.
pub async fn grant(tx: &Transaction<'_>, schema: &str, privileges: &Privileges) -> Result<()> {
    if privileges.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = privileges
        .read
        .iter()
        .chain(&privileges.write)
        .map(RoleName::as_str)
        .collect();
    let missing: Vec<String> = tx
        .query(
            "SELECT n FROM unnest($1::text[]) AS n \
             WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = n) ORDER BY n",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    if !missing.is_empty() {
        return Err(Error::InvalidInput(format!(
            "[privileges] names roles that do not exist: {}; create them (CREATE ROLE) or remove them from coord.toml",
            missing.join(", ")
        )));
    }
    let schema = quote_ident(schema);
    let roles = |list: &[RoleName]| {
        list.iter()
            .map(|r| quote_ident(r.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut sql = String::new();
    for (list, tables, sequences) in [
        (&privileges.read, "SELECT", "SELECT"),
        (
            &privileges.write,
            "SELECT, INSERT, UPDATE, DELETE",
            "USAGE, SELECT, UPDATE",
        ),
    ] {
        if list.is_empty() {
            continue;
        }
        let to = roles(list);
        sql.push_str(&format!(
            "GRANT USAGE ON SCHEMA {schema} TO {to};\n\
             GRANT {tables} ON ALL TABLES IN SCHEMA {schema} TO {to};\n\
             GRANT {sequences} ON ALL SEQUENCES IN SCHEMA {schema} TO {to};\n"
        ));
    }
    tx.batch_execute(&sql).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_validated() {
        for good in ["app", "app_rw", "App-1", "svc.web@prod", "a$b"] {
            assert!(RoleName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1app",
            "app\"; DROP",
            "a b",
            "public",
            "PUBLIC",
            &"x".repeat(64),
        ] {
            assert!(RoleName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn problems_name_the_field() {
        let problems =
            Privileges::parse(&["ok".into()], &["bad role".into()]).expect_err("refused");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("field `privileges.write`"),
            "{problems:?}"
        );
    }
}
