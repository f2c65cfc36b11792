//! The debug console: a shell in the guest for `kabuto exec <pod>`.
//!
//! Off unless the kernel command line has `kabuto.debug_console=1` (set by
//! the host only when `hypervisor.debug_console = true`) *and* the guest
//! image was built with `kabuto guest build --debug-console`, which adds a
//! static busybox at [`DEBUG_SHELL`]. It hands whoever controls the host a
//! root shell in the guest: never for confidential pods.

use std::{
    fs::File,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Command, Stdio},
    thread,
};

use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

/// The shell the debug image carries (it survives the switch from the
/// initramfs; see `init::switch_root`).
pub const DEBUG_SHELL: &str = "/debug/busybox";
/// vsock port of the debug console.
pub const DEBUG_CONSOLE_PORT: u32 = 1026;

pub fn enabled() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == "kabuto.debug_console=1"))
        .unwrap_or(false)
}

pub fn start() {
    if !std::path::Path::new(DEBUG_SHELL).exists() {
        log::warn!(
            "debug console requested but this guest image has no shell \
             (build it with `kabuto guest build --debug-console`)"
        );
        return;
    }
    let listener = match listen_vsock(DEBUG_CONSOLE_PORT) {
        Ok(l) => l,
        Err(e) => {
            log::error!("debug console: cannot listen on vsock port {DEBUG_CONSOLE_PORT}: {e}");
            return;
        }
    };
    log::warn!("debug console enabled on vsock port {DEBUG_CONSOLE_PORT}");
    let _ = thread::Builder::new()
        .name("debug-console".into())
        .spawn(move || loop {
            match accept(listener.as_raw_fd()) {
                Ok(fd) => {
                    // SAFETY: accept(2) returned a new descriptor that we now own.
                    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
                    let _ = thread::Builder::new()
                        .name("debug-shell".into())
                        .spawn(move || serve(conn));
                }
                Err(e) => log::warn!("debug console accept: {e}"),
            }
        });
}

fn listen_vsock(port: u32) -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(4)?)?;
    Ok(fd)
}

/// Runs a shell on a fresh pty and copies between it and the connection.
fn serve(conn: OwnedFd) {
    let pty = match nix::pty::openpty(None, None) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("debug console: openpty: {e}");
            return;
        }
    };
    let slave = File::from(pty.slave);
    let stdio = || slave.try_clone().map(Stdio::from);
    let (Ok(i), Ok(o), Ok(e)) = (stdio(), stdio(), stdio()) else {
        return;
    };
    let mut cmd = Command::new(DEBUG_SHELL);
    cmd.args(["sh", "-l"])
        .env_clear()
        .env("PATH", "/debug")
        .env("TERM", "xterm")
        .env("PS1", "kabuto-guest# ")
        .stdin(i)
        .stdout(o)
        .stderr(e);
    // SAFETY: only async-signal-safe calls between fork and exec: setsid and
    // ioctl(TIOCSCTTY) on the inherited slave (fd 0).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // PID 1's reaper collects the shell's exit.
    let shell = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            log::warn!("debug console: starting {DEBUG_SHELL}: {e}");
            return;
        }
    };
    // Our copies of the slave must go, or the master never sees the hang-up.
    drop(cmd);
    drop(slave);
    let mut master_w = File::from(pty.master);
    let mut conn_r = File::from(conn);
    let (Ok(mut master_r), Ok(mut conn_w)) = (master_w.try_clone(), conn_r.try_clone()) else {
        return;
    };
    // Client → shell. When the client goes away, the terminal's end-of-file
    // (^D) lets the shell exit; one still running 10 s later is killed.
    let shell_pid = nix::unistd::Pid::from_raw(shell.id() as i32);
    let _ = thread::Builder::new()
        .name("debug-in".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn_r.read(&mut buf) {
                if n == 0 || master_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = master_w.write_all(&[4]);
            thread::sleep(std::time::Duration::from_secs(10));
            let _ = nix::sys::signal::kill(shell_pid, nix::sys::signal::Signal::SIGKILL);
        });
    // Shell → client, until the shell's side of the pty closes (it exited).
    let mut buf = [0u8; 4096];
    while let Ok(n) = master_r.read(&mut buf) {
        if n == 0 || conn_w.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    // Hang up: the client sees end of stream, the input thread wakes up.
    let _ = nix::sys::socket::shutdown(conn_w.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    drop(shell);
}
