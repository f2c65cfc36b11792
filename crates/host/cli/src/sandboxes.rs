//! `kabuto sandbox list` and `kabuto sandbox remove`: the sandboxes on this
//! host and the removal of orphans — sandboxes whose shim died without its
//! cleanup, or whose shim lost its containerd (a shim keeps its pods when
//! containerd goes away, in case it comes back).
//!
//! They look in the state directory of the effective config
//! (`/etc/kabuto/config.toml`, or `KABUTO_CONFIG_PATH`): sandboxes of a
//! runtime class with another config file (another `runtime.state_dir`)
//! are found by running them with `KABUTO_CONFIG_PATH` set to that file.

use kabuto_runtime::{config::Config, inventory};

#[derive(clap::Subcommand)]
pub enum SandboxCommand {
    /// List the sandboxes with a state directory, and whether each is
    /// running under containerd or orphaned.
    List,
    /// Remove a sandbox completely (shim, VM, helpers, mounts, state).
    /// Refuses one that its containerd still manages unless --force.
    Remove {
        /// The sandbox (pod) id; omit it with --orphans.
        #[arg(required_unless_present = "orphans", conflicts_with = "orphans")]
        id: Option<String>,
        /// Its containerd namespace (default: the only one with that id).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Also tear down a sandbox whose containerd still answers.
        #[arg(long)]
        force: bool,
        /// Remove every orphaned sandbox.
        #[arg(long)]
        orphans: bool,
    },
}

pub fn run(config: &Config, command: SandboxCommand) -> anyhow::Result<()> {
    match command {
        SandboxCommand::List => {
            println!(
                "{:<16} {:<24} {:>8} {:>8}  STATE",
                "NAMESPACE", "ID", "SHIM", "VM"
            );
            for e in inventory::list(config) {
                let pid = |p: Option<u32>| p.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{:<16} {:<24} {:>8} {:>8}  {}",
                    e.namespace,
                    e.id,
                    pid(e.owner.as_ref().map(|o| o.pid)),
                    pid(e.vm_pid),
                    e.state
                );
            }
            Ok(())
        }
        SandboxCommand::Remove {
            id: Some(id),
            namespace,
            force,
            orphans: false,
        } => {
            let entry = inventory::find(config, namespace.as_deref(), &id)?;
            inventory::remove(config, &entry, force)?;
            println!(
                "removed sandbox {}/{} ({})",
                entry.namespace, entry.id, entry.state
            );
            Ok(())
        }
        SandboxCommand::Remove { .. } => {
            let mut failed = 0;
            for entry in inventory::list(config)
                .into_iter()
                .filter(|e| e.state.is_orphan())
            {
                match inventory::remove(config, &entry, false) {
                    Ok(()) => println!(
                        "removed sandbox {}/{} ({})",
                        entry.namespace, entry.id, entry.state
                    ),
                    Err(e) => {
                        eprintln!("kabuto: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} orphaned sandbox(es) could not be removed");
            }
            Ok(())
        }
    }
}
