//! The QEMU driver: renders a [`VmSpec`] into a QEMU command line and
//! controls the running VM over QMP.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{
    Accel, Hypervisor, HypervisorError, NetworkNamespace, TeeLaunch, Vm, VmSpec, VsockBackend,
};
use crate::config::{HypervisorConfig, MachineType};

pub struct Qemu {
    binary: PathBuf,
    machine: MachineType,
}

impl Qemu {
    pub fn new(config: &HypervisorConfig) -> Self {
        Qemu {
            binary: config.qemu_path.clone(),
            machine: config.machine,
        }
    }
}

/// Kernel parameters the driver always sets: a quiet, fast boot straight
/// into the agent.
fn driver_kernel_params(machine: MachineType, accel: Accel, tsc_khz: Option<u64>) -> Vec<String> {
    let mut params: Vec<String> = [
        "console=ttyS0",
        "reboot=k",
        "panic=-1",
        "quiet",
        "rdinit=/init",
        // The crypto self-tests cost ~0.3 s of boot under TCG.
        "cryptomgr.notests",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "i8042.dumbkbd",
        "random.trust_cpu=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if machine == MachineType::Microvm {
        params.push("pci=off".into());
        if accel == Accel::Tcg {
            if let Some(khz) = tsc_khz {
                params.push(format!("tsc_early_khz={khz}"));
            }
        }
    }
    params
}

/// The guest kernel command line QEMU passes (`-append`): the driver's
/// parameters, then `guest_params`. A TEE launch measures exactly this text
/// (SNP kernel-hashes, TDX RTMR2), so `kabuto guest measure` uses it too.
pub fn kernel_command_line(
    machine: MachineType,
    accel: Accel,
    tsc_khz: Option<u64>,
    guest_params: &[String],
) -> String {
    let mut params = driver_kernel_params(machine, accel, tsc_khz);
    params.extend(guest_params.iter().cloned());
    params.join(" ")
}

/// The QEMU command line for `spec`, as data so it can be tested.
pub fn command_line(machine: MachineType, spec: &VmSpec, tsc_khz: Option<u64>) -> Vec<String> {
    // rtc=on: without a CMOS RTC the guest spends ~2 s probing for one.
    let (machine_arg, mmio) = match machine {
        MachineType::Microvm => (
            "microvm,x-option-roms=off,rtc=on,isa-serial=on,acpi=on,memory-backend=mem",
            true,
        ),
        MachineType::Q35 => ("q35,memory-backend=mem", false),
    };
    let (accel, cpu) = match (&spec.tee, spec.accel) {
        // Measured into every vCPU's VMSA: a fixed model, never `host`.
        (TeeLaunch::Snp { cpu, .. }, _) => ("kvm", cpu.as_str()),
        (_, Accel::Kvm) => ("kvm", "host"),
        (_, Accel::Tcg) => ("tcg", "max"),
    };
    let mem = format!("{}M", spec.memory_mib);
    let mut args: Vec<String> = [
        "-name",
        &format!("kabuto-{}", spec.id),
        "-M",
        machine_arg,
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &mem,
        // virtio-fs and vhost-user devices need guest RAM the daemons can map.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-chardev",
        &format!("file,id=console,path={}", spec.console_log().display()),
        "-serial",
        "chardev:console",
        "-kernel",
        &spec.kernel.display().to_string(),
        "-initrd",
        &spec.initramfs.display().to_string(),
        "-append",
        &kernel_command_line(machine, spec.accel, tsc_khz, &spec.kernel_params),
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            qmp_socket(&spec.dir).display()
        ),
    ]
    .map(str::to_string)
    .into();
    args.extend(device_args(spec, mmio));
    args.extend(tee_args(&spec.tee));
    if spec.user_network {
        // restrict=off: the guest may reach the host's loopback (10.0.2.2)
        // and beyond; no inbound ports are forwarded.
        args.extend([
            "-netdev".into(),
            "user,id=net0".into(),
            "-device".into(),
            format!(
                "{},netdev=net0",
                virtio_device(mmio, "virtio-net-device", "virtio-net-pci")
            ),
        ]);
    }
    if mmio {
        // Modern virtio-mmio: vhost-user devices need VIRTIO 1.0.
        args.push("-global".into());
        args.push("virtio-mmio.force-legacy=false".into());
    }
    args
}

