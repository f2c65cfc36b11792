//! Real services started for tests: containerd, a registry, a file server, and tool wrappers.

pub mod cni;
pub mod containerd;
pub mod registry;
pub mod tools;
