//! Tap devices for QEMU's virtio-net (`-netdev tap,fd=N`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Opens a new tap device `name` in the calling thread's network namespace
/// (a tun fd belongs to its opener's namespace) and returns its fd and
/// the name the kernel gave it. Not persistent: the device, and the qdisc
/// and filters on it, go away with the last fd (QEMU's), so a dead shim or
/// VM leaves none behind. With a virtio-net header, so QEMU can offload
/// checksums and segmentation.
pub fn open_tap(name: &str) -> io::Result<(OwnedFd, String)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "interface name {name:?} is longer than {}",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    // IFF_TUN_EXCL: a new device, never an existing one of that name
    // (someone else's persistent tap, with its settings).
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL) as i16;
    // SAFETY: TUNSETIFF reads and writes the one ifreq we own, alive for
    // the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let given: Vec<u8> = request
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Ok((tun.into(), String::from_utf8_lossy(&given).into_owned()))
}
