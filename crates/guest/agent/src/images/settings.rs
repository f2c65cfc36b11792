//! The pod owner's pull settings: init-data `cdh.toml` `[image]`, and the
//! resources it names (`kbs:///…` after attestation, `initdata:///…` from
//! the same init-data document), fetched and parsed for each pull.

use std::collections::BTreeMap;
use std::sync::Arc;

use kabuto_attestation_agent::{AttestError, KbsClient};
use kabuto_image::signature::{KeyPathError, Lookaside, LookasideError};
use kabuto_image::SignaturePolicy;
use kabuto_image::{Credentials, PullError, PullSettings, RegistriesConf, SignatureError};
use kabuto_kbs_protocol::{ResourceUri, ResourceUriError};
use serde::Deserialize;
use zeroize::Zeroizing;

/// The `[image]` table of init-data `cdh.toml`, with CoCo's key names so
/// existing init-data works. Values are `kbs:///repo/type/tag` (fetched
/// after attestation) or `initdata:///<file>` (another file of the same
/// init-data document).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    /// A `containers-policy.json`. When set, images must satisfy it. Its
    /// `keyPath`s are resource URIs like these.
    #[serde(default)]
    pub image_security_policy_uri: Option<String>,
    /// A `registries.d` YAML naming the lookaside stores of GPG signatures.
    #[serde(default)]
    pub sigstore_config_uri: Option<String>,
    /// A `containers-registries.conf` (mirrors, insecure, blocked).
    #[serde(default)]
    pub registry_configuration_uri: Option<String>,
    /// An `auth.json` with registry credentials.
    #[serde(default)]
    pub authenticated_registry_credentials_uri: Option<String>,
    /// PEM private keys (RSA or EC P-256/P-384) tried on the JWE recipients
    /// of encrypted layers. kabuto's own key: CoCo sends such keys through
    /// its key-provider protocol instead.
    #[serde(default)]
    pub image_decryption_key_uris: Vec<String>,
}

/// Where a setting's document comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodResource {
    /// A KBS resource, released after attestation.
    Kbs(ResourceUri),
    /// Another file of the pod's init-data document.
    InitData(String),
}

impl std::str::FromStr for PodResource {
    type Err = UriError;
    fn from_str(uri: &str) -> Result<PodResource, UriError> {
        if let Some(name) = uri.strip_prefix("initdata:///") {
            return Ok(PodResource::InitData(name.to_string()));
        }
        // Only the pod's own KBS: a host part (`kbs://other/…`) is refused,
        // not quietly read from the pinned KBS.
        if uri.starts_with("kbs:///") {
            return uri.parse().map(PodResource::Kbs).map_err(UriError::Kbs);
        }
        Err(UriError::Scheme)
    }
}

/// Why a resource URI of the settings cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum UriError {
    #[error("neither kbs:/// nor initdata:///")]
    Scheme,
    #[error(transparent)]
    Kbs(ResourceUriError),
    #[error("aa.toml names no KBS")]
    NoKbs,
    #[error("the init-data has no such file")]
    NoInitDataFile,
    #[error(transparent)]
    Fetch(#[from] AttestError),
}

