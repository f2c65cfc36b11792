//! The guest's side of confidential images: a registry client
//! ([`registry`]), signature policies ([`signature`]), layers encrypted in
//! ocicrypt's format ([`ocicrypt`]), unpacking without writing outside the
//! root ([`unpack`]), and one pull put together from them ([`pull`]).

pub mod ocicrypt;
pub mod pull;
pub mod registry;
pub mod signature;
pub mod unpack;

pub use ocicrypt::{decrypt_layer, DecryptError, KeyOpenError, LayerDescriptor};
pub use pull::{
    pull_and_unpack, Credentials, ImageConfig, PullError, PullSettings, PulledRootfs,
    RegistriesConf,
};
pub use registry::{
    ImageReference, PlainLayer, PulledImage, RegistryClient, RegistryError, ResolvedManifest,
};
pub use signature::{SignatureError, SignaturePolicy};
pub use unpack::{
    into_new_root, unpack_layer, unpack_layers, Compression, Layer, UnpackError, UnpackOptions,
};

/// Parse errors of documents that may hold secrets (fetched from the KBS:
/// credentials, registry and signature settings, key material) say where
/// the document is wrong, never what it says: serde's messages quote the
/// offending value, and errors reach the host (agent responses, console).
pub(crate) mod redact {
    /// serde's message, kept when it names only schema (a key that is
    /// unknown or missing), else just its kind: values are never shown.
    fn what(message: &str, fallback: &str) -> String {
        let message = message.split(" at line ").next().unwrap_or_default();
        if message.starts_with("unknown field") || message.starts_with("missing field") {
            return message.to_string();
        }
        for kind in [
            "unknown variant",
            "invalid type",
            "invalid value",
            "invalid length",
        ] {
            if message.starts_with(kind) {
                return format!("{kind} (value not shown)");
            }
        }
        fallback.to_string()
    }

    pub fn json(e: &serde_json::Error) -> String {
        let kind = match e.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "not valid JSON",
            serde_json::error::Category::Data => "a value of the wrong type",
            serde_json::error::Category::Eof => "truncated JSON",
        };
        let what = what(&e.to_string(), kind);
        format!("{what} at line {} column {}", e.line(), e.column())
    }

    pub fn toml(text: &str, e: &toml::de::Error) -> String {
        let what = what(e.message(), "invalid TOML");
        match e.span() {
            Some(span) => {
                let before = &text.as_bytes()[..span.start.min(text.len())];
                let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
                format!("{what} at line {line} column {column}")
            }
            None => what,
        }
    }
}

/// `sha256:<hex>`, the OCI digest of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod unpack_tests;
