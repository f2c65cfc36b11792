//! Sealed secrets in a container's volumes (Kubernetes Secret and
//! ConfigMap volumes, or any host-shared bind): a file whose content starts
//! with `sealed.` is seen by the container as its plaintext, at the same
//! path; the host's file keeps the sealed form.
//!
//! Each read-only host-shared bind (already staged by `shared_binds`, so
//! it is the inode that was checked; Kubernetes mounts Secret, ConfigMap
//! and projected volumes read-only) is read whole, without following any symlink,
//! up to [`MAX_ENTRIES`] entries and [`MAX_BYTES`] bytes — a Kubernetes
//! Secret holds at most 1 MiB. If it holds a sealed file, the container gets
//! a copy in guest memory (`/run/kabuto/unsealed/<id>/<n>`) with the sealed
//! files replaced by their plaintext, modes, owners and symlinks (the
//! `..data` layout of Kubernetes' atomic writer) kept. A volume past the
//! limits is left as it is unless a sealed file was already seen, which
//! refuses the container. Updates the host makes to the volume later do not
//! reach the copy.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use kabuto_attestation_agent::KbsClient;
use oci_spec::runtime::Spec;

use crate::error::{AgentError, Result};

/// Guest tmpfs, never shared with the host.
const UNSEALED_DIR: &str = "/run/kabuto/unsealed";
/// At most this many entries are read from one volume.
pub const MAX_ENTRIES: usize = 1024;
/// At most this many bytes are read from one volume.
pub const MAX_BYTES: u64 = 4 << 20;
/// At most this deep (Kubernetes' layout: `..data/` and item paths).
const MAX_DEPTH: usize = 8;

fn unsealed_dir(container_id: &str) -> PathBuf {
    Path::new(UNSEALED_DIR).join(container_id)
}

/// Removes the container's unsealed copies (plain guest files, no mounts).
pub fn release(container_id: &str) {
    let _ = std::fs::remove_dir_all(unsealed_dir(container_id));
}

enum Entry {
    Dir {
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
        content: Vec<u8>,
    },
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
}

/// Why a volume is not read (the bind is then left as it is), or, for a
/// name listed twice (which only a hostile virtio-fs server does), refused.
enum Skipped {
    TooBig,
    Unreadable(std::io::Error),
    Duplicate(PathBuf),
}

/// What was read of one volume.
#[derive(Default)]
struct Volume {
    entries: Vec<Entry>,
    /// Every entry listed, copied or not (FIFOs, devices count too).
    seen: usize,
    paths: std::collections::HashSet<PathBuf>,
    bytes: u64,
    any_sealed: bool,
}

impl Volume {
    fn admit(&mut self, size: u64) -> std::result::Result<(), Skipped> {
        self.bytes += size;
        if self.seen > MAX_ENTRIES || self.bytes > MAX_BYTES {
            return Err(Skipped::TooBig);
        }
        Ok(())
    }

    /// Counts a listed entry; a path seen before is refused (a copy must
    /// never write through a symlink it made for the same name).
    fn listed(&mut self, path: &Path) -> std::result::Result<(), Skipped> {
        self.seen += 1;
        if !self.paths.insert(path.to_path_buf()) {
            return Err(Skipped::Duplicate(path.to_path_buf()));
        }
        self.admit(0)
    }
}

fn open_path(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
}

fn read_fd(file: &File) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut content = Vec::new();
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?
        .take(MAX_BYTES + 1)
        .read_to_end(&mut content)?;
    Ok(content)
}

/// Reads the directory `relative` (empty: the root) beneath `root`.
fn read_dir(
    root: &File,
    relative: &Path,
    depth: usize,
    volume: &mut Volume,
) -> std::result::Result<(), Skipped> {
    if depth > MAX_DEPTH {
        return Err(Skipped::TooBig);
    }
    let dir = if relative.as_os_str().is_empty() {
        root.try_clone().map_err(Skipped::Unreadable)?
    } else {
        crate::shared_binds::open_beneath_with(root, relative, libc::O_DIRECTORY)
            .map_err(Skipped::Unreadable)?
    };
    let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(Skipped::Unreadable)?;
    for entry in listing {
        let entry = entry.map_err(Skipped::Unreadable)?;
        let path = relative.join(entry.file_name());
        volume.listed(&path)?;
        let kind = entry.file_type().map_err(Skipped::Unreadable)?;
        if kind.is_symlink() {
            let target = std::fs::read_link(entry.path()).map_err(Skipped::Unreadable)?;
            volume.entries.push(Entry::Symlink { path, target });
        } else if kind.is_dir() {
            let meta = entry.metadata().map_err(Skipped::Unreadable)?;
            volume.entries.push(Entry::Dir {
                path: path.clone(),
                mode: meta.permissions().mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
            });
            read_dir(root, &path, depth + 1, volume)?;
        } else if kind.is_file() {
            read_file(root, path, volume)?;
        }
        // Devices, FIFOs and sockets are not copied.
    }
    Ok(())
}

