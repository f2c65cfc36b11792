//! kabuto's configuration: one TOML file, every field optional with a
//! default that works on a plain Debian 12 host.
//!
//! Lookup order: the path in `KABUTO_CONFIG_PATH`, else
//! [`DEFAULT_CONFIG_PATH`]; a missing default file means "all defaults".
//! Unknown fields are errors, so a typo never silently falls back.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/kabuto/config.toml";
pub const CONFIG_PATH_ENV: &str = "KABUTO_CONFIG_PATH";
/// Where `kabuto install` puts the guest kernel and initramfs.
pub const DEFAULT_GUEST_DIR: &str = "/usr/local/share/kabuto/guest";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid config {path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        /// The key at fault, as written in the file (`hypervisor.vcpus`).
        field: &'static str,
        reason: String,
    },
}

/// A failed check of [`Config::validate`]: the key at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub guest: GuestConfig,
    pub agent: AgentConfig,
    pub shared_fs: SharedFsConfig,
    pub runtime: RuntimeConfig,
    pub confidential: ConfidentialConfig,
    pub snapshotter: SnapshotterConfig,
}

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

/// Confidential pods: the TEE their VMs launch in. A containerd runtime
/// handler with its own config file (runtime options `ConfigPath`) makes a
/// confidential runtime class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfidentialConfig {
    /// `none`, `snp`, `tdx`, or `software` — the insecure software TEE for
    /// hosts without TEE hardware (testing only; a KBS accepts its evidence
    /// only when the owner trusts its root explicitly).
    pub tee: TeeKind,
    /// The software TEE's firmware key and certificates (`kabuto install`
    /// creates them).
    pub software_tee_dir: PathBuf,
    /// Where container images are pulled: `host` (containerd's snapshots,
    /// shared into the guest) or `guest` (the agent pulls, verifies,
    /// decrypts and unpacks the image itself; the host passes only its
    /// reference and never sees the plaintext). `guest` needs
    /// `hypervisor.guest_network = "user"`.
    pub image_pull: ImagePull,
    /// How long a CreateContainer that pulls its image in the guest may
    /// take (pull, verify, decrypt, unpack).
    pub image_pull_timeout_secs: u64,
    /// The guest firmware of SNP and TDX launches (`-bios`): for SNP an
    /// OVMF built from edk2's `OvmfPkg/AmdSev` (it measures the kernel,
    /// initrd and command line: QEMU's `kernel-hashes=on`), for TDX a TDVF.
    /// Debian 12's `ovmf` package has neither; required for `snp`/`tdx`.
    pub firmware: PathBuf,
    /// The vCPU model of SNP guests (`-cpu`): its CPUID signature is part of
    /// every vCPU's measured VMSA, so it is fixed rather than `host`.
    pub snp_cpu: String,
    /// SEV features of SNP guests' VMSAs (bit 0 SNPActive; QEMU's default
    /// is 0x1). Part of the launch measurement.
    pub snp_guest_features: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImagePull {
    Host,
    Guest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeeKind {
    None,
    Snp,
    Tdx,
    Software,
    /// CoCo's sample attester in the guest: no TEE at all, for interop
    /// tests with CoCo's KBS. The guest also needs its init-data to allow
    /// it. Built only with the software-tee feature, like the software TEE.
    Sample,
}

impl TeeKind {
    /// The value of the `kabuto.tee=` kernel parameter.
    pub fn kernel_param(self) -> Option<&'static str> {
        match self {
            TeeKind::None => None,
            TeeKind::Snp => Some("snp"),
            TeeKind::Tdx => Some("tdx"),
            TeeKind::Software => Some("software"),
            TeeKind::Sample => Some("sample"),
        }
    }
}

/// Why `tee = "software"` is refused by a production build.
pub const SOFTWARE_TEE_NOT_BUILT: &str =
    "confidential.tee = \"software\" needs a kabuto built with the \
     software-tee feature (scripts/setup.sh builds one for tests); a production build has no \
     software TEE: the host would sign its own attestation reports";

/// Why `tee = "sample"` is refused by a production build.
pub const SAMPLE_NOT_BUILT: &str =
    "confidential.tee = \"sample\" (CoCo's sample attester, no TEE) needs a kabuto built with \
     the software-tee feature; a production build has no insecure TEE kinds";

