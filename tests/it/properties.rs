//! Property tests (proptest) on configuration parsing and schema names: no
//! panic on any input, every accepted name is a valid identifier of at most
//! 63 bytes, distinct versions never share a schema. A failure prints the
//! minimal failing input; `PROPTEST_CASES` raises the number of cases.

use coord::{schema_name, Config, DatabaseUrl, ProjectorName};
use proptest::prelude::*;
use semver::{BuildMetadata, Prerelease, Version};

/// A plain PostgreSQL identifier coord can splice unquoted-safe: a
/// lowercase letter, then lowercase letters, digits or `_`, at most 63 bytes.
fn is_plain_identifier(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn projector_name() -> impl Strategy<Value = ProjectorName> {
    "[a-z][a-z0-9_]{0,39}".prop_map(|n| ProjectorName::new(&n).unwrap())
}

/// Dot-separated semver identifiers: alphanumerics and hyphens, no empty
/// part, no leading zero in numeric parts (checked by semver itself).
fn semver_identifiers() -> impl Strategy<Value = String> {
    prop::collection::vec("[0-9A-Za-z-]{1,12}", 0..4).prop_map(|parts| parts.join("."))
}

fn version() -> impl Strategy<Value = Version> {
    (
        prop_oneof![0..100u64, any::<u64>()],
        prop_oneof![Just(0u64), 0..1000u64, any::<u64>()],
        prop_oneof![Just(0u64), 0..1000u64, any::<u64>()],
        semver_identifiers(),
        semver_identifiers(),
    )
        .prop_filter_map("valid semver", |(major, minor, patch, pre, build)| {
            let mut v = Version::new(major, minor, patch);
            v.pre = Prerelease::new(&pre).ok()?;
            v.build = BuildMetadata::new(&build).ok()?;
            Some(v)
        })
}

/// Configuration text built from arbitrary values, escaped as TOML: mostly
/// plausible values (so that many configurations are accepted and their
/// names checked), mixed with anything at all (so that every validation
/// path meets hostile input).
fn config_text() -> impl Strategy<Value = String> {
    let anything = || {
        prop_oneof![
            ".*",
            Just("COMMIT".to_owned()),
            Just("INSERT INTO t VALUES ($1); COMMIT".to_owned()),
            "(SELECT|INSERT|BEGIN|END|CREATE TABLE|\\(|\\)|;|'|\\$\\$| )*",
        ]
    };
    let name = prop_oneof![8 => "[a-z][a-z0-9_]{0,45}", 1 => anything()];
    let version = prop_oneof![
        8 => "(0|[1-9][0-9]{0,19})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})(-[a-z][a-z0-9.]{0,8}[a-z])?(\\+[a-z0-9]{1,8})?",
        1 => anything(),
    ];
    let mode =
        prop_oneof![4 => Just("inline".to_owned()), 4 => Just("async".to_owned()), 1 => anything()];
    let tables = prop_oneof![8 => Just("CREATE TABLE t (x int);".to_owned()), 1 => anything()];
    let relation = prop_oneof![8 => "[a-z_]{1,10}(\\.[a-z_]{1,10})?", 1 => anything()];
    let key = prop_oneof![8 => "[A-Z][A-Za-z.]{0,20}", 1 => ".{0,12}"];
    let sql = prop_oneof![8 => Just("INSERT INTO t VALUES ($1)".to_owned()), 1 => anything()];
    (
        (name, version, mode, tables, relation),
        prop::collection::btree_map(key, sql.clone(), 0..4),
        prop::collection::vec(sql, 0..3),
        any::<bool>(),
    )
        .prop_map(
            |((name, version, mode, tables, relation), handlers, verify, with_store)| {
                let mut projector = toml::Table::new();
                projector.insert("name".into(), name.into());
                projector.insert("version".into(), version.into());
                projector.insert("tables".into(), tables.into());
                projector.insert("mode".into(), mode.into());
                let handlers: toml::Table = handlers
                    .into_iter()
                    .map(|(k, v)| (k, toml::Value::String(v)))
                    .collect();
                projector.insert("handlers".into(), handlers.into());
                projector.insert(
                    "verify".into(),
                    toml::Value::Array(verify.into_iter().map(toml::Value::String).collect()),
                );
                let mut root = toml::Table::new();
                if with_store {
                    let mut store = toml::Table::new();
                    store.insert("relation".into(), relation.into());
                    root.insert("event_store".into(), store.into());
                }
                root.insert(
                    "projector".into(),
                    toml::Value::Array(vec![projector.into()]),
                );
                toml::to_string(&root).expect("serialisable")
            },
        )
}

proptest! {
    #[test]
    fn config_parsing_never_panics_on_any_text(text in ".*") {
        let _ = Config::parse(&text, "coord.toml");
    }

    #[test]
    fn config_parsing_never_panics_on_deep_nesting(
        open in "[\\[{(]{0,3000}",
        sql in "[(\\[ a-z;$']{0,3000}",
    ) {
        let _ = Config::parse(&format!("x = {open}"), "coord.toml");
        let text = format!(
            "[[projector]]\nname = \"p\"\nversion = \"1.0.0\"\ntables = {sql:?}\n[projector.handlers]\nE = {sql:?}\n"
        );
        let _ = Config::parse(&text, "coord.toml");
    }

    /// Whatever the values, parsing returns (never panics), and an accepted
    /// configuration has valid names whose schemas are plain identifiers of
    /// at most 63 bytes.
    #[test]
    fn accepted_configurations_have_valid_names_and_schemas(text in config_text()) {
        if let Ok(config) = Config::parse(&text, "coord.toml") {
            for p in &config.projectors {
                let name = p.name.as_str();
                prop_assert!(is_plain_identifier(name) && name.len() <= 40, "{name:?}");
                let schema = schema_name(&p.name, &p.version);
                prop_assert!(is_plain_identifier(&schema), "{schema:?}");
                for event_type in p.handlers.keys() {
                    prop_assert!(coord::check_event_type(event_type).is_ok());
                }
            }
        }
    }

    #[test]
    fn every_accepted_projector_name_is_a_short_identifier(text in ".{0,50}") {
        if let Ok(name) = ProjectorName::new(&text) {
            prop_assert!(is_plain_identifier(name.as_str()) && text.len() <= 40, "{text:?}");
        }
    }

    #[test]
    fn schema_names_are_plain_identifiers_of_at_most_63_bytes(
        name in projector_name(),
        version in version(),
    ) {
        let schema = schema_name(&name, &version);
        prop_assert!(is_plain_identifier(&schema), "{schema:?} for {name}@{version}");
        prop_assert!(schema.starts_with(name.as_str()), "{schema:?}");
    }

    #[test]
    fn distinct_versions_never_share_a_schema(
        name in projector_name(),
        a in version(),
        b in version(),
    ) {
        prop_assume!(a.to_string() != b.to_string());
        prop_assert_ne!(schema_name(&name, &a), schema_name(&name, &b), "{} vs {}", a, b);
    }

    /// The same, for versions that differ only slightly (a patch bump,
    /// another pre-release tag, other build metadata), which random pairs
    /// rarely produce.
    #[test]
    fn neighbouring_versions_never_share_a_schema(
        name in projector_name(),
        base in version(),
        pre in semver_identifiers(),
        build in semver_identifiers(),
    ) {
        let mut bumped = base.clone();
        bumped.patch = bumped.patch.wrapping_add(1);
        let mut tagged = base.clone();
        tagged.pre = Prerelease::new(&pre).unwrap_or(Prerelease::EMPTY);
        let mut built = base.clone();
        built.build = BuildMetadata::new(&build).unwrap_or(BuildMetadata::EMPTY);
        let versions = [&base, &bumped, &tagged, &built];
        let schemas = versions.map(|v| (v.to_string(), schema_name(&name, v)));
        for (i, (va, sa)) in schemas.iter().enumerate() {
            for (vb, sb) in &schemas[i + 1..] {
                if va != vb {
                    prop_assert_ne!(sa, sb, "{} vs {}", va, vb);
                }
            }
        }
    }

    /// Whatever the password holds (`/`, `?`, `@`, `:`, spaces, quotes,
    /// backslashes), a URL or `key=value` string never shows the password
    /// the client would use, in `Debug`, `Display` or a parse error.
    #[test]
    fn database_urls_never_show_their_password(
        tail in "[ -~]{1,24}",
        form in 0..4u8,
    ) {
        let secret = format!("Zx9{tail}");
        let quoted = secret.replace('\\', "\\\\").replace('\'', "\\'");
        let text = match form {
            0 => format!("postgres://app:{secret}@db.example:5432/bank"),
            1 => format!("postgresql://db.example/bank?user=app&password={secret}&sslmode=disable"),
            2 => format!("host=db.example password='{quoted}' user=app"),
            _ => format!("host=db.example password={} user=app", quoted.replace(' ', "\\ ")),
        };
        match DatabaseUrl::parse(&text) {
            Ok(url) => {
                if url.pg_config().get_password() == Some(secret.as_bytes()) {
                    let shown = format!("{url:?} {url}");
                    prop_assert!(!shown.contains(&secret), "{text:?} shown as {shown:?}");
                }
            }
            Err(message) => prop_assert!(!message.contains(&secret), "{message}"),
        }
    }
}
