//! Host mounts: container root file systems and bind mounts placed in a
//! sandbox's shared directory, and their removal.

use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MountError {
    #[error("mounting {fstype} {source_path} on {target}: {errno}")]
    Mount {
        fstype: String,
        source_path: String,
        target: PathBuf,
        errno: nix::Error,
    },
    #[error("preparing mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unmounting {path}: {errno}")]
    Unmount { path: PathBuf, errno: nix::Error },
}

/// A mount as containerd describes it (the `rootfs` of CreateTaskRequest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Splits mount(8)-style options into flags and file-system data.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    (flags, data.join(","))
}

fn mount_err(fstype: &str, source: &str, target: &Path) -> impl FnOnce(nix::Error) -> MountError {
    let fstype = fstype.to_string();
    let source_path = source.to_string();
    let target = target.to_path_buf();
    move |errno| MountError::Mount {
        fstype,
        source_path,
        target,
        errno,
    }
}

/// Mounts containerd's rootfs mounts, in order, on `target` (a directory).
pub fn mount_rootfs(mounts: &[MountSpec], target: &Path) -> Result<(), MountError> {
    fs::create_dir_all(target).map_err(|source| MountError::MountPoint {
        path: target.to_path_buf(),
        source,
    })?;
    for m in mounts {
        let (flags, data) = parse_options(&m.options);
        if flags.contains(MsFlags::MS_BIND) {
            bind(
                Path::new(&m.source),
                target,
                flags.contains(MsFlags::MS_RDONLY),
            )?;
            continue;
        }
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(m.source.as_str()),
            target,
            Some(m.fstype.as_str()),
            flags,
            data,
        )
        .map_err(mount_err(&m.fstype, &m.source, target))?;
    }
    Ok(())
}

/// Bind-mounts `source` (file or directory) on `target`, creating the
/// mount point to match.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
    let point_err = |source_err| MountError::MountPoint {
        path: target.to_path_buf(),
        source: source_err,
    };
    let meta = fs::metadata(source).map_err(|e| MountError::MountPoint {
        path: source.to_path_buf(),
        source: e,
    })?;
    if meta.is_dir() {
        fs::create_dir_all(target).map_err(point_err)?;
    } else {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(point_err)?;
        }
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map_err(point_err)?;
    }
    let src = source.display().to_string();
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("bind", &src, target))?;
    if readonly {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(mount_err("bind (read-only remount)", &src, target))?;
    }
    Ok(())
}

/// Turns `dir` into a mount of its own with shared propagation, so mounts
/// made under it later also appear in the virtio-fs daemon's namespace.
pub fn make_shared(dir: &Path) -> Result<(), MountError> {
    let d = dir.display().to_string();
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(mount_err("bind", &d, dir))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(mount_err("make-shared", &d, dir))
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// Unmounts everything at or below `dir` (lazily, deepest first).
pub fn unmount_all_under(dir: &Path) -> Result<(), MountError> {
    let mut first_error = None;
    for point in mounts_under(dir) {
        if let Err(errno) = umount2(&point, MntFlags::MNT_DETACH) {
            if errno != nix::errno::Errno::EINVAL && errno != nix::errno::Errno::ENOENT {
                first_error.get_or_insert(MountError::Unmount {
                    path: point.clone(),
                    errno,
                });
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn overlay_options_become_data() {
        let (flags, data) = parse_options(&opts(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l1:/l2",
        ]));
        assert!(flags.is_empty());
        assert_eq!(data, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2");
    }

    #[test]
    fn flags_are_parsed_in_order() {
        let (flags, data) = parse_options(&opts(&["rbind", "ro", "nosuid", "rw"]));
        assert!(flags.contains(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_NOSUID));
        assert!(!flags.contains(MsFlags::MS_RDONLY), "later rw wins");
        assert!(data.is_empty());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
