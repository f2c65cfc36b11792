//! Where a sandbox lives on the host and who owns it: its state directory
//! (keyed by containerd namespace and id), the vsock address of its guest,
//! and the exclusive claim its owner holds.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use super::error::BootError;
use crate::agent_client::AgentAddress;
use crate::config::Config;

/// Where the host reaches `port` of a running sandbox's guest.
pub fn guest_address(config: &Config, namespace: &str, id: &str, port: u32) -> AgentAddress {
    let uds = sandbox_dir(config, namespace, id).join("agent.vsock");
    if uds.exists() {
        AgentAddress::HybridVsock { uds, port }
    } else {
        AgentAddress::Vsock {
            cid: guest_cid(namespace, id),
            port,
        }
    }
}

/// Directory holding a sandbox's sockets, logs and shared directory. Keyed
/// by containerd namespace and id: the same id in two namespaces is two
/// sandboxes.
pub fn sandbox_dir(config: &Config, namespace: &str, id: &str) -> PathBuf {
    sandboxes_dir(config).join(sandbox_dir_name(namespace, id))
}

pub(crate) fn sandboxes_dir(config: &Config) -> PathBuf {
    config.runtime.state_dir.join("sandboxes")
}

/// The namespaces' sandbox directories named `id`: for `kabuto exec`, which
/// is given a pod id alone.
pub fn sandbox_namespaces(config: &Config, id: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(sandboxes_dir(config)) else {
        return Vec::new();
    };
    // Each directory records its namespace and id (long names are hashed).
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let text = fs::read_to_string(e.path().join(SANDBOX_NAME_FILE)).ok()?;
            let (namespace, dir_id) = text.split_once('\n')?;
            (dir_id.trim_end() == id).then(|| namespace.to_string())
        })
        .collect();
    found.sort();
    found
}

/// In each sandbox directory: `<namespace>\n<id>\n`.
pub(crate) const SANDBOX_NAME_FILE: &str = "sandbox";

/// Longest `<namespace>+<id>` used as a directory name unchanged.
const MAX_DIR_NAME: usize = 40;
/// Neither containerd namespaces nor ids may contain it.
const NAMESPACE_SEPARATOR: char = '+';

/// `<namespace>+<id>`, or for longer names (CRI ids are 64 hex digits) a
/// prefix plus a digest of both: Unix socket paths in the directory must
/// stay under the kernel's 108 bytes even below a long `state_dir`.
pub(super) fn sandbox_dir_name(namespace: &str, id: &str) -> String {
    let name = format!("{namespace}{NAMESPACE_SEPARATOR}{id}");
    if name.len() <= MAX_DIR_NAME {
        return name;
    }
    let digest = hex::encode(sandbox_key_digest(namespace, id));
    let prefix: String = name.chars().take(15).collect();
    format!("{prefix}-{}", &digest[..16])
}

/// SHA-256 of a sandbox's namespace and id (NUL-separated: neither holds one).
fn sandbox_key_digest(namespace: &str, id: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(namespace.as_bytes());
    hasher.update([0]);
    hasher.update(id.as_bytes());
    hasher.finalize().into()
}