/// Where `kabuto install` creates the software TEE's key material.
pub const DEFAULT_SOFTWARE_TEE_DIR: &str = "/var/lib/kabuto/swtee";

impl Default for ConfidentialConfig {
    fn default() -> Self {
        ConfidentialConfig {
            tee: TeeKind::None,
            software_tee_dir: PathBuf::from(DEFAULT_SOFTWARE_TEE_DIR),
            image_pull: ImagePull::Host,
            image_pull_timeout_secs: 1200,
            firmware: PathBuf::new(),
            snp_cpu: "EPYC-v4".into(),
            snp_guest_features: 1,
        }
    }
}

/// Which hypervisor runs the pod VMs and how big they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    /// The VMM driver. Only `qemu` exists today.
    pub kind: HypervisorKind,
    /// Path of the QEMU system emulator.
    pub qemu_path: PathBuf,
    /// `auto` picks KVM when /dev/kvm is usable and the CPU has VMX or SVM,
    /// TCG (software emulation) otherwise. `kvm` or `tcg` forces one.
    pub accelerator: Accelerator,
    /// QEMU machine type: `microvm` (fastest boot) or `q35`.
    pub machine: MachineType,
    /// Virtual CPUs per pod VM.
    pub vcpus: u32,
    /// Guest memory per pod VM, in MiB.
    pub memory_mib: u32,
    /// Extra kernel command-line parameters, appended after kabuto's own.
    pub kernel_params: String,
    /// Keep a debug shell reachable with `kabuto exec <pod>`. Off by
    /// default: it gives whoever controls the host a shell in the guest.
    pub debug_console: bool,
    /// `none`, or `user`: QEMU user-mode networking (NAT, no host setup) so
    /// the guest itself reaches a KBS or registry; the host is 10.0.2.2.
    /// Containers still get only the network their pod asks for.
    pub guest_network: GuestNetwork,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestNetwork {
    None,
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accelerator {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineType {
    Microvm,
    Q35,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            kind: HypervisorKind::Qemu,
            qemu_path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accelerator: Accelerator::Auto,
            machine: MachineType::Microvm,
            vcpus: 1,
            memory_mib: 512,
            kernel_params: String::new(),
            debug_console: false,
            guest_network: GuestNetwork::None,
        }
    }
}

/// The guest image built by `kabuto guest build`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// Uncompressed kernel (PVH entry) for microvm, or bzImage for q35.
    pub kernel: PathBuf,
    /// Initramfs whose /init is kabuto-agent.
    pub initramfs: PathBuf,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel: Path::new(DEFAULT_GUEST_DIR).join("vmlinux"),
            initramfs: Path::new(DEFAULT_GUEST_DIR).join("initramfs.cpio"),
        }
    }
}

/// How the host reaches the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// `auto`: kernel vhost-vsock when /dev/vhost-vsock exists, else a
    /// vhost-user vsock device. The guest listens on vsock in both cases.
    pub channel: AgentChannel,
    /// The vhost-user vsock device daemon (crates.io `vhost-device-vsock`);
    /// a bare name is looked up on PATH.
    pub vhost_user_vsock_path: PathBuf,
    /// How long the VM may take from launch until the agent answers.
    pub boot_timeout_secs: u64,
    /// Deadline of short agent requests (create, start, signal, ...).
    pub request_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentChannel {
    Auto,
    VhostVsock,
    VhostUserVsock,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            channel: AgentChannel::Auto,
            vhost_user_vsock_path: PathBuf::from("vhost-device-vsock"),
            boot_timeout_secs: 60,
            request_timeout_secs: 60,
        }
    }
}

impl AgentConfig {
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Per-sandbox state: sockets, logs, the shared directory.
    pub state_dir: PathBuf,
    /// Shim log level: error, warn, info, debug, trace.
    pub log_level: String,
    /// Guest agent log level (on the VM console log).
    pub agent_log_level: String,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            state_dir: PathBuf::from("/run/kabuto"),
            log_level: "info".into(),
            agent_log_level: "info".into(),
        }
    }
}

