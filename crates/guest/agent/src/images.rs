//! Guest pull: a container whose `CreateContainerRequest` carries an
//! `image_guest_pull` storage gets a rootfs the agent pulled, verified,
//! decrypted and unpacked itself, on a tmpfs of its own. Where to pull from,
//! which signatures to require and which keys open the layers come from the
//! pod's owner (init-data `cdh.toml`, resources behind `kbs:///` URIs),
//! never from the host, which only names the image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kabuto_attestation_agent::KbsClient;
use kabuto_image::{Credentials, ImageConfig, PullSettings, RegistriesConf, SignaturePolicy};
use kabuto_protocol::{agent::Storage, GUEST_IMAGES_DIR, STORAGE_IMAGE_GUEST_PULL};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::Spec;
use serde::Deserialize;

use crate::error::{AgentError, Result};

/// containerd's default `PATH`; an image's `PATH` replaces it (as
/// containerd's `WithImageConfig` does), any other value the spec has wins.
const DEFAULT_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `[image]` table of init-data `cdh.toml`, with CoCo's key names so
/// existing init-data works. Values are `kbs:///repo/type/tag` (fetched
/// after attestation) or `initdata:///<file>` (another file of the same
/// init-data document).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    /// A `containers-policy.json`. When set, images must satisfy it. Its
    /// `keyPath`s are resource URIs like these.
    #[serde(default)]
    pub image_security_policy_uri: Option<String>,
    /// A `registries.d` YAML naming the lookaside stores of GPG signatures.
    #[serde(default)]
    pub sigstore_config_uri: Option<String>,
    /// A `containers-registries.conf` (mirrors, insecure, blocked).
    #[serde(default)]
    pub registry_configuration_uri: Option<String>,
    /// An `auth.json` with registry credentials.
    #[serde(default)]
    pub authenticated_registry_credentials_uri: Option<String>,
    /// PEM private keys (RSA or EC P-256/P-384) tried on the JWE recipients
    /// of encrypted layers. kabuto's own key: CoCo sends such keys through
    /// its key-provider protocol instead.
    #[serde(default)]
    pub image_decryption_key_uris: Vec<String>,
}

/// What a pod's pulls need: its settings, its init-data files and its KBS.
pub struct PodImages {
    settings: ImageSettings,
    init_data: BTreeMap<String, String>,
    kbs: Option<Arc<KbsClient>>,
}

impl PodImages {
    /// From init-data (`cdh.toml` `[image]`, if any) and the pod's KBS.
    pub fn new(
        init_data: Option<&kabuto_initdata::InitData>,
        kbs: Option<Arc<KbsClient>>,
    ) -> std::result::Result<PodImages, String> {
        let files = init_data.map(|d| d.data.clone()).unwrap_or_default();
        let settings = match files.get("cdh.toml") {
            None => ImageSettings::default(),
            Some(text) => {
                let doc: toml::Value =
                    toml::from_str(text).map_err(|e| format!("init-data cdh.toml: {e}"))?;
                match doc.get("image") {
                    None => ImageSettings::default(),
                    Some(table) => table
                        .clone()
                        .try_into()
                        .map_err(|e| format!("init-data cdh.toml [image]: {e}"))?,
                }
            }
        };
        let images = PodImages {
            settings,
            init_data: files,
            kbs,
        };
        let s = &images.settings;
        let uris = s
            .image_security_policy_uri
            .iter()
            .chain(&s.registry_configuration_uri)
            .chain(&s.sigstore_config_uri)
            .chain(&s.authenticated_registry_credentials_uri)
            .chain(&s.image_decryption_key_uris);
        for uri in uris {
            images
                .check_uri(uri)
                .map_err(|e| format!("init-data cdh.toml [image]: {e}"))?;
        }
        Ok(images)
    }

    /// Refuses a resource URI this pod cannot read.
    fn check_uri(&self, uri: &str) -> std::result::Result<(), String> {
        match uri.split_once(":///") {
            Some(("kbs", _)) if self.kbs.is_none() => Err(format!("{uri}: aa.toml names no KBS")),
            Some(("kbs", _)) => Ok(()),
            Some(("initdata", name)) if self.init_data.contains_key(name) => Ok(()),
            Some(("initdata", name)) => Err(format!("{uri}: the init-data has no {name:?}")),
            _ => Err(format!("{uri:?} is neither kbs:/// nor initdata:///")),
        }
    }

