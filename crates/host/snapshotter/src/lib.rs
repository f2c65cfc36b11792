//! `kabuto-snapshotter`: a containerd proxy snapshotter. It behaves as
//! containerd's overlayfs snapshotter (same directory layout and mounts),
//! except for layers of images the guest pulls itself (see
//! [`guest_pull`]): those it records as committed without content and
//! answers AlreadyExists, the remote-snapshotter convention that makes
//! containerd skip fetching and unpacking them. So a CRI `PullImage` of an
//! encrypted image succeeds on containerd 1.6 without the host ever
//! fetching its layers, and the shim passes only the image reference to
//! the guest.
//!
//! Not supported: `Cleanup` (orphaned directories are removed at start),
//! filter operators other than `==`, `!=` and presence, rootless mounts.

pub mod guest_pull;
mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use containerd_snapshots::{api::types::Mount, tonic, Info, Usage};

pub use guest_pull::GuestPullPolicy;
use store::{Kind, Record, Store};

/// Marks the layers left to the guest (visible in `ctr snapshots info`).
pub const GUEST_PULLED_LABEL: &str = "kabuto.io/guest-pulled";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("image manifest: {0}")]
    Manifest(String),
    #[error("metadata store: {0}")]
    Store(String),
    #[error("{context}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl From<SnapshotError> for tonic::Status {
    fn from(e: SnapshotError) -> tonic::Status {
        let message = e.to_string();
        match e {
            SnapshotError::NotFound(_) => tonic::Status::not_found(message),
            SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(message),
            SnapshotError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            SnapshotError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            SnapshotError::Manifest(_) | SnapshotError::Store(_) | SnapshotError::Io { .. } => {
                tonic::Status::internal(message)
            }
        }
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let context = context.into();
    move |source| SnapshotError::Io { context, source }
}

pub struct KabutoSnapshotter {
    snapshots_dir: PathBuf,
    store: Store,
    guest_pull: GuestPullPolicy,
    /// The kernel's overlay has an index feature; containerd turns it off.
    overlay_index_off: bool,
}

impl KabutoSnapshotter {
    /// Opens (or creates) the snapshotter under `root` and removes
    /// directories no record names (left by a crash mid-prepare or
    /// mid-remove).
    pub fn open(root: &Path, guest_pull: GuestPullPolicy) -> Result<Self, SnapshotError> {
        let snapshots_dir = root.join("snapshots");
        // Image contents (setuid binaries included) are for root only, as
        // containerd keeps its own (CVE-2021-41103).
        for dir in [root, snapshots_dir.as_path()] {
            use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(io(format!("creating {}", dir.display())))?;
        }
        let store = Store::open(&root.join("metadata.redb"))?;
        let known: std::collections::HashSet<String> = store
            .all()?
            .into_iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        for entry in std::fs::read_dir(&snapshots_dir)
            .map_err(io(format!("reading {}", snapshots_dir.display())))?
        {
            let entry = entry.map_err(io("reading the snapshots directory"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                log::info!("removing orphaned snapshot directory {name}");
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                // Not fatal: a leftover must not stop every later pull.
                if let Err(e) = removed {
                    log::warn!("cannot remove {}: {e}", path.display());
                }
            }
        }
        Ok(KabutoSnapshotter {
            snapshots_dir,
            store,
            guest_pull,
            overlay_index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        })
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    fn info(key: String, r: Record) -> Info {
        Info {
            kind: match r.kind {
                Kind::View => containerd_snapshots::Kind::View,
                Kind::Active => containerd_snapshots::Kind::Active,
                Kind::Committed => containerd_snapshots::Kind::Committed,
            },
            name: key,
            parent: r.parent,
            labels: r.labels,
            created_at: r.created,
            updated_at: r.updated,
        }
    }

    fn get(&self, key: &str) -> Result<Record, SnapshotError> {
        self.store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))
    }

    /// Keys and records of `parent` and its ancestors, nearest first.
    fn ancestors(&self, mut parent: String) -> Result<Vec<(String, Record)>, SnapshotError> {
        let mut records = Vec::new();
        while !parent.is_empty() {
            let r = self.get(&parent)?;
            let next = r.parent.clone();
            records.push((parent, r));
            parent = next;
        }
        Ok(records)
    }

