//! Activation and the deploy-pipeline operations: `plan`,
//! `activate-current-config`, `rollback`, `prune`, `wait`. The only code that
//! changes which version of a projector is active.

mod abort;
mod critical;
mod lock;
mod maintenance;
mod marker;
mod plan;
mod rebuild;
mod run;
mod steps;
mod switch;

pub use abort::abort_projector;
pub use lock::{end_orphans, ActivationLock, ORPHAN_WAIT};
pub use maintenance::{prunable, prune, wait_until_active};
pub use plan::{plan, Action, Plan, Step};
pub use rebuild::rebuild;
pub use run::{
    activate_current_config, rollback, verify, ActivateOptions, ActivationReport, StepReport,
};
pub use switch::{activate_version, retire, SwitchReport};
