//! Builds the guest image: the pinned Debian cloud kernel (as an
//! uncompressed PVH `vmlinux`) and an initramfs whose `/init` is
//! `kabuto-agent`, with only the kernel modules the guest needs.
//!
//! Same inputs give identical bytes: archive entries are sorted, times and
//! owners are zero. The SHA-256 digests printed at the end are what later
//! attestation reference values are made of.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};
use thiserror::Error;

mod initramfs;
mod kernel;

use initramfs::shared_libraries;
pub use kernel::bzimage_to_vmlinux;
use kernel::{fetch_kernel_package, resolve_modules, unpack_deb};

/// The kernel package the guest boots, fetched with `apt-get download`
/// through the machine's own apt sources, mirror, proxy and keyring (no
/// archive address in the code). Debian's archive keeps only the newest
/// build of a package, so when a point release replaces it apt no longer
/// finds this version and the pin must move (see
/// [`GuestImageError::PinMoved`]).
pub const KERNEL_PIN: KernelPin = KernelPin {
    package: "linux-image-6.1.0-50-cloud-amd64",
    version: "6.1.176-1",
    sha256: "efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791",
    release: "6.1.0-50-cloud-amd64",
};

/// Modules the guest loads at boot (their dependencies are added): the
/// virtio transports, virtio-fs and virtio-vsock.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    // Loaded at boot for QEMU user networking (kabuto.net=user), or when the
    // host configures the pod's first NIC (UpdateInterface).
    "virtio_net",
];

#[derive(Debug, Clone, Copy)]
pub struct KernelPin {
    pub package: &'static str,
    pub version: &'static str,
    pub sha256: &'static str,
    pub release: &'static str,
}

