use super::*;

/// Layers reach the consumer in order while later ones download, and
/// downloads never run more than the window ahead of it: a pull holds a
/// few blobs, not the image. A consumer's error stops the downloads.
#[test]
fn layers_stream_in_order_within_the_read_ahead_window() {
    use crate::sha256_digest;
    let blob = vec![9u8; 4096];
    let (address, seen) = flaky_blob_server(blob.clone(), 0);
    let image = ImageReference::parse(&format!("{address}/app:1")).expect("reference");
    let descriptor = crate::LayerDescriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: sha256_digest(&blob),
        size: blob.len() as u64,
        annotations: Default::default(),
    };
    let descriptors = vec![descriptor; 8];
    let mut client = RegistryClient::new(vec![address.clone()], None);
    let mut order = Vec::new();
    let mut most_requested = 0;
    client
        .for_each_layer(
            &image,
            &descriptors,
            |i, got| {
                // Give the fetchers time to run as far ahead as they may.
                std::thread::sleep(Duration::from_millis(150));
                let requested = seen.lock().expect("log").len();
                most_requested = most_requested.max(requested - i);
                assert_eq!(got, blob);
                order.push(i);
                Ok::<(), RegistryError>(())
            },
            |e| e,
        )
        .expect("streams");
    assert_eq!(order, (0..8).collect::<Vec<_>>());
    assert!(
        most_requested <= PARALLEL_LAYER_FETCHES + 1,
        "{most_requested} requests ahead of the consumer"
    );

    let before = seen.lock().expect("log").len();
    let err = client
        .for_each_layer(
            &image,
            &descriptors,
            |i, _| if i == 1 { Err("stop") } else { Ok(()) },
            |_| "fetch",
        )
        .expect_err("consumer error");
    assert_eq!(err, "stop");
    let fetched = seen.lock().expect("log").len() - before;
    assert!(
        fetched < descriptors.len(),
        "{fetched} fetched after the stop"
    );
}

#[test]
fn no_request_runs_past_the_deadline() {
    let (address, seen) = flaky_blob_server(vec![7; 1024], 0);
    let image = ImageReference::parse(&format!("{address}/app:1")).expect("reference");
    let mut client = RegistryClient::new(vec![address.clone()], None)
        .with_deadline(Some(std::time::Instant::now()));
    let err = client
        .blob(&image, "sha256:00", "layer", 4096, None)
        .expect_err("past the deadline");
    assert!(kabuto_error::chain(&err).contains(DEADLINE_PASSED), "{err}");
    assert!(
        seen.lock().expect("log").is_empty(),
        "nothing was sent after the deadline"
    );
}

#[test]
fn credentials_go_only_to_realms_over_https_or_the_insecure_registry_itself() {
    let https_registry = "https://r.example/v2/app/manifests/1";
    let http_registry = "http://127.0.0.1:5000/v2/app/manifests/1";
    assert!(realm_may_get_credentials(
        "https://auth.example/token",
        https_registry
    ));
    assert!(realm_may_get_credentials(
        "HTTPS://auth.example/token",
        http_registry
    ));
    // A challenge naming a plain-http realm elsewhere: refused.
    assert!(!realm_may_get_credentials(
        "http://auth.example/token",
        https_registry
    ));
    assert!(!realm_may_get_credentials(
        "http://evil.example/token",
        http_registry
    ));
    assert!(!realm_may_get_credentials(
        "http://127.0.0.1:6000/token",
        http_registry
    ));
    // Plain http to the insecure registry's own host and port.
    assert!(realm_may_get_credentials(
        "http://127.0.0.1:5000/token?x=1",
        http_registry
    ));
    assert!(!realm_may_get_credentials(
        "ftp://auth.example/token",
        https_registry
    ));
    assert!(!realm_may_get_credentials("http://", http_registry));
}

/// A registry stand-in serving one blob: the first `drops` responses
/// send half of it and close the connection; later ones honour Range.
/// Returns its address and the request heads it saw.
fn flaky_blob_server(
    blob: Vec<u8>,
    drops: usize,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let from = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("range: bytes=")
                        .map(str::to_owned)
                })
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
            log.lock().expect("log").push(head);
            let _ = if n < drops {
                let half = blob.len() / 2;
                stream
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len())
                            .as_bytes(),
                    )
                    .and_then(|_| stream.write_all(&blob[..half]))
            } else if let Some(from) = from {
                stream
                    .write_all(
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\r\n",
                            blob.len() - from,
                            blob.len() - 1,
                            blob.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|_| stream.write_all(&blob[from..]))
            } else {
                stream
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len())
                            .as_bytes(),
                    )
                    .and_then(|_| stream.write_all(&blob))
            };
        }
    });
    (address, seen)
}

#[test]
fn a_dropped_download_resumes_where_it_stopped() {
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let digest = crate::sha256_digest(&blob);
    let (address, seen) = flaky_blob_server(blob.clone(), 1);
    let image = ImageReference::parse(&format!("{address}/r/x:1")).expect("reference");
    let mut client = RegistryClient::new(vec![address.clone()], None);
    let got = client
        .blob(&image, &digest, "layer", 1 << 30, None)
        .expect("resumed download");
    assert!(got == blob, "the resumed blob is the blob");
    let heads = seen.lock().expect("log").clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[1]
            .to_ascii_lowercase()
            .contains("range: bytes=150000-"),
        "{}",
        heads[1]
    );

    // A server that always drops: an error once the resumes are spent.
    let (address, _) = flaky_blob_server(blob, usize::MAX);
    let image = ImageReference::parse(&format!("{address}/r/x:1")).expect("reference");
    let mut client = RegistryClient::new(vec![address], None);
    let e = client
        .blob(&image, &digest, "layer", 1 << 30, None)
        .expect_err("never completes");
    assert!(kabuto_error::chain(&e).contains("resumed attempts"), "{e}");
}

#[test]
fn references_parse_like_docker() {
    let r = |s: &str| ImageReference::parse(s).expect(s);
    assert_eq!(
        r("busybox"),
        ImageReference {
            registry: "docker.io".into(),
            repository: "library/busybox".into(),
            reference: "latest".into()
        }
    );
    assert_eq!(r("team/app:v1").repository, "team/app");
    let local = r("127.0.0.1:5000/kabuto/busybox:1");
    assert_eq!(
        (
            local.registry.as_str(),
            local.repository.as_str(),
            local.reference.as_str()
        ),
        ("127.0.0.1:5000", "kabuto/busybox", "1")
    );
    let pinned = r("localhost/app@sha256:ab");
    assert_eq!(pinned.reference, "sha256:ab");
    assert_eq!(r("busybox").api_host(), "registry-1.docker.io");
    assert!(ImageReference::parse("UPPER/case").is_err());
    assert!(ImageReference::parse("").is_err());
}
