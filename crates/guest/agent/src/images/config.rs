//! The image config applied to a guest-pulled container's spec, the way
//! containerd applies it on the host for host-pulled images.

use std::path::{Path, PathBuf};

use kabuto_image::ImageConfig;
use oci_spec::runtime::Spec;

/// containerd's default `PATH`; an image's `PATH` replaces it (as
/// containerd's `WithImageConfig` does), any other value the spec has wins.
pub(super) const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ImageConfigError {
    #[error("the spec has no process")]
    NoProcess,
    #[error("the spec has no args and the image has no Entrypoint or Cmd")]
    NoCommand,
    #[error("image user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("/etc/passwd entry of {0:?} is malformed")]
    MalformedPasswd(String),
    #[error("image group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
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
) -> Result<(), ImageConfigError> {
    if let Some(root) = spec.root_mut() {
        root.set_path(rootfs.to_path_buf());
    }
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or(ImageConfigError::NoProcess)?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        let args: Vec<String> = config
            .entrypoint
            .iter()
            .flatten()
            .chain(config.cmd.iter().flatten())
            .cloned()
            .collect();
        if args.is_empty() {
            return Err(ImageConfigError::NoCommand);
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
pub(super) fn resolve_user(
    user: &str,
    rootfs: &Path,
) -> Result<(u32, u32, Vec<u32>), ImageConfigError> {
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
            let entry =
                by_name.ok_or_else(|| ImageConfigError::UnknownUser(user_part.to_string()))?;
            let field = |i: usize| {
                entry
                    .get(i)
                    .and_then(|v| v.parse::<u32>().ok())
                    .ok_or_else(|| ImageConfigError::MalformedPasswd(user_part.to_string()))
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
                .ok_or_else(|| ImageConfigError::UnknownGroup(g.to_string()))?,
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
        assert!(r("ghost")
            .expect_err("unknown")
            .to_string()
            .contains("ghost"));
        assert!(r("app:ghosts")
            .expect_err("unknown group")
            .to_string()
            .contains("ghosts"));
    }

    #[test]
    fn no_command_anywhere_is_an_error() {
        let root = rootfs();
        let mut s = spec(&[], &[]);
        let e = merge_config(&mut s, &ImageConfig::default(), root.path()).expect_err("no args");
        assert!(e.to_string().contains("Entrypoint"), "{e}");
        // Without PATH anywhere, containerd's default.
        let mut s = spec(&["sh"], &[]);
        merge_config(&mut s, &ImageConfig::default(), root.path()).expect("merges");
        let env = s.process().as_ref().and_then(|p| p.env().clone());
        assert_eq!(env, Some(vec![DEFAULT_PATH_ENV.to_string()]));
    }
}
