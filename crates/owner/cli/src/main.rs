//! `kabuto-owner`: the workload owner's command line. It runs on the owner's
//! machine, never on the host that runs pods: it reads the owner's signing
//! keys and produces what the owner's guests trust (policies, signatures,
//! reference values). Each subcommand parses its arguments, calls the library
//! and reports; exit code 0 on success, 1 on failure, 2 on bad usage.

mod attest;
mod genpolicy;
mod image;
mod secret;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kabuto-owner",
    version,
    about = "Confidential pods: the workload owner's tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a pod's policy and init-data annotation from its manifest.
    Genpolicy(genpolicy::GenPolicyArgs),
    /// Image tools: cosign-format signing, inspection.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Sealed secrets (CoCo's format): signing keys, sealing, unsealing.
    Secret {
        #[command(subcommand)]
        command: secret::SecretCommand,
    },
    /// Attestation tools.
    Attest {
        #[command(subcommand)]
        command: AttestCommand,
    },
}

#[derive(Subcommand)]
enum AttestCommand {
    /// Verify SNP/TDX evidence offline; prints the verified claims as JSON,
    /// or names the failed check and exits 1.
    Verify(attest::VerifyArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Genpolicy(args) => genpolicy::run(&args),
        Command::Image { command } => image::run(&command),
        Command::Secret { command } => secret::run(&command),
        Command::Attest {
            command: AttestCommand::Verify(args),
        } => attest::verify(&args),
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("kabuto-owner: {e:#}");
        std::process::exit(1);
    }
}
