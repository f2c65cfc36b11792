//! `kabuto install` then `kabuto uninstall` leaves the tree as it was.

use std::{collections::BTreeSet, fs, path::Path, process::Command};

use kabuto_e2e::{paths, stderr};

fn tree(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.insert(
                p.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string(),
            );
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn uninstall_removes_exactly_what_install_added() {
    let root = tempfile::tempdir().expect("tempdir");
    // Something that was there before must survive.
    fs::create_dir_all(root.path().join("usr/local/bin")).expect("mkdir");
    fs::write(root.path().join("usr/local/bin/other-tool"), "keep me").expect("write");
    let before = tree(root.path());

    let kabuto = paths().bin_dir.join("kabuto");
    let root_arg = root.path().to_str().expect("utf-8");
    let guest = paths().guest_dir;
    let out = Command::new(&kabuto)
        .args([
            "install",
            "--root",
            root_arg,
            "--guest-dir",
            guest.to_str().expect("utf-8"),
        ])
        .output()
        .expect("install");
    assert!(out.status.success(), "{}", stderr(&out));
    let installed = tree(root.path());
    for expected in [
        "usr/local/bin/containerd-shim-kabuto-v2",
        "usr/local/bin/kabuto-snapshotter",
        "etc/systemd/system/kabuto-snapshotter.service",
        "usr/local/share/kabuto/guest/vmlinux",
        "usr/local/share/kabuto/guest/initramfs.cpio",
        "etc/kabuto/config.toml",
        "var/lib/kabuto/installed.json",
    ] {
        assert!(
            installed.contains(expected),
            "{expected} not installed: {installed:?}"
        );
    }
    // The config names the final location, not the staging root.
    let config = fs::read_to_string(root.path().join("etc/kabuto/config.toml")).expect("config");
    assert!(
        config.contains("kernel = \"/usr/local/share/kabuto/guest/vmlinux\""),
        "{config}"
    );

    let out = Command::new(&kabuto)
        .args(["uninstall", "--root", root_arg])
        .output()
        .expect("uninstall");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(tree(root.path()), before);

    let out = Command::new(&kabuto)
        .args(["uninstall", "--root", root_arg])
        .output()
        .expect("uninstall");
    assert!(
        !out.status.success(),
        "second uninstall must say nothing is installed"
    );
    assert!(stderr(&out).contains("not installed"), "{}", stderr(&out));
}
