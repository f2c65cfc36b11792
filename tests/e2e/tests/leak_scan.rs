//! The leak scan: a confidential pod (software TEE, through containerd) uses
//! a secret KBS resource and an encrypted image's plaintext; afterwards,
//! everything the host can see is searched for the secrets' marker strings:
//! the files of containerd (its log, which carries the shim's, its content
//! and snapshot directories) and of kabuto (sandbox state, QEMU's log, the
//! console, both virtio-fs exports), the registry's storage, every process's
//! command line, and the memory (`/proc/PID/mem`) of containerd, the shim,
//! both virtiofsd and the vsock device. None may hold a marker.
//!
//! The guest's RAM is host memory when there is no TEE hardware: QEMU and
//! the vhost-user backends (which map it to move virtqueue data) hold it.
//! The scan reads it too and reports what it finds there as the software
//! TEE's known limit (SNP/TDX encrypt it), without asserting on it; QEMU's
//! own memory outside the guest's RAM must be clean like the rest.
//!
//! Not scanned yet: a sealed env value (sealed secrets are issue 18; the
//! test says so on stderr when it runs).

use std::io::{Read as _, Seek as _, SeekFrom};

use kabuto_e2e::confidential::{confidential_containerd, init_data_annotation, Kbs};
use kabuto_e2e::{
    files_containing, image_with, openssl_key_pair, processes_matching, skopeo_encrypt, stderr,
    stdout, Registry, RUNTIME,
};
use sha2::{Digest as _, Sha256};

/// The KBS resource's content.
const RESOURCE_MARKER: &str = "kabuto-leak-resource-3f9a61c2e8";
/// A file in the encrypted image's layer.
const IMAGE_MARKER: &str = "kabuto-leak-image-plaintext-b07d44e1";
const POD: &str = "leakpod";

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The readable mappings of `pid` that hold `needle` (name or address
/// range of each). Reads `/proc/PID/mem` in chunks that overlap by the
/// needle's length, so a match across a chunk boundary is found.
fn memory_containing(pid: u32, needle: &[u8]) -> Vec<String> {
    const CHUNK: u64 = 16 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let Ok(mut mem) = std::fs::File::open(format!("/proc/{pid}/mem")) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("[anon]");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let Some((start, end)) = range.split_once('-').and_then(|(s, e)| {
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        }) else {
            continue;
        };
        let mut at = start;
        while at < end {
            let len = (end - at).min(CHUNK + needle.len() as u64);
            let mut buf = vec![0u8; len as usize];
            let read = mem
                .seek(SeekFrom::Start(at))
                .and_then(|_| mem.read(&mut buf));
            let Ok(n) = read else { break };
            if buf[..n].windows(needle.len()).any(|w| w == needle) {
                found.push(format!("{range} {name}"));
                break;
            }
            if n == 0 {
                break;
            }
            at += CHUNK.min(n as u64);
        }
    }
    found
}

