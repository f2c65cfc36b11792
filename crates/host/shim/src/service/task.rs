//! The shim v2 Task API: each call translated to the pod's state and the
//! agent, and the events containerd expects.

use std::sync::Arc;

use containerd_shim::{
    api,
    protos::{
        events::task::{TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskStart},
        protobuf::{well_known_types::any::Any, MessageField},
        topics,
        ttrpc::Code,
        types::task::ProcessInfo,
    },
    TtrpcContext, TtrpcResult,
};
use kabuto_protocol::agent::ExecProcessRequest;

use super::process::{lock, now, Process, Status};
use super::{agent_error, err, failed, metrics, Service, VM_GONE_STATUS};
use crate::io::{self, StdioPaths};

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self
            .do_create(&req)
            .inspect_err(|e| log::error!("create {}: {e}", req.id))?;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(containerd_shim::protos::events::task::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if lock(&p.state).status != Status::Created {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{}/{} was already started", req.id, req.exec_id),
            ));
        }
        let agent = c.sandbox.agent().clone();
        let pid = lock(&p.state).pid;
        // A process that cannot start is finished: release its waiters
        // (ctr waits before it starts), or they would hold the shim forever.
        let failed = |e: kabuto_runtime::agent_client::AgentClientError| {
            p.set_exited(VM_GONE_STATUS, now());
            agent_error(e)
        };
        if req.exec_id.is_empty() {
            // `ctr run --cni` gave the VMM's namespace its network just now.
            if let Err(e) = c.sandbox.join_late_network() {
                p.set_exited(VM_GONE_STATUS, now());
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("start {}: {}", req.id, kabuto_error::chain(&e)),
                ));
            }
            agent.start_container(&req.id).map_err(failed)?;
            lock(&p.state).status = Status::Running;
            let output = lock(&c.init_output).take();
            self.spawn_waiter(c.sandbox.clone(), p.clone(), output);
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            agent
                .exec_process(&ExecProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    process: p.exec_spec.clone(),
                    ..Default::default()
                })
                .map_err(failed)?;
            lock(&p.state).status = Status::Running;
            let output = io::start(&agent, &req.id, &req.exec_id, &p.stdio);
            self.spawn_waiter(c.sandbox.clone(), p.clone(), Some(output));
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (status, pid, exit_status, exited_at) = {
            let s = lock(&p.state);
            (
                s.status,
                s.pid,
                s.exit_status,
                s.exited_at.clone().unwrap_or_else(now),
            )
        };
        if status == Status::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "{}/{} is running; kill it before deleting",
                    req.id, req.exec_id
                ),
            ));
        }
        if !req.exec_id.is_empty() {
            lock(&c.execs).remove(&req.exec_id);
        } else {
            let others_in_pod = lock(&self.inner.state)
                .containers
                .values()
                .any(|o| o.id != c.id && Arc::ptr_eq(&o.sandbox, &c.sandbox))
                && c.owns_sandbox;
            if others_in_pod {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is its pod's sandbox; delete the pod's other containers first", c.id),
                ));
            }
            self.remove_container(&c);
            // Execs that never ran or outlived nothing: no Wait may hang.
            for e in lock(&c.execs).values() {
                e.set_exited(VM_GONE_STATUS, now());
            }
            lock(&self.inner.state).containers.remove(&req.id);
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status,
                    exited_at: MessageField::some(exited_at.clone()),
                    id: req.id.clone(),
                    ..Default::default()
                }),
            );
            if c.owns_sandbox {
                self.destroy_sandbox_if_idle();
            }
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let pids = c
            .sandbox
            .agent()
            .list_processes(&req.id)
            .map_err(agent_error)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if lock(&p.state).status == Status::Stopped {
            return Err(err(
                Code::NOT_FOUND,
                format!("{}/{}: process already finished", req.id, req.exec_id),
            ));
        }
        let created = lock(&p.state).status == Status::Created;
        if created && !req.exec_id.is_empty() {
            // An exec that was never started has no process in the guest:
            // a signal ends it before it runs (signal 0 only probes).
            if req.signal != 0 {
                self.report_exit(&p, 128 + req.signal, now());
            }
            return Ok(api::Empty::new());
        }
        c.sandbox
            .agent()
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .map_err(agent_error)?;
        if created {
            // The init of a created container exists in the guest and may
            // die of the signal before Start: its exit must be reported, or
            // the task stays "created" and containerd never deletes it (as
            // after `ctr run -d` failed in CNI setup and `ctr task kill`).
            let output = lock(&c.init_output).take();
            self.spawn_waiter(c.sandbox.clone(), p.clone(), output);
        }
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        if lock(&c.init.state).status != Status::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        let mut execs = lock(&c.execs);
        if execs.contains_key(&req.exec_id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("exec {} exists", req.exec_id),
            ));
        }
        let mut p = Process::new(
            &req.id,
            &req.exec_id,
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            c.sandbox.vm_pid(),
        );
        p.exec_spec = spec;
        execs.insert(req.exec_id.clone(), Arc::new(p));
        drop(execs);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.process(&req.exec_id)?;
        c.sandbox
            .agent()
            .tty_win_resize(&req.id, &req.exec_id, req.height, req.width)
            .map_err(agent_error)?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // The stdin copier closes the guest's stdin when the client closes
        // its end of the FIFO, which is what CloseIO announces.
        let c = self.container(&req.id)?;
        c.process(&req.exec_id)?;
        Ok(api::Empty::new())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let s = lock(&p.state);
        let status = match s.status {
            Status::Created => containerd_shim::protos::types::task::Status::CREATED,
            Status::Running => containerd_shim::protos::types::task::Status::RUNNING,
            Status::Stopped => containerd_shim::protos::types::task::Status::STOPPED,
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: s.pid,
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: s.exit_status,
            exited_at: MessageField::from_option(s.exited_at.clone()),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (exit_status, exited_at) = p.wait();
        Ok(api::WaitResponse {
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let c = self.container(&req.id)?;
        let s = c
            .sandbox
            .agent()
            .stats_container(&req.id)
            .map_err(agent_error)?;
        let any = containerd_shim::util::convert_to_any(Box::new(metrics::cgroup_metrics(&s)))
            .map_err(|e| failed(Code::INTERNAL, &e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let resources: &Any = req
            .resources
            .as_ref()
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "update without resources"))?;
        c.sandbox
            .agent()
            .update_container(&req.id, resources.value.clone())
            .map_err(agent_error)?;
        Ok(api::Empty::new())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .container(&req.id)
            .map(|c| c.sandbox.vm_pid())
            .unwrap_or_default();
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if !lock(&self.inner.state).containers.is_empty() {
            return Ok(api::Empty::new());
        }
        self.destroy_sandbox_if_idle();
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}
