//! Containers in the guest, run with libcontainer (youki).
//!
//! Each container gets a bundle under [`BUNDLES_DIR`] holding the spec the
//! agent actually applies, its state under [`CONTAINER_STATE_DIR`] and a
//! cgroup at `/sys/fs/cgroup/kabuto/<id>`.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use libcontainer::{
    container::{builder::ContainerBuilder, Container as YoukiContainer},
    syscall::syscall::SyscallType,
};
use nix::{sys::signal::Signal, unistd::Pid};
use oci_spec::runtime::{LinuxNamespaceType, Process as OciProcess, Spec};

use crate::{
    error::{AgentError, Result},
    init::{BUNDLES_DIR, CONTAINER_STATE_DIR},
    process::{PendingStdio, Process},
    reaper::Reaper,
};

/// Parent cgroup (relative to the cgroup2 root) of all containers.
pub const CGROUP_PARENT: &str = "kabuto";

/// Namespaces a pod's containers share with its sandbox container.
const POD_SHARED_NAMESPACES: [LinuxNamespaceType; 3] = [
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
];

pub struct Container {
    pub id: String,
    pub sandbox_id: String,
    pub bundle: PathBuf,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    pub started: Mutex<bool>,
    /// A pod sandbox's network, IPC and UTS namespaces, held open from its
    /// creation: members join these, not `/proc/<pid>/ns` of a pid that the
    /// host could have the sandbox's init give up and another process take.
    pub pod_namespaces: Option<PodNamespaces>,
}

/// Open namespace files of a pod sandbox, in [`POD_SHARED_NAMESPACES`] order.
pub struct PodNamespaces(Vec<(LinuxNamespaceType, std::fs::File)>);

impl PodNamespaces {
    fn open(pid: i32) -> Result<PodNamespaces> {
        let mut files = Vec::new();
        for typ in POD_SHARED_NAMESPACES {
            let path = format!("/proc/{pid}/ns/{}", namespace_file(typ));
            let file =
                std::fs::File::open(&path).map_err(AgentError::io(format!("opening {path}")))?;
            files.push((typ, file));
        }
        Ok(PodNamespaces(files))
    }

    /// The sandbox's network namespace, a handle of its own (a NIC that
    /// comes after the pod's first create is moved there).
    pub fn network(&self) -> std::io::Result<std::fs::File> {
        self.0
            .iter()
            .find(|(t, _)| *t == LinuxNamespaceType::Network)
            .ok_or_else(|| std::io::Error::other("the sandbox holds no network namespace"))?
            .1
            .try_clone()
    }

    /// A path to the open namespace of `typ` that stays valid while this
    /// agent holds it.
    fn path(&self, typ: LinuxNamespaceType) -> Option<PathBuf> {
        use std::os::fd::AsRawFd as _;
        self.0.iter().find(|(t, _)| *t == typ).map(|(_, f)| {
            PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()))
        })
    }
}

fn namespace_file(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Ipc => "ipc",
        _ => "uts",
    }
}

impl Container {
    pub fn cgroup_dir(&self) -> PathBuf {
        cgroup_dir(&self.id)
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() || exec_id == self.id {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::ProcessNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_string(),
            })
    }
}

pub fn cgroup_dir(id: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(CGROUP_PARENT).join(id)
}

/// Checks a container id before it is used in paths.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "invalid container or exec id {id:?}: use letters, digits, '-', '_' and '.'"
        )))
    }
}

/// The spec the host sent, parsed.
pub fn parse_spec(raw: &[u8]) -> Result<Spec> {
    serde_json::from_slice(raw)
        .map_err(|e| AgentError::InvalidArgument(format!("OCI spec is not valid: {e}")))
}

