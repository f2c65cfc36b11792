//! Policy generation: from a Kubernetes manifest to the init-data annotation
//! whose policy allows exactly the pod's containers.
//!
//! For every pod template in the manifest (Pod, Deployment, StatefulSet,
//! DaemonSet, ReplicaSet, ReplicationController, Job, CronJob) each image is
//! resolved to its manifest digest and config (local OCI layouts first, then
//! its registry); the generator merges image and pod the way the kubelet and
//! containerd do (entrypoint/cmd with command/args, env, working dir, user,
//! mounts, security context), writes the result as `policy_data` under the
//! fixed rules of `rules.rego`, checks the policy parses, and adds the
//! init-data annotation (Kata's name, so existing clusters pass it through)
//! to the pod template. Other documents pass through unchanged.

mod image;
mod manifest;
mod policy;
mod settings;

pub use image::LayoutError;
pub use policy::RuleError;

use serde::Deserialize;
use thiserror::Error;

pub use image::{normalize, ImageConfig, ImageResolver, OciLayout, ResolvedImage, Resolver};
pub use policy::{ContainerRule, PolicyData, PolicyMount, RULES};
pub use settings::{MountRule, SandboxSettings, Settings};

#[derive(Debug, Error)]
pub enum GenPolicyError {
    #[error("the manifest is not valid YAML: {0}")]
    Yaml(String),
    #[error("{what}: {reason}")]
    Manifest { what: String, reason: String },
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
    #[error("image {image}: OCI layout {}", layout.display())]
    Layout {
        image: String,
        layout: std::path::PathBuf,
        #[source]
        reason: image::LayoutError,
    },
    #[error("image {image}")]
    Config {
        image: String,
        #[source]
        source: kabuto_oci::ConfigError,
    },
    #[error("container {name:?}")]
    Container {
        name: String,
        #[source]
        reason: policy::RuleError,
    },
    #[error("settings: {0}")]
    Settings(String),
    #[error("the generated policy is invalid (a genpolicy bug): {0}")]
    Policy(String),
    #[error("init-data: {0}")]
    InitData(String),
}

/// The policy of one pod template.
#[derive(Debug, Clone)]
pub struct GeneratedPod {
    /// `Kind/name` of the document it came from.
    pub source: String,
    pub rego: String,
    pub init_data: kabuto_initdata::InitData,
}

#[derive(Debug)]
pub struct Generated {
    /// The manifest with each pod template annotated (and, with
    /// `pin_images`, its images pinned by digest).
    pub manifest: String,
    pub pods: Vec<GeneratedPod>,
}

/// Generates the policy of every pod template in `yaml`.
pub fn generate(
    yaml: &str,
    settings: &Settings,
    resolver: &mut dyn ImageResolver,
) -> Result<Generated, GenPolicyError> {
    settings.check()?;
    let mut documents = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value =
            serde_json::Value::deserialize(doc).map_err(|e| GenPolicyError::Yaml(e.to_string()))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    if documents.is_empty() {
        return Err(GenPolicyError::Yaml("no documents".into()));
    }
    let mut pods = Vec::new();
    for doc in &mut documents {
        if let Some(pod) = annotate_document(doc, settings, resolver)? {
            pods.push(pod);
        }
    }
    if pods.is_empty() {
        return Err(GenPolicyError::Manifest {
            what: "the manifest".into(),
            reason: "has no Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, \
                     ReplicationController, Job or CronJob"
                .into(),
        });
    }
    let mut manifest = String::new();
    for (i, doc) in documents.iter().enumerate() {
        if i > 0 {
            manifest.push_str("---\n");
        }
        manifest.push_str(
            &serde_yaml::to_string(doc).map_err(|e| GenPolicyError::Yaml(e.to_string()))?,
        );
    }
    Ok(Generated { manifest, pods })
}

