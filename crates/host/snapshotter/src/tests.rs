use std::collections::HashMap;

use containerd_snapshots::Snapshotter as _;
use tokio_stream::StreamExt as _;

use super::*;

fn open(root: &Path, content: &Path) -> KabutoSnapshotter {
    let policy = GuestPullPolicy::new(vec!["reg/secure/*".into()], true, content);
    KabutoSnapshotter::open(root, policy).expect("open")
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn names(s: &KabutoSnapshotter, filters: &[&str]) -> Vec<String> {
    let mut stream = s
        .list(
            String::new(),
            filters.iter().map(|f| f.to_string()).collect(),
        )
        .await
        .expect("list");
    let mut out = Vec::new();
    while let Some(info) = stream.next().await {
        out.push(info.expect("info").name);
    }
    out.sort();
    out
}

#[tokio::test]
async fn overlay_lifecycle_matches_containerds_overlayfs_snapshotter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir.path().join("root"), dir.path());
    let m = s
        .prepare("l1-active".into(), String::new(), HashMap::new())
        .await
        .expect("prepare");
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    let upper = PathBuf::from(&m[0].source);
    std::fs::write(upper.join("file"), b"layer one").expect("write");
    s.commit("l1".into(), "l1-active".into(), labels(&[("a", "b")]))
        .await
        .expect("commit");
    assert!(matches!(
        s.stat("l1-active".into()).await,
        Err(SnapshotError::NotFound(_))
    ));
    let info = s.stat("l1".into()).await.expect("stat");
    assert_eq!(info.kind, containerd_snapshots::Kind::Committed);
    assert_eq!(info.labels, labels(&[("a", "b")]));
    assert!(s.usage("l1".into()).await.expect("usage").size > 0);

    s.prepare("l2-active".into(), "l1".into(), HashMap::new())
        .await
        .expect("prepare l2");
    s.commit("l2".into(), "l2-active".into(), HashMap::new())
        .await
        .expect("commit l2");
    let m = s
        .prepare("ctr".into(), "l2".into(), HashMap::new())
        .await
        .expect("container");
    assert_eq!(m[0].r#type, "overlay");
    let o = &m[0].options;
    let lower = o
        .iter()
        .find(|o| o.starts_with("lowerdir="))
        .expect("lower");
    let l1 = s.get("l1").expect("l1").id;
    let l2 = s.get("l2").expect("l2").id;
    assert!(
        lower.ends_with(&format!("/{l2}/fs:{}/{l1}/fs", s.snapshots_dir.display())),
        "nearest parent first: {lower}"
    );
    assert!(o.iter().any(|o| o.starts_with("upperdir=")));
    assert!(o.iter().any(|o| o.starts_with("workdir=")));
    assert_eq!(s.mounts("ctr".into()).await.expect("mounts"), m);

    // Views: one parent is a read-only bind, several an overlay without upper.
    let v = s
        .view("v1".into(), "l1".into(), HashMap::new())
        .await
        .expect("view");
    assert_eq!(
        (v[0].r#type.as_str(), v[0].options[0].as_str()),
        ("bind", "ro")
    );
    let v = s
        .view("v2".into(), "l2".into(), HashMap::new())
        .await
        .expect("view");
    assert!(v[0].options.iter().all(|o| !o.starts_with("upperdir=")));

    // Refusals change nothing.
    assert!(matches!(
        s.prepare("ctr".into(), "l2".into(), HashMap::new()).await,
        Err(SnapshotError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.prepare("x".into(), "ctr".into(), HashMap::new()).await,
        Err(SnapshotError::InvalidArgument(_))
    ));
    assert!(matches!(
        s.prepare("x".into(), "nope".into(), HashMap::new()).await,
        Err(SnapshotError::NotFound(_))
    ));
    assert!(matches!(
        s.remove("l2".into()).await,
        Err(SnapshotError::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.mounts("l1".into()).await,
        Err(SnapshotError::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.commit("l1".into(), "ctr".into(), HashMap::new()).await,
        Err(SnapshotError::AlreadyExists(_))
    ));
    assert_eq!(names(&s, &[]).await, ["ctr", "l1", "l2", "v1", "v2"]);

    // Labels: one label, then all of them.
    let mut info = s.stat("l1".into()).await.expect("stat");
    info.labels = labels(&[("c", "d")]);
    let updated = s
        .update(info, Some(vec!["labels.c".into()]))
        .await
        .expect("update");
    assert_eq!(updated.labels, labels(&[("a", "b"), ("c", "d")]));
    let mut info = s.stat("l1".into()).await.expect("stat");
    info.parent = "changed".into();
    assert!(matches!(
        s.update(info, Some(vec!["parent".into()])).await,
        Err(SnapshotError::InvalidArgument(_))
    ));

    // Empty values remove labels, as in containerd.
    let mut info = s.stat("l1".into()).await.expect("stat");
    info.labels = labels(&[("c", "")]);
    let updated = s
        .update(info, Some(vec!["labels.c".into()]))
        .await
        .expect("update");
    assert_eq!(updated.labels, labels(&[("a", "b")]));
    // containerd's filter semantics: `==` needs the field; every snapshot
    // has a parent field (empty for a base layer).
    assert_eq!(names(&s, &[r#"parent=="""#]).await, ["l1"]);
    assert!(names(&s, &[r#"labels.nope=="""#]).await.is_empty());
    assert_eq!(names(&s, &["labels.a==b"]).await, ["l1"]);
    // Image contents are root's only; each layer's root is 0755.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("root")), 0o700);
    assert_eq!(mode(&s.snapshots_dir), 0o700);
    assert_eq!(mode(&upper), 0o755);

    for key in ["ctr", "v1", "v2", "l2", "l1"] {
        let id = s.get(key).expect("record").id;
        s.remove(key.into()).await.expect("remove");
        assert!(!s.dir(id).exists(), "{key}'s directory is gone");
    }
    assert!(names(&s, &[]).await.is_empty());
}

#[tokio::test]
async fn layers_of_guest_pulled_images_are_committed_empty_and_reported_as_existing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir.path().join("root"), dir.path());
    let layer = |target: &str, image: &str| {
        labels(&[
            (guest_pull::SNAPSHOT_REF, target),
            (guest_pull::CRI_IMAGE_REF, image),
        ])
    };
    let err = s
        .prepare(
            "ns/1/extract-1".into(),
            String::new(),
            layer("sha256:c1", "reg/secure/app:1"),
        )
        .await
        .expect_err("left to the guest");
    assert!(
        matches!(&err, SnapshotError::AlreadyExists(t) if t == "sha256:c1"),
        "{err}"
    );
    s.prepare(
        "ns/2/extract-2".into(),
        "ns/1/extract-1".into(),
        layer("sha256:c2", "reg/secure/app:1"),
    )
    .await
    .expect_err("left to the guest");
    // containerd's metadata layer looks the committed layer up like this.
    let found = names(
        &s,
        &[r#"labels."containerd.io/snapshot.ref"==sha256:c2,parent=="ns/1/extract-1""#],
    )
    .await;
    assert_eq!(found, ["ns/2/extract-2"]);
    let info = s.stat("ns/2/extract-2".into()).await.expect("stat");
    assert_eq!(info.kind, containerd_snapshots::Kind::Committed);
    assert_eq!(
        info.labels.get(GUEST_PULLED_LABEL).map(String::as_str),
        Some("true")
    );
    // The container's rootfs on top: an overlay of empty layers.
    let m = s
        .prepare("ctr".into(), "ns/2/extract-2".into(), HashMap::new())
        .await
        .expect("container snapshot");
    assert_eq!(m[0].r#type, "overlay");

    // An image sharing those layers cannot be unpacked on top of them:
    // its rootfs would have holes.
    let err = s
        .prepare(
            "ns/4/extract-4".into(),
            "ns/2/extract-2".into(),
            layer("sha256:c4", "reg/open/twin:1"),
        )
        .await
        .expect_err("unpacking onto guest-pulled layers");
    assert!(
        matches!(&err, SnapshotError::FailedPrecondition(m) if m.contains("reg/open/twin:1") && m.contains("sha256:c2")),
        "{err}"
    );
    // Replacing all labels keeps the guest-pulled mark.
    let mut info = s.stat("ns/1/extract-1".into()).await.expect("stat");
    info.labels = HashMap::new();
    let kept = s.update(info, None).await.expect("update");
    assert_eq!(
        kept.labels.get(GUEST_PULLED_LABEL).map(String::as_str),
        Some("true")
    );

    // Other images' layers are unpacked here as usual.
    let m = s
        .prepare(
            "ns/3/extract-3".into(),
            String::new(),
            layer("sha256:c3", "reg/open/app:1"),
        )
        .await
        .expect("host unpack");
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(
        names(&s, &["kind==active"]).await,
        ["ctr", "ns/3/extract-3"]
    );
    assert_eq!(
        names(&s, &[r#"labels."kabuto.io/guest-pulled""#]).await,
        ["ns/1/extract-1", "ns/2/extract-2"]
    );
    assert!(matches!(
        s.list(String::new(), vec!["name~=x".into()]).await,
        Err(SnapshotError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn records_survive_a_restart_and_orphaned_directories_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    {
        let s = open(&root, dir.path());
        s.prepare("a".into(), String::new(), HashMap::new())
            .await
            .expect("prepare");
        s.commit("b".into(), "a".into(), HashMap::new())
            .await
            .expect("commit");
    }
    // A directory from a prepare that crashed before its record was written.
    let orphan = root.join("snapshots/999");
    std::fs::create_dir_all(orphan.join("fs")).expect("orphan");
    let s = open(&root, dir.path());
    assert!(!orphan.exists());
    let b = s.stat("b".into()).await.expect("b survived");
    assert_eq!(b.kind, containerd_snapshots::Kind::Committed);
    assert!(s.dir(s.get("b").expect("b").id).join("fs").is_dir());
    // Ids are not reused after the restart.
    s.prepare("c".into(), String::new(), HashMap::new())
        .await
        .expect("prepare");
    assert_ne!(s.get("c").expect("c").id, s.get("b").expect("b").id);
}
