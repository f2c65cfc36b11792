//! Where GPG signatures are read from: `registries.d` lookaside stores.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::policy::namespaces;
use crate::registry::ImageReference;

#[derive(Debug, thiserror::Error)]
pub enum LookasideError {
    #[error("registries.d configuration")]
    Yaml(#[source] serde_yaml::Error),
    #[error("lookaside {0:?}: the guest reads only http(s) lookaside stores")]
    Scheme(String),
}

/// Where GPG ("simple signing") signatures are read from: the lookaside
/// stores of a `registries.d` configuration (YAML: `default-docker` and
/// `docker: {<scope>: …}` with `lookaside`, or the older `sigstore`). A
/// signature of `registry/repo` at `sha256:<hex>` is at
/// `<lookaside>/repo@sha256=<hex>/signature-<n>`, n = 1, 2, …
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Lookaside {
    #[serde(default, rename = "default-docker")]
    default_docker: Option<LookasideEntry>,
    #[serde(default)]
    docker: BTreeMap<String, LookasideEntry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct LookasideEntry {
    #[serde(default)]
    lookaside: Option<String>,
    #[serde(default)]
    sigstore: Option<String>,
}

impl LookasideEntry {
    fn url(&self) -> Option<&str> {
        self.lookaside.as_deref().or(self.sigstore.as_deref())
    }
}

impl Lookaside {
    pub fn parse(yaml: &str) -> Result<Lookaside, LookasideError> {
        let parsed: Lookaside = serde_yaml::from_str(yaml).map_err(LookasideError::Yaml)?;
        for url in parsed
            .default_docker
            .iter()
            .chain(parsed.docker.values())
            .filter_map(LookasideEntry::url)
        {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(LookasideError::Scheme(url.to_string()));
            }
        }
        Ok(parsed)
    }

    /// The lookaside base URL for `image`: its most specific scope.
    pub(super) fn url_for(&self, image: &ImageReference) -> Option<&str> {
        namespaces(&format!("{}/{}", image.registry, image.repository))
            .iter()
            .find_map(|scope| self.docker.get(scope).and_then(LookasideEntry::url))
            .or_else(|| self.default_docker.as_ref().and_then(LookasideEntry::url))
    }
}