/// Why the pod's pull settings are refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("init-data cdh.toml")]
    Toml(#[source] toml::de::Error),
    #[error("init-data cdh.toml [image]")]
    Table(#[source] toml::de::Error),
    #[error("{uri:?}")]
    Uri {
        uri: String,
        #[source]
        reason: UriError,
    },
    #[error("{uri}")]
    Document {
        uri: String,
        #[source]
        reason: Box<DocumentError>,
    },
}

/// Why a fetched settings document is unusable.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Lookaside(#[from] LookasideError),
    #[error("not a private key")]
    Key(#[source] kabuto_jose::JoseError),
}

/// What a pod's pulls need: its settings, its init-data files and its KBS.
pub struct PodImages {
    settings: ImageSettings,
    init_data: BTreeMap<String, String>,
    kbs: Option<Arc<KbsClient>>,
}

impl PodImages {
    /// From init-data (`cdh.toml` `[image]`, if any) and the pod's KBS.
    /// Every URI must name something this pod can read.
    pub fn new(
        init_data: Option<&kabuto_initdata::InitData>,
        kbs: Option<Arc<KbsClient>>,
    ) -> Result<PodImages, SettingsError> {
        let files = init_data.map(|d| d.data.clone()).unwrap_or_default();
        let settings = match files.get("cdh.toml") {
            None => ImageSettings::default(),
            Some(text) => {
                let doc: toml::Value = toml::from_str(text).map_err(SettingsError::Toml)?;
                match doc.get("image") {
                    None => ImageSettings::default(),
                    Some(table) => table.clone().try_into().map_err(SettingsError::Table)?,
                }
            }
        };
        let images = PodImages {
            settings,
            init_data: files,
            kbs,
        };
        let s = &images.settings;
        let uris = s
            .image_security_policy_uri
            .iter()
            .chain(&s.registry_configuration_uri)
            .chain(&s.sigstore_config_uri)
            .chain(&s.authenticated_registry_credentials_uri)
            .chain(&s.image_decryption_key_uris);
        for uri in uris {
            images.readable(uri).map_err(|reason| SettingsError::Uri {
                uri: uri.clone(),
                reason,
            })?;
        }
        Ok(images)
    }

    /// The resource `uri` names, if this pod can read it.
    fn readable(&self, uri: &str) -> Result<PodResource, UriError> {
        let resource: PodResource = uri.parse()?;
        match &resource {
            PodResource::Kbs(_) if self.kbs.is_none() => Err(UriError::NoKbs),
            PodResource::InitData(name) if !self.init_data.contains_key(name) => {
                Err(UriError::NoInitDataFile)
            }
            _ => Ok(resource),
        }
    }

    fn fetch(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, UriError> {
        match self.readable(uri)? {
            PodResource::InitData(name) => self
                .init_data
                .get(&name)
                .map(|text| Zeroizing::new(text.as_bytes().to_vec()))
                .ok_or(UriError::NoInitDataFile),
            PodResource::Kbs(resource) => {
                let kbs = self.kbs.as_ref().ok_or(UriError::NoKbs)?;
                Ok(kbs.get_resource(&resource.to_string())?)
            }
        }
    }

    /// Fetches `uri` and parses it with `parse`.
    fn document<T>(
        &self,
        uri: &str,
        parse: impl FnOnce(&[u8]) -> Result<T, DocumentError>,
    ) -> Result<T, SettingsError> {
        let bytes = self.fetch(uri).map_err(|reason| SettingsError::Uri {
            uri: uri.to_string(),
            reason,
        })?;
        parse(&bytes).map_err(|reason| SettingsError::Document {
            uri: uri.to_string(),
            reason: Box::new(reason),
        })
    }

    /// Fetches and parses everything the settings name (each pull: keys are
    /// not kept in the guest longer than one pull needs them).
    pub fn pull_settings(&self) -> Result<PullSettings, SettingsError> {
        let s = &self.settings;
        let mut pull = PullSettings::default();
        if let Some(uri) = &s.registry_configuration_uri {
            pull.registries = self.document(uri, |b| Ok(RegistriesConf::parse(text(b)?)?))?;
        }
        if let Some(uri) = &s.authenticated_registry_credentials_uri {
            pull.credentials = self.document(uri, |b| Ok(Credentials::parse(b)?))?;
        }
        if let Some(uri) = &s.image_security_policy_uri {
            let resolve =
                |path: &str| -> Result<Vec<u8>, KeyPathError> { Ok(self.fetch(path)?.to_vec()) };
            pull.signature_policy =
                Some(self.document(uri, |b| Ok(SignaturePolicy::from_json_with(b, &resolve)?))?);
        }
        if let Some(uri) = &s.sigstore_config_uri {
            pull.lookaside = self.document(uri, |b| Ok(Lookaside::parse(text(b)?)?))?;
        }
        for uri in &s.image_decryption_key_uris {
            pull.keys.push(self.document(uri, |b| {
                kabuto_jose::TeeKeyPair::from_pem(text(b)?).map_err(DocumentError::Key)
            })?);
        }
        Ok(pull)
    }
}

fn text(bytes: &[u8]) -> Result<&str, DocumentError> {
    std::str::from_utf8(bytes).map_err(|_| DocumentError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn settings_name_only_known_sources() {
        let doc = |cdh: &str| {
            kabuto_initdata::InitData::parse(
                format!(
                    "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cdh.toml\" = '''\n{cdh}\n'''\n\"policy.json\" = '{{\"default\":[{{\"type\":\"reject\"}}]}}'\n"
                )
                .as_bytes(),
            )
            .expect("init-data")
        };
        let ok = doc("[image]\nimage_security_policy_uri = \"initdata:///policy.json\"\n");
        let images = PodImages::new(Some(&ok), None).expect("accepted");
        assert!(images
            .pull_settings()
            .expect("settings")
            .signature_policy
            .is_some());
        for (cdh, needle) in [
            (
                "[image]\nimage_security_policy_uri = \"kbs:///default/p/1\"\n",
                "names no KBS",
            ),
            (
                "[image]\nimage_security_policy_uri = \"initdata:///nope\"\n",
                "nope",
            ),
            (
                "[image]\nimage_security_policy_uri = \"file:///etc/x\"\n",
                "neither",
            ),
            ("[image]\nimage_pull_proxy = \"x\"\n", "image_pull_proxy"),
            (
                "[image]\nimage_security_policy_uri = \"kbs://other.example/default/p/1\"\n",
                "neither",
            ),
            (
                "[image]\nimage_security_policy_uri = \"initdata:///policy.json\"\nimage_decryption_key_uris = [\"kbs:///default/key\"]\n",
                "kbs:///<repository>/<type>/<tag>",
            ),
        ] {
            let e = kabuto_error::chain(&PodImages::new(Some(&doc(cdh)), None).err().expect(cdh));
            assert!(e.contains(needle), "{cdh}: {e}");
        }
    }
}
