//! Unpacking OCI image layers into a root filesystem, refusing anything
//! that would write outside it.
//!
//! Semantics follow the OCI image spec and containerd: entries are applied
//! in order; `.wh.<name>` deletes `<name>` from lower layers, `.wh..wh..opq`
//! empties its directory of lower layers' entries; a later entry replaces
//! an earlier one. Paths are resolved *inside* the root the way the
//! container will see them: absolute symlink targets start at the root.
//!
//! Refused, with the entry's name: names with `..` components, symlinks on
//! an entry's path that climb above the root (`evil -> ../../..` then
//! `evil/x`), hard links to paths outside the root or to directories, and
//! device nodes unless allowed. The caller unpacks into a fresh directory
//! and removes it when any layer fails ([`into_new_root`] does).

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs,
    io::{self, Read},
    os::unix::fs::{symlink, PermissionsExt},
    path::{Component, Path, PathBuf},
};

/// At most this many symlinks are followed resolving one path (Linux's
/// limit), so a loop is an error, not a hang.
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Entry {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackOptions {
    /// Create character and block devices (off: refused).
    pub allow_devices: bool,
}

/// The compression a layer media type names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From an OCI or Docker layer media type (decrypted).
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    fn reader<'a>(self, data: &'a [u8]) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(data),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(data)),
            Compression::Zstd => Box::new(
                ruzstd::decoding::StreamingDecoder::new(data)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
            ),
        })
    }
}

/// One layer to apply: its name for errors (the digest), media type, blob.
pub struct Layer<'a> {
    pub digest: &'a str,
    pub media_type: &'a str,
    pub data: &'a [u8],
}

