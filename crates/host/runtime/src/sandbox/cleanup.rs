//! Removing what a crashed shim left of a sandbox: its processes (only
//! those naming its directory), mounts and state, with its claim.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use super::error::BootError;
use super::naming::{sandbox_dir, Claim};
use crate::config::Config;
use crate::mount;

/// Removes what a crashed shim left of sandbox `id` of `namespace`, with its
/// claim; does nothing while the sandbox's owner is alive (it holds the
/// claim).
pub fn cleanup_stale_sandbox(config: &Config, namespace: &str, id: &str) {
    if let Err(e) = remove_stale_sandbox(config, namespace, id) {
        log::warn!("not cleaning up sandbox {id}: {e}");
    }
}

/// [`cleanup_stale_sandbox`], with the reason when the sandbox's owner is
/// still alive (it holds the claim) or the directory stays.
pub(crate) fn remove_stale_sandbox(
    config: &Config,
    namespace: &str,
    id: &str,
) -> Result<(), BootError> {
    let claim = Claim::take(config, namespace, id)?;
    let dir = sandbox_dir(config, namespace, id);
    cleanup_stale(&dir);
    claim.release();
    if dir.exists() {
        return Err(BootError::NotRemoved { dir });
    }
    Ok(())
}

/// Removes what a crashed shim left of a sandbox: kills its processes (only
/// those whose command line names this directory, so a recycled pid is never
/// hit), unmounts, and deletes the directory. Safe on a missing directory.
pub fn cleanup_stale(dir: &Path) {
    let mut pids = Vec::new();
    for file in ["qemu.pid", "helpers.pid"] {
        if let Ok(text) = fs::read_to_string(dir.join(file)) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    // With the separator: `…/ns+pod/` is not a prefix of `…/ns+pod-2/`.
    let needle = format!("{}/", dir.display());
    for pid in pids {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Reap it if it was ours; otherwise wait until it is gone.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    undo_network(dir);
    remove_dir(dir);
}

/// The state file naming the pod namespace's joined interfaces.
const NETWORK_RECORD: &str = "network.json";

/// Records what [`cleanup_stale`] must undo in the pod's namespace.
pub(super) fn write_network_record(
    dir: &Path,
    record: &crate::network::JoinedRecord,
) -> Result<(), BootError> {
    let path = dir.join(NETWORK_RECORD);
    let text = serde_json::to_vec(record).unwrap_or_default();
    fs::write(&path, text).map_err(|source| BootError::Io { path, source })
}

/// Removes the tap redirects a dead shim left on the pod namespace's
/// interfaces (its QEMU, killed above, took the taps).
fn undo_network(dir: &Path) {
    let Ok(text) = fs::read(dir.join(NETWORK_RECORD)) else {
        return;
    };
    let Ok(record) = serde_json::from_slice::<crate::network::JoinedRecord>(&text) else {
        log::warn!("{}: unreadable {NETWORK_RECORD}", dir.display());
        return;
    };
    match crate::network::unbridge_recorded(&record) {
        Ok(undone) if undone > 0 => log::info!(
            "{}: removed the tap redirects of {undone} interface(s) a dead shim left",
            record.netns.display()
        ),
        Ok(_) => {}
        // The namespace went with its pod (CNI's DEL, CRI): nothing left.
        Err(e) => log::debug!("{}: {}", record.netns.display(), kabuto_error::chain(&e)),
    }
}

/// Unmounts everything under `dir` and removes it (a missing one is fine).
pub(super) fn remove_dir(dir: &Path) {
    if let Err(e) = mount::unmount_all_under(dir) {
        log::warn!("{e}");
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_of_missing_dir_is_harmless() {
        cleanup_stale(Path::new("/nonexistent/kabuto/sandbox"));
    }
}
