//! `kabuto install` / `kabuto uninstall`.
//!
//! Install copies the shim, the CLI, `kabuto-snapshotter` with a systemd
//! unit (not enabled), and the vhost-user vsock device, if found, onto
//! PATH, the guest image under `<prefix>/share/kabuto/guest`, and writes the
//! default config if none exists. It records every file it wrote, with its
//! digest, in [`MANIFEST`]; uninstall removes exactly those files (leaving
//! any that changed since) and the directories it created.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};
use kabuto_runtime::{config::Config, guest_image::sha256_hex};
use serde_json::json;

const MANIFEST: &str = "/var/lib/kabuto/installed.json";
const SNAPSHOTTER_UNIT: &str = "/etc/systemd/system/kabuto-snapshotter.service";

#[derive(clap::Args)]
pub struct InstallArgs {
    /// Installation prefix for binaries and the guest image.
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Install into this directory as if it were `/` (like DESTDIR): for
    /// packaging and tests. The written config still names the final paths.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The built guest image (default: target/guest beside the binaries).
    #[arg(long)]
    guest_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct UninstallArgs {
    /// The `--root` given to install.
    #[arg(long, default_value = "/")]
    root: PathBuf,
}

/// `path` (absolute) placed under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

struct Recorder {
    files: Vec<(PathBuf, String)>,
    dirs: Vec<PathBuf>,
}

impl Recorder {
    fn mkdir(&mut self, dir: &Path) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d.filter(|p| !p.exists()) {
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Deepest last here; uninstall removes them in reverse.
        self.dirs.extend(missing.into_iter().rev());
        Ok(())
    }

    fn write(&mut self, path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(parent) = path.parent() {
            self.mkdir(parent)?;
        }
        // Write beside and rename: a running shim keeps its old inode.
        let tmp = path.with_extension("kabuto-new");
        fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))?;
        println!("installed {}", path.display());
        self.files.push((path.to_path_buf(), sha256_hex(data)));
        Ok(())
    }

    fn copy(&mut self, from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
        let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.write(to, &data, mode)
    }
}

fn find_vhost_user_vsock() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("vhost-device-vsock"))
        .find(|p| p.is_file())
}

pub fn install(args: &InstallArgs, exe_dir: &Path, default_guest: &Path) -> anyhow::Result<()> {
    let root = &args.root;
    let manifest_path = under(root, Path::new(MANIFEST));
    if manifest_path.exists() {
        let previous = read_manifest(&manifest_path)?;
        remove_recorded(&previous, &manifest_path)?;
    }
    let guest_dir = args
        .guest_dir
        .clone()
        .unwrap_or_else(|| default_guest.to_path_buf());
    for f in ["vmlinux", "initramfs.cpio"] {
        if !guest_dir.join(f).is_file() {
            bail!(
                "{} not found: build the guest image first (target/release/kabuto guest build)",
                guest_dir.join(f).display()
            );
        }
    }
    let shim = exe_dir.join("containerd-shim-kabuto-v2");
    if !shim.is_file() {
        bail!(
            "{} not found: run cargo build --release first",
            shim.display()
        );
    }
    let mut rec = Recorder {
        files: Vec::new(),
        dirs: Vec::new(),
    };
    install_binaries(args, exe_dir, &shim, &mut rec)?;
    install_guest_and_config(args, &guest_dir, &mut rec)?;
    // The software TEE (insecure; for hosts without TEE hardware): its key
    // pair is made here, once, so each host has its own root. A production
    // build (no software-tee feature) has no signer and makes no keys.
    #[cfg(feature = "software-tee")]
    install_software_tee(root, &mut rec)?;
    write_manifest(&manifest_path, root, &rec)?;
    println!(
        "kabuto installed; try: ctr run --rm --runtime io.containerd.kabuto.v2 <image> t1 uname -r"
    );
    Ok(())
}

/// The shim, the CLI, the snapshotter (with its systemd unit, not started
/// here: containerd's config must name it) and the vhost-user vsock device.
fn install_binaries(
    args: &InstallArgs,
    exe_dir: &Path,
    shim: &Path,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let root = &args.root;
    let bin = under(root, &args.prefix.join("bin"));
    rec.copy(shim, &bin.join("containerd-shim-kabuto-v2"), 0o755)?;
    rec.copy(&exe_dir.join("kabuto"), &bin.join("kabuto"), 0o755)?;
    let snapshotter = exe_dir.join("kabuto-snapshotter");
    if snapshotter.is_file() {
        let target = bin.join("kabuto-snapshotter");
        rec.copy(&snapshotter, &target, 0o755)?;
        let unit = format!(
            "[Unit]\nDescription=kabuto-snapshotter: containerd snapshotter for images kabuto guests pull\n\
             Before=containerd.service\n\n[Service]\nExecStart={}\nRestart=always\n\n\
             [Install]\nWantedBy=multi-user.target\n",
            args.prefix.join("bin/kabuto-snapshotter").display()
        );
        rec.write(
            &under(root, Path::new(SNAPSHOTTER_UNIT)),
            unit.as_bytes(),
            0o644,
        )?;
    }
    let vsock_target = bin.join("vhost-device-vsock");
    match find_vhost_user_vsock() {
        Some(p) if p != vsock_target => rec.copy(&p, &vsock_target, 0o755)?,
        Some(_) => {}
        None => eprintln!(
            "warning: vhost-device-vsock not found; hosts without /dev/vhost-vsock need it \
             (cargo install vhost-device-vsock --version 0.3.0 --locked)"
        ),
    }
    Ok(())
}

