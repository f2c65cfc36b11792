//! `[agent]`: how the host reaches the guest's agent.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// How the host reaches the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// `auto`: kernel vhost-vsock when /dev/vhost-vsock exists, else a
    /// vhost-user vsock device. The guest listens on vsock in both cases.
    pub channel: AgentChannel,
    /// The vhost-user vsock device daemon (crates.io `vhost-device-vsock`);
    /// a bare name is looked up on PATH.
    pub vhost_user_vsock_path: PathBuf,
    /// How long the VM may take from launch until the agent answers.
    #[serde(rename = "boot_timeout_secs", with = "super::secs")]
    pub boot_timeout: Duration,
    /// Deadline of short agent requests (create, start, signal, ...).
    #[serde(rename = "request_timeout_secs", with = "super::secs")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentChannel {
    Auto,
    VhostVsock,
    VhostUserVsock,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            channel: AgentChannel::Auto,
            vhost_user_vsock_path: PathBuf::from("vhost-device-vsock"),
            boot_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
        }
    }
}
