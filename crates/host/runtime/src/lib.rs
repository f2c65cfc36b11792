//! Host side of kabuto: everything the containerd shim and the `kabuto`
//! command need that is not containerd-specific.
//!
//! - [`config`]: the TOML configuration.
//! - [`hypervisor`]: the VMM boundary and the QEMU driver.
//! - [`agent_client`]: the agent connection (vsock, hybrid vsock) and client.
//! - [`sandbox`]: one pod VM with its helpers, created all-or-nothing.
//! - [`inventory`]: the sandboxes on this host; removal of orphaned ones.
//! - [`spec`]: host OCI spec → guest OCI spec.
//! - [`mount`]: rootfs and bind mounts in the shared directory.
//! - [`guest_image`]: builds the guest kernel + initramfs reproducibly.
//!
//! Nothing here holds a workload secret: in confidential mode the host is
//! untrusted, and this crate only ever handles what the host already sees.

pub mod agent_client;
pub mod config;
pub mod guest_image;
pub mod hypervisor;
pub mod inventory;
pub mod mount;
pub mod network;
pub mod sandbox;
pub mod spec;
pub mod swtee_service;
