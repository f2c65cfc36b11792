//! Paths inside the root: entry names cleaned, parents resolved the way
//! the container will see them (symlinks never leave the root), and the
//! removals whiteouts ask for.

use std::{
    collections::HashSet,
    fs, io,
    path::{Component, Path, PathBuf},
};

use super::{EntryError, MAX_SYMLINKS};

/// Records `path` and every directory above it up to `root` as this
/// layer's: an opaque marker that comes after `a/b/file` (with no entry for
/// `a/b/`) must keep `a/b`, or it would delete the layer's own file.
pub(super) fn record_created(created: &mut HashSet<PathBuf>, root: &Path, path: PathBuf) {
    let mut dir = path.parent().map(Path::to_path_buf);
    created.insert(path);
    while let Some(d) = dir.filter(|d| d.starts_with(root) && d.as_path() != root) {
        dir = d.parent().map(Path::to_path_buf);
        if !created.insert(d) {
            break; // its ancestors are recorded already
        }
    }
}

/// The entry name as a relative path without `.` components; `..` refused.
pub(super) fn clean_name(raw: &str) -> Result<PathBuf, EntryError> {
    let mut out = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err(EntryError::DotDot),
            Component::Prefix(_) => return Err(EntryError::NotUnix),
        }
    }
    Ok(out)
}

/// `rel` resolved inside `root` the way the container sees it: symlinks are
/// followed with absolute targets starting at `root`. A symlink that
/// climbs above the root is refused (no legitimate image needs one).
pub(super) fn resolve_in_root(root: &Path, rel: &Path) -> Result<PathBuf, EntryError> {
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    let mut followed = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            if resolved.pop().is_none() {
                return Err(EntryError::SymlinkClimbs);
            }
            continue;
        }
        if part == "." {
            continue;
        }
        let candidate: PathBuf = std::iter::once(root.as_os_str().to_os_string())
            .chain(resolved.iter().cloned())
            .chain(std::iter::once(part.clone()))
            .collect();
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(EntryError::SymlinkLoop);
                }
                let target =
                    fs::read_link(&candidate).map_err(EntryError::io("reading a symlink"))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(EntryError::NotADirectory(PathBuf::from_iter(
                    resolved.iter().chain(std::iter::once(&part)),
                )))
            }
            _ => resolved.push(part),
        }
    }
    Ok(std::iter::once(root.as_os_str().to_os_string())
        .chain(resolved)
        .collect())
}

/// Removes whatever is at `path` (not following a symlink); absent is fine.
pub(super) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// An opaque whiteout: below `dir`, only what this layer created stays
/// (lower layers' entries are hidden at every depth; directories this layer
/// wrote into are searched too, since the marker may come after them).
pub(super) fn opaque(dir: &Path, created: &HashSet<PathBuf>) -> io::Result<()> {
    let Ok(children) = fs::read_dir(dir) else {
        return Ok(());
    };
    for child in children {
        let child = child?;
        let path = child.path();
        if !created.contains(&path) {
            remove_any(&path)?;
        } else if child.file_type()?.is_dir() {
            opaque(&path, created)?;
        }
    }
    Ok(())
}
