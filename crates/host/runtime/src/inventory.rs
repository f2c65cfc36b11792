//! The sandboxes on this host, as their state directories record them, and
//! the removal of orphans (`kabuto sandbox list` / `kabuto sandbox remove`).
//!
//! A sandbox is owned by the shim that created it: the shim holds the
//! sandbox's claim (a lock) for as long as it runs and records its pid and
//! containerd's address in the sandbox directory. A sandbox is an orphan when
//! no process holds its claim (the shim died and nobody ran its cleanup), or
//! when its shim lost its containerd: a shim keeps its pods running when
//! containerd goes away (containerd may come back, as with runc's shim), so
//! such pods are removed here, not by the shim itself.

use std::{
    fs, io,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::{config::Config, sandbox};

/// In each sandbox directory, written by its shim: see [`Owner`].
const OWNER_FILE: &str = "owner";
/// The shim's program name, checked before a recorded pid is signalled (a
/// recycled pid is never hit).
const SHIM_PROGRAM: &str = "containerd-shim-kabuto-v2";
/// How long a shim gets to tear its sandbox down after SIGTERM.
const SHIM_TERM_GRACE: Duration = Duration::from_secs(20);

/// Who runs a sandbox: the shim's pid and the containerd it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// The process's start time (clock ticks since boot, /proc/PID/stat
    /// field 22): with the pid, names one process, never a reused pid.
    pub start_time: u64,
    /// containerd's API socket (the shim's `-address`).
    pub containerd_address: String,
}

/// Start time of process `pid` (field 22 of /proc/PID/stat).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Owner {
    /// Records the owner in sandbox directory `dir`.
    pub fn record(&self, dir: &Path) -> io::Result<()> {
        fs::write(
            dir.join(OWNER_FILE),
            format!(
                "pid {}\nstart_time {}\ncontainerd {}\n",
                self.pid, self.start_time, self.containerd_address
            ),
        )
    }

    fn read(dir: &Path) -> Option<Owner> {
        let text = fs::read_to_string(dir.join(OWNER_FILE)).ok()?;
        let mut pid = None;
        let mut start_time = None;
        let mut containerd_address = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("start_time", v)) => start_time = v.trim().parse().ok(),
                Some(("containerd", v)) => containerd_address = Some(v.trim().to_string()),
                _ => {}
            }
        }
        Some(Owner {
            pid: pid?,
            start_time: start_time?,
            containerd_address: containerd_address?,
        })
    }

    /// Whether the recorded process still runs and is a kabuto shim (same
    /// pid and start time: a reused pid is another process).
    fn shim_alive(&self) -> bool {
        if process_start_time(self.pid) != Some(self.start_time) {
            return false;
        }
        let cmdline = fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        cmdline
            .split(|&b| b == 0)
            .next()
            .is_some_and(|argv0| String::from_utf8_lossy(argv0).ends_with(SHIM_PROGRAM))
    }
}

/// Whether containerd answers on `address` (`unix://` prefix allowed).
fn containerd_reachable(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    match UnixStream::connect(path) {
        Ok(_) => true,
        // Refused or missing: nobody serves there any more. Anything else
        // (say, permissions) is no proof that containerd is gone.
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ),
    }
}

/// How long containerd must stay unreachable before its pods count as
/// orphans to remove: a `systemctl restart containerd` is not "gone".
const CONTAINERD_GONE_GRACE: Duration = Duration::from_secs(5);

