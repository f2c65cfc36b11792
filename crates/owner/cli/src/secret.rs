//! `kabuto-owner secret`: sealed secrets in CoCo's format. `keygen` makes
//! the P-256 signing key pair (the public JWK goes to the KBS, at the
//! resource the `kid` names); `seal vault|envelope` prints the `sealed.…`
//! string to put in a pod's env or Secret; `unseal` opens one with the
//! owner's keys and resources (what a guest does with the KBS's).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kabuto_sealed_secret::{PrivateSigningKey, PublicSigningKey, SealedSecret, Secret};
use zeroize::Zeroizing;

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Make a signing key pair: <OUTPUT_DIR>/<name>-private.json (keep it)
    /// and <name>-public.json (store it in the KBS at the kid).
    Keygen(KeygenArgs),
    /// Seal a secret; prints the sealed.… string.
    Seal {
        #[command(subcommand)]
        kind: SealKind,
    },
    /// Verify and open a sealed secret with the owner's keys; prints the
    /// plaintext.
    Unseal(UnsealArgs),
}

#[derive(Args)]
pub struct KeygenArgs {
    /// The key's id as sealed secrets name it: a KBS resource
    /// (kbs:///repository/type/tag) where guests find the public key.
    #[arg(long)]
    kid: String,
    /// Where the two JWK files go.
    #[arg(long, default_value = ".")]
    output_dir: PathBuf,
}

#[derive(Args)]
pub struct SigningArgs {
    /// The private signing JWK (from `keygen`); its kid signs.
    #[arg(long)]
    signing_key: PathBuf,
}

#[derive(Subcommand)]
pub enum SealKind {
    /// The plaintext is a KBS resource; the sealed secret names it.
    Vault {
        /// The resource holding the plaintext, kbs:///repository/type/tag.
        #[arg(long)]
        resource_uri: String,
        #[command(flatten)]
        signing: SigningArgs,
    },
    /// The plaintext travels in the sealed secret, encrypted under a data
    /// key that the key-encryption key (a KBS resource) wraps.
    Envelope {
        /// The KBS resource holding the key-encryption key (32 bytes).
        #[arg(long)]
        kek: String,
        /// The key-encryption key's 32 bytes (what is stored at --kek).
        #[arg(long)]
        kek_file: PathBuf,
        #[command(flatten)]
        signing: SigningArgs,
        /// The plaintext's file, or - for stdin.
        file: PathBuf,
    },
}

#[derive(Args)]
pub struct UnsealArgs {
    /// The public (or private) signing JWK the secret must verify with.
    #[arg(long)]
    verify_key: PathBuf,
    /// A KBS resource's content: kbs:///repository/type/tag=FILE
    /// (repeatable; the vault's plaintext or the envelope's KEK).
    #[arg(long = "resource", value_name = "URI=FILE")]
    resources: Vec<String>,
    /// The sealed secret's file, or - for stdin.
    file: PathBuf,
}

fn read_input(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut data = Zeroizing::new(Vec::new());
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut data)
            .context("reading stdin")?;
    } else {
        *data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(data)
}

/// The private key and its kid (from the JWK).
fn signing_key(path: &Path) -> anyhow::Result<(PrivateSigningKey, String)> {
    let json = read_input(path)?;
    let key = PrivateSigningKey::from_jwk(&json)
        .with_context(|| format!("signing key {}", path.display()))?;
    let kid = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| v.get("kid")?.as_str().map(str::to_string))
        .filter(|kid| !kid.is_empty())
        .with_context(|| format!("signing key {}: the JWK has no kid", path.display()))?;
    Ok((key, kid))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(command: &SecretCommand) -> anyhow::Result<()> {
    match command {
        SecretCommand::Keygen(args) => keygen(args),
        SecretCommand::Seal { kind } => {
            println!("{}", seal(kind)?);
            Ok(())
        }
        SecretCommand::Unseal(args) => unseal(args),
    }
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    let uri: kabuto_kbs_protocol::ResourceUri = args
        .kid
        .parse()
        .with_context(|| format!("--kid {}", args.kid))?;
    let key = PrivateSigningKey::generate();
    let private = args.output_dir.join(format!("{}-private.json", uri.tag));
    let public = args.output_dir.join(format!("{}-public.json", uri.tag));
    write_new(&private, key.to_jwk(&args.kid).as_bytes(), 0o600)?;
    write_new(&public, key.public().to_jwk(&args.kid).as_bytes(), 0o644)?;
    println!("{}", private.display());
    println!("{}", public.display());
    Ok(())
}

fn seal(kind: &SealKind) -> anyhow::Result<String> {
    Ok(match kind {
        SealKind::Vault {
            resource_uri,
            signing,
        } => {
            let (key, kid) = signing_key(&signing.signing_key)?;
            key.seal(&Secret::vault(resource_uri)?, &kid)
        }
        SealKind::Envelope {
            kek,
            kek_file,
            signing,
            file,
        } => {
            let (key, kid) = signing_key(&signing.signing_key)?;
            let kek_bytes = read_input(kek_file)?;
            let plaintext = read_input(file)?;
            key.seal(&Secret::envelope(kek, &kek_bytes, &plaintext)?, &kid)
        }
    })
}

fn unseal(args: &UnsealArgs) -> anyhow::Result<()> {
    let key = PublicSigningKey::from_jwk(&read_input(&args.verify_key)?)
        .with_context(|| format!("verify key {}", args.verify_key.display()))?;
    let text = read_input(&args.file)?;
    let text = std::str::from_utf8(&text).context("the sealed secret is not UTF-8")?;
    let secret = SealedSecret::parse(text)?.verify(&key)?;
    let mut resources = Vec::new();
    for resource in &args.resources {
        let Some((uri, path)) = resource.split_once('=') else {
            bail!("--resource {resource}: expected kbs:///repository/type/tag=FILE");
        };
        resources.push((uri.to_string(), PathBuf::from(path)));
    }
    let plaintext = secret.unseal(|uri| {
        let wanted = uri.to_string();
        let path = resources
            .iter()
            .find(|(at, _)| *at == wanted)
            .map(|(_, path)| path)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no --resource {wanted}=FILE given"),
                )
            })?;
        std::fs::read(path).map(Zeroizing::new)
    })?;
    std::io::stdout()
        .write_all(&plaintext)
        .context("writing the plaintext")
}