/// A virtio device's name on virtio-mmio (`mmio`) or PCI.
fn virtio_device(mmio: bool, mmio_name: &str, pci_name: &str) -> String {
    if mmio { mmio_name } else { pci_name }.to_string()
}

/// The virtio-fs exports and the vsock device, on virtio-mmio (`mmio`) or
/// PCI.
fn device_args(spec: &VmSpec, mmio: bool) -> Vec<String> {
    let device = |mmio_name: &str, pci_name: &str| virtio_device(mmio, mmio_name, pci_name);
    let mut args = Vec::new();
    for (id, socket, tag) in [
        (
            "shared-fs",
            &spec.shared_fs_socket,
            kabuto_protocol::SHARED_FS_TAG,
        ),
        (
            "rootfs-fs",
            &spec.rootfs_fs_socket,
            kabuto_protocol::ROOTFS_FS_TAG,
        ),
    ] {
        args.push("-chardev".into());
        args.push(format!("socket,id={id},path={}", socket.display()));
        args.push("-device".into());
        args.push(format!(
            "{},chardev={id},tag={tag}",
            device("vhost-user-fs-device", "vhost-user-fs-pci")
        ));
    }
    match &spec.vsock {
        VsockBackend::Kernel { guest_cid } => {
            args.push("-device".into());
            args.push(format!(
                "{},guest-cid={guest_cid}",
                device("vhost-vsock-device", "vhost-vsock-pci")
            ));
        }
        VsockBackend::VhostUser { socket } => {
            args.push("-chardev".into());
            args.push(format!("socket,id=vsock,path={}", socket.display()));
            args.push("-device".into());
            args.push(format!(
                "{},chardev=vsock",
                device("vhost-user-vsock-device", "vhost-user-vsock-pci")
            ));
        }
    }
    args
}

/// QEMU objects that launch the guest in a TEE with its launch data.
///
/// SNP (QEMU >= 9.1): `-object sev-snp-guest,...,kernel-hashes=on,
/// host-data=<base64 of 32 bytes>`: with kernel-hashes the AmdSev OVMF's
/// measured hash table holds the SHA-256 of kernel, initrd and command line,
/// so MEASUREMENT covers them (without it, it covers only the firmware and a
/// host could boot any kernel). TDX (QEMU >= 10.1): `-object tdx-guest,...,
/// mrconfigid=<base64 of 48 bytes>`; TDVF measures the kernel and command
/// line into RTMRs. Both boot through `-bios <firmware>`, tied in with
/// `-machine confidential-guest-support`, and need KVM on TEE hardware and a
/// q35 machine; this renders the arguments, it cannot boot them here.
pub fn tee_args(tee: &TeeLaunch) -> Vec<String> {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let (object, firmware) = match tee {
        TeeLaunch::None | TeeLaunch::Software(_) => return Vec::new(),
        TeeLaunch::Snp {
            host_data,
            firmware,
            ..
        } => (
            format!(
                "sev-snp-guest,id=tee0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,host-data={}",
                b64(host_data)
            ),
            firmware,
        ),
        TeeLaunch::Tdx {
            mrconfigid,
            firmware,
        } => (
            format!("tdx-guest,id=tee0,mrconfigid={}", b64(mrconfigid)),
            firmware,
        ),
    };
    vec![
        "-object".into(),
        object,
        "-machine".into(),
        "confidential-guest-support=tee0".into(),
        "-bios".into(),
        firmware.display().to_string(),
    ]
}

fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let args = command_line(self.machine, spec, super::host_tsc_khz(&cpuinfo));
        let log = std::fs::File::create(spec.dir.join("qemu.log")).map_err(|source| {
            HypervisorError::Spawn {
                program: self.binary.clone(),
                source,
            }
        })?;
        let log_err = log.try_clone().map_err(|source| HypervisorError::Spawn {
            program: self.binary.clone(),
            source,
        })?;
        let mut command = Command::new(&self.binary);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // Open before the fork; closed (O_CLOEXEC) at QEMU's exec.
        let _netns = enter_network_namespace(&mut command, &spec.network_namespace)?;
        let mmio = self.machine == MachineType::Microvm;
        let vhost = vhost_net(spec.accel, Path::new(VHOST_NET));
        if !spec.nics.is_empty() {
            log::info!(
                "sandbox {}: virtio-net datapath {}",
                spec.id,
                if vhost {
                    "vhost-net (in the host kernel)"
                } else {
                    "in QEMU (no KVM or no /dev/vhost-net)"
                }
            );
        }
        let nic_args = pass_taps(&mut command, &spec.nics, mmio, vhost);
        log::debug!("qemu {} {}", args.join(" "), nic_args.join(" "));
        command.args(nic_args);
        let child = command.spawn().map_err(|source| HypervisorError::Spawn {
            program: self.binary.clone(),
            source,
        })?;
        let _ = std::fs::write(spec.dir.join("qemu.pid"), child.id().to_string());
        Ok(Box::new(QemuVm {
            child,
            qmp: qmp_socket(&spec.dir),
        }))
    }
}

