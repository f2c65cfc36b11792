//! One process of a container as the agent sees it: its pid and the guest
//! end of its stdio (pipes, or a pty master when it has a terminal).

use std::{
    fs::File,
    io::{IoSliceMut, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::UnixListener,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use nix::{
    fcntl::OFlag,
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
};

use crate::error::{AgentError, Result};

/// The largest chunk one ReadStream call returns.
const MAX_READ: usize = 1 << 20;

/// The container side of a process's stdio, handed to libcontainer.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Stdio being prepared for a process that libcontainer is about to create.
pub enum PendingStdio {
    Pipes {
        stdin: File,
        stdout: File,
        stderr: File,
        child: Option<ChildStdio>,
    },
    /// libcontainer creates the pty inside the container and sends the
    /// master over this socket.
    Terminal {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl PendingStdio {
    pub fn new(terminal: bool, console_socket: &Path) -> Result<Self> {
        if terminal {
            let _ = std::fs::remove_file(console_socket);
            let listener = UnixListener::bind(console_socket).map_err(AgentError::io(format!(
                "binding {}",
                console_socket.display()
            )))?;
            return Ok(PendingStdio::Terminal {
                listener,
                path: console_socket.to_path_buf(),
            });
        }
        // Our ends are close-on-exec so no other container inherits them;
        // libcontainer dup2()s the child ends onto 0, 1 and 2.
        let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(AgentError::sys("pipe2"));
        let (stdin_r, stdin_w) = pipe()?;
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        Ok(PendingStdio::Pipes {
            stdin: File::from(stdin_w),
            stdout: File::from(stdout_r),
            stderr: File::from(stderr_r),
            child: Some(ChildStdio {
                stdin: stdin_r,
                stdout: stdout_w,
                stderr: stderr_w,
            }),
        })
    }

    pub fn console_socket(&self) -> Option<PathBuf> {
        match self {
            PendingStdio::Terminal { path, .. } => Some(path.clone()),
            PendingStdio::Pipes { .. } => None,
        }
    }

    pub fn take_child(&mut self) -> Option<ChildStdio> {
        match self {
            PendingStdio::Pipes { child, .. } => child.take(),
            PendingStdio::Terminal { .. } => None,
        }
    }

    /// Completes the setup after libcontainer created the process.
    pub fn finish(self) -> Result<Stdio> {
        match self {
            PendingStdio::Pipes {
                stdin,
                stdout,
                stderr,
                ..
            } => Ok(Stdio {
                stdin: Mutex::new(Some(stdin)),
                stdout: Some(stdout),
                stderr: Some(stderr),
                pty: None,
                stdout_done: AtomicBool::new(false),
                stderr_done: AtomicBool::new(false),
            }),
            PendingStdio::Terminal { listener, path } => {
                let master = receive_pty_master(&listener)?;
                let _ = std::fs::remove_file(&path);
                let writer = master
                    .try_clone()
                    .map_err(AgentError::io("duplicating the pty master"))?;
                let reader = master
                    .try_clone()
                    .map_err(AgentError::io("duplicating the pty master"))?;
                Ok(Stdio {
                    stdin: Mutex::new(Some(writer)),
                    stdout: Some(reader),
                    stderr: None,
                    pty: Some(master),
                    stdout_done: AtomicBool::new(false),
                    stderr_done: AtomicBool::new(true),
                })
            }
        }
    }
}

fn receive_pty_master(listener: &UnixListener) -> Result<File> {
    // The container's init connected before libcontainer returned; the
    // connection waits in the backlog. Do not block forever if it did not.
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(listener),
        PollFlags::POLLIN,
    )];
    let ready = poll(&mut fds, PollTimeout::from(5000u16)).map_err(AgentError::sys("poll"))?;
    if ready == 0 {
        return Err(AgentError::InvalidArgument(
            "the container did not send its terminal within 5 s".into(),
        ));
    }
    let (stream, _) = listener
        .accept()
        .map_err(AgentError::io("accepting the console socket"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(AgentError::io("console socket timeout"))?;
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(AgentError::sys("receiving the pty master"))?;
    for c in msg
        .cmsgs()
        .map_err(AgentError::sys("reading control messages"))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor in our
                // table for us (SCM_RIGHTS); nothing else owns it.
                return Ok(unsafe { File::from_raw_fd(*fd) });
            }
        }
    }
    Err(AgentError::InvalidArgument(
        "the console socket message carried no file descriptor".into(),
    ))
}

/// The agent's end of a running process's stdio.
pub struct Stdio {
    stdin: Mutex<Option<File>>,
    stdout: Option<File>,
    stderr: Option<File>,
    pty: Option<File>,
    /// End of stream seen on stdout / stderr.
    stdout_done: AtomicBool,
    stderr_done: AtomicBool,
}

#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stdio {
    /// Blocks until data is available; an empty result means end of stream.
    pub fn read(&self, stream: Stream, len: u32) -> Result<Vec<u8>> {
        let data = self.read_inner(stream, len)?;
        if data.is_empty() {
            match stream {
                Stream::Stdout => self.stdout_done.store(true, Ordering::SeqCst),
                Stream::Stderr => self.stderr_done.store(true, Ordering::SeqCst),
            }
        }
        Ok(data)
    }

    /// True once both output streams reached their end.
    pub fn drained(&self) -> bool {
        self.stdout_done.load(Ordering::SeqCst) && self.stderr_done.load(Ordering::SeqCst)
    }

    fn read_inner(&self, stream: Stream, len: u32) -> Result<Vec<u8>> {
        let file = match stream {
            Stream::Stdout => self.stdout.as_ref(),
            Stream::Stderr => self.stderr.as_ref(),
        };
        let Some(mut file) = file else {
            return Ok(Vec::new());
        };
        let len = (len as usize).clamp(1, MAX_READ);
        let mut buf = vec![0u8; len];
        loop {
            match file.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A pty master reports EIO once the last slave is closed.
                Err(e) if e.raw_os_error() == Some(libc::EIO) && self.pty.is_some() => {
                    return Ok(Vec::new())
                }
                Err(e) => return Err(AgentError::io(format!("reading {stream:?}"))(e)),
            }
        }
    }

    pub fn write_stdin(&self, data: &[u8]) -> Result<u32> {
        let mut guard = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        let Some(stdin) = guard.as_mut() else {
            return Err(AgentError::InvalidArgument("stdin is closed".into()));
        };
        stdin
            .write_all(data)
            .map_err(AgentError::io("writing stdin"))?;
        Ok(data.len() as u32)
    }

    pub fn close_stdin(&self) {
        let mut guard = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        if self.pty.is_some() {
            // Closing our copy of the master would not end the input; send
            // the terminal's end-of-file character as a user typing ^D would.
            if let Some(stdin) = guard.as_mut() {
                let _ = stdin.write_all(&[4]);
            }
        }
        guard.take();
    }

    pub fn resize(&self, rows: u32, cols: u32) -> Result<()> {
        let Some(pty) = &self.pty else {
            return Err(AgentError::InvalidArgument(
                "the process has no terminal to resize".into(),
            ));
        };
        let size = libc::winsize {
            ws_row: rows.min(u16::MAX as u32) as u16,
            ws_col: cols.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
        // points at a live local; the fd is an open pty master.
        let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(AgentError::io("resizing the terminal")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// A process started in a container.
pub struct Process {
    pub pid: i32,
    pub stdio: Stdio,
    /// Its exit was handed to the host (WaitProcess returned).
    pub waited: AtomicBool,
}

impl Process {
    pub fn new(pid: i32, stdio: Stdio) -> Self {
        Process {
            pid,
            stdio,
            waited: AtomicBool::new(false),
        }
    }

    /// Nothing more of it can be asked for: exit reported, output drained.
    pub fn finished(&self) -> bool {
        self.waited.load(Ordering::SeqCst) && self.stdio.drained()
    }
}
