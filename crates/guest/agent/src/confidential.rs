//! Confidential pods: the TEE the guest runs in, the init-data binding
//! check against its launch data, and the KBS client from init-data (the
//! data hub that serves KBS resources is [`crate::data_hub`]).

use std::time::Duration;

use base64::Engine;
use kabuto_attestation_agent::{evidence, AttestError, EvidenceProvider, KbsClient, TeeKind};
use kabuto_protocol::{KERNEL_PARAM_TEE, SWTEE_VSOCK_PORT};

/// The host's vsock context id.
const HOST_CID: u32 = 2;

/// How an owner allows CoCo's sample attester.
const ALLOW_SAMPLE: &str = "init-data aa.toml [kabuto] allow_sample_attester = true";

/// Why a confidential pod cannot start (its guarantees would not hold).
#[derive(Debug, thiserror::Error)]
pub enum ConfidentialError {
    #[error("kabuto.tee")]
    TeeKind(#[source] AttestError),
    #[error(
        "this guest runs in a TEE ({0}) but its kernel command line names none (kabuto.tee=): \
         refusing to serve a sandbox"
    )]
    UnnamedTee(&'static str),
    #[error("the TEE's evidence provider")]
    Provider(#[source] AttestError),
    #[error("reading the TEE's launch data")]
    Evidence(#[source] AttestError),
    #[error("malformed HOST_DATA in the SNP report")]
    HostData,
    #[error("TDX quote")]
    QuoteBase64(#[source] base64::DecodeError),
    #[error("TDX quote too short")]
    QuoteShort,
    #[error("the TEE's evidence carries no launch data")]
    NoLaunchData,
    #[error(
        "the init-data's digest {expected} does not match the TEE's {field} {launch}: the host \
         changed the init-data after launch; refusing it and every container"
    )]
    Binding {
        expected: String,
        field: &'static str,
        launch: String,
    },
    #[error(
        "kabuto.tee=sample on a guest with {0}: a TEE guest attests with its TEE, never with \
         sample evidence"
    )]
    SampleOnTee(&'static str),
    #[error(
        "kabuto.tee=sample needs init-data that allows CoCo's sample attester ({ALLOW_SAMPLE})"
    )]
    SampleNoInitData,
    #[error(
        "kabuto.tee=sample, but the init-data does not allow CoCo's sample attester ({ALLOW_SAMPLE})"
    )]
    SampleNotAllowed,
    #[error("init-data aa.toml: kabuto.allow_sample_attester must be true or false, not {0}")]
    SampleValue(String),
    #[error("init-data aa.toml")]
    AaToml(#[source] toml::de::Error),
    #[error("init-data aa.toml: token_configs.kbs has no url")]
    KbsNoUrl,
    #[error(
        "init-data aa.toml: the KBS URL {0:?} is not https://: a confidential guest reaches its \
         KBS only over TLS"
    )]
    KbsNotHttps(String),
    #[error(
        "init-data aa.toml: token_configs.kbs has no cert: a confidential guest trusts only the \
         KBS certificate (or CA) its init-data pins"
    )]
    KbsNoCert,
    #[error("init-data is not UTF-8")]
    InitDataUtf8,
    #[error("the KBS client")]
    KbsClient(#[source] AttestError),
}

/// The TEE the runtime launched this guest in, from the kernel command
/// line. The host could lie here, but only to its own loss: without
/// evidence from the claimed TEE no KBS releases anything.
pub fn tee_from_cmdline(cmdline: &str) -> Result<Option<TeeKind>, ConfidentialError> {
    let prefix = format!("{KERNEL_PARAM_TEE}=");
    match cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
    {
        None => Ok(None),
        Some(kind) => kind
            .parse::<TeeKind>()
            .map(Some)
            .map_err(ConfidentialError::TeeKind),
    }
}

/// True when the command line has a `kabuto.tee=` parameter, whatever its
/// value: such a guest starts closed (an unknown value must not open it).
pub fn names_a_tee(cmdline: &str) -> bool {
    let prefix = format!("{KERNEL_PARAM_TEE}=");
    cmdline
        .split_whitespace()
        .any(|w| w.starts_with(prefix.as_str()))
}

/// The TEE guest interface this guest has, if any: such a guest is
/// confidential whatever its (host-written) command line says.
pub fn tee_hardware() -> Option<&'static str> {
    [
        ("/dev/sev-guest", "SEV-SNP"),
        ("/dev/tdx_guest", "TDX"),
        ("/sys/kernel/config/tsm/report", "configfs-tsm"),
    ]
    .into_iter()
    .find(|(path, _)| std::path::Path::new(path).exists())
    .map(|(_, name)| name)
}

/// True for a guest that must treat the host as the attacker: its command
/// line names a TEE (any value), or it has TEE hardware whatever the
/// command line says.
pub fn is_confidential(cmdline: &str) -> bool {
    names_a_tee(cmdline) || tee_hardware().is_some()
}

