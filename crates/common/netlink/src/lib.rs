//! A pod's network state over rtnetlink, for both sides of the VM: the
//! host reads the interfaces and routes CNI made in the pod's namespace,
//! the guest applies them to its NICs. Everything works on the network
//! namespace of the thread that opened the [`Rtnl`].

mod apply;
mod rtnl;

use std::io;
use std::net::IpAddr;

pub use netlink_packet_core as core;
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol,
    RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
pub use netlink_packet_route::{self as packet, RouteNetlinkMessage};

pub use apply::{
    add_neighbour, delete_address, delete_route, move_to_netns, neighbours, set_down_renamed,
    set_down_with_mac, Neighbour,
};
pub use rtnl::Rtnl;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no interface {0} in the network namespace")]
    NoSuchInterface(String),
}

/// An error mapper: `what` was being done when the kernel said no.
pub fn failed(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Netlink { what, source }
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
pub fn interfaces(rtnl: &mut Rtnl) -> Result<Vec<Interface>, NetlinkError> {
    let links = rtnl
        .request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )
        .map_err(failed("listing the links"))?;
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
        .map_err(failed("listing the addresses"))?;
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
pub fn routes(rtnl: &mut Rtnl) -> Result<Vec<Route>, NetlinkError> {
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        let replies = rtnl
            .request(RouteNetlinkMessage::GetRoute(request), NLM_F_DUMP)
            .map_err(failed("listing the routes"))?;
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
pub fn link_index(rtnl: &mut Rtnl, name: &str) -> Result<u32, NetlinkError> {
    let mut request = LinkMessage::default();
    request
        .attributes
        .push(LinkAttribute::IfName(name.to_string()));
    let replies = rtnl
        .request(RouteNetlinkMessage::GetLink(request), NLM_F_ACK)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENODEV) => NetlinkError::NoSuchInterface(name.to_string()),
            _ => failed(format!("looking up {name}"))(e),
        })?;
    replies
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
            _ => None,
        })
        .ok_or_else(|| NetlinkError::NoSuchInterface(name.to_string()))
}

/// Sets link `index` up, with `mtu` if given.
pub fn set_up(rtnl: &mut Rtnl, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = mtu {
        link.attributes.push(LinkAttribute::Mtu(mtu));
    }
    rtnl.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
        .map(drop)
        .map_err(failed(format!("setting link {index} up")))
}

/// Adds `address`/`prefix` to link `index`.
pub fn add_address(
    rtnl: &mut Rtnl,
    index: u32,
    address: IpAddr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    let mut message = address_message(index, address, prefix);
    if address.is_ipv6() {
        // The address moves from the pod's namespace, where it passed
        // duplicate detection; a tentative address could not be a route's
        // source.
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    rtnl.request(
        RouteNetlinkMessage::NewAddress(message),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
    .map_err(failed(format!("adding {address}/{prefix} to link {index}")))
}

/// `address`/`prefix` on link `index`, as adding and removing name it.
fn address_message(index: u32, address: IpAddr, prefix: u8) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = family(address);
    message.header.prefix_len = prefix;
    message.header.index = index;
    message.attributes.push(AddressAttribute::Address(address));
    if address.is_ipv4() {
        message.attributes.push(AddressAttribute::Local(address));
    }
    message
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// Adds `route` to the main table (a gateway makes it universe scope,
/// else link scope), with its source and its own MTU.
pub fn add_route(rtnl: &mut Rtnl, route: &Route) -> Result<(), NetlinkError> {
    rtnl.request(
        RouteNetlinkMessage::NewRoute(route_message(route)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
    .map_err(failed(format!("adding the route {route}")))
}

/// `route` as a main-table unicast route message.
fn route_message(route: &Route) -> RouteMessage {
    let address = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    };
    let mut message = RouteMessage::default();
    message.header.address_family = if route.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    message.header.table = RouteHeader::RT_TABLE_MAIN;
    message.header.kind = RouteType::Unicast;
    message.header.protocol = RouteProtocol::Static;
    message.header.scope = if route.gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if let Some((ip, prefix)) = route.destination {
        message.header.destination_prefix_length = prefix;
        message
            .attributes
            .push(RouteAttribute::Destination(address(ip)));
    }
    if let Some(gateway) = route.gateway {
        message
            .attributes
            .push(RouteAttribute::Gateway(address(gateway)));
    }
    if let Some(source) = route.source {
        message
            .attributes
            .push(RouteAttribute::PrefSource(address(source)));
    }
    if let Some(device) = route.device {
        message.attributes.push(RouteAttribute::Oif(device));
    }
    if let Some(mtu) = route.mtu {
        message
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    message
}

impl Route {
    /// An IPv6 route: by its destination, else gateway, else source.
    pub fn is_ipv6(&self) -> bool {
        self.destination
            .map(|(ip, _)| ip)
            .or(self.gateway)
            .or(self.source)
            .is_some_and(|ip| ip.is_ipv6())
    }

    /// The route the kernel makes itself for IPv6 link-local addresses
    /// (fe80::/64), which is never copied.
    pub fn is_ipv6_link_local(&self) -> bool {
        matches!(self.destination, Some((IpAddr::V6(ip), 64)) if ip.segments()[0] == 0xfe80)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Six hex bytes separated by colons; `None` for anything else.
pub fn parse_mac(text: &str) -> Option<Vec<u8>> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    (bytes.len() == 6).then_some(bytes)
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.destination {
            Some((ip, prefix)) => write!(f, "{ip}/{prefix}")?,
            None => f.write_str("default")?,
        }
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(device) = self.device {
            write!(f, " dev {device}")?;
        }
        if let Some(source) = self.source {
            write!(f, " src {source}")?;
        }
        if let Some(mtu) = self.mtu {
            write!(f, " mtu {mtu}")?;
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;