/// The pod spec of a template, with a StatefulSet's claim templates as
/// volumes; refused without containers or with host namespaces.
fn pod_spec(
    spec: &serde_json::Value,
    claims: Vec<String>,
    err: &dyn Fn(String) -> GenPolicyError,
) -> Result<manifest::PodSpec, GenPolicyError> {
    let mut spec: manifest::PodSpec =
        serde_json::from_value(spec.clone()).map_err(|e| err(format!("pod spec: {e}")))?;
    // A StatefulSet's claim templates are volumes of its pods too.
    for claim in claims {
        spec.volumes.push(manifest::Volume {
            name: claim,
            ..Default::default()
        });
    }
    if spec.containers.is_empty() {
        return Err(err("the pod has no containers".into()));
    }
    // The "host" namespaces of a kabuto pod would be the guest's own, the
    // agent's: no policy allows a container into them.
    for (uses, field) in [
        (spec.host_network, "hostNetwork"),
        (spec.host_pid, "hostPID"),
        (spec.host_ipc, "hostIPC"),
    ] {
        if uses {
            return Err(err(format!(
                "{field}: true is not supported: the pod's host namespaces would be the guest agent's"
            )));
        }
    }
    Ok(spec)
}

/// The rule of each (init) container, and the image reference to write
/// back for it (pinned by digest with `pin_images`).
fn container_rules(
    settings: &Settings,
    spec: &manifest::PodSpec,
    resolver: &mut dyn ImageResolver,
    err: &dyn Fn(String) -> GenPolicyError,
) -> Result<(Vec<ContainerRule>, Vec<String>), GenPolicyError> {
    let mut containers = Vec::new();
    let mut pinned_images = Vec::new();
    for c in spec.init_containers.iter().chain(&spec.containers) {
        if c.name.is_empty() || c.image.is_empty() {
            return Err(err("every container needs a name and an image".into()));
        }
        if containers.iter().any(|r: &ContainerRule| r.name == c.name) {
            return Err(err(format!("two containers are named {:?}", c.name)));
        }
        let resolved = resolver.resolve(&c.image)?;
        let written = if settings.pin_images {
            pin_written(&c.image, &resolved.digest)
        } else {
            c.image.clone()
        };
        let mut rule = policy::container_rule(settings, spec, c, &resolved, &written)?;
        if !settings.pin_images {
            // Tags move: the image check only names what the pod names.
            rule.images.push(c.image.clone());
        }
        containers.push(rule);
        pinned_images.push(written);
    }
    Ok((containers, pinned_images))
}

fn annotate_document(
    doc: &mut serde_json::Value,
    settings: &Settings,
    resolver: &mut dyn ImageResolver,
) -> Result<Option<GeneratedPod>, GenPolicyError> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let Some(path) = manifest::pod_template_path(&kind) else {
        return Ok(None);
    };
    let name = doc["metadata"]["name"]
        .as_str()
        .or(doc["metadata"]["generateName"].as_str())
        .unwrap_or("(unnamed)")
        .to_string();
    let source = format!("{kind}/{name}");
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let err = |reason: String| GenPolicyError::Manifest {
        what: source.clone(),
        reason,
    };
    let claims: Vec<String> = doc["spec"]["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["metadata"]["name"].as_str().map(String::from))
        .collect();
    let mut template = &mut *doc;
    for key in path {
        template = template
            .get_mut(*key)
            .ok_or_else(|| err(format!("has no {}", path.join("."))))?;
    }
    let spec = pod_spec(&template["spec"], claims, &err)?;
    if !spec.ephemeral_containers.is_empty() {
        log::warn!("{source}: ephemeral containers are not allowed by the generated policy");
    }
    let (containers, pinned_images) = container_rules(settings, &spec, resolver, &err)?;
    if settings.pin_images {
        let pinned = &mut pinned_images.into_iter();
        for list in ["initContainers", "containers"] {
            if let Some(array) = template["spec"][list].as_array_mut() {
                for (c, image) in array.iter_mut().zip(pinned.by_ref()) {
                    c["image"] = serde_json::Value::String(image);
                }
            }
        }
    }

    let data = policy::PolicyData {
        namespace,
        shared_prefix: format!("{}/", settings.shared_dir.trim_end_matches('/')),
        rootfs_prefix: format!("{}/", settings.rootfs_dir.trim_end_matches('/')),
        sandbox: policy::sandbox_rule(settings, &spec),
        containers: containers
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect(),
        allowed_exec: settings.allowed_exec.clone(),
    };
    let rego = policy::rego(&data, settings)?;
    kabuto_policy::PolicyGate::new(&rego).map_err(|e| GenPolicyError::Policy(e.to_string()))?;
    let init_data = init_data(&rego, settings)?;

    annotate(template, &init_data, &err)?;
    Ok(Some(GeneratedPod {
        source,
        rego,
        init_data,
    }))
}