    fn resource(&self, uri: &str) -> std::result::Result<zeroize::Zeroizing<Vec<u8>>, String> {
        match uri.split_once(":///") {
            Some(("initdata", name)) => self
                .init_data
                .get(name)
                .map(|text| zeroize::Zeroizing::new(text.as_bytes().to_vec()))
                .ok_or_else(|| format!("{uri}: not in the init-data")),
            Some(("kbs", _)) => {
                let kbs = self
                    .kbs
                    .as_ref()
                    .ok_or_else(|| format!("{uri}: the pod has no KBS"))?;
                kbs.get_resource(uri).map_err(|e| format!("{uri}: {e}"))
            }
            _ => Err(format!("{uri}: unsupported resource URI")),
        }
    }

    /// Fetches and parses everything the settings name (each pull: keys are
    /// not kept in the guest longer than one pull needs them).
    pub fn pull_settings(&self) -> std::result::Result<PullSettings, String> {
        let s = &self.settings;
        let mut pull = PullSettings::default();
        if let Some(uri) = &s.registry_configuration_uri {
            let text = self.resource(uri)?;
            let text = std::str::from_utf8(&text).map_err(|_| format!("{uri}: not UTF-8"))?;
            pull.registries = RegistriesConf::parse(text).map_err(|e| format!("{uri}: {e}"))?;
        }
        if let Some(uri) = &s.authenticated_registry_credentials_uri {
            pull.credentials =
                Credentials::parse(&self.resource(uri)?).map_err(|e| format!("{uri}: {e}"))?;
        }
        if let Some(uri) = &s.image_security_policy_uri {
            let resolve = |path: &str| -> std::result::Result<Vec<u8>, String> {
                self.check_uri(path)?;
                Ok(self.resource(path)?.to_vec())
            };
            pull.signature_policy = Some(
                SignaturePolicy::from_json_with(&self.resource(uri)?, &resolve)
                    .map_err(|e| format!("{uri}: {e}"))?,
            );
        }
        if let Some(uri) = &s.sigstore_config_uri {
            let text = self.resource(uri)?;
            let text = std::str::from_utf8(&text).map_err(|_| format!("{uri}: not UTF-8"))?;
            pull.lookaside = kabuto_image::signature::Lookaside::parse(text)
                .map_err(|e| format!("{uri}: {e}"))?;
        }
        for uri in &s.image_decryption_key_uris {
            let pem = self.resource(uri)?;
            let pem = std::str::from_utf8(&pem).map_err(|_| format!("{uri}: not a PEM text"))?;
            pull.keys.push(
                kabuto_jose::TeeKeyPair::from_pem(pem)
                    .map_err(|e| format!("{uri}: not a private key: {e}"))?,
            );
        }
        Ok(pull)
    }
}

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

/// Starts a new peak-RSS measurement (Linux: `5` to `clear_refs`); the
/// unpacked rootfs is tmpfs, so the peak is the blobs the pull held.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM of this process, in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The guest's available memory now, in bytes.
fn available_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// The smallest tmpfs a pull gets.
const MIN_PULL_TMPFS: u64 = 16 << 20;

/// The tmpfs sizes of the pulls in flight. A tmpfs takes memory only as it
/// fills, so `MemAvailable` does not show what running pulls will still
/// use: all pulls together get at most half of the available memory (the
/// rest is for their blobs and the pod), each reserving its size until it
/// ends (a finished rootfs then shows in `MemAvailable` itself).
#[derive(Default)]
pub(crate) struct PullBudget {
    reserved: std::sync::Mutex<u64>,
    /// Notified when a pull gives its share back.
    released: std::sync::Condvar,
}

/// One pull's share of the [`PullBudget`], given back when dropped.
pub(crate) struct PullReservation<'a> {
    budget: &'a PullBudget,
    pub size: u64,
}

impl PullBudget {
    /// Reserves a tmpfs size for one more pull, given `available` bytes of
    /// guest memory; refused when the pulls in flight hold the budget.
    pub(crate) fn reserve(&self, available: u64) -> Result<PullReservation<'_>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let size = (available / 2).saturating_sub(*reserved) & !4095;
        if size < MIN_PULL_TMPFS {
            return Err(AgentError::Image(format!(
                "not enough guest memory for another image pull: the pulls in flight hold {} MiB of {} MiB available; retry when they finish, or give the VM more memory",
                *reserved >> 20,
                available >> 20
            )));
        }
        *reserved += size;
        Ok(PullReservation { budget: self, size })
    }
}

