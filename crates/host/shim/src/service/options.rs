//! What a task's request says beyond the OCI spec: the runtime options
//! (the kabuto config to use) and the CRI annotations (pod membership, the
//! image a guest pull runs).

use std::path::Path;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use kabuto_protocol::{cri, IMAGE_ANNOTATION};
use kabuto_runtime::config::Config;

use super::{err, Service};

impl Service {
    /// The config: the file named by the runtime options of the first task
    /// (`ctr run --runtime-config-path`, CRI `ConfigPath`), else the default
    /// lookup. Loaded once per shim.
    pub(super) fn config(&self, options: Option<&Any>) -> TtrpcResult<&Config> {
        if let Some(c) = self.inner.config.get() {
            return Ok(c);
        }
        let explicit = options.and_then(runtime_options_config_path);
        let loaded = match &explicit {
            Some(path) => Config::from_file(Path::new(path)),
            None => Config::load(),
        }
        .map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("kabuto config: {}", kabuto_error::chain(&e)),
            )
        })?;
        Ok(self.inner.config.get_or_init(|| loaded))
    }
}

/// The pod a bundle's container belongs to, from the CRI annotations:
/// `Some(pod id)` for a pod member, `None` for a pod's sandbox container or
/// a stand-alone container (each starts a VM of its own).
pub(super) fn pod_of(spec: &oci_spec::runtime::Spec) -> Option<String> {
    let annotations = spec.annotations().as_ref()?;
    if annotations.get(cri::CONTAINER_TYPE).map(String::as_str) == Some("container") {
        annotations.get(cri::SANDBOX_ID).cloned()
    } else {
        None
    }
}

/// `config_path` (field 2) of containerd's `runtimeoptions.v1.Options`, the
/// message ctr and CRI send for non-runc runtimes. Its proto is not among
/// the generated containerd types, so the one string field is read here.
fn runtime_options_config_path(any: &Any) -> Option<String> {
    use containerd_shim::protos::protobuf::CodedInputStream;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire_type) = (tag >> 3, tag & 7);
        match (field, wire_type) {
            (2, 2) => return input.read_string().ok().filter(|p| !p.is_empty()),
            (_, 2) => {
                let len = input.read_raw_varint32().ok()?;
                input.skip_raw_bytes(len).ok()?;
            }
            (_, 0) => {
                input.read_raw_varint64().ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// The image a guest-pull container runs: our annotation, else CRI's.
pub(super) fn image_reference(spec: &oci_spec::runtime::Spec) -> Option<String> {
    let annotations = spec.annotations().as_ref()?;
    [IMAGE_ANNOTATION, cri::IMAGE_NAME]
        .iter()
        .find_map(|k| annotations.get(*k).filter(|v| !v.is_empty()).cloned())
}

pub(super) fn is_pod_sandbox(spec: &oci_spec::runtime::Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(cri::CONTAINER_TYPE))
        .is_some_and(|t| t == "sandbox")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(type_url: &str, fields: &[(u32, &str)]) -> Any {
        let mut value = Vec::new();
        for (field, text) in fields {
            value.push(((field << 3) | 2) as u8);
            value.push(text.len() as u8);
            value.extend_from_slice(text.as_bytes());
        }
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn reads_config_path_from_runtime_options() {
        let any = options(
            "runtimeoptions.v1.Options",
            &[
                (1, "io.containerd.kabuto.v2"),
                (2, "/etc/kabuto/other.toml"),
            ],
        );
        assert_eq!(
            runtime_options_config_path(&any).as_deref(),
            Some("/etc/kabuto/other.toml")
        );
        let runc = options("containerd.runc.v1.Options", &[(2, "/x")]);
        assert_eq!(runtime_options_config_path(&runc), None);
        let empty = options("runtimeoptions.v1.Options", &[(2, "")]);
        assert_eq!(runtime_options_config_path(&empty), None);
    }

    #[test]
    fn pod_membership_from_cri_annotations() {
        let spec = |pairs: &[(&str, &str)]| {
            let mut s = oci_spec::runtime::Spec::default();
            s.set_annotations(Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ));
            s
        };
        let member = spec(&[
            (cri::CONTAINER_TYPE, "container"),
            (cri::SANDBOX_ID, "pod1"),
        ]);
        assert_eq!(pod_of(&member).as_deref(), Some("pod1"));
        let sandbox = spec(&[(cri::CONTAINER_TYPE, "sandbox"), (cri::SANDBOX_ID, "pod1")]);
        assert_eq!(pod_of(&sandbox), None);
        assert!(is_pod_sandbox(&sandbox));
        assert_eq!(pod_of(&spec(&[])), None);
    }
}
