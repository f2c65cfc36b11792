//! Generates the agent API (protobuf messages + ttrpc services) into OUT_DIR.

use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    Codegen::new()
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().generate_accessors(false))
        .customize(Customize::default())
        .out_dir(&out_dir)
        .run()
        .expect("generating the agent API from proto/agent.proto");

    // `include!` rejects inner attributes and inner doc comments, which the
    // generators emit at the top of each file: drop those lines.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out_dir.join(name);
        let text = fs::read_to_string(&path).expect("reading generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        fs::write(&path, kept.join("\n")).expect("writing generated code");
    }
}