/// Connects to the software TEE's firmware on the host.
fn software_tee_connector() -> evidence::Connector {
    Box::new(|| {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(std::io::Error::from)?;
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(HOST_CID, SWTEE_VSOCK_PORT),
        )
        .map_err(std::io::Error::from)?;
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Box::new(stream) as Box<dyn evidence::ReadWrite>)
    })
}

/// The evidence provider for `kind`; never another kind.
pub fn provider(kind: TeeKind) -> Result<Box<dyn EvidenceProvider>, ConfidentialError> {
    let connector = (kind == TeeKind::SoftwareTee).then(software_tee_connector);
    kabuto_attestation_agent::provider(kind, connector).map_err(ConfidentialError::Provider)
}

/// The launch data the TEE reports: SNP HOST_DATA (32 bytes) or TDX
/// MRCONFIGID (48 bytes), read from fresh evidence.
pub fn launch_data(provider: &dyn EvidenceProvider) -> Result<Vec<u8>, ConfidentialError> {
    let evidence = provider
        .evidence(&[0u8; 64])
        .map_err(ConfidentialError::Evidence)?;
    if let Some(host_data) = evidence
        .get("attestation_report")
        .and_then(|r| r.get("host_data"))
        .and_then(|h| h.as_array())
    {
        return host_data
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or(ConfidentialError::HostData);
    }
    if let Some(quote) = evidence.get("quote").and_then(|q| q.as_str()) {
        // Quote header (48 bytes), then the TD report body, whose
        // MRCONFIGID sits at offset 184.
        const MRCONFIGID: std::ops::Range<usize> = 48 + 184..48 + 232;
        let quote = base64::engine::general_purpose::STANDARD
            .decode(quote)
            .map_err(ConfidentialError::QuoteBase64)?;
        return quote
            .get(MRCONFIGID)
            .map(<[u8]>::to_vec)
            .ok_or(ConfidentialError::QuoteShort);
    }
    Err(ConfidentialError::NoLaunchData)
}

/// Refuses init-data whose digest is not what the TEE was launched with.
pub fn check_binding(digest: &[u8], launch: &[u8]) -> Result<(), ConfidentialError> {
    let field = if launch.len() == 48 {
        "MRCONFIGID"
    } else {
        "HOST_DATA"
    };
    let expected = kabuto_initdata::fit_digest(digest, launch.len());
    if expected != launch {
        return Err(ConfidentialError::Binding {
            expected: hex::encode(&expected),
            field,
            launch: hex::encode(launch),
        });
    }
    Ok(())
}

/// Whether the owner's init-data allows CoCo's sample attester: `aa.toml`
/// `[kabuto] allow_sample_attester = true`. CoCo falls back to sample
/// evidence when it finds no TEE; kabuto uses it only when the host
/// launched the guest with `kabuto.tee=sample`, this says yes, and the guest
/// has no TEE hardware.
pub fn sample_attester_allowed(aa_toml: Option<&str>) -> Result<(), ConfidentialError> {
    if let Some(hardware) = tee_hardware() {
        return Err(ConfidentialError::SampleOnTee(hardware));
    }
    let Some(aa_toml) = aa_toml else {
        return Err(ConfidentialError::SampleNoInitData);
    };
    let doc: toml::Value = toml::from_str(aa_toml).map_err(ConfidentialError::AaToml)?;
    match doc
        .get("kabuto")
        .and_then(|k| k.get("allow_sample_attester"))
    {
        Some(toml::Value::Boolean(true)) => Ok(()),
        Some(toml::Value::Boolean(false)) | None => Err(ConfidentialError::SampleNotAllowed),
        Some(other) => Err(ConfidentialError::SampleValue(other.to_string())),
    }
}

/// KBS settings from init-data `aa.toml`, as CoCo writes them:
/// `[token_configs.kbs] url = "...", cert = "PEM"`.
#[derive(Debug)]
pub struct KbsSettings {
    pub url: String,
    pub cert: Option<String>,
}

pub fn kbs_settings(aa_toml: &str) -> Result<Option<KbsSettings>, ConfidentialError> {
    let doc: toml::Value = toml::from_str(aa_toml).map_err(ConfidentialError::AaToml)?;
    let Some(kbs) = doc.get("token_configs").and_then(|t| t.get("kbs")) else {
        return Ok(None);
    };
    let url = kbs
        .get("url")
        .and_then(|u| u.as_str())
        .ok_or(ConfidentialError::KbsNoUrl)?
        .to_string();
    let cert = kbs
        .get("cert")
        .and_then(|c| c.as_str())
        .filter(|c| !c.trim().is_empty())
        .map(str::to_owned);
    // Encryption to the guest's key keeps a resource from the host, but only
    // TLS to a certificate the owner pinned proves it came from the KBS: a
    // host in the middle would serve its own image policy and keys.
    if !url.starts_with("https://") {
        return Err(ConfidentialError::KbsNotHttps(url));
    }
    if cert.is_none() {
        return Err(ConfidentialError::KbsNoCert);
    }
    Ok(Some(KbsSettings { url, cert }))
}

