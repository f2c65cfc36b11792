//! Test harness: a private containerd (own root, state and socket in a
//! temporary directory, so a system containerd is never touched), a locally
//! built busybox image imported into it, and `ctr`, the real client.
//!
//! The environment comes from `scripts/test.sh` (see README.md):
//! `KABUTO_E2E_BIN_DIR` holds `containerd-shim-kabuto-v2`,
//! `KABUTO_E2E_GUEST_DIR` the guest image.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

pub mod confidential;
pub mod cri;
pub mod policy_bench;

pub const RUNTIME: &str = "io.containerd.kabuto.v2";
pub const IMAGE: &str = "localhost/busybox:latest";

/// Why an e2e test is ignored by a plain `cargo test`.
pub const NEEDS_ENV: &str = "needs the e2e environment: run scripts/test.sh";

pub struct Paths {
    pub bin_dir: PathBuf,
    pub guest_dir: PathBuf,
}

pub fn paths() -> Paths {
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!("{name} is not set: run the e2e tests through scripts/test.sh")
            })
    };
    Paths {
        bin_dir: var("KABUTO_E2E_BIN_DIR"),
        guest_dir: var("KABUTO_E2E_GUEST_DIR"),
    }
}

/// The guest kernel's release, from the guest image manifest.
pub fn guest_kernel_release() -> String {
    let manifest = paths().guest_dir.join("manifest.json");
    let text = fs::read_to_string(&manifest).expect("guest manifest.json");
    let value: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    value["kernel_release"]
        .as_str()
        .expect("kernel_release")
        .to_string()
}

pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Extra kabuto config lines for a test (TOML, appended to the defaults the
/// harness writes).
#[derive(Default)]
pub struct Options {
    pub kabuto_config: String,
    /// Guest image directory (default: `KABUTO_E2E_GUEST_DIR`).
    pub guest_dir: Option<PathBuf>,
    /// Extra environment for containerd and so for the shim.
    pub env: Vec<(String, String)>,
    /// Appended to containerd's config right after the CRI plugin's
    /// `disable_apparmor` key: keys land in that table, tables follow.
    pub containerd_config: String,
}

impl Containerd {
    pub fn start() -> Containerd {
        Containerd::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Containerd {
        let p = paths();
        let dir = tempfile::Builder::new()
            .prefix("kabuto-e2e-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path();
        fs::write(
            d.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 [grpc]\n  address = \"{0}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_apparmor = true\n{1}",
                d.display(),
                options.containerd_config
            ),
        )
        .expect("containerd config");
        fs::write(
            d.join("kabuto.toml"),
            format!(
                "[guest]\nkernel = \"{g}/vmlinux\"\ninitramfs = \"{g}/initramfs.cpio\"\n\
                 [runtime]\nstate_dir = \"{d}/kabuto\"\nlog_level = \"debug\"\n{extra}",
                g = options.guest_dir.as_ref().unwrap_or(&p.guest_dir).display(),
                d = d.display(),
                extra = options.kabuto_config
            ),
        )
        .expect("kabuto config");
        let path = format!(
            "{}:{}",
            p.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = fs::File::create(d.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .arg("--log-level")
            .arg("debug")
            .env("PATH", path)
            .env("KABUTO_CONFIG_PATH", d.join("kabuto.toml"))
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting containerd (apt-get install containerd)");
        let c = Containerd {
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.ctr(&["version"]).status.code() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                c.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        let image = c.dir.path().join("busybox-oci.tar");
        build_busybox_image(&image).expect("building the busybox image");
        let out = c.ctr(&["image", "import", image.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    /// The state directory of sandbox `id` of containerd's `default`
    /// namespace (what `ctr` uses), as kabuto names it.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        let config =
            kabuto_runtime::config::Config::from_file(&self.config_path()).expect("kabuto config");
        kabuto_runtime::sandbox::sandbox_dir(&config, "default", id)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("kabuto.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("kabuto")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with_stdin(args, None)
    }

    pub fn ctr_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.socket()).args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn().expect("ctr");
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(data).expect("writing stdin");
        }
        child.wait_with_output().expect("ctr output")
    }

    /// `ctr run --rm --runtime kabuto IMAGE id args...`
    pub fn run(&self, id: &str, extra: &[&str], args: &[&str]) -> Output {
        let mut all = vec!["run", "--rm", "--runtime", RUNTIME];
        all.extend_from_slice(extra);
        all.push(IMAGE);
        all.push(id);
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// What kabuto left behind: its processes, mounts and state files.
    pub fn residue(&self) -> Residue {
        let needle = self.dir.path().display().to_string();
        let processes = processes_matching(&needle)
            .into_iter()
            .filter(|(_, cmd)| {
                [
                    "qemu-system",
                    "virtiofsd",
                    "vhost-device-vsock",
                    "containerd-shim-kabuto",
                ]
                .iter()
                .any(|p| cmd.contains(p))
            })
            .map(|(pid, cmd)| format!("{pid}: {cmd}"))
            .collect();
        let state = self.state_dir();
        let mounts = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&state.display().to_string()))
            .collect();
        // Per-sandbox state; the `sandboxes` directory itself may stay.
        let mut files = BTreeSet::new();
        collect_files(&state.join("sandboxes"), &mut files);
        Residue {
            processes,
            mounts,
            files,
        }
    }

    /// `ctr run -d --runtime kabuto [extra] IMAGE id args...`; panics on failure.
    pub fn run_detached(&self, id: &str, extra: &[&str], args: &[&str]) {
        let mut all = vec!["run", "-d", "--runtime", RUNTIME];
        all.extend_from_slice(extra);
        all.push(IMAGE);
        all.push(id);
        all.extend_from_slice(args);
        let out = self.ctr(&all);
        assert!(out.status.success(), "starting {id}: {}", stderr(&out));
    }

    /// Waits until containerd reports the task stopped.
    pub fn wait_stopped(&self, id: &str) -> bool {
        self.eventually(Duration::from_secs(30), || {
            stdout(&self.ctr(&["task", "ls"]))
                .lines()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains("STOPPED"))
        })
    }

    /// Deletes a stopped task and its container; returns the delete's
    /// stderr, where ctr reports a non-zero exit code.
    pub fn delete(&self, id: &str) -> String {
        let out = self.ctr(&["task", "delete", id]);
        assert!(out.status.success(), "deleting task {id}: {}", stderr(&out));
        let rm = self.ctr(&["container", "rm", id]);
        assert!(
            rm.status.success(),
            "removing container {id}: {}",
            stderr(&rm)
        );
        stderr(&out)
    }

    /// SIGKILL, wait until stopped, delete.
    pub fn kill_and_delete(&self, id: &str) -> String {
        let out = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(out.status.success(), "killing {id}: {}", stderr(&out));
        assert!(self.wait_stopped(id), "{id} did not stop");
        self.delete(id)
    }

    /// Asserts that, within 10 s, kabuto has left nothing behind.
    pub fn assert_no_residue(&self) {
        assert!(
            self.eventually(Duration::from_secs(10), || self.residue().is_empty()),
            "{:?}",
            self.residue()
        );
    }

    /// Stops containerd (SIGTERM, as systemd would) and waits for it; the
    /// shims it started keep running, as they do after a real containerd
    /// stop.
    pub fn stop_containerd(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// The pid of the kabuto shim serving container `id` of this containerd.
    pub fn shim_pid(&self, id: &str) -> Option<u32> {
        let needle = self.dir.path().display().to_string();
        processes_matching(&needle)
            .into_iter()
            .find(|(_, cmd)| {
                let args: Vec<&str> = cmd.split_whitespace().collect();
                args.first()
                    .is_some_and(|a| a.ends_with("containerd-shim-kabuto-v2"))
                    && args.windows(2).any(|w| w == ["-id", id])
            })
            .map(|(pid, _)| pid)
    }

    /// Runs the host's `kabuto` with this containerd's kabuto config.
    pub fn kabuto(&self, args: &[&str]) -> Output {
        Command::new(paths().bin_dir.join("kabuto"))
            .args(args)
            .env("KABUTO_CONFIG_PATH", self.config_path())
            .output()
            .expect("running kabuto")
    }

    /// Polls until `f` is true or `limit` passes.
    pub fn eventually(&self, limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            thread::sleep(Duration::from_millis(100));
        }
        f()
    }
}

fn collect_files(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        out.insert(path.display().to_string());
        if path.is_dir() && !path.is_symlink() {
            collect_files(&path, out);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Residue {
    pub processes: BTreeSet<String>,
    pub mounts: BTreeSet<String>,
    pub files: BTreeSet<String>,
}

impl Residue {
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty() && self.mounts.is_empty() && self.files.is_empty()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        // Whatever a failed test left running or mounted goes too.
        let r = self.residue();
        for p in &r.processes {
            if let Some(pid) = p.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let root = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn file<W: Write>(
    b: &mut tar::Builder<W>,
    name: &str,
    mode: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(0);
    b.append_data(&mut h, name, data)
}

/// An initramfs of Debian's static busybox at /busybox with `init` as its
/// /init script (written with cpio(1)).
pub fn busybox_initramfs(dir: &Path, name: &str, init: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join(format!("{name}-root"));
    fs::create_dir_all(root.join("dev")).expect("mkdir");
    fs::copy("/bin/busybox", root.join("busybox")).expect("copy busybox");
    fs::write(root.join("init"), format!("#!/busybox sh\n{init}\n")).expect("init");
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = dir.join(format!("{name}.cpio"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc > {} 2>/dev/null",
            root.display(),
            out.display()
        ))
        .status()
        .expect("cpio");
    assert!(status.success(), "cpio failed");
    out
}

/// Zombie children of `parent` (exited, never waited for): their pids.
pub fn zombie_children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if state == Some("Z") && ppid.and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Processes whose command line contains `needle`: (pid, command line).
pub fn processes_matching(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            out.push((pid, cmdline.trim().to_string()));
        }
    }
    out
}

/// Builds an OCI image layout archive of Debian's busybox-static, tagged
/// [`IMAGE`], deterministically (fixed times and owners).
pub fn build_busybox_image(out: &Path) -> std::io::Result<()> {
    let busybox = fs::read("/bin/busybox")?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();

    let mut layer = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, name: &str| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, name, std::io::empty())
    };
    for d in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "root", "var", "data",
    ] {
        dir(&mut layer, d)?;
    }
    file(&mut layer, "bin/busybox", 0o755, &busybox)?;
    for applet in applets.split_whitespace().filter(|a| *a != "busybox") {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        layer.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    file(
        &mut layer,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    file(
        &mut layer,
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
    )?;
    let layer = layer.into_inner()?;

    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]},
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(&layer), "size": layer.len()}],
    }))?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest), "size": manifest.len(),
            "annotations": {"io.containerd.image.name": IMAGE,
                            "org.opencontainers.image.ref.name": "latest"},
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    }))?;
    let mut archive = tar::Builder::new(fs::File::create(out)?);
    file(
        &mut archive,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    file(&mut archive, "index.json", 0o644, &index)?;
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]);
        file(&mut archive, &name, 0o644, blob)?;
    }
    archive.into_inner()?.sync_all()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Unpacks the busybox image archive ([`build_busybox_image`]) as an OCI
