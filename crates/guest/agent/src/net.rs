//! Guest networking for confidential pods: QEMU user-mode networking
//! (virtio-net, `kabuto.net=user`) gives the guest itself a path to its KBS
//! and registries. The addresses are slirp's fixed ones. Containers keep
//! their own network namespaces and do not get this interface.

use std::net::Ipv4Addr;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use std::os::fd::AsRawFd;

pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// slirp's gateway; it also forwards to the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const INTERFACE: &str = "eth0";

/// An interface could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface name {0} too long")]
    NameTooLong(String),
    #[error("{what}")]
    Ioctl {
        what: String,
        #[source]
        source: nix::Error,
    },
}

/// True when the runtime asked for user-mode networking.
pub fn requested(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w == format!("{}=user", kabuto_protocol::KERNEL_PARAM_NET))
}

fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(NetError::NameTooLong(name.to_string()));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and
    // sockaddr is the generic view the ioctls take.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

// The interface ioctls, typed by nix: each takes a pointer to the structure
// its request expects (`bad` because these predate the _IOC encoding).
nix::ioctl_readwrite_bad!(get_interface_flags, libc::SIOCGIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_interface_flags, libc::SIOCSIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_interface_address, libc::SIOCSIFADDR, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_interface_netmask, libc::SIOCSIFNETMASK, libc::ifreq);
nix::ioctl_write_ptr_bad!(add_route, libc::SIOCADDRT, libc::rtentry);

fn checked(result: nix::Result<i32>, what: &str) -> Result<(), NetError> {
    result.map(drop).map_err(|source| NetError::Ioctl {
        what: what.to_string(),
        source,
    })
}

/// A datagram socket for the interface ioctls.
fn ioctl_socket() -> Result<std::os::fd::OwnedFd, NetError> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| NetError::Ioctl {
        what: "socket".into(),
        source,
    })
}

/// Sets IFF_UP on `name` in the calling thread's network namespace.
pub fn bring_up(name: &str) -> Result<(), NetError> {
    let sock = ioctl_socket()?;
    let fd = sock.as_raw_fd();
    let mut req = ifreq(name)?;
    // SAFETY: `req` is an ifreq naming the interface, alive for the call.
    let got = unsafe { get_interface_flags(fd, &mut req) };
    checked(got, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; the flags member is set.
    let set = unsafe { set_interface_flags(fd, &req) };
    checked(set, &format!("bringing {name} up"))
}

/// Configures eth0 (10.0.2.15/24) and the default route via 10.0.2.2.
pub fn setup_user_network() -> Result<(), NetError> {
    bring_up("lo")?;
    let sock = ioctl_socket()?;
    let fd = sock.as_raw_fd();
    let mut req = ifreq(INTERFACE)?;
    req.ifr_ifru.ifru_addr = sockaddr(GUEST_ADDRESS);
    // SAFETY: an ifreq with the interface name and its address member set.
    let set = unsafe { set_interface_address(fd, &req) };
    checked(set, "setting the eth0 address")?;
    let mut req = ifreq(INTERFACE)?;
    req.ifr_ifru.ifru_netmask = sockaddr(NETMASK);
    // SAFETY: an ifreq with the interface name and its netmask member set.
    let set = unsafe { set_interface_netmask(fd, &req) };
    checked(set, "setting the eth0 netmask")?;
    bring_up(INTERFACE)?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(GATEWAY);
    route.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    // SAFETY: a fully initialised rtentry, alive for the call.
    let added = unsafe { add_route(fd, &route) };
    checked(added, "adding the default route")
}