/// Whether containerd answers on `address` again within the grace period.
fn containerd_returns(address: &str) -> bool {
    let deadline = Instant::now() + CONTAINERD_GONE_GRACE;
    while Instant::now() < deadline {
        if containerd_reachable(address) {
            return true;
        }
        thread::sleep(Duration::from_millis(250));
    }
    false
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxState {
    /// Its shim runs and its containerd answers: remove it through containerd.
    Running,
    /// No process holds its claim: what is left is stale.
    NoShim,
    /// Its shim runs, but the containerd it serves does not answer.
    ContainerdGone { address: String },
}

impl SandboxState {
    pub fn is_orphan(&self) -> bool {
        *self != SandboxState::Running
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SandboxState::Running => write!(f, "running"),
            SandboxState::NoShim => write!(f, "orphaned: no shim"),
            SandboxState::ContainerdGone { address } => {
                write!(f, "orphaned: containerd gone ({address})")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct SandboxEntry {
    pub namespace: String,
    pub id: String,
    pub dir: PathBuf,
    pub owner: Option<Owner>,
    /// QEMU's pid while it runs.
    pub vm_pid: Option<u32>,
    pub state: SandboxState,
}

#[derive(Debug, Error)]
pub enum InventoryError {
    #[error("no sandbox {id}{}", namespace.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_default())]
    NotFound {
        id: String,
        namespace: Option<String>,
    },
    #[error("sandbox {id} exists in namespaces {}: name one with --namespace", namespaces.join(", "))]
    Ambiguous { id: String, namespaces: Vec<String> },
    #[error(
        "sandbox {namespace}/{id} is running under containerd ({address}): remove it through containerd \
         (ctr task kill/delete, or the pod's CRI removal), or pass --force to tear it down anyway"
    )]
    StillManaged {
        namespace: String,
        id: String,
        address: String,
    },
    #[error(
        "sandbox {namespace}/{id}: a process holds its claim but recorded no owner \
         (a shim older than this kabuto?): stop that shim first"
    )]
    UnknownOwner { namespace: String, id: String },
    #[error("sandbox {namespace}/{id}")]
    Removal {
        namespace: String,
        id: String,
        #[source]
        reason: RemovalError,
    },
}

/// Why a sandbox's shim or state could not be removed.
#[derive(Debug, Error)]
pub enum RemovalError {
    #[error("the claim is held, but pid {0} is not a {SHIM_PROGRAM}")]
    NotAShim(u32),
    #[error("shim {0} still holds the sandbox after SIGKILL")]
    Survived(u32),
    #[error(transparent)]
    Sandbox(Box<sandbox::BootError>),
}

/// Every sandbox with a state directory, sorted by namespace and id.
pub fn list(config: &Config) -> Vec<SandboxEntry> {
    let Ok(entries) = fs::read_dir(sandbox::sandboxes_dir(config)) else {
        return Vec::new();
    };
    let mut found: Vec<SandboxEntry> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let text = fs::read_to_string(dir.join(sandbox::SANDBOX_NAME_FILE)).ok()?;
            let (namespace, id) = text.split_once('\n')?;
            Some(entry(config, namespace, id.trim_end(), dir))
        })
        .collect();
    found.sort_by(|a, b| (&a.namespace, &a.id).cmp(&(&b.namespace, &b.id)));
    found
}

fn entry(config: &Config, namespace: &str, id: &str, dir: PathBuf) -> SandboxEntry {
    let owner = Owner::read(&dir);
    let state = if !sandbox::claim_is_held(config, namespace, id) {
        SandboxState::NoShim
    } else {
        match &owner {
            Some(o) if !containerd_reachable(&o.containerd_address) => {
                SandboxState::ContainerdGone {
                    address: o.containerd_address.clone(),
                }
            }
            _ => SandboxState::Running,
        }
    };
    let vm_pid = fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    SandboxEntry {
        namespace: namespace.to_string(),
        id: id.to_string(),
        dir,
        owner,
        vm_pid,
        state,
    }
}

/// The sandbox `id` (in `namespace`, or the only namespace that has one).
pub fn find(
    config: &Config,
    namespace: Option<&str>,
    id: &str,
) -> Result<SandboxEntry, InventoryError> {
    let matching: Vec<SandboxEntry> = list(config)
        .into_iter()
        .filter(|e| e.id == id && namespace.is_none_or(|n| e.namespace == n))
        .collect();
    match <[SandboxEntry; 1]>::try_from(matching) {
        Ok([one]) => Ok(one),
        Err(many) if many.is_empty() => Err(InventoryError::NotFound {
            id: id.to_string(),
            namespace: namespace.map(str::to_string),
        }),
        Err(many) => Err(InventoryError::Ambiguous {
            id: id.to_string(),
            namespaces: many.into_iter().map(|e| e.namespace).collect(),
        }),
    }
}

