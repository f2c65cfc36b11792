//! One tar entry applied to the root: its names, whiteouts, the node it
//! creates, and its metadata.

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    io::{self, Read},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use super::paths::{clean_name, opaque, record_created, remove_any, resolve_in_root};
use super::pax::{apply_metadata, trim_nul, Extensions};
use super::{EntryError, Layer, UnpackError, UnpackOptions};

/// Applies `entry` (with the extensions read before it) to `root`,
/// recording what it created in `created`.
pub(super) fn apply<R: Read>(
    layer: &Layer<'_>,
    root: &Path,
    options: UnpackOptions,
    created: &mut HashSet<PathBuf>,
    mut entry: tar::Entry<'_, R>,
    ext: &Extensions,
) -> Result<(), UnpackError> {
    let (raw_name, link_name) = names(&entry, ext);
    let entry_err = |reason: EntryError| UnpackError::Entry {
        layer: layer.digest.into(),
        entry: raw_name.clone(),
        reason,
    };
    check_pax_size(&entry, ext).map_err(entry_err)?;
    let name = clean_name(&raw_name).map_err(entry_err)?;
    let Some(file_name) = name.file_name().map(OsStr::to_os_string) else {
        return Ok(()); // the root itself
    };
    let parent_rel = name.parent().unwrap_or(Path::new(""));
    let parent = resolve_in_root(root, parent_rel).map_err(entry_err)?;
    let file_name = file_name.to_string_lossy().into_owned();
    if whiteout(&parent, &file_name, created).map_err(entry_err)? {
        return Ok(());
    }

    fs::create_dir_all(&parent).map_err(|e| entry_err(EntryError::Io("creating parent", e)))?;
    let path = parent.join(&file_name);
    let header = entry.header().clone();
    let kind = header.entry_type();
    let mode = header
        .mode()
        .map_err(|e| entry_err(EntryError::Header(e)))?
        & 0o7777;
    // A later entry replaces what is there (a directory only by a
    // non-directory).
    let existing = fs::symlink_metadata(&path).ok();
    if let Some(meta) = &existing {
        if !(kind.is_dir() && meta.is_dir()) {
            remove_any(&path).map_err(|e| entry_err(EntryError::Io("replacing", e)))?;
        }
    }
    if kind == tar::EntryType::Link {
        let target = link_name.ok_or_else(|| entry_err(EntryError::NoLinkTarget))?;
        hard_link(root, &target, &path).map_err(entry_err)?;
        record_created(created, root, path);
        return Ok(()); // shares the target's inode: no metadata of its own
    }
    let node = Node {
        kind,
        header: &header,
        mode,
        existing_dir: existing.as_ref().is_some_and(fs::Metadata::is_dir),
        link_name: link_name.as_deref(),
    };
    node.create(&mut entry, &path, options).map_err(entry_err)?;
    apply_metadata(&entry, ext, &path, kind, mode).map_err(entry_err)?;
    record_created(created, root, path);
    Ok(())
}

/// The entry's name and link name: a GNU long name or PAX record over the
/// header's.
fn names<R: Read>(entry: &tar::Entry<'_, R>, ext: &Extensions) -> (String, Option<PathBuf>) {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let raw_name = match (&ext.long_name, ext.pax_value("path")) {
        (Some(long), _) => text(trim_nul(long)),
        (None, Some(path)) => text(path),
        (None, None) => text(&entry.path_bytes()),
    };
    let link_name = match (&ext.long_link, ext.pax_value("linkpath")) {
        (Some(long), _) => Some(PathBuf::from(text(trim_nul(long)))),
        (None, Some(link)) => Some(PathBuf::from(text(link))),
        (None, None) => entry.link_name_bytes().map(|b| PathBuf::from(text(&b))),
    };
    (raw_name, link_name)
}

