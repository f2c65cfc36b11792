//! The pod's network in the guest: the NICs the host made from the pod's
//! network namespace (one per CNI interface, with its MAC), configured as
//! the host's UpdateInterface / UpdateRoutes / AddARPNeighbors say, in the
//! guest's own network namespace — which the pod's containers then share
//! (Kata's model), so the agent's own traffic (guest pulls, the KBS) takes
//! the pod's network as upstream CoCo's does.
//!
//! Every message is checked whole before anything changes
//! (`kabuto_protocol::network`). The host is trusted with nothing here that
//! it does not already control: it carries every packet anyway, which is
//! why workloads and the KBS path use TLS.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kabuto_netlink::{
    add_address, add_neighbour, add_route, delete_address, delete_route, interfaces, routes,
    set_down_renamed, set_up, Interface, LinkKind, Neighbour, NetlinkError, Rtnl,
};
use kabuto_protocol::agent;
use kabuto_protocol::network::{
    interface_message, parse_interface, parse_neighbour, parse_route, route_message,
    NetworkMessageError,
};

/// How long a NIC may take to appear after its driver loads.
const NIC_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    #[error(transparent)]
    Message(#[from] NetworkMessageError),
    #[error("the guest's network")]
    Netlink(#[from] NetlinkError),
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("interface {name}: the guest has no NIC with MAC {mac}")]
    NoNic { name: String, mac: String },
    #[error("interface {name}: the name is taken by another NIC ({other})")]
    NameTaken { name: String, other: String },
    #[error("{what}: no interface {device} in the guest")]
    NoDevice { what: String, device: String },
}

fn open() -> Result<Rtnl, PodNetworkError> {
    Rtnl::open().map_err(PodNetworkError::Socket)
}

/// Configures the NIC with the interface's MAC: its name and MTU, its
/// addresses (replacing the global ones it had), up. Returns it as the
/// kernel now reports it.
pub fn update_interface(message: &agent::Interface) -> Result<agent::Interface, PodNetworkError> {
    let config = parse_interface(message)?;
    let mut rtnl = open()?;
    let nic = wait_for_nic(&mut rtnl, &config.mac, &config.name, NIC_WAIT)?;
    let all = interfaces(&mut rtnl)?;
    if let Some(other) = all
        .iter()
        .find(|i| i.name == config.name && i.index != nic.index)
    {
        return Err(PodNetworkError::NameTaken {
            name: config.name,
            other: kabuto_netlink::format_mac(&other.mac),
        });
    }
    let rename = (nic.name != config.name).then_some(config.name.as_str());
    set_down_renamed(&mut rtnl, nic.index, rename, config.mtu)?;
    // Read again: a link going down loses its IPv6 addresses.
    let had = interfaces(&mut rtnl)?
        .into_iter()
        .find(|i| i.index == nic.index)
        .map(|i| i.addresses)
        .unwrap_or_default();
    for (ip, prefix) in &had {
        delete_address(&mut rtnl, nic.index, *ip, *prefix)?;
    }
    for (ip, prefix) in &config.addresses {
        add_address(&mut rtnl, nic.index, *ip, *prefix)?;
    }
    set_up(&mut rtnl, nic.index, None)?;
    let now = interfaces(&mut rtnl)?
        .into_iter()
        .find(|i| i.index == nic.index)
        .ok_or_else(|| PodNetworkError::NoNic {
            name: config.name.clone(),
            mac: message.hwAddr.clone(),
        })?;
    log::info!(
        "interface {} configured: {} address(es), MTU {}",
        now.name,
        now.addresses.len(),
        now.mtu
    );
    Ok(interface_message(&now))
}

