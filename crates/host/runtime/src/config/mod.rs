//! kabuto's configuration: one TOML file, every field optional with a
//! default that works on a plain Debian 12 host.
//!
//! Lookup order: the path in `KABUTO_CONFIG_PATH`, else
//! [`DEFAULT_CONFIG_PATH`]; a missing default file means "all defaults".
//! Unknown fields are errors, so a typo never silently falls back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod agent;
mod confidential;
mod hypervisor;
mod shared_fs;
mod snapshotter;

pub use agent::*;
pub use confidential::*;
pub use hypervisor::*;
pub use shared_fs::*;
pub use snapshotter::*;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/kabuto/config.toml";
pub const CONFIG_PATH_ENV: &str = "KABUTO_CONFIG_PATH";
/// Where `kabuto install` puts the guest kernel and initramfs.
pub const DEFAULT_GUEST_DIR: &str = "/usr/local/share/kabuto/guest";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid config {path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        /// The key at fault, as written in the file (`hypervisor.vcpus`).
        field: &'static str,
        reason: String,
    },
}

/// A failed check of [`Config::validate`]: the key at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub guest: GuestConfig,
    pub agent: AgentConfig,
    pub shared_fs: SharedFsConfig,
    pub runtime: RuntimeConfig,
    pub confidential: ConfidentialConfig,
    pub snapshotter: SnapshotterConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Per-sandbox state: sockets, logs, the shared directory.
    pub state_dir: PathBuf,
    /// Shim log level: error, warn, info, debug, trace.
    pub log_level: String,
    /// Guest agent log level (on the VM console log).
    pub agent_log_level: String,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            state_dir: PathBuf::from("/run/kabuto"),
            log_level: "info".into(),
            agent_log_level: "info".into(),
        }
    }
}

impl Config {
    /// Loads the effective configuration (see the module docs for the order).
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(CONFIG_PATH_ENV) {
            Some(path) => Config::from_file(Path::new(&path)),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::from_file(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        config
            .validate()
            .map_err(|Invalid { field, reason }| ConfigError::Invalid {
                path: path.to_path_buf(),
                field,
                reason,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Invalid> {
        self.validate_resources()?;
        self.validate_images()?;
        self.validate_tee()
    }

    /// The VM's size and the timeouts.
    fn validate_resources(&self) -> Result<(), Invalid> {
        let h = &self.hypervisor;
        if h.vcpus == 0 || h.vcpus > 255 {
            return Err(invalid(
                "hypervisor.vcpus",
                format!("must be 1..=255, not {}", h.vcpus),
            ));
        }
        if h.memory_mib < 64 {
            return Err(invalid(
                "hypervisor.memory_mib",
                format!("must be at least 64, not {}", h.memory_mib),
            ));
        }
        for (field, secs) in [
            ("agent.boot_timeout_secs", self.agent.boot_timeout),
            ("agent.request_timeout_secs", self.agent.request_timeout),
            (
                "confidential.image_pull_timeout_secs",
                self.confidential.image_pull_timeout,
            ),
        ] {
            if secs.is_zero() {
                return Err(invalid(field, "must be at least 1 second"));
            }
        }
        Ok(())
    }

    /// Where images are pulled.
    fn validate_images(&self) -> Result<(), Invalid> {
        let h = &self.hypervisor;
        if self.confidential.image_pull == ImagePull::Guest && h.guest_network != GuestNetwork::User
        {
            return Err(invalid(
                "confidential.image_pull",
                "\"guest\" needs hypervisor.guest_network = \"user\": the guest reaches the registry itself",
            ));
        }
        for pattern in &self.snapshotter.guest_pull_images {
            let head = pattern.strip_suffix('*').unwrap_or(pattern);
            if pattern.is_empty() || head.contains('*') {
                return Err(invalid(
                    "snapshotter.guest_pull_images",
                    format!("{pattern:?} is not \"*\", \"PREFIX*\", a repository or a reference"),
                ));
            }
        }
        Ok(())
    }

    /// The TEE, and what it needs of the machine and the build.
    fn validate_tee(&self) -> Result<(), Invalid> {
        let h = &self.hypervisor;
        if self.confidential.tee == TeeKind::Software && !cfg!(feature = "software-tee") {
            return Err(invalid("confidential.tee", SOFTWARE_TEE_NOT_BUILT));
        }
        if self.confidential.tee == TeeKind::Sample && !cfg!(feature = "software-tee") {
            return Err(invalid("confidential.tee", SAMPLE_NOT_BUILT));
        }
        if matches!(self.confidential.tee, TeeKind::Snp | TeeKind::Tdx) {
            let tee = self.confidential.tee.kernel_param().unwrap_or_default();
            if h.machine != MachineType::Q35 {
                return Err(invalid(
                    "hypervisor.machine",
                    format!("confidential.tee = \"{tee}\" needs hypervisor.machine = \"q35\" (a TEE launch boots through firmware)"),
                ));
            }
            if h.accelerator == Accelerator::Tcg {
                return Err(invalid(
                    "hypervisor.accelerator",
                    format!("confidential.tee = \"{tee}\" needs KVM on TEE hardware, not hypervisor.accelerator = \"tcg\""),
                ));
            }
            if self.confidential.firmware.as_os_str().is_empty() {
                return Err(invalid(
                    "confidential.firmware",
                    format!("confidential.tee = \"{tee}\" needs confidential.firmware (an AmdSev OVMF for snp, a TDVF for tdx)"),
                ));
            }
            if self.confidential.tee == TeeKind::Snp
                && crate::sandbox::snp_cpu_type(&self.confidential.snp_cpu).is_none()
            {
                return Err(invalid(
                    "confidential.snp_cpu",
                    format!(
                        "{:?} is not an EPYC model QEMU and the SNP measurement both know (e.g. \"EPYC-v4\", \"EPYC-Milan\", \"EPYC-Genoa\")",
                        self.confidential.snp_cpu
                    ),
                ));
            }
        }
        if self.confidential.tee != TeeKind::None && h.debug_console {
            return Err(invalid(
                "hypervisor.debug_console",
                "must be off when confidential.tee is set: it would give the host a shell in the guest",
            ));
        }
        Ok(())
    }

    /// The documented default configuration, as `kabuto install` writes it.
    pub fn default_toml() -> String {
        DEFAULT_TOML.to_string()
    }
}

/// A `Duration` written as whole seconds (the `*_secs` keys).
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_secs)
    }
}

/// The default config with every field documented. A unit test checks that
/// it parses to exactly `Config::default()`.
const DEFAULT_TOML: &str = include_str!("default.toml");

#[cfg(test)]
mod tests;
