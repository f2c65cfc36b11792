//! Copies a process's stdio between containerd's FIFOs on the host and the
//! agent's streams in the guest.

use std::{
    fs::OpenOptions,
    io::{Read, Write},
    path::PathBuf,
    sync::mpsc,
    thread::{self, JoinHandle},
    time::Duration,
};

use kabuto_runtime::agent_client::AgentClient;

/// The FIFO paths containerd gave for one process.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The output copiers of one process; joined before its exit is reported,
/// so a client never misses the last lines.
pub struct OutputCopiers {
    handles: Vec<JoinHandle<()>>,
}

impl OutputCopiers {
    /// Waits for the copiers to drain, at most `limit`: a process's child
    /// may keep the stream open after the process itself exited.
    pub fn join(self, limit: Duration) {
        let (tx, rx) = mpsc::channel();
        let handles = self.handles;
        let _ = thread::Builder::new()
            .name("io-join".into())
            .spawn(move || {
                for h in handles {
                    let _ = h.join();
                }
                let _ = tx.send(());
            });
        if rx.recv_timeout(limit).is_err() {
            log::warn!("output still open {limit:?} after the process exited; not waiting longer");
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match thread::Builder::new().name(name.clone()).spawn(f) {
        Ok(h) => Some(h),
        Err(e) => {
            log::error!("cannot start {name}: {e}");
            None
        }
    }
}

/// Starts copying; stdin runs detached (it ends at EOF from the client).
pub fn start(
    agent: &AgentClient,
    container_id: &str,
    exec_id: &str,
    paths: &StdioPaths,
) -> OutputCopiers {
    let mut handles = Vec::new();
    let outputs = [(false, paths.stdout.clone()), (true, paths.stderr.clone())];
    for (is_stderr, path) in outputs {
        if path.is_empty() || (is_stderr && paths.terminal) {
            continue;
        }
        let agent = agent.clone();
        let (cid, eid) = (container_id.to_string(), exec_id.to_string());
        let name = format!("{}-{cid}", if is_stderr { "stderr" } else { "stdout" });
        if let Some(h) = spawn(name, move || {
            copy_output(&agent, &cid, &eid, is_stderr, path.into())
        }) {
            handles.push(h);
        }
    }
    if !paths.stdin.is_empty() {
        let agent = agent.clone();
        let (cid, eid) = (container_id.to_string(), exec_id.to_string());
        let path = PathBuf::from(&paths.stdin);
        let _ = spawn(format!("stdin-{cid}"), move || {
            copy_input(&agent, &cid, &eid, path)
        });
    }
    OutputCopiers { handles }
}

fn copy_output(agent: &AgentClient, cid: &str, eid: &str, stderr: bool, path: PathBuf) {
    // Opening a FIFO for writing blocks until containerd's reader is there.
    let mut fifo = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!("opening {}: {e}; discarding the output", path.display());
            None
        }
    };
    loop {
        match agent.read_stream(cid, eid, stderr) {
            Ok(data) if data.is_empty() => break,
            Ok(data) => {
                if let Some(f) = fifo.as_mut() {
                    if let Err(e) = f.write_all(&data) {
                        // The reader went away; keep draining so the
                        // process never blocks on a full pipe.
                        log::debug!("writing {}: {e}", path.display());
                        fifo = None;
                    }
                }
            }
            Err(e) => {
                if !e.is_not_found() {
                    log::debug!("reading output of {cid}/{eid}: {e}");
                }
                break;
            }
        }
    }
}

fn copy_input(agent: &AgentClient, cid: &str, eid: &str, path: PathBuf) {
    let mut fifo = match OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("opening {}: {e}", path.display());
            return;
        }
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match fifo.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = agent.write_stdin(cid, eid, &buf[..n]) {
                    log::debug!("stdin of {cid}/{eid}: {e}");
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("reading {}: {e}", path.display());
                break;
            }
        }
    }
    if let Err(e) = agent.close_stdin(cid, eid) {
        log::debug!("closing stdin of {cid}/{eid}: {e}");
    }
}
