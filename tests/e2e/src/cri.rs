//! Kubernetes' path into kabuto without a kubelet: a CRI v1 client on
//! containerd's socket (crictl is not packaged for Debian 12), and the
//! `kabuto-snapshotter` process CRI unpacks images with.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::paths;

/// `kabuto-snapshotter` with its own config; killed on drop. Made before
/// containerd (whose config names its socket), started after it (its
/// config names containerd's root; containerd dials it lazily).
pub struct Snapshotter {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Default for Snapshotter {
    fn default() -> Self {
        Snapshotter::new()
    }
}

impl Snapshotter {
    pub fn new() -> Snapshotter {
        let dir = tempfile::Builder::new()
            .prefix("kabuto-snapshotter-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Snapshotter { dir, child: None }
    }

    /// Serves [`Snapshotter::socket`]; reads manifests from the content
    /// store under `containerd_root`.
    pub fn start(&mut self, containerd_root: &Path, guest_pull_images: &[&str]) {
        let d = self.dir.path();
        fs::write(
            d.join("config.toml"),
            format!(
                "[snapshotter]\nroot = \"{d}/root\"\naddress = \"{d}/snapshotter.sock\"\n\
                 containerd_root = \"{}\"\nguest_pull_images = {:?}\n",
                containerd_root.display(),
                guest_pull_images,
                d = d.display()
            ),
        )
        .expect("snapshotter config");
        let log = fs::File::create(d.join("snapshotter.log")).expect("log");
        let child = Command::new(paths().bin_dir.join("kabuto-snapshotter"))
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("RUST_LOG", "info,kabuto_snapshotter=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting kabuto-snapshotter");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "kabuto-snapshotter did not come up:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `containerd` reaches the snapshotter. containerd dials its
    /// proxy plugins when it starts; started first (it needs containerd's
    /// root), the snapshotter was not there yet, and gRPC fails calls fast
    /// until its reconnect backoff (up to 3 s in containerd 1.6) next
    /// succeeds. Production starts kabuto-snapshotter before containerd.
    pub fn wait_until_reachable(&self, containerd: &crate::Containerd) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = containerd.ctr(&["snapshots", "--snapshotter", "kabuto", "ls"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd cannot reach kabuto-snapshotter: {}\n{}",
                crate::stderr(&out),
                self.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Where the snapshot directories are.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("snapshotter.sock")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("snapshotter.log")).unwrap_or_default()
    }

    /// Containerd config (for `Options::containerd_config`): CRI unpacks
    /// with this snapshotter, runs `kabuto` and `runc` handlers, passes the
    /// pod's init-data annotations, pulls from `registry` over plain HTTP
    /// and uses `sandbox_image` as the pause image. `restrict_oom_score_adj`:
    /// this machine denies negative OOM scores (runc pods would fail).
    pub fn cri_config(&self, registry: &str, sandbox_image: &str) -> String {
        format!(
            "  sandbox_image = \"{sandbox_image}\"\n\
             \x20 restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             \x20 snapshotter = \"kabuto\"\n\
             \x20 disable_snapshot_annotations = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kabuto]\n\
             \x20 runtime_type = \"{}\"\n\
             \x20 pod_annotations = [\"io.katacontainers.*\", \"io.kabuto.*\"]\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
             \x20 runtime_type = \"io.containerd.runc.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{registry}\"]\n\
             \x20 endpoint = [\"http://{registry}\"]\n\
             [proxy_plugins]\n\
             [proxy_plugins.kabuto]\n\
             \x20 type = \"snapshot\"\n\
             \x20 address = \"{}\"\n",
            crate::RUNTIME,
            self.socket().display()
        )
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CRI error as `Code: message`.
fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// A pod's Linux config: its network namespace `mode`, its sysctls.
fn linux_pod(mode: cri::NamespaceMode, sysctls: &[(&str, &str)]) -> cri::LinuxPodSandboxConfig {
    cri::LinuxPodSandboxConfig {
        sysctls: sysctls
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: mode as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A blocking CRI v1 client; errors are CRI's status as text.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: cri::runtime_service_client::RuntimeServiceClient<Channel>,
    images: cri::image_service_client::ImageServiceClient<Channel>,
    logs: tempfile::TempDir,
}

/// A pod as the client made it: CreateContainer repeats its config.
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
}

impl Cri {
    pub fn connect(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(
                Endpoint::from_static("http://[::]:0").connect_with_connector(tower::service_fn(
                    move |_: Uri| tokio::net::UnixStream::connect(path.clone()),
                )),
            )
            .expect("connecting to containerd's CRI");
        Cri {
            rt,
            runtime: cri::runtime_service_client::RuntimeServiceClient::new(channel.clone()),
            images: cri::image_service_client::ImageServiceClient::new(channel),
            logs: tempfile::tempdir().expect("log dir"),
        }
    }

    /// RunPodSandbox with the host's network (no CNI here), as kubelet
    /// sends it for a `hostNetwork: true` pod.
    pub fn run_pod(
        &mut self,
        name: &str,
        handler: &str,
        annotations: HashMap<String, String>,
    ) -> Result<Pod, String> {
        let (metadata, log_directory) = self.pod_metadata(name);
        let config = cri::PodSandboxConfig {
            metadata: Some(metadata),
            // No hostname: kubelet sets none for host-network pods (the
            // pod shares the node's UTS namespace).
            log_directory,
            annotations,
            linux: Some(linux_pod(cri::NamespaceMode::Node, &[])),
            ..Default::default()
        };
        self.run_pod_sandbox(config, handler)
    }

    /// RunPodSandbox in a network namespace of the pod's own, which the
    /// CRI plugin gives to CNI (as kubelet sends it for an ordinary pod),
    /// with `hostname`, `ports` (container port, host port; TCP), `dns`
    /// (servers, searches, options) and `sysctls` (namespaced ones, as
    /// kubelet passes a pod's).
    pub fn run_networked_pod(
        &mut self,
        name: &str,
        handler: &str,
        hostname: &str,
        ports: &[(i32, i32)],
        dns: cri::DnsConfig,
        sysctls: &[(&str, &str)],
    ) -> Result<Pod, String> {
        let (metadata, log_directory) = self.pod_metadata(name);
        let config = cri::PodSandboxConfig {
            metadata: Some(metadata),
            hostname: hostname.into(),
            log_directory,
            dns_config: Some(dns),
            port_mappings: ports
                .iter()
                .map(|(container_port, host_port)| cri::PortMapping {
                    protocol: cri::Protocol::Tcp as i32,
                    container_port: *container_port,
                    host_port: *host_port,
                    host_ip: String::new(),
                })
                .collect(),
            linux: Some(linux_pod(cri::NamespaceMode::Pod, sysctls)),
            ..Default::default()
        };
        self.run_pod_sandbox(config, handler)
    }

    /// The pod's addresses as CRI reports them (the first, then the others).
    pub fn pod_ips(&mut self, pod: &Pod) -> Result<Vec<String>, String> {
        let request = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        };
        let status = self
            .rt
            .block_on(self.runtime.pod_sandbox_status(request))
            .map_err(status)?
            .into_inner()
            .status
            .ok_or("no pod status")?;
        let network = status.network.ok_or("no pod network status")?;
        let mut ips = vec![network.ip];
        ips.extend(network.additional_ips.into_iter().map(|ip| ip.ip));
        Ok(ips)
    }

    /// ExecSync: the exit code and output of `cmd` in container `id`.
    pub fn exec_sync(&mut self, id: &str, cmd: &[&str]) -> Result<(i32, String), String> {
        let request = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        let reply = self
            .rt
            .block_on(self.runtime.exec_sync(request))
            .map_err(status)?
            .into_inner();
        let mut output = String::from_utf8_lossy(&reply.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&reply.stderr));
        Ok((reply.exit_code, output))
    }

    /// Pod `name`'s metadata (namespace `default`) and log directory.
    fn pod_metadata(&self, name: &str) -> (cri::PodSandboxMetadata, String) {
        let log_directory = self.logs.path().join(name);
        fs::create_dir_all(&log_directory).expect("pod log dir");
        let metadata = cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        };
        (metadata, log_directory.display().to_string())
    }

    fn run_pod_sandbox(
        &mut self,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<Pod, String> {
        let request = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let id = self
            .rt
            .block_on(self.runtime.run_pod_sandbox(request))
            .map_err(status)?
            .into_inner()
            .pod_sandbox_id;
        Ok(Pod { id, config })
    }

    /// PullImage; returns the image's reference (its config digest).
    pub fn pull(&mut self, image: &str, pod: &Pod) -> Result<String, String> {
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(pod.config.clone()),
        };
        Ok(self
            .rt
            .block_on(self.images.pull_image(request))
            .map_err(status)?
            .into_inner()
            .image_ref)
    }

    pub fn remove_image(&mut self, image: &str) -> Result<(), String> {
        let request = cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
        };
        self.rt
            .block_on(self.images.remove_image(request))
            .map_err(status)?;
        Ok(())
    }

