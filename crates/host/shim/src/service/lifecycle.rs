//! Processes after they started: one waiter per process reporting its
//! exit, the VM watcher (OOM events, helpers, a VM that dies under its
//! processes), and teardown on SIGTERM or when the last container leaves.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use kabuto_runtime::sandbox::Sandbox;

use super::process::{lock, now, timestamp_from_nanos, Container, Process, Status};
use super::{Service, OUTPUT_DRAIN_LIMIT, VM_GONE_STATUS};
use crate::io::OutputCopiers;

impl Service {
    /// Forwards OOM events and notices a VM that dies under its processes.
    pub(super) fn watch_sandbox(&self, sandbox: &Arc<Sandbox>) {
        let agent = sandbox.agent().clone();
        let service = self.clone();
        let _ = thread::Builder::new().name("oom".into()).spawn(move || {
            while let Ok(id) = agent.get_oom_event() {
                service.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id: id,
                        ..Default::default()
                    }),
                );
            }
        });
        let service = self.clone();
        let weak = Arc::downgrade(sandbox);
        let _ = thread::Builder::new()
            .name("vm-watch".into())
            .spawn(move || loop {
                thread::sleep(Duration::from_millis(200));
                let Some(sb) = weak.upgrade() else { return };
                for ended in sb.reap_exited_helpers() {
                    log::warn!("sandbox {}: {ended}", sb.id);
                }
                if let Some(status) = sb.vm_exited() {
                    let owned = lock(&service.inner.state)
                        .sandbox
                        .as_ref()
                        .is_some_and(|s| Arc::ptr_eq(s, &sb));
                    if owned {
                        log::error!("sandbox {}: the VM exited unexpectedly ({status})", sb.id);
                        service.vm_gone(&sb);
                    }
                    sb.stop_helpers();
                    return;
                }
            });
    }

    /// Reports every process of a dead VM as exited.
    pub(super) fn vm_gone(&self, sb: &Arc<Sandbox>) {
        let containers: Vec<Arc<Container>> = lock(&self.inner.state)
            .containers
            .values()
            .filter(|c| Arc::ptr_eq(&c.sandbox, sb))
            .cloned()
            .collect();
        self.report_gone(&containers);
    }

    /// Reports every process of `containers` that still ran as exited
    /// (their VM is gone).
    pub(super) fn report_gone(&self, containers: &[Arc<Container>]) {
        for c in containers {
            let mut procs: Vec<Arc<Process>> = lock(&c.execs).values().cloned().collect();
            procs.push(c.init.clone());
            for p in procs {
                // report_exit skips processes already stopped.
                self.report_exit(&p, VM_GONE_STATUS, now());
            }
        }
    }

    pub(super) fn report_exit(&self, p: &Process, status: u32, at: Timestamp) {
        let pid = {
            let s = lock(&p.state);
            if s.status == Status::Stopped {
                return;
            }
            s.pid
        };
        p.set_exited(status, at.clone());
        let id = if p.exec_id.is_empty() {
            p.container_id.clone()
        } else {
            p.exec_id.clone()
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: p.container_id.clone(),
                id,
                pid,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        );
    }

    /// Waits in the guest for the process to exit, then reports it.
    pub(super) fn spawn_waiter(
        &self,
        sandbox: Arc<Sandbox>,
        p: Arc<Process>,
        output: Option<OutputCopiers>,
    ) {
        if p.waited.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let service = self.clone();
        let agent = sandbox.agent().clone();
        let waited = p.clone();
        let spawned = thread::Builder::new()
            .name(format!("wait-{}", p.container_id))
            .spawn(move || {
                let result = agent.wait_process(&p.container_id, &p.exec_id);
                if let Some(o) = output {
                    o.join(OUTPUT_DRAIN_LIMIT);
                }
                match result {
                    Ok(r) => service.report_exit(
                        &p,
                        r.status as u32,
                        timestamp_from_nanos(r.exited_at_nanos),
                    ),
                    Err(e) => {
                        // A lost agent connection usually means the VM died;
                        // give the VMM a moment to be seen as exited.
                        let mut vm_status = sandbox.vm_exited();
                        for _ in 0..20 {
                            if vm_status.is_some() {
                                break;
                            }
                            thread::sleep(Duration::from_millis(50));
                            vm_status = sandbox.vm_exited();
                        }
                        match vm_status {
                            Some(status) => log::error!(
                                "sandbox {}: the VM exited unexpectedly ({status}) under {}/{}",
                                sandbox.id,
                                p.container_id,
                                p.exec_id
                            ),
                            None => {
                                log::error!("waiting for {}/{}: {e}", p.container_id, p.exec_id)
                            }
                        }
                        service.report_exit(&p, VM_GONE_STATUS, now());
                    }
                }
            });
        if let Err(e) = spawned {
            // Without a waiter the exit would never be reported: let a
            // later Start or kill try again.
            log::error!(
                "waiting for {}/{}: {e}",
                waited.container_id,
                waited.exec_id
            );
            waited
                .waited
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub(super) fn remove_container(&self, c: &Container) {
        if c.sandbox.vm_exited().is_none() {
            if let Err(e) = c.sandbox.agent().remove_container(&c.id) {
                if !e.is_not_found() {
                    log::warn!("removing container {} in the guest: {e}", c.id);
                }
            }
        }
        c.sandbox.unshare_container(&c.id);
    }

    /// SIGTERM or SIGINT ends the shim with its sandbox: containerd-shim's
    /// own handler only logs them, which left shims (and their VMs) behind
    /// that only SIGKILL ended. Only the serving shim installs this.
    pub(super) fn handle_termination(&self) {
        let mut signals = match signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT]) {
            Ok(s) => s,
            Err(e) => {
                log::error!("shim: cannot handle SIGTERM: {e}");
                return;
            }
        };
        let service = self.clone();
        let _ = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    service.terminate(signal);
                }
            });
    }

    /// Tears everything down — the VM, its helpers, mounts and state — and
    /// ends the shim, reporting every process that still ran as exited.
    pub(super) fn terminate(&self, signal: i32) {
        log::warn!("shim: signal {signal}: tearing down the sandbox and exiting");
        // Waits for the creates under way: what they boot is torn down below.
        *self
            .inner
            .terminating
            .write()
            .unwrap_or_else(|p| p.into_inner()) = true;
        let (containers, sandbox) = {
            let mut state = lock(&self.inner.state);
            let containers: Vec<Arc<Container>> =
                state.containers.drain().map(|(_, c)| c).collect();
            (containers, state.sandbox.take())
        };
        self.report_gone(&containers);
        if let Some(sb) = sandbox {
            // Also unmounts every container's rootfs and binds (all of
            // them live under the sandbox directory).
            sb.destroy();
        }
        self.inner.exit.signal();
    }

    pub(super) fn destroy_sandbox_if_idle(&self) {
        let sandbox = {
            let mut state = lock(&self.inner.state);
            if !state.containers.is_empty() {
                return;
            }
            state.sandbox.take()
        };
        if let Some(sb) = sandbox {
            log::info!("sandbox {}: no containers left, destroying the VM", sb.id);
            sb.destroy();
        }
    }
}
