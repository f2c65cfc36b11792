//! Pod networking on the host (Kata's "tcfilter" model): the interfaces
//! CNI made in the pod's network namespace, each joined to a tap device
//! that QEMU serves to the guest as virtio-net. Both interfaces get an
//! ingress qdisc whose one filter (u32, matching every packet) redirects
//! to the other's egress (mirred), so frames pass unchanged in both
//! directions and the namespace's own stack never sees them.
//!
//! Everything is netlink (`Rtnl`), run by a thread inside the pod's
//! namespace. The tap is not persistent: with its last fd (QEMU's) it
//! disappears, with its qdisc and filter; the veth's qdisc is removed at
//! teardown ([`unbridge`]), or with the namespace.
//!
//! Not yet wired into the sandbox (issue 17's next step); see
//! `docs/design/pod-networking.md`.

mod rtnl;
mod tap;

use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

pub use rtnl::Rtnl;
pub use tap::open_tap;

/// ETH_P_ALL: a filter for every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// The priority of the redirect filters (an explicit one finds them again).
const REDIRECT_PRIORITY: u16 = 1;
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}")]
    Tap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("no interface {0} in the pod's network namespace")]
    NoSuchInterface(String),
}

fn netlink(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// What kind of link an interface is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Veth,
    MacVlan,
    IpVlan,
    Loopback,
    Other(String),
}

/// One interface of the namespace, as the guest must get it.
#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub kind: LinkKind,
    /// Global-scope addresses (IPv4 and IPv6) with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// One route of the namespace's main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    /// The interface's index.
    pub device: Option<u32>,
    /// The route's own MTU (RTAX_MTU), which a device MTU does not show.
    pub mtu: Option<u32>,
}

/// The namespace's interfaces, loopback included, with their addresses.
pub fn interfaces(rtnl: &mut Rtnl) -> Result<Vec<Interface>, NetworkError> {
    let links = rtnl
        .request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )
        .map_err(netlink("listing the links"))?;
    let mut interfaces: Vec<Interface> = links
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(interface_of(link)),
            _ => None,
        })
        .collect();
    let addresses = rtnl
        .request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )
        .map_err(netlink("listing the addresses"))?;
    for message in addresses {
        let RouteNetlinkMessage::NewAddress(a) = message else {
            continue;
        };
        if a.header.scope != AddressScope::Universe {
            continue;
        }
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
        // peer's on point-to-point links); IPv6 sends only IFA_ADDRESS.
        let local = a.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = local.or_else(|| {
            a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let (Some(ip), Some(interface)) = (
            address,
            interfaces.iter_mut().find(|i| i.index == a.header.index),
        ) {
            interface.addresses.push((ip, a.header.prefix_len));
        }
    }
    Ok(interfaces)
}

fn interface_of(link: LinkMessage) -> Interface {
    let mut interface = Interface {
        name: String::new(),
        index: link.header.index,
        mac: Vec::new(),
        mtu: 0,
        kind: if link.header.flags.contains(LinkFlags::Loopback) {
            LinkKind::Loopback
        } else {
            LinkKind::Other(String::new())
        },
        addresses: Vec::new(),
    };
    for attribute in link.attributes {
        match attribute {
            LinkAttribute::IfName(name) => interface.name = name,
            LinkAttribute::Address(mac) => interface.mac = mac,
            LinkAttribute::Mtu(mtu) => interface.mtu = mtu,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        interface.kind = match kind {
                            InfoKind::Veth => LinkKind::Veth,
                            InfoKind::MacVlan => LinkKind::MacVlan,
                            InfoKind::IpVlan => LinkKind::IpVlan,
                            other => LinkKind::Other(format!("{other:?}")),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    interface
}

/// The unicast routes of the main table, IPv4 and IPv6.
pub fn routes(rtnl: &mut Rtnl) -> Result<Vec<Route>, NetworkError> {
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        let replies = rtnl
            .request(RouteNetlinkMessage::GetRoute(request), NLM_F_DUMP)
            .map_err(netlink("listing the routes"))?;
        for message in replies {
            let RouteNetlinkMessage::NewRoute(r) = message else {
                continue;
            };
            if r.header.table != RouteHeader::RT_TABLE_MAIN || r.header.kind != RouteType::Unicast {
                continue;
            }
            routes.push(route_of(&r));
        }
    }
    Ok(routes)
}

fn route_of(r: &RouteMessage) -> Route {
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut route = Route {
        destination: None,
        gateway: None,
        source: None,
        device: None,
        mtu: None,
    };
    for attribute in &r.attributes {
        match attribute {
            RouteAttribute::Destination(a) => {
                route.destination = ip(a).map(|ip| (ip, r.header.destination_prefix_length));
            }
            RouteAttribute::Gateway(a) => route.gateway = ip(a),
            RouteAttribute::PrefSource(a) => route.source = ip(a),
            RouteAttribute::Oif(index) => route.device = Some(*index),
            RouteAttribute::Metrics(metrics) => {
                route.mtu = metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(mtu) => Some(*mtu),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    route
}

/// The index of link `name`.
pub fn link_index(rtnl: &mut Rtnl, name: &str) -> Result<u32, NetworkError> {
    let mut request = LinkMessage::default();
    request
        .attributes
        .push(LinkAttribute::IfName(name.to_string()));
    let replies = rtnl
        .request(RouteNetlinkMessage::GetLink(request), NLM_F_ACK)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENODEV) => NetworkError::NoSuchInterface(name.to_string()),
            _ => netlink(format!("looking up {name}"))(e),
        })?;
    replies
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
            _ => None,
        })
        .ok_or_else(|| NetworkError::NoSuchInterface(name.to_string()))
}

/// Sets link `index` up, with `mtu` if given.
pub fn set_up(rtnl: &mut Rtnl, index: u32, mtu: Option<u32>) -> Result<(), NetworkError> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = mtu {
        link.attributes.push(LinkAttribute::Mtu(mtu));
    }
    rtnl.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
        .map(drop)
        .map_err(netlink(format!("setting link {index} up")))
}

