//! Turns the OCI spec containerd wrote for the host into the one the guest
//! agent applies.
//!
//! What changes, and why:
//! - `root.path` points at the container's root in the guest's root
//!   filesystems export (`GUEST_ROOTFS_DIR/<container id>`).
//! - Bind mounts of host paths are shared into the guest and re-pointed;
//!   other mounts (proc, tmpfs, devpts, ...) are made by the guest as asked.
//! - Hooks are dropped: they are host programs and cannot run in the guest.
//! - Host namespace paths, AppArmor profiles and SELinux labels name host
//!   objects; they are removed (the guest has its own kernel and LSM state).

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("reading the OCI spec {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("invalid OCI spec: {0}")]
    Invalid(String),
}

/// A host path to bind into the sandbox's shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBind {
    pub host_source: PathBuf,
    /// Relative to the sandbox's shared directory.
    pub shared_path: PathBuf,
    pub readonly: bool,
}

/// The guest's view of one container.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Spec,
    pub binds: Vec<SharedBind>,
    pub dropped: Vec<String>,
}

/// Reads and checks `config.json` from a bundle.
/// `image_supplies_args`: the guest pulls the image and fills empty args
/// from its Entrypoint and Cmd.
pub fn load(bundle: &Path, image_supplies_args: bool) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|e| SpecError::Read {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    validate(&spec, image_supplies_args)?;
    Ok(spec)
}

/// Refuses specs the guest could never run, before any VM work is done.
pub fn validate(spec: &Spec, image_supplies_args: bool) -> Result<(), SpecError> {
    if !spec.version().starts_with("1.") {
        return Err(SpecError::Invalid(format!(
            "ociVersion {:?} is not supported (need 1.x)",
            spec.version()
        )));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::Invalid("no process".into()))?;
    if !image_supplies_args && process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::Invalid("process.args is empty".into()));
    }
    if spec.root().is_none() {
        return Err(SpecError::Invalid("no root".into()));
    }
    for m in spec.mounts().iter().flatten() {
        if !m.destination().is_absolute() {
            return Err(SpecError::Invalid(format!(
                "mount destination {} is not absolute",
                m.destination().display()
            )));
        }
    }
    Ok(())
}

fn is_bind(options: &Option<Vec<String>>) -> bool {
    options
        .iter()
        .flatten()
        .any(|o| o == "bind" || o == "rbind")
}

/// Rewrites `host` for the guest. `container_id` names the container's
/// subdirectory of the shared directory (its bind sources), which the guest
/// sees at `guest_shared_dir`, and its root in the root filesystems export.
pub fn to_guest(
    host: &Spec,
    container_id: &str,
    guest_shared_dir: &Path,
    image_supplies_args: bool,
) -> Result<GuestSpec, SpecError> {
    validate(host, image_supplies_args)?;
    let mut spec = host.clone();
    let mut dropped = Vec::new();

    if let Some(root) = spec.root_mut() {
        root.set_path(Path::new(kabuto_protocol::GUEST_ROOTFS_DIR).join(container_id));
    }

    let mut binds = Vec::new();
    if let Some(mounts) = spec.mounts_mut() {
        for (index, m) in mounts.iter_mut().enumerate() {
            let Some(source) = m.source().clone() else {
                continue;
            };
            if !is_bind(m.options()) {
                continue;
            }
            let name = m
                .destination()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "root".into());
            let shared_path = PathBuf::from(container_id)
                .join("mounts")
                .join(format!("{index}-{name}"));
            let readonly = m.options().iter().flatten().any(|o| o == "ro");
            binds.push(SharedBind {
                host_source: source,
                shared_path: shared_path.clone(),
                readonly,
            });
            m.set_source(Some(guest_shared_dir.join(&shared_path)));
        }
    }

    if spec.hooks().is_some() {
        dropped.push("hooks (host programs cannot run in the guest)".into());
        spec.set_hooks(None);
    }
    if let Some(process) = spec.process_mut() {
        if process.apparmor_profile().is_some() {
            dropped.push("process.apparmorProfile (a host LSM profile)".into());
            process.set_apparmor_profile(None);
        }
        if process.selinux_label().is_some() {
            dropped.push("process.selinuxLabel (a host LSM label)".into());
            process.set_selinux_label(None);
        }
    }
    if let Some(linux) = spec.linux_mut() {
        if linux.mount_label().is_some() {
            linux.set_mount_label(None);
        }
        if let Some(namespaces) = linux.namespaces_mut() {
            for ns in namespaces.iter_mut() {
                if ns.path().is_some() {
                    dropped.push(format!("host path of the {:?} namespace", ns.typ()));
                    ns.set_path(None);
                }
            }
        }
    }
    Ok(GuestSpec {
        spec,
        binds,
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTR_SPEC: &str = r#"{
        "ociVersion": "1.1.0",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["uname", "-r"],
            "env": ["PATH=/bin"], "cwd": "/", "apparmorProfile": "cri-containerd.apparmor.d"},
        "root": {"path": "rootfs"},
        "hostname": "t1",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]}
        ],
        "hooks": {"prestart": [{"path": "/usr/bin/true"}]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}
    }"#;

    fn host_spec() -> Spec {
        serde_json::from_str(CTR_SPEC).expect("test spec parses")
    }

    #[test]
    fn rewrites_root_and_binds() {
        let g = to_guest(&host_spec(), "c1", Path::new("/run/kabuto/shared"), false)
            .expect("guest spec");
        assert_eq!(
            g.spec.root().as_ref().map(|r| r.path().clone()),
            Some(PathBuf::from("/run/kabuto/rootfs/c1"))
        );
        assert_eq!(g.binds.len(), 2);
        assert_eq!(g.binds[0].host_source, PathBuf::from("/var/lib/x/hosts"));
        assert!(g.binds[0].readonly);
        assert!(!g.binds[1].readonly);
        let mounts = g.spec.mounts().as_ref().expect("mounts");
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("/run/kabuto/shared/c1/mounts/1-hosts"))
        );
    }

    #[test]
    fn drops_host_only_settings() {
        let g = to_guest(&host_spec(), "c1", Path::new("/s"), false).expect("guest spec");
        assert!(g.spec.hooks().is_none());
        let process = g.spec.process().as_ref().expect("process");
        assert!(process.apparmor_profile().is_none());
        let namespaces = g
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .expect("ns");
        assert!(namespaces.iter().all(|n| n.path().is_none()));
        assert_eq!(g.dropped.len(), 3, "{:?}", g.dropped);
    }

    #[test]
    fn refuses_invalid_specs() {
        let mut spec = host_spec();
        spec.set_version("2.0.0".into());
        assert!(to_guest(&spec, "c", Path::new("/s"), false).is_err());

        let mut spec = host_spec();
        if let Some(p) = spec.process_mut() {
            p.set_args(Some(vec![]));
        }
        let err = to_guest(&spec, "c", Path::new("/s"), false).expect_err("empty args");
        assert!(err.to_string().contains("process.args"), "{err}");
        // Unless the guest pulls the image, whose Entrypoint/Cmd fill them.
        assert!(to_guest(&spec, "c", Path::new("/s"), true).is_ok());

        let mut spec = host_spec();
        spec.set_process(None);
        assert!(to_guest(&spec, "c", Path::new("/s"), false).is_err());
    }
}
