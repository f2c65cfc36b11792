//! The pod network's messages to and from what netlink reads and applies:
//! the host builds them from its namespace, the agent parses them (every
//! field checked, errors naming the interface or route) and answers its
//! List requests with them.

use std::net::IpAddr;

use kabuto_netlink::{format_mac, parse_mac, Interface, Neighbour, Route};
use protobuf::EnumOrUnknown;

use crate::agent;

/// A message field the agent cannot apply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkMessageError {
    #[error("interface name {0:?}: use 1 to 15 letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error(
        "interface {name}: reserved_hwAddr {mac:?} is not the reserved NIC's placeholder \
         02:6b:62:00:00:01, or is the interface's own MAC"
    )]
    ReservedMac { name: String, mac: String },
    #[error("interface {name}: MAC address {mac:?} is not aa:bb:cc:dd:ee:ff")]
    Mac { name: String, mac: String },
    #[error("interface {name}: MTU {mtu} is outside 68..=65535")]
    Mtu { name: String, mtu: u64 },
    #[error("interface {name}: address {address:?}/{mask:?} is not a unicast IPv4 or IPv6 address (not loopback, link-local or multicast) with a prefix length that fits it")]
    Address {
        name: String,
        address: String,
        mask: String,
    },
    #[error("interface {name}: {field} is not supported (must be empty or 0)")]
    UnsupportedInterfaceField { name: String, field: &'static str },
    #[error("route {route}: {problem}")]
    Route { route: String, problem: String },
    #[error("neighbour {ip:?} on {device}: {problem}")]
    Neighbour {
        ip: String,
        device: String,
        problem: String,
    },
}

/// An interface as the guest must configure it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
    /// The MAC of the reserved NIC that takes this interface's MAC first.
    pub reserved_mac: Option<Vec<u8>>,
}

/// A route as the guest must add it: its device by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub route: Route,
    pub device: String,
}

/// The MAC a NIC reserved at boot has until the interface CNI adds after
/// create takes it over (locally administered, never on a wire: its tap is
/// joined only after the guest gave the NIC the interface's MAC).
pub const RESERVED_MAC: [u8; 6] = [0x02, 0x6b, 0x62, 0x00, 0x00, 0x01];

/// The NUD state of a permanent neighbour entry.
pub const NUD_PERMANENT: i32 = 0x80;
const RT_SCOPE_UNIVERSE: u32 = 0;
const RT_SCOPE_LINK: u32 = 253;

fn family(ip: IpAddr) -> EnumOrUnknown<agent::IPFamily> {
    EnumOrUnknown::new(if ip.is_ipv4() {
        agent::IPFamily::v4
    } else {
        agent::IPFamily::v6
    })
}

fn ip_address(ip: IpAddr, prefix: u8) -> agent::IPAddress {
    agent::IPAddress {
        family: family(ip),
        address: ip.to_string(),
        mask: prefix.to_string(),
        ..Default::default()
    }
}

/// The message for one interface of a namespace.
pub fn interface_message(interface: &Interface) -> agent::Interface {
    agent::Interface {
        device: interface.name.clone(),
        name: interface.name.clone(),
        IPAddresses: interface
            .addresses
            .iter()
            .map(|(ip, prefix)| ip_address(*ip, *prefix))
            .collect(),
        mtu: u64::from(interface.mtu),
        hwAddr: format_mac(&interface.mac),
        ..Default::default()
    }
}

/// The message for one route; `device` is its interface's name.
pub fn route_message(route: &Route, device: &str) -> agent::Route {
    let ip = route
        .destination
        .map(|(ip, _)| ip)
        .or(route.gateway)
        .or(route.source);
    agent::Route {
        dest: route
            .destination
            .map(|(ip, prefix)| format!("{ip}/{prefix}"))
            .unwrap_or_default(),
        gateway: route.gateway.map(|g| g.to_string()).unwrap_or_default(),
        device: device.to_string(),
        source: route.source.map(|s| s.to_string()).unwrap_or_default(),
        scope: if route.gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        },
        family: ip.map(family).unwrap_or_default(),
        mtu: route.mtu.unwrap_or(0),
        ..Default::default()
    }
}

