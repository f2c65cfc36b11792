//! A minimal logger to the VM console.
//!
//! As PID 1 the agent writes to /dev/console through its own descriptor, not
//! to stderr: a forked container process keeps logging through libcontainer
//! after its stderr became the container's, and those lines must reach the
//! console, never the workload's output. The level comes from the kernel
//! command line (`kabuto.log=debug`); the default is `info`.

use std::{fs::File, io::Write, sync::Mutex};

struct ConsoleLogger {
    console: Option<Mutex<File>>,
}

/// The level a record is shown at. libcontainer and libcgroups log at
/// info on every container create and exec ("cgroup manager V2 will be
/// used", "close_range"), and libcgroups warns on each create about
/// controllers it does not implement (misc, rdma), which no spec asks
/// for: shown only at debug. Each console line costs the guest about a
/// millisecond under TCG (an emulated UART), on the exec's critical path.
fn shown_level(metadata: &log::Metadata) -> log::Level {
    let target = metadata.target();
    let level = metadata.level();
    let chatty_info = level == log::Level::Info
        && (target.starts_with("libcontainer") || target.starts_with("libcgroups"));
    let unimplemented_controller = level == log::Level::Warn && target == "libcgroups::v2::util";
    if chatty_info || unimplemented_controller {
        log::Level::Debug
    } else {
        level
    }
}

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        shown_level(metadata) <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Seconds since boot, like the kernel's own console lines.
        let uptime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
            .unwrap_or_default();
        let line = format!(
            "[{uptime:12.6}] kabuto-agent {} {}: {}\n",
            record.level(),
            record.target(),
            record.args()
        );
        match &self.console {
            Some(console) => {
                let mut f = console.lock().unwrap_or_else(|p| p.into_inner());
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Sets the level from `kabuto.log=` on the kernel command line (needs
/// /proc, so PID 1 calls it again once /proc is mounted).
pub fn set_level_from_cmdline() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let level = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kabuto.log="))
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    log::set_max_level(level);
}

pub fn init(is_init: bool) {
    // O_CLOEXEC (std's default) keeps the console out of exec'd workloads.
    let console = is_init
        .then(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/console")
                .ok()
        })
        .flatten()
        .map(Mutex::new);
    let logger = Box::leak(Box::new(ConsoleLogger { console }));
    let _ = log::set_logger(logger);
    set_level_from_cmdline();
}

/// Writes a line to the console whatever the log level (see
/// `kabuto_protocol::AGENT_READY_MARKER`).
pub fn console_line(line: &str) {
    let text = format!("{line}\n");
    match std::fs::OpenOptions::new().write(true).open("/dev/console") {
        Ok(mut f) => {
            let _ = f.write_all(text.as_bytes());
        }
        Err(_) => {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}
