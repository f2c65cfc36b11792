//! Wrappers of the tools tests run (skopeo, openssl) and process/file probes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// Zombie children of `parent` (exited, never waited for): their pids.
pub fn zombie_children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if state == Some("Z") && ppid.and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Processes whose command line contains `needle`: (pid, command line).
pub fn processes_matching(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            out.push((pid, cmdline.trim().to_string()));
        }
    }
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `skopeo copy` of `tag` of the OCI layout `layout` to `target` (a
/// registry reference reached over plain HTTP).
pub fn skopeo_push(layout: &Path, tag: &str, target: &str) {
    run_tool(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{target}"),
        ],
    );
}

/// Runs `program args`; panics with its stderr unless it succeeds.
pub fn run_tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} (scripts/setup.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `<dir>/<name>.pem` (private) and `<dir>/<name>.pub` made by openssl:
/// RSA 2048 as `openssl genrsa` writes it, or P-256 (SEC1) when `ec`.
pub fn openssl_key_pair(dir: &Path, name: &str, ec: bool) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub"));
    let (p, q) = (private.to_string_lossy(), public.to_string_lossy());
    if ec {
        run_tool(
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &p,
            ],
        );
        run_tool("openssl", &["ec", "-in", &p, "-pubout", "-out", &q]);
    } else {
        run_tool("openssl", &["genrsa", "-out", &p, "2048"]);
        run_tool("openssl", &["rsa", "-in", &p, "-pubout", "-out", &q]);
    }
    (private, public)
}

/// `skopeo copy` of `src:latest` to `dst:latest` (OCI layouts), encrypted
/// to each public key (ocicrypt's JWE recipients).
pub fn skopeo_encrypt(src: &Path, dst: &Path, recipients: &[&Path]) {
    let keys: Vec<String> = recipients
        .iter()
        .map(|k| format!("jwe:{}", k.display()))
        .collect();
    let mut args = vec!["copy", "--quiet"];
    for k in &keys {
        args.extend(["--encryption-key", k.as_str()]);
    }
    let (s, d) = (
        format!("oci:{}:latest", src.display()),
        format!("oci:{}:latest", dst.display()),
    );
    args.extend([s.as_str(), d.as_str()]);
    run_tool("skopeo", &args);
}

/// Every regular file under `dirs` that contains `needle`.
pub fn files_containing(dirs: &[&Path], needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                stack.push(entry.path());
            }
        } else if meta.is_file() {
            if let Ok(data) = std::fs::read(&path) {
                if data.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    found
}
