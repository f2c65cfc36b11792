//! Guest setup done once by PID 1: file systems, kernel modules, cgroups and
//! the shared directory.

use std::{ffi::CString, fs, path::Path, thread, time::Duration};

use kabuto_protocol::{GUEST_ROOTFS_DIR, GUEST_SHARED_DIR, ROOTFS_FS_TAG, SHARED_FS_TAG};
use nix::mount::{mount, MsFlags};

/// A boot step of the guest failed: what was being done, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct InitError {
    what: String,
    #[source]
    cause: InitCause,
}

#[derive(Debug, thiserror::Error)]
pub enum InitCause {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sys(#[from] nix::Error),
}

impl InitError {
    /// A step's error mapper: `what` was being done when `E` happened.
    fn step<E: Into<InitCause>>(what: impl Into<String>) -> impl FnOnce(E) -> InitError {
        let what = what.into();
        move |e| InitError {
            what,
            cause: e.into(),
        }
    }
}

/// Load order of the kernel modules packed into the initramfs, one path per
/// line; written by `kabuto guest build`.
pub const MODULES_LIST: &str = "/etc/kabuto/modules";

/// Where libcontainer keeps its per-container state.
pub const CONTAINER_STATE_DIR: &str = "/run/kabuto/state";
/// Where the agent writes each container's bundle (config.json, exec specs).
pub const BUNDLES_DIR: &str = "/run/kabuto/containers";

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    /// Options to mount with instead when the kernel refuses `data` (EINVAL).
    older_kernel_data: Option<&'static str>,
}

/// The flags of the kernel's own file systems: nothing on them runs or
/// makes a device.
const KERNEL_FS_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const BASE_MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: KERNEL_FS_FLAGS,
        data: None,
        older_kernel_data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: KERNEL_FS_FLAGS,
        data: None,
        older_kernel_data: None,
    },
    Mount {
        source: "dev",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        older_kernel_data: None,
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
        older_kernel_data: None,
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        older_kernel_data: None,
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: KERNEL_FS_FLAGS,
        // favordynmods (Linux ≥ 6.0): moving a process into a cgroup no
        // longer waits for an RCU grace period. Every container create and
        // exec moves one; measured 11–12 ms per move in a TCG guest without
        // it. Older kernels refuse the option.
        data: Some("nsdelegate,favordynmods"),
        older_kernel_data: Some("nsdelegate"),
    },
    Mount {
        source: "run",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        older_kernel_data: None,
    },
    Mount {
        source: "tmp",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        older_kernel_data: None,
    },
];

/// Mounts one base file system, with its older-kernel options if the
/// kernel refuses the preferred ones.
fn mount_base(m: &Mount) -> nix::Result<()> {
    match (
        mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data),
        m.older_kernel_data,
    ) {
        (Err(nix::errno::Errno::EINVAL), Some(older)) => {
            log::warn!(
                "{}: the kernel refused the options {:?}; mounting with {older:?}",
                m.target,
                m.data
            );
            mount(
                Some(m.source),
                m.target,
                Some(m.fstype),
                m.flags,
                Some(older),
            )
        }
        (result, _) => result,
    }
}

/// Mounts the base file systems and enables the cgroup controllers.
pub fn setup_guest() -> Result<(), InitError> {
    for m in BASE_MOUNTS {
        fs::create_dir_all(m.target).map_err(InitError::step(format!("mkdir {}", m.target)))?;
        mount_base(m).map_err(InitError::step(format!(
            "mount {} on {}",
            m.fstype, m.target
        )))?;
    }
    // configfs holds the TEE report interface (configfs-tsm, Linux >= 6.7):
    // attestation through it, and the agent's probe for TEE hardware, need
    // it mounted. A kernel without configfs has no such interface.
    if std::path::Path::new("/sys/kernel/config").is_dir() {
        if let Err(e) = mount(
            Some("configfs"),
            "/sys/kernel/config",
            Some("configfs"),
            MsFlags::MS_NOSUID
                .union(MsFlags::MS_NODEV)
                .union(MsFlags::MS_NOEXEC),
            None::<&str>,
        ) {
            log::warn!("mount configfs on /sys/kernel/config: {e}");
        }
    }
    // Containers expect the usual /dev links.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    enable_cgroup_controllers().map_err(InitError::step("enabling cgroup controllers"))?;
    for dir in [
        GUEST_SHARED_DIR,
        GUEST_ROOTFS_DIR,
        CONTAINER_STATE_DIR,
        BUNDLES_DIR,
    ] {
        fs::create_dir_all(dir).map_err(InitError::step(format!("mkdir {dir}")))?;
    }
    Ok(())
}

fn enable_cgroup_controllers() -> std::io::Result<()> {
    let available = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")?;
    let enable: Vec<String> = available
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" "))
}

/// Runs `f` with /proc mounted on the initramfs (before the real mounts),
/// e.g. to read the kernel command line; unmounts it again.
pub fn with_early_proc(f: impl FnOnce()) {
    let mounted = mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .is_ok();
    f();
    if mounted {
        let _ = nix::mount::umount("/proc");
    }
}

