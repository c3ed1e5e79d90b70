//! The one way coord drops a projector version's schema (prune, abort,
//! rebuild's old tables): it first looks for objects outside the schemas
//! that depend on objects inside them (a user's view over a version's
//! table, a foreign key, a column of one of its types, a trigger calling
//! one of its functions) and refuses, listing them, unless the caller asked
//! to cascade. coord drops only what coord made. Never touches coord's own
//! tables.

use tokio_postgres::GenericClient;

use crate::names::quote_ident;
use crate::{Error, Result};

/// What a schema drop does when objects outside the schema depend on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dependents {
    /// Refuse, listing them, and change nothing (the default).
    #[default]
    Refuse,
    /// Drop them too (`DROP SCHEMA ... CASCADE`): the operator's explicit
    /// `--cascade`.
    Cascade,
}

impl Dependents {
    /// [`Dependents::Cascade`] when `cascade` (an operator's `--cascade`),
    /// else [`Dependents::Refuse`].
    pub fn cascade_if(cascade: bool) -> Self {
        if cascade {
            Self::Cascade
        } else {
            Self::Refuse
        }
    }
}

/// Locks the relations of the schemas so that no new dependent (a view over
/// one of their tables) can appear between the check and the drop.
const LOCK_RELATIONS: &str = "SELECT format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', \
    string_agg(c.oid::regclass::text, ', ')) \
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
    HAVING count(*) > 0";

/// Objects outside the schemas `$1` that depend (normally or
/// automatically) on objects inside them. Rules, column defaults, triggers
/// and policies are reported as the relation they belong to; a dependent of
/// a kind whose schema cannot be told counts as outside (fail closed).
const OUTSIDE_DEPENDENTS: &str = "
WITH doomed AS (
    SELECT oid FROM pg_namespace WHERE nspname = ANY($1)
), inside AS (
    SELECT 'pg_class'::regclass AS classid, oid FROM pg_class
        WHERE relnamespace IN (SELECT oid FROM doomed)
    UNION ALL SELECT 'pg_type'::regclass, oid FROM pg_type
        WHERE typnamespace IN (SELECT oid FROM doomed)
    UNION ALL SELECT 'pg_proc'::regclass, oid FROM pg_proc
        WHERE pronamespace IN (SELECT oid FROM doomed)
    UNION ALL SELECT 'pg_namespace'::regclass, oid FROM doomed
), dependents AS (
    SELECT DISTINCT d.classid, d.objid, d.objsubid,
        CASE d.classid
            WHEN 'pg_rewrite'::regclass THEN (SELECT ev_class FROM pg_rewrite WHERE oid = d.objid)
            WHEN 'pg_attrdef'::regclass THEN (SELECT adrelid FROM pg_attrdef WHERE oid = d.objid)
            WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = d.objid)
            WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = d.objid)
        END AS relid
    FROM pg_depend d JOIN inside i ON d.refclassid = i.classid AND d.refobjid = i.oid
    WHERE d.deptype IN ('n', 'a')
), placed AS (
    SELECT (SELECT o.type || ' ' || o.identity FROM pg_identify_object(
            CASE WHEN relid IS NOT NULL THEN 'pg_class'::regclass ELSE classid END,
            coalesce(relid, objid),
            CASE WHEN relid IS NOT NULL THEN 0 ELSE objsubid END) AS o) AS what,
        CASE
            WHEN relid IS NOT NULL THEN (SELECT relnamespace FROM pg_class WHERE oid = relid)
            WHEN classid = 'pg_class'::regclass THEN (SELECT relnamespace FROM pg_class WHERE oid = objid)
            WHEN classid = 'pg_type'::regclass THEN (SELECT typnamespace FROM pg_type WHERE oid = objid)
            WHEN classid = 'pg_proc'::regclass THEN (SELECT pronamespace FROM pg_proc WHERE oid = objid)
            WHEN classid = 'pg_constraint'::regclass THEN (SELECT connamespace FROM pg_constraint WHERE oid = objid)
            WHEN classid = 'pg_statistic_ext'::regclass THEN (SELECT stxnamespace FROM pg_statistic_ext WHERE oid = objid)
        END AS namespace
    FROM dependents
)
SELECT DISTINCT what FROM placed
WHERE namespace IS NULL OR namespace NOT IN (SELECT oid FROM doomed)
ORDER BY what";

/// The objects outside `schemas` that depend on objects inside them, as
/// PostgreSQL identifies them, schema-qualified (`view public.report`).
///
/// # Errors
/// Database errors.
pub async fn outside_dependents(
    client: &impl GenericClient,
    schemas: &[&str],
) -> Result<Vec<String>> {
    let rows = client.query(OUTSIDE_DEPENDENTS, &[&schemas]).await?;
    rows.iter()
        .map(|row| row.try_get::<_, String>(0).map_err(Error::from))
        .collect()
}

/// Fails with [`Error::Refused`] (exit code 2) listing the objects outside
/// `schemas` that depend on them, unless `dependents` is
/// [`Dependents::Cascade`]. `what` says what the drop is for, in the message.
///
/// # Errors
/// [`Error::Refused`]; database errors.
pub async fn ensure_droppable(
    client: &impl GenericClient,
    schemas: &[&str],
    dependents: Dependents,
    what: &str,
) -> Result<()> {
    if dependents == Dependents::Cascade || schemas.is_empty() {
        return Ok(());
    }
    let found = outside_dependents(client, schemas).await?;
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "{what} would drop schema {} but objects outside it depend on it: {}; \
         drop or change them first, or pass --cascade to drop them too",
        schemas.join(", "),
        found.join(", ")
    )))
}

/// Drops `schemas` inside the caller's transaction: locks their relations,
/// checks for dependents outside them ([`ensure_droppable`]), then drops
/// them with everything in them. Missing schemas are skipped.
///
/// # Errors
/// [`Error::Refused`] listing the dependents (nothing is dropped); database
/// errors (a lock timeout the caller set included).
pub(crate) async fn drop_schemas(
    client: &impl GenericClient,
    schemas: &[&str],
    dependents: Dependents,
    what: &str,
) -> Result<()> {
    if schemas.is_empty() {
        return Ok(());
    }
    if let Some(row) = client.query_opt(LOCK_RELATIONS, &[&schemas]).await? {
        let lock: String = row.try_get(0)?;
        client.batch_execute(&lock).await?;
    }
    ensure_droppable(client, schemas, dependents, what).await?;
    let list: Vec<String> = schemas.iter().map(|s| quote_ident(s)).collect();
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            list.join(", ")
        ))
        .await?;
    Ok(())
}