fn read_file(root: &File, path: PathBuf, volume: &mut Volume) -> std::result::Result<(), Skipped> {
    let file =
        crate::shared_binds::open_beneath_with(root, &path, 0).map_err(Skipped::Unreadable)?;
    let meta = file.metadata().map_err(Skipped::Unreadable)?;
    if !meta.is_file() {
        return Ok(());
    }
    let content = read_fd(&file).map_err(Skipped::Unreadable)?;
    volume.admit(content.len() as u64)?;
    volume.any_sealed |= kabuto_sealed_secret::is_sealed(&content);
    volume.entries.push(Entry::File {
        path,
        mode: meta.permissions().mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        content,
    });
    Ok(())
}

/// Replaces every host-shared bind of the spec that holds a sealed file by
/// a guest copy with the plaintext; the number of volumes copied.
pub fn unseal_files(spec: &mut Spec, container_id: &str, kbs: Option<&KbsClient>) -> Result<usize> {
    let Some(mut mounts) = spec.mounts().clone() else {
        return Ok(0);
    };
    let mut copied = 0;
    for (index, m) in mounts.iter_mut().enumerate() {
        let Some(source) = m.source().clone() else {
            continue;
        };
        // Secret, ConfigMap and projected volumes are read-only binds.
        let read_only = m
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "ro"));
        if !read_only || !crate::shared_binds::is_staged(&source, container_id) {
            continue;
        }
        let shown = m.destination().display().to_string();
        let Some(volume) = read_volume(&source, &shown)? else {
            continue;
        };
        let copy = unsealed_dir(container_id).join(index.to_string());
        write_copy(&volume, &copy, container_id, &shown, kbs)?;
        m.set_source(Some(copy));
        copied += 1;
    }
    if copied > 0 {
        spec.set_mounts(Some(mounts));
        log::info!("container {container_id}: {copied} volume(s) with sealed files unsealed");
    }
    Ok(copied)
}

/// The volume at `source` (mounted at `shown`), when it holds a sealed
/// file; `None` when it does not or is not a volume to read.
fn read_volume(source: &Path, shown: &str) -> Result<Option<Volume>> {
    // O_PATH: a FIFO the host put there is not opened (it would block).
    let root = match open_path(source) {
        Ok(root) => root,
        Err(e) => {
            log::warn!("volume {shown}: not read for sealed files: {e}");
            return Ok(None);
        }
    };
    let mut volume = Volume::default();
    let meta = root.metadata().ok();
    if !meta.as_ref().is_some_and(|m| m.is_dir() || m.is_file()) {
        return Ok(None);
    }
    let read = if let Some(meta) = meta.filter(|m| m.is_dir()) {
        volume.entries.push(Entry::Dir {
            path: PathBuf::new(),
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        });
        read_dir(&root, Path::new(""), 0, &mut volume)
    } else {
        read_fd(&root)
            .map_err(Skipped::Unreadable)
            .and_then(|content| {
                volume.admit(content.len() as u64)?;
                volume.any_sealed = kabuto_sealed_secret::is_sealed(&content);
                let meta = root.metadata().map_err(Skipped::Unreadable)?;
                volume.entries.push(Entry::File {
                    path: PathBuf::new(),
                    mode: meta.permissions().mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    content,
                });
                Ok(())
            })
    };
    match read {
        Ok(()) if volume.any_sealed => Ok(Some(volume)),
        Ok(()) => Ok(None),
        Err(_) if volume.any_sealed => Err(AgentError::InvalidArgument(format!(
            "the volume at {shown} holds a sealed secret but is larger than kabuto unseals \
             ({MAX_ENTRIES} entries, {MAX_BYTES} bytes)"
        ))),
        Err(Skipped::Duplicate(path)) => Err(AgentError::InvalidArgument(format!(
            "the volume at {shown} lists {} twice (refused)",
            path.display()
        ))),
        Err(Skipped::TooBig) => Ok(None),
        Err(Skipped::Unreadable(e)) => {
            log::warn!("volume {shown}: not read for sealed files: {e}");
            Ok(None)
        }
    }
}

