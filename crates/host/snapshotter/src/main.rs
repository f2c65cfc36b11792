//! `kabuto-snapshotter [--config FILE]`: serves the snapshots API on
//! `snapshotter.address` for containerd's `proxy_plugins`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use containerd_snapshots::tonic::transport::Server;
use kabuto_snapshotter::{GuestPullPolicy, KabutoSnapshotter};

#[derive(Parser)]
#[command(about = "containerd proxy snapshotter: overlay, except images the guest pulls")]
struct Args {
    /// kabuto's config file (its [snapshotter] section); default as the
    /// shim's: KABUTO_CONFIG_PATH, then /etc/kabuto/config.toml.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => kabuto_runtime::config::Config::from_file(path)?,
        None => kabuto_runtime::config::Config::load()?,
    }
    .snapshotter;
    let policy = GuestPullPolicy::new(
        config.guest_pull_images.clone(),
        config.guest_pull_encrypted,
        &config.containerd_root,
    );
    let snapshotter = KabutoSnapshotter::open(&config.root, policy)
        .with_context(|| format!("opening {}", config.root.display()))?;
    if let Some(dir) = config.address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&config.address) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", config.address.display()))
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&config.address)
        .with_context(|| format!("binding {}", config.address.display()))?;
    log::info!(
        "serving on {} (root {}; guest pulls: {:?}{})",
        config.address.display(),
        config.root.display(),
        config.guest_pull_images,
        if config.guest_pull_encrypted {
            " and encrypted images"
        } else {
            ""
        }
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(snapshotter)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("serving")?;
    let _ = std::fs::remove_file(&config.address);
    Ok(())
}