/// The message for one static neighbour; `device` is its interface's name.
pub fn neighbour_message(neighbour: &Neighbour, device: &str) -> agent::ARPNeighbor {
    agent::ARPNeighbor {
        toIPAddress: protobuf::MessageField::some(ip_address(
            neighbour.ip,
            if neighbour.ip.is_ipv4() { 32 } else { 128 },
        )),
        device: device.to_string(),
        lladdr: format_mac(&neighbour.mac),
        state: NUD_PERMANENT,
        ..Default::default()
    }
}

/// A Linux interface name (IFNAMSIZ, no '/' or whitespace; the characters
/// CNI and Kubernetes use).
pub fn check_name(name: &str) -> Result<(), NetworkMessageError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetworkMessageError::Name(name.to_string()))
    }
}

/// An address a pod's NIC may hold or send from: not loopback (traffic to
/// it would land in the guest itself), unspecified, multicast or
/// link-local (the guest makes its own).
fn is_pod_address(ip: IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local)
}

fn parse_prefixed(address: &str, mask: &str) -> Option<(IpAddr, u8)> {
    let ip: IpAddr = address.parse().ok()?;
    let prefix: u8 = mask.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

/// Checks an UpdateInterface's interface.
pub fn parse_interface(message: &agent::Interface) -> Result<InterfaceConfig, NetworkMessageError> {
    let name = message.name.clone();
    check_name(&name)?;
    let unsupported = |field| NetworkMessageError::UnsupportedInterfaceField {
        name: name.clone(),
        field,
    };
    if !message.devicePath.is_empty() {
        return Err(unsupported("devicePath (a hot-plugged NIC)"));
    }
    if message.raw_flags != 0 {
        return Err(unsupported("raw_flags"));
    }
    if !message.device.is_empty() && message.device != message.name {
        return Err(unsupported("a device name other than the interface's"));
    }
    let mac = parse_mac(&message.hwAddr).ok_or_else(|| NetworkMessageError::Mac {
        name: name.clone(),
        mac: message.hwAddr.clone(),
    })?;
    // Only the placeholder a reserved NIC boots with: no other NIC of the
    // guest's is renamed through this.
    let reserved_mac = match message.reserved_hwAddr.as_str() {
        "" => None,
        text if parse_mac(text).as_deref() == Some(&RESERVED_MAC[..]) && mac != RESERVED_MAC => {
            Some(RESERVED_MAC.to_vec())
        }
        text => {
            return Err(NetworkMessageError::ReservedMac {
                name: name.clone(),
                mac: text.to_string(),
            })
        }
    };
    if !(68..=65535).contains(&message.mtu) {
        return Err(NetworkMessageError::Mtu {
            name,
            mtu: message.mtu,
        });
    }
    let mut addresses = Vec::new();
    for a in &message.IPAddresses {
        let parsed = parse_prefixed(&a.address, &a.mask)
            .filter(|(ip, _)| ip.is_ipv4() == (a.family.value() == agent::IPFamily::v4 as i32))
            .filter(|(ip, _)| is_pod_address(*ip))
            .ok_or_else(|| NetworkMessageError::Address {
                name: name.clone(),
                address: a.address.clone(),
                mask: a.mask.clone(),
            })?;
        if addresses.contains(&parsed) {
            return Err(NetworkMessageError::Address {
                name: name.clone(),
                address: a.address.clone(),
                mask: a.mask.clone(),
            });
        }
        addresses.push(parsed);
    }
    Ok(InterfaceConfig {
        mtu: message.mtu as u32,
        name,
        mac,
        addresses,
        reserved_mac,
    })
}

/// Checks one of UpdateRoutes's routes.
pub fn parse_route(message: &agent::Route) -> Result<RouteConfig, NetworkMessageError> {
    let shown = format!(
        "{} via {:?} dev {:?}",
        if message.dest.is_empty() {
            "default"
        } else {
            &message.dest
        },
        message.gateway,
        message.device
    );
    let problem = |problem: &str| NetworkMessageError::Route {
        route: shown.clone(),
        problem: problem.to_string(),
    };
    check_name(&message.device).map_err(|_| problem("no valid device name"))?;
    if message.flags != 0 {
        return Err(problem("flags are not supported (must be 0)"));
    }
    let destination = if message.dest.is_empty() {
        None
    } else {
        let (address, mask) = message
            .dest
            .split_once('/')
            .ok_or_else(|| problem("the destination has no prefix length"))?;
        Some(parse_prefixed(address, mask).ok_or_else(|| problem("bad destination"))?)
    };
    let ip = |text: &str, what: &str| -> Result<Option<IpAddr>, NetworkMessageError> {
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| problem(&format!("bad {what}")))
    };
    let gateway = ip(&message.gateway, "gateway")?;
    let source = ip(&message.source, "source")?;
    if source.is_some_and(|s| !is_pod_address(s)) {
        return Err(problem("the source is not a pod address"));
    }
    if gateway.is_some_and(|g| g.is_loopback() || g.is_unspecified() || g.is_multicast()) {
        return Err(problem("the gateway is loopback, unspecified or multicast"));
    }
    let v6 = message.family.value() == agent::IPFamily::v6 as i32;
    let families_agree = destination
        .map(|(ip, _)| ip)
        .into_iter()
        .chain(gateway)
        .chain(source)
        .all(|ip| ip.is_ipv6() == v6);
    if !families_agree {
        return Err(problem("addresses of the other family"));
    }
    if destination.is_none() && gateway.is_none() {
        return Err(problem("a default route needs a gateway"));
    }
    let scope_fits = match message.scope {
        RT_SCOPE_UNIVERSE => gateway.is_some(),
        RT_SCOPE_LINK => gateway.is_none(),
        _ => false,
    };
    if !scope_fits {
        return Err(problem(
            "the scope must be universe (0) with a gateway, link (253) without",
        ));
    }
    if message.mtu != 0 && !(68..=65535).contains(&message.mtu) {
        return Err(problem("MTU outside 68..=65535"));
    }
    Ok(RouteConfig {
        route: Route {
            destination,
            gateway,
            source,
            device: None,
            mtu: (message.mtu != 0).then_some(message.mtu),
        },
        device: message.device.clone(),
    })
}