/// A file's content for the copy: its plaintext when it is sealed.
fn plaintext_of(
    content: &[u8],
    path: &Path,
    shown: &str,
    container_id: &str,
    kbs: Option<&KbsClient>,
) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    if !kabuto_sealed_secret::is_sealed(content) {
        return Ok(zeroize::Zeroizing::new(content.to_vec()));
    }
    let named = if path.as_os_str().is_empty() {
        shown.to_string()
    } else {
        format!("{shown}/{}", path.display())
    };
    crate::sealed::unseal_for(kbs, content, container_id, &format!("file {named}"))
}

/// Writes `volume` at `copy`, sealed files unsealed: directories first,
/// files created new (never through an existing name or a symlink), owners
/// and modes set on their own descriptors, symlinks last — so no write goes
/// through a symlink the copy holds.
fn write_copy(
    volume: &Volume,
    copy: &Path,
    container_id: &str,
    shown: &str,
    kbs: Option<&KbsClient>,
) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |what: &Path| {
        AgentError::io(format!(
            "container {container_id}: unsealing into {}",
            what.display()
        ))
    };
    let owned = |file: &File, at: &Path, mode: u32, uid: u32, gid: u32| -> Result<()> {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid)).map_err(io(at))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io(at))
    };
    if let Some(parent) = copy.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    // The root's own entry (a path of "") comes first.
    let at_copy = |path: &Path| {
        if path.as_os_str().is_empty() {
            copy.to_path_buf()
        } else {
            copy.join(path)
        }
    };
    let symlinks_last = volume
        .entries
        .iter()
        .filter(|e| !matches!(e, Entry::Symlink { .. }))
        .chain(
            volume
                .entries
                .iter()
                .filter(|e| matches!(e, Entry::Symlink { .. })),
        );
    for entry in symlinks_last {
        match entry {
            Entry::Dir {
                path,
                mode,
                uid,
                gid,
            } => {
                let at = at_copy(path);
                std::fs::create_dir(&at).map_err(io(&at))?;
                let dir = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(&at)
                    .map_err(io(&at))?;
                owned(&dir, &at, *mode, *uid, *gid)?;
            }
            Entry::Symlink { path, target } => {
                let at = at_copy(path);
                std::os::unix::fs::symlink(target, &at).map_err(io(&at))?;
            }
            Entry::File {
                path,
                mode,
                uid,
                gid,
                content,
            } => {
                let at = at_copy(path);
                let plaintext = plaintext_of(content, path, shown, container_id, kbs)?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&at)
                    .map_err(io(&at))?;
                file.write_all(plaintext.as_slice()).map_err(io(&at))?;
                owned(&file, &at, *mode, *uid, *gid)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(path: &str, content: &[u8]) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            content: content.to_vec(),
        }
    }

    /// The volume's own directory, listed first.
    fn root() -> Entry {
        Entry::Dir {
            path: PathBuf::new(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn a_name_listed_twice_is_refused() {
        let mut volume = Volume::default();
        volume.listed(Path::new("db")).ok().unwrap();
        assert!(matches!(
            volume.listed(Path::new("db")),
            Err(Skipped::Duplicate(p)) if p == Path::new("db")
        ));
    }

    /// Even given a symlink and a file of one name (which the scan
    /// refuses), the copy writes no file through the symlink.
    #[test]
    fn the_copy_never_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "untouched").unwrap();
        let copy = dir.path().join("copy");
        let volume = Volume {
            entries: vec![
                root(),
                Entry::Symlink {
                    path: "a".into(),
                    target: outside.clone(),
                },
                file("a", b"host data"),
                file("b", b"plain"),
            ],
            ..Volume::default()
        };
        assert!(write_copy(&volume, &copy, "c1", "/etc/x", None).is_err());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "untouched");
        assert_eq!(std::fs::read_to_string(copy.join("b")).unwrap(), "plain");
        assert_eq!(
            std::fs::read_to_string(copy.join("a")).unwrap(),
            "host data"
        );
        assert!(!copy.join("a").is_symlink());
    }

    #[test]
    fn a_sealed_file_without_a_kbs_refuses_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Volume {
            entries: vec![root(), file("db", b"sealed.x.y.z")],
            ..Volume::default()
        };
        let e = write_copy(&volume, &dir.path().join("copy"), "c1", "/etc/secret", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("file /etc/secret/db") && e.contains("no KBS"),
            "{e}"
        );
        assert!(!e.contains("sealed.x"), "{e}");
    }
}