/// Unpacks `layers` in order into `root`, which must not exist yet. On any
/// error `root` is removed: nothing half-unpacked remains.
pub fn unpack_layers(
    layers: &[Layer<'_>],
    root: &Path,
    options: UnpackOptions,
) -> Result<(), UnpackError> {
    into_new_root(
        root,
        |e| e,
        || {
            layers
                .iter()
                .try_for_each(|layer| unpack_layer(layer, root, options))
        },
    )
}

/// Creates `root`, which must not exist yet, and runs `fill`; if either
/// fails, `root` is removed: nothing half-unpacked remains. `root_error`
/// turns a failure to create it into the caller's error type.
pub fn into_new_root<E>(
    root: &Path,
    root_error: impl FnOnce(UnpackError) -> E,
    fill: impl FnOnce() -> Result<(), E>,
) -> Result<(), E> {
    let layer_err = |reason: String| UnpackError::Layer {
        layer: "(rootfs)".into(),
        reason,
    };
    if root.exists() {
        return Err(root_error(layer_err(format!(
            "{} already exists",
            root.display()
        ))));
    }
    if let Err(e) = fs::create_dir_all(root) {
        return Err(root_error(layer_err(format!(
            "creating {}: {e}",
            root.display()
        ))));
    }
    let result = fill();
    if result.is_err() {
        let _ = fs::remove_dir_all(root);
    }
    result
}

/// Applies one layer on top of `root`.
pub fn unpack_layer(
    layer: &Layer<'_>,
    root: &Path,
    options: UnpackOptions,
) -> Result<(), UnpackError> {
    let layer_err = |reason: String| UnpackError::Layer {
        layer: layer.digest.into(),
        reason,
    };
    let compression = Compression::from_media_type(layer.media_type)
        .ok_or_else(|| layer_err(format!("media type {} is not a layer", layer.media_type)))?;
    let reader = compression
        .reader(layer.data)
        .map_err(|e| layer_err(format!("decompressing: {e}")))?;
    let mut archive = tar::Archive::new(reader);
    // Paths this layer created: an opaque whiteout keeps them.
    let mut created: HashSet<PathBuf> = HashSet::new();
    // Raw entries: GNU long names and PAX records are read here, bounded
    // (the tar crate reads any size into memory, and a 4 GiB PAX header
    // gzips to a few MB).
    let entries = archive
        .entries()
        .map_err(|e| layer_err(format!("reading the tar stream: {e}")))?
        .raw(true);
    let mut pending = Extensions::default();
    let mut count: u64 = 0;
    for entry in entries {
        let mut entry = entry.map_err(|e| layer_err(format!("reading the tar stream: {e}")))?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(layer_err(format!(
                "more than {MAX_ENTRIES} tar entries in one layer"
            )));
        }
        match entry.header().entry_type() {
            tar::EntryType::GNULongName => {
                pending.long_name =
                    Some(read_extension(&mut entry, "GNU long name").map_err(layer_err)?);
                continue;
            }
            tar::EntryType::GNULongLink => {
                pending.long_link =
                    Some(read_extension(&mut entry, "GNU long link").map_err(layer_err)?);
                continue;
            }
            tar::EntryType::XHeader => {
                let data = read_extension(&mut entry, "PAX header").map_err(layer_err)?;
                pending.pax = parse_pax(&data).map_err(layer_err)?;
                continue;
            }
            tar::EntryType::XGlobalHeader => {
                read_extension(&mut entry, "PAX global header").map_err(layer_err)?;
                continue;
            }
            tar::EntryType::GNUSparse => {
                return Err(layer_err("GNU sparse entries are not supported".into()));
            }
            _ => {}
        }
        let ext = std::mem::take(&mut pending);
        let raw_name = match (&ext.long_name, ext.pax_value("path")) {
            (Some(long), _) => String::from_utf8_lossy(trim_nul(long)).into_owned(),
            (None, Some(path)) => String::from_utf8_lossy(path).into_owned(),
            (None, None) => String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
        };
        let link_name: Option<PathBuf> = match (&ext.long_link, ext.pax_value("linkpath")) {
            (Some(long), _) => Some(PathBuf::from(
                String::from_utf8_lossy(trim_nul(long)).into_owned(),
            )),
            (None, Some(link)) => Some(PathBuf::from(String::from_utf8_lossy(link).into_owned())),
            (None, None) => entry
                .link_name_bytes()
                .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned())),
        };
        let entry_err = |reason: String| UnpackError::Entry {
            layer: layer.digest.into(),
            entry: raw_name.clone(),
            reason,
        };
        // The stream is framed by the header's size: a PAX size that says
        // otherwise would make this reading and others' disagree.
        if let Some(size) = ext.pax_value("size") {
            let header_size = entry.header().entry_size().unwrap_or(u64::MAX);
            if std::str::from_utf8(size)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                != Some(header_size)
            {
                return Err(entry_err(
                    "a PAX size that differs from the header's is not supported".into(),
                ));
            }
        }
        let name = clean_name(&raw_name).map_err(entry_err)?;
        let Some(file_name) = name.file_name().map(OsStr::to_os_string) else {
            continue; // the root itself
        };
        let parent_rel = name.parent().unwrap_or(Path::new(""));
        let parent = resolve_in_root(root, parent_rel).map_err(entry_err)?;
        let file_name = file_name.to_string_lossy().into_owned();

        if file_name == ".wh..wh..opq" {
            opaque(&parent, &created).map_err(|e| entry_err(e.to_string()))?;
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            // `.wh.`, `.wh..` and `.wh...` would hide the directory itself
            // or its parent (above the root, for the root).
            if matches!(hidden, "" | "." | "..") {
                return Err(entry_err(format!(
                    "whiteout {file_name:?} names no entry of its directory"
                )));
            }
            let target = parent.join(hidden);
            remove_any(&target).map_err(|e| entry_err(e.to_string()))?;
            continue;
        }

        fs::create_dir_all(&parent).map_err(|e| entry_err(format!("creating parent: {e}")))?;
        let path = parent.join(&file_name);
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().map_err(|e| entry_err(e.to_string()))? & 0o7777;
        // A later entry replaces what is there (a directory only by a
        // non-directory).
        let existing = fs::symlink_metadata(&path).ok();
        if let Some(meta) = &existing {
            if !(kind.is_dir() && meta.is_dir()) {
                remove_any(&path).map_err(|e| entry_err(e.to_string()))?;
            }
        }
        match kind {
            tar::EntryType::Directory => {
                if existing.as_ref().is_none_or(|m| !m.is_dir()) {
                    fs::create_dir(&path).map_err(|e| entry_err(e.to_string()))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = fs::File::create(&path).map_err(|e| entry_err(e.to_string()))?;
                io::copy(&mut entry, &mut file).map_err(|e| entry_err(e.to_string()))?;
            }
            tar::EntryType::Symlink => {
                let target = link_name
                    .clone()
                    .ok_or_else(|| entry_err("symlink without a target".into()))?;
                symlink(&target, &path).map_err(|e| entry_err(e.to_string()))?;
            }
            tar::EntryType::Link => {
                let target = link_name
                    .clone()
                    .ok_or_else(|| entry_err("hard link without a target".into()))?;
                let target_name = clean_name(&target.to_string_lossy())
                    .map_err(|r| entry_err(format!("hard link target: {r}")))?;
                let target_parent =
                    resolve_in_root(root, target_name.parent().unwrap_or(Path::new("")))
                        .map_err(|r| entry_err(format!("hard link target: {r}")))?;
                let source = match target_name.file_name() {
                    Some(f) => target_parent.join(f),
                    None => return Err(entry_err("hard link to the root".into())),
                };
                let meta = fs::symlink_metadata(&source).map_err(|e| {
                    entry_err(format!("hard link target {}: {e}", target.display()))
                })?;
                if meta.is_dir() {
                    return Err(entry_err("hard link to a directory".into()));
                }
                fs::hard_link(&source, &path).map_err(|e| entry_err(e.to_string()))?;
                record_created(&mut created, root, path);
                continue; // shares the target's inode: no metadata of its own
            }
            tar::EntryType::Fifo => {
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(|e| entry_err(e.to_string()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                if !options.allow_devices {
                    return Err(entry_err("device nodes are not allowed".into()));
                }
                let kind_flag = if kind == tar::EntryType::Char {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                nix::sys::stat::mknod(
                    &path,
                    kind_flag,
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                    nix::sys::stat::makedev(major.into(), minor.into()),
                )
                .map_err(|e| entry_err(e.to_string()))?;
            }
            other => return Err(entry_err(format!("unsupported entry type {other:?}"))),
        }
        apply_metadata(&entry, &ext, &path, kind, mode).map_err(entry_err)?;
        record_created(&mut created, root, path);
    }
    Ok(())
}

/// Records `path` and every directory above it up to `root` as this
/// layer's: an opaque marker that comes after `a/b/file` (with no entry for
/// `a/b/`) must keep `a/b`, or it would delete the layer's own file.
fn record_created(created: &mut HashSet<PathBuf>, root: &Path, path: PathBuf) {
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
fn clean_name(raw: &str) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("the name contains `..`".into()),
            Component::Prefix(_) => return Err("not a Unix path".into()),
        }
    }
    Ok(out)
}

