//! Every PostgreSQL advisory lock key coord takes, in one place: the class
//! ids (first key) of the two-key advisory locks. The SQL functions of the
//! migrations (`coord.gate`, `coord.publish`: V2, V4, V8) use the same
//! numbers; a test below reads those files and fails if they drift.
//!
//! Rust SQL is built at compile time with [`key!`], which expands to the
//! number as a string literal for `concat!`; the constants are the same
//! numbers as integers, for bound parameters and tests.

/// The class id named `$name` as a string literal, for `concat!` in SQL
/// constants: `concat!("SELECT pg_advisory_lock(", key!(migrate), ", 0)")`.
macro_rules! key {
    (gate_event_type) => {
        "1668247410"
    };
    (gate_publishers) => {
        "1668247411"
    };
    (migrate) => {
        "1668247412"
    };
    (activation) => {
        "1668247413"
    };
    (runner_leader) => {
        "1668247414"
    };
    (activating) => {
        "1668247415"
    };
}
pub(crate) use key;

/// `(GATE_EVENT_TYPE, hashtext(event_type))`: one per event type; publishers
/// of that type hold it shared, activation exclusive.
pub const GATE_EVENT_TYPE: i32 = 1_668_247_410;
/// `(GATE_PUBLISHERS, 1)`: publishers that did not name their event types;
/// `(GATE_PUBLISHERS, 0)`: every publisher (taken last, shared), held
/// exclusive only for the flip of `active_version`.
pub const GATE_PUBLISHERS: i32 = 1_668_247_411;
/// `(MIGRATE, 0)`: session lock held while migrating.
pub const MIGRATE: i32 = 1_668_247_412;
/// `(ACTIVATION, 0)`: session lock of a running activation, rollback or
/// rebuild; `(ACTIVATION, 1)` and `(ACTIVATION, 2)` fence it
/// (docs/decisions/0033-activation-fencing.md).
pub const ACTIVATION: i32 = 1_668_247_413;
/// `(RUNNER_LEADER, hashtext(name))`: the leader of `coord run` for a projector.
pub const RUNNER_LEADER: i32 = 1_668_247_414;
/// `(ACTIVATING, hashtext(name))`: session lock held exclusive by an
/// activation of projector `name` from before it marks the version
/// activating until the version is active or back to replaying; publishers
/// refused with `ProjectorIsActivating` wait on it shared
/// (docs/decisions/0067-publishers-wait-out-the-whole-activation.md).
pub const ACTIVATING: i32 = 1_668_247_415;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_macro_and_the_constants_agree() {
        for (text, number) in [
            (key!(gate_event_type), GATE_EVENT_TYPE),
            (key!(gate_publishers), GATE_PUBLISHERS),
            (key!(migrate), MIGRATE),
            (key!(activation), ACTIVATION),
            (key!(runner_leader), RUNNER_LEADER),
            (key!(activating), ACTIVATING),
        ] {
            assert_eq!(text.parse::<i32>().unwrap(), number);
        }
    }

    /// Every advisory lock call in the migrations' SQL uses a class id
    /// defined here, and the gate's keys are the ones the Rust side takes.
    #[test]
    fn the_migrations_use_the_same_keys() {
        let known = [
            GATE_EVENT_TYPE,
            GATE_PUBLISHERS,
            MIGRATE,
            ACTIVATION,
            RUNNER_LEADER,
        ];
        for (file, sql) in [
            ("V2", include_str!("../migrations/V2__publisher_gate.sql")),
            (
                "V4",
                include_str!("../migrations/V4__exact_inline_checkpoints.sql"),
            ),
            (
                "V8",
                include_str!("../migrations/V8__gate_refuses_during_critical_section.sql"),
            ),
        ] {
            // Comments name the keys in words; only the code counts.
            let sql: String = sql
                .lines()
                .map(|line| line.split("--").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            let mut used = Vec::new();
            for (at, _) in sql.match_indices("advisory_xact_lock") {
                let rest = &sql[at..];
                let open = rest.find('(').unwrap() + 1;
                let comma = open + rest[open..].find(',').unwrap();
                let id: i32 = rest[open..comma].trim().parse().unwrap_or_else(|e| {
                    panic!(
                        "{file}: lock key {:?} is not a number: {e}",
                        &rest[open..comma]
                    )
                });
                assert!(
                    known.contains(&id),
                    "{file} takes advisory lock class {id}, which src/locks.rs does not define"
                );
                used.push(id);
            }
            for id in [GATE_EVENT_TYPE, GATE_PUBLISHERS] {
                assert!(
                    used.contains(&id),
                    "{file}'s gate does not take lock class {id}: the gate and activation disagree"
                );
            }
        }
    }
}
