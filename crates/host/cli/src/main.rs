//! `kabuto`: the host command line. Each subcommand parses its arguments,
//! calls the library and reports; exit code 0 on success, 1 on failure,
//! 2 on bad usage. The owner's tools (genpolicy, image signing, evidence
//! verification) are `kabuto-owner` (crates/owner/cli): nothing here links
//! them or reads an owner's key.

mod check;
mod exec;
mod install;
mod sandboxes;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kabuto_runtime::{config::Config, guest_image};

#[derive(Parser)]
#[command(name = "kabuto", version, about = "Pods in micro-VMs: host tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Guest image tools.
    Guest {
        #[command(subcommand)]
        command: GuestCommand,
    },
    /// Install the shim, guest image and default config.
    Install(install::InstallArgs),
    /// Remove exactly what `kabuto install` installed.
    Uninstall(install::UninstallArgs),
    /// Check whether this host can run kabuto, with a fix for each problem.
    Check,
    /// Print the effective configuration.
    Env,
    /// Moved to `kabuto-owner` (the owner's machine, not the host).
    #[command(hide = true)]
    Attest(MovedArgs),
    /// Moved to `kabuto-owner`.
    #[command(hide = true)]
    Genpolicy(MovedArgs),
    /// Moved to `kabuto-owner`.
    #[command(hide = true)]
    Image(MovedArgs),
    /// The sandboxes on this host; removal of orphaned ones (a shim that
    /// died, or lost its containerd).
    Sandbox {
        #[command(subcommand)]
        command: sandboxes::SandboxCommand,
    },
    /// Open the debug shell of a running pod (needs hypervisor.debug_console).
    Exec {
        /// The pod (sandbox) id.
        pod: String,
        /// Its containerd namespace (default: the only one with that pod).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

/// The arguments of a subcommand that moved to `kabuto-owner`, kept so the
/// refusal can say where it went.
#[derive(clap::Args)]
struct MovedArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

fn moved(command: &str) -> anyhow::Result<()> {
    anyhow::bail!(
        "`kabuto {command}` is an owner tool and moved to `kabuto-owner {command}` \
         (crates/owner/cli): it runs on the workload owner's machine, not on the host"
    )
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Fetch the pinned kernel (apt-get download), build the initramfs, print the digests.
    Build {
        /// Where to write vmlinux, initramfs.cpio and manifest.json.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The guest agent binary (default: kabuto-agent beside this binary).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// The statically linked pause of confidential pods (default:
        /// kabuto-pause-static beside this binary, which scripts/setup.sh builds).
        #[arg(long)]
        pause: Option<PathBuf>,
        /// Use this kernel .deb instead of fetching it with apt (must match the pin).
        #[arg(long)]
        kernel_deb: Option<PathBuf>,
        /// Add a static busybox for the debug console (`kabuto exec`). Makes a
        /// debug image: never use it for confidential pods.
        #[arg(long)]
        debug_console: bool,
    },
    /// Print the launch measurement a guest of the effective config
    /// reports, without booting it (register it as the KBS reference value
    /// `measurement`): for `tee = "snp"` the SNP MEASUREMENT of the
    /// firmware, kernel-hashes and VMSAs; for `software` the software TEE's.
    /// TDX is not computed (its MRTD depends on the TDVF build: take it from
    /// a first launch's quote).
    Measure,
}

/// `target/release/kabuto` → `target/release`.
fn exe_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the kabuto binary")?;
    Ok(exe
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".")))
}

/// Default guest build output: `target/guest` for `target/release/kabuto`.
fn default_guest_out() -> anyhow::Result<PathBuf> {
    let dir = exe_dir()?;
    Ok(dir.parent().map(|p| p.join("guest")).unwrap_or(dir))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Guest {
            command:
                GuestCommand::Build {
                    out,
                    agent,
                    pause,
                    kernel_deb,
                    debug_console,
                },
        } => {
            let inputs = guest_image::BuildInputs {
                agent: match agent {
                    Some(a) => a,
                    None => exe_dir()?.join("kabuto-agent"),
                },
                pause: match pause {
                    Some(p) => p,
                    None => exe_dir()?.join("kabuto-pause-static"),
                },
                out_dir: match out {
                    Some(o) => o,
                    None => default_guest_out()?,
                },
                kernel_deb,
                debug_shell: debug_console.then(|| PathBuf::from("/bin/busybox")),
            };
            let image = guest_image::build(&inputs)?;
            guest_image::describe(&image, std::io::stdout())?;
            Ok(())
        }
        Command::Guest {
            command: GuestCommand::Measure,
        } => measure(&Config::load()?),
        Command::Install(args) => install::install(&args, &exe_dir()?, &default_guest_out()?),
        Command::Uninstall(args) => install::uninstall(&args),
        Command::Check => {
            let config = Config::load()?;
            if check::run(&config, &mut std::io::stdout())? {
                Ok(())
            } else {
                anyhow::bail!("this host cannot run kabuto yet (see the fixes above)")
            }
        }
        Command::Env => print_env(&Config::load()?),
        Command::Attest(_) => moved("attest"),
        Command::Genpolicy(_) => moved("genpolicy"),
        Command::Image(_) => moved("image"),
        Command::Sandbox { command } => sandboxes::run(&Config::load()?, command),
        Command::Exec { pod, namespace } => {
            let config = Config::load()?;
            if !config.hypervisor.debug_console {
                anyhow::bail!(
                    "the debug console is off (hypervisor.debug_console = false in the config); \
                     enable it and restart pod {pod} to use `kabuto exec`"
                );
            }
            exec::run(&config, &pod, namespace.as_deref())
        }
    }
}

/// `kabuto guest measure`: the launch measurement of this config's pods.
fn measure(config: &Config) -> anyhow::Result<()> {
    use kabuto_runtime::config::TeeKind;
    let m = match config.confidential.tee {
        TeeKind::Snp => kabuto_runtime::sandbox::snp_launch_measurement(config)?,
        TeeKind::Software | TeeKind::None => {
            kabuto_runtime::sandbox::software_tee_measurement(config)?
        }
        TeeKind::Sample => {
            anyhow::bail!("tee = \"sample\" has no launch measurement: there is no TEE")
        }
        TeeKind::Tdx => anyhow::bail!(
            "TDX: MRTD depends on the TDVF build and is not computed here; \
             register the MRTD and RTMR0-3 of a first launch's quote \
             (kabuto-owner attest verify --tee tdx prints them)"
        ),
    };
    println!("{}", hex_lower(&m));
    Ok(())
}

/// `kabuto env`: the effective configuration and where it came from.
fn print_env(config: &Config) -> anyhow::Result<()> {
    let source = std::env::var(kabuto_runtime::config::CONFIG_PATH_ENV).unwrap_or_else(|_| {
        if std::path::Path::new(kabuto_runtime::config::DEFAULT_CONFIG_PATH).exists() {
            kabuto_runtime::config::DEFAULT_CONFIG_PATH.into()
        } else {
            "built-in defaults".into()
        }
    });
    println!("# effective configuration (from {source})");
    print!("{}", toml::to_string_pretty(config)?);
    Ok(())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("kabuto: {e:#}");
        std::process::exit(1);
    }
}