/// The stream is framed by the header's size: a PAX size that says
/// otherwise would make this reading and others' disagree.
fn check_pax_size<R: Read>(entry: &tar::Entry<'_, R>, ext: &Extensions) -> Result<(), EntryError> {
    let Some(size) = ext.pax_value("size") else {
        return Ok(());
    };
    let header_size = entry.header().entry_size().unwrap_or(u64::MAX);
    if std::str::from_utf8(size)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        != Some(header_size)
    {
        return Err(EntryError::PaxSize);
    }
    Ok(())
}

/// Applies `file_name` in `parent` if it is a whiteout (`.wh..wh..opq`
/// or `.wh.<name>`); true if it was one.
fn whiteout(
    parent: &Path,
    file_name: &str,
    created: &HashSet<PathBuf>,
) -> Result<bool, EntryError> {
    if file_name == ".wh..wh..opq" {
        opaque(parent, created).map_err(EntryError::io("emptying the directory"))?;
        return Ok(true);
    }
    let Some(hidden) = file_name.strip_prefix(".wh.") else {
        return Ok(false);
    };
    // `.wh.`, `.wh..` and `.wh...` would hide the directory itself or its
    // parent (above the root, for the root).
    if matches!(hidden, "" | "." | "..") {
        return Err(EntryError::Whiteout(file_name.to_string()));
    }
    remove_any(&parent.join(hidden)).map_err(EntryError::io("removing"))?;
    Ok(true)
}

/// A hard link at `path` to `target`, which must resolve inside `root`
/// and not be a directory.
fn hard_link(root: &Path, target: &Path, path: &Path) -> Result<(), EntryError> {
    let target_name =
        clean_name(&target.to_string_lossy()).map_err(|r| EntryError::LinkTarget(Box::new(r)))?;
    let target_parent = resolve_in_root(root, target_name.parent().unwrap_or(Path::new("")))
        .map_err(|r| EntryError::LinkTarget(Box::new(r)))?;
    let source = match target_name.file_name() {
        Some(f) => target_parent.join(f),
        None => return Err(EntryError::LinkToRoot),
    };
    let meta = fs::symlink_metadata(&source)
        .map_err(|e| EntryError::LinkTargetMissing(target.to_path_buf(), e))?;
    if meta.is_dir() {
        return Err(EntryError::LinkToDirectory);
    }
    fs::hard_link(&source, path).map_err(EntryError::io("linking"))
}

/// What an entry other than a hard link creates.
struct Node<'a> {
    kind: tar::EntryType,
    header: &'a tar::Header,
    mode: u32,
    /// A directory is at the path already (kept: a directory entry only
    /// updates its metadata).
    existing_dir: bool,
    link_name: Option<&'a Path>,
}

impl Node<'_> {
    fn create<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        options: UnpackOptions,
    ) -> Result<(), EntryError> {
        let mode = nix::sys::stat::Mode::from_bits_truncate(self.mode);
        match self.kind {
            tar::EntryType::Directory => {
                if !self.existing_dir {
                    fs::create_dir(path).map_err(EntryError::io("creating"))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = fs::File::create(path).map_err(EntryError::io("creating"))?;
                io::copy(entry, &mut file).map_err(EntryError::io("writing"))?;
            }
            tar::EntryType::Symlink => {
                let target = self.link_name.ok_or(EntryError::NoSymlinkTarget)?;
                symlink(target, path).map_err(EntryError::io("creating"))?;
            }
            tar::EntryType::Fifo => {
                nix::unistd::mkfifo(path, mode).map_err(EntryError::sys("mkfifo"))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                if !options.allow_devices {
                    return Err(EntryError::Device);
                }
                let kind_flag = if self.kind == tar::EntryType::Char {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                let major = self.header.device_major().ok().flatten().unwrap_or(0);
                let minor = self.header.device_minor().ok().flatten().unwrap_or(0);
                nix::sys::stat::mknod(
                    path,
                    kind_flag,
                    mode,
                    nix::sys::stat::makedev(major.into(), minor.into()),
                )
                .map_err(EntryError::sys("mknod"))?;
            }
            other => return Err(EntryError::EntryType(format!("{other:?}"))),
        }
        Ok(())
    }
}
