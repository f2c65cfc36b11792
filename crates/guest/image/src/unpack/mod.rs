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

mod entry;
mod error;
mod paths;
mod pax;

use std::{
    collections::HashSet,
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
};

pub use error::{EntryError, LayerError, UnpackError};
use pax::{parse_pax, read_extension, Extensions};

/// At most this many symlinks are followed resolving one path (Linux's
/// limit), so a loop is an error, not a hang.
const MAX_SYMLINKS: usize = 40;

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
    let layer_err = |reason: LayerError| UnpackError::Layer {
        layer: "(rootfs)".into(),
        reason,
    };
    if root.exists() {
        return Err(root_error(layer_err(LayerError::RootExists(
            root.to_path_buf(),
        ))));
    }
    if let Err(e) = fs::create_dir_all(root) {
        return Err(root_error(layer_err(LayerError::Root(
            root.to_path_buf(),
            e,
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
    let layer_err = |reason: LayerError| UnpackError::Layer {
        layer: layer.digest.into(),
        reason,
    };
    let compression = Compression::from_media_type(layer.media_type)
        .ok_or_else(|| layer_err(LayerError::MediaType(layer.media_type.to_string())))?;
    let reader = compression
        .reader(layer.data)
        .map_err(|e| layer_err(LayerError::Decompress(e)))?;
    let mut archive = tar::Archive::new(reader);
    // Paths this layer created: an opaque whiteout keeps them.
    let mut created: HashSet<PathBuf> = HashSet::new();
    // Raw entries: GNU long names and PAX records are read here, bounded
    // (the tar crate reads any size into memory, and a 4 GiB PAX header
    // gzips to a few MB).
    let entries = archive
        .entries()
        .map_err(|e| layer_err(LayerError::Tar(e)))?
        .raw(true);
    let mut pending = Extensions::default();
    let mut count: u64 = 0;
    for entry in entries {
        let mut entry = entry.map_err(|e| layer_err(LayerError::Tar(e)))?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(layer_err(LayerError::TooManyEntries));
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
                return Err(layer_err(LayerError::Sparse));
            }
            _ => {}
        }
        let ext = std::mem::take(&mut pending);
        entry::apply(layer, root, options, &mut created, entry, &ext)?;
    }
    Ok(())
}

/// Longest GNU long name / long link / PAX header read (each).
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// Most tar entries in one layer.
pub const MAX_ENTRIES: u64 = 4_000_000;