/// Moves the root from the initramfs onto a tmpfs and frees the initramfs.
///
/// Containers are set up with pivot_root(2), which refuses to work in a
/// mount namespace whose root is the kernel's initial rootfs (it has no
/// parent mount). `--no-pivot` (MS_MOVE + chroot) would avoid that but lets
/// a process with CAP_SYS_CHROOT escape to the agent's root; so the agent
/// does what switch_root(8) does instead. Everything the agent needs from
/// the initramfs (its libraries, the modules) is loaded by now.
pub fn switch_root() -> Result<(), InitError> {
    const NEW_ROOT: &str = "/newroot";
    // Kept: the pause of confidential pods (pause.rs) and the debug image's
    // shell (debug_console).
    let pause = fs::read(crate::pause::PAUSE_BINARY).ok();
    let debug_shell = fs::read(crate::debug_console::DEBUG_SHELL).ok();
    for entry in fs::read_dir("/").map_err(InitError::step("reading /"))? {
        let path = entry
            .map_err(InitError::step("reading a directory"))?
            .path();
        let _ = if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
    fs::create_dir_all(NEW_ROOT).map_err(InitError::step(format!("mkdir {NEW_ROOT}")))?;
    mount(
        Some("rootfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(InitError::step(format!("mount tmpfs on {NEW_ROOT}")))?;
    nix::unistd::chdir(NEW_ROOT).map_err(InitError::step(format!("chdir {NEW_ROOT}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(InitError::step(format!("moving {NEW_ROOT} to /")))?;
    nix::unistd::chroot(".").map_err(InitError::step("chroot"))?;
    nix::unistd::chdir("/").map_err(InitError::step("chdir /"))?;
    if let Some(shell) = debug_shell {
        restore(Path::new(crate::debug_console::DEBUG_SHELL), &shell)?;
    }
    if let Some(pause) = pause {
        restore(Path::new(crate::pause::PAUSE_BINARY), &pause)?;
        for dir in ["proc", "dev"] {
            let dir = Path::new(kabuto_protocol::GUEST_PAUSE_ROOT).join(dir);
            fs::create_dir_all(&dir)
                .map_err(InitError::step(format!("mkdir {}", dir.display())))?;
        }
    }
    Ok(())
}

/// Writes an executable kept across the root switch.
fn restore(path: &Path, data: &[u8]) -> Result<(), InitError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(InitError::step(format!("mkdir {}", dir.display())))?;
    }
    fs::write(path, data).map_err(InitError::step(format!("restoring {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(InitError::step(format!("chmod {}", path.display())))
}

/// Modules only a guest with a network interface needs.
const NET_MODULES: [&str; 3] = ["virtio_net", "net_failover", "failover"];

/// Loads the kernel modules listed in [`MODULES_LIST`], in order (the
/// virtio-pci ones only when the guest has PCI; the network driver only
/// for user networking or when the VM has a NIC — the pod's). Returns the
/// names of the modules loaded.
pub fn load_modules(skip_pci: bool, with_net: bool) -> Vec<String> {
    let list = fs::read_to_string(MODULES_LIST).unwrap_or_default();
    let mut loaded = Vec::new();
    // Asked once the transports (listed first) have found their devices.
    let mut nic = None;
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = module_name(path);
        if skip_pci && name.starts_with("virtio_pci") {
            continue;
        }
        if NET_MODULES.contains(&name.as_str()) && !with_net && !*nic.get_or_insert_with(has_nic) {
            continue;
        }
        match load_module(Path::new(path)) {
            Ok(()) => {
                log::debug!("loaded {path}");
                loaded.push(module_name(path))
            }
            Err(e) => log::error!("loading kernel module: {}", kabuto_error::chain(&e)),
        }
    }
    loaded
}

/// VIRTIO_ID_NET, as sysfs shows a virtio device's id.
const VIRTIO_NET_ID: &str = "0x0001";

/// True when a virtio transport found a network device (the host gave the
/// pod a NIC), read from a sysfs mounted for the question (the initramfs
/// has none yet).
fn has_nic() -> bool {
    let _ = fs::create_dir_all("/sys");
    let mounted = mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .is_ok();
    let found = fs::read_dir("/sys/bus/virtio/devices")
        .map(|devices| {
            devices.filter_map(|d| d.ok()).any(|d| {
                fs::read_to_string(d.path().join("device"))
                    .is_ok_and(|id| id.trim() == VIRTIO_NET_ID)
            })
        })
        .unwrap_or(false);
    if mounted {
        let _ = nix::mount::umount("/sys");
    }
    found
}

fn module_name(path: &str) -> String {
    Path::new(path)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn load_module(path: &Path) -> Result<(), InitError> {
    let file =
        fs::File::open(path).map_err(InitError::step(format!("opening {}", path.display())))?;
    let params = CString::default();
    match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(InitError::step(format!("loading {}", path.display()))(e)),
    }
}

/// Mounts the host's two virtio-fs exports: the shared directory at
/// [`GUEST_SHARED_DIR`] and the root filesystems at [`GUEST_ROOTFS_DIR`].
pub fn mount_shared_dirs() {
    for (tag, dir) in [
        (SHARED_FS_TAG, GUEST_SHARED_DIR),
        (ROOTFS_FS_TAG, GUEST_ROOTFS_DIR),
    ] {
        mount_virtiofs(tag, dir);
    }
}

fn mount_virtiofs(tag: &str, dir: &str) {
    // The virtio-fs device may still be probing right after its driver loads.
    for attempt in 0..200 {
        match mount(
            Some(tag),
            dir,
            Some("virtiofs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        ) {
            Ok(()) => {
                log::debug!("{dir} mounted after {attempt} retries");
                return;
            }
            Err(nix::errno::Errno::ENODEV) | Err(nix::errno::Errno::ENOENT) => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) => {
                log::error!("mounting {dir}: {e}");
                return;
            }
        }
    }
    log::error!("mounting {dir}: no virtio-fs device tagged {tag}");
}

/// Flushes file systems and powers the VM off. Never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) only returns on failure; PID 1 must not exit.
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
