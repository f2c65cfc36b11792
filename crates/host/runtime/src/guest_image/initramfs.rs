//! The initramfs: a deterministic newc cpio with the agent at `/init`, its
//! shared libraries, the kernel modules and the pause binary.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use super::*;

/// The shared libraries (and dynamic loader) the agent needs, by path.
pub(super) fn shared_libraries(agent: &Path) -> Result<Vec<PathBuf>, GuestImageError> {
    let err = |reason: String| GuestImageError::Agent {
        path: agent.to_path_buf(),
        reason,
    };
    let output = Command::new("ldd")
        .arg(agent)
        .output()
        .map_err(|e| err(format!("running ldd: {e}")))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = BTreeSet::new();
    for line in text.lines() {
        if line.contains("not found") {
            return Err(err(format!("missing library: {}", line.trim())));
        }
        let path = match line.split("=>").nth(1) {
            Some(rest) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    Ok(libs.into_iter().collect())
}

/// A deterministic cpio "newc" archive writer (the initramfs format). No
/// crate writes reproducible newc archives with device nodes, so it is here.
#[derive(Default)]
pub(super) struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads the archive in 512-byte blocks.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

pub(super) enum Node {
    Dir,
    File { mode: u32, data: Vec<u8> },
    CharDev { major: u32, minor: u32 },
}

pub(super) fn build(
    agent: &[u8],
    libs: &[PathBuf],
    modules: &[(String, Vec<u8>)],
    release: &str,
    pause: &[u8],
    debug_shell: Option<Vec<u8>>,
) -> Result<Vec<u8>, GuestImageError> {
    let mut tree: BTreeMap<String, Node> = BTreeMap::new();
    let add_file = |tree: &mut BTreeMap<String, Node>, path: &str, mode: u32, data: Vec<u8>| {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            tree.entry(p.to_string_lossy().into_owned())
                .or_insert(Node::Dir);
            parent = p.parent();
        }
        tree.insert(path.to_string(), Node::File { mode, data });
    };
    add_file(&mut tree, "init", 0o755, agent.to_vec());
    for lib in libs {
        let data = fs::read(lib).map_err(io_err(format!("reading {}", lib.display())))?;
        let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
        add_file(&mut tree, &rel, 0o755, data);
    }
    let mut list = String::new();
    for (name, ko) in modules {
        let rel = format!("lib/modules/{release}/{name}.ko");
        list.push_str(&format!("/{rel}\n"));
        add_file(&mut tree, &rel, 0o644, ko.clone());
    }
    add_file(&mut tree, "etc/kabuto/modules", 0o644, list.into_bytes());
    // The pause container's root (kabuto_protocol::GUEST_PAUSE_ROOT; the
    // agent keeps it when it switches root).
    add_file(
        &mut tree,
        "pause-bundle/rootfs/pause",
        0o755,
        pause.to_vec(),
    );
    for dir in ["pause-bundle/rootfs/proc", "pause-bundle/rootfs/dev"] {
        tree.insert(dir.to_string(), Node::Dir);
    }
    if let Some(shell) = debug_shell {
        add_file(&mut tree, "debug/busybox", 0o755, shell);
    }
    for dir in ["dev", "proc", "sys", "run", "tmp", "root"] {
        tree.insert(dir.to_string(), Node::Dir);
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs exists.
    tree.insert("dev/console".into(), Node::CharDev { major: 5, minor: 1 });
    tree.insert("dev/null".into(), Node::CharDev { major: 1, minor: 3 });

    let mut cpio = Cpio::default();
    for (path, node) in &tree {
        match node {
            Node::Dir => cpio.entry(path, 0o040755, (0, 0), &[]),
            Node::File { mode, data } => cpio.entry(path, 0o100000 | mode, (0, 0), data),
            Node::CharDev { major, minor } => cpio.entry(path, 0o020600, (*major, *minor), &[]),
        }
    }
    Ok(cpio.finish())
}
