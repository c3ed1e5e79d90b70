//! Identifiers built from user input: projector names, schema names of
//! projector versions, and quoting. Every identifier coord splices into SQL
//! passes through this module; nothing here touches the database.

use std::fmt;

use semver::Version;
use sha2::{Digest, Sha256};

/// PostgreSQL's limit on an identifier, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// A validated projector name: `^[a-z][a-z0-9_]{0,39}$`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProjectorName(String);

impl ProjectorName {
    /// Validates `name`.
    ///
    /// # Errors
    /// A message naming the problem when `name` does not match
    /// `^[a-z][a-z0-9_]{0,39}$`.
    pub fn new(name: &str) -> Result<Self, String> {
        let mut chars = name.chars();
        let valid = match chars.next() {
            Some(first) => {
                first.is_ascii_lowercase()
                    && name.len() <= 40
                    && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            }
            None => false,
        };
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "invalid projector name {name:?}: it must match ^[a-z][a-z0-9_]{{0,39}}$ \
                 (a lowercase letter, then up to 39 lowercase letters, digits or underscores)"
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ProjectorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The longest event type coord accepts, in bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 255;

/// The one rule for event types, wherever they come from (a handler key in
/// `coord.toml`, `coord publish --type`, [`crate::NewEvent`]): 1 to 255
/// bytes, no leading or trailing whitespace, no control characters. A type
/// that differs from a handler key only by spaces would otherwise be
/// published and silently never handled.
///
/// # Errors
/// A message naming the type and the problem.
pub fn check_event_type(event_type: &str) -> Result<(), String> {
    let problem = if event_type.is_empty() {
        "it is empty"
    } else if event_type.len() > MAX_EVENT_TYPE_BYTES {
        "it is longer than 255 bytes"
    } else if event_type.trim() != event_type {
        "it starts or ends with whitespace"
    } else if event_type.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(format!("invalid event type {event_type:?}: {problem}"))
}

/// The PostgreSQL schema that holds the tables of projector version
/// `name@version`: `{name}_v{major}_{minor}_{patch}`, plus `_` and the first
/// 8 hex digits of the SHA-256 of the full version string when the version
/// has pre-release or build parts.
///
/// The result is always a valid identifier of at most 63 bytes: when huge
/// version numbers would make it longer, it is `{name}_h` followed by the
/// first 16 hex digits of the SHA-256 of the full version string (see
/// `docs/decisions/0001-schema-names.md`).
pub fn schema_name(name: &ProjectorName, version: &Version) -> String {
    let full = version.to_string();
    let mut schema = format!(
        "{}_v{}_{}_{}",
        name, version.major, version.minor, version.patch
    );
    if !version.pre.is_empty() || !version.build.is_empty() {
        schema.push('_');
        schema.push_str(&sha256_hex(&full)[..8]);
    }
    if schema.len() > MAX_IDENTIFIER_BYTES {
        schema = format!("{}_h{}", name, &sha256_hex(&full)[..16]);
    }
    schema
}

/// Quotes an identifier for SQL: `"` around it, inner `"` doubled.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a string literal for SQL the way PostgreSQL's `quote_literal`
/// does: `'` around it, inner `'` doubled, and `E'...'` with doubled
/// backslashes when it has any. For statements that cannot take bound
/// parameters (`COPY`).
pub fn quote_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// Lowercase hex SHA-256 of `text`.
pub(crate) fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A table or view name, `relation` or `schema.relation`, each part an
/// identifier of letters, digits, `_` and `$` not starting with a digit.
/// Parts are used literally (quoted), so case matters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationName {
    schema: Option<String>,
    relation: String,
}

impl RelationName {
    /// Parses and validates `text`.
    ///
    /// # Errors
    /// A message naming the problem when `text` is not of that form.
    pub fn parse(text: &str) -> Result<Self, String> {
        let valid_part = |part: &str| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
                && part.len() <= MAX_IDENTIFIER_BYTES
        };
        let parts: Vec<&str> = text.split('.').collect();
        let ok = !parts.is_empty() && parts.len() <= 2 && parts.iter().all(|p| valid_part(p));
        if !ok {
            return Err(format!(
                "invalid relation {text:?}: expected `table` or `schema.table`, each part made of \
                 letters, digits, `_` or `$` and not starting with a digit"
            ));
        }
        Ok(match parts.as_slice() {
            [relation] => Self {
                schema: None,
                relation: (*relation).to_owned(),
            },
            [schema, relation] => Self {
                schema: Some((*schema).to_owned()),
                relation: (*relation).to_owned(),
            },
            _ => unreachable!("checked above"),
        })
    }

