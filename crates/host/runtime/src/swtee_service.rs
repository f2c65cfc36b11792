//! The software TEE's "firmware" for one pod: answers the guest's report
//! requests on vsock port [`kabuto_protocol::SWTEE_VSOCK_PORT`] with reports
//! carrying the launch data fixed before boot. Insecure by construction
//! (see `kabuto-swtee`); only for hosts without TEE hardware, and only in a
//! build with the `software-tee` feature: without it this module holds no
//! signer and [`FirmwareService::start`] refuses.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
#[cfg(feature = "software-tee")]
use std::{io::ErrorKind, os::unix::net::UnixListener, time::Duration};

#[cfg(feature = "software-tee")]
use kabuto_swtee::Firmware;
use kabuto_swtee::LaunchData;

/// A guest that stalls mid-request does not block the next one for longer.
#[cfg(feature = "software-tee")]
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the software TEE's firmware service could not start.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("{}", crate::config::SOFTWARE_TEE_NOT_BUILT)]
    NotBuilt,
    #[error(
        "the software TEE's keys (create the software TEE with `kabuto install`, or set \
         confidential.software_tee_dir)"
    )]
    Keys(#[source] kabuto_swtee::SwteeError),
    #[error("listening on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the firmware thread")]
    Thread(#[source] std::io::Error),
}

pub struct FirmwareService {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FirmwareService {
    /// Serves on `socket`: the Unix socket a vhost-user vsock device
    /// connects to for guest connections to the host's port
    /// (`<uds-path>_<port>`).
    #[cfg(not(feature = "software-tee"))]
    pub fn start(
        _key_dir: &Path,
        _socket: PathBuf,
        _launch: LaunchData,
    ) -> Result<Self, FirmwareError> {
        Err(FirmwareError::NotBuilt)
    }

    #[cfg(feature = "software-tee")]
    pub fn start(
        key_dir: &Path,
        socket: PathBuf,
        launch: LaunchData,
    ) -> Result<Self, FirmwareError> {
        let firmware = Firmware::load(key_dir).map_err(FirmwareError::Keys)?;
        let listener = UnixListener::bind(&socket).map_err(|source| FirmwareError::Listen {
            path: socket.clone(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("swtee-firmware".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut stream = match stream {
                        Ok(s) => s,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::warn!("software TEE firmware: accept: {e}");
                            return;
                        }
                    };
                    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
                    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
                    match firmware.serve_one(&launch, &mut stream) {
                        Ok(()) => log::info!("software TEE: issued a report"),
                        Err(e) => log::warn!("software TEE firmware: {e}"),
                    }
                }
            })
            .map_err(FirmwareError::Thread)?;
        Ok(FirmwareService {
            socket,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FirmwareService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