    /// CreateContainer + StartContainer of `image` (as kubelet names it:
    /// the reference PullImage returned) in `pod`, logging to
    /// `<name>.log`. An empty `command` keeps the image's entrypoint.
    pub fn start_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let id = self
            .rt
            .block_on(self.runtime.create_container(request))
            .map_err(status)?
            .into_inner()
            .container_id;
        let start = cri::StartContainerRequest {
            container_id: id.clone(),
        };
        self.rt
            .block_on(self.runtime.start_container(start))
            .map_err(status)?;
        Ok(id)
    }

    /// The exit code once the container has exited (within `limit`).
    pub fn wait_exit(&mut self, id: &str, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let request = cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            };
            if let Ok(status) = self.rt.block_on(self.runtime.container_status(request)) {
                if let Some(s) = status.into_inner().status {
                    if s.state == cri::ContainerState::ContainerExited as i32 {
                        return Some(s.exit_code);
                    }
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        None
    }

    /// The messages of `name`'s log in `pod` (CRI log lines are
    /// `TIME STREAM TAG MESSAGE`).
    pub fn log(&self, pod: &Pod, name: &str) -> String {
        let path = Path::new(&pod.config.log_directory).join(format!("{name}.log"));
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .map(|m| format!("{m}\n"))
            .collect()
    }

    /// StopPodSandbox + RemovePodSandbox (its containers go with it).
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<(), String> {
        let stop = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        };
        self.rt
            .block_on(self.runtime.stop_pod_sandbox(stop))
            .map_err(status)?;
        let remove = cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        };
        self.rt
            .block_on(self.runtime.remove_pod_sandbox(remove))
            .map_err(status)?;
        Ok(())
    }
}
