use super::kernel::{apt_download, lz4_legacy_decompress};
use super::*;

#[test]
fn cpio_is_deterministic_and_well_formed() {
    let build = || {
        initramfs::build(
            b"agent",
            &[],
            &[("virtio".into(), b"ko".to_vec())],
            "6.1.0-x",
            b"pause",
            None,
        )
        .expect("initramfs")
    };
    let a = build();
    assert_eq!(a, build(), "same inputs, same bytes");
    assert_eq!(a.len() % 512, 0);
    assert!(a.starts_with(b"070701"));
    let text = String::from_utf8_lossy(&a);
    for name in [
        "init\0",
        "dev/console\0",
        "etc/kabuto/modules\0",
        "pause-bundle/rootfs/pause\0",
        "pause-bundle/rootfs/proc\0",
        "lib/modules/6.1.0-x/virtio.ko\0",
        "TRAILER!!!\0",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(
        text.contains("/lib/modules/6.1.0-x/virtio.ko\n"),
        "module list"
    );
}

#[test]
fn rejects_non_bzimages() {
    let err = bzimage_to_vmlinux(&[0u8; 4096]).expect_err("zeros");
    assert!(err.to_string().contains("HdrS"), "{err}");
}

#[test]
fn lz4_legacy_round_trip() {
    let data: Vec<u8> = (0..100_000u32)
        .flat_map(|i| (i % 251).to_le_bytes())
        .collect();
    let block = lz4_flex::block::compress(&data);
    let mut payload = 0x184C_2102u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
    payload.extend_from_slice(&block);
    payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
    assert_eq!(lz4_legacy_decompress(&payload).expect("decompress"), data);
    // A truncated payload is an error, not a short kernel.
    payload.truncate(payload.len() - 10);
    payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
    assert!(lz4_legacy_decompress(&payload).is_err());
}

/// A version apt does not know (as when Debian's archive replaced the
/// pinned build) fails naming the package, the version and how to move
/// the pin. Needs apt's package lists, not the network.
#[test]
fn a_moved_pin_says_how_to_update() {
    if std::process::Command::new("apt-get")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no apt-get on this machine");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let err = apt_download(dir.path(), KERNEL_PIN.package, "0.0-not-a-version")
        .expect_err("apt cannot have that version");
    assert!(matches!(err, GuestImageError::PinMoved { .. }), "{err:?}");
    let text = err.to_string();
    for needle in [
        KERNEL_PIN.package,
        "0.0-not-a-version",
        "KERNEL_PIN",
        "apt-cache show",
        "E:",
    ] {
        assert!(text.contains(needle), "{needle:?} missing: {text}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}
