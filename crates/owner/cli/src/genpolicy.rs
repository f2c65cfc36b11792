//! `kabuto-owner genpolicy`: a pod manifest in, the same manifest with each pod's
//! init-data annotation (its generated policy) out.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context;
use clap::Args;
use kabuto_genpolicy::{Resolver, Settings};

#[derive(Args)]
pub struct GenPolicyArgs {
    /// Kubernetes manifest (Pod, Deployment, StatefulSet, DaemonSet,
    /// ReplicaSet, Job, CronJob; several documents allowed).
    manifest: Option<PathBuf>,
    /// Settings (JSON) over the built-in defaults; see --print-settings.
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Write the annotated manifest here instead of stdout.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Print each pod's Rego policy (the manifest then goes only to -o).
    #[arg(long)]
    raw_out: bool,
    /// A local OCI image layout searched before registries (repeatable).
    #[arg(long = "oci-layout")]
    oci_layouts: Vec<PathBuf>,
    /// A registry reached over plain HTTP, `host:port` (repeatable).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Never contact a registry: every image must be in an OCI layout.
    #[arg(long)]
    offline: bool,
    /// Print the built-in settings as JSON and exit.
    #[arg(long)]
    print_settings: bool,
}

pub fn run(args: &GenPolicyArgs) -> anyhow::Result<()> {
    if args.print_settings {
        writeln!(std::io::stdout(), "{}", Settings::default_json()).context("writing to stdout")?;
        return Ok(());
    }
    let manifest_path = args
        .manifest
        .as_ref()
        .context("no manifest given (kabuto-owner genpolicy POD.yaml)")?;
    let manifest = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let settings = match &args.settings {
        Some(path) => Settings::from_json(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?,
        None => Settings::default(),
    };
    let mut layouts: Vec<PathBuf> = settings.oci_layouts.iter().map(PathBuf::from).collect();
    layouts.extend(args.oci_layouts.iter().cloned());
    let mut insecure = settings.insecure_registries.clone();
    insecure.extend(args.insecure_registries.iter().cloned());
    let mut resolver = if args.offline {
        Resolver::offline(layouts)
    } else {
        Resolver::new(layouts, insecure)
    };
    let generated = kabuto_genpolicy::generate(&manifest, &settings, &mut resolver)?;
    for pod in &generated.pods {
        eprintln!(
            "kabuto-owner genpolicy: {}: init-data {} digest {}",
            pod.source,
            settings.algorithm,
            hex::encode(pod.init_data.digest())
        );
    }
    // Written, not print!ed: a closed pipe (`| head`) is an error, not a panic.
    let mut stdout = std::io::stdout().lock();
    if args.raw_out {
        for pod in &generated.pods {
            writeln!(stdout, "# {}\n{}", pod.source, pod.rego).context("writing to stdout")?;
        }
    }
    match &args.output {
        Some(path) => std::fs::write(path, &generated.manifest)
            .with_context(|| format!("writing {}", path.display()))?,
        None if !args.raw_out => stdout
            .write_all(generated.manifest.as_bytes())
            .context("writing to stdout")?,
        None => {}
    }
    Ok(())
}