/// The NIC whose MAC is `mac`, once its driver has made it.
fn wait_for_nic(
    rtnl: &mut Rtnl,
    mac: &[u8],
    name: &str,
    wait: Duration,
) -> Result<Interface, PodNetworkError> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(nic) = interfaces(rtnl)?
            .into_iter()
            .find(|i| i.mac == mac && i.kind != LinkKind::Loopback)
        {
            return Ok(nic);
        }
        if Instant::now() >= deadline {
            return Err(PodNetworkError::NoNic {
                name: name.to_string(),
                mac: kabuto_netlink::format_mac(mac),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's interfaces by name, loopback left out.
fn indexes(rtnl: &mut Rtnl) -> Result<HashMap<String, u32>, PodNetworkError> {
    Ok(interfaces(rtnl)?
        .into_iter()
        .filter(|i| i.kind != LinkKind::Loopback)
        .map(|i| (i.name, i.index))
        .collect())
}

/// Replaces the routes of the guest's NICs with `messages` (routes without
/// a gateway first: a gateway must be reachable when its route is added).
pub fn update_routes(messages: &[agent::Route]) -> Result<agent::Routes, PodNetworkError> {
    let mut configs = messages
        .iter()
        .map(parse_route)
        .collect::<Result<Vec<_>, _>>()?;
    let mut rtnl = open()?;
    let by_name = indexes(&mut rtnl)?;
    for config in &mut configs {
        let index = by_name
            .get(&config.device)
            .ok_or_else(|| PodNetworkError::NoDevice {
                what: format!("route {}", config.route),
                device: config.device.clone(),
            })?;
        config.route.device = Some(*index);
    }
    let nics: Vec<u32> = by_name.values().copied().collect();
    for route in routes(&mut rtnl)? {
        let on_a_nic = route.device.is_some_and(|d| nics.contains(&d));
        if on_a_nic && !route.is_ipv6_link_local() {
            delete_route(&mut rtnl, &route)?;
        }
    }
    configs.sort_by_key(|c| c.route.gateway.is_some());
    for config in &configs {
        add_route(&mut rtnl, &config.route)?;
    }
    log::info!("{} route(s) applied", configs.len());
    list_routes_with(&mut rtnl)
}

/// Adds the host's static neighbour entries.
pub fn add_neighbours(messages: &[agent::ARPNeighbor]) -> Result<(), PodNetworkError> {
    let parsed = messages
        .iter()
        .map(parse_neighbour)
        .collect::<Result<Vec<_>, _>>()?;
    let mut rtnl = open()?;
    let by_name = indexes(&mut rtnl)?;
    for (ip, mac, device) in parsed {
        let index = by_name
            .get(&device)
            .ok_or_else(|| PodNetworkError::NoDevice {
                what: format!("neighbour {ip}"),
                device: device.clone(),
            })?;
        add_neighbour(
            &mut rtnl,
            &Neighbour {
                ip,
                mac,
                device: *index,
            },
        )?;
    }
    Ok(())
}

pub fn list_interfaces() -> Result<agent::Interfaces, PodNetworkError> {
    let mut rtnl = open()?;
    Ok(agent::Interfaces {
        Interfaces: interfaces(&mut rtnl)?
            .iter()
            .map(interface_message)
            .collect(),
        ..Default::default()
    })
}

pub fn list_routes() -> Result<agent::Routes, PodNetworkError> {
    list_routes_with(&mut open()?)
}

fn list_routes_with(rtnl: &mut Rtnl) -> Result<agent::Routes, PodNetworkError> {
    let names: HashMap<u32, String> = interfaces(rtnl)?
        .into_iter()
        .map(|i| (i.index, i.name))
        .collect();
    Ok(agent::Routes {
        Routes: routes(rtnl)?
            .iter()
            .filter(|r| !r.is_ipv6_link_local())
            .map(|r| {
                let device = r.device.and_then(|d| names.get(&d)).map(String::as_str);
                route_message(r, device.unwrap_or(""))
            })
            .collect(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kabuto_netlink::testing::{in_new_netns, veth_pair};
    use kabuto_netlink::{format_mac, link_index};
    use kabuto_protocol::network::NUD_PERMANENT;

    fn address(ip: &str, mask: &str) -> agent::IPAddress {
        agent::IPAddress {
            family: protobuf::EnumOrUnknown::new(if ip.contains(':') {
                agent::IPFamily::v6
            } else {
                agent::IPFamily::v4
            }),
            address: ip.into(),
            mask: mask.into(),
            ..Default::default()
        }
    }

    fn route(dest: &str, gateway: &str, mtu: u32) -> agent::Route {
        agent::Route {
            dest: dest.into(),
            gateway: gateway.into(),
            device: "eth7".into(),
            scope: if gateway.is_empty() { 253 } else { 0 },
            family: protobuf::EnumOrUnknown::new(if dest.contains(':') || gateway.contains(':') {
                agent::IPFamily::v6
            } else {
                agent::IPFamily::v4
            }),
            mtu,
            ..Default::default()
        }
    }

    /// A veth (its peer up) standing in for the guest's NIC, as the host
    /// would describe it to be configured.
    fn nic() -> agent::Interface {
        let mut rtnl = Rtnl::open().expect("netlink");
        veth_pair(&mut rtnl, "nic0", "wire0").expect("veth pair");
        let wire = link_index(&mut rtnl, "wire0").expect("peer");
        set_up(&mut rtnl, wire, None).expect("peer up");
        let mac = interfaces(&mut rtnl)
            .expect("links")
            .into_iter()
            .find(|i| i.name == "nic0")
            .expect("nic0")
            .mac;
        agent::Interface {
            name: "eth7".into(),
            device: "eth7".into(),
            hwAddr: format_mac(&mac),
            mtu: 1400,
            IPAddresses: vec![address("10.1.0.5", "24"), address("fd00:1::5", "64")],
            ..Default::default()
        }
    }

    #[test]
    fn the_hosts_interface_routes_and_neighbours_are_applied_as_sent() {
        in_new_netns(|| {
            let applied = update_interface(&nic()).expect("interface");
            assert_eq!(applied.name, "eth7");
            assert_eq!(applied.mtu, 1400);
            let mut addresses: Vec<_> = applied
                .IPAddresses
                .iter()
                .map(|a| format!("{}/{}", a.address, a.mask))
                .collect();
            addresses.sort();
            assert_eq!(addresses, ["10.1.0.5/24", "fd00:1::5/64"]);
            // Sent again with another address: the old one goes.
            let mut again = nic_again(&applied);
            again.IPAddresses = vec![address("10.1.0.6", "24")];
            let applied = update_interface(&again).expect("interface again");
            assert_eq!(applied.IPAddresses.len(), 1);
            assert_eq!(applied.IPAddresses[0].address, "10.1.0.6");

            let routes = update_routes(&[
                route("", "10.1.0.1", 0),
                route("10.1.0.0/24", "", 0),
                route("10.9.0.0/16", "10.1.0.1", 1300),
            ])
            .expect("routes");
            let shown: Vec<_> = routes
                .Routes
                .iter()
                .map(|r| {
                    (
                        r.dest.as_str(),
                        r.gateway.as_str(),
                        r.device.as_str(),
                        r.mtu,
                    )
                })
                .collect();
            assert!(shown.contains(&("", "10.1.0.1", "eth7", 0)), "{shown:?}");
            assert!(
                shown.contains(&("10.9.0.0/16", "10.1.0.1", "eth7", 1300)),
                "{shown:?}"
            );
            assert!(shown.contains(&("10.1.0.0/24", "", "eth7", 0)), "{shown:?}");
            assert_eq!(
                list_routes().expect("list").Routes.len(),
                routes.Routes.len()
            );

            add_neighbours(&[agent::ARPNeighbor {
                toIPAddress: protobuf::MessageField::some(address("10.1.0.1", "32")),
                device: "eth7".into(),
                lladdr: "02:00:00:00:00:01".into(),
                state: NUD_PERMANENT,
                ..Default::default()
            }])
            .expect("neighbour");
            let mut rtnl = Rtnl::open().expect("netlink");
            let neighbours = kabuto_netlink::neighbours(&mut rtnl).expect("neighbours");
            assert!(neighbours
                .iter()
                .any(|n| n.ip.to_string() == "10.1.0.1" && n.mac == [2, 0, 0, 0, 0, 1]));
        });
    }

    fn nic_again(applied: &agent::Interface) -> agent::Interface {
        agent::Interface {
            name: applied.name.clone(),
            device: applied.name.clone(),
            hwAddr: applied.hwAddr.clone(),
            mtu: applied.mtu,
            ..Default::default()
        }
    }

    #[test]
    fn what_the_guest_cannot_apply_is_refused_naming_it() {
        in_new_netns(|| {
            let refused = |e: PodNetworkError| kabuto_error::chain(&e);
            let applied = update_interface(&nic()).expect("interface");
            let mut rtnl = Rtnl::open().expect("netlink");
            let absent = [2, 0x11, 0x22, 0x33, 0x44, 0x55];
            let e = refused(
                wait_for_nic(&mut rtnl, &absent, "eth8", Duration::from_millis(100))
                    .expect_err("no such NIC"),
            );
            assert!(e.contains("eth8") && e.contains("02:11:22:33:44:55"), "{e}");
            let mut taken = nic_again(&applied);
            taken.name = "wire0".into();
            taken.device = "wire0".into();
            let e = refused(update_interface(&taken).expect_err("name of another NIC"));
            assert!(e.contains("wire0") && e.contains("taken"), "{e}");

            let mut unknown = route("", "10.1.0.1", 0);
            unknown.device = "eth9".into();
            let e = refused(update_routes(&[unknown]).expect_err("unknown device"));
            assert!(e.contains("eth9"), "{e}");
            let e = refused(
                update_routes(&[route("", "10.7.0.1", 0)]).expect_err("unreachable gateway"),
            );
            assert!(e.contains("10.7.0.1"), "{e}");
        });
    }
}