/// Removes a sandbox completely: its shim (SIGTERM, which tears the sandbox
/// down; SIGKILL if it does not end in time), QEMU, the helpers, mounts and
/// the state directory. A sandbox still managed by a live containerd is
/// refused unless `force`.
pub fn remove(config: &Config, entry: &SandboxEntry, force: bool) -> Result<(), InventoryError> {
    let removal = |reason: RemovalError| InventoryError::Removal {
        namespace: entry.namespace.clone(),
        id: entry.id.clone(),
        reason,
    };
    match (&entry.state, &entry.owner) {
        (SandboxState::NoShim, _) => {}
        (SandboxState::Running, owner) if !force => {
            return Err(InventoryError::StillManaged {
                namespace: entry.namespace.clone(),
                id: entry.id.clone(),
                address: owner
                    .as_ref()
                    .map(|o| o.containerd_address.clone())
                    .unwrap_or_else(|| "unknown".into()),
            })
        }
        (_, None) => {
            return Err(InventoryError::UnknownOwner {
                namespace: entry.namespace.clone(),
                id: entry.id.clone(),
            })
        }
        (SandboxState::ContainerdGone { address }, Some(_))
            if !force && containerd_returns(address) =>
        {
            return Err(InventoryError::StillManaged {
                namespace: entry.namespace.clone(),
                id: entry.id.clone(),
                address: address.clone(),
            })
        }
        (_, Some(owner)) => stop_shim(config, entry, owner).map_err(removal)?,
    }
    sandbox::remove_stale_sandbox(config, &entry.namespace, &entry.id)
        .map_err(|e| removal(RemovalError::Sandbox(Box::new(e))))
}

/// SIGTERM to the owner (it tears the sandbox down and exits), SIGKILL when
/// it is still there after [`SHIM_TERM_GRACE`]; returns once the claim is free.
fn stop_shim(config: &Config, entry: &SandboxEntry, owner: &Owner) -> Result<(), RemovalError> {
    use nix::sys::signal::{kill, Signal};
    let claim_free = |within: Duration| {
        let deadline = Instant::now() + within;
        loop {
            if !sandbox::claim_is_held(config, &entry.namespace, &entry.id) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    };
    if !owner.shim_alive() {
        // Another process holds the claim under a pid we cannot verify.
        return if claim_free(Duration::from_secs(1)) {
            Ok(())
        } else {
            Err(RemovalError::NotAShim(owner.pid))
        };
    }
    let pid = nix::unistd::Pid::from_raw(owner.pid as i32);
    log::info!(
        "sandbox {}/{}: SIGTERM to shim {}",
        entry.namespace,
        entry.id,
        owner.pid
    );
    let _ = kill(pid, Signal::SIGTERM);
    if claim_free(SHIM_TERM_GRACE) {
        return Ok(());
    }
    log::warn!(
        "sandbox {}/{}: shim {} did not end within {SHIM_TERM_GRACE:?}: SIGKILL",
        entry.namespace,
        entry.id,
        owner.pid
    );
    if owner.shim_alive() {
        let _ = kill(pid, Signal::SIGKILL);
    }
    if claim_free(Duration::from_secs(5)) {
        Ok(())
    } else {
        Err(RemovalError::Survived(owner.pid))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn owner_record_round_trips_and_rejects_partial_records() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Owner {
            pid: 4242,
            start_time: 77,
            containerd_address: "/run/containerd/containerd.sock".into(),
        };
        owner.record(dir.path()).unwrap();
        assert_eq!(Owner::read(dir.path()), Some(owner));
        fs::write(dir.path().join(OWNER_FILE), "pid 12\ncontainerd /s\n").unwrap();
        assert_eq!(Owner::read(dir.path()), None);
        fs::write(
            dir.path().join(OWNER_FILE),
            "pid x\nstart_time 1\ncontainerd /s\n",
        )
        .unwrap();
        assert_eq!(Owner::read(dir.path()), None);
    }

    #[test]
    fn containerd_is_gone_when_nobody_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("containerd.sock");
        assert!(!containerd_reachable(&path.display().to_string()));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(containerd_reachable(&format!("unix://{}", path.display())));
        drop(listener);
        // The socket file stays, but nobody accepts: refused.
        assert!(!containerd_reachable(&path.display().to_string()));
    }

    #[test]
    fn a_recorded_pid_that_is_not_a_shim_is_not_alive() {
        let me = Owner {
            pid: std::process::id(),
            start_time: process_start_time(std::process::id()).unwrap(),
            containerd_address: String::new(),
        };
        assert!(!me.shim_alive(), "the test binary is not {SHIM_PROGRAM}");
        // A live process's start time is found and stable.
        assert_eq!(process_start_time(std::process::id()), Some(me.start_time));
        assert_eq!(process_start_time(u32::MAX), None);
    }
}
