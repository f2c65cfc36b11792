//! `containerd-shim-kabuto-v2`: containerd's runtime v2 shim for kabuto
//! (runtime type `io.containerd.kabuto.v2`). One shim and one VM per pod.

mod events;
mod io;
mod service;

fn main() {
    let config = containerd_shim::Config {
        // The shim waits for its own children (QEMU, virtiofsd, the vsock
        // device); the library's reaper would steal their exit statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>(service::RUNTIME_ID, Some(config));
}