impl Drop for PullReservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self
            .budget
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *reserved = reserved.saturating_sub(self.size);
        self.budget.released.notify_all();
    }
}

impl PullBudget {
    /// [`PullBudget::reserve`], waiting while pulls in flight hold the
    /// budget (until `deadline`): concurrent pulls run one after another
    /// instead of failing.
    pub(crate) fn reserve_waiting(
        &self,
        available: impl Fn() -> u64,
        deadline: std::time::Instant,
    ) -> Result<PullReservation<'_>> {
        loop {
            let refused = match self.reserve(available()) {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            let now = std::time::Instant::now();
            let reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            // Nothing in flight to wait for, or no time left: refused.
            if now >= deadline || *reserved == 0 {
                return Err(refused);
            }
            let wait = (deadline - now).min(std::time::Duration::from_secs(1));
            let _ = self.released.wait_timeout(reserved, wait);
        }
    }
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
    let mut settings = images.pull_settings().map_err(AgentError::Image)?;
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
            Err(AgentError::Image(e.to_string()))
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

/// Applies the image config to `spec` the way containerd's
/// `WithImageConfig` does on the host: args from Entrypoint + Cmd when the
/// spec has none, image env under the spec's (the image's PATH replaces
/// containerd's default), WorkingDir when the spec says `/`, and the
/// image's User when the spec runs as root. Sets `root.path` to `rootfs`.
pub fn merge_config(
    spec: &mut Spec,
    config: &ImageConfig,
    rootfs: &Path,
) -> std::result::Result<(), String> {
    if let Some(root) = spec.root_mut() {
        root.set_path(rootfs.to_path_buf());
    }
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or("the spec has no process")?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        let args: Vec<String> = config
            .entrypoint
            .iter()
            .flatten()
            .chain(config.cmd.iter().flatten())
            .cloned()
            .collect();
        if args.is_empty() {
            return Err("the spec has no args and the image has no Entrypoint or Cmd".into());
        }
        process.set_args(Some(args));
    }
    let mut env = process.env().clone().unwrap_or_default();
    let name = |var: &str| var.split('=').next().unwrap_or_default().to_string();
    for var in config.env.iter().flatten() {
        match env.iter().position(|e| name(e) == name(var)) {
            Some(i) if env[i] == DEFAULT_PATH_ENV => env[i] = var.clone(),
            Some(_) => {}
            None => env.push(var.clone()),
        }
    }
    // containerd's default spec always carries a PATH; an image without
    // one still gets it.
    if !env.iter().any(|e| name(e) == "PATH") {
        env.push(DEFAULT_PATH_ENV.to_string());
    }
    process.set_env(Some(env));
    if let Some(dir) = config.working_dir.as_deref().filter(|d| !d.is_empty()) {
        if process.cwd().as_os_str().is_empty() || process.cwd() == Path::new("/") {
            process.set_cwd(PathBuf::from(dir));
        }
    }
    if let Some(user) = config.user.as_deref().filter(|u| !u.is_empty()) {
        let current = process.user();
        if current.uid() == 0 && current.gid() == 0 {
            let (uid, gid, extra) = resolve_user(user, rootfs)?;
            let mut u = current.clone();
            u.set_uid(uid);
            u.set_gid(gid);
            if !extra.is_empty() {
                u.set_additional_gids(Some(extra));
            }
            process.set_user(u);
        }
    }
    Ok(())
}

/// One of the image's account files, only if it resolves inside `rootfs`.
fn account_file(rootfs: &Path, name: &str) -> Option<String> {
    let path = rootfs.join("etc").join(name);
    let real = std::fs::canonicalize(&path).ok()?;
    let root = std::fs::canonicalize(rootfs).ok()?;
    if !real.starts_with(&root) {
        log::warn!("{}: leaves the image's rootfs; ignored", path.display());
        return None;
    }
    std::fs::read_to_string(real).ok()
}

