#![allow(clippy::unwrap_used)]
//! Against the real kernel, in a network namespace of the test's own (no
//! VM): a veth pair stands in for CNI's, and raw packet sockets and the
//! tap's fd for the two ends.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use netlink_packet_route::link::{InfoData, InfoVeth};

use super::*;

/// The virtio-net header in front of every frame on a tap opened with
/// IFF_VNET_HDR (its default size).
const VNET_HDR_LEN: usize = 10;
/// A local experimental EtherType, so no stack in the namespace answers.
const TEST_ETHERTYPE: u16 = 0x88b5;

/// Runs `f` on a thread in a new network namespace (gone when the thread
/// and its sockets are); `None`, said on stderr, where this process may
/// not make one.
fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("SKIPPED: cannot make a network namespace here ({e}): run as root");
                return None;
            }
            Some(f())
        })
        .join()
        .unwrap()
    })
}

fn veth_pair(rtnl: &mut Rtnl, name: &str, peer_name: &str) {
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(peer_name.to_string()));
    let mut link = LinkMessage::default();
    link.attributes
        .push(LinkAttribute::IfName(name.to_string()));
    link.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    rtnl.request(
        RouteNetlinkMessage::NewLink(link),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .unwrap();
}

/// A raw packet socket bound to link `index`, every protocol.
fn packet_socket(index: u32) -> OwnedFd {
    let protocol = i32::from(ETH_P_ALL.to_be());
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    assert!(fd >= 0, "{}", io::Error::last_os_error());
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = ETH_P_ALL.to_be();
    address.sll_ifindex = index as i32;
    // SAFETY: bind(2) with a sockaddr_ll we own, of its own size.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(bound, 0, "{}", io::Error::last_os_error());
    fd
}

/// A broadcast frame from `source` carrying `marker`.
fn frame(source: &[u8], marker: &[u8]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(source);
    frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(marker);
    frame.resize(60, 0);
    frame
}

fn write_all(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: write(2) from a buffer we own, of its length.
    let written = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    assert_eq!(
        written,
        data.len() as isize,
        "{}",
        io::Error::last_os_error()
    );
}

/// True once a frame read from `fd` holds `marker` after `skip` bytes;
/// false after 5 s.
fn receives(fd: &OwnedFd, skip: usize, marker: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buffer = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: read(2) into a buffer we own, of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        let Ok(n) = usize::try_from(n) else { continue };
        if n > skip && buffer[skip..n].windows(marker.len()).any(|w| w == marker) {
            return true;
        }
    }
    false
}

fn has_ingress_qdisc(rtnl: &mut Rtnl, index: u32) -> bool {
    rtnl.request(
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
        NLM_F_DUMP,
    )
    .unwrap()
    .into_iter()
    .any(|m| {
        matches!(m, RouteNetlinkMessage::NewQueueDiscipline(q)
            if q.header.index == index as i32 && q.header.handle == INGRESS_HANDLE)
    })
}

/// What the guest's NIC would send reaches the CNI side, and what arrives
/// there reaches the guest, unchanged; the tap has the interface's MTU;
/// teardown leaves neither the tap nor a qdisc.
#[test]
fn frames_pass_between_an_interface_and_its_tap_both_ways() {
    in_new_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        veth_pair(&mut rtnl, "kbt-pod", "kbt-outside");
        let pod = link_index(&mut rtnl, "kbt-pod").unwrap();
        let outside = link_index(&mut rtnl, "kbt-outside").unwrap();
        set_up(&mut rtnl, pod, Some(1400)).unwrap();
        set_up(&mut rtnl, outside, None).unwrap();
        let listed = interfaces(&mut rtnl).unwrap();
        let cni = listed.iter().find(|i| i.name == "kbt-pod").unwrap();
        assert_eq!((cni.kind.clone(), cni.mtu), (LinkKind::Veth, 1400));
        let outside_mac = listed
            .iter()
            .find(|i| i.index == outside)
            .unwrap()
            .mac
            .clone();

        let joined = bridge(&mut rtnl, cni, "kbt-tap").unwrap();
        assert_eq!(joined.tap_name, "kbt-tap");
        let tap = interfaces(&mut rtnl)
            .unwrap()
            .into_iter()
            .find(|i| i.index == joined.tap_index)
            .unwrap();
        assert_eq!(tap.mtu, 1400, "the tap has the interface's MTU");
        assert!(has_ingress_qdisc(&mut rtnl, pod) && has_ingress_qdisc(&mut rtnl, tap.index));

        let wire = packet_socket(outside);
        write_all(&wire, &frame(&outside_mac, b"kabuto-to-the-guest"));
        assert!(
            receives(&joined.tap, VNET_HDR_LEN, b"kabuto-to-the-guest"),
            "a frame arriving at the interface did not reach the tap"
        );
        let mut from_guest = vec![0u8; VNET_HDR_LEN];
        from_guest.extend(frame(&cni.mac, b"kabuto-from-the-guest"));
        write_all(&joined.tap, &from_guest);
        assert!(
            receives(&wire, 0, b"kabuto-from-the-guest"),
            "a frame the guest sent did not leave through the interface"
        );

        unbridge(&mut rtnl, &joined).unwrap();
        drop(joined);
        assert!(!has_ingress_qdisc(&mut rtnl, pod));
        assert!(matches!(
            link_index(&mut rtnl, "kbt-tap"),
            Err(NetworkError::NoSuchInterface(_))
        ));
    });
}

#[test]
fn routes_keep_their_mtu_and_source() {
    in_new_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        veth_pair(&mut rtnl, "kbt-r0", "kbt-r1");
        let index = link_index(&mut rtnl, "kbt-r0").unwrap();
        set_up(&mut rtnl, index, None).unwrap();
        let mut address = AddressMessage::default();
        address.header.family = AddressFamily::Inet;
        address.header.prefix_len = 24;
        address.header.index = index;
        let ip: IpAddr = "10.89.0.2".parse().unwrap();
        address.attributes.push(AddressAttribute::Local(ip));
        address.attributes.push(AddressAttribute::Address(ip));
        rtnl.request(
            RouteNetlinkMessage::NewAddress(address),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .unwrap();
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.table = RouteHeader::RT_TABLE_MAIN;
        route.header.kind = RouteType::Unicast;
        route.header.protocol = netlink_packet_route::route::RouteProtocol::Static;
        route.header.scope = netlink_packet_route::route::RouteScope::Universe;
        route
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(
                "10.89.0.1".parse().unwrap(),
            )));
        route.attributes.push(RouteAttribute::Oif(index));
        route
            .attributes
            .push(RouteAttribute::PrefSource(RouteAddress::Inet(
                "10.89.0.2".parse().unwrap(),
            )));
        route
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(1300)]));
        rtnl.request(
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .unwrap();

        let interface = interfaces(&mut rtnl)
            .unwrap()
            .into_iter()
            .find(|i| i.index == index)
            .unwrap();
        assert_eq!(interface.addresses, vec![(ip, 24)]);
        let routes = routes(&mut rtnl).unwrap();
        let default = routes
            .iter()
            .find(|r| r.destination.is_none() && r.device == Some(index))
            .unwrap();
        assert_eq!(default.gateway, Some("10.89.0.1".parse().unwrap()));
        assert_eq!(default.source, Some(ip));
        assert_eq!(default.mtu, Some(1300), "the route's own MTU is kept");
        assert!(routes
            .iter()
            .any(|r| r.destination == Some(("10.89.0.0".parse().unwrap(), 24))));
    });
}
