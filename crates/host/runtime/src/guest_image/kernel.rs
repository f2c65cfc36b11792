//! The guest kernel: the pinned Debian package fetched through apt and
//! checked, its PVH `vmlinux` and the modules the guest loads.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    io::Read,
    path::Path,
};

use super::*;

/// The pinned kernel package from the cache, or fetched into it with
/// `apt-get download` (the machine's apt configuration decides where from).
pub(super) fn fetch_kernel_package(cache: &Path) -> Result<Vec<u8>, GuestImageError> {
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
pub(super) fn apt_download(
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

pub(super) struct KernelPackage {
    pub(super) vmlinuz: Vec<u8>,
    pub(super) release: String,
    /// Module name (with '_') → (path inside the package, contents).
    pub(super) modules: HashMap<String, (String, Vec<u8>)>,
}

pub(super) fn unpack_deb(deb: &[u8]) -> Result<KernelPackage, GuestImageError> {
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
pub(super) fn lz4_legacy_decompress(payload: &[u8]) -> Result<Vec<u8>, GuestImageError> {
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

pub(super) fn module_depends(name: &str, ko: &[u8]) -> Result<Vec<String>, GuestImageError> {
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
pub(super) fn resolve_modules(
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