/// image layout directory.
pub fn busybox_layout(dir: &Path) -> std::io::Result<()> {
    let archive = dir.with_extension("tar");
    build_busybox_image(&archive)?;
    tar::Archive::new(fs::File::open(&archive)?).unpack(dir)?;
    fs::remove_file(archive)
}

/// The image of an OCI layout directory (its first manifest), to change
/// before pushing: add layers, edit the config or the manifest itself.
pub struct LayoutImage {
    dir: PathBuf,
    pub manifest: serde_json::Value,
    pub config: serde_json::Value,
}

impl LayoutImage {
    fn read(dir: &Path, digest: &str) -> std::io::Result<Vec<u8>> {
        fs::read(
            dir.join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
    }

    pub fn open(dir: &Path) -> std::io::Result<LayoutImage> {
        let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
        let digest = index["manifests"][0]["digest"].as_str().unwrap_or_default();
        let manifest: serde_json::Value = serde_json::from_slice(&Self::read(dir, digest)?)?;
        let config_digest = manifest["config"]["digest"].as_str().unwrap_or_default();
        let config = serde_json::from_slice(&Self::read(dir, config_digest)?)?;
        Ok(LayoutImage {
            dir: dir.to_path_buf(),
            manifest,
            config,
        })
    }

    /// Stores `data` as a blob; returns its digest.
    pub fn write_blob(&self, data: &[u8]) -> std::io::Result<String> {
        let hex = hex::encode(Sha256::digest(data));
        fs::write(self.dir.join("blobs/sha256").join(&hex), data)?;
        Ok(format!("sha256:{hex}"))
    }

    /// Appends an uncompressed tar layer.
    pub fn append_layer(&mut self, tar: &[u8]) -> std::io::Result<()> {
        let digest = self.write_blob(tar)?;
        if let Some(layers) = self.manifest["layers"].as_array_mut() {
            layers.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest, "size": tar.len()}));
        }
        if let Some(diff_ids) = self.config["rootfs"]["diff_ids"].as_array_mut() {
            diff_ids.push(serde_json::json!(digest));
        }
        Ok(())
    }

    /// Writes config and manifest and points the index at the manifest.
    pub fn save(mut self) -> std::io::Result<()> {
        let config = serde_json::to_vec(&self.config)?;
        self.manifest["config"]["digest"] = serde_json::json!(self.write_blob(&config)?);
        self.manifest["config"]["size"] = serde_json::json!(config.len());
        let manifest = serde_json::to_vec(&self.manifest)?;
        let digest = self.write_blob(&manifest)?;
        let path = self.dir.join("index.json");
        let mut index: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
        index["manifests"][0]["digest"] = serde_json::json!(digest);
        index["manifests"][0]["size"] = serde_json::json!(manifest.len());
        fs::write(path, serde_json::to_vec(&index)?)
    }
}

