//! Layers built here as tar streams — ordinary ones, whiteouts, and the
//! crafted ones a malicious registry could serve.
#![allow(clippy::unwrap_used)]

use std::{fs, os::unix::fs::MetadataExt, path::Path};

use crate::unpack::*;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A tar entry: (name, kind, data or link target).
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str),
}

/// A tar stream of `entries`; names are written raw (the tar crate's
/// builder refuses `..`, which is what these tests need to send).
fn tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        let (name, data, kind, link): (&str, &[u8], tar::EntryType, Option<&str>) = match e {
            E::Dir(n) => (n, b"", tar::EntryType::Directory, None),
            E::File(n, d) => (n, d, tar::EntryType::Regular, None),
            E::Symlink(n, t) => (n, b"", tar::EntryType::Symlink, Some(t)),
            E::Hardlink(n, t) => (n, b"", tar::EntryType::Link, Some(t)),
            E::Char(n) => (n, b"", tar::EntryType::Char, None),
        };
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        out.append(&h, data).unwrap();
    }
    out.into_inner().unwrap()
}

fn unpack(layers: &[Vec<u8>], root: &Path) -> Result<(), UnpackError> {
    let digests: Vec<String> = (0..layers.len())
        .map(|i| format!("sha256:layer{i}"))
        .collect();
    let layers: Vec<Layer<'_>> = layers
        .iter()
        .zip(&digests)
        .map(|(data, digest)| Layer {
            digest,
            media_type: TAR,
            data,
        })
        .collect();
    unpack_layers(&layers, root, UnpackOptions::default())
}

#[test]
fn files_links_and_metadata_land_in_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    let layer = tar(&[
        E::Dir("etc/"),
        E::File("etc/hostname", b"box\n"),
        E::Symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        E::Hardlink("etc/hostname.bak", "etc/hostname"),
        E::File("./bin/tool", b"#!/bin/sh\n"),
    ]);
    unpack(&[layer], &root).unwrap();
    assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"box\n");
    assert_eq!(
        fs::read_link(root.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    let a = fs::metadata(root.join("etc/hostname")).unwrap();
    let b = fs::metadata(root.join("etc/hostname.bak")).unwrap();
    assert_eq!(a.ino(), b.ino(), "a hard link");
    assert_eq!((a.uid(), a.gid(), a.mode() & 0o7777), (1000, 1000, 0o644));
    assert_eq!(a.mtime(), 1_700_000_000);
    assert!(root.join("bin/tool").is_file());
}

#[test]
fn whiteouts_remove_lower_layers_entries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    let lower = tar(&[
        E::File("a/x", b"1"),
        E::File("a/y", b"2"),
        E::File("b/old", b"3"),
        E::File("c", b"file becomes dir"),
    ]);
    let upper = tar(&[
        E::File("a/.wh.x", b""),
        E::File("b/new", b"4"),
        E::File("b/.wh..wh..opq", b""),
        E::Dir("c/"),
        E::File("c/inside", b"5"),
    ]);
    unpack(&[lower, upper], &root).unwrap();
    assert!(!root.join("a/x").exists());
    assert!(root.join("a/y").exists());
    assert!(!root.join("a/.wh.x").exists(), "whiteouts are not files");
    assert!(!root.join("b/old").exists(), "opaque: lower entries gone");
    assert_eq!(
        fs::read(root.join("b/new")).unwrap(),
        b"4",
        "this layer's stay"
    );
    assert_eq!(fs::read(root.join("c/inside")).unwrap(), b"5");
}

#[test]
fn whiteouts_of_the_directory_or_its_parent_are_refused() {
    for name in [".wh...", ".wh..", ".wh.", "a/.wh...", "a/.wh.."] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        let sibling = dir.path().join("beside-the-root");
        fs::write(&sibling, b"keep").unwrap();
        let lower = tar(&[E::File("a/x", b"1"), E::File("top", b"2")]);
        let err = unpack(&[lower, tar(&[E::File(name, b"")])], &root).unwrap_err();
        assert!(
            kabuto_error::chain(&err).contains("names no entry of its directory"),
            "{name}: {err}"
        );
        assert!(sibling.exists(), "{name}: the root's parent is untouched");
        assert!(!root.exists(), "{name}: a refused pull leaves nothing");
    }
}

