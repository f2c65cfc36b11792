//! A local OCI registry (Debian's docker-registry) and a small HTTP file server.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use crate::*;

/// A private OCI registry (Debian's `docker-registry`) on loopback, with its
/// storage in a temporary directory; killed on drop.
pub struct Registry {
    dir: tempfile::TempDir,
    child: Child,
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// `user:password` when the registry wants them.
    credentials: Option<String>,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// With `credentials`, the registry wants HTTP basic auth (htpasswd,
    /// bcrypt) for every request, pushes included.
    pub fn start_with(credentials: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("kabuto-registry-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let host = format!("127.0.0.1:{port}");
        let auth = match credentials {
            None => String::new(),
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                let path = dir.path().join("htpasswd");
                fs::write(&path, format!("{user}:{hash}\n")).expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: kabuto-test\n    path: {}\n",
                    path.display()
                )
            }
        };
        fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {host}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let log = fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting docker-registry (apt-get install docker-registry)");
        let r = Registry {
            dir,
            child,
            host,
            credentials: credentials.map(|(u, p)| format!("{u}:{p}")),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&r.host).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not come up");
            thread::sleep(Duration::from_millis(100));
        }
        r
    }

    /// Copies `tag` of the OCI layout `layout` to `<host>/<repository>:<tag>`
    /// with skopeo; returns the pushed reference.
    pub fn push_layout(&self, layout: &Path, tag: &str, repository: &str) -> String {
        let reference = format!("{}/{repository}:{tag}", self.host);
        let source = format!("oci:{}:{tag}", layout.display());
        let target = format!("docker://{reference}");
        let mut args = vec!["copy", "--quiet", "--dest-tls-verify=false"];
        if let Some(credentials) = &self.credentials {
            args.extend(["--dest-creds", credentials.as_str()]);
        }
        args.extend([source.as_str(), target.as_str()]);
        run_tool("skopeo", &args);
        reference
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The registry's storage directory.
    pub fn storage(&self) -> &Path {
        self.dir.path()
    }

    /// Where the registry keeps the blob `sha256:<hex>` (to corrupt it).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A read-only HTTP server for the files under a directory (a lookaside
/// signature store, say) on loopback; a thread per connection, GET only.
pub struct FileServer {
    pub port: u16,
}

impl FileServer {
    pub fn start(root: &Path) -> FileServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let root = root.to_path_buf();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let root = root.clone();
                thread::spawn(move || Self::serve(stream, &root));
            }
        });
        FileServer { port }
    }

    fn serve(mut stream: std::net::TcpStream, root: &Path) {
        use std::io::{BufRead, BufReader};
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut request = String::new();
        if reader.read_line(&mut request).is_err() {
            return;
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => break,
                Ok(_) if header.trim().is_empty() => break,
                Ok(_) => {}
            }
        }
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        let mut decoded = Vec::new();
        let bytes = path.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(b) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                    decoded.push(b);
                    i += 3;
                    continue;
                }
            }
            decoded.push(bytes[i]);
            i += 1;
        }
        let relative = String::from_utf8_lossy(&decoded)
            .trim_start_matches('/')
            .to_string();
        let body = (!relative.split('/').any(|c| c == ".."))
            .then(|| fs::read(root.join(&relative)).ok())
            .flatten();
        let _ = match body {
            Some(body) => stream
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                )
                .and_then(|_| stream.write_all(&body)),
            None => stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
        };
    }
}
