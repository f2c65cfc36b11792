//! The helper daemons a sandbox runs beside QEMU — two virtiofsd and, on
//! hosts without /dev/vhost-vsock, the vhost-user vsock device — each owning
//! its process, the socket QEMU connects to and its log.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::error::BootError;
use crate::config::SharedFsConfig;

/// Helper daemons get this long to create their sockets.
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// One helper daemon of a sandbox.
pub(super) struct Helper {
    /// What it is, for logs (`virtiofsd`, `vhost-user vsock device`).
    pub(super) name: &'static str,
    pub(super) child: Child,
    /// The socket QEMU connects to, which it creates when ready.
    socket: PathBuf,
    log: PathBuf,
}

impl Helper {
    pub(super) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        socket: PathBuf,
        log: PathBuf,
    ) -> Result<Helper, BootError> {
        let out = fs::File::create(&log).map_err(BootError::io(&log))?;
        let err = out.try_clone().map_err(BootError::io(&log))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| BootError::Spawn {
                helper: name,
                program: program.to_path_buf(),
                source,
            })?;
        Ok(Helper {
            name,
            child,
            socket,
            log,
        })
    }

    /// A virtiofsd exporting `source` at `socket` with `cache`.
    pub(super) fn virtiofsd(
        config: &SharedFsConfig,
        socket: &Path,
        source: &Path,
        cache: crate::config::CacheMode,
        log: PathBuf,
    ) -> Result<Helper, BootError> {
        Helper::spawn(
            "virtiofsd",
            &config.virtiofsd_path,
            &[
                format!("--socket-path={}", socket.display()),
                "-o".into(),
                format!("source={}", source.display()),
                "-o".into(),
                format!("cache={cache}"),
                "-o".into(),
                "announce_submounts".into(),
            ],
            socket.to_path_buf(),
            log,
        )
    }

    /// The vhost-user vsock device (guest CID 3) at `socket`, forwarding
    /// guest ports to `<uds>_<port>` on the host.
    pub(super) fn vhost_user_vsock(
        program: &Path,
        socket: &Path,
        uds: &Path,
        log: PathBuf,
    ) -> Result<Helper, BootError> {
        Helper::spawn(
            "vhost-user vsock device",
            &find_program(program),
            &[
                "--guest-cid".into(),
                "3".into(),
                "--socket".into(),
                socket.display().to_string(),
                "--uds-path".into(),
                uds.display().to_string(),
            ],
            socket.to_path_buf(),
            log,
        )
    }

    /// Waits until the helper's socket exists; fails (with the end of its
    /// log) if it exits first or takes too long.
    pub(super) fn wait_ready(&mut self) -> Result<(), BootError> {
        let deadline = Instant::now() + HELPER_START_TIMEOUT;
        while !self.socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BootError::HelperExited {
                    helper: self.name,
                    status,
                    log: tail(&self.log, 2000),
                });
            }
            if Instant::now() > deadline {
                return Err(BootError::HelperTimeout {
                    helper: self.name,
                    socket: self.socket.clone(),
                    timeout: HELPER_START_TIMEOUT,
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

/// Kills and reaps `helpers`.
pub(super) fn stop_helpers(helpers: &mut Vec<Helper>) {
    for helper in helpers.iter_mut() {
        let _ = helper.child.kill();
        let _ = helper.child.wait();
    }
    helpers.clear();
}

/// Records the helpers' pids, for the cleanup of a crashed shim's sandbox.
pub(super) fn write_pids(dir: &Path, helpers: &[Helper]) {
    let pids: Vec<String> = helpers.iter().map(|h| h.child.id().to_string()).collect();
    let _ = fs::write(dir.join("helpers.pid"), pids.join("\n"));
}

/// The last `bytes` of a log file.
pub(super) fn tail(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s.trim().to_string()
}

/// `program` as given when it has a directory, else found on PATH (or in
/// the places `cargo install` and local installs put programs).
fn find_program(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_path_buf();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([
            PathBuf::from("/usr/local/bin"),
            PathBuf::from("/root/.cargo/bin"),
        ])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_path_buf())
}
