//! `kabuto check`: can this host run kabuto? Each finding comes with a fix.

use std::{io::Write, path::Path};

use kabuto_runtime::{
    config::{AgentChannel, Config},
    hypervisor,
};

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
    out
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
