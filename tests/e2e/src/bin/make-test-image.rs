//! Writes the busybox OCI image archive the tests and the demo import.

fn main() {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: make-test-image OUT.tar");
        std::process::exit(2);
    };
    if let Err(e) = kabuto_e2e::build_busybox_image(std::path::Path::new(&out)) {
        eprintln!("make-test-image: {e}");
        std::process::exit(1);
    }
}
