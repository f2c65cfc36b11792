//! The calls the guest needs besides adding: links renamed and set down,
//! addresses and routes removed, static neighbours read and added.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};

use crate::{
    address_message, failed, family, route_message, NetlinkError, Route, RouteNetlinkMessage, Rtnl,
};

/// A static (permanent) neighbour entry: `ip` is at `mac` on link `device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Vec<u8>,
    pub device: u32,
}

fn set_down(rtnl: &mut Rtnl, index: u32) -> Result<(), NetlinkError> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::empty();
    link.header.change_mask = LinkFlags::Up;
    rtnl.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
        .map(drop)
        .map_err(failed(format!("setting link {index} down")))
}

/// Sets link `index` down, renames it to `name` when given and sets its
/// MTU (a link must be down to be renamed).
pub fn set_down_renamed(
    rtnl: &mut Rtnl,
    index: u32,
    name: Option<&str>,
    mtu: u32,
) -> Result<(), NetlinkError> {
    set_down(rtnl, index)?;
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes.push(LinkAttribute::Mtu(mtu));
    if let Some(name) = name {
        link.attributes
            .push(LinkAttribute::IfName(name.to_string()));
    }
    let what = match name {
        Some(name) => format!("naming link {index} {name} with MTU {mtu}"),
        None => format!("setting the MTU of link {index} to {mtu}"),
    };
    rtnl.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
        .map(drop)
        .map_err(failed(what))
}

/// Sets link `index` down and gives it the hardware address `mac` (a
/// reserved guest NIC taking the MAC of the interface it stands in for).
pub fn set_down_with_mac(rtnl: &mut Rtnl, index: u32, mac: &[u8]) -> Result<(), NetlinkError> {
    set_down(rtnl, index)?;
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes.push(LinkAttribute::Address(mac.to_vec()));
    rtnl.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
        .map(drop)
        .map_err(failed(format!(
            "giving link {index} the MAC {}",
            crate::format_mac(mac)
        )))
}

/// Moves link `index` into the network namespace open at `netns`, named
/// `name` there (its name here may be taken there).
pub fn move_to_netns(
    rtnl: &mut Rtnl,
    index: u32,
    netns: std::os::fd::RawFd,
    name: &str,
) -> Result<(), NetlinkError> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes.push(LinkAttribute::NetNsFd(netns));
    link.attributes
        .push(LinkAttribute::IfName(name.to_string()));
    rtnl.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
        .map(drop)
        .map_err(failed(format!(
            "moving link {index} into the pod's network namespace"
        )))
}

/// Removes `address`/`prefix` from link `index`.
pub fn delete_address(
    rtnl: &mut Rtnl,
    index: u32,
    address: IpAddr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    let message = address_message(index, address, prefix);
    rtnl.request(RouteNetlinkMessage::DelAddress(message), NLM_F_ACK)
        .map(drop)
        .map_err(failed(format!(
            "removing {address}/{prefix} from link {index}"
        )))
}

/// Removes `route` from the main table.
pub fn delete_route(rtnl: &mut Rtnl, route: &Route) -> Result<(), NetlinkError> {
    let mut message = route_message(route);
    // Match whoever made it (the kernel's prefix routes too) at any scope,
    // as `ip route del` does.
    message.header.protocol = RouteProtocol::Unspec;
    message.header.scope = RouteScope::NoWhere;
    rtnl.request(RouteNetlinkMessage::DelRoute(message), NLM_F_ACK)
        .map(drop)
        .map_err(failed(format!("removing the route {route}")))
}

/// The namespace's permanent neighbour entries (what CNI set statically;
/// learnt ones the guest learns itself).
pub fn neighbours(rtnl: &mut Rtnl) -> Result<Vec<Neighbour>, NetlinkError> {
    let replies = rtnl
        .request(
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
            NLM_F_DUMP,
        )
        .map_err(failed("listing the neighbours"))?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) if n.header.state == NeighbourState::Permanent => {
                neighbour_of(&n)
            }
            _ => None,
        })
        .collect())
}

fn neighbour_of(n: &NeighbourMessage) -> Option<Neighbour> {
    let mut ip = None;
    let mut mac = None;
    for attribute in &n.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(a) => mac = Some(a.clone()),
            _ => {}
        }
    }
    Some(Neighbour {
        ip: ip?,
        mac: mac?,
        device: n.header.ifindex,
    })
}

/// Adds (or replaces) a permanent neighbour entry.
pub fn add_neighbour(rtnl: &mut Rtnl, neighbour: &Neighbour) -> Result<(), NetlinkError> {
    let mut message = NeighbourMessage::default();
    message.header.family = family(neighbour.ip);
    message.header.ifindex = neighbour.device;
    message.header.state = NeighbourState::Permanent;
    message.header.kind = RouteType::Unicast;
    message
        .attributes
        .push(NeighbourAttribute::Destination(match neighbour.ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(neighbour.mac.clone()));
    rtnl.request(
        RouteNetlinkMessage::NewNeighbour(message),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(drop)
    .map_err(failed(format!(
        "adding the neighbour {} on link {}",
        neighbour.ip, neighbour.device
    )))
}
