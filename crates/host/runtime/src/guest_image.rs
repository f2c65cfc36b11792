//! Builds the guest image: the pinned Debian cloud kernel (as an
//! uncompressed PVH `vmlinux`) and an initramfs whose `/init` is
//! `kabuto-agent`, with only the kernel modules the guest needs.
//!
//! Same inputs give identical bytes: archive entries are sorted, times and
//! owners are zero. The SHA-256 digests printed at the end are what later
//! attestation reference values are made of.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Command,
};

use sha2::{Digest, Sha256};
use thiserror::Error;

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
    // Loaded only when the runtime gives the guest a network (kabuto.net=user).
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
    let initramfs = initramfs(
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

/// The pinned kernel package from the cache, or fetched into it with
/// `apt-get download` (the machine's apt configuration decides where from).
fn fetch_kernel_package(cache: &Path) -> Result<Vec<u8>, GuestImageError> {
    let cached = cache.join(format!(
        "{}_{}_amd64.deb",
        KERNEL_PIN.package, KERNEL_PIN.version
    ));
    if let Ok(data) = fs::read(&cached) {
        if sha256_hex(&data) == KERNEL_PIN.sha256 {
            return Ok(data);
        }
    }
    fs::create_dir_all(cache).map_err(io_err(format!("mkdir {}", cache.display())))?;
    let work = cache.join(format!("apt-download.{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(io_err(format!("mkdir {}", work.display())))?;
    let result = apt_download(&work, KERNEL_PIN.package, KERNEL_PIN.version).and_then(|data| {
        write_atomic(&cached, &data)?;
        Ok(data)
    });
    let _ = fs::remove_dir_all(&work);
    result
}

/// Runs `apt-get download PACKAGE=VERSION` in `dir` and reads the one
/// package it writes. `package`/`version` are the pin's (parameters for
/// the test of a moved pin).
fn apt_download(
    dir: &Path,
    package: &'static str,
    version: &'static str,
) -> Result<Vec<u8>, GuestImageError> {
    let wanted = format!("{package}={version}");
    log::info!("apt-get download {wanted}");
    let output = std::process::Command::new("apt-get")
        .args(["download", "-q", &wanted])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            GuestImageError::Download(format!(
                "running apt-get: {e} (kabuto guest build needs Debian's apt, or --kernel-deb)"
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .lines()
            .filter(|l| l.starts_with("E:"))
            .collect::<Vec<_>>()
            .join("; ");
        let reason = if reason.is_empty() {
            format!("apt-get exited with {}", output.status)
        } else {
            reason
        };
        return Err(GuestImageError::PinMoved {
            package,
            version,
            reason,
        });
    }
    let debs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(format!("reading {}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    match debs.as_slice() {
        [deb] => fs::read(deb).map_err(io_err(format!("reading {}", deb.display()))),
        other => Err(GuestImageError::Download(format!(
            "apt-get download {wanted} left {} packages, expected one",
            other.len()
        ))),
    }
}

struct KernelPackage {
    vmlinuz: Vec<u8>,
    release: String,
    /// Module name (with '_') → (path inside the package, contents).
    modules: HashMap<String, (String, Vec<u8>)>,
}

fn unpack_deb(deb: &[u8]) -> Result<KernelPackage, GuestImageError> {
    let pkg = |e: String| GuestImageError::Package(e);
    let mut archive = ar::Archive::new(deb);
    let mut data_tar = None;
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(|e| pkg(e.to_string()))?;
        let name = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        if name == "data.tar.xz" {
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .map_err(|e| pkg(e.to_string()))?;
            data_tar = Some(buf);
        }
    }
    let data_tar = data_tar.ok_or_else(|| pkg("no data.tar.xz member".into()))?;
    let mut tar = tar::Archive::new(xz2::read::XzDecoder::new(data_tar.as_slice()));
    let boot_prefix = format!("./boot/vmlinuz-{}", KERNEL_PIN.release);
    let mut vmlinuz = None;
    let mut modules = HashMap::new();
    for entry in tar.entries().map_err(|e| pkg(e.to_string()))? {
        let mut entry = entry.map_err(|e| pkg(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| pkg(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let is_module = path.contains("/lib/modules/") && path.ends_with(".ko");
        if path != boot_prefix && !is_module {
            continue;
        }
        let mut buf = Vec::new();
        entry
            .read_to_end(&mut buf)
            .map_err(|e| pkg(e.to_string()))?;
        if is_module {
            let name = Path::new(&path)
                .file_stem()
                .map(|s| s.to_string_lossy().replace('-', "_"))
                .unwrap_or_default();
            modules.insert(name, (path, buf));
        } else {
            vmlinuz = Some(buf);
        }
    }
    Ok(KernelPackage {
        vmlinuz: vmlinuz.ok_or_else(|| pkg(format!("no {boot_prefix} in the package")))?,
        release: KERNEL_PIN.release.to_string(),
        modules,
    })
}

/// Extracts the uncompressed kernel (an ELF with a PVH entry point) from a
/// bzImage, using the payload location the x86 boot protocol (2.08+) gives.
pub fn bzimage_to_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, GuestImageError> {
    let k = |e: &str| GuestImageError::Kernel(e.to_string());
    let read_u32 = |off: usize| -> Result<u32, GuestImageError> {
        bzimage
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| k("truncated setup header"))
    };
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err(k("not a bzImage (no HdrS signature)"));
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let payload_offset = read_u32(0x248)? as usize;
    let payload_length = read_u32(0x24c)? as usize;
    let start = (setup_sects + 1) * 512 + payload_offset;
    let payload = bzimage
        .get(start..start + payload_length)
        .ok_or_else(|| k("payload lies outside the image"))?;
    let vmlinux = match payload.get(..4) {
        Some([0x02, 0x21, 0x4c, 0x18]) => lz4_legacy_decompress(payload)?,
        Some([0xfd, b'7', b'z', b'X']) => {
            let mut out = Vec::new();
            xz2::read::XzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|e| k(&format!("xz payload: {e}")))?;
            out
        }
        _ => return Err(k("unsupported kernel compression (expected LZ4 or XZ)")),
    };
    if vmlinux.get(..4) != Some(b"\x7fELF") {
        return Err(k("decompressed payload is not an ELF file"));
    }
    Ok(vmlinux)
}

/// The LZ4 "legacy" frame the kernel build uses (`lz4 -l`): a magic, then
/// blocks of ≤ 8 MiB each prefixed by their compressed size; the kernel
/// appends the total uncompressed size. No crate reads this frame format,
/// so it is parsed here; blocks go to lz4_flex.
fn lz4_legacy_decompress(payload: &[u8]) -> Result<Vec<u8>, GuestImageError> {
    const MAGIC: u32 = 0x184C_2102;
    const BLOCK: usize = 8 << 20;
    let k = |e: String| GuestImageError::Kernel(e);
    if payload.len() < 8 {
        return Err(k("LZ4 payload too short".into()));
    }
    let n = payload.len();
    let expected = u32::from_le_bytes([
        payload[n - 4],
        payload[n - 3],
        payload[n - 2],
        payload[n - 1],
    ]) as usize;
    let mut out = Vec::with_capacity(expected);
    let mut pos = 0;
    while out.len() < expected && pos + 4 <= n {
        let word = u32::from_le_bytes([
            payload[pos],
            payload[pos + 1],
            payload[pos + 2],
            payload[pos + 3],
        ]);
        pos += 4;
        if word == MAGIC {
            continue;
        }
        let size = word as usize;
        let block = payload
            .get(pos..pos + size)
            .ok_or_else(|| k(format!("LZ4 block at {pos} runs past the payload")))?;
        let chunk = lz4_flex::block::decompress(block, BLOCK)
            .map_err(|e| k(format!("LZ4 block at {pos}: {e}")))?;
        out.extend_from_slice(&chunk);
        pos += size;
    }
    if out.len() != expected {
        return Err(k(format!(
            "LZ4 payload gave {} bytes, the kernel says {expected}",
            out.len()
        )));
    }
    Ok(out)
}

fn module_depends(name: &str, ko: &[u8]) -> Result<Vec<String>, GuestImageError> {
    use object::{Object, ObjectSection};
    let err = |reason: String| GuestImageError::Module {
        name: name.to_string(),
        reason,
    };
    let file = object::File::parse(ko).map_err(|e| err(e.to_string()))?;
    let modinfo = file
        .section_by_name(".modinfo")
        .ok_or_else(|| err("no .modinfo section".into()))?
        .data()
        .map_err(|e| err(e.to_string()))?;
    Ok(modinfo
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect())
}

/// The wanted modules and their dependencies, dependencies first.
fn resolve_modules(
    available: &HashMap<String, (String, Vec<u8>)>,
    wanted: &[&str],
) -> Result<Vec<(String, Vec<u8>)>, GuestImageError> {
    fn visit(
        name: &str,
        available: &HashMap<String, (String, Vec<u8>)>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), GuestImageError> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(GuestImageError::Module {
                name: name.into(),
                reason: "dependency cycle".into(),
            });
        }
        let (_, ko) = available.get(name).ok_or_else(|| GuestImageError::Module {
            name: name.into(),
            reason: "not in the kernel package (built in, or renamed?)".into(),
        })?;
        for dep in module_depends(name, ko)? {
            visit(&dep, available, done, visiting, order)?;
        }
        done.insert(name.to_string());
        order.push((name.to_string(), ko.clone()));
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(name, available, &mut done, &mut BTreeSet::new(), &mut order)?;
    }
    Ok(order)
}

/// The shared libraries (and dynamic loader) the agent needs, by path.
fn shared_libraries(agent: &Path) -> Result<Vec<PathBuf>, GuestImageError> {
    let err = |reason: String| GuestImageError::Agent {
        path: agent.to_path_buf(),
        reason,
    };
    let output = Command::new("ldd")
        .arg(agent)
        .output()
        .map_err(|e| err(format!("running ldd: {e}")))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = BTreeSet::new();
    for line in text.lines() {
        if line.contains("not found") {
            return Err(err(format!("missing library: {}", line.trim())));
        }
        let path = match line.split("=>").nth(1) {
            Some(rest) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    Ok(libs.into_iter().collect())
}

/// A deterministic cpio "newc" archive writer (the initramfs format). No
/// crate writes reproducible newc archives with device nodes, so it is here.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads the archive in 512-byte blocks.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

enum Node {
    Dir,
    File { mode: u32, data: Vec<u8> },
    CharDev { major: u32, minor: u32 },
}

fn initramfs(
    agent: &[u8],
    libs: &[PathBuf],
    modules: &[(String, Vec<u8>)],
    release: &str,
    pause: &[u8],
    debug_shell: Option<Vec<u8>>,
) -> Result<Vec<u8>, GuestImageError> {
    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    let add_file = |tree: &mut BTreeMap<String, Node>, path: &str, mode: u32, data: Vec<u8>| {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            tree.entry(p.to_string_lossy().into_owned())
                .or_insert(Node::Dir);
            parent = p.parent();
        }
        tree.insert(path.to_string(), Node::File { mode, data });
    };
    add_file(&mut tree, "init", 0o755, agent.to_vec());
    for lib in libs {
        let data = fs::read(lib).map_err(io_err(format!("reading {}", lib.display())))?;
        let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
        add_file(&mut tree, &rel, 0o755, data);
    }
    let mut list = String::new();
    for (name, ko) in modules {
        let rel = format!("lib/modules/{release}/{name}.ko");
        list.push_str(&format!("/{rel}\n"));
        add_file(&mut tree, &rel, 0o644, ko.clone());
    }
    add_file(&mut tree, "etc/kabuto/modules", 0o644, list.into_bytes());
    // The pause container's root (kabuto_protocol::GUEST_PAUSE_ROOT; the
    // agent keeps it when it switches root).
    add_file(
        &mut tree,
        "pause-bundle/rootfs/pause",
        0o755,
        pause.to_vec(),
    );
    for dir in ["pause-bundle/rootfs/proc", "pause-bundle/rootfs/dev"] {
        tree.insert(dir.to_string(), Node::Dir);
    }
    if let Some(shell) = debug_shell {
        add_file(&mut tree, "debug/busybox", 0o755, shell);
    }
    for dir in ["dev", "proc", "sys", "run", "tmp", "root"] {
        tree.insert(dir.to_string(), Node::Dir);
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs exists.
    tree.insert("dev/console".into(), Node::CharDev { major: 5, minor: 1 });
    tree.insert("dev/null".into(), Node::CharDev { major: 1, minor: 3 });

    let mut cpio = Cpio::default();
    for (path, node) in &tree {
        match node {
            Node::Dir => cpio.entry(path, 0o040755, (0, 0), &[]),
            Node::File { mode, data } => cpio.entry(path, 0o100000 | mode, (0, 0), data),
            Node::CharDev { major, minor } => cpio.entry(path, 0o020600, (*major, *minor), &[]),
        }
    }
    Ok(cpio.finish())
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
mod tests {
    use super::*;

    #[test]
    fn cpio_is_deterministic_and_well_formed() {
        let build = || {
            initramfs(
                b"agent",
                &[],
                &[("virtio".into(), b"ko".to_vec())],
                "6.1.0-x",
                b"pause",
                None,
            )
            .expect("initramfs")
        };
        let a = build();
        assert_eq!(a, build(), "same inputs, same bytes");
        assert_eq!(a.len() % 512, 0);
        assert!(a.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&a);
        for name in [
            "init\0",
            "dev/console\0",
            "etc/kabuto/modules\0",
            "pause-bundle/rootfs/pause\0",
            "pause-bundle/rootfs/proc\0",
            "lib/modules/6.1.0-x/virtio.ko\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
        assert!(
            text.contains("/lib/modules/6.1.0-x/virtio.ko\n"),
            "module list"
        );
    }

    #[test]
    fn rejects_non_bzimages() {
        let err = bzimage_to_vmlinux(&[0u8; 4096]).expect_err("zeros");
        assert!(err.to_string().contains("HdrS"), "{err}");
    }

    #[test]
    fn lz4_legacy_round_trip() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut payload = 0x184C_2102u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
        assert_eq!(lz4_legacy_decompress(&payload).expect("decompress"), data);
        // A truncated payload is an error, not a short kernel.
        payload.truncate(payload.len() - 10);
        payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
        assert!(lz4_legacy_decompress(&payload).is_err());
    }

    /// A version apt does not know (as when Debian's archive replaced the
    /// pinned build) fails naming the package, the version and how to move
    /// the pin. Needs apt's package lists, not the network.
    #[test]
    fn a_moved_pin_says_how_to_update() {
        if std::process::Command::new("apt-get")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: no apt-get on this machine");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let err = apt_download(dir.path(), KERNEL_PIN.package, "0.0-not-a-version")
            .expect_err("apt cannot have that version");
        assert!(matches!(err, GuestImageError::PinMoved { .. }), "{err:?}");
        let text = err.to_string();
        for needle in [
            KERNEL_PIN.package,
            "0.0-not-a-version",
            "KERNEL_PIN",
            "apt-cache show",
            "E:",
        ] {
            assert!(text.contains(needle), "{needle:?} missing: {text}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }
}
