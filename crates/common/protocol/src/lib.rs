//! The kabuto agent API, shared by the host runtime (client) and the guest
//! agent (server).
//!
//! The messages are generated from `proto/agent.proto`; see that file for the
//! meaning of each field.

pub mod network;

#[allow(clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
#[allow(warnings)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
#[allow(warnings)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use ttrpc;

/// vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Host vsock port of the software TEE's firmware (guest connects to CID 2).
pub const SWTEE_VSOCK_PORT: u32 = 1027;
/// Guest loopback port of the data hub: containers of a confidential pod
/// read KBS resources from `http://127.0.0.1:8006/cdh/resource/<repo>/<type>/<tag>`
/// (the path CoCo's confidential data hub serves).
pub const DATA_HUB_PORT: u16 = 8006;
/// Kernel parameters the runtime sets for the agent.
pub const KERNEL_PARAM_TEE: &str = "kabuto.tee";
pub const KERNEL_PARAM_NET: &str = "kabuto.net";

/// Line the agent writes to the VM console once it listens on vsock. The
/// host waits for it before connecting: a vsock connection requested before
/// the guest's vsock driver is up can be lost, and with a vhost-user device
/// it may then block later requests. It is only a readiness hint; the host
/// trusts nothing it says.
pub const AGENT_READY_MARKER: &str = "kabuto-agent: ready on vsock";

/// Tag under which the host's per-sandbox shared directory is exported over
/// virtio-fs.
pub const SHARED_FS_TAG: &str = "kabuto";

/// Guest path where the shared directory is mounted.
pub const GUEST_SHARED_DIR: &str = "/run/kabuto/shared";

/// Tag of the second virtio-fs export: the containers' root filesystems,
/// which only the guest changes while they run, so the guest may cache them
/// without revalidating (the volumes in the shared directory may change on
/// the host, e.g. a ConfigMap update, and are revalidated).
pub const ROOTFS_FS_TAG: &str = "kabuto-rootfs";

/// Guest path where the root filesystems export is mounted; a container's
/// root is `<GUEST_ROOTFS_DIR>/<container id>`.
pub const GUEST_ROOTFS_DIR: &str = "/run/kabuto/rootfs";
/// The root of a confidential pod's sandbox container in the guest: the
/// static `pause` of the guest image and empty `proc` and `dev`.
pub const GUEST_PAUSE_ROOT: &str = "/pause-bundle/rootfs";

/// `Storage.driver` of a rootfs the guest pulls itself.
pub const STORAGE_IMAGE_GUEST_PULL: &str = "image_guest_pull";

/// Guest directory under which pulled images are unpacked, one tmpfs per
/// container (guest memory: the host cannot read it).
pub const GUEST_IMAGES_DIR: &str = "/run/kabuto/images";

/// Annotation naming the image a guest-pull container runs (`ctr run
/// --annotation io.kabuto.image=REF`); CRI's image-name annotation also
/// serves.
pub const IMAGE_ANNOTATION: &str = "io.kabuto.image";

/// Annotation keys containerd's CRI plugin sets on pod containers.
pub mod cri {
    /// The image a container was created from (`repo:tag` or `repo@digest`).
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
    /// `sandbox` for the pod's pause container, `container` for the others.
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    /// The pod (sandbox) id a container belongs to.
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
}

#[cfg(test)]
mod tests {
    use protobuf::Message;

    use super::agent::{CreateContainerRequest, WaitProcessResponse};

    #[test]
    fn messages_round_trip_on_the_wire() -> Result<(), protobuf::Error> {
        let req = CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec: br#"{"ociVersion":"1.0.2"}"#.to_vec(),
            ..Default::default()
        };
        let bytes = req.write_to_bytes()?;
        let back = CreateContainerRequest::parse_from_bytes(&bytes)?;
        assert_eq!(back, req);

        let resp = WaitProcessResponse {
            status: 137,
            ..Default::default()
        };
        let back = WaitProcessResponse::parse_from_bytes(&resp.write_to_bytes()?)?;
        assert_eq!(back.status, 137);
        Ok(())
    }

    #[test]
    fn unknown_fields_do_not_break_parsing() -> Result<(), protobuf::Error> {
        // A newer host may add fields; an older agent must still parse.
        let mut bytes = WaitProcessResponse {
            status: 3,
            ..Default::default()
        }
        .write_to_bytes()?;
        bytes.extend_from_slice(&[0xa0, 0x06, 0x01]); // field 100, varint 1
        let back = WaitProcessResponse::parse_from_bytes(&bytes)?;
        assert_eq!(back.status, 3);
        Ok(())
    }
}