/// Turns the spec the host sent into the one the agent applies.
///
/// `sandbox` holds the namespaces of the pod's sandbox container, which
/// the other containers of the pod join. `pod_netns` is the pod's network
/// namespace (the host gave it interfaces): every container that asks for
/// a network namespace joins it.
pub fn prepare_spec(
    mut spec: Spec,
    id: &str,
    sandbox: Option<&PodNamespaces>,
    pod_netns: Option<&Path>,
) -> Result<Spec> {
    if spec.process().is_none() {
        return Err(AgentError::InvalidArgument(
            "OCI spec has no process".into(),
        ));
    }
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| AgentError::InvalidArgument("OCI spec has no root".into()))?;
    if !root.path().is_absolute() {
        return Err(AgentError::InvalidArgument(format!(
            "root.path {} must be an absolute guest path",
            root.path().display()
        )));
    }
    if !root.path().join(".").is_dir() {
        return Err(AgentError::InvalidArgument(format!(
            "container rootfs {} does not exist in the guest",
            root.path().display()
        )));
    }
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(Some(PathBuf::from(format!("/{CGROUP_PARENT}/{id}"))));
        // The guest is always cgroup v2: give every container its own cgroup
        // namespace, as runtimes do on v2 hosts, so /sys/fs/cgroup shows the
        // container's own cgroup (whatever the host's cgroup mode was).
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        if !namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Cgroup)
        {
            let mut cgroup_ns = oci_spec::runtime::LinuxNamespace::default();
            cgroup_ns.set_typ(LinuxNamespaceType::Cgroup);
            namespaces.push(cgroup_ns);
            linux.set_namespaces(Some(namespaces));
        }
        if let Some(namespaces) = linux.namespaces_mut() {
            for ns in namespaces.iter_mut() {
                // Host namespace paths mean nothing in the guest.
                let path = match (ns.typ(), pod_netns) {
                    (LinuxNamespaceType::Network, Some(pod)) => Some(pod.to_path_buf()),
                    (typ, _) => sandbox.and_then(|pod| pod.path(typ)),
                };
                ns.set_path(path);
            }
        }
    }
    Ok(spec)
}

pub struct Runtime {
    reaper: Reaper,
}

impl Runtime {
    pub fn new(reaper: Reaper) -> Self {
        Runtime { reaper }
    }

    pub fn reaper(&self) -> &Reaper {
        &self.reaper
    }

    /// Creates the container (its init process waits for start).
    pub fn create(&self, id: &str, sandbox_id: &str, spec: &Spec) -> Result<Container> {
        let bundle = Path::new(BUNDLES_DIR).join(id);
        fs::create_dir_all(&bundle)
            .map_err(AgentError::io(format!("mkdir {}", bundle.display())))?;
        let result = self.create_in(id, sandbox_id, spec, &bundle);
        if result.is_err() {
            self.cleanup(id, &bundle);
        }
        result
    }

    fn create_in(
        &self,
        id: &str,
        sandbox_id: &str,
        spec: &Spec,
        bundle: &Path,
    ) -> Result<Container> {
        spec.save(bundle.join("config.json"))
            .map_err(|e| AgentError::InvalidArgument(format!("writing config.json: {e}")))?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let mut stdio = PendingStdio::new(terminal, &bundle.join("console.sock"))?;
        let guard = self.reaper.spawn_guard();
        let container = container_builder(id, &mut stdio)?
            .validate_id()
            .map_err(AgentError::container("validating the container id"))?
            .as_init(bundle)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(AgentError::container(format!("creating container {id}")))?;
        let pid = container
            .pid()
            .ok_or_else(|| AgentError::InvalidArgument("libcontainer returned no pid".into()))?
            .as_raw();
        drop(guard);
        let stdio = stdio.finish()?;
        // A pod's sandbox (its own, or a stand-alone container): hold its
        // namespaces for the members.
        let pod_namespaces = if sandbox_id.is_empty() || sandbox_id == id {
            Some(PodNamespaces::open(pid)?)
        } else {
            None
        };
        Ok(Container {
            id: id.to_string(),
            sandbox_id: sandbox_id.to_string(),
            bundle: bundle.to_path_buf(),
            init: Arc::new(Process::new(pid, stdio)),
            execs: Mutex::new(HashMap::new()),
            started: Mutex::new(false),
            pod_namespaces,
        })
    }

    fn load(&self, id: &str) -> Result<YoukiContainer> {
        YoukiContainer::load(Path::new(CONTAINER_STATE_DIR).join(id))
            .map_err(AgentError::container(format!("loading container {id}")))
    }