#[test]
fn a_late_opaque_marker_keeps_the_layers_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    let lower = tar(&[E::File("b/old", b"1"), E::File("b/sub/lower", b"2")]);
    // No entries for b/ or b/sub/ in the upper layer, and the marker last.
    let upper = tar(&[
        E::File("b/sub/own", b"3"),
        E::File("b/mine", b"4"),
        E::File("b/.wh..wh..opq", b""),
    ]);
    unpack(&[lower, upper], &root).unwrap();
    assert!(!root.join("b/old").exists(), "lower entries go");
    assert_eq!(fs::read(root.join("b/sub/own")).unwrap(), b"3");
    assert_eq!(fs::read(root.join("b/mine")).unwrap(), b"4");
    assert!(
        !root.join("b/sub/lower").exists(),
        "below an opaque directory no lower entry stays, at any depth"
    );
}

#[test]
fn absolute_symlinks_resolve_inside_the_root() {
    // Debian's /var/run -> /run: a later entry under var/run lands in
    // <root>/run, never in the host's /run.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    let layer = tar(&[
        E::Dir("run/"),
        E::Dir("var/"),
        E::Symlink("var/run", "/run"),
        E::File("var/run/marker", b"in the root"),
    ]);
    unpack(&[layer], &root).unwrap();
    assert_eq!(fs::read(root.join("run/marker")).unwrap(), b"in the root");
    assert!(!Path::new("/run/marker").exists());
}

/// Each must be refused naming the entry, and leave no rootfs behind.
#[test]
fn escapes_are_refused_and_nothing_remains() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, b"untouched").unwrap();
    let victim_rel = format!("../../../../../../../..{}", victim.display());
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            tar(&[E::File("../escape", b"x")]),
            "../escape",
            "contains `..`",
        ),
        (
            tar(&[E::File("a/../../escape", b"x")]),
            "a/../../escape",
            "contains `..`",
        ),
        (
            tar(&[
                E::Symlink("evil", "../../../../.."),
                E::File("evil/x", b"x"),
            ]),
            "evil/x",
            "climbs above the root",
        ),
        (
            tar(&[
                E::Symlink("one", "two/.."),
                E::Dir("two/"),
                E::Symlink("two/up", "../.."),
                E::File("two/up/x", b"x"),
            ]),
            "two/up/x",
            "climbs above the root",
        ),
        (
            tar(&[E::Hardlink("link", &victim_rel)]),
            "link",
            "contains `..`",
        ),
        (
            tar(&[E::Dir("d/"), E::Hardlink("link", "d")]),
            "link",
            "hard link to a directory",
        ),
        (
            tar(&[E::Symlink("loop", "loop"), E::File("loop/x", b"x")]),
            "loop/x",
            "too many levels of symlinks",
        ),
        (
            tar(&[E::Char("dev/kmsg")]),
            "dev/kmsg",
            "device nodes are not allowed",
        ),
    ];
    for (layer, entry, why) in cases {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        let good = tar(&[E::File("first-layer-file", b"ok")]);
        let err = unpack(&[good, layer], &root).unwrap_err();
        let err = kabuto_error::chain(&err);
        assert!(
            err.contains(&format!("entry {entry:?}")) && err.contains(why),
            "{entry}: {err}"
        );
        assert!(err.contains("layer sha256:layer1"), "{err}");
        assert!(
            !root.exists(),
            "{entry}: the half-unpacked rootfs is removed"
        );
        assert!(!dir.path().join("escape").exists());
    }
    assert_eq!(fs::read(&victim).unwrap(), b"untouched");
}