#[derive(Debug, Error)]
pub enum GuestImageError {
    #[error(
        "apt cannot fetch {package}={version}: {reason}\n\
         If `apt-get update` does not help, the kernel pin has moved (Debian's archive keeps \
         only a package's newest build). To update it: run `apt-get update`, then \
         `apt-cache show 'linux-image-*-cloud-amd64' | grep -E '^(Package|Version|SHA256)'` \
         and copy the newest Package, Version and SHA256 into KERNEL_PIN in \
         crates/host/runtime/src/guest_image.rs (release = the package name without \
         'linux-image-'). Rebuild; the image digests (attestation reference values) change."
    )]
    PinMoved {
        package: &'static str,
        version: &'static str,
        reason: String,
    },
    #[error("fetching the kernel package with apt-get: {0}")]
    Download(String),
    #[error("{what} has sha256 {actual}, but the pin says {expected}: refusing to use it")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("reading the kernel package: {0}")]
    Package(String),
    #[error("unpacking the kernel: {0}")]
    Kernel(String),
    #[error("kernel module {name}: {reason}")]
    Module { name: String, reason: String },
    #[error("the agent binary {path}: {reason}")]
    Agent { path: PathBuf, reason: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestImageError {
    let context = context.into();
    move |source| GuestImageError::Io { context, source }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// What `build` was given.
#[derive(Debug, Clone)]
pub struct BuildInputs {
    pub agent: PathBuf,
    /// The pause of confidential pods' sandbox containers, statically
    /// linked (its container's root holds nothing else).
    pub pause: PathBuf,
    pub out_dir: PathBuf,
    /// Use this .deb instead of downloading (it must still match the pin).
    pub kernel_deb: Option<PathBuf>,
    /// A static shell to add at /debug/busybox for the debug console. A
    /// debug image: never use it for confidential pods.
    pub debug_shell: Option<PathBuf>,
}

/// What `build` made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub kernel_sha256: String,
    pub initramfs: PathBuf,
    pub initramfs_sha256: String,
    pub kernel_package: String,
    pub kernel_release: String,
    pub modules: Vec<String>,
    /// True when the image carries the debug console's shell.
    pub debug_console: bool,
}

pub fn build(inputs: &BuildInputs) -> Result<GuestImage, GuestImageError> {
    fs::create_dir_all(&inputs.out_dir)
        .map_err(io_err(format!("mkdir {}", inputs.out_dir.display())))?;
    let deb = match &inputs.kernel_deb {
        Some(path) => fs::read(path).map_err(io_err(format!("reading {}", path.display())))?,
        None => fetch_kernel_package(&inputs.out_dir.join("cache"))?,
    };
    let actual = sha256_hex(&deb);
    if actual != KERNEL_PIN.sha256 {
        return Err(GuestImageError::DigestMismatch {
            what: format!("{} {}", KERNEL_PIN.package, KERNEL_PIN.version),
            expected: KERNEL_PIN.sha256.into(),
            actual,
        });
    }
    let package = unpack_deb(&deb)?;
    let vmlinux = bzimage_to_vmlinux(&package.vmlinuz)?;
    let modules = resolve_modules(&package.modules, GUEST_MODULES)?;

    let agent = fs::read(&inputs.agent).map_err(|e| GuestImageError::Agent {
        path: inputs.agent.clone(),
        reason: format!("{e} (build it first: cargo build --release)"),
    })?;
    let libs = shared_libraries(&inputs.agent)?;
    let pause = static_binary(&inputs.pause, "the pause binary", PAUSE_BUILD)?;
    let debug_shell = match &inputs.debug_shell {
        Some(path) => Some(static_binary(
            path,
            "the debug shell",
            "apt-get install busybox-static",
        )?),
        None => None,
    };
    let initramfs = initramfs::build(
        &agent,
        &libs,
        &modules,
        &package.release,
        &pause,
        debug_shell,
    )?;

    let kernel_path = inputs.out_dir.join("vmlinux");
    let initramfs_path = inputs.out_dir.join("initramfs.cpio");
    write_atomic(&kernel_path, &vmlinux)?;
    write_atomic(&initramfs_path, &initramfs)?;
    let image = GuestImage {
        kernel: kernel_path,
        kernel_sha256: sha256_hex(&vmlinux),
        initramfs: initramfs_path,
        initramfs_sha256: sha256_hex(&initramfs),
        kernel_package: format!("{} {}", KERNEL_PIN.package, KERNEL_PIN.version),
        kernel_release: package.release,
        modules: modules.iter().map(|(name, _)| name.clone()).collect(),
        debug_console: inputs.debug_shell.is_some(),
    };
    let manifest = serde_json::to_vec_pretty(&image).map_err(|e| GuestImageError::Io {
        context: "writing manifest.json".into(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&inputs.out_dir.join("manifest.json"), &manifest)?;
    Ok(image)
}

/// How scripts/setup.sh builds the pause statically.
const PAUSE_BUILD: &str = "RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
     -p kabuto-pause --target x86_64-unknown-linux-gnu, then pass \
     target/x86_64-unknown-linux-gnu/release/kabuto-pause as --pause";

/// The bytes of `path`, which must be a statically linked program.
fn static_binary(path: &Path, what: &str, how: &str) -> Result<Vec<u8>, GuestImageError> {
    let data = fs::read(path).map_err(|e| GuestImageError::Agent {
        path: path.to_path_buf(),
        reason: format!("{what}: {e} (build it: {how})"),
    })?;
    if !shared_libraries(path)?.is_empty() {
        return Err(GuestImageError::Agent {
            path: path.to_path_buf(),
            reason: format!("{what} must be statically linked (build it: {how})"),
        });
    }
    Ok(data)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), GuestImageError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", path.display())))
}

/// Writes `data` through `w`; used by the CLI to print digests.
pub fn describe(image: &GuestImage, mut w: impl Write) -> std::io::Result<()> {
    writeln!(w, "kernel package  {}", image.kernel_package)?;
    writeln!(w, "kernel          {}", image.kernel.display())?;
    writeln!(w, "  sha256        {}", image.kernel_sha256)?;
    writeln!(w, "initramfs       {}", image.initramfs.display())?;
    writeln!(w, "  sha256        {}", image.initramfs_sha256)?;
    writeln!(w, "modules         {}", image.modules.join(" "))?;
    if image.debug_console {
        writeln!(
            w,
            "debug console   yes (a debug image: not for confidential pods)"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
