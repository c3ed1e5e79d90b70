//! Coord's SQLSTATEs (`CO001`..`CO006`, raised by the gate and
//! `coord.publish`) back into typed errors.

use super::Error;

impl From<tokio_postgres::Error> for Error {
    /// Turns coord's SQLSTATEs `CO001`..`CO006` into typed errors; every
    /// other database error stays [`Error::Db`].
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            return Error::Db(e);
        };
        let code = db.code().code();
        if !code.starts_with("CO") {
            return Error::Db(e);
        }
        let detail: serde_json::Value = db
            .detail()
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_default();
        let field = |key: &str| {
            detail
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        let number = |key: &str| detail.get(key).and_then(|v| v.as_i64()).unwrap_or(-1);
        match code {
            "CO001" => Error::NewerProjectorIsActive {
                projector: field("projector"),
                running: field("running"),
                active: field("active"),
            },
            "CO002" => Error::ProjectorNotYetActive {
                projector: field("projector"),
                running: field("running"),
                active: field("active"),
            },
            "CO003" => Error::ProjectorIsActivating {
                projector: field("projector"),
                running: field("running"),
                activating: field("activating"),
            },
            "CO004" => Error::UnknownProjectorActive {
                projector: field("projector"),
                active: field("active"),
            },
            "CO005" => Error::ProjectorDefinitionMismatch {
                projector: field("projector"),
                running: field("running"),
                fingerprint: field("fingerprint"),
                active_fingerprint: field("active_fingerprint"),
            },
            "CO006" => Error::StreamVersionConflict {
                stream: field("stream"),
                expected: number("expected"),
                actual: number("actual"),
            },
            _ => Error::Db(e),
        }
    }
}
