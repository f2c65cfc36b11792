use serde_json::json;

use super::*;

const ALL_REQUESTS: &[&str] = &[
    "CreateContainerRequest",
    "CreateSandboxRequest",
    "DestroySandboxRequest",
    "StartContainerRequest",
    "RemoveContainerRequest",
    "ExecProcessRequest",
    "SignalProcessRequest",
    "WaitProcessRequest",
    "ReadStreamRequest",
    "WriteStreamRequest",
    "CloseStdinRequest",
    "TtyWinResizeRequest",
    "ListProcessesRequest",
    "StatsContainerRequest",
    "UpdateContainerRequest",
    "GetOOMEventRequest",
    "GuestDetailsRequest",
    "SetPolicyRequest",
    "CheckRequest",
    "UpdateInterfaceRequest",
    "UpdateRoutesRequest",
    "AddARPNeighborsRequest",
    "ListInterfacesRequest",
    "ListRoutesRequest",
];

#[test]
fn only_the_shipped_allow_all_skips_the_engine() {
    let gate = PolicyGate::allow_all();
    let mut listed = gate.always_allowed.clone();
    listed.sort_unstable();
    let mut all = ALL_REQUESTS.to_vec();
    all.sort_unstable();
    assert_eq!(listed, all);
    assert!(!gate.allows_without_input("NoSuchRequest"));
    assert!(!gate.allows_without_input(""));
    // Any other text is decided by the engine, even when equivalent.
    let edited = PolicyGate::new(&format!("{ALLOW_ALL}\n# edited\n")).expect("parses");
    assert!(ALL_REQUESTS.iter().all(|r| !edited.allows_without_input(r)));
    let confidential = PolicyGate::new(&DEFAULT_CONFIDENTIAL).expect("parses");
    assert!(ALL_REQUESTS
        .iter()
        .all(|r| !confidential.allows_without_input(r)));
}

#[test]
fn allow_all_allows_everything() {
    let mut gate = PolicyGate::allow_all();
    for r in ALL_REQUESTS {
        assert_eq!(
            gate.decide(r, &json!({})).expect("decide"),
            Decision::Allowed,
            "{r}"
        );
    }
}

#[test]
fn confidential_default_denies_what_it_should() {
    let mut gate = PolicyGate::new(&DEFAULT_CONFIDENTIAL).expect("parses");
    for r in [
        "CreateContainerRequest",
        "ExecProcessRequest",
        "SetPolicyRequest",
        "ReadStreamRequest",
    ] {
        assert_eq!(
            gate.decide(r, &json!({})).expect("decide"),
            Decision::Denied { reason: None },
            "{r}"
        );
    }
    for r in [
        "GuestDetailsRequest",
        "WaitProcessRequest",
        "SignalProcessRequest",
        "RemoveContainerRequest",
        "DestroySandboxRequest",
        "StatsContainerRequest",
    ] {
        assert_eq!(
            gate.decide(r, &json!({})).expect("decide"),
            Decision::Allowed,
            "{r}"
        );
    }
}

#[test]
fn confidential_boot_allows_only_create_sandbox() {
    let mut gate = PolicyGate::new(CONFIDENTIAL_BOOT).expect("parses");
    for r in ALL_REQUESTS {
        let expected = matches!(*r, "CreateSandboxRequest" | "CheckRequest");
        assert_eq!(
            gate.decide(r, &json!({})).expect("decide") == Decision::Allowed,
            expected,
            "{r}"
        );
    }
    let mut gate = PolicyGate::new(DENY_ALL).expect("parses");
    assert_all_denied(&mut gate, ALL_REQUESTS);
}

/// Each of `requests` (with an empty input) is denied.
fn assert_all_denied(gate: &mut PolicyGate, requests: &[&str]) {
    for r in requests {
        assert!(
            matches!(
                gate.decide(r, &json!({})).expect("decide"),
                Decision::Denied { .. }
            ),
            "{r}"
        );
    }
}

#[test]
fn judged_state_updates_wait_for_commit() {
    let mut gate = PolicyGate::new(
        r#"package agent_policy
        CreateContainerRequest := {"allowed": true, "ops": [{"op": "add", "path": "/last", "value": input.container_id}]}
        "#,
    )
    .expect("parses");
    let first = gate
        .judge("CreateContainerRequest", &json!({"container_id": "a"}))
        .expect("judge");
    assert_eq!(first.decision, Decision::Allowed);
    assert_eq!(gate.state(), &json!({}), "nothing changes before commit");
    let second = gate
        .judge("CreateContainerRequest", &json!({"container_id": "b"}))
        .expect("judge");
    // The first request failed: its update is dropped; the second's lands.
    drop(first);
    gate.commit(second.update.expect("an update"))
        .expect("commit");
    assert_eq!(gate.state(), &json!({"last": "b"}));
}