/// The guest image, and the documented default config unless one exists.
fn install_guest_and_config(
    args: &InstallArgs,
    guest_dir: &Path,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let root = &args.root;
    let guest_final = args.prefix.join("share/kabuto/guest");
    let guest_target = under(root, &guest_final);
    for f in ["vmlinux", "initramfs.cpio", "manifest.json"] {
        if guest_dir.join(f).is_file() {
            rec.copy(&guest_dir.join(f), &guest_target.join(f), 0o644)?;
        }
    }
    let config_path = under(root, Path::new(kabuto_runtime::config::DEFAULT_CONFIG_PATH));
    if config_path.exists() {
        println!("kept existing {}", config_path.display());
    } else {
        let mut text = Config::default_toml();
        let default_dir = kabuto_runtime::config::DEFAULT_GUEST_DIR;
        text = text.replace(default_dir, &guest_final.display().to_string());
        rec.write(&config_path, text.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Records what was installed, for `kabuto uninstall` and a re-install.
fn write_manifest(manifest_path: &Path, root: &Path, rec: &Recorder) -> anyhow::Result<()> {
    let manifest = json!({
        "files": rec.files.iter().map(|(p, d)| json!({"path": p, "sha256": d})).collect::<Vec<_>>(),
        "dirs": rec.dirs,
    });
    let mut manifest_dirs = Recorder {
        files: Vec::new(),
        dirs: Vec::new(),
    };
    manifest_dirs.mkdir(manifest_path.parent().unwrap_or(root))?;
    let mut manifest = manifest;
    if let Some(dirs) = manifest.get_mut("dirs").and_then(|d| d.as_array_mut()) {
        dirs.extend(manifest_dirs.dirs.iter().map(|d| json!(d)));
    }
    fs::write(manifest_path, serde_json::to_vec_pretty(&manifest)?)
        .with_context(|| format!("writing {}", manifest_path.display()))
}

fn read_manifest(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

fn remove_recorded(manifest: &serde_json::Value, manifest_path: &Path) -> anyhow::Result<()> {
    for f in manifest["files"].as_array().into_iter().flatten() {
        let (Some(path), Some(digest)) = (f["path"].as_str(), f["sha256"].as_str()) else {
            continue;
        };
        match fs::read(path) {
            Ok(data) if sha256_hex(&data) == digest => {
                fs::remove_file(path).with_context(|| format!("removing {path}"))?;
                println!("removed {path}");
            }
            Ok(_) => eprintln!("kept {path}: it changed since kabuto installed it"),
            Err(_) => {}
        }
    }
    let _ = fs::remove_file(manifest_path);
    let dirs: Vec<&str> = manifest["dirs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str())
        .collect();
    // Deepest first; a directory that is not empty any more is kept.
    let mut sorted = dirs.clone();
    sorted.sort_by_key(|d| std::cmp::Reverse(Path::new(d).components().count()));
    for d in sorted {
        if fs::remove_dir(d).is_ok() {
            println!("removed {d}/");
        }
    }
    Ok(())
}

pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let manifest_path = under(&args.root, Path::new(MANIFEST));
    if !manifest_path.exists() {
        bail!(
            "{} not found: kabuto is not installed (nothing removed)",
            manifest_path.display()
        );
    }
    let manifest = read_manifest(&manifest_path)?;
    remove_recorded(&manifest, &manifest_path)
}

#[cfg(feature = "software-tee")]
fn install_software_tee(root: &Path, rec: &mut Recorder) -> anyhow::Result<()> {
    let swtee = under(
        root,
        Path::new(kabuto_runtime::config::DEFAULT_SOFTWARE_TEE_DIR),
    );
    if swtee.join("firmware.key").exists() {
        println!("kept existing software TEE keys in {}", swtee.display());
    } else {
        if let Some(parent) = swtee.parent() {
            rec.mkdir(parent)?;
        }
        rec.dirs.push(swtee.clone());
        kabuto_swtee::init(&swtee)?;
        for f in ["root.crt", "firmware.crt", "firmware.key"] {
            let path = swtee.join(f);
            let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            rec.files.push((path, sha256_hex(&data)));
        }
        println!(
            "created the software TEE in {} (INSECURE; a KBS trusts {} only if you tell it to)",
            swtee.display(),
            swtee.join("root.crt").display()
        );
    }
    Ok(())
}
