//! `kabuto check`: can this host run kabuto? Each finding comes with a fix.

use std::{io::Write, path::Path};

use kabuto_runtime::{
    config::{AgentChannel, Config, ImagePull},
    hypervisor,
};

/// Where containerd reads its config by default.
const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

struct Finding {
    ok: bool,
    what: String,
    fix: String,
}

fn on_path(program: &Path) -> bool {
    if program.components().count() > 1 {
        return program.is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn findings(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let qemu = &config.hypervisor.qemu_path;
    out.push(Finding {
        ok: qemu.is_file(),
        what: format!("QEMU at {}", qemu.display()),
        fix: "apt-get install qemu-system-x86 (or set hypervisor.qemu_path)".into(),
    });
    let (accel, why) = hypervisor::choose_accelerator(config.hypervisor.accelerator);
    out.push(Finding {
        ok: true,
        what: format!("accelerator: {why}"),
        fix: String::new(),
    });
    if accel == hypervisor::Accel::Tcg {
        out.push(Finding {
            ok: true,
            what: "TCG boots take ~1 CPU core each; KVM needs a CPU with VMX/SVM".into(),
            fix: String::new(),
        });
    }
    let vhost_vsock = Path::new("/dev/vhost-vsock").exists();
    let channel = match (config.agent.channel, vhost_vsock) {
        (AgentChannel::VhostVsock, _) | (AgentChannel::Auto, true) => "kernel vhost-vsock",
        _ => "vhost-user vsock device",
    };
    out.push(Finding {
        ok: !matches!(config.agent.channel, AgentChannel::VhostVsock) || vhost_vsock,
        what: format!(
            "agent channel: {channel} (/dev/vhost-vsock {})",
            if vhost_vsock { "present" } else { "absent" }
        ),
        fix: "modprobe vhost_vsock, or set agent.channel = \"auto\"".into(),
    });
    if channel != "kernel vhost-vsock" {
        out.push(Finding {
            ok: on_path(&config.agent.vhost_user_vsock_path)
                || Path::new("/usr/local/bin/vhost-device-vsock").is_file(),
            what: format!(
                "vhost-user vsock device {}",
                config.agent.vhost_user_vsock_path.display()
            ),
            fix: "cargo install vhost-device-vsock --version 0.3.0 --locked".into(),
        });
    }
    out.push(Finding {
        ok: config.shared_fs.virtiofsd_path.is_file(),
        what: format!("virtiofsd at {}", config.shared_fs.virtiofsd_path.display()),
        fix: "apt-get install qemu-system-common (Debian 12 ships virtiofsd there)".into(),
    });
    // No host cgroup check: containers' cgroups (v2) live in the guest
    // kernel; the host only runs QEMU and its helpers.
    for (what, path) in [
        ("guest kernel", &config.guest.kernel),
        ("guest initramfs", &config.guest.initramfs),
    ] {
        out.push(Finding {
            ok: path.is_file(),
            what: format!("{what} {}", path.display()),
            fix: "cargo build --release && target/release/kabuto guest build && target/release/kabuto install".into(),
        });
    }
    out.push(Finding {
        ok: on_path(Path::new("containerd-shim-kabuto-v2")),
        what: "containerd-shim-kabuto-v2 on PATH".into(),
        fix: "target/release/kabuto install".into(),
    });
    if config.confidential.image_pull == ImagePull::Guest {
        out.extend(cri_guest_pull_findings(
            config,
            Path::new(CONTAINERD_CONFIG),
        ));
    }
    out
}

/// Whether containerd's CRI plugin (config at `containerd_config`) unpacks
/// with kabuto-snapshotter, as Kubernetes pods of guest-pulled encrypted
/// images need. Not using it is no failure (ctr needs none of it).
fn cri_guest_pull_findings(config: &Config, containerd_config: &Path) -> Vec<Finding> {
    let doc: toml::Table = std::fs::read_to_string(containerd_config)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_default();
    let get = |path: &[&str]| {
        let (first, rest) = path.split_first()?;
        rest.iter().try_fold(doc.get(*first)?, |v, k| v.get(*k))
    };
    let cri = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];
    let snapshotter = get(&[&cri[..], &["snapshotter"]].concat()).and_then(|v| v.as_str());
    if snapshotter != Some("kabuto") {
        return vec![Finding {
            ok: true,
            what: format!(
                "CRI unpacks with {:?}, not kabuto-snapshotter: Kubernetes pods cannot run \
                 encrypted images (ctr can); see crates/host/snapshotter/README.md",
                snapshotter.unwrap_or("overlayfs")
            ),
            fix: String::new(),
        }];
    }
    let annotations = get(&[&cri[..], &["disable_snapshot_annotations"]].concat())
        .and_then(|v| v.as_bool())
        == Some(false);
    let proxy = get(&["proxy_plugins", "kabuto", "address"]).and_then(|v| v.as_str());
    let socket = &config.snapshotter.address;
    vec![
        Finding {
            ok: annotations,
            what: "CRI passes image references to snapshotters".into(),
            fix: format!("set disable_snapshot_annotations = false under [plugins.\"io.containerd.grpc.v1.cri\".containerd] in {}", containerd_config.display()),
        },
        Finding {
            ok: proxy == Some(&*socket.to_string_lossy()),
            what: format!("containerd's proxy plugin kabuto at {}", socket.display()),
            fix: format!(
                "[proxy_plugins.kabuto] type = \"snapshot\", address = \"{}\" in {}",
                socket.display(),
                containerd_config.display()
            ),
        },
        Finding {
            ok: socket.exists(),
            what: format!("kabuto-snapshotter serving at {}", socket.display()),
            fix: "systemctl enable --now kabuto-snapshotter".into(),
        },
    ]
}

/// Prints the findings; true when nothing blocks running pods.
pub fn run(config: &Config, out: &mut impl Write) -> std::io::Result<bool> {
    let mut all_ok = true;
    for f in findings(config) {
        all_ok &= f.ok;
        if f.ok {
            writeln!(out, "ok    {}", f.what)?;
        } else {
            writeln!(out, "FAIL  {}\n      fix: {}", f.what, f.fix)?;
        }
    }
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings_for(containerd_toml: &str, socket: &Path) -> Vec<(bool, String)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, containerd_toml).expect("write");
        let mut config = Config::default();
        config.snapshotter.address = socket.to_path_buf();
        cri_guest_pull_findings(&config, &path)
            .into_iter()
            .map(|f| (f.ok, f.what))
            .collect()
    }

    #[test]
    fn cri_setup_for_guest_pulls_is_checked_against_containerds_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("snapshotter.sock");
        let not_used = findings_for("version = 2\n", &socket);
        assert_eq!(not_used.len(), 1);
        assert!(not_used[0].0 && not_used[0].1.contains("\"overlayfs\""));

        let good = format!(
            "version = 2\n[proxy_plugins.kabuto]\ntype = \"snapshot\"\naddress = \"{}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"kabuto\"\n\
             disable_snapshot_annotations = false\n",
            socket.display()
        );
        std::fs::write(&socket, b"").expect("socket stand-in");
        assert!(findings_for(&good, &socket).iter().all(|(ok, _)| *ok));
        std::fs::remove_file(&socket).expect("remove");
        let down = findings_for(&good, &socket);
        assert_eq!(down.iter().filter(|(ok, _)| !ok).count(), 1);
        assert!(down.iter().any(|(ok, w)| !ok && w.contains("serving at")));

        let no_annotations = good.replace("disable_snapshot_annotations = false\n", "");
        let found = findings_for(&no_annotations, &socket);
        assert!(found
            .iter()
            .any(|(ok, w)| !ok && w.contains("image references")));
        let wrong_socket = good.replace(&socket.display().to_string(), "/elsewhere.sock");
        assert!(findings_for(&wrong_socket, &socket)
            .iter()
            .any(|(ok, w)| !ok && w.contains("proxy plugin")));
    }
}
