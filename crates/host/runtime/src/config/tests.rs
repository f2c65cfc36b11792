use super::*;

#[test]
fn documented_defaults_match_the_code() {
    let parsed = Config::parse(DEFAULT_TOML, Path::new("default")).expect("default parses");
    assert_eq!(parsed, Config::default());
}

#[test]
fn empty_file_means_defaults() {
    let parsed = Config::parse("", Path::new("empty")).expect("empty parses");
    assert_eq!(parsed, Config::default());
}

#[test]
fn unknown_fields_are_refused() {
    let err =
        Config::parse("[hypervisor]\nvcpu = 2\n", Path::new("x.toml")).expect_err("typo accepted");
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(text.contains("x.toml") && text.contains("vcpu"), "{text}");
}

#[test]
fn invalid_values_are_refused() {
    for (toml, needle) in [
        ("[hypervisor]\nvcpus = 0\n", "vcpus"),
        ("[hypervisor]\nmemory_mib = 8\n", "memory_mib"),
        ("[hypervisor]\naccelerator = \"hvf\"\n", "accelerator"),
        ("[shared_fs]\ncache = \"sometimes\"\n", "cache"),
        ("[shared_fs]\nrootfs_cache = \"never\"\n", "rootfs_cache"),
        ("[confidential]\nimage_pull = \"guest\"\n", "guest_network"),
        // TEE launches boot q35 through firmware, on KVM.
        (
            "[confidential]\ntee = \"snp\"\nfirmware = \"/fw/OVMF.amdsev.fd\"\n",
            "q35",
        ),
        (
            "[hypervisor]\nmachine = \"q35\"\naccelerator = \"tcg\"\n[confidential]\ntee = \"snp\"\nfirmware = \"/fw/OVMF.amdsev.fd\"\n",
            "KVM",
        ),
        (
            "[hypervisor]\nmachine = \"q35\"\n[confidential]\ntee = \"tdx\"\n",
            "firmware",
        ),
        (
            "[hypervisor]\nmachine = \"q35\"\n[confidential]\ntee = \"snp\"\nfirmware = \"/f\"\nsnp_cpu = \"host\"\n",
            "snp_cpu",
        ),
    ] {
        let err = Config::parse(toml, Path::new("c.toml")).expect_err(toml);
        let text = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(text.contains(needle), "{toml}: {text}");
    }
}

#[test]
fn the_software_tee_needs_a_build_with_its_feature() {
    let parsed = Config::parse(
        "[hypervisor]\nguest_network = \"user\"\n[confidential]\ntee = \"software\"\n",
        Path::new("c.toml"),
    );
    if cfg!(feature = "software-tee") {
        assert_eq!(
            parsed.expect("accepted").confidential.tee,
            TeeKind::Software
        );
    } else {
        let err = parsed
            .expect_err("a production build refuses it")
            .to_string();
        assert!(err.contains(SOFTWARE_TEE_NOT_BUILT), "{err}");
    }
}

/// A refused value names its key as written in the file.
#[test]
fn invalid_values_name_their_key() {
    for (toml, key) in [
        ("[hypervisor]\nvcpus = 0\n", "hypervisor.vcpus"),
        (
            "[agent]\nboot_timeout_secs = 0\n",
            "agent.boot_timeout_secs",
        ),
        ("[confidential]\ntee = \"snp\"\n", "hypervisor.machine"),
    ] {
        match Config::parse(toml, Path::new("c.toml")) {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, key, "{toml}"),
            other => panic!("{toml}: {other:?}"),
        }
    }
    let err = Config::parse("[shared_fs]\ncache = \"sometimes\"\n", Path::new("c.toml"))
        .expect_err("an unknown cache mode");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
}

#[test]
fn the_sample_tee_only_in_a_software_tee_build() {
    let parsed = Config::parse("[confidential]\ntee = \"sample\"\n", Path::new("c.toml"));
    if cfg!(feature = "software-tee") {
        let config = parsed.expect("accepted");
        assert_eq!(config.confidential.tee, TeeKind::Sample);
        assert_eq!(config.confidential.tee.kernel_param(), Some("sample"));
    } else {
        let err = parsed
            .expect_err("a production build refuses it")
            .to_string();
        assert!(err.contains(SAMPLE_NOT_BUILT), "{err}");
    }
}

#[test]
fn a_complete_snp_config_is_accepted() {
    let c = Config::parse(
        "[hypervisor]\nmachine = \"q35\"\n[confidential]\ntee = \"snp\"\nfirmware = \"/fw/OVMF.amdsev.fd\"\nsnp_cpu = \"EPYC-Milan\"\n",
        Path::new("snp.toml"),
    )
    .expect("parses");
    assert_eq!(c.confidential.snp_cpu, "EPYC-Milan");
}

#[test]
fn partial_file_keeps_other_defaults() {
    let c = Config::parse(
        "[hypervisor]\nvcpus = 2\naccelerator = \"tcg\"\n",
        Path::new("p"),
    )
    .expect("parses");
    assert_eq!(c.hypervisor.vcpus, 2);
    assert_eq!(c.hypervisor.accelerator, Accelerator::Tcg);
    assert_eq!(c.hypervisor.memory_mib, 512);
    assert_eq!(c.agent, AgentConfig::default());
}
