//! `coord plan`: what `activate-current-config` would do for each projector,
//! read from the database without writing anything.

use std::collections::BTreeSet;

use semver::Version;
use tokio_postgres::GenericClient;

use crate::names::RelationName;
use crate::projector::{ProjectorExt, ProjectorSet};
use crate::store::versions::{self, VersionRecord, VersionStatus};
use crate::store::{self, history, states};
use crate::Result;

/// What will happen to one projector.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// The configured version is active: nothing to do but catch up the
    /// events that bypassed its publishers (`events_to_process`), if any.
    NoChange,
    /// No version is active yet: replay from the start and activate.
    Bootstrap,
    /// Replay the configured version beside the active one, then activate it.
    Replay {
        /// The active version.
        from: String,
    },
    /// A replay of the configured version is in progress: resume it, then activate.
    ResumeReplay,
    /// An activation of the configured version was interrupted: finish it.
    ResumeActivation,
    /// The configured version was active before and its schema is kept:
    /// catch it up and re-activate it, without a replay from the start
    /// (a rollback, or a roll-forward after one).
    Reactivate {
        /// The active version.
        from: Option<String>,
    },
    /// The projector is active but no longer configured: retire it.
    Retire {
        /// Its active version.
        version: String,
    },
    /// Cannot proceed; the reason says why and what to do.
    Refuse {
        /// Why.
        reason: String,
    },
}

impl Action {
    /// Whether this step builds a version from the start of the event store.
    pub fn needs_replay(&self) -> bool {
        matches!(
            self,
            Action::Bootstrap | Action::Replay { .. } | Action::ResumeReplay
        )
    }
}

/// One projector's step.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// Projector name.
    pub projector: String,
    /// The configured version (`None` for a projector being retired).
    pub version: Option<String>,
    /// What will happen.
    #[serde(flatten)]
    pub action: Action,
    /// A replay of another version that will be abandoned first.
    pub abandons_replay_of: Option<String>,
    /// Handled events the step must still apply.
    pub events_to_process: i64,
}

/// The whole plan.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// One step per configured projector, then one per projector to retire.
    pub steps: Vec<Step>,
}

impl Plan {
    /// The refusals, one line each.
    pub fn refusals(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Refuse { reason } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether running it would change nothing: every version active and
    /// caught up.
    pub fn is_no_op(&self) -> bool {
        self.steps
            .iter()
            .all(|s| s.action == Action::NoChange && s.events_to_process == 0)
    }
}

/// Computes the plan. Reads only.
///
/// # Errors
/// [`crate::Error::Failed`] when the schema is not migrated; database errors.
pub async fn plan(
    client: &impl GenericClient,
    projectors: &ProjectorSet,
    event_store: &RelationName,
) -> Result<Plan> {
    store::ensure_migrated(client).await?;
    crate::event_relation::check_event_store(client, event_store).await?;
    let all_states = states::list(client).await?;
    let all_versions = versions::list(client).await?;
    let mut steps = Vec::new();
    for p in projectors.iter() {
        let name = p.name().as_str();
        let version = p.version().to_string();
        let state = all_states.iter().find(|s| s.name == name);
        let active = state.and_then(|s| s.active_version.clone());
        let activating = state.and_then(|s| s.activating_version.clone());
        let replaying = state.and_then(|s| s.replaying_version.clone());
        let record = all_versions
            .iter()
            .find(|v| v.name == name && v.version == version);
        let mut step = Step {
            projector: name.to_owned(),
            version: Some(version.clone()),
            action: Action::NoChange,
            abandons_replay_of: None,
            events_to_process: 0,
        };
        // A rollback (or re-activation) cut short leaves a retired version
        // replaying, possibly older than the active one: it is finished,
        // not refused as a downgrade.
        let reactivating = replaying.as_deref() == Some(version.as_str())
            && reactivation_in_progress(client, name, &version).await?;
        step.action = decide(
            p.fingerprint(),
            p.version(),
            record,
            Current {
                active: active.as_deref(),
                activating: activating.as_deref(),
                replaying: replaying.as_deref(),
                reactivating,
            },
            &p.label(),
        );
        if let Some(other) = replaying.as_deref().filter(|r| *r != version) {
            if !matches!(step.action, Action::NoChange | Action::Refuse { .. }) {
                step.abandons_replay_of = Some(other.to_owned());
            }
        }
        step.events_to_process = match &step.action {
            Action::Bootstrap | Action::Replay { .. } => {
                crate::event_store::count_handled(client, event_store, &p.event_types()).await?
            }
            // An unchanged active version still catches up what bypassed its
            // publishers (SQL inserts, imports).
            Action::NoChange
            | Action::ResumeReplay
            | Action::ResumeActivation
            | Action::Reactivate { .. } => {
                crate::event_store::pending(client, name, &version, &p.event_types(), event_store)
                    .await?
            }
            _ => 0,
        };
        steps.push(step);
    }
    let configured: BTreeSet<&str> = projectors.iter().map(|p| p.name().as_str()).collect();
    for state in &all_states {
        if configured.contains(state.name.as_str()) {
            continue;
        }
        if let Some(version) = state
            .active_version
            .clone()
            .or_else(|| state.activating_version.clone())
        {
            steps.push(Step {
                projector: state.name.clone(),
                version: None,
                action: Action::Retire { version },
                abandons_replay_of: state.replaying_version.clone(),
                events_to_process: 0,
            });
        }
    }
    Ok(Plan { steps })
}

/// A projector's versions in the database, as `decide` needs them.
#[derive(Clone, Copy)]
struct Current<'a> {
    active: Option<&'a str>,
    activating: Option<&'a str>,
    replaying: Option<&'a str>,
    /// The replaying version is the configured one, a retired version
    /// being re-activated (a rollback or re-activation that was
    /// interrupted).
    reactivating: bool,
}

