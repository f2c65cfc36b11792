//! Writes the busybox OCI image archive the tests and the demo import.
//!
//! Usage: make-test-image OUT.tar

const USAGE: &str = "usage: make-test-image OUT.tar";

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let out = match args.as_slice() {
        [out] if !out.to_string_lossy().starts_with('-') => std::path::PathBuf::from(out),
        [flag] if flag == "--help" || flag == "-h" => {
            println!("{USAGE}");
            return;
        }
        // A flag is never taken for the output path (a `--help` archive
        // once landed in the repository that way).
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = kabuto_e2e::build_busybox_image(&out) {
        eprintln!("make-test-image: {e}");
        std::process::exit(1);
    }
}