/// `rel` resolved inside `root` the way the container sees it: symlinks are
/// followed with absolute targets starting at `root`. A symlink that
/// climbs above the root is refused (no legitimate image needs one).
fn resolve_in_root(root: &Path, rel: &Path) -> Result<PathBuf, String> {
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
                return Err("a symlink on its path climbs above the root".into());
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
                    return Err("too many levels of symlinks on its path".into());
                }
                let target = fs::read_link(&candidate).map_err(|e| e.to_string())?;
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
                return Err(format!(
                    "{} on its path is not a directory",
                    PathBuf::from_iter(resolved.iter().chain(std::iter::once(&part))).display()
                ))
            }
            _ => resolved.push(part),
        }
    }
    Ok(std::iter::once(root.as_os_str().to_os_string())
        .chain(resolved)
        .collect())
}

/// Removes whatever is at `path` (not following a symlink); absent is fine.
fn remove_any(path: &Path) -> io::Result<()> {
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
fn opaque(dir: &Path, created: &HashSet<PathBuf>) -> io::Result<()> {
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

/// Longest GNU long name / long link / PAX header read (each).
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// Most tar entries in one layer.
pub const MAX_ENTRIES: u64 = 4_000_000;

/// What GNU and PAX extension entries say about the next entry.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Vec<(String, Vec<u8>)>,
}

impl Extensions {
    fn pax_value(&self, key: &str) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// The data of an extension entry, refused beyond [`MAX_EXTENSION_BYTES`]
/// before anything is read.
fn read_extension<R: Read>(entry: &mut tar::Entry<'_, R>, what: &str) -> Result<Vec<u8>, String> {
    let size = entry
        .header()
        .entry_size()
        .map_err(|e| format!("{what}: {e}"))?;
    if size > MAX_EXTENSION_BYTES {
        return Err(format!(
            "a {what} of {size} bytes (more than {MAX_EXTENSION_BYTES})"
        ));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry
        .take(MAX_EXTENSION_BYTES)
        .read_to_end(&mut data)
        .map_err(|e| format!("{what}: {e}"))?;
    Ok(data)
}

fn trim_nul(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(&[0]).unwrap_or(bytes)
}

/// PAX records: `<length> <key>=<value>\n`, the length counting the whole
/// record.
fn parse_pax(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or("a PAX record without a length")?;
        let length: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n > space + 1 && *n <= rest.len())
            .ok_or("a PAX record with a bad length")?;
        let record = &rest[space + 1..length];
        let record = record
            .strip_suffix(b"\n")
            .ok_or("a PAX record not ending in a newline")?;
        let equals = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or("a PAX record without '='")?;
        let key =
            std::str::from_utf8(&record[..equals]).map_err(|_| "a PAX key that is not UTF-8")?;
        records.push((key.to_string(), record[equals + 1..].to_vec()));
        rest = &rest[length..];
    }
    Ok(records)
}

/// Owner, mode, extended attributes and modification time of the entry
/// (PAX `uid`/`gid`/`mtime` records override the header's).
fn apply_metadata<R: Read>(
    entry: &tar::Entry<'_, R>,
    ext: &Extensions,
    path: &Path,
    kind: tar::EntryType,
    mode: u32,
) -> Result<(), String> {
    let header = entry.header();
    let pax_number = |key: &str| -> Result<Option<u64>, String> {
        match ext.pax_value(key) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| format!("PAX {key} is not a number")),
        }
    };
    // An empty owner field means 0 (as GNU tar reads it); garbage is an error.
    let blank = |field: &[u8]| field.iter().all(|b| *b == 0 || *b == b' ');
    let old = header.as_old();
    let uid = match (pax_number("uid")?, header.uid()) {
        (Some(uid), _) => uid,
        (None, Ok(uid)) => uid,
        (None, Err(_)) if blank(&old.uid) => 0,
        (None, Err(e)) => return Err(e.to_string()),
    };
    let gid = match (pax_number("gid")?, header.gid()) {
        (Some(gid), _) => gid,
        (None, Ok(gid)) => gid,
        (None, Err(_)) if blank(&old.gid) => 0,
        (None, Err(e)) => return Err(e.to_string()),
    };
    let mtime = match pax_number("mtime")? {
        Some(t) => t,
        None => header.mtime().unwrap_or(0),
    };
    nix::unistd::fchownat(
        None,
        path,
        Some(nix::unistd::Uid::from_raw(uid as u32)),
        Some(nix::unistd::Gid::from_raw(gid as u32)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| format!("chown: {e}"))?;
    if kind != tar::EntryType::Symlink {
        // After chown, which clears set-id bits.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod: {e}"))?;
    }
    for (key, value) in &ext.pax {
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            xattr::set(path, name, value).map_err(|e| format!("xattr {name}: {e}"))?;
        }
    }
    let time = nix::sys::time::TimeSpec::new(mtime as i64, 0);
    nix::sys::stat::utimensat(
        None,
        path,
        &time,
        &time,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| format!("mtime: {e}"))?;
    Ok(())
}
