//! Uploads: blobs and manifests (for `kabuto-owner image sign` and tests;
//! the guest only reads).

use super::{HttpError, ImageReference, RegistryClient, RegistryError};

impl RegistryClient {
    /// Uploads `data` as a blob of `image`'s repository (monolithic
    /// upload: POST, then PUT with the digest); returns its digest.
    pub fn push_blob(
        &mut self,
        image: &ImageReference,
        data: &[u8],
    ) -> Result<String, RegistryError> {
        let digest = crate::sha256_digest(data);
        let start = self.url(image, "blobs/uploads/");
        let response = self.send(
            image,
            "POST",
            &start,
            "*/*",
            Some(("application/octet-stream", &[])),
            None,
        )?;
        let location = response
            .header("Location")
            .ok_or_else(|| RegistryError::Http {
                url: start.clone(),
                reason: HttpError::NoLocation,
            })?
            .to_string();
        let location = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else {
            // Relative to the registry's root.
            let root = start.split("/v2/").next().unwrap_or_default();
            format!("{root}{location}")
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={digest}");
        self.send(
            image,
            "PUT",
            &put,
            "*/*",
            Some(("application/octet-stream", data)),
            None,
        )?;
        Ok(digest)
    }

    /// Uploads a manifest under `tag`; returns its digest.
    pub fn push_manifest(
        &mut self,
        image: &ImageReference,
        tag: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> Result<String, RegistryError> {
        let url = self.url(image, &format!("manifests/{tag}"));
        self.send(
            image,
            "PUT",
            &url,
            "*/*",
            Some((media_type, manifest)),
            None,
        )?;
        Ok(crate::sha256_digest(manifest))
    }
}