    pub fn start(&self, container: &Container) -> Result<i32> {
        let mut started = container.started.lock().unwrap_or_else(|p| p.into_inner());
        if *started {
            return Err(AgentError::InvalidArgument(format!(
                "container {} is already started",
                container.id
            )));
        }
        self.load(&container.id)?
            .start()
            .map_err(AgentError::container(format!(
                "starting container {}",
                container.id
            )))?;
        *started = true;
        Ok(container.init.pid)
    }

    pub fn exec(&self, container: &Container, exec_id: &str, process: &[u8]) -> Result<i32> {
        validate_id(exec_id)?;
        let parsed: OciProcess = serde_json::from_slice(process)
            .map_err(|e| AgentError::InvalidArgument(format!("exec process is not valid: {e}")))?;
        let mut execs = container.execs.lock().unwrap_or_else(|p| p.into_inner());
        // Forget execs the host is done with, so their ids can be reused
        // and their descriptors are released.
        execs.retain(|_, p| {
            let keep = !p.finished();
            if !keep {
                self.reaper.forget(p.pid);
            }
            keep
        });
        if execs.contains_key(exec_id) {
            return Err(AgentError::InvalidArgument(format!(
                "exec id {exec_id} already exists in container {}",
                container.id
            )));
        }
        let spec_path = container.bundle.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&parsed)
            .map_err(|e| AgentError::InvalidArgument(format!("exec process: {e}")))?;
        fs::write(&spec_path, json).map_err(AgentError::io("writing the exec process"))?;
        let terminal = parsed.terminal().unwrap_or(false);
        let mut stdio = PendingStdio::new(
            terminal,
            &container.bundle.join(format!("exec-{exec_id}.sock")),
        )?;
        let guard = self.reaper.spawn_guard();
        let pid = container_builder(&container.id, &mut stdio)?
            .as_tenant()
            .with_detach(true)
            .with_process(Some(&spec_path))
            .build()
            .map_err(AgentError::container(format!(
                "executing {exec_id} in container {}",
                container.id
            )))?
            .as_raw();
        drop(guard);
        let _ = fs::remove_file(&spec_path);
        let stdio = stdio.finish()?;
        execs.insert(exec_id.to_string(), Arc::new(Process::new(pid, stdio)));
        Ok(pid)
    }

    pub fn signal(
        &self,
        container: &Container,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let sig = Signal::try_from(signal as i32)
            .map_err(|_| AgentError::InvalidArgument(format!("unknown signal {signal}")))?;
        if all {
            return self
                .load(&container.id)?
                .kill(sig, true)
                .map_err(AgentError::container(format!(
                    "signalling container {}",
                    container.id
                )));
        }
        let process = container.process(exec_id)?;
        if self.reaper.exit_of(process.pid).is_some() {
            return Err(AgentError::ProcessNotFound {
                container_id: container.id.clone(),
                exec_id: format!("{exec_id} (already exited)"),
            });
        }
        nix::sys::signal::kill(Pid::from_raw(process.pid), sig)
            .map_err(AgentError::sys(format!("kill {} {sig}", process.pid)))
    }

    /// Kills what is left of the container and removes every trace of it.
    pub fn remove(&self, container: &Container) -> Result<()> {
        let result = match self.load(&container.id) {
            Ok(mut c) => c.delete(true).map_err(AgentError::container(format!(
                "deleting container {}",
                container.id
            ))),
            Err(e) => Err(e),
        };
        self.cleanup(&container.id, &container.bundle);
        self.reaper.forget(container.init.pid);
        for p in container
            .execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            self.reaper.forget(p.pid);
        }
        result
    }

    fn cleanup(&self, id: &str, bundle: &Path) {
        // Only what a failed delete left: loading a deleted container makes
        // libcontainer log an error about its missing state file.
        let state_dir = Path::new(CONTAINER_STATE_DIR).join(id);
        if state_dir.exists() {
            if let Ok(mut c) = self.load(id) {
                let _ = c.delete(true);
            }
        }
        let _ = fs::remove_dir_all(bundle);
        let _ = fs::remove_dir_all(&state_dir);
        let _ = fs::remove_dir(cgroup_dir(id));
    }

    pub fn pids(&self, container: &Container) -> Result<Vec<u32>> {
        let path = container.cgroup_dir().join("cgroup.procs");
        let text = fs::read_to_string(&path)
            .map_err(AgentError::io(format!("reading {}", path.display())))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}

