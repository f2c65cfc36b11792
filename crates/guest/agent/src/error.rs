//! Errors the agent returns to the host.

use thiserror::Error;

/// What went wrong while serving one request. Each variant maps to a ttrpc
/// status code in [`AgentError::into_ttrpc`].
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("process {exec_id:?} of container {container_id} not found")]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The request does not fit the guest's lifecycle (CreateSandbox twice,
    /// anything but CreateSandbox first, or after it failed).
    #[error("{0}")]
    Lifecycle(String),
    /// A confidential pod's guarantees would not hold (TEE binding, attestation).
    #[error("confidential pod")]
    Confidential(#[source] Box<crate::confidential::ConfidentialError>),
    /// The guest's TEE is unusable: every CreateSandbox is refused.
    #[error("confidential pod")]
    Tee(#[source] std::sync::Arc<crate::confidential::ConfidentialError>),
    /// A guest pull was refused or failed (registry, signature, decryption,
    /// unpacking).
    #[error("guest image pull: {0}")]
    Image(String),
    #[error("guest image pull")]
    Pull(#[source] Box<kabuto_image::PullError>),
    /// The pod's pull settings, fetched for a pull, are unusable.
    #[error("guest image pull")]
    PullSettings(#[source] Box<crate::images::SettingsError>),
    /// The init-data's pull settings, checked when the pod starts.
    #[error("init-data refused")]
    InitDataSettings(#[source] Box<crate::images::SettingsError>),
    /// The pulled image's config does not fit the container's spec.
    #[error("invalid request: image {image}")]
    ImageConfig {
        image: String,
        #[source]
        source: crate::images::ImageConfigError,
    },
    /// The pod's network could not be applied (the interface or route is
    /// named in the cause).
    #[error("pod network")]
    Network(#[source] Box<crate::pod_network::PodNetworkError>),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Container {
        context: String,
        #[source]
        source: libcontainer::error::LibcontainerError,
    },
    #[error("{context}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },
}

impl AgentError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }

    pub fn sys(context: impl Into<String>) -> impl FnOnce(nix::Error) -> Self {
        let context = context.into();
        move |source| AgentError::Sys { context, source }
    }

    pub fn container(
        context: impl Into<String>,
    ) -> impl FnOnce(libcontainer::error::LibcontainerError) -> Self {
        let context = context.into();
        move |source| AgentError::Container { context, source }
    }

    pub fn into_ttrpc(self) -> ttrpc::Error {
        use ttrpc::Code;
        let code = match &self {
            AgentError::ContainerNotFound(_) | AgentError::ProcessNotFound { .. } => {
                Code::NOT_FOUND
            }
            AgentError::ContainerExists(_) => Code::ALREADY_EXISTS,
            AgentError::InvalidArgument(_)
            | AgentError::InitDataSettings(_)
            | AgentError::ImageConfig { .. }
            | AgentError::Network(_) => Code::INVALID_ARGUMENT,
            AgentError::Confidential(_)
            | AgentError::Tee(_)
            | AgentError::Image(_)
            | AgentError::Pull(_)
            | AgentError::PullSettings(_)
            | AgentError::Lifecycle(_) => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        };
        // The whole chain, so the host shows the root cause.
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, kabuto_error::chain(&self)))
    }
}

impl From<crate::confidential::ConfidentialError> for AgentError {
    fn from(e: crate::confidential::ConfidentialError) -> Self {
        AgentError::Confidential(Box::new(e))
    }
}

impl From<crate::pod_network::PodNetworkError> for AgentError {
    fn from(e: crate::pod_network::PodNetworkError) -> Self {
        AgentError::Network(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;
