//! `kabuto-pause`: the pause process of a confidential pod's sandbox
//! container. The guest image carries it (statically linked: the pause
//! container's root holds nothing else), so the process that shares the
//! pod's namespaces with the data hub is measured code, never the host's.
//!
//! It is PID 1 of the pod's PID namespace when the pod has one, so it reaps
//! orphans; it ends on SIGTERM or SIGINT, as Kubernetes' pause does. The
//! signals are blocked and taken with sigwait: a namespace's init ignores
//! signals it has no handler for, but never blocked ones.

fn main() {
    // SAFETY: plain libc calls on a local, initialised signal set; no
    // pointers escape.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, signal);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            std::process::exit(1);
        }
        loop {
            let mut signal = 0;
            if libc::sigwait(&set, &mut signal) != 0 {
                continue;
            }
            if signal == libc::SIGTERM || signal == libc::SIGINT {
                std::process::exit(0);
            }
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
        }
    }
}
