//! A hostile shim's agent request: protobuf bytes decoded as the agent's
//! ttrpc server decodes them (the first byte picks the method), then turned
//! into the policy's input as the gate does. Must never panic.
#![no_main]

use kabuto_protocol::agent;
use libfuzzer_sys::fuzz_target;
use protobuf::{Message, MessageDyn};

fn decode<M: Message + MessageDyn>(data: &[u8]) {
    if let Ok(req) = M::parse_from_bytes(data) {
        let _ = kabuto_policy::request_input(&req);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    match method % 8 {
        0 => decode::<agent::CreateContainerRequest>(body),
        1 => decode::<agent::ExecProcessRequest>(body),
        2 => decode::<agent::CreateSandboxRequest>(body),
        3 => decode::<agent::UpdateContainerRequest>(body),
        4 => decode::<agent::SignalProcessRequest>(body),
        5 => decode::<agent::WriteStreamRequest>(body),
        6 => decode::<agent::SetPolicyRequest>(body),
        _ => decode::<agent::StartContainerRequest>(body),
    }
});
