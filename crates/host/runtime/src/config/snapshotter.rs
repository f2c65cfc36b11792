//! `[snapshotter]`: kabuto-snapshotter's settings (in kabuto's file so one
//! config names every part of a node's kabuto).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `kabuto-snapshotter`, the containerd proxy snapshotter for CRI pulls of
/// images the guest pulls itself (containerd 1.6 has one CRI snapshotter
/// for all runtimes, so it must decide per image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    /// Snapshot directories and the metadata database.
    pub root: PathBuf,
    /// The gRPC socket containerd's `proxy_plugins` entry names.
    pub address: PathBuf,
    /// containerd's `root`: the snapshotter reads image manifests from its
    /// content store to see whether layers are encrypted.
    pub containerd_root: PathBuf,
    /// Images whose layers are never unpacked on the host (the guest pulls
    /// them): `*` for all, `PREFIX*`, a repository (`host/repo`) or an
    /// exact reference. Matched against CRI's image reference.
    pub guest_pull_images: Vec<String>,
    /// Also leave every image with an encrypted layer to the guest.
    pub guest_pull_encrypted: bool,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            root: PathBuf::from("/var/lib/kabuto/snapshotter"),
            address: PathBuf::from("/run/kabuto/snapshotter.sock"),
            containerd_root: PathBuf::from("/var/lib/containerd"),
            guest_pull_images: Vec::new(),
            guest_pull_encrypted: true,
        }
    }
}