    /// The mounts of `r`, whose ancestors are `ancestors` (nearest first).
    fn mounts_of(
        &self,
        key: &str,
        r: &Record,
        ancestors: &[(String, Record)],
    ) -> Result<Vec<Mount>, SnapshotError> {
        let parents: Vec<u64> = ancestors.iter().map(|(_, a)| a.id).collect();
        let fs = |id: u64| self.dir(id).join("fs").display().to_string();
        let bind = |id: u64, mode: &str| Mount {
            r#type: "bind".into(),
            source: fs(id),
            target: String::new(),
            options: vec![mode.into(), "rbind".into()],
        };
        let lowerdir = format!(
            "lowerdir={}",
            parents.iter().map(|&p| fs(p)).collect::<Vec<_>>().join(":")
        );
        let mut options = Vec::new();
        if self.overlay_index_off {
            options.push("index=off".to_string());
        }
        Ok(match (r.kind, parents.as_slice()) {
            (Kind::Committed, _) => {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} is committed: it has no mounts"
                )))
            }
            (Kind::Active, []) => vec![bind(r.id, "rw")],
            (Kind::View, []) => vec![bind(r.id, "ro")],
            (Kind::View, [only]) => vec![bind(*only, "ro")],
            (Kind::View, _) => {
                options.push(lowerdir);
                vec![overlay(options)]
            }
            (Kind::Active, _) => {
                let dir = self.dir(r.id);
                options.push(format!("workdir={}", dir.join("work").display()));
                options.push(format!("upperdir={}", dir.join("fs").display()));
                options.push(lowerdir);
                vec![overlay(options)]
            }
        })
    }

    fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("empty snapshot key".into()));
        }
        let target = labels.get(guest_pull::SNAPSHOT_REF).cloned();
        let guest_pulled = match &target {
            Some(_) if kind == Kind::Active => self.guest_pull.reason(&labels)?,
            _ => None,
        };
        let ancestors = self.ancestors(parent.clone())?;
        // containerd names layer snapshots by chain id, so an image sharing
        // layers with a guest-pulled one finds them present (and empty):
        // unpacking more layers on top would make a rootfs with holes.
        if target.is_some() && guest_pulled.is_none() {
            if let Some((key, shared)) = ancestors.iter().find(|(_, a)| a.guest_pulled) {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "{} shares layer {} with an image whose layers only its guests pull \
                     (never unpacked here); unpack it with another snapshotter or namespace \
                     (containerd >= 1.7: per-runtime snapshotters)",
                    labels
                        .get(guest_pull::CRI_IMAGE_REF)
                        .map_or("this image", String::as_str),
                    shared.labels.get(guest_pull::SNAPSHOT_REF).unwrap_or(key)
                )));
            }
        }
        let owner = ancestors.first().map(|(_, p)| self.dir(p.id).join("fs"));
        let id = self.store.next_id()?;
        let dir = self.dir(id);
        let made = make_fs_dir(&dir.join("fs"), owner.as_deref()).and_then(|()| match kind {
            Kind::Active if guest_pulled.is_none() => std::fs::create_dir(dir.join("work")),
            _ => Ok(()),
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(io(format!("creating {}", dir.display()))(e));
        }
        let now = SystemTime::now();
        let mut record = Record {
            id,
            kind,
            parent,
            labels,
            created: now,
            updated: now,
            usage: None,
            guest_pulled: guest_pulled.is_some(),
        };
        if let Some(why) = &guest_pulled {
            // Committed under the key containerd proposed; it finds it by
            // its snapshot.ref label and parent.
            record.kind = Kind::Committed;
            record.usage = Some((0, 1));
            record
                .labels
                .insert(GUEST_PULLED_LABEL.into(), "true".into());
            log::info!(
                "layer {} left to the guest ({why})",
                target.as_deref().unwrap_or_default()
            );
        }
        if let Err(e) = self.store.insert(&key, &record) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        if guest_pulled.is_some() {
            return Err(SnapshotError::AlreadyExists(target.unwrap_or_default()));
        }
        self.mounts_of(&key, &record, &ancestors)
    }
}

/// A snapshot's `fs` directory: mode 0755 whatever the umask, owned as its
/// parent's root (as containerd's overlay snapshotter makes it).
fn make_fs_dir(fs: &Path, parent_fs: Option<&Path>) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    std::fs::create_dir_all(fs)?;
    std::fs::set_permissions(fs, std::fs::Permissions::from_mode(0o755))?;
    if let Some(parent) = parent_fs {
        let meta = std::fs::metadata(parent)?;
        std::os::unix::fs::lchown(fs, Some(meta.uid()), Some(meta.gid()))?;
    }
    Ok(())
}

fn overlay(options: Vec<String>) -> Mount {
    Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }
}

/// Bytes and inodes under `dir`, each inode counted once (as containerd's
/// fs.DiskUsage).
fn disk_usage(dir: &Path) -> Result<(i64, i64), SnapshotError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut bytes = 0i64;
    let mut inodes = 0i64;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta =
            std::fs::symlink_metadata(&path).map_err(io(format!("stat {}", path.display())))?;
        if seen.insert((meta.dev(), meta.ino())) {
            inodes += 1;
            bytes += i64::try_from(meta.blocks() * 512).unwrap_or(i64::MAX);
        }
        if meta.is_dir() {
            for entry in
                std::fs::read_dir(&path).map_err(io(format!("reading {}", path.display())))?
            {
                stack.push(
                    entry
                        .map_err(io(format!("reading {}", path.display())))?
                        .path(),
                );
            }
        }
    }
    Ok((bytes, inodes))
}

