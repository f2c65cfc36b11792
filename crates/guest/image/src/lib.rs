//! The guest's side of confidential images: a registry client
//! ([`registry`]), signature policies ([`signature`]), layers encrypted in
//! ocicrypt's format ([`ocicrypt`]), unpacking without writing outside the
//! root ([`unpack`]), and one pull put together from them ([`pull`]).

pub mod ocicrypt;
pub mod pull;
pub mod registry;
pub mod signature;
pub mod unpack;

pub use ocicrypt::{decrypt_layer, DecryptError, KeyProvider, LayerDescriptor};
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

/// `sha256:<hex>`, the OCI digest of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod unpack_tests;