pub fn kbs_client(
    settings: &KbsSettings,
    provider: Box<dyn EvidenceProvider>,
    init_data: &[u8],
) -> Result<KbsClient, ConfidentialError> {
    let init_data =
        String::from_utf8(init_data.to_vec()).map_err(|_| ConfidentialError::InitDataUtf8)?;
    KbsClient::new(
        &settings.url,
        settings.cert.as_deref().map(str::as_bytes),
        provider,
        Some(init_data),
    )
    .map_err(ConfidentialError::KbsClient)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_kbs_is_reached_over_pinned_tls_only() {
        let pem = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n";
        let ok =
            format!("[token_configs.kbs]\nurl = \"https://10.0.2.2:8080\"\ncert = '''\n{pem}'''\n");
        let settings = kbs_settings(&ok).unwrap().unwrap();
        assert_eq!(settings.url, "https://10.0.2.2:8080");
        let http = "[token_configs.kbs]\nurl = \"http://10.0.2.2:8080\"\ncert = \"x\"\n";
        assert!(kbs_settings(http)
            .unwrap_err()
            .to_string()
            .contains("not https://"));
        let no_cert = "[token_configs.kbs]\nurl = \"https://10.0.2.2:8080\"\n";
        assert!(kbs_settings(no_cert)
            .unwrap_err()
            .to_string()
            .contains("has no cert"));
        let empty_cert = "[token_configs.kbs]\nurl = \"https://kbs\"\ncert = \"\"\n";
        assert!(kbs_settings(empty_cert)
            .unwrap_err()
            .to_string()
            .contains("has no cert"));
        assert!(kbs_settings("[other]\n").unwrap().is_none());
    }

    #[test]
    fn binding_check() {
        assert!(check_binding(&[1; 32], &[1; 32]).is_ok());
        assert!(check_binding(
            &[1; 32],
            &[1; 32].iter().chain(&[0; 16]).copied().collect::<Vec<_>>()
        )
        .is_ok());
        let err = check_binding(&[1; 32], &[2; 32]).unwrap_err().to_string();
        assert!(err.contains("HOST_DATA"), "{err}");
        // No init-data: the launch data must be empty (all zero) too.
        assert!(check_binding(&[], &[0; 32]).is_ok());
        assert!(check_binding(&[], &[1; 32]).is_err());
    }

    #[test]
    fn cmdline_and_settings() {
        assert_eq!(
            tee_from_cmdline("a kabuto.tee=software b").unwrap(),
            Some(TeeKind::SoftwareTee)
        );
        assert_eq!(tee_from_cmdline("console=hvc0").unwrap(), None);
        assert_eq!(
            tee_from_cmdline("kabuto.tee=sample").unwrap(),
            Some(TeeKind::Sample)
        );
    }

    /// The sample attester needs the owner's explicit yes in init-data, and
    /// never replaces TEE hardware.
    #[test]
    fn the_sample_attester_only_when_init_data_allows_it() {
        if let Some(hardware) = tee_hardware() {
            eprintln!("SKIPPED: this machine has {hardware}; the sample attester is refused on it");
            assert!(
                sample_attester_allowed(Some("[kabuto]\nallow_sample_attester = true")).is_err()
            );
            return;
        }
        assert!(sample_attester_allowed(Some("[kabuto]\nallow_sample_attester = true\n")).is_ok());
        for (aa, says) in [
            (None, "needs init-data"),
            (Some(""), "does not allow"),
            (
                Some("[kabuto]\nallow_sample_attester = false\n"),
                "does not allow",
            ),
            (
                Some("[kabuto]\nallow_sample_attester = \"yes\"\n"),
                "true or false",
            ),
        ] {
            let err = sample_attester_allowed(aa).unwrap_err().to_string();
            assert!(err.contains(says), "{aa:?}: {err}");
            assert!(err.contains("allow_sample_attester"), "{err}");
        }
        assert!(tee_from_cmdline("kabuto.tee=bogus").is_err());
        assert!(names_a_tee("a kabuto.tee=bogus"));
        assert!(names_a_tee("kabuto.tee=software"));
        assert!(!names_a_tee("console=hvc0 xkabuto.tee=snp"));
        let s =
            kbs_settings("[token_configs.kbs]\nurl = \"https://10.0.2.2:8443\"\ncert = \"PEM\"\n")
                .unwrap()
                .unwrap();
        assert_eq!(s.url, "https://10.0.2.2:8443");
        assert_eq!(s.cert.as_deref(), Some("PEM"));
        assert!(kbs_settings("[other]\n").unwrap().is_none());
        assert!(kbs_settings("[token_configs.kbs]\n").is_err());
    }
}