#[test]
fn compressed_layers_and_bad_media_types() {
    use std::io::Write as _;
    let plain = tar(&[E::File("hello", b"world")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gzipped = gz.finish().unwrap();
    let zstd = ruzstd::encoding::compress_to_vec(
        plain.as_slice(),
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    for (media_type, data) in [
        ("application/vnd.oci.image.layer.v1.tar+gzip", &gzipped),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            &gzipped,
        ),
        ("application/vnd.oci.image.layer.v1.tar+zstd", &zstd),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        let layer = Layer {
            digest: "sha256:x",
            media_type,
            data,
        };
        unpack_layers(&[layer], &root, UnpackOptions::default()).unwrap();
        assert_eq!(
            fs::read(root.join("hello")).unwrap(),
            b"world",
            "{media_type}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    let err = unpack_layers(
        &[Layer {
            digest: "sha256:x",
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            data: &plain,
        }],
        &root,
        UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(
        kabuto_error::chain(&err).contains("layer sha256:x"),
        "{err}"
    );
    assert!(!root.exists());
    let err = unpack_layers(
        &[Layer {
            digest: "sha256:x",
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            data: &gzipped,
        }],
        &root,
        UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(
        kabuto_error::chain(&err).contains("is not a layer"),
        "{err}"
    );
}

/// A raw header of `kind` claiming `size` bytes, its data (`data`, which
/// may be shorter than claimed: the refusal must come before any read),
/// padded to a block.
fn raw_entry(kind: tar::EntryType, name: &str, size: u64, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(size);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A PAX extension entry holding `records`.
fn pax_entry(records: &str) -> Vec<u8> {
    raw_entry(
        tar::EntryType::XHeader,
        "pax",
        records.len() as u64,
        records.as_bytes(),
    )
}

fn pax_record(key: &str, value: &str) -> String {
    // The length counts itself: try widths until it fits.
    let body = format!(" {key}={value}\n");
    for digits in 1..10 {
        let n = body.len() + digits;
        if n.to_string().len() == digits {
            return format!("{n}{body}");
        }
    }
    unreachable!()
}

/// GNU long names and PAX headers are metadata the unpacker reads into
/// memory: each is refused beyond 1 MiB before a byte of it is read (a
/// 4 GiB PAX header gzips to a few MB and would kill the guest's PID 1).
#[test]
fn oversized_long_names_and_pax_headers_are_refused_unread() {
    for kind in [
        tar::EntryType::XHeader,
        tar::EntryType::GNULongName,
        tar::EntryType::GNULongLink,
        tar::EntryType::XGlobalHeader,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let mut layer = raw_entry(kind, "././@LongLink", 4 << 30, b"");
        layer.extend_from_slice(&[0; 1024]);
        let err = unpack(&[layer], &root).unwrap_err();
        let err = kabuto_error::chain(&err);
        assert!(err.contains("more than 1048576"), "{kind:?}: {err}");
        assert!(!root.exists(), "nothing remains");
    }
}

/// Long names the usual ways (GNU `L` entries, PAX `path`/`linkpath`/
/// `uid`), read bounded, still unpack; a PAX size that disagrees with the
/// header (a parser differential) is refused.
#[test]
fn long_names_and_pax_records_apply_to_the_next_entry() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!("{}/file", "d".repeat(150));
    let mut builder = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(5);
    builder.append_data(&mut h, &long, &b"hello"[..]).unwrap();
    let mut layer = builder.into_inner().unwrap();
    layer.truncate(layer.len() - 1024); // drop the end marker
    let pax_name = format!("{}/pax", "p".repeat(150));
    let records = format!(
        "{}{}",
        pax_record("path", &pax_name),
        pax_record("uid", "4242")
    );
    layer.extend(pax_entry(&records));
    layer.extend(raw_entry(tar::EntryType::Regular, "short", 2, b"hi"));
    let link = pax_record("linkpath", &pax_name);
    layer.extend(pax_entry(&link));
    layer.extend(raw_entry(tar::EntryType::Symlink, "to-pax", 0, b""));
    layer.extend_from_slice(&[0; 1024]);
    let root = dir.path().join("root");
    unpack(&[layer], &root).unwrap();
    assert_eq!(fs::read(root.join(&long)).unwrap(), b"hello");
    assert_eq!(fs::read(root.join(&pax_name)).unwrap(), b"hi");
    assert_eq!(
        fs::symlink_metadata(root.join(&pax_name)).unwrap().uid(),
        4242
    );
    assert!(
        !root.join("short").exists(),
        "the PAX path replaced the header's"
    );
    assert_eq!(
        fs::read_link(root.join("to-pax")).unwrap(),
        Path::new(&pax_name)
    );

    let size = pax_record("size", "1");
    let mut layer = pax_entry(&size);
    layer.extend(raw_entry(tar::EntryType::Regular, "f", 2, b"hi"));
    layer.extend_from_slice(&[0; 1024]);
    let err = unpack(&[layer], &dir.path().join("r2")).unwrap_err();
    let err = kabuto_error::chain(&err);
    assert!(err.contains("PAX size"), "{err}");
    let mut layer = raw_entry(tar::EntryType::XHeader, "pax", 7, b"9 bad\n\0");
    layer.extend(raw_entry(tar::EntryType::Regular, "f", 0, b""));
    layer.extend_from_slice(&[0; 1024]);
    assert!(unpack(&[layer], &dir.path().join("r3")).is_err());
}
