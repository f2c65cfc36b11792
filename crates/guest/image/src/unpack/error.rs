//! Why a layer, or one entry of it, is refused or could not be applied.

use std::io;
use std::path::PathBuf;

use super::{MAX_ENTRIES, MAX_EXTENSION_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: entry {entry:?}")]
    Entry {
        layer: String,
        entry: String,
        #[source]
        reason: EntryError,
    },
    #[error("layer {layer}")]
    Layer {
        layer: String,
        #[source]
        reason: LayerError,
    },
}

/// What is wrong with a layer as a whole (its stream or its extensions).
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("media type {0} is not a layer")]
    MediaType(String),
    #[error("decompressing")]
    Decompress(#[source] io::Error),
    #[error("reading the tar stream")]
    Tar(#[source] io::Error),
    #[error("more than {MAX_ENTRIES} tar entries in one layer")]
    TooManyEntries,
    #[error("GNU sparse entries are not supported")]
    Sparse,
    #[error("{what}")]
    Extension {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a {what} of {size} bytes (more than {MAX_EXTENSION_BYTES})")]
    ExtensionTooLarge { what: &'static str, size: u64 },
    /// A malformed PAX record: what is wrong with it.
    #[error("{0}")]
    Pax(&'static str),
    #[error("{} already exists", .0.display())]
    RootExists(PathBuf),
    #[error("creating {}", .0.display())]
    Root(PathBuf, #[source] io::Error),
}

/// Why one entry is refused or could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("the name contains `..`")]
    DotDot,
    #[error("not a Unix path")]
    NotUnix,
    #[error("a symlink on its path climbs above the root")]
    SymlinkClimbs,
    #[error("too many levels of symlinks on its path")]
    SymlinkLoop,
    #[error("{} on its path is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("a PAX size that differs from the header's is not supported")]
    PaxSize,
    #[error("PAX {0} is not a number")]
    PaxNumber(String),
    #[error("whiteout {0:?} names no entry of its directory")]
    Whiteout(String),
    #[error("hard link without a target")]
    NoLinkTarget,
    #[error("hard link target")]
    LinkTarget(#[source] Box<EntryError>),
    #[error("hard link to the root")]
    LinkToRoot,
    #[error("hard link target {}", .0.display())]
    LinkTargetMissing(PathBuf, #[source] io::Error),
    #[error("hard link to a directory")]
    LinkToDirectory,
    #[error("symlink without a target")]
    NoSymlinkTarget,
    #[error("device nodes are not allowed")]
    Device,
    #[error("unsupported entry type {0}")]
    EntryType(String),
    #[error("the header")]
    Header(#[source] io::Error),
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
    #[error("{0}")]
    Sys(&'static str, #[source] nix::Error),
    #[error("xattr {0}")]
    Xattr(String, #[source] io::Error),
}

impl EntryError {
    pub(super) fn io(what: &'static str) -> impl FnOnce(io::Error) -> EntryError {
        move |e| EntryError::Io(what, e)
    }

    pub(super) fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> EntryError {
        move |e| EntryError::Sys(what, e)
    }
}