#[test]
fn an_update_that_no_longer_applies_changes_nothing() {
    let mut gate = PolicyGate::new(
        r#"package agent_policy
        CreateContainerRequest := {"allowed": true, "ops": [{"op": "add", "path": "/c", "value": {}}]}
        RemoveContainerRequest := {"allowed": true, "ops": [{"op": "remove", "path": "/c"}]} if data.state.c
        "#,
    )
    .expect("parses");
    gate.decide("CreateContainerRequest", &json!({}))
        .expect("decide");
    let one = gate
        .judge("RemoveContainerRequest", &json!({}))
        .expect("judge");
    let two = gate
        .judge("RemoveContainerRequest", &json!({}))
        .expect("judge");
    gate.commit(one.update.expect("update")).expect("commit");
    assert!(matches!(
        gate.commit(two.update.expect("update")),
        Err(PolicyError::State(_))
    ));
    assert_eq!(gate.state(), &json!({}));
}

#[test]
fn rules_see_the_input_and_give_reasons() {
    let mut gate = PolicyGate::new(
        r#"package agent_policy
        default ExecProcessRequest := {"allowed": false, "reason": "only echo may run"}
        ExecProcessRequest := {"allowed": true} if input.process.args[0] == "echo"
        "#,
    )
    .expect("parses");
    let echo = json!({"process": {"args": ["echo", "hi"]}});
    let sh = json!({"process": {"args": ["sh"]}});
    assert_eq!(
        gate.decide("ExecProcessRequest", &echo).expect("decide"),
        Decision::Allowed
    );
    assert_eq!(
        gate.decide("ExecProcessRequest", &sh).expect("decide"),
        Decision::Denied {
            reason: Some("only echo may run".into())
        }
    );
}

#[test]
fn mounts_carry_type_source_and_options() {
    let mut gate = PolicyGate::new(
        r#"package agent_policy
        CreateContainerRequest if {
            every m in input.OCI.mounts {
                is_string(m.type)
                is_string(m.source)
                is_array(m.options)
            }
            input.OCI.mounts[0] == {"destination": "/proc", "type": "", "source": "", "options": []}
            input.OCI.mounts[1] == {"destination": "/x", "type": "bind", "source": "/s", "options": ["ro"]}
            not input.__kabuto_policy_state.mounts
        }
        "#,
    )
    .expect("parses");
    let input = json!({"OCI": {"mounts": [
        {"destination": "/proc"},
        {"destination": "/x", "type": "bind", "source": "/s", "options": ["ro"]},
    ]}});
    assert_eq!(
        gate.decide("CreateContainerRequest", &input)
            .expect("decide"),
        Decision::Allowed
    );
    // Requests without mounts (or without a spec) pass as they are.
    assert!(gate.decide("CreateContainerRequest", &json!({})).is_ok());
    assert!(gate
        .decide("CreateContainerRequest", &json!({"OCI": {"mounts": "x"}}))
        .is_ok());
}

#[test]
fn updates_judged_together_both_apply_under_an_initial_state() {
    let rego = r#"package agent_policy
import rego.v1
initial_state := {"containers": {}}
CreateContainerRequest := {"allowed": true, "ops": [
{"op": "add", "path": concat("/", ["", "containers", input.container_id]), "value": true},
]}
"#;
    let mut gate = PolicyGate::new(rego).expect("parses");
    assert_eq!(gate.state(), &json!({"containers": {}}));
    // Two creates judged before either commits (they run concurrently).
    let a = gate
        .judge("CreateContainerRequest", &json!({"container_id": "a"}))
        .expect("judge");
    let b = gate
        .judge("CreateContainerRequest", &json!({"container_id": "b"}))
        .expect("judge");
    gate.commit(a.update.expect("update")).expect("commit");
    gate.commit(b.update.expect("update")).expect("commit");
    assert_eq!(gate.state(), &json!({"containers": {"a": true, "b": true}}));
    // A non-object initial state is refused.
    let bad = "package agent_policy
initial_state := 1
";
    assert!(PolicyGate::new(bad).is_err());
}

