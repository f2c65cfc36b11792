//! `kabuto-owner image`: the image owner's tools. `sign` makes cosign-format
//! signatures (Debian's skopeo has sigstore signing disabled and cosign is
//! not packaged); `inspect` shows what a guest pull will see. Images are
//! encrypted with skopeo (`--encryption-key jwe:…`), which guests decrypt.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use kabuto_image::{signature::CosignSignatureImage, Credentials, ImageReference, RegistryClient};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Sign an image's linux/amd64 manifest in cosign's format (ECDSA P-256,
    /// simple-signing payload) and push the signature to the image's
    /// repository at tag sha256-<hex>.sig.
    Sign(SignArgs),
    /// Print an image's manifest digest, layers (encrypted or not, with
    /// their recipients' count) and whether a cosign signature exists.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct RegistryArgs {
    /// A registry reached over plain HTTP, `host:port` (repeatable).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Registry credentials (auth.json / Docker config.json format).
    #[arg(long)]
    authfile: Option<PathBuf>,
}

#[derive(Args)]
pub struct SignArgs {
    /// The signing key: a P-256 private key, PEM (PKCS#8 or SEC1).
    #[arg(long)]
    key: PathBuf,
    /// The identity to sign (default: the image's repository, as cosign does).
    #[arg(long)]
    identity: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// The image, `registry/repository:tag` or `@sha256:…`.
    image: String,
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    image: String,
}

fn client(args: &RegistryArgs, image: &ImageReference) -> anyhow::Result<RegistryClient> {
    let credentials = match &args.authfile {
        Some(path) => Credentials::parse(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?,
        None => Credentials::default(),
    };
    Ok(RegistryClient::new(
        args.insecure_registries.clone(),
        credentials.for_registry(&image.registry),
    ))
}

pub fn run(command: &ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Sign(args) => sign(args),
        ImageCommand::Inspect(args) => inspect(args),
    }
}

fn sign(args: &SignArgs) -> anyhow::Result<()> {
    let pem = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let key = kabuto_image::signature::signing_key_from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: {}", args.key.display(), kabuto_error::chain(&e)))?;
    let image = ImageReference::parse(&args.image)?;
    let mut client = client(&args.registry, &image)?;
    // What the reference names (an index for multi-platform images), as
    // cosign signs and the guest verifies.
    let digest = client.resolve(&image)?.top_digest;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}/{}", image.registry, image.repository));
    let tag =
        CosignSignatureImage::new(&identity, &digest, &key).push(&image, &digest, &mut client)?;
    writeln!(
        std::io::stdout(),
        "signed {identity}@{digest}: {}/{}:{tag}",
        image.registry,
        image.repository
    )
    .context("writing to stdout")?;
    Ok(())
}

/// Recipients of ocicrypt's JWE annotation: comma-separated base64 JWEs,
/// each flattened (one recipient) or general (`recipients`).
fn jwe_recipients(annotation: &str) -> usize {
    use base64::Engine as _;
    annotation
        .split(',')
        .map(|part| {
            base64::engine::general_purpose::STANDARD
                .decode(part.trim())
                .ok()
                .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
                .map_or(0, |jwe| jwe["recipients"].as_array().map_or(1, Vec::len))
        })
        .sum()
}

fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let image = ImageReference::parse(&args.image)?;
    let mut client = client(&args.registry, &image)?;
    let resolved = client.resolve(&image)?;
    let (digest, manifest) = (&resolved.top_digest, &resolved.manifest);
    let layers: Vec<serde_json::Value> = manifest["layers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|layer| {
            let descriptor: kabuto_image::LayerDescriptor =
                serde_json::from_value(layer.clone()).unwrap_or_default();
            let recipients = layer["annotations"]["org.opencontainers.image.enc.keys.jwe"]
                .as_str()
                .map(jwe_recipients);
            serde_json::json!({
                "digest": layer["digest"],
                "size": layer["size"],
                "mediaType": layer["mediaType"],
                "encrypted": descriptor.is_encrypted(),
                "jwe_recipients": recipients,
            })
        })
        .collect();
    let signature = ImageReference {
        reference: kabuto_image::signature::signature_tag(digest),
        ..image.clone()
    };
    let signed = client.manifest(&signature).is_ok();
    let report = serde_json::json!({
        "image": format!("{}/{}", image.registry, image.repository),
        "manifest_digest": digest,
        "platform_manifest_digest": resolved.digest,
        "config_digest": manifest["config"]["digest"],
        "layers": layers,
        "cosign_signature": signed.then(|| signature.reference.clone()),
    });
    writeln!(
        std::io::stdout(),
        "{}",
        serde_json::to_string_pretty(&report).context("encoding")?
    )
    .context("writing to stdout")?;
    Ok(())
}