/// The guest's RAM: kabuto's QEMU backs it with a shared memfd
/// (`memory-backend-memfd`, so vhost-user backends can map it).
fn is_guest_ram(region: &str) -> bool {
    region.ends_with("/memfd:memory-backend-memfd")
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn nothing_host_visible_holds_a_confidential_pods_secrets() {
    eprintln!(
        "leak scan: a sealed env value is not planted: sealed secrets are not built yet (issue 18)"
    );
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let registry = Registry::start();
    let host = registry.host.clone();
    let port = host.rsplit(':').next().expect("port").to_string();

    // An encrypted image holding the image marker; its key and the
    // resource marker are KBS resources.
    let plain = image_with(
        d,
        "secret",
        &[("secret/marker.txt", 0o600, IMAGE_MARKER.as_bytes())],
        serde_json::json!({}),
    );
    let (_, rsa_pub) = openssl_key_pair(d, "rsa", false);
    skopeo_encrypt(&plain, &d.join("enc"), &[&rsa_pub]);
    let encrypted = registry.push_layout(&d.join("enc"), "latest", "leak/enc");
    let kbs_dir = d.join("kbs");
    std::fs::create_dir(&kbs_dir).expect("kbs dir");
    let kbs = Kbs::start(&kbs_dir);
    let accept = serde_json::json!({"default": [{"type": "insecureAcceptAnything"}]});
    for (path, value) in [
        ("default/image-policy/1", accept.to_string().into_bytes()),
        (
            "default/image-key/rsa",
            std::fs::read(d.join("rsa.pem")).expect("rsa.pem"),
        ),
        ("default/leak/1", RESOURCE_MARKER.as_bytes().to_vec()),
    ] {
        kbs.admin.set_resource(path, &value).expect("resource");
    }
    let extra = format!(
        "\"cdh.toml\" = '''\n[image]\nimage_security_policy_uri = \"kbs:///default/image-policy/1\"\n\
         registry_configuration_uri = \"initdata:///registries.conf\"\n\
         image_decryption_key_uris = [\"kbs:///default/image-key/rsa\"]\n'''\n\
         \"registries.conf\" = '''\n[[registry]]\nprefix = \"{host}\"\nlocation = \"10.0.2.2:{port}\"\ninsecure = true\n'''\n"
    );
    let doc = kbs.init_data(kabuto_policy::ALLOW_ALL, &extra);
    let swtee = d.join("swtee");
    let c = confidential_containerd(&swtee, "image_pull = \"guest\"\n", Vec::new());
    kbs.trust(&c, &swtee, &[&doc]);

    // The pod, and a member that uses both secrets: it prints only their
    // digests, so what the host legitimately sees (the container's output)
    // carries no marker.
    c.run_detached(
        POD,
        &[
            // The guest reaches the KBS and the registry over the host's
            // network (QEMU's user networking in the pod's namespace).
            "--net-host",
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            &format!("io.kubernetes.cri.sandbox-id={POD}"),
            "--annotation",
            &init_data_annotation(&doc),
        ],
        &["sleep", "1000"],
    );
    let empty = d.join("empty-rootfs");
    std::fs::create_dir(&empty).expect("empty rootfs");
    let sandbox_id = format!("io.kubernetes.cri.sandbox-id={POD}");
    let image_annotation = format!("{}={encrypted}", kabuto_protocol::IMAGE_ANNOTATION);
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        &sandbox_id,
        "--annotation",
        &image_annotation,
        "--rootfs",
        empty.to_str().expect("utf-8"),
        "user",
        "sh",
        "-c",
        "sha256sum /secret/marker.txt && \
         wget -qO- http://127.0.0.1:8006/cdh/resource/default/leak/1 | sha256sum",
    ]);
    let printed = stdout(&out);
    assert!(
        out.status.success(),
        "{}\n{printed}\nKBS log:\n{}",
        stderr(&out),
        kbs.log()
    );
    // The container really had both plaintexts.
    assert!(
        printed.contains(&sha256_hex(IMAGE_MARKER.as_bytes())),
        "{printed}"
    );
    assert!(
        printed.contains(&sha256_hex(RESOURCE_MARKER.as_bytes())),
        "{printed}"
    );

    // The processes that serve the running pod on the host.
    let sandbox_dir = c.sandbox_dir(POD);
    let sandbox = sandbox_dir.to_string_lossy().to_string();
    let socket = c.socket().to_string_lossy().to_string();
    let helpers = processes_matching(&sandbox);
    let qemu: Vec<u32> = helpers
        .iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| *pid)
        .collect();
    assert_eq!(qemu.len(), 1, "the pod's QEMU: {helpers:?}");
    let mut served: Vec<(u32, String)> = helpers
        .iter()
        .filter(|(_, cmd)| !cmd.contains("qemu-system"))
        .cloned()
        .collect();
    // Each virtiofsd may run as a parent and its sandboxed child: both are
    // scanned; each export must have one.
    for what in ["virtiofs.sock", "rootfs.sock", "vhost-device-vsock"] {
        assert!(
            served.iter().any(|(_, cmd)| cmd.contains(what)),
            "{what}: {helpers:?}"
        );
    }
    served.extend(
        processes_matching("containerd-shim-kabuto-v2")
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&socket)),
    );
    served.extend(processes_matching(&c.config_path().to_string_lossy()));
    assert!(
        served
            .iter()
            .any(|(_, cmd)| cmd.contains("containerd-shim-kabuto-v2")),
        "the pod's shim: {served:?}"
    );

    let files = [c.dir.path(), registry.storage()];
    let mut leaks = Vec::new();
    for marker in [RESOURCE_MARKER, IMAGE_MARKER] {
        let needle = marker.as_bytes();
        for path in files_containing(&files, needle) {
            leaks.push(format!("{marker} in file {}", path.display()));
        }
        for (pid, cmd) in processes_matching(marker) {
            leaks.push(format!("{marker} in the command line of {pid}: {cmd}"));
        }
        // The vhost-user backends (virtiofsd, the vsock device) map the
        // guest's RAM to move virtqueue data: that mapping is guest RAM, as
        // in QEMU, and counts with it; their own memory must be clean.
        let mut in_guest_ram = 0;
        for (pid, cmd) in &served {
            for region in memory_containing(*pid, needle) {
                if is_guest_ram(&region) {
                    in_guest_ram += 1;
                } else {
                    leaks.push(format!("{marker} in the memory of {pid} ({cmd}): {region}"));
                }
            }
        }
        for region in memory_containing(qemu[0], needle) {
            if is_guest_ram(&region) {
                in_guest_ram += 1;
            } else {
                leaks.push(format!("{marker} in QEMU's own memory: {region}"));
            }
        }
        eprintln!(
            "leak scan: software TEE limit: {marker} is in {in_guest_ram} mapping(s) of the \
             guest's RAM (QEMU's and the vhost-user backends'; SNP/TDX encrypt it)"
        );
    }
    // The scan can see: the plaintext layout the test built holds the marker.
    assert!(!files_containing(&[&plain], IMAGE_MARKER.as_bytes()).is_empty());
    assert!(
        !memory_containing(std::process::id(), RESOURCE_MARKER.as_bytes()).is_empty(),
        "the memory scan cannot find a marker in this test's own memory"
    );
    assert!(
        leaks.is_empty(),
        "secrets on the host:\n{}",
        leaks.join("\n")
    );

    c.kill_and_delete(POD);
    c.assert_no_residue();
    let leaks: Vec<_> = [RESOURCE_MARKER, IMAGE_MARKER]
        .iter()
        .flat_map(|m| files_containing(&[c.dir.path()], m.as_bytes()))
        .collect();
    assert!(
        leaks.is_empty(),
        "secrets on the host after the pod: {leaks:?}"
    );
}
