//! Guest pull: a container whose `CreateContainerRequest` carries an
//! `image_guest_pull` storage gets a rootfs the agent pulled, verified,
//! decrypted and unpacked itself, on a tmpfs of its own. Where to pull from,
//! which signatures to require and which keys open the layers come from the
//! pod's owner (init-data `cdh.toml`, resources behind `kbs:///` URIs),
//! never from the host, which only names the image.

mod budget;
mod config;
mod settings;

use std::path::{Path, PathBuf};

use kabuto_image::ImageConfig;
use kabuto_protocol::{agent::Storage, GUEST_IMAGES_DIR, STORAGE_IMAGE_GUEST_PULL};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{AgentError, Result};
use budget::{available_memory_bytes, peak_rss_kib, reset_peak_rss, PullBudget};
pub use config::{merge_config, ImageConfigError};
pub use settings::{PodImages, SettingsError};

/// The image reference of the request's guest-pull storage, if any. Other
/// storage drivers are refused: the agent prepares nothing it does not know.
pub fn guest_pull_source(storages: &[Storage]) -> Result<Option<&str>> {
    let mut source = None;
    for storage in storages {
        if storage.driver != STORAGE_IMAGE_GUEST_PULL {
            return Err(AgentError::InvalidArgument(format!(
                "storage driver {:?} is not supported (only {STORAGE_IMAGE_GUEST_PULL})",
                storage.driver
            )));
        }
        if source.replace(storage.source.as_str()).is_some() {
            return Err(AgentError::InvalidArgument(
                "more than one image_guest_pull storage".into(),
            ));
        }
    }
    Ok(source)
}

/// The directory holding a container's pulled image: a tmpfs mount.
fn image_dir(container_id: &str) -> PathBuf {
    Path::new(GUEST_IMAGES_DIR).join(container_id)
}

static PULL_BUDGET: std::sync::LazyLock<PullBudget> = std::sync::LazyLock::new(PullBudget::default);

/// Pulls `reference` into a fresh tmpfs for `container_id`; returns the
/// rootfs path and the image config. On error nothing remains.
pub fn pull(
    container_id: &str,
    reference: &str,
    images: &PodImages,
    deadline: Option<std::time::Instant>,
) -> Result<(PathBuf, ImageConfig)> {
    let started = std::time::Instant::now();
    let mut settings = images
        .pull_settings()
        .map_err(|e| AgentError::PullSettings(Box::new(e)))?;
    settings.deadline = deadline;
    let settings_time = started.elapsed();
    let dir = image_dir(container_id);
    if dir.exists() {
        return Err(AgentError::Image(format!(
            "{} exists already",
            dir.display()
        )));
    }
    // Bounded by what the guest can spare now: tmpfs is guest RAM, and an
    // unbounded one (the kernel's default is half of all RAM per mount)
    // lets a large or hostile image exhaust it and take the agent down.
    // An image that does not fit fails with ENOSPC, the agent stays.
    // Concurrent pulls share one budget (two each sized to half of the
    // same MemAvailable once added up to all of it).
    let wait_until =
        deadline.unwrap_or_else(|| std::time::Instant::now() + std::time::Duration::from_secs(300));
    let reservation = PULL_BUDGET.reserve_waiting(available_memory_bytes, wait_until)?;
    let size = reservation.size;
    std::fs::create_dir_all(&dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
    if let Err(e) = mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some(format!("mode=0755,size={size}").as_str()),
    ) {
        let _ = std::fs::remove_dir(&dir);
        return Err(AgentError::sys(format!(
            "mounting a tmpfs at {}",
            dir.display()
        ))(e));
    }
    let rootfs = dir.join("rootfs");
    reset_peak_rss();
    match kabuto_image::pull_and_unpack(reference, &settings, &rootfs) {
        Ok(pulled) => {
            // Benchmarks read this line (kabuto-image-bench --in-guest).
            log::info!(
                "container {container_id}: pulled {} from {} in {} ms (settings+keys {} ms, {}; peak agent RSS {} MiB){}",
                pulled.pinned,
                pulled.source,
                started.elapsed().as_millis(),
                settings_time.as_millis(),
                pulled.timings,
                peak_rss_kib().unwrap_or(0) / 1024,
                if settings.signature_policy.is_some() {
                    ", signature policy satisfied"
                } else {
                    ""
                }
            );
            Ok((rootfs, pulled.config))
        }
        Err(e) => {
            release(container_id);
            Err(AgentError::Pull(Box::new(e)))
        }
    }
}

/// Unmounts and removes a container's pulled image, if it has one.
pub fn release(container_id: &str) {
    let dir = image_dir(container_id);
    if !dir.exists() {
        return;
    }
    if let Err(e) = umount2(&dir, MntFlags::MNT_DETACH) {
        log::warn!("unmounting {}: {e}", dir.display());
    }
    if let Err(e) = std::fs::remove_dir(&dir) {
        log::warn!("removing {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn only_guest_pull_storage_is_accepted() {
        let pull = |source: &str| Storage {
            driver: STORAGE_IMAGE_GUEST_PULL.into(),
            source: source.into(),
            ..Default::default()
        };
        assert_eq!(guest_pull_source(&[]).expect("none"), None);
        assert_eq!(
            guest_pull_source(&[pull("a/b:1")]).expect("one"),
            Some("a/b:1")
        );
        assert!(guest_pull_source(&[pull("a"), pull("b")]).is_err());
        let block = Storage {
            driver: "blk".into(),
            ..Default::default()
        };
        assert!(guest_pull_source(&[block]).is_err());
    }
}