/// Puts the init-data annotation (Kata's name; kabuto's own is dropped)
/// into the pod template's metadata.
fn annotate(
    template: &mut serde_json::Value,
    init_data: &kabuto_initdata::InitData,
    err: &dyn Fn(String) -> GenPolicyError,
) -> Result<(), GenPolicyError> {
    let metadata = template
        .as_object_mut()
        .ok_or_else(|| err("the pod template is not an object".into()))?
        .entry("metadata")
        .or_insert_with(|| serde_json::json!({}));
    let annotations = metadata
        .as_object_mut()
        .ok_or_else(|| err("metadata is not an object".into()))?
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    let annotations = annotations
        .as_object_mut()
        .ok_or_else(|| err("metadata.annotations is not an object".into()))?;
    annotations.remove(kabuto_initdata::KABUTO_ANNOTATION);
    annotations.insert(
        kabuto_initdata::KATA_ANNOTATION.into(),
        serde_json::Value::String(init_data.to_annotation()),
    );
    Ok(())
}

/// `image` as written, with its tag replaced by `@digest`.
fn pin_written(image: &str, digest: &str) -> String {
    let base = image.split('@').next().unwrap_or(image);
    // A tag is a `:` after the last `/` (a registry port comes before it).
    let name_start = base.rfind('/').map(|i| i + 1).unwrap_or(0);
    let base = match base[name_start..].rfind(':') {
        Some(colon) => &base[..name_start + colon],
        None => base,
    };
    format!("{base}@{digest}")
}

/// The init-data document: the policy plus the settings' extra files.
fn init_data(rego: &str, settings: &Settings) -> Result<kabuto_initdata::InitData, GenPolicyError> {
    #[derive(serde::Serialize)]
    struct Document<'a> {
        version: &'a str,
        algorithm: &'a str,
        data: std::collections::BTreeMap<&'a str, &'a str>,
    }
    let mut data: std::collections::BTreeMap<&str, &str> = settings
        .init_data
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    data.insert("policy.rego", rego);
    let text = toml::to_string(&Document {
        version: kabuto_initdata::VERSION,
        algorithm: &settings.algorithm,
        data,
    })
    .map_err(|e| GenPolicyError::InitData(e.to_string()))?;
    kabuto_initdata::InitData::parse(text.as_bytes())
        .map_err(|e| GenPolicyError::InitData(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What genpolicy writes passes an init-data parser built as CoCo's is
    /// (a TOML table of exactly `version` "0.1.0", `algorithm` and a
    /// `[data]` table of strings; unknown keys refused).
    #[test]
    fn init_data_output_parses_as_coco_parses_it() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct CocoInitData {
            version: String,
            algorithm: String,
            data: std::collections::HashMap<String, String>,
        }
        let settings = Settings {
            algorithm: "sha384".into(),
            init_data: [(
                "aa.toml".to_string(),
                "[token_configs.kbs]\nurl = 'https://kbs'\n".to_string(),
            )]
            .into(),
            ..Settings::default()
        };
        let doc = init_data("package agent_policy\n", &settings).expect("init-data");
        let text = std::str::from_utf8(doc.raw()).expect("UTF-8");
        let coco: CocoInitData = toml::from_str(text).expect("CoCo's parser accepts it");
        assert_eq!(coco.version, "0.1.0");
        assert_eq!(coco.algorithm, "sha384");
        assert_eq!(coco.data["policy.rego"], "package agent_policy\n");
        assert!(coco.data.contains_key("aa.toml"));
    }

    #[test]
    fn pins_written_references() {
        let d = "sha256:00";
        assert_eq!(pin_written("busybox", d), "busybox@sha256:00");
        assert_eq!(pin_written("busybox:1.36", d), "busybox@sha256:00");
        assert_eq!(
            pin_written("localhost:5000/a/b:v1", d),
            "localhost:5000/a/b@sha256:00"
        );
        assert_eq!(
            pin_written("localhost:5000/a/b", d),
            "localhost:5000/a/b@sha256:00"
        );
        assert_eq!(pin_written("x/y@sha256:11", d), "x/y@sha256:00");
    }
}
