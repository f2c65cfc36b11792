//! Tar extensions (GNU long names, PAX records), read with bounds, and
//! the metadata they and the header give an entry.

use std::{fs, io::Read, os::unix::fs::PermissionsExt, path::Path};

use super::{EntryError, LayerError, MAX_EXTENSION_BYTES};

/// What GNU and PAX extension entries say about the next entry.
#[derive(Default)]
pub(super) struct Extensions {
    pub(super) long_name: Option<Vec<u8>>,
    pub(super) long_link: Option<Vec<u8>>,
    pub(super) pax: Vec<(String, Vec<u8>)>,
}

impl Extensions {
    pub(super) fn pax_value(&self, key: &str) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// The data of an extension entry, refused beyond [`MAX_EXTENSION_BYTES`]
/// before anything is read.
pub(super) fn read_extension<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    what: &'static str,
) -> Result<Vec<u8>, LayerError> {
    let failed = |source| LayerError::Extension { what, source };
    let size = entry.header().entry_size().map_err(failed)?;
    if size > MAX_EXTENSION_BYTES {
        return Err(LayerError::ExtensionTooLarge { what, size });
    }
    let mut data = Vec::with_capacity(size as usize);
    entry
        .take(MAX_EXTENSION_BYTES)
        .read_to_end(&mut data)
        .map_err(failed)?;
    Ok(data)
}

pub(super) fn trim_nul(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(&[0]).unwrap_or(bytes)
}

/// PAX records: `<length> <key>=<value>\n`, the length counting the whole
/// record.
pub(super) fn parse_pax(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, LayerError> {
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or(LayerError::Pax("a PAX record without a length"))?;
        let length: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n > space + 1 && *n <= rest.len())
            .ok_or(LayerError::Pax("a PAX record with a bad length"))?;
        let record = &rest[space + 1..length];
        let record = record
            .strip_suffix(b"\n")
            .ok_or(LayerError::Pax("a PAX record not ending in a newline"))?;
        let equals = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or(LayerError::Pax("a PAX record without '='"))?;
        let key = std::str::from_utf8(&record[..equals])
            .map_err(|_| LayerError::Pax("a PAX key that is not UTF-8"))?;
        records.push((key.to_string(), record[equals + 1..].to_vec()));
        rest = &rest[length..];
    }
    Ok(records)
}

/// Owner, mode, extended attributes and modification time of the entry
/// (PAX `uid`/`gid`/`mtime` records override the header's).
pub(super) fn apply_metadata<R: Read>(
    entry: &tar::Entry<'_, R>,
    ext: &Extensions,
    path: &Path,
    kind: tar::EntryType,
    mode: u32,
) -> Result<(), EntryError> {
    let header = entry.header();
    let pax_number = |key: &str| -> Result<Option<u64>, EntryError> {
        match ext.pax_value(key) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| EntryError::PaxNumber(key.to_string())),
        }
    };
    // An empty owner field means 0 (as GNU tar reads it); garbage is an error.
    let blank = |field: &[u8]| field.iter().all(|b| *b == 0 || *b == b' ');
    let old = header.as_old();
    let uid = match (pax_number("uid")?, header.uid()) {
        (Some(uid), _) => uid,
        (None, Ok(uid)) => uid,
        (None, Err(_)) if blank(&old.uid) => 0,
        (None, Err(e)) => return Err(EntryError::Header(e)),
    };
    let gid = match (pax_number("gid")?, header.gid()) {
        (Some(gid), _) => gid,
        (None, Ok(gid)) => gid,
        (None, Err(_)) if blank(&old.gid) => 0,
        (None, Err(e)) => return Err(EntryError::Header(e)),
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
    .map_err(EntryError::sys("chown"))?;
    if kind != tar::EntryType::Symlink {
        // After chown, which clears set-id bits.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(EntryError::io("chmod"))?;
    }
    for (key, value) in &ext.pax {
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            xattr::set(path, name, value).map_err(|e| EntryError::Xattr(name.to_string(), e))?;
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
    .map_err(EntryError::sys("mtime"))?;
    Ok(())
}
