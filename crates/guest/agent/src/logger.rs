//! A minimal logger to the console (stderr of PID 1 is /dev/console).
//!
//! The level comes from the kernel command line (`kabuto.log=debug`); the
//! default is `info`. Nothing a container writes reaches this log.

use std::io::Write;

struct ConsoleLogger;

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                std::io::stderr(),
                "kabuto-agent {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: ConsoleLogger = ConsoleLogger;

pub fn init() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let level = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kabuto.log="))
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
