//! The pause process of confidential pods, and the container it runs in.
//!
//! In a confidential pod the sandbox ("pause") container shares its network,
//! IPC and UTS namespaces with every container of the pod — and with the
//! data hub, which serves secrets on the pod's loopback. Its binary must
//! therefore not come from the host: the agent runs the guest image's own
//! static `kabuto-pause` (crates/guest/pause) on a root holding nothing
//! else ([`GUEST_PAUSE_ROOT`], part of the measured initramfs) and ignores
//! the host's root filesystem, process and bind mounts for that container.
//! (Upstream Kata's guest does the same with a pause bundle in its image.)

use std::path::Path;

use kabuto_protocol::GUEST_PAUSE_ROOT;
use oci_spec::runtime::{Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder};

use crate::error::{AgentError, Result};

/// The pause program in the guest image (`kabuto-pause`, static).
pub const PAUSE_BINARY: &str = "/pause-bundle/rootfs/pause";

/// The annotation containerd's CRI plugin sets on a pod's containers.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// True for the pod's sandbox container as CRI marks it. The host could
/// mark a workload as the sandbox: that workload then runs our pause
/// instead — the host only denies service to itself.
pub fn is_sandbox_container(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(CONTAINER_TYPE))
        .is_some_and(|t| t == "sandbox")
}

fn no_capabilities() -> std::collections::HashSet<oci_spec::runtime::Capability> {
    std::collections::HashSet::new()
}

fn mount_of(destination: &str, typ: &str, options: &[&str]) -> Result<Mount> {
    MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(typ)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(|e| AgentError::InvalidArgument(format!("pause mount {destination}: {e}")))
}

/// The host's sandbox spec with everything that could run host code or
/// reach host files replaced: the guest's pause process on the guest's
/// root (read-only), a fixed set of kernel file systems, no devices, no
/// hooks. Namespaces, hostname, sysctls, resources and annotations stay
/// (what the policy judged).
pub fn guest_pause_spec(spec: Spec) -> Result<Spec> {
    if !Path::new(PAUSE_BINARY).is_file() {
        return Err(AgentError::InvalidArgument(format!(
            "the guest image has no {PAUSE_BINARY}: rebuild it with `kabuto guest build`"
        )));
    }
    pause_spec(spec, Path::new(GUEST_PAUSE_ROOT))
}

/// [`guest_pause_spec`] on the pause root `root`.
fn pause_spec(mut spec: Spec, root: &Path) -> Result<Spec> {
    let invalid =
        |e: oci_spec::OciSpecError| AgentError::InvalidArgument(format!("pause spec: {e}"));
    let process = ProcessBuilder::default()
        .args(vec!["/pause".to_string()])
        .env(vec!["PATH=/".to_string()])
        .cwd("/")
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(invalid)?,
        )
        .no_new_privileges(true)
        .terminal(false)
        .capabilities(
            oci_spec::runtime::LinuxCapabilitiesBuilder::default()
                .bounding(no_capabilities())
                .effective(no_capabilities())
                .permitted(no_capabilities())
                .inheritable(no_capabilities())
                .ambient(no_capabilities())
                .build()
                .map_err(invalid)?,
        )
        .build()
        .map_err(invalid)?;
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path(root)
            .readonly(true)
            .build()
            .map_err(invalid)?,
    ));
    spec.set_mounts(Some(vec![
        mount_of("/proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount_of(
            "/dev",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
    ]));
    spec.set_hooks(None);
    if let Some(linux) = spec.linux_mut() {
        linux.set_devices(None);
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_container_is_found_by_its_cri_annotation() {
        let mut spec = Spec::default();
        assert!(!is_sandbox_container(&spec));
        spec.set_annotations(Some(
            [(CONTAINER_TYPE.to_string(), "sandbox".to_string())].into(),
        ));
        assert!(is_sandbox_container(&spec));
        spec.set_annotations(Some(
            [(CONTAINER_TYPE.to_string(), "container".to_string())].into(),
        ));
        assert!(!is_sandbox_container(&spec));
    }

    #[test]
    fn the_hosts_pause_is_replaced_by_the_guests() {
        let host: Spec = serde_json::from_str(
            r#"{"ociVersion": "1.1.0",
                "process": {"args": ["/pause"], "cwd": "/", "env": ["LD_PRELOAD=/x.so"],
                            "user": {"uid": 65535, "gid": 65535},
                            "capabilities": {"bounding": ["CAP_SYS_ADMIN"]}},
                "root": {"path": "/run/kabuto/rootfs/p"},
                "hostname": "pod",
                "mounts": [{"destination": "/etc/resolv.conf", "type": "bind",
                            "source": "/run/kabuto/shared/p/resolv", "options": ["rbind"]}],
                "hooks": {"createRuntime": [{"path": "/bin/evil"}]},
                "linux": {"namespaces": [{"type": "network"}, {"type": "ipc"}, {"type": "uts"}],
                          "devices": [{"path": "/dev/sev-guest", "type": "c", "major": 10, "minor": 1}],
                          "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0"}}}"#,
        )
        .expect("spec");
        let spec = pause_spec(host, Path::new(GUEST_PAUSE_ROOT)).expect("pause spec");
        let process = spec.process().as_ref().expect("process");
        assert_eq!(process.args().as_deref(), Some(&["/pause".to_string()][..]));
        assert_eq!(process.env().as_deref(), Some(&["PATH=/".to_string()][..]));
        assert_eq!(process.user().uid(), 0);
        assert!(process
            .capabilities()
            .as_ref()
            .and_then(|c| c.bounding().as_ref())
            .is_some_and(|b| b.is_empty()));
        let root = spec.root().as_ref().expect("root");
        assert_eq!(root.path(), Path::new(GUEST_PAUSE_ROOT));
        assert_eq!(root.readonly(), Some(true));
        let mounts = spec.mounts().as_ref().expect("mounts");
        assert!(
            mounts.iter().all(|m| m.typ().as_deref() != Some("bind")),
            "{mounts:?}"
        );
        assert!(spec.hooks().is_none());
        let linux = spec.linux().as_ref().expect("linux");
        assert!(linux.devices().is_none());
        assert_eq!(
            linux.namespaces().as_ref().map(Vec::len),
            Some(3),
            "namespaces stay"
        );
        assert_eq!(spec.hostname().as_deref(), Some("pod"));
        assert!(
            linux.sysctl().is_some(),
            "sysctls stay: the policy judged them"
        );
    }
}
