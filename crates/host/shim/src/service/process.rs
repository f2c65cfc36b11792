//! The shim's picture of the pod: its sandbox, each container and each
//! container's processes, with their lifecycle (created, running, stopped)
//! and the exit status Wait returns.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use kabuto_runtime::sandbox::Sandbox;

use super::err;
use crate::io::{OutputCopiers, StdioPaths};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Created,
    Running,
    Stopped,
}

pub(super) struct ProcState {
    pub(super) status: Status,
    pub(super) pid: u32,
    pub(super) exit_status: u32,
    pub(super) exited_at: Option<Timestamp>,
}

pub(super) struct Process {
    pub(super) container_id: String,
    /// Empty for the container's init process.
    pub(super) exec_id: String,
    pub(super) stdio: StdioPaths,
    /// The OCI process (JSON) of an exec.
    pub(super) exec_spec: Vec<u8>,
    pub(super) state: Mutex<ProcState>,
    exited: Condvar,
    /// Set once a waiter for this process runs (started by Start, or by a
    /// kill before Start): one waiter per process.
    pub(super) waited: std::sync::atomic::AtomicBool,
}

impl Process {
    pub(super) fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, pid: u32) -> Self {
        Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            exec_spec: Vec::new(),
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid,
                exit_status: 0,
                exited_at: None,
            }),
            exited: Condvar::new(),
            waited: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(super) fn set_exited(&self, status: u32, at: Timestamp) {
        let mut s = lock(&self.state);
        if s.status == Status::Stopped {
            return;
        }
        s.status = Status::Stopped;
        s.exit_status = status;
        s.exited_at = Some(at);
        self.exited.notify_all();
    }

    pub(super) fn wait(&self) -> (u32, Timestamp) {
        let mut s = lock(&self.state);
        while s.status != Status::Stopped {
            s = self.exited.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        (s.exit_status, s.exited_at.clone().unwrap_or_default())
    }
}

pub(super) struct Container {
    pub(super) id: String,
    pub(super) bundle: String,
    /// The pod sandbox this container runs in.
    pub(super) sandbox: Arc<Sandbox>,
    /// True for the container whose creation booted the VM.
    pub(super) owns_sandbox: bool,
    pub(super) init: Arc<Process>,
    pub(super) execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Output copiers of the init process, joined when it exits.
    pub(super) init_output: Mutex<Option<OutputCopiers>>,
}

impl Container {
    pub(super) fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            err(
                Code::NOT_FOUND,
                format!("exec {exec_id} of {} not found", self.id),
            )
        })
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) sandbox: Option<Arc<Sandbox>>,
    pub(super) containers: HashMap<String, Arc<Container>>,
}

pub(super) fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

pub(super) fn timestamp_from_nanos(nanos: i64) -> Timestamp {
    if nanos <= 0 {
        return now();
    }
    Timestamp {
        seconds: nanos / 1_000_000_000,
        nanos: (nanos % 1_000_000_000) as i32,
        ..Default::default()
    }
}