/// An uncompressed tar of `files` (path, mode, contents) with their parent
/// directories, fixed times and root ownership. Paths are written into the
/// header as given (`../x` included: for malicious layers).
pub fn tar_of(files: &[(&str, u32, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = BTreeSet::new();
    for (path, _, _) in files {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty() && !p.ends_with("..")) {
            dirs.insert(p.to_path_buf());
            parent = p.parent();
        }
    }
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, &d, std::io::empty())?;
    }
    for (path, mode, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        // Straight into the header: `append_data` refuses `..`.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data)?;
    }
    b.into_inner()
}

/// A private OCI registry (Debian's `docker-registry`) on loopback, with its
/// storage in a temporary directory; killed on drop.
pub struct Registry {
    dir: tempfile::TempDir,
    child: Child,
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// `user:password` when the registry wants them.
    credentials: Option<String>,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// With `credentials`, the registry wants HTTP basic auth (htpasswd,
    /// bcrypt) for every request, pushes included.
    pub fn start_with(credentials: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("kabuto-registry-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let host = format!("127.0.0.1:{port}");
        let auth = match credentials {
            None => String::new(),
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                let path = dir.path().join("htpasswd");
                fs::write(&path, format!("{user}:{hash}\n")).expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: kabuto-test\n    path: {}\n",
                    path.display()
                )
            }
        };
        fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {host}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let log = fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting docker-registry (apt-get install docker-registry)");
        let r = Registry {
            dir,
            child,
            host,
            credentials: credentials.map(|(u, p)| format!("{u}:{p}")),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&r.host).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not come up");
            thread::sleep(Duration::from_millis(100));
        }
        r
    }

    /// Copies `tag` of the OCI layout `layout` to `<host>/<repository>:<tag>`
    /// with skopeo; returns the pushed reference.
    pub fn push_layout(&self, layout: &Path, tag: &str, repository: &str) -> String {
        let reference = format!("{}/{repository}:{tag}", self.host);
        let source = format!("oci:{}:{tag}", layout.display());
        let target = format!("docker://{reference}");
        let mut args = vec!["copy", "--quiet", "--dest-tls-verify=false"];
        if let Some(credentials) = &self.credentials {
            args.extend(["--dest-creds", credentials.as_str()]);
        }
        args.extend([source.as_str(), target.as_str()]);
        run_tool("skopeo", &args);
        reference
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The registry's storage directory.
    pub fn storage(&self) -> &Path {
        self.dir.path()
    }

    /// Where the registry keeps the blob `sha256:<hex>` (to corrupt it).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A read-only HTTP server for the files under a directory (a lookaside
/// signature store, say) on loopback; a thread per connection, GET only.
pub struct FileServer {
    pub port: u16,
}

impl FileServer {
    pub fn start(root: &Path) -> FileServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let root = root.to_path_buf();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let root = root.clone();
                thread::spawn(move || Self::serve(stream, &root));
            }
        });
        FileServer { port }
    }

    fn serve(mut stream: std::net::TcpStream, root: &Path) {
        use std::io::{BufRead, BufReader};
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut request = String::new();
        if reader.read_line(&mut request).is_err() {
            return;
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => break,
                Ok(_) if header.trim().is_empty() => break,
                Ok(_) => {}
            }
        }
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        let mut decoded = Vec::new();
        let bytes = path.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(b) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                    decoded.push(b);
                    i += 3;
                    continue;
                }
            }
            decoded.push(bytes[i]);
            i += 1;
        }
        let relative = String::from_utf8_lossy(&decoded)
            .trim_start_matches('/')
            .to_string();
        let body = (!relative.split('/').any(|c| c == ".."))
            .then(|| fs::read(root.join(&relative)).ok())
            .flatten();
        let _ = match body {
            Some(body) => stream
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                )
                .and_then(|_| stream.write_all(&body)),
            None => stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
        };
    }
}