    /// The quoted form to splice into SQL.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.relation)),
            None => quote_ident(&self.relation),
        }
    }
}

impl fmt::Display for RelationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.relation),
            None => f.write_str(&self.relation),
        }
    }
}

impl Default for RelationName {
    fn default() -> Self {
        Self {
            schema: Some("coord".into()),
            relation: "events".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ProjectorName {
        ProjectorName::new(n).unwrap()
    }

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn literals_are_quoted_like_postgres_quote_literal() {
        assert_eq!(quote_literal("a"), "'a'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'"), r"E'a\\b'''");
    }

    #[test]
    fn plain_versions_map_to_readable_schemas() {
        assert_eq!(
            schema_name(&name("balances"), &v("2.0.0")),
            "balances_v2_0_0"
        );
        assert_eq!(schema_name(&name("a"), &v("10.20.30")), "a_v10_20_30");
    }

    #[test]
    fn pre_release_and_build_versions_get_a_hash_suffix() {
        let pre = schema_name(&name("balances"), &v("2.0.0-rc.1"));
        assert_eq!(
            pre,
            format!("balances_v2_0_0_{}", &sha256_hex("2.0.0-rc.1")[..8])
        );
        let build = schema_name(&name("balances"), &v("2.0.0+build.7"));
        assert_ne!(pre, build);
        assert!(build.starts_with("balances_v2_0_0_"));
    }

    #[test]
    fn schema_names_never_exceed_63_bytes() {
        let long = name(&"p".repeat(40));
        let huge = v(&format!("{0}.{0}.{0}-rc.1+b", u64::MAX));
        let schema = schema_name(&long, &huge);
        assert!(schema.len() <= MAX_IDENTIFIER_BYTES, "{schema}");
        assert!(schema.starts_with(&"p".repeat(40)));
        let other = schema_name(&long, &v(&format!("{0}.{0}.{0}", u64::MAX)));
        assert_ne!(schema, other);
        assert!(other.len() <= MAX_IDENTIFIER_BYTES);
        let longest_plain = schema_name(&long, &v("1.2.3-x"));
        assert!(longest_plain.len() <= MAX_IDENTIFIER_BYTES);
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        for version in [
            "0.0.0",
            "1.2.3-alpha.1",
            "1.0.0+20130313144700",
            "99999999999.1.1",
        ] {
            let schema = schema_name(&name("x_1"), &v(version));
            assert!(schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
    }

    #[test]
    fn hostile_projector_names_are_refused() {
        for bad in [
            "",
            "Balances",
            "1balances",
            "_x",
            "bal-ances",
            "bal ances",
            "x\"; DROP SCHEMA coord; --",
            "x;y",
            "é",
            "a\0b",
            &"a".repeat(41),
        ] {
            let err = ProjectorName::new(bad).unwrap_err();
            assert!(err.contains("invalid projector name"), "{bad:?}: {err}");
        }
        assert!(ProjectorName::new(&"a".repeat(40)).is_ok());
        assert!(ProjectorName::new("a").is_ok());
    }

    #[test]
    fn event_types_follow_one_rule() {
        for good in ["AccountOpened", "account.opened.v2", "Konto\u{e9}", "a b"] {
            assert_eq!(check_event_type(good), Ok(()), "{good:?}");
        }
        for (bad, problem) in [
            ("", "empty"),
            (" ", "whitespace"),
            (" lead", "whitespace"),
            ("trail\t", "whitespace"),
            ("a\nb", "control character"),
            ("a\0b", "control character"),
        ] {
            let err = check_event_type(bad).unwrap_err();
            assert!(err.contains(problem), "{bad:?}: {err}");
        }
        assert!(check_event_type(&"x".repeat(MAX_EVENT_TYPE_BYTES)).is_ok());
        assert!(check_event_type(&"x".repeat(MAX_EVENT_TYPE_BYTES + 1)).is_err());
    }

    #[test]
    fn quoting_doubles_inner_quotes() {
        assert_eq!(quote_ident("a"), "\"a\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_ident("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
    }

    #[test]
    fn relations_are_validated_and_quoted() {
        assert_eq!(
            RelationName::parse("coord.events").unwrap().quoted(),
            "\"coord\".\"events\""
        );
        assert_eq!(
            RelationName::parse("my_events").unwrap().quoted(),
            "\"my_events\""
        );
        for bad in ["", "a.b.c", "1x", "x;drop", "a b", "a.\"b\"", "."] {
            assert!(RelationName::parse(bad).is_err(), "{bad}");
        }
    }
}