/// `user[:group]`, each a name or a number, as containerd resolves it
/// against the image's /etc/passwd and /etc/group: (uid, gid, the
/// supplementary groups listing a named user).
fn resolve_user(user: &str, rootfs: &Path) -> std::result::Result<(u32, u32, Vec<u32>), String> {
    let passwd = account_file(rootfs, "passwd").unwrap_or_default();
    let group = account_file(rootfs, "group").unwrap_or_default();
    let entries = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| l.split(':').map(str::to_owned).collect())
            .collect()
    };
    let passwd = entries(&passwd);
    let groups = entries(&group);
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let by_name = passwd
        .iter()
        .find(|e| e.first().map(String::as_str) == Some(user_part));
    let (uid, default_gid, user_name) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let entry = passwd
                .iter()
                .find(|e| e.get(2).and_then(|u| u.parse::<u32>().ok()) == Some(uid));
            (
                uid,
                entry.and_then(|e| e.get(3)?.parse().ok()).unwrap_or(0),
                entry.and_then(|e| e.first().cloned()),
            )
        }
        Err(_) => {
            let entry = by_name.ok_or_else(|| {
                format!("image user {user_part:?} is not in the image's /etc/passwd")
            })?;
            let field = |i: usize| {
                entry
                    .get(i)
                    .and_then(|v| v.parse::<u32>().ok())
                    .ok_or_else(|| format!("/etc/passwd entry of {user_part:?} is malformed"))
            };
            (field(2)?, field(3)?, Some(user_part.to_string()))
        }
    };
    let gid = match group_part {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.first().map(String::as_str) == Some(g))
                .and_then(|e| e.get(2)?.parse().ok())
                .ok_or_else(|| format!("image group {g:?} is not in the image's /etc/group"))?,
        },
    };
    let extra = match (&user_name, group_part) {
        (Some(name), None) => groups
            .iter()
            .filter(|e| {
                e.get(3)
                    .is_some_and(|members| members.split(',').any(|m| m == name))
            })
            .filter_map(|e| e.get(2)?.parse::<u32>().ok())
            .filter(|g| *g != gid)
            .collect(),
        _ => Vec::new(),
    };
    Ok((uid, gid, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str], env: &[&str]) -> Spec {
        let mut spec = Spec::default();
        let process = spec
            .process_mut()
            .as_mut()
            .expect("default spec has a process");
        process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        process.set_env(Some(env.iter().map(|s| s.to_string()).collect()));
        spec
    }

    #[test]
    fn concurrent_pulls_share_half_of_the_available_memory() {
        let budget = PullBudget::default();
        let available = 1024 << 20;
        let first = budget.reserve(available).expect("first pull");
        assert_eq!(first.size, 512 << 20);
        // While the first is in flight its tmpfs has not filled, so the
        // same MemAvailable is seen: the second gets what is left.
        let refused = budget
            .reserve(available)
            .err()
            .expect("the budget is spent");
        assert!(
            refused
                .to_string()
                .contains("the pulls in flight hold 512 MiB of 1024 MiB"),
            "{refused}"
        );
        // With more memory free, a second pull gets the rest of the half.
        let second = budget.reserve(available * 2).expect("second pull");
        assert_eq!(second.size, 512 << 20);
        drop(second);
        drop(first);
        let third = budget.reserve(available).expect("third pull");
        assert_eq!(
            third.size,
            512 << 20,
            "finished pulls give their share back"
        );

        // A pull that finds the budget spent waits for the one in flight.
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                budget
                    .reserve_waiting(
                        || available,
                        std::time::Instant::now() + std::time::Duration::from_secs(10),
                    )
                    .map(|r| r.size)
                    .ok()
            });
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(third);
            assert_eq!(waiter.join().ok().flatten(), Some(512 << 20));
        });
        // ... until its deadline.
        let held = budget.reserve(available).expect("held");
        let started = std::time::Instant::now();
        assert!(budget
            .reserve_waiting(
                || available,
                started + std::time::Duration::from_millis(300)
            )
            .is_err());
        drop(held);
    }

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/srv:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\napp:x:1001:\nwheel:x:10:app,other\n",
        )
        .expect("group");
        dir
    }

    #[test]
    fn image_config_fills_what_the_spec_leaves_open() {
        let root = rootfs();
        let config = ImageConfig {
            entrypoint: Some(vec!["/bin/app".into()]),
            cmd: Some(vec!["--serve".into()]),
            env: Some(vec![
                "PATH=/opt/bin:/bin".into(),
                "MODE=image".into(),
                "ONLY_IMAGE=1".into(),
            ]),
            user: Some("app".into()),
            working_dir: Some("/srv".into()),
            volumes: None,
        };
        let mut s = spec(&[], &[DEFAULT_PATH_ENV, "MODE=user"]);
        merge_config(&mut s, &config, root.path()).expect("merges");
        let p = s.process().as_ref().expect("process");
        assert_eq!(
            p.args().as_deref(),
            Some(&["/bin/app".to_string(), "--serve".into()][..])
        );
        assert_eq!(
            p.env().as_deref(),
            Some(
                &[
                    "PATH=/opt/bin:/bin".to_string(),
                    "MODE=user".into(),
                    "ONLY_IMAGE=1".into()
                ][..]
            )
        );
        assert_eq!(p.cwd(), Path::new("/srv"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1001));
        assert_eq!(p.user().additional_gids().as_deref(), Some(&[10u32][..]));
        assert_eq!(
            s.root().as_ref().map(|r| r.path().clone()),
            Some(root.path().to_path_buf())
        );

        // The spec's own args, user and cwd win.
        let mut s = spec(&["sh"], &["PATH=/mine"]);
        if let Some(p) = s.process_mut() {
            p.set_cwd("/work".into());
        }
        merge_config(&mut s, &config, root.path()).expect("merges");
        let p = s.process().as_ref().expect("process");
        assert_eq!(p.args().as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(p.env().as_ref().map(|e| e[0].as_str()), Some("PATH=/mine"));
        assert_eq!(p.cwd(), Path::new("/work"));
    }

    #[test]
    fn users_resolve_like_containerd() {
        let root = rootfs();
        let r = |u: &str| resolve_user(u, root.path());
        assert_eq!(r("1000").expect("uid"), (1000, 1001, vec![10]));
        assert_eq!(r("1000:5").expect("uid:gid"), (1000, 5, vec![]));
        assert_eq!(r("app:wheel").expect("names"), (1000, 10, vec![]));
        assert_eq!(r("4242").expect("unknown uid"), (4242, 0, vec![]));
        assert!(r("ghost").expect_err("unknown").contains("ghost"));
        assert!(r("app:ghosts")
            .expect_err("unknown group")
            .contains("ghosts"));
    }

    #[test]
    fn no_command_anywhere_is_an_error() {
        let root = rootfs();
        let mut s = spec(&[], &[]);
        let e = merge_config(&mut s, &ImageConfig::default(), root.path()).expect_err("no args");
        assert!(e.contains("Entrypoint"), "{e}");
        // Without PATH anywhere, containerd's default.
        let mut s = spec(&["sh"], &[]);
        merge_config(&mut s, &ImageConfig::default(), root.path()).expect("merges");
        let env = s.process().as_ref().and_then(|p| p.env().clone());
        assert_eq!(env, Some(vec![DEFAULT_PATH_ENV.to_string()]));
    }

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

    #[test]
    fn settings_name_only_known_sources() {
        let doc = |cdh: &str| {
            kabuto_initdata::InitData::parse(
                format!(
                    "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cdh.toml\" = '''\n{cdh}\n'''\n\"policy.json\" = '{{\"default\":[{{\"type\":\"reject\"}}]}}'\n"
                )
                .as_bytes(),
            )
            .expect("init-data")
        };
        let ok = doc("[image]\nimage_security_policy_uri = \"initdata:///policy.json\"\n");
        let images = PodImages::new(Some(&ok), None).expect("accepted");
        assert!(images
            .pull_settings()
            .expect("settings")
            .signature_policy
            .is_some());
        for (cdh, needle) in [
            (
                "[image]\nimage_security_policy_uri = \"kbs:///default/p/1\"\n",
                "names no KBS",
            ),
            (
                "[image]\nimage_security_policy_uri = \"initdata:///nope\"\n",
                "nope",
            ),
            (
                "[image]\nimage_security_policy_uri = \"file:///etc/x\"\n",
                "neither",
            ),
            ("[image]\nimage_pull_proxy = \"x\"\n", "image_pull_proxy"),
        ] {
            let e = PodImages::new(Some(&doc(cdh)), None).err().expect(cdh);
            assert!(e.contains(needle), "{cdh}: {e}");
        }
    }
}