/// Checks one of AddARPNeighbors's entries; returns it with its device's
/// name.
pub fn parse_neighbour(
    message: &agent::ARPNeighbor,
) -> Result<(IpAddr, Vec<u8>, String), NetworkMessageError> {
    let ip_text = message
        .toIPAddress
        .as_ref()
        .map(|a| a.address.clone())
        .unwrap_or_default();
    let problem = |problem: &str| NetworkMessageError::Neighbour {
        ip: ip_text.clone(),
        device: message.device.clone(),
        problem: problem.to_string(),
    };
    check_name(&message.device).map_err(|_| problem("no valid device name"))?;
    let ip: IpAddr = ip_text.parse().map_err(|_| problem("bad address"))?;
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return Err(problem("not a unicast address"));
    }
    let mac = parse_mac(&message.lladdr).ok_or_else(|| problem("bad link-layer address"))?;
    if message.state != NUD_PERMANENT || message.flags != 0 {
        return Err(problem(
            "only permanent entries without flags are supported",
        ));
    }
    Ok((ip, mac, message.device.clone()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kabuto_netlink::LinkKind;

    fn eth0() -> Interface {
        Interface {
            name: "eth0".into(),
            index: 2,
            mac: vec![0x0a, 0x58, 0x0a, 0x58, 0x00, 0x05],
            mtu: 1450,
            kind: LinkKind::Veth,
            addresses: vec![
                ("10.88.0.5".parse().unwrap(), 16),
                ("fd00:88::5".parse().unwrap(), 64),
            ],
        }
    }

    #[test]
    fn what_the_host_reads_parses_back_as_it_was() {
        let config = parse_interface(&interface_message(&eth0())).unwrap();
        assert_eq!(
            config,
            InterfaceConfig {
                name: "eth0".into(),
                mac: eth0().mac,
                mtu: 1450,
                addresses: eth0().addresses,
                reserved_mac: None,
            }
        );
        for route in [
            Route {
                destination: None,
                gateway: Some("10.88.0.1".parse().unwrap()),
                source: None,
                device: Some(2),
                mtu: Some(1400),
            },
            Route {
                destination: Some(("10.88.0.0".parse().unwrap(), 16)),
                gateway: None,
                source: Some("10.88.0.5".parse().unwrap()),
                device: Some(2),
                mtu: None,
            },
            Route {
                destination: None,
                gateway: Some("fd00:88::1".parse().unwrap()),
                source: None,
                device: Some(2),
                mtu: None,
            },
        ] {
            let parsed = parse_route(&route_message(&route, "eth0")).unwrap();
            assert_eq!(parsed.device, "eth0");
            assert_eq!(
                parsed.route,
                Route {
                    device: None,
                    ..route
                }
            );
        }
        let neighbour = Neighbour {
            ip: "10.88.0.1".parse().unwrap(),
            mac: vec![2, 0, 0, 0, 0, 1],
            device: 2,
        };
        assert_eq!(
            parse_neighbour(&neighbour_message(&neighbour, "eth0")).unwrap(),
            (neighbour.ip, neighbour.mac, "eth0".to_string())
        );
    }

    #[test]
    fn fields_the_agent_cannot_apply_are_refused_by_name() {
        let good = interface_message(&eth0());
        let refused = |change: &dyn Fn(&mut agent::Interface)| {
            let mut message = good.clone();
            change(&mut message);
            parse_interface(&message).unwrap_err().to_string()
        };
        assert!(refused(&|m| m.name = "../eth0".into()).contains("\"../eth0\""));
        assert!(refused(&|m| m.hwAddr = "0a:58".into()).contains("MAC address"));
        assert!(refused(&|m| m.reserved_hwAddr = "0a:58:zz".into()).contains("reserved_hwAddr"));
        // Only the placeholder, and not as the interface's own MAC.
        assert!(refused(&|m| m.reserved_hwAddr = m.hwAddr.clone()).contains("reserved_hwAddr"));
        assert!(refused(&|m| {
            m.reserved_hwAddr = format_mac(&RESERVED_MAC);
            m.hwAddr = format_mac(&RESERVED_MAC);
        })
        .contains("reserved_hwAddr"));
        let mut taken_over = interface_message(&eth0());
        taken_over.reserved_hwAddr = format_mac(&RESERVED_MAC);
        assert_eq!(
            parse_interface(&taken_over).unwrap().reserved_mac,
            Some(RESERVED_MAC.to_vec())
        );
        assert!(refused(&|m| m.mtu = 70000).contains("MTU 70000"));
        assert!(refused(&|m| m.IPAddresses[0].mask = "33".into()).contains("10.88.0.5"));
        assert!(
            refused(&|m| m.IPAddresses[1].family = family("10.0.0.1".parse().unwrap()))
                .contains("fd00:88::5")
        );
        assert!(refused(&|m| m.devicePath = "01/02".into()).contains("hot-plugged"));
        assert!(refused(&|m| m.raw_flags = 1).contains("raw_flags"));
        let twice = refused(&|m| m.IPAddresses[1] = m.IPAddresses[0].clone());
        assert!(twice.contains("10.88.0.5"), "{twice}");
        for not_a_pods in ["127.0.0.2", "169.254.1.1", "224.0.0.1", "0.0.0.0"] {
            assert!(
                refused(&|m| m.IPAddresses[0].address = not_a_pods.into()).contains(not_a_pods),
                "{not_a_pods} accepted"
            );
        }
        assert!(refused(&|m| m.IPAddresses[1].address = "fe80::1".into()).contains("fe80::1"));

        let route = route_message(
            &Route {
                destination: None,
                gateway: Some("10.88.0.1".parse().unwrap()),
                source: None,
                device: None,
                mtu: None,
            },
            "eth0",
        );
        let refused = |change: &dyn Fn(&mut agent::Route)| {
            let mut message = route.clone();
            change(&mut message);
            parse_route(&message).unwrap_err().to_string()
        };
        assert!(refused(&|r| r.gateway.clear()).contains("needs a gateway"));
        assert!(refused(&|r| r.device = "lo/x".into()).contains("device name"));
        assert!(refused(&|r| r.scope = 253).contains("scope"));
        assert!(refused(&|r| r.gateway = "fd00::1".into()).contains("other family"));
        assert!(refused(&|r| r.dest = "10.0.0.0".into()).contains("prefix length"));
        assert!(refused(&|r| r.flags = 4).contains("flags"));
        assert!(refused(&|r| r.source = "127.0.0.1".into()).contains("source"));
        assert!(refused(&|r| r.gateway = "127.0.0.1".into()).contains("gateway"));
    }
}
