//! Marking a version as having applied every handled event visible in a
//! snapshot, for versions whose events were applied some other way (see
//! [`crate::store::checkpoint::mark_through_snapshot`], which clears the
//! version's `applied_ahead` rows first and calls this).

use tokio_postgres::GenericClient;

use crate::names::RelationName;
use crate::Result;

const MARK_AHEAD: &str = "INSERT INTO coord.applied_ahead (name, version, position, xact_id) \
    SELECT $1, $2, e.position, e.xact_id FROM {events} e \
    WHERE e.xact_id >= pg_snapshot_xmin($3::text::pg_snapshot) \
    AND pg_visible_in_snapshot(e.xact_id, $3::text::pg_snapshot) AND e.event_type = ANY($4)";

const MARK_THROUGH: &str = "UPDATE coord.projector_versions SET \
    horizon = pg_snapshot_xmin($3::text::pg_snapshot), pass_snapshot = NULL, pass_cursor = NULL, \
    last_position = greatest(last_position, coalesce((SELECT e.position FROM {events} e \
      WHERE e.event_type = ANY($4) AND pg_visible_in_snapshot(e.xact_id, $3::text::pg_snapshot) \
      ORDER BY e.position DESC LIMIT 1), 0)), \
    updated_at = now() WHERE name = $1 AND version = $2";

/// Records the handled events visible in `snapshot` at or above its xmin in
/// `coord.applied_ahead`, then moves the horizon of `name@version` to that
/// xmin (no pass in progress, `last_position` the last visible handled
/// event). Returns the number of versions updated (0: not registered).
///
/// # Errors
/// Database errors.
pub async fn mark_visible(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    event_types: &[String],
    event_store: &RelationName,
    snapshot: &str,
) -> Result<u64> {
    let events = event_store.quoted();
    client
        .execute(
            &MARK_AHEAD.replace("{events}", &events),
            &[&name, &version, &snapshot, &event_types],
        )
        .await?;
    Ok(client
        .execute(
            &MARK_THROUGH.replace("{events}", &events),
            &[&name, &version, &snapshot, &event_types],
        )
        .await?)
}
