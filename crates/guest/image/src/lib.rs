//! The guest's side of confidential images. So far: decrypting layers
//! encrypted in ocicrypt's format ([`ocicrypt`]).

pub mod ocicrypt;

pub use ocicrypt::{decrypt_layer, DecryptError, KeyProvider, LayerDescriptor};

#[cfg(test)]
mod tests;
