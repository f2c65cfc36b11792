//! Reaps every child of PID 1 and records exit statuses by pid.
//!
//! libcontainer waits for its own helper processes while it creates a
//! container; reaping those behind its back would break it. So the reaper
//! only *peeks* at exits (`WNOWAIT`) until it can take the spawn lock, which
//! container creation holds for as long as libcontainer forks and waits.

use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nix::{
    errno::Errno,
    sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus},
    unistd::Pid,
};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal number when killed by a signal.
    pub status: i32,
    /// Unix time in nanoseconds when the exit was reaped.
    pub at_nanos: i64,
}

#[derive(Default)]
struct Inner {
    spawn: Mutex<()>,
    exits: Mutex<HashMap<i32, ExitInfo>>,
    exited: Condvar,
}

#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

impl Reaper {
    pub fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let worker = inner.clone();
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(&worker))
            .map(|_| ())
            .unwrap_or_else(|e| log::error!("cannot start the reaper thread: {e}"));
        Reaper { inner }
    }

    /// Held while libcontainer forks and waits for its helpers, and until
    /// the new process is registered, so that no exit is lost or stolen.
    pub fn spawn_guard(&self) -> MutexGuard<'_, ()> {
        self.inner
            .spawn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Blocks until `pid` has exited.
    pub fn wait(&self, pid: i32) -> ExitInfo {
        let mut exits = self.exits();
        loop {
            if let Some(info) = exits.get(&pid) {
                return *info;
            }
            exits = self
                .inner
                .exited
                .wait(exits)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    pub fn exit_of(&self, pid: i32) -> Option<ExitInfo> {
        self.exits().get(&pid).copied()
    }

    /// Drops the record of `pid` once nobody can ask for it any more.
    pub fn forget(&self, pid: i32) {
        self.exits().remove(&pid);
    }

    fn exits(&self) -> MutexGuard<'_, HashMap<i32, ExitInfo>> {
        self.inner
            .exits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

fn reap_forever(inner: &Inner) {
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => {}
            Err(Errno::ECHILD) => {
                // No children yet: nothing to wait for.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("waitid: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        let _spawn = inner
            .spawn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            let (pid, status) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, 128 + signal as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid: {e}");
                    break;
                }
            };
            log::debug!("reaped pid {pid} with status {status}");
            let mut exits = inner
                .exits
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            exits.insert(
                pid.as_raw(),
                ExitInfo {
                    status,
                    at_nanos: now_nanos(),
                },
            );
            inner.exited.notify_all();
        }
    }
}
