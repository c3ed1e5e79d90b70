//! Who owns a connection: its `application_name`, `{program}@{host} pid
//! {pid}`, and whether that process still runs (docs/decisions/0060-orphaned-work.md).

use std::sync::OnceLock;

/// The program and host [`application_name`] names.
static OWNER: OnceLock<(String, String)> = OnceLock::new();

/// Names the connections this process makes from now on as `program` (e.g.
/// `coord replay`, the command) on `host`; the first call wins. Without it
/// they are named `coord` on the kernel's host name.
#[cfg(feature = "cli")]
pub(crate) fn name_connections(program: &str, host: &str) {
    let _ = OWNER.set((program.to_owned(), host.to_owned()));
}

/// The `application_name` of this process's connections:
/// `{program}@{host} pid {pid}` ([`owner_name`]).
pub(crate) fn application_name() -> String {
    match OWNER.get() {
        Some((program, host)) => owner_name(program, host, std::process::id()),
        None => owner_name("coord", &local_host(), std::process::id()),
    }
}

/// The host name as the kernel has it (`gethostname`), without a dependency.
fn local_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The longest `application_name` PostgreSQL keeps (NAMEDATALEN - 1).
const NAME_MAX: usize = 63;

/// `{program}@{host} pid {pid}` in printable ASCII (what PostgreSQL keeps of
/// an `application_name`), at most 63 bytes: the host is shortened, never
/// the pid.
pub(crate) fn owner_name(program: &str, host: &str, pid: u32) -> String {
    let printable = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect()
    };
    let tail = format!(" pid {pid}");
    let mut head = format!(
        "{}@{}",
        printable(program),
        printable(host).replace(' ', "?")
    );
    head.truncate(NAME_MAX.saturating_sub(tail.len()));
    head + &tail
}

/// The program, host and process id an `application_name` made by
/// [`owner_name`] (for a program whose name starts with `coord`) names;
/// `None` for other names.
pub(crate) fn owner_of(application_name: &str) -> Option<(&str, &str, u32)> {
    let (head, pid) = application_name.rsplit_once(" pid ")?;
    let pid = pid.parse().ok()?;
    let (program, host) = head.rsplit_once('@')?;
    (program.starts_with("coord") && !host.is_empty()).then_some((program, host, pid))
}

/// Whether a connection named `application_name` belongs to a process of
/// this host that no longer runs: its work can only end. `false` when that
/// cannot be proven (another host, a name coord did not make, a system
/// without `/proc`, a live process with that id).
pub(crate) fn owner_is_gone(application_name: &str) -> bool {
    let Some((program, _, pid)) = owner_of(application_name) else {
        return false;
    };
    let mut hosts = vec![local_host()];
    hosts.extend(OWNER.get().map(|(_, host)| host.clone()));
    let same_host = hosts
        .iter()
        .any(|host| owner_name(program, host, pid) == application_name);
    same_host
        && pid != std::process::id()
        && std::path::Path::new("/proc/self").exists()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_names_fit_postgres_and_read_back() {
        let name = owner_name("coord replay", "db-1.example", 4242);
        assert_eq!(name, "coord replay@db-1.example pid 4242");
        assert_eq!(
            owner_of(&name),
            Some(("coord replay", "db-1.example", 4242))
        );
        let long = owner_name("coord activate-current-config", &"h".repeat(80), 4_000_000);
        assert_eq!(long.len(), NAME_MAX);
        assert!(long.ends_with(" pid 4000000"), "{long}");
        assert_eq!(owner_of(&long).map(|(_, _, pid)| pid), Some(4_000_000));
        assert_eq!(owner_of("psql"), None);
        assert_eq!(owner_of("app@host pid 12"), None);
        assert_eq!(
            owner_of(&owner_name("coord", "h\u{e9}", 1)),
            Some(("coord", "h?", 1))
        );
    }

    #[test]
    fn a_live_process_is_never_gone() {
        let me = owner_name("coord", &local_host(), std::process::id());
        assert!(!owner_is_gone(&me));
        let other_host = owner_name("coord", "no-such-host.invalid", u32::MAX);
        assert!(!owner_is_gone(&other_host));
        // A pid above the kernel's maximum never runs.
        let gone = owner_name("coord replay", &local_host(), u32::MAX);
        assert!(owner_is_gone(&gone));
    }
}