/// libcontainer's builder for container `id` in the agent's state
/// directory, with the process's stdio (a console socket or pipes).
fn container_builder(id: &str, stdio: &mut PendingStdio) -> Result<ContainerBuilder> {
    let mut builder = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(CONTAINER_STATE_DIR)
        .map_err(AgentError::container("setting the state directory"))?
        .with_console_socket(stdio.console_socket());
    if let Some(child) = stdio.take_child() {
        builder = builder
            .with_stdin(child.stdin)
            .with_stdout(child.stdout)
            .with_stderr(child.stderr);
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json(root: &str) -> Vec<u8> {
        let mut spec = Spec::default();
        spec.set_root(Some(
            oci_spec::runtime::RootBuilder::default()
                .path(root)
                .build()
                .expect("root"),
        ));
        serde_json::to_vec(&spec).expect("json")
    }

    #[test]
    fn rejects_ids_that_escape_paths() {
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        validate_id("abc-1_2.3").expect("valid id refused");
    }

    #[test]
    fn rejects_relative_or_missing_rootfs() {
        let err = parse_spec(&spec_json("rootfs"))
            .and_then(|s| prepare_spec(s, "c", None, None))
            .expect_err("relative root");
        assert!(err.to_string().contains("absolute"), "{err}");
        let err = parse_spec(&spec_json("/does/not/exist"))
            .and_then(|s| prepare_spec(s, "c", None, None))
            .expect_err("missing");
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = parse_spec(b"{not json").expect_err("bad json");
        assert!(err.to_string().contains("OCI spec is not valid"), "{err}");
    }

    #[test]
    fn pod_containers_join_the_sandbox_namespaces_held_open() {
        // This test process's own namespaces stand in for a sandbox's.
        let pod = PodNamespaces::open(std::process::id() as i32).expect("namespaces");
        let dir = std::env::temp_dir();
        let spec = parse_spec(&spec_json(&dir.to_string_lossy()))
            .and_then(|s| prepare_spec(s, "c1", Some(&pod), None))
            .expect("spec");
        let linux = spec.linux().as_ref().expect("linux");
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/kabuto/c1"))
        );
        let namespaces = linux.namespaces().as_ref().expect("namespaces");
        assert!(namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Cgroup));
        for ns in namespaces {
            let shared = POD_SHARED_NAMESPACES.contains(&ns.typ());
            match ns.path() {
                Some(path) => {
                    assert!(shared, "{:?} joined", ns.typ());
                    // The held file, through this process's fd table: the
                    // same namespace as /proc/<pid>/ns/<name>.
                    assert!(path.starts_with(format!("/proc/{}/fd/", std::process::id())));
                    let held = std::fs::metadata(path).expect("held namespace");
                    let own =
                        std::fs::metadata(format!("/proc/self/ns/{}", namespace_file(ns.typ())))
                            .expect("own namespace");
                    use std::os::unix::fs::MetadataExt as _;
                    assert_eq!(held.ino(), own.ino(), "{:?}", ns.typ());
                }
                None => assert!(!shared, "{:?} not joined", ns.typ()),
            }
        }
    }

    #[test]
    fn a_pod_with_the_hosts_interfaces_joins_its_network_namespace() {
        let dir = std::env::temp_dir();
        let pod_netns = Path::new("/proc/1/fd/7");
        let spec = parse_spec(&spec_json(&dir.to_string_lossy()))
            .and_then(|s| prepare_spec(s, "c1", None, Some(pod_netns)))
            .expect("spec");
        let linux = spec.linux().clone().expect("linux");
        let namespaces = linux.namespaces().clone().expect("namespaces");
        let network = namespaces
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
            .expect("a network namespace");
        assert_eq!(network.path().as_deref(), Some(pod_netns));
        for other in namespaces
            .iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
        {
            assert_eq!(other.path(), &None, "{:?} joined", other.typ());
        }
    }
}
