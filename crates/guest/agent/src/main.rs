//! `kabuto-agent`: PID 1 of the kabuto guest (see the library).

fn main() {
    kabuto_agent::run();
}