#[test]
fn ops_update_the_state_rules_read() {
    // At most one container: the first create records it in the state.
    let mut gate = PolicyGate::new(
        r#"package agent_policy
        default CreateContainerRequest := {"allowed": false, "reason": "one container only"}
        CreateContainerRequest := {"allowed": true, "ops": [{"op": "add", "path": "/created", "value": input.container_id}]} if {
            not data.state.created
        }
        "#,
    )
    .expect("parses");
    let req = json!({"container_id": "c1"});
    assert_eq!(
        gate.decide("CreateContainerRequest", &req).expect("decide"),
        Decision::Allowed
    );
    assert_eq!(gate.state(), &json!({"created": "c1"}));
    assert_eq!(
        gate.decide("CreateContainerRequest", &json!({"container_id": "c2"}))
            .expect("decide"),
        Decision::Denied {
            reason: Some("one container only".into())
        }
    );
    assert_eq!(
        gate.state(),
        &json!({"created": "c1"}),
        "a denied request changes nothing"
    );
}

#[test]
fn state_with_any_characters_reaches_the_rules_intact() {
    // The state is written into the query as a literal: host-chosen
    // strings (container ids) must stay data, never become Rego.
    let mut gate = PolicyGate::new(
        r#"package agent_policy
        CreateContainerRequest := {"allowed": true, "ops": [{"op": "add", "path": "/last", "value": input.container_id}]}
        ReadStreamRequest := data.state.last == input.expect
        "#,
    )
    .expect("parses");
    for id in [
        r#"a" } with data.x as {"y": 1"#,
        "new\nline \\ back\u{0}slash \"quoted\"",
        "\u{2028}\u{1F600}\t}",
    ] {
        assert_eq!(
            gate.decide("CreateContainerRequest", &json!({"container_id": id}))
                .expect("decide"),
            Decision::Allowed
        );
        assert_eq!(gate.state(), &json!({"last": id}));
        assert_eq!(
            gate.decide("ReadStreamRequest", &json!({"expect": id}))
                .expect("decide"),
            Decision::Allowed,
            "{id:?}"
        );
        assert_eq!(
            gate.decide("ReadStreamRequest", &json!({"expect": "other"}))
                .expect("decide"),
            Decision::Denied { reason: None }
        );
    }
}

#[test]
fn anything_else_is_a_deny() {
    let mut gate = PolicyGate::new(
        r#"package agent_policy
        StartContainerRequest := 1
        StatsContainerRequest := {"allowed": "yes"}
        "#,
    )
    .expect("parses");
    assert_all_denied(
        &mut gate,
        &[
            "StartContainerRequest",
            "StatsContainerRequest",
            "CheckRequest",
        ],
    );
}

#[test]
fn bad_policies_and_names_are_refused() {
    assert!(matches!(
        PolicyGate::new("package agent_policy\nthis is not rego"),
        Err(PolicyError::Parse(_))
    ));
    assert!(matches!(
        PolicyGate::new("package other\nx := true"),
        Err(PolicyError::Package(_))
    ));
    let mut gate = PolicyGate::allow_all();
    assert!(matches!(
        gate.decide("x; data.y", &json!({})),
        Err(PolicyError::RequestName(_))
    ));
}

#[test]
fn the_confidential_default_allows_a_pods_network_only_on_its_nics() {
    let mut gate = PolicyGate::new(&DEFAULT_CONFIDENTIAL).expect("parses");
    let routes = |device: &str| {
        serde_json::json!({"routes": {"Routes": [
            {"dest": "", "gateway": "10.88.0.1", "device": device, "source": "",
             "scope": 0, "family": "v4", "flags": 0, "mtu": 0}
        ]}})
    };
    assert_eq!(
        gate.decide("UpdateRoutesRequest", &routes("eth0"))
            .expect("decides"),
        Decision::Allowed
    );
    assert!(matches!(
        gate.decide("UpdateRoutesRequest", &routes("lo"))
            .expect("decides"),
        Decision::Denied { .. }
    ));
}

/// The real request, as the gate gets it: a reserved NIC taken over (a
/// network added after create) is for trusted hosts only.
#[test]
fn the_confidential_default_denies_taking_over_a_reserved_nic() {
    let mut gate = PolicyGate::new(&DEFAULT_CONFIDENTIAL).expect("parses");
    let request = |reserved: &str| {
        let req = kabuto_protocol::agent::UpdateInterfaceRequest {
            interface: protobuf::MessageField::some(kabuto_protocol::agent::Interface {
                device: "eth0".into(),
                name: "eth0".into(),
                mtu: 1500,
                hwAddr: "0a:58:0a:58:00:05".into(),
                reserved_hwAddr: reserved.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        request_input(&req).expect("input")
    };
    assert_eq!(
        gate.decide("UpdateInterfaceRequest", &request(""))
            .expect("decides"),
        Decision::Allowed
    );
    assert!(matches!(
        gate.decide("UpdateInterfaceRequest", &request("02:6b:62:00:00:01"))
            .expect("decides"),
        Decision::Denied { .. }
    ));
}
