//! The guest's side of confidential images. So far: decrypting layers
//! encrypted in ocicrypt's format ([`ocicrypt`]) and unpacking layers into
//! a root filesystem without writing outside it ([`unpack`]).

pub mod ocicrypt;
pub mod registry;
pub mod signature;
pub mod unpack;

pub use ocicrypt::{decrypt_layer, DecryptError, KeyProvider, LayerDescriptor};
pub use registry::{ImageReference, PlainLayer, PulledImage, RegistryClient, RegistryError};
pub use signature::{SignatureError, SignaturePolicy};
pub use unpack::{unpack_layers, Compression, Layer, UnpackError, UnpackOptions};

/// `sha256:<hex>`, the OCI digest of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod unpack_tests;
