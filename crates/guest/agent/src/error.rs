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
    #[error("confidential pod: {0}")]
    Confidential(String),
    /// A guest pull was refused or failed (registry, signature, decryption,
    /// unpacking).
    #[error("guest image pull: {0}")]
    Image(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Container {
        context: String,
        #[source]
        source: libcontainer::error::LibcontainerError,
    },
    #[error("{context}: {source}")]
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
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::Confidential(_) | AgentError::Image(_) | AgentError::Lifecycle(_) => {
                Code::FAILED_PRECONDITION
            }
            _ => Code::INTERNAL,
        };
        // Print the whole chain once, so the host shows the root cause.
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(&self);
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = s.source();
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;