/// containerd's identifier rule (namespaces and ids): alphanumeric words
/// joined by single `.`, `_` or `-`; at most 76 characters.
pub(super) fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 76
        && name
            .split(['.', '_', '-'])
            .all(|word| !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// An exclusive claim on a sandbox's namespace and id, held (flock) by the
/// process that owns the sandbox: a second create of the same pod is
/// refused instead of tearing down the running one, and a claim whose owner
/// died is free again (its state is stale).
pub(super) struct Claim {
    file: fs::File,
    path: PathBuf,
}

impl Claim {
    pub(super) fn take(config: &Config, namespace: &str, id: &str) -> Result<Claim, BootError> {
        let dir = sandboxes_dir(config);
        fs::create_dir_all(&dir).map_err(BootError::io(&dir))?;
        let path = dir.join(format!("{}.lock", sandbox_dir_name(namespace, id)));
        // A claim released meanwhile unlinks the file we may have opened:
        // the lock only counts if it is on the file still at the path.
        for _ in 0..8 {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(BootError::io(&path))?;
            use std::os::fd::AsRawFd as _;
            use std::os::unix::fs::MetadataExt as _;
            // `kabuto sandbox list` probes claims by locking them for a
            // moment: a few short retries tell that from a live owner.
            let mut rc = -1;
            for attempt in 0..5 {
                if attempt > 0 {
                    thread::sleep(Duration::from_millis(20));
                }
                // SAFETY: flock on a file descriptor we own.
                rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if rc == 0
                    || std::io::Error::last_os_error().raw_os_error() != Some(libc::EWOULDBLOCK)
                {
                    break;
                }
            }
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    BootError::Claimed {
                        namespace: namespace.to_string(),
                        id: id.to_string(),
                        lock: path,
                    }
                } else {
                    BootError::io(path)(e)
                });
            }
            let held = file.metadata().map(|m| m.ino()).ok();
            let current = fs::metadata(&path).map(|m| m.ino()).ok();
            if held.is_some() && held == current {
                return Ok(Claim { file, path });
            }
        }
        Err(BootError::ClaimUnstable {
            namespace: namespace.to_string(),
            id: id.to_string(),
            lock: path,
        })
    }

    /// Gives the claim up after the sandbox is gone.
    pub(super) fn release(self) {
        // Unlinked while still held: a concurrent claimer either failed on
        // the lock already or opens a new file.
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Whether a live process holds the claim on `namespace`/`id`, without
/// taking it (a lock on our own open of the file, dropped at once).
pub(crate) fn claim_is_held(config: &Config, namespace: &str, id: &str) -> bool {
    let path = sandboxes_dir(config).join(format!("{}.lock", sandbox_dir_name(namespace, id)));
    let Ok(file) = fs::File::open(&path) else {
        return false;
    };
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a file descriptor we own; closing it unlocks.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// A context id for kernel vhost-vsock, derived from the sandbox's
/// namespace and id so that concurrent sandboxes rarely collide (QEMU
/// refuses a CID in use).
pub fn guest_cid(namespace: &str, id: &str) -> u32 {
    let d = sandbox_key_digest(namespace, id);
    let n = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    3 + n % (u32::MAX / 2)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn guest_cids_are_valid_and_stable() {
        for id in ["a", "pod-1", "0123456789abcdef"] {
            let cid = guest_cid("default", id);
            assert!(cid >= 3, "CIDs 0-2 are reserved");
            assert_eq!(cid, guest_cid("default", id));
        }
        assert_ne!(guest_cid("default", "a"), guest_cid("default", "b"));
        assert_ne!(guest_cid("default", "a"), guest_cid("k8s.io", "a"));
    }

    #[test]
    fn long_sandbox_ids_get_short_distinct_directories() {
        let mut config = Config::default();
        // As long as the e2e tests' state directories.
        config.runtime.state_dir = PathBuf::from("/tmp/kabuto-e2e-AbCdEf/kabuto");
        assert!(sandbox_dir(&config, "default", "pod-1").ends_with("sandboxes/default+pod-1"));
        let cri = "562fe45dc616ef0b7ddde3f278e0d31079e099f12546d29b9e77f7df2788652f";
        let other = "562fe45dc616ef0b7ddde3f278e0d31079e099f12546d29b9e77f7df2788652e";
        let dir = sandbox_dir(&config, "k8s.io", cri);
        assert_eq!(dir, sandbox_dir(&config, "k8s.io", cri), "stable");
        assert_ne!(dir, sandbox_dir(&config, "k8s.io", other));
        assert_ne!(dir, sandbox_dir(&config, "other", cri));
        assert!(dir.to_string_lossy().contains("/k8s.io+562fe45d-"));
        let longest_ns = "n".repeat(76);
        for dir in [dir, sandbox_dir(&config, &longest_ns, cri)] {
            let socket = dir.join("vhost-vsock.sock_1024");
            assert!(socket.as_os_str().len() < 108, "{}", socket.display());
        }
        // The same id in two namespaces: two directories.
        assert_ne!(
            sandbox_dir(&config, "a", "pod"),
            sandbox_dir(&config, "b", "pod")
        );
    }

    #[test]
    fn sandbox_names_must_be_containerd_identifiers() {
        for good in ["default", "k8s.io", "pod-1", "a_b.c-d", "0"] {
            assert!(valid_identifier(good), "{good}");
        }
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "a+b",
            "-a",
            "a-",
            "a..b",
            "a b",
            &"x".repeat(77),
        ] {
            assert!(!valid_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn a_claimed_sandbox_name_is_refused_until_released() {
        let state = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.runtime.state_dir = state.path().to_path_buf();
        let first = Claim::take(&config, "default", "pod").unwrap();
        let err = Claim::take(&config, "default", "pod")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("already exists and is running"), "{err}");
        // Another namespace is another sandbox.
        let other = Claim::take(&config, "k8s.io", "pod").unwrap();
        first.release();
        Claim::take(&config, "default", "pod").unwrap().release();
        other.release();
    }

    #[test]
    fn kabuto_exec_finds_pods_by_id_even_with_hashed_directory_names() {
        let state = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.runtime.state_dir = state.path().to_path_buf();
        let cri = "562fe45dc616ef0b7ddde3f278e0d31079e099f12546d29b9e77f7df2788652f";
        for (ns, id) in [("k8s.io", cri), ("default", "pod"), ("other", "pod")] {
            let dir = sandbox_dir(&config, ns, id);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(SANDBOX_NAME_FILE), format!("{ns}\n{id}\n")).unwrap();
        }
        assert_eq!(sandbox_namespaces(&config, cri), ["k8s.io"]);
        assert_eq!(sandbox_namespaces(&config, "pod"), ["default", "other"]);
        assert!(sandbox_namespaces(&config, "none").is_empty());
    }
}
