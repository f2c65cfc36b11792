//! `kabuto-kbs`: run the Key Broker Service, or administer one.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kabuto-kbs", about = "kabuto Key Broker Service (owner side)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the KBS.
    Serve {
        #[arg(long, default_value = "/etc/kabuto/kbs/config.toml")]
        config: PathBuf,
    },
    /// Print a commented example configuration.
    ExampleConfig,
    /// Administer a running KBS.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(clap::Args)]
struct Connection {
    /// KBS base URL, e.g. https://kbs.example:8443
    #[arg(long)]
    url: String,
    /// Admin private key (ES256 PEM).
    #[arg(long)]
    key: PathBuf,
    /// Trust this CA/certificate (PEM) for the KBS's TLS instead of system roots.
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Generate an admin key pair (private key mode 0600).
    Keygen {
        #[arg(long)]
        private: PathBuf,
        #[arg(long)]
        public: PathBuf,
    },
    /// Print a single-use admin token (for curl) valid for --ttl seconds
    /// (at most 3600).
    Token {
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value_t = 300)]
        ttl: u64,
    },
    /// Store a resource at <repository>/<type>/<tag> from FILE.
    SetResource {
        #[command(flatten)]
        conn: Connection,
        path: String,
        file: PathBuf,
    },
    /// Replace the attestation (appraisal) policy with a Rego file.
    SetAttestationPolicy {
        #[command(flatten)]
        conn: Connection,
        file: PathBuf,
    },
    /// Replace the resource policy with a Rego file.
    SetResourcePolicy {
        #[command(flatten)]
        conn: Connection,
        file: PathBuf,
    },
    /// Set the reference values NAME to a JSON array, e.g. '["ab12…"]'.
    SetReferenceValues {
        #[command(flatten)]
        conn: Connection,
        name: String,
        values: String,
    },
    /// Trust software-TEE roots (PEM bundle). INSECURE: testing only.
    TrustSoftwareTee {
        #[command(flatten)]
        conn: Connection,
        file: PathBuf,
    },
}

fn client(conn: &Connection) -> anyhow::Result<kabuto_kbs::client::AdminClient> {
    let key =
        std::fs::read(&conn.key).with_context(|| format!("reading {}", conn.key.display()))?;
    let ca = match &conn.ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    Ok(kabuto_kbs::client::AdminClient::new(
        &conn.url,
        key,
        ca.as_deref(),
    )?)
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("kabuto-kbs: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = kabuto_kbs::config::Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            Ok(runtime.block_on(kabuto_kbs::serve(config))?)
        }
        Command::ExampleConfig => {
            print!("{}", kabuto_kbs::config::EXAMPLE_TOML);
            Ok(())
        }
        Command::Admin { command } => admin(command),
    }
}

fn admin(command: AdminCommand) -> anyhow::Result<()> {
    let out = match command {
        AdminCommand::Keygen { private, public } => {
            let (private_pem, public_pem) = kabuto_kbs::client::generate_admin_key()?;
            kabuto_kbs::token::write_private(&private, private_pem.as_bytes())
                .with_context(|| format!("writing {}", private.display()))?;
            std::fs::write(&public, public_pem)
                .with_context(|| format!("writing {}", public.display()))?;
            format!("wrote {} and {}", private.display(), public.display())
        }
        AdminCommand::Token { key, ttl } => kabuto_kbs::client::admin_token(
            &read(&key)?,
            "kabuto-kbs-admin",
            Duration::from_secs(ttl),
        )?,
        AdminCommand::SetResource { conn, path, file } => {
            client(&conn)?.set_resource(&path, &read(&file)?)?
        }
        AdminCommand::SetAttestationPolicy { conn, file } => client(&conn)?
            .set_attestation_policy(
                &String::from_utf8(read(&file)?).context("policy is not UTF-8")?,
            )?,
        AdminCommand::SetResourcePolicy { conn, file } => client(&conn)?.set_resource_policy(
            &String::from_utf8(read(&file)?).context("policy is not UTF-8")?,
        )?,
        AdminCommand::SetReferenceValues { conn, name, values } => {
            let values: serde_json::Value =
                serde_json::from_str(&values).context("values must be a JSON array")?;
            client(&conn)?.set_reference_values(&name, &values)?
        }
        AdminCommand::TrustSoftwareTee { conn, file } => {
            client(&conn)?.set_software_tee_roots(&read(&file)?)?
        }
    };
    println!("{out}");
    Ok(())
}
