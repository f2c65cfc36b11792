//! Software TEE: SNP-format attestation reports signed by a simulated
//! firmware key. Insecure by construction; see README.md.

use std::io::Read;
use std::path::PathBuf;

use sha2::{Digest, Sha384};

#[cfg(feature = "firmware")]
mod firmware;
#[cfg(feature = "firmware")]
pub use firmware::{init, pem_to_der, root_cert_path, Firmware};

/// Size of an SEV-SNP attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// The report's signature covers bytes 0..SIGNED_LEN.
pub const SIGNED_LEN: usize = 0x2A0;
/// The common name every software-TEE root carries, so that nobody mistakes it.
pub const ROOT_COMMON_NAME: &str = "kabuto software TEE root (INSECURE: testing only)";
/// Upper bound for one certificate on the wire.
const MAX_CERT_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SwteeError {
    #[error("software TEE files in {dir}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("software TEE already initialised in {0} (remove it to start over)")]
    Exists(PathBuf),
    #[error("software TEE key or certificate: {0}")]
    Key(String),
    #[error("software TEE wire format: {0}")]
    Wire(String),
}

pub type Result<T> = std::result::Result<T, SwteeError>;

/// What the runtime fixes at launch and the firmware reports unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchData {
    /// Digest of kernel, initramfs and command line (see [`measurement`]).
    pub measurement: [u8; 48],
    /// The init-data digest, zero-padded to 32 bytes (SNP HOST_DATA).
    pub host_data: [u8; 32],
}

/// MEASUREMENT of a software-TEE guest: SHA-384 over a domain label and the
/// SHA-384 digests of kernel, initramfs and command line. (Real SNP measures
/// guest memory pages; this stands in for it with the same meaning: "this
/// exact boot chain".)
pub fn measurement(kernel: &[u8], initramfs: &[u8], cmdline: &str) -> [u8; 48] {
    let mut outer = Sha384::new();
    outer.update(b"kabuto-swtee-measurement-v1");
    for part in [kernel, initramfs, cmdline.as_bytes()] {
        outer.update(Sha384::digest(part));
    }
    outer.finalize().into()
}

/// A reply from the software-TEE firmware, as the guest reads it.
pub struct FirmwareReply {
    pub report: Vec<u8>,
    pub firmware_cert_der: Vec<u8>,
    pub root_cert_der: Vec<u8>,
}

/// Guest side of the wire format: reads one reply (bounded sizes).
pub fn read_reply(stream: &mut impl Read) -> Result<FirmwareReply> {
    let mut blobs = Vec::with_capacity(3);
    for (what, max) in [
        ("report", REPORT_LEN),
        ("firmware certificate", MAX_CERT_LEN),
        ("root certificate", MAX_CERT_LEN),
    ] {
        let mut len = [0u8; 4];
        stream
            .read_exact(&mut len)
            .map_err(|e| SwteeError::Wire(format!("{what} length: {e}")))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > max || (what == "report" && len != REPORT_LEN) {
            return Err(SwteeError::Wire(format!("{what} of {len} bytes")));
        }
        let mut blob = vec![0u8; len];
        stream
            .read_exact(&mut blob)
            .map_err(|e| SwteeError::Wire(format!("{what}: {e}")))?;
        blobs.push(blob);
    }
    let root_cert_der = blobs.pop().unwrap_or_default();
    let firmware_cert_der = blobs.pop().unwrap_or_default();
    let report = blobs.pop().unwrap_or_default();
    Ok(FirmwareReply {
        report,
        firmware_cert_der,
        root_cert_der,
    })
}

#[cfg(all(test, feature = "firmware"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sev::parser::ByteParser;
    use std::io::Write;

    #[test]
    fn reports_parse_as_snp_and_verify_with_the_firmware_key() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(matches!(init(dir.path()), Err(SwteeError::Exists(_))));
        let fw = Firmware::load(dir.path()).unwrap();
        let launch = LaunchData {
            measurement: measurement(b"k", b"i", "console=hvc0"),
            host_data: [7; 32],
        };
        let report = fw.report(&launch, &[9; 64]).unwrap();
        let parsed = sev::firmware::guest::AttestationReport::from_bytes(&report).unwrap();
        assert_eq!(parsed.version, 3);
        assert_eq!(parsed.report_data, [9; 64]);
        assert_eq!(parsed.host_data, [7; 32]);
        assert_eq!(parsed.measurement, launch.measurement);
        // Re-encoding gives the same signed bytes (JSON evidence relies on it).
        assert_eq!(
            &parsed.to_bytes().unwrap()[..SIGNED_LEN],
            &report[..SIGNED_LEN]
        );

        let mut wire = Vec::new();
        let mut duplex = std::io::Cursor::new(vec![9u8; 64]);
        // serve_one reads from and writes to the same stream; emulate with two buffers.
        struct Pipe<'a>(&'a mut std::io::Cursor<Vec<u8>>, &'a mut Vec<u8>);
        impl Read for Pipe<'_> {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                self.0.read(b)
            }
        }
        impl Write for Pipe<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        fw.serve_one(&launch, &mut Pipe(&mut duplex, &mut wire))
            .unwrap();
        let reply = read_reply(&mut wire.as_slice()).unwrap();
        assert_eq!(reply.report.len(), REPORT_LEN);
        assert_eq!(&reply.report[0x50..0x50 + 64], &[9; 64]);
        assert_eq!(reply.root_cert_der, fw.root_cert_der());
    }

    #[test]
    fn measurement_depends_on_every_part() {
        let base = measurement(b"k", b"i", "c");
        assert_ne!(base, measurement(b"K", b"i", "c"));
        assert_ne!(base, measurement(b"k", b"I", "c"));
        assert_ne!(base, measurement(b"k", b"i", "C"));
    }
}