/// An interface joined to a tap: what QEMU gets for one guest NIC.
#[derive(Debug)]
pub struct TapBridge {
    /// The tap's fd, for `-netdev tap,fd=N`.
    pub tap: OwnedFd,
    pub tap_name: String,
    pub tap_index: u32,
    /// The interface the guest's NIC stands in for: its MAC and MTU are
    /// the NIC's.
    pub interface: Interface,
}

/// Joins `interface` to a new tap `tap_name`: the tap gets the
/// interface's MTU and is set up, both get an ingress qdisc, and a filter
/// on each redirects everything to the other (Kata's order). On error the
/// interface is left as it was.
pub fn bridge(
    rtnl: &mut Rtnl,
    interface: &Interface,
    tap_name: &str,
) -> Result<TapBridge, NetworkError> {
    let (tap, tap_name) = open_tap(tap_name).map_err(|source| NetworkError::Tap {
        name: tap_name.to_string(),
        source,
    })?;
    let tap_index = link_index(rtnl, &tap_name)?;
    let joined = (|| {
        set_up(rtnl, tap_index, Some(interface.mtu))?;
        add_ingress(rtnl, tap_index)?;
        // A stale qdisc (a crashed earlier pod) would keep its filters.
        remove_ingress(rtnl, interface.index)?;
        add_ingress(rtnl, interface.index)?;
        add_redirect(rtnl, interface.index, tap_index)?;
        add_redirect(rtnl, tap_index, interface.index)
    })();
    if let Err(e) = joined {
        // The tap and its qdisc go with the fd.
        let _ = remove_ingress(rtnl, interface.index);
        return Err(e);
    }
    Ok(TapBridge {
        tap,
        tap_name,
        tap_index,
        interface: interface.clone(),
    })
}

/// Undoes [`bridge`] on the interface's side (its qdisc, and with it the
/// filter); the tap goes when its last fd closes.
pub fn unbridge(rtnl: &mut Rtnl, bridge: &TapBridge) -> Result<(), NetworkError> {
    remove_ingress(rtnl, bridge.interface.index)
}

fn ingress_message(index: u32) -> TcMessage {
    let mut message = TcMessage::with_index(index as i32);
    message.header.handle = INGRESS_HANDLE;
    message.header.parent = TcHandle::INGRESS;
    message
        .attributes
        .push(TcAttribute::Kind("ingress".to_string()));
    message
}

fn add_ingress(rtnl: &mut Rtnl, index: u32) -> Result<(), NetworkError> {
    rtnl.request(
        RouteNetlinkMessage::NewQueueDiscipline(ingress_message(index)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
    .map_err(netlink(format!("adding an ingress qdisc to link {index}")))
}

/// Removes link `index`'s ingress qdisc and its filters; none is fine.
fn remove_ingress(rtnl: &mut Rtnl, index: u32) -> Result<(), NetworkError> {
    match rtnl.request(
        RouteNetlinkMessage::DelQueueDiscipline(ingress_message(index)),
        NLM_F_ACK,
    ) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        Err(e) => Err(netlink(format!(
            "removing the ingress qdisc of link {index}"
        ))(e)),
    }
}

/// `tc filter add dev FROM parent ffff: protocol all prio 1 u32 match u8 0
/// 0 action mirred egress redirect dev TO`.
fn add_redirect(rtnl: &mut Rtnl, from: u32, to: u32) -> Result<(), NetworkError> {
    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    // Written from this field, not from `keys.len()`.
    selector.nkeys = 1;
    // Mask 0, value 0, offset 0: every packet.
    selector.keys = vec![TcU32Key::default()];
    let mut filter = TcMessage::with_index(from as i32);
    filter.header.parent = INGRESS_HANDLE;
    filter.header.handle = TcHandle::UNSPEC;
    filter.header.info = (u32::from(REDIRECT_PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be());
    filter.attributes = vec![
        TcAttribute::Kind("u32".to_string()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]),
    ];
    rtnl.request(
        RouteNetlinkMessage::NewTrafficFilter(filter),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
    .map_err(netlink(format!("redirecting link {from} to link {to}")))
}

#[cfg(test)]
mod tests;
