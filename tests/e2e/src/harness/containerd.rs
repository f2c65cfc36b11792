//! A private containerd with kabuto installed as a runtime, and the residue it must not leave.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::*;

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