impl Config {
    /// Loads the effective configuration (see the module docs for the order).
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(CONFIG_PATH_ENV) {
            Some(path) => Config::from_file(Path::new(&path)),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::from_file(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        config
            .validate()
            .map_err(|Invalid { field, reason }| ConfigError::Invalid {
                path: path.to_path_buf(),
                field,
                reason,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Invalid> {
        let h = &self.hypervisor;
        if h.vcpus == 0 || h.vcpus > 255 {
            return Err(invalid(
                "hypervisor.vcpus",
                format!("must be 1..=255, not {}", h.vcpus),
            ));
        }
        if h.memory_mib < 64 {
            return Err(invalid(
                "hypervisor.memory_mib",
                format!("must be at least 64, not {}", h.memory_mib),
            ));
        }
        for (field, secs) in [
            ("agent.boot_timeout_secs", self.agent.boot_timeout_secs),
            (
                "agent.request_timeout_secs",
                self.agent.request_timeout_secs,
            ),
            (
                "confidential.image_pull_timeout_secs",
                self.confidential.image_pull_timeout_secs,
            ),
        ] {
            if secs == 0 {
                return Err(invalid(field, "must be at least 1 second"));
            }
        }
        if self.confidential.image_pull == ImagePull::Guest && h.guest_network != GuestNetwork::User
        {
            return Err(invalid(
                "confidential.image_pull",
                "\"guest\" needs hypervisor.guest_network = \"user\": the guest reaches the registry itself",
            ));
        }
        for pattern in &self.snapshotter.guest_pull_images {
            let head = pattern.strip_suffix('*').unwrap_or(pattern);
            if pattern.is_empty() || head.contains('*') {
                return Err(invalid(
                    "snapshotter.guest_pull_images",
                    format!("{pattern:?} is not \"*\", \"PREFIX*\", a repository or a reference"),
                ));
            }
        }
        if self.confidential.tee == TeeKind::Software && !cfg!(feature = "software-tee") {
            return Err(invalid("confidential.tee", SOFTWARE_TEE_NOT_BUILT));
        }
        if self.confidential.tee == TeeKind::Sample && !cfg!(feature = "software-tee") {
            return Err(invalid("confidential.tee", SAMPLE_NOT_BUILT));
        }
        if matches!(self.confidential.tee, TeeKind::Snp | TeeKind::Tdx) {
            let tee = self.confidential.tee.kernel_param().unwrap_or_default();
            if h.machine != MachineType::Q35 {
                return Err(invalid(
                    "hypervisor.machine",
                    format!("confidential.tee = \"{tee}\" needs hypervisor.machine = \"q35\" (a TEE launch boots through firmware)"),
                ));
            }
            if h.accelerator == Accelerator::Tcg {
                return Err(invalid(
                    "hypervisor.accelerator",
                    format!("confidential.tee = \"{tee}\" needs KVM on TEE hardware, not hypervisor.accelerator = \"tcg\""),
                ));
            }
            if self.confidential.firmware.as_os_str().is_empty() {
                return Err(invalid(
                    "confidential.firmware",
                    format!("confidential.tee = \"{tee}\" needs confidential.firmware (an AmdSev OVMF for snp, a TDVF for tdx)"),
                ));
            }
            if self.confidential.tee == TeeKind::Snp
                && crate::sandbox::snp_cpu_type(&self.confidential.snp_cpu).is_none()
            {
                return Err(invalid(
                    "confidential.snp_cpu",
                    format!(
                        "{:?} is not an EPYC model QEMU and the SNP measurement both know (e.g. \"EPYC-v4\", \"EPYC-Milan\", \"EPYC-Genoa\")",
                        self.confidential.snp_cpu
                    ),
                ));
            }
        }
        if self.confidential.tee != TeeKind::None && h.debug_console {
            return Err(invalid(
                "hypervisor.debug_console",
                "must be off when confidential.tee is set: it would give the host a shell in the guest",
            ));
        }
        Ok(())
    }

    /// The documented default configuration, as `kabuto install` writes it.
    pub fn default_toml() -> String {
        DEFAULT_TOML.to_string()
    }
}

/// The default config with every field documented. A unit test checks that
/// it parses to exactly `Config::default()`.
const DEFAULT_TOML: &str = r#"# kabuto configuration. Every field is optional; shown are the defaults.

[hypervisor]
# The VMM driver. Only "qemu" exists today.
kind = "qemu"
qemu_path = "/usr/bin/qemu-system-x86_64"
# "auto": KVM when /dev/kvm is usable and the CPU has VMX/SVM, else TCG.
accelerator = "auto"
# "microvm" (fastest boot, PVH kernel) or "q35".
machine = "microvm"
vcpus = 1
memory_mib = 512
# Appended to kabuto's own kernel command line.
kernel_params = ""
# A debug shell in the guest via `kabuto exec <pod>`. Never enable it for
# confidential pods: whoever controls the host gets a shell in the guest.
debug_console = false
# "none", or "user": QEMU user-mode networking so the guest itself reaches a
# KBS or registry (the host is 10.0.2.2 from the guest).
guest_network = "none"

[guest]
kernel = "/usr/local/share/kabuto/guest/vmlinux"
initramfs = "/usr/local/share/kabuto/guest/initramfs.cpio"

[agent]
# "auto", "vhost-vsock" (kernel, /dev/vhost-vsock) or "vhost-user-vsock".
channel = "auto"
vhost_user_vsock_path = "vhost-device-vsock"
boot_timeout_secs = 60
request_timeout_secs = 60

[shared_fs]
# Only "virtio-fs" today.
kind = "virtio-fs"
virtiofsd_path = "/usr/lib/qemu/virtiofsd"
# Cache modes, "none", "auto" or "always": volumes (the host may change
# them while containers run), and root filesystems (only the guest does).
cache = "auto"
rootfs_cache = "always"

[runtime]
state_dir = "/run/kabuto"
log_level = "info"
agent_log_level = "info"

[confidential]
# The TEE pod VMs launch in: "none", "snp", "tdx", "software" (an
# insecure software TEE for hosts without TEE hardware; testing only), or
# "sample" (no TEE: the guest attests with CoCo's sample evidence, if its
# init-data allows it; interop tests with CoCo's KBS only).
tee = "none"
# The software TEE's firmware key and certificates (made by `kabuto install`).
software_tee_dir = "/var/lib/kabuto/swtee"
# "host": containerd pulls and unpacks images; their snapshots are shared
# into the guest. "guest": the agent pulls the image named by the
# container's io.kabuto.image (or CRI's io.kubernetes.cri.image-name)
# annotation, checks its signatures, decrypts and unpacks it in guest
# memory, with settings from the pod's init-data; the host never sees the
# plaintext. Needs guest_network = "user".
image_pull = "host"
# How long creating a container whose image the guest pulls may take.
image_pull_timeout_secs = 1200
# SNP and TDX only (they need hypervisor.machine = "q35" and KVM on TEE
# hardware). The guest firmware: an OVMF built from edk2's OvmfPkg/AmdSev
# for snp (it measures kernel, initrd and command line), a TDVF for tdx.
firmware = ""
# The SNP vCPU model and SEV features: both are part of the measured VMSAs
# (`kabuto guest measure` prints the launch measurement they give).
snp_cpu = "EPYC-v4"
snp_guest_features = 1

[snapshotter]
# kabuto-snapshotter: a containerd proxy snapshotter ("kabuto") that unpacks
# images like containerd's overlayfs snapshotter, except the images below,
# whose layers it marks as present without fetching them: CRI then runs
# containers of those images and the guest pulls them (image_pull = "guest").
# containerd 1.6 has one snapshotter for all CRI runtimes, hence the choice
# per image. Needs disable_snapshot_annotations = false in containerd's CRI
# config (the image reference reaches the snapshotter as a label).
root = "/var/lib/kabuto/snapshotter"
address = "/run/kabuto/snapshotter.sock"
# containerd's root, for reading image manifests from its content store.
containerd_root = "/var/lib/containerd"
# "*" for all images, "PREFIX*", a repository ("registry.example/app") or
# an exact reference. Not the pause image: it keeps a host rootfs.
guest_pull_images = []
# Also every image with an encrypted layer (the host could not decrypt it).
guest_pull_encrypted = true
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_defaults_match_the_code() {
        let parsed = Config::parse(DEFAULT_TOML, Path::new("default")).expect("default parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_means_defaults() {
        let parsed = Config::parse("", Path::new("empty")).expect("empty parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("[hypervisor]\nvcpu = 2\n", Path::new("x.toml"))
            .expect_err("typo accepted");
        let text = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(text.contains("x.toml") && text.contains("vcpu"), "{text}");
    }

    #[test]
    fn invalid_values_are_refused() {
        for (toml, needle) in [
            ("[hypervisor]\nvcpus = 0\n", "vcpus"),
            ("[hypervisor]\nmemory_mib = 8\n", "memory_mib"),
            ("[hypervisor]\naccelerator = \"hvf\"\n", "accelerator"),
            ("[shared_fs]\ncache = \"sometimes\"\n", "cache"),
            ("[shared_fs]\nrootfs_cache = \"never\"\n", "rootfs_cache"),
            ("[confidential]\nimage_pull = \"guest\"\n", "guest_network"),
            // TEE launches boot q35 through firmware, on KVM.
            (
                "[confidential]\ntee = \"snp\"\nfirmware = \"/fw/OVMF.amdsev.fd\"\n",
                "q35",
            ),
            (
                "[hypervisor]\nmachine = \"q35\"\naccelerator = \"tcg\"\n[confidential]\ntee = \"snp\"\nfirmware = \"/fw/OVMF.amdsev.fd\"\n",
                "KVM",
            ),
            (
                "[hypervisor]\nmachine = \"q35\"\n[confidential]\ntee = \"tdx\"\n",
                "firmware",
            ),
            (
                "[hypervisor]\nmachine = \"q35\"\n[confidential]\ntee = \"snp\"\nfirmware = \"/f\"\nsnp_cpu = \"host\"\n",
                "snp_cpu",
            ),
        ] {
            let err = Config::parse(toml, Path::new("c.toml")).expect_err(toml);
            let text = format!("{err} {:?}", std::error::Error::source(&err));
            assert!(text.contains(needle), "{toml}: {text}");
        }
    }

    #[test]
    fn the_software_tee_needs_a_build_with_its_feature() {
        let parsed = Config::parse(
            "[hypervisor]\nguest_network = \"user\"\n[confidential]\ntee = \"software\"\n",
            Path::new("c.toml"),
        );
        if cfg!(feature = "software-tee") {
            assert_eq!(
                parsed.expect("accepted").confidential.tee,
                TeeKind::Software
            );
        } else {
            let err = parsed
                .expect_err("a production build refuses it")
                .to_string();
            assert!(err.contains(SOFTWARE_TEE_NOT_BUILT), "{err}");
        }
    }

    /// A refused value names its key as written in the file.
    #[test]
    fn invalid_values_name_their_key() {
        for (toml, key) in [
            ("[hypervisor]\nvcpus = 0\n", "hypervisor.vcpus"),
            (
                "[agent]\nboot_timeout_secs = 0\n",
                "agent.boot_timeout_secs",
            ),
            ("[confidential]\ntee = \"snp\"\n", "hypervisor.machine"),
        ] {
            match Config::parse(toml, Path::new("c.toml")) {
                Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, key, "{toml}"),
                other => panic!("{toml}: {other:?}"),
            }
        }
        let err = Config::parse("[shared_fs]\ncache = \"sometimes\"\n", Path::new("c.toml"))
            .expect_err("an unknown cache mode");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    }

    #[test]
    fn the_sample_tee_only_in_a_software_tee_build() {
        let parsed = Config::parse("[confidential]\ntee = \"sample\"\n", Path::new("c.toml"));
        if cfg!(feature = "software-tee") {
            let config = parsed.expect("accepted");
            assert_eq!(config.confidential.tee, TeeKind::Sample);
            assert_eq!(config.confidential.tee.kernel_param(), Some("sample"));
        } else {
            let err = parsed
                .expect_err("a production build refuses it")
                .to_string();
            assert!(err.contains(SAMPLE_NOT_BUILT), "{err}");
        }
    }

    #[test]
    fn a_complete_snp_config_is_accepted() {
        let c = Config::parse(
            "[hypervisor]\nmachine = \"q35\"\n[confidential]\ntee = \"snp\"\nfirmware = \"/fw/OVMF.amdsev.fd\"\nsnp_cpu = \"EPYC-Milan\"\n",
            Path::new("snp.toml"),
        )
        .expect("parses");
        assert_eq!(c.confidential.snp_cpu, "EPYC-Milan");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::parse(
            "[hypervisor]\nvcpus = 2\naccelerator = \"tcg\"\n",
            Path::new("p"),
        )
        .expect("parses");
        assert_eq!(c.hypervisor.vcpus, 2);
        assert_eq!(c.hypervisor.accelerator, Accelerator::Tcg);
        assert_eq!(c.hypervisor.memory_mib, 512);
        assert_eq!(c.agent, AgentConfig::default());
    }
}
