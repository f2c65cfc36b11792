#![allow(clippy::unwrap_used)]
//! Against the real kernel, in a network namespace of the test's own (no
//! VM): a veth pair stands in for CNI's, and raw packet sockets and the
//! tap's fd for the two ends.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use kabuto_netlink::core::NLM_F_DUMP;
use kabuto_netlink::testing::{in_new_netns, veth_pair};

use super::*;

/// The virtio-net header in front of every frame on a tap opened with
/// IFF_VNET_HDR (its default size).
const VNET_HDR_LEN: usize = 10;
/// A local experimental EtherType, so no stack in the namespace answers.
const TEST_ETHERTYPE: u16 = 0x88b5;

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
        veth_pair(&mut rtnl, "kbt-pod", "kbt-outside").unwrap();
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

        unbridge(&mut rtnl, &joined.interface).unwrap();
        drop(joined);
        assert!(!has_ingress_qdisc(&mut rtnl, pod));
        assert!(matches!(
            link_index(&mut rtnl, "kbt-tap"),
            Err(NetlinkError::NoSuchInterface(_))
        ));
    });
}

/// `ctr run --cni`: the one interface CNI adds to the VM's own namespace
/// after boot is joined to the reserved tap and told to the guest with the
/// reserved MAC to take over; undone, the NIC is reserved again; a second
/// late interface is refused, naming it; dropping the pod network leaves
/// no qdisc.
#[test]
fn an_interface_added_after_boot_takes_over_the_reserved_nic_and_a_second_is_refused() {
    in_new_netns(|| {
        let outside = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let mut pod = PodNetwork::reserve().unwrap();
        let nics = pod.guest_nics();
        assert_eq!(nics.len(), 1, "{nics:?}");
        assert_eq!(
            nics[0].mac,
            kabuto_netlink::format_mac(&kabuto_protocol::network::RESERVED_MAC)
        );
        assert!(
            pod.join_late_interface().unwrap().is_none(),
            "nothing added yet"
        );

        let path = pod.path().to_path_buf();
        let netns = open_netns(&path).unwrap();
        // What CNI does: a veth whose peer is outside, addressed, routed.
        let add = |name: &str, peer: &str| {
            pod::in_netns(&netns, &path, |rtnl| {
                veth_pair(rtnl, name, peer).unwrap();
                let peer_index = link_index(rtnl, peer).unwrap();
                kabuto_netlink::move_to_netns(rtnl, peer_index, outside.as_raw_fd(), peer).unwrap();
                let index = link_index(rtnl, name).unwrap();
                set_up(rtnl, index, Some(1450)).unwrap();
                Ok(index)
            })
            .unwrap()
        };
        let eth0 = add("eth0", "kbt-late0");
        pod::in_netns(&netns, &path, |rtnl| {
            kabuto_netlink::add_address(rtnl, eth0, "10.88.0.5".parse().unwrap(), 24).unwrap();
            let default = Route {
                destination: None,
                gateway: Some("10.88.0.1".parse().unwrap()),
                source: None,
                device: Some(eth0),
                mtu: None,
            };
            kabuto_netlink::add_route(rtnl, &default).unwrap();
            Ok(())
        })
        .unwrap();

        let message = pod.join_late_interface().unwrap().expect("eth0 was added");
        assert_eq!(message.name, "eth0");
        assert_eq!(
            message.reserved_hwAddr,
            kabuto_netlink::format_mac(&kabuto_protocol::network::RESERVED_MAC)
        );
        assert_eq!(message.mtu, 1450);
        assert!(message.IPAddresses.iter().any(|a| a.address == "10.88.0.5"));
        assert!(
            pod.routes()
                .iter()
                .any(|r| r.gateway == "10.88.0.1" && r.device == "eth0"),
            "{:?}",
            pod.routes()
        );
        assert!(!pod.has_reserved_nic());
        let qdiscs = |index: u32| {
            pod::in_netns(&netns, &path, |rtnl| Ok(has_ingress_qdisc(rtnl, index))).unwrap()
        };
        let tap = pod::in_netns(&netns, &path, |rtnl| Ok(link_index(rtnl, "tap0_kb")?)).unwrap();
        assert!(
            qdiscs(eth0) && qdiscs(tap),
            "eth0 is not joined to the reserved tap"
        );

        pod.unjoin_late_interface("eth0");
        assert!(pod.has_reserved_nic() && !qdiscs(eth0) && pod.routes().is_empty());
        assert!(pod.join_late_interface().unwrap().is_some(), "joined again");

        let eth1 = add("eth1", "kbt-late1");
        match pod.join_late_interface() {
            Err(NetworkError::LateInterfaces(names)) => assert_eq!(names, ["eth1"]),
            other => panic!("a second late interface: {other:?}"),
        }
        assert!(!qdiscs(eth1), "the refused interface was changed");
        drop(pod);
        assert!(!qdiscs(eth0), "the redirect outlived the pod network");
    });
}

/// A shim killed before its teardown: the cleanup removes the redirect it
/// recorded (by name and index) and nothing else; the host's own namespace
/// is refused.
#[test]
fn a_dead_shims_redirects_are_removed_from_its_record() {
    in_new_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        veth_pair(&mut rtnl, "kbt-rec0", "kbt-rec1").unwrap();
        let pod = link_index(&mut rtnl, "kbt-rec0").unwrap();
        let peer = link_index(&mut rtnl, "kbt-rec1").unwrap();
        let listed = interfaces(&mut rtnl).unwrap();
        let cni = listed.iter().find(|i| i.index == pod).unwrap();
        let other = listed.iter().find(|i| i.index == peer).unwrap();
        let joined = bridge(&mut rtnl, cni, "kbt-rtap").unwrap();
        let kept = bridge(&mut rtnl, other, "kbt-rtap2").unwrap();
        // QEMU is gone: its taps with it.
        drop(joined.tap);
        let record = JoinedRecord {
            // Opened by the calling thread: this test's namespace.
            netns: "/proc/thread-self/ns/net".into(),
            interfaces: vec![("kbt-rec0".into(), pod), ("kbt-rec1".into(), peer + 100)],
        };
        assert_eq!(unbridge_recorded(&record).unwrap(), 1);
        assert!(
            !has_ingress_qdisc(&mut rtnl, pod),
            "the recorded redirect stayed"
        );
        assert!(
            has_ingress_qdisc(&mut rtnl, peer),
            "an interface recorded under another index was changed"
        );
        drop(kept);
        // This process's own (its main thread's), as the shim's would be.
        let host = JoinedRecord {
            netns: "/proc/self/ns/net".into(),
            interfaces: Vec::new(),
        };
        let refused = unbridge_recorded(&host);
        assert!(
            matches!(refused, Err(NetworkError::HostNamespace(_))),
            "{refused:?}"
        );
    });
}
