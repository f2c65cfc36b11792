//! `[shared_fs]`: the virtio-fs daemons.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How container root file systems reach the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedFsConfig {
    /// Only `virtio-fs` today (the Debian cloud kernel has no 9p).
    pub kind: SharedFsKind,
    /// The virtio-fs daemon.
    pub virtiofsd_path: PathBuf,
    /// virtiofsd cache mode of the shared directory (volumes, which the
    /// host may change while containers run: a ConfigMap update, say):
    /// `none`, `auto` or `always`.
    pub cache: CacheMode,
    /// virtiofsd cache mode of the containers' root filesystems, a second
    /// export: only the guest changes them while they run, so `always`
    /// lets the guest keep binaries in its page cache (with `auto`, each
    /// open drops them: every exec re-reads its binary over virtio-fs).
    pub rootfs_cache: CacheMode,
}

/// virtiofsd's `cache=` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    None,
    Auto,
    Always,
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::None => "none",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedFsKind {
    VirtioFs,
}

impl Default for SharedFsConfig {
    fn default() -> Self {
        SharedFsConfig {
            kind: SharedFsKind::VirtioFs,
            virtiofsd_path: PathBuf::from("/usr/lib/qemu/virtiofsd"),
            cache: CacheMode::Auto,
            rootfs_cache: CacheMode::Always,
        }
    }
}