fn decide(
    fingerprint: String,
    version: &Version,
    record: Option<&VersionRecord>,
    current: Current<'_>,
    label: &str,
) -> Action {
    let Current {
        active,
        activating,
        replaying,
        reactivating,
    } = current;
    let v = version.to_string();
    if let Some(record) = record {
        if record.fingerprint != fingerprint {
            return Action::Refuse {
                reason: format!(
                    "{label} was built from a different definition (fingerprint {} in the database, {} in this configuration): \
                     a changed projector needs a new version",
                    short(&record.fingerprint),
                    short(&fingerprint)
                ),
            };
        }
    }
    if activating == Some(v.as_str()) {
        return Action::ResumeActivation;
    }
    if let Some(other) = activating {
        return Action::Refuse {
            reason: format!(
                "{} is activating {other}, not {v}: run `coord activate-current-config` with the configuration of {other} to finish it, or `coord abort --projector {}`",
                record_name(label),
                record_name(label)
            ),
        };
    }
    if active == Some(v.as_str()) {
        return Action::NoChange;
    }
    if record.is_some_and(|r| r.status == VersionStatus::Retired) || reactivating {
        return Action::Reactivate {
            from: active.map(str::to_owned),
        };
    }
    if let Some(active) = active {
        match Version::parse(active) {
            Ok(current) if version < &current => {
                return Action::Refuse {
                    reason: format!(
                        "{label} is older than the active {active}: a downgrade needs the schema of a retired version \
                         (`coord rollback` re-activates the previous one); deploy a newer version instead"
                    ),
                }
            }
            _ => {}
        }
        if replaying == Some(v.as_str()) {
            return Action::ResumeReplay;
        }
        return Action::Replay {
            from: active.to_owned(),
        };
    }
    if replaying == Some(v.as_str()) {
        return Action::ResumeReplay;
    }
    Action::Bootstrap
}

/// Whether the replaying (or activating) `version` of `name` is a retired
/// version that a rollback (or re-activation) put back to replaying and
/// that was interrupted: its latest move to replaying, round trips through
/// activating aside, came from retired (the transition history says why it
/// is replaying).
pub(super) async fn reactivation_in_progress(
    client: &impl tokio_postgres::GenericClient,
    name: &str,
    version: &str,
) -> Result<bool> {
    let transitions = history::list(client, Some(name)).await?;
    let cause = transitions.iter().rev().find(|t| {
        t.version.as_deref() == Some(version)
            && t.to_status == VersionStatus::Replaying
            && !matches!(
                t.from_status,
                Some(VersionStatus::Activating | VersionStatus::Replaying)
            )
    });
    Ok(cause.is_some_and(|t| t.from_status == Some(VersionStatus::Retired)))
}

/// The projector name of a `name@version` label.
fn record_name(label: &str) -> &str {
    label.split_once('@').map_or(label, |(name, _)| name)
}

fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(12)]
}
