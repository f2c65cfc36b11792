//! The kabuto guest agent, PID 1 of the pod VM.
//!
//! [`run`] prepares the guest (mounts, kernel modules, cgroups), then serves
//! the agent API over vsock port 1024 and runs the host's containers with
//! libcontainer. Every request goes through [`service::Agent::dispatch`];
//! the `kabuto-agent` binary is [`run`] and nothing else.

pub mod confidential;
pub mod containers;
pub mod data_hub;
pub mod debug_console;
pub mod error;
pub mod images;
pub mod init;
pub mod logger;
pub mod net;
pub mod pause;
pub mod pod_network;
pub mod process;
pub mod reaper;
pub mod sealed;
pub mod sealed_files;
pub mod service;
pub mod shared_binds;
pub mod stats;

use std::sync::Arc;

use kabuto_protocol::{agent_ttrpc, AGENT_VSOCK_PORT};

/// Boots the guest (as PID 1) and serves the agent API until the sandbox
/// is destroyed; then powers the VM off.
pub fn run() {
    let is_init = std::process::id() == 1;
    logger::init(is_init);
    let mut loaded_modules = Vec::new();
    if is_init {
        let mut cmdline = String::new();
        init::with_early_proc(|| {
            logger::set_level_from_cmdline();
            cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        });
        log::debug!("agent started");
        // Without PCI (microvm: pci=off) the virtio-pci drivers have nothing
        // to drive; skipping them saves their load time.
        let no_pci = cmdline.split_whitespace().any(|w| w == "pci=off");
        let with_net = net::requested(&cmdline);
        loaded_modules = init::load_modules(no_pci, with_net);
        log::debug!("kernel modules loaded");
        if let Err(e) = init::switch_root().and_then(|()| init::setup_guest()) {
            log::error!("guest setup failed: {}", kabuto_error::chain(&e));
            fatal(is_init);
        }
        logger::set_level_from_cmdline();
        init::mount_shared_dirs();
        // QEMU's user network, when asked for, is set up before the pod's
        // first container, unless the host gives the pod a network.
        if debug_console::enabled() {
            // A shell the host can reach has no place in a confidential guest.
            if confidential::is_confidential(&cmdline) {
                log::error!("debug console refused: this guest is confidential");
            } else {
                debug_console::start();
            }
        }
    }
    let reaper = reaper::Reaper::start();
    // Read again: the early read above exists only when running as init.
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let agent = Arc::new(service::Agent::new(reaper, loaded_modules, &cmdline));
    agent.start_oom_watch();

    let address = format!("vsock://-1:{AGENT_VSOCK_PORT}");
    let server = ttrpc::Server::new().bind(&address).map(|s| {
        s.register_service(agent_ttrpc::create_agent_service(agent.clone()))
            .register_service(agent_ttrpc::create_health(agent.clone()))
            // Reads of stdout/stderr and waits block a worker each.
            .set_thread_count_default(8)
            .set_thread_count_min(4)
            .set_thread_count_max(1024)
    });
    let mut server = match server {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen on {address}: {e}");
            fatal(is_init);
        }
    };
    if let Err(e) = server.start() {
        log::error!("cannot start the agent server: {e}");
        fatal(is_init);
    }
    log::info!(
        "kabuto-agent {} serving on {address}",
        env!("CARGO_PKG_VERSION")
    );
    logger::console_line(kabuto_protocol::AGENT_READY_MARKER);
    agent.wait_for_shutdown();
    log::info!("sandbox destroyed, powering off");
    server.shutdown();
    if is_init {
        init::power_off();
    }
}

/// Ends the agent: as PID 1 by powering the VM off (PID 1 must not exit),
/// otherwise (a test run on a host) by exiting.
fn fatal(is_init: bool) -> ! {
    if is_init {
        init::power_off();
    }
    std::process::exit(1);
}