/// The NICs' QEMU arguments, with each tap's fd made QEMU's: kept open
/// across the exec at its own number (its close-on-exec flag cleared
/// between fork and exec, in the child only), so no other descriptor is
/// touched.
fn pass_taps(
    command: &mut Command,
    nics: &[crate::network::GuestNic],
    mmio: bool,
    vhost: bool,
) -> Vec<String> {
    use std::os::unix::process::CommandExt as _;
    let fds: Vec<i32> = nics.iter().map(|n| n.tap_fd).collect();
    if !fds.is_empty() {
        let inherited = fds.clone();
        // SAFETY: fcntl(2) is async-signal-safe; the taps stay open until
        // the spawn returns (the sandbox holds them).
        unsafe {
            command.pre_exec(move || {
                for fd in &inherited {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    nic_args(nics, mmio, vhost)
}

/// The host kernel's virtio-net backend.
const VHOST_NET: &str = "/dev/vhost-net";

/// vhost-net serves the NICs when the host has it and the guest runs on
/// KVM (its ioeventfd/irqfd path): packets then bypass QEMU's userspace.
fn vhost_net(accel: Accel, device: &Path) -> bool {
    accel == Accel::Kvm && device.exists()
}

/// `-netdev tap,fd=` and a virtio-net device per NIC. The guest's NIC
/// gets the CNI interface's MAC (the bridge expects frames from it) and
/// MTU (VIRTIO_NET_F_MTU); with `vhost`, QEMU hands each tap's datapath
/// to the host kernel's vhost-net (it opens /dev/vhost-net itself).
fn nic_args(nics: &[crate::network::GuestNic], mmio: bool, vhost: bool) -> Vec<String> {
    let device = virtio_device(mmio, "virtio-net-device", "virtio-net-pci");
    let vhost = if vhost { ",vhost=on" } else { "" };
    let mut args = Vec::new();
    for (i, nic) in nics.iter().enumerate() {
        args.push("-netdev".into());
        args.push(format!("tap,id=nic{i},fd={}{vhost}", nic.tap_fd));
        args.push("-device".into());
        args.push(format!(
            "{device},netdev=nic{i},mac={},host_mtu={}",
            nic.mac, nic.mtu
        ));
    }
    args
}

/// Makes `command` start in `netns`; returns the namespace file to keep
/// open until the spawn.
fn enter_network_namespace(
    command: &mut Command,
    netns: &NetworkNamespace,
) -> Result<Option<std::fs::File>, HypervisorError> {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let netns_error = |path: &Path, source: std::io::Error| HypervisorError::NetworkNamespace {
        path: path.to_path_buf(),
        source,
    };
    match netns {
        NetworkNamespace::Host => Ok(None),
        NetworkNamespace::New => {
            // SAFETY: unshare(2) is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Ok(None)
        }
        NetworkNamespace::Path(path) => {
            // Refused here, with its path, rather than as QEMU's spawn failing.
            let file = crate::network::open_netns(path).map_err(|e| match e {
                crate::network::NetworkError::Namespace { source, .. } => netns_error(path, source),
                other => netns_error(path, std::io::Error::other(other.to_string())),
            })?;
            let fd = file.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe; `fd` stays open until
            // the spawn returns (the caller holds `file`).
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Ok(Some(file))
        }
    }
}

struct QemuVm {
    child: Child,
    qmp: PathBuf,
}

impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, HypervisorError> {
        self.child.try_wait().map_err(HypervisorError::Wait)
    }

    fn stop(&mut self, grace: Duration) -> Result<ExitStatus, HypervisorError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if let Err(e) = qmp_command(&self.qmp, "quit") {
            log::debug!("QMP quit: {e}");
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        log::warn!(
            "qemu {} did not quit within {grace:?}; killing it",
            self.child.id()
        );
        let _ = self.child.kill();
        self.child.wait().map_err(HypervisorError::Wait)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        // Never leave a VM behind, whatever path dropped us.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs one QMP command (after the capabilities handshake).
pub fn qmp_command(socket: &Path, command: &str) -> std::io::Result<serde_json::Value> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?; // greeting
    let mut exchange = |cmd: &str| -> std::io::Result<serde_json::Value> {
        writeln!(writer, "{}", serde_json::json!({ "execute": cmd }))?;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(serde_json::Value::Null);
            }
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            // Skip asynchronous events.
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    };
    exchange("qmp_capabilities")?;
    exchange(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_net_serves_the_nics_only_on_kvm_with_the_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = dir.path().join("vhost-net");
        assert!(!vhost_net(Accel::Kvm, &device), "no device");
        std::fs::write(&device, "").expect("device stand-in");
        assert!(vhost_net(Accel::Kvm, &device));
        assert!(!vhost_net(Accel::Tcg, &device), "TCG has no irqfd path");
        let nic = crate::network::GuestNic {
            tap_fd: 7,
            mac: "0a:58:0a:00:00:05".into(),
            mtu: 1450,
        };
        let with = nic_args(std::slice::from_ref(&nic), true, true);
        assert_eq!(with[1], "tap,id=nic0,fd=7,vhost=on");
        assert_eq!(
            with[3],
            "virtio-net-device,netdev=nic0,mac=0a:58:0a:00:00:05,host_mtu=1450"
        );
        let without = nic_args(&[nic], false, false);
        assert_eq!(without[1], "tap,id=nic0,fd=7");
        assert!(without[3].starts_with("virtio-net-pci,"));
    }

    #[test]
    fn a_network_namespace_path_must_be_one() {
        let mut command = Command::new("true");
        let own = NetworkNamespace::Path("/proc/self/ns/net".into());
        assert!(enter_network_namespace(&mut command, &own).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        for path in [
            PathBuf::from("/proc/self/ns/pid"),
            PathBuf::from("/etc/hostname"),
            fifo,
            dir.path().join("missing"),
        ] {
            let mut command = Command::new("true");
            let e = enter_network_namespace(&mut command, &NetworkNamespace::Path(path.clone()))
                .err()
                .unwrap_or_else(|| panic!("{} accepted", path.display()));
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
    }

    fn spec(accel: Accel, vsock: VsockBackend) -> VmSpec {
        VmSpec {
            id: "pod1".into(),
            dir: PathBuf::from("/run/kabuto/sandboxes/pod1"),
            kernel: PathBuf::from("/g/vmlinux"),
            initramfs: PathBuf::from("/g/initramfs.cpio"),
            vcpus: 2,
            memory_mib: 256,
            accel,
            kernel_params: vec!["kabuto.log=debug".into()],
            shared_fs_socket: PathBuf::from("/run/kabuto/sandboxes/pod1/virtiofs.sock"),
            rootfs_fs_socket: PathBuf::from("/run/kabuto/sandboxes/pod1/rootfs.sock"),
            vsock,
            tee: TeeLaunch::None,
            user_network: false,
            network_namespace: NetworkNamespace::Host,
            nics: Vec::new(),
        }
    }

    #[test]
    fn tee_launch_data_is_rendered_for_snp_and_tdx() {
        let mut host_data = [0u8; 32];
        host_data[0] = 0xab;
        host_data[31] = 0x01;
        let snp_launch = TeeLaunch::Snp {
            host_data,
            firmware: PathBuf::from("/fw/OVMF.amdsev.fd"),
            cpu: "EPYC-v4".into(),
        };
        let snp = tee_args(&snp_launch);
        // base64 of ab 00.. 01 (32 bytes); the kernel, initrd and command
        // line are measured (kernel-hashes=on).
        assert_eq!(
            snp[1],
            "sev-snp-guest,id=tee0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,host-data=qwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE="
        );
        assert_eq!(snp[3], "confidential-guest-support=tee0");
        assert_eq!(arg_after(&snp, "-bios"), ["/fw/OVMF.amdsev.fd"]);
        let tdx = tee_args(&TeeLaunch::Tdx {
            mrconfigid: [0xff; 48],
            firmware: PathBuf::from("/fw/TDVF.fd"),
        });
        assert_eq!(
            tdx[1],
            format!("tdx-guest,id=tee0,mrconfigid={}", "/".repeat(64))
        );
        assert_eq!(arg_after(&tdx, "-bios"), ["/fw/TDVF.fd"]);
        assert!(tee_args(&TeeLaunch::None).is_empty());
        let mut s = spec(Accel::Kvm, VsockBackend::Kernel { guest_cid: 9 });
        s.tee = snp_launch;
        let args = command_line(MachineType::Q35, &s, None);
        assert!(args.iter().any(|a| a.starts_with("sev-snp-guest,")));
        // The measured vCPU model, not the host's.
        assert_eq!(arg_after(&args, "-cpu"), ["EPYC-v4"]);
        // What is measured is what is passed.
        assert_eq!(
            arg_after(&args, "-append"),
            [kernel_command_line(MachineType::Q35, Accel::Kvm, None, &s.kernel_params).as_str()]
        );
    }

    fn arg_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn microvm_tcg_with_vhost_user_vsock() {
        let vsock = VsockBackend::VhostUser {
            socket: PathBuf::from("/s/vsock.sock"),
        };
        let args = command_line(
            MachineType::Microvm,
            &spec(Accel::Tcg, vsock),
            Some(2_445_428),
        );
        assert_eq!(arg_after(&args, "-accel"), ["tcg"]);
        assert_eq!(arg_after(&args, "-cpu"), ["max"]);
        assert_eq!(arg_after(&args, "-smp"), ["2"]);
        assert!(arg_after(&args, "-M")[0].starts_with("microvm,"));
        assert!(arg_after(&args, "-M")[0].contains("memory-backend=mem"));
        assert!(arg_after(&args, "-object")[0].contains("share=on"));
        let append = arg_after(&args, "-append")[0];
        assert!(append.contains("tsc_early_khz=2445428"), "{append}");
        assert!(
            append.ends_with("kabuto.log=debug"),
            "user params come last: {append}"
        );
        let devices = arg_after(&args, "-device");
        assert!(devices.contains(&"vhost-user-vsock-device,chardev=vsock"));
        assert!(devices.contains(&"vhost-user-fs-device,chardev=shared-fs,tag=kabuto"));
        assert!(devices.contains(&"vhost-user-fs-device,chardev=rootfs-fs,tag=kabuto-rootfs"));
        assert!(arg_after(&args, "-global").contains(&"virtio-mmio.force-legacy=false"));
    }

    #[test]
    fn q35_kvm_with_kernel_vsock() {
        let args = command_line(
            MachineType::Q35,
            &spec(Accel::Kvm, VsockBackend::Kernel { guest_cid: 7 }),
            Some(1),
        );
        assert_eq!(arg_after(&args, "-accel"), ["kvm"]);
        assert_eq!(arg_after(&args, "-cpu"), ["host"]);
        let append = arg_after(&args, "-append")[0];
        assert!(
            !append.contains("tsc_early_khz"),
            "KVM needs no TSC hint: {append}"
        );
        let devices = arg_after(&args, "-device");
        assert!(devices.contains(&"vhost-vsock-pci,guest-cid=7"));
        assert!(devices.contains(&"vhost-user-fs-pci,chardev=shared-fs,tag=kabuto"));
        assert!(devices.contains(&"vhost-user-fs-pci,chardev=rootfs-fs,tag=kabuto-rootfs"));
        assert!(arg_after(&args, "-global").is_empty());
    }
}
