//! Bind mounts from the host-shared directory, resolved beneath it.
//!
//! The shared directory ([`GUEST_SHARED_DIR`], virtio-fs) is the host's: a
//! symlink it plants there (`…/shared/c1/vol -> /`) would be followed in the
//! guest's own namespace, and a bind of it would give a container the
//! guest's root — other containers' decrypted images, the agent's files.
//! So before a container is created, each bind source under the shared
//! directory is opened beneath it without following any symlink
//! (`openat2`, `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), bound from that
//! open file to a guest-private staging path, and the spec points there:
//! what the container gets is the inode that was checked, whatever the host
//! renames or replaces afterwards.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use kabuto_protocol::{GUEST_ROOTFS_DIR, GUEST_SHARED_DIR};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::Spec;

use crate::error::{AgentError, Result};

/// Guest tmpfs, never shared with the host.
const STAGING_DIR: &str = "/run/kabuto/binds";

fn staging_dir(container_id: &str) -> PathBuf {
    Path::new(STAGING_DIR).join(container_id)
}

/// True for a bind source [`stage`] made (the checked inode of a host
/// file): exactly `<staging>/<index>`.
pub fn is_staged(source: &Path, container_id: &str) -> bool {
    source.parent() == Some(staging_dir(container_id).as_path())
        && source
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Opens `relative` beneath `dir` refusing symlinks, `..` and magic links
/// anywhere on the way (O_PATH: nothing is read).
fn open_beneath(dir: &File, relative: &Path) -> std::io::Result<File> {
    open_beneath_with(dir, relative, 0)
}

/// [`open_beneath`] with extra open flags (`O_DIRECTORY` makes the lookup
/// enter a host submount that virtio-fs announces as an automount point).
pub(crate) fn open_beneath_with(
    dir: &File,
    relative: &Path,
    extra: libc::c_int,
) -> std::io::Result<File> {
    let path = CString::new(relative.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain integers; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC | extra) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and an
    // open_how of the size passed; the returned fd is owned by the File.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by the kernel.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Rewrites every bind whose source is under the shared directory to a
/// staged bind of the inode found beneath it. On error nothing stays staged.
pub fn stage(spec: &mut Spec, container_id: &str) -> Result<()> {
    let Some(mut mounts) = spec.mounts().clone() else {
        return Ok(());
    };
    let shared = Path::new(GUEST_SHARED_DIR);
    let shared_dir = File::open(shared).map_err(|e| {
        AgentError::InvalidArgument(format!("shared directory {}: {e}", shared.display()))
    })?;
    let staging = staging_dir(container_id);
    let result = (|| -> Result<()> {
        for (index, m) in mounts.iter_mut().enumerate() {
            let Some(source) = m.source().clone() else {
                continue;
            };
            if !is_bind(m) {
                continue;
            }
            let Ok(relative) = source.strip_prefix(shared) else {
                continue;
            };
            let target = staging.join(index.to_string());
            bind_beneath(&shared_dir, relative, "shared directory", &target).map_err(|why| {
                AgentError::InvalidArgument(format!(
                    "container {container_id}: bind source {}: {}",
                    source.display(),
                    kabuto_error::chain(&why)
                ))
            })?;
            m.set_source(Some(target));
            m.set_options(Some(host_file_options(m.options().as_deref())));
        }
        Ok(())
    })();
    if let Err(e) = result {
        release(container_id);
        return Err(e);
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// Why a bind source cannot be staged.
#[derive(Debug, thiserror::Error)]
enum BindError {
    #[error("must be a plain path below the {0}")]
    NotPlain(String),
    #[error("resolves through a symlink or out of the {0} (refused)")]
    Escapes(String),
    #[error(transparent)]
    Open(std::io::Error),
    #[error("staging {}", path.display())]
    Staging {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding to {}", target.display())]
    Bind {
        target: std::path::PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Opens `relative` beneath `base` (the `what`) — plain components only,
/// no symlink anywhere — and binds that very inode, with what is mounted
/// below it, to `target`, created to match (directory or file).
fn bind_beneath(
    base: &File,
    relative: &Path,
    what: &str,
    target: &Path,
) -> std::result::Result<(), BindError> {
    if relative.as_os_str().is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(BindError::NotPlain(what.to_string()));
    }
    let beneath_error = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) => BindError::Escapes(what.to_string()),
        _ => BindError::Open(e),
    };
    let opened = open_beneath(base, relative).map_err(beneath_error)?;
    let is_dir = opened.metadata().map_err(BindError::Open)?.is_dir();
    let opened = if is_dir {
        open_beneath_with(base, relative, libc::O_DIRECTORY).map_err(beneath_error)?
    } else {
        opened
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|source| BindError::Staging {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    if is_dir {
        std::fs::create_dir(target)
    } else {
        File::create(target).map(drop)
    }
    .map_err(|source| BindError::Staging {
        path: target.to_path_buf(),
        source,
    })?;
    let fd_path = format!("/proc/self/fd/{}", opened.as_raw_fd());
    mount(
        Some(fd_path.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| BindError::Bind {
        target: target.to_path_buf(),
        source,
    })
}

/// A bind of host files keeps nosuid and nodev (setuid binaries and device
/// nodes the host planted stay inert) and, when read-only, no `rw`: the
/// options that would lift them (`suid`, `dev`, their recursive forms,
/// `rrw` after `ro`) are dropped, whatever the request says.
fn host_file_options(options: Option<&[String]>) -> Vec<String> {
    let options = options.unwrap_or_default();
    let read_only = options.iter().any(|o| o == "ro" || o == "rro");
    let mut kept: Vec<String> = options
        .iter()
        .filter(|o| !matches!(o.as_str(), "suid" | "dev" | "rsuid" | "rdev"))
        .filter(|o| !(read_only && matches!(o.as_str(), "rw" | "rrw")))
        .cloned()
        .collect();
    for forced in ["nosuid", "nodev"] {
        if !kept.iter().any(|o| o == forced) {
            kept.push(forced.to_string());
        }
    }
    kept
}

/// A root filesystem the host shares (`root.path` below
/// [`GUEST_ROOTFS_DIR`]) is, like a bind source, the host's directory: it is
/// opened beneath the rootfs directory without following symlinks and bound
/// to a guest-private path, so `root.path` cannot be turned into the guest's
/// `/` or another container's decrypted image by a planted symlink. Roots
/// elsewhere (guest pulls, the guest's pause) are the guest's own.
pub fn stage_root(spec: &mut Spec, container_id: &str) -> Result<()> {
    let Some(mut root) = spec.root().clone() else {
        return Ok(());
    };
    let rootfs_dir = Path::new(GUEST_ROOTFS_DIR);
    let Ok(relative) = root.path().strip_prefix(rootfs_dir) else {
        return Ok(());
    };
    let target = staging_dir(container_id).join("root");
    let staged = File::open(rootfs_dir)
        .map_err(BindError::Open)
        .and_then(|base| bind_beneath(&base, relative, "rootfs directory", &target));
    if let Err(why) = staged {
        release(container_id);
        return Err(AgentError::InvalidArgument(format!(
            "container {container_id}: root.path {}: {}",
            root.path().display(),
            kabuto_error::chain(&why)
        )));
    }
    root.set_path(target);
    spec.set_root(Some(root));
    Ok(())
}

/// Removes a container's staged binds (idempotent).
pub fn release(container_id: &str) {
    crate::sealed_files::release(container_id);
    let staging = staging_dir(container_id);
    let Ok(entries) = std::fs::read_dir(&staging) else {
        return;
    };
    for entry in entries.flatten() {
        let _ = umount2(&entry.path(), MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(entry.path()).or_else(|_| std::fs::remove_file(entry.path()));
    }
    let _ = std::fs::remove_dir(&staging);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_staged_bind_itself_is_staged() {
        let staged = staging_dir("c1");
        assert!(is_staged(&staged.join("3"), "c1"));
        for other in [
            staged.clone(),
            staged.join("3/sub"),
            staged.join("../../x"),
            staged.join("x"),
            staging_dir("c2").join("3"),
        ] {
            assert!(!is_staged(&other, "c1"), "{}", other.display());
        }
    }

    #[test]
    fn host_file_binds_keep_nosuid_nodev_and_read_only() {
        let given = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            host_file_options(Some(&given(&["rbind", "ro", "rrw", "rsuid", "dev"]))),
            given(&["rbind", "ro", "nosuid", "nodev"])
        );
        assert_eq!(
            host_file_options(Some(&given(&["rbind", "rw"]))),
            given(&["rbind", "rw", "nosuid", "nodev"])
        );
        assert_eq!(host_file_options(None), given(&["nosuid", "nodev"]));
    }

    /// Resolution beneath a directory the test owns: a planted symlink (to
    /// the root, or to a sibling via ..) is refused, a plain file opens.
    #[test]
    fn symlinks_and_dot_dot_do_not_resolve_beneath() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("c1")).expect("mkdir");
        std::fs::write(dir.path().join("c1/file"), b"x").expect("file");
        std::os::unix::fs::symlink("/", dir.path().join("c1/root")).expect("symlink");
        std::os::unix::fs::symlink("../c1/file", dir.path().join("c1/rel")).expect("symlink");
        let base = File::open(dir.path()).expect("open");
        assert!(open_beneath(&base, Path::new("c1/file")).is_ok());
        for path in ["c1/root", "c1/root/etc", "c1/rel", "../etc", "/etc"] {
            let err = open_beneath(&base, Path::new(path)).expect_err(path);
            assert!(
                matches!(err.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV)),
                "{path}: {err}"
            );
        }
    }
}
