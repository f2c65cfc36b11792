//! `kabuto exec <pod>`: attaches the terminal to the guest's debug console.

use std::{
    fs::File,
    io::{IsTerminal, Read, Write},
    os::fd::AsFd,
    thread,
    time::Duration,
};

use anyhow::{bail, Context};
use kabuto_runtime::{
    config::Config,
    sandbox::{guest_address, sandbox_dir, sandbox_namespaces, DEBUG_CONSOLE_PORT},
};
use nix::sys::termios::{self, SetArg};

/// The namespace of pod `pod`: `namespace` if given, else the only one
/// that has a sandbox of that id.
fn namespace_of(config: &Config, pod: &str, namespace: Option<&str>) -> anyhow::Result<String> {
    if let Some(ns) = namespace {
        if !sandbox_dir(config, ns, pod).is_dir() {
            bail!(
                "pod {pod} of namespace {ns} is not running here (no {})",
                sandbox_dir(config, ns, pod).display()
            );
        }
        return Ok(ns.to_string());
    }
    let mut found = sandbox_namespaces(config, pod);
    match found.len() {
        0 => bail!("pod {pod} is not running here (in no namespace)"),
        1 => Ok(found.remove(0)),
        _ => bail!(
            "pod {pod} runs in several namespaces ({}): choose one with --namespace",
            found.join(", ")
        ),
    }
}

pub fn run(config: &Config, pod: &str, namespace: Option<&str>) -> anyhow::Result<()> {
    let namespace = namespace_of(config, pod, namespace)?;
    let address = guest_address(config, &namespace, pod, DEBUG_CONSOLE_PORT);
    let conn = address.connect(Duration::from_secs(5)).with_context(|| {
        format!(
            "connecting to the debug console of {pod}: was the pod started with \
             hypervisor.debug_console = true and a guest image built with --debug-console?"
        )
    })?;
    let mut from_guest = File::from(conn);
    let mut to_guest = from_guest.try_clone()?;

    // Raw mode for an interactive terminal; restored on the way out.
    let stdin = std::io::stdin();
    let saved = if stdin.is_terminal() {
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Some(saved)
    } else {
        None
    };
    let _ = thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut buf = [0u8; 4096];
        let mut input = std::io::stdin().lock();
        // At the end of input the connection stays open: the vsock device
        // cannot half-close, and the guest hangs up when the shell exits.
        while let Ok(n) = input.read(&mut buf) {
            if n == 0 || to_guest.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    while let Ok(n) = from_guest.read(&mut buf) {
        if n == 0 || out.write_all(&buf[..n]).is_err() {
            break;
        }
        let _ = out.flush();
    }
    if let Some(saved) = saved {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &saved);
    }
    Ok(())
}