/// One clause of a containerd filter: `field==value`, `field!=value` or
/// `field` (present).
#[derive(Debug)]
struct Clause {
    field: String,
    op: Option<(bool, String)>,
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .map_or_else(|| s.to_string(), |inner| inner.replace("\\\"", "\""))
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_filter(filter: &str) -> Result<Vec<Clause>, SnapshotError> {
    split_unquoted(filter, ',')
        .into_iter()
        .filter(|c| !c.trim().is_empty())
        .map(|clause| {
            if clause.contains("~=") {
                return Err(SnapshotError::InvalidArgument(format!(
                    "filter {filter:?}: regular-expression matches (~=) are not supported"
                )));
            }
            let (field, op) = if let Some((f, v)) = clause.split_once("!=") {
                (f, Some((false, unquote(v))))
            } else if let Some((f, v)) = clause.split_once("==") {
                (f, Some((true, unquote(v))))
            } else {
                (clause, None)
            };
            let field = field.trim();
            let field = match field.strip_prefix("labels.") {
                Some(label) => format!("labels.{}", unquote(label)),
                None => field.to_string(),
            };
            Ok(Clause { field, op })
        })
        .collect()
}

fn clause_holds(clause: &Clause, info: &Info) -> bool {
    let kind = match info.kind {
        containerd_snapshots::Kind::View => "view",
        containerd_snapshots::Kind::Active => "active",
        containerd_snapshots::Kind::Committed => "committed",
        containerd_snapshots::Kind::Unknown => "unknown",
    };
    let value = match clause.field.as_str() {
        "name" => Some(info.name.as_str()),
        "parent" => Some(info.parent.as_str()),
        "kind" => Some(kind),
        f => f
            .strip_prefix("labels.")
            .and_then(|l| info.labels.get(l).map(String::as_str)),
    };
    match (&clause.op, value) {
        (None, v) => v.is_some(),
        (Some((true, want)), v) => v == Some(want.as_str()),
        (Some((false, want)), v) => v.unwrap_or_default() != want,
    }
}

/// Filters are ORed; the clauses of one filter ANDed (containerd's rule).
fn filters_hold(filters: &[Vec<Clause>], info: &Info) -> bool {
    filters.is_empty()
        || filters
            .iter()
            .any(|clauses| clauses.iter().all(|c| clause_holds(c, info)))
}

pub type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info, SnapshotError>>>;

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for KabutoSnapshotter {
    type Error = SnapshotError;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        let r = self.get(&key)?;
        Ok(Self::info(key, r))
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        let paths = fieldpaths.unwrap_or_default();
        let key = info.name.clone();
        let r = self.store.update(&key, |r| {
            // containerd drops labels set to "".
            let given = || {
                info.labels
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<HashMap<_, _>>()
            };
            if paths.is_empty() {
                r.labels = given();
            }
            for path in &paths {
                if path == "labels" {
                    r.labels = given();
                } else if let Some(label) = path.strip_prefix("labels.") {
                    match info.labels.get(label).filter(|v| !v.is_empty()) {
                        Some(v) => r.labels.insert(label.to_string(), v.clone()),
                        None => r.labels.remove(label),
                    };
                } else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update {path:?} of snapshot {key:?}: only labels change"
                    )));
                }
            }
            if r.guest_pulled {
                r.labels.insert(GUEST_PULLED_LABEL.into(), "true".into());
            }
            Ok(())
        })?;
        Ok(Self::info(key, r))
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        let r = self.get(&key)?;
        let (size, inodes) = match r.usage {
            Some(u) => u,
            None => disk_usage(&self.dir(r.id).join("fs"))?,
        };
        Ok(Usage { inodes, size })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        let r = self.get(&key)?;
        let ancestors = self.ancestors(r.parent.clone())?;
        self.mounts_of(&key, &r, &ancestors)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::Active, key, parent, labels)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::View, key, parent, labels)
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        let r = self.get(&key)?;
        if r.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let usage = disk_usage(&self.dir(r.id).join("fs"))?;
        let labels = labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        self.store.commit(&name, &key, r.id, labels, usage)?;
        // The work directory is only for the mounted overlay.
        let _ = std::fs::remove_dir_all(self.dir(r.id).join("work"));
        Ok(())
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        let r = self.store.remove(&key)?;
        let dir = self.dir(r.id);
        // The record is gone; a crash before this line leaves an orphan
        // that the next start removes.
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                log::warn!("removing {}: {e} (removed at next start)", dir.display())
            }
            _ => {}
        }
        Ok(())
    }

    type InfoStream = InfoStream;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let filters = filters
            .iter()
            .map(|f| parse_filter(f))
            .collect::<Result<Vec<_>, _>>()?;
        let infos: Vec<Result<Info, SnapshotError>> = self
            .store
            .all()?
            .into_iter()
            .map(|(k, r)| Self::info(k, r))
            .filter(|i| filters_hold(&filters, i))
            .map(Ok)
            .collect();
        Ok(tokio_stream::iter(infos))
    }
}

#[cfg(test)]
mod tests;