/// `skopeo copy` of `tag` of the OCI layout `layout` to `target` (a
/// registry reference reached over plain HTTP).
pub fn skopeo_push(layout: &Path, tag: &str, target: &str) {
    run_tool(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{target}"),
        ],
    );
}

/// Runs `program args`; panics with its stderr unless it succeeds.
pub fn run_tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} (scripts/setup.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `<dir>/<name>.pem` (private) and `<dir>/<name>.pub` made by openssl:
/// RSA 2048 as `openssl genrsa` writes it, or P-256 (SEC1) when `ec`.
pub fn openssl_key_pair(dir: &Path, name: &str, ec: bool) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub"));
    let (p, q) = (private.to_string_lossy(), public.to_string_lossy());
    if ec {
        run_tool(
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &p,
            ],
        );
        run_tool("openssl", &["ec", "-in", &p, "-pubout", "-out", &q]);
    } else {
        run_tool("openssl", &["genrsa", "-out", &p, "2048"]);
        run_tool("openssl", &["rsa", "-in", &p, "-pubout", "-out", &q]);
    }
    (private, public)
}

/// `skopeo copy` of `src:latest` to `dst:latest` (OCI layouts), encrypted
/// to each public key (ocicrypt's JWE recipients).
pub fn skopeo_encrypt(src: &Path, dst: &Path, recipients: &[&Path]) {
    let keys: Vec<String> = recipients
        .iter()
        .map(|k| format!("jwe:{}", k.display()))
        .collect();
    let mut args = vec!["copy", "--quiet"];
    for k in &keys {
        args.extend(["--encryption-key", k.as_str()]);
    }
    let (s, d) = (
        format!("oci:{}:latest", src.display()),
        format!("oci:{}:latest", dst.display()),
    );
    args.extend([s.as_str(), d.as_str()]);
    run_tool("skopeo", &args);
}

/// The busybox image plus one layer, with `config` fields set.
pub fn image_with(
    dir: &Path,
    name: &str,
    files: &[(&str, u32, &[u8])],
    config: serde_json::Value,
) -> PathBuf {
    let layout = dir.join(name);
    busybox_layout(&layout).expect("layout");
    let mut image = LayoutImage::open(&layout).expect("open layout");
    image
        .append_layer(&tar_of(files).expect("tar"))
        .expect("layer");
    if let Some(fields) = config.as_object() {
        for (k, v) in fields {
            image.config["config"][k] = v.clone();
        }
    }
    image.save().expect("save layout");
    layout
}

/// Every regular file under `dirs` that contains `needle`.
pub fn files_containing(dirs: &[&Path], needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                stack.push(entry.path());
            }
        } else if meta.is_file() {
            if let Ok(data) = std::fs::read(&path) {
                if data.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    found
}
