//! The pod's network in the guest: the NICs the host made from the pod's
//! network namespace (one per CNI interface, with its MAC), moved into a
//! network namespace the agent makes for the pod ([`PodNetns`]) and
//! configured there as the host's UpdateInterface / UpdateRoutes /
//! AddARPNeighbors say. The pod's containers join that namespace (so
//! `net.*` sysctls are theirs, not the agent's), and the agent's own
//! traffic — guest pulls, the KBS — leaves through it too, from threads
//! that enter it ([`in_egress`]), as upstream CoCo's takes the pod's
//! network. The guest's own namespace keeps only its loopback (and QEMU's
//! user network for pods without one).
//!
//! Every message is checked whole before anything changes
//! (`kabuto_protocol::network`). The host is trusted with nothing here that
//! it does not already control: it carries every packet anyway, which is
//! why workloads and the KBS path use TLS.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kabuto_netlink::{
    add_address, add_neighbour, add_route, delete_address, delete_route, interfaces, link_index,
    move_to_netns, routes, set_down_renamed, set_down_with_mac, set_up, Interface, LinkKind,
    Neighbour, NetlinkError, Rtnl,
};
use kabuto_protocol::agent;
use kabuto_protocol::network::{
    interface_message, parse_interface, parse_neighbour, parse_route, route_message,
    InterfaceConfig, NetworkMessageError,
};

/// How long a NIC may take to appear after its driver loads.
pub const NIC_WAIT: Duration = Duration::from_secs(10);
/// At most this many neighbour entries per request: the host gets no
/// unbounded kernel memory in the guest.
pub const MAX_NEIGHBOURS: usize = 256;
/// At most this many routes per request.
pub const MAX_ROUTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    #[error(transparent)]
    Message(#[from] NetworkMessageError),
    #[error("the pod's network")]
    Netlink(#[from] NetlinkError),
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("the pod's network namespace")]
    Namespace(#[source] std::io::Error),
    #[error("interface {name}: the guest has no NIC with MAC {mac}")]
    NoNic { name: String, mac: String },
    #[error("interface {name}: {count} NICs have MAC {mac}; each must have its own")]
    SharedMac {
        name: String,
        mac: String,
        count: usize,
    },
    #[error("interface {name}: the name is taken by another NIC ({other})")]
    NameTaken { name: String, other: String },
    #[error("{what}: no interface {device} in the pod's network")]
    NoDevice { what: String, device: String },
    #[error("{what}: at most {max} per request")]
    TooMany { what: &'static str, max: usize },
}

fn open() -> Result<Rtnl, PodNetworkError> {
    Rtnl::open().map_err(PodNetworkError::Socket)
}

/// The network namespace of the pod's containers, made at its first
/// UpdateInterface, held open by the agent for the guest's life.
pub struct PodNetns {
    file: File,
}

impl PodNetns {
    /// A new network namespace with its loopback up.
    pub fn create() -> Result<PodNetns, PodNetworkError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // Only this thread moves, and it ends here.
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| PodNetworkError::Namespace(e.into()))?;
                    let file = File::open("/proc/thread-self/ns/net")
                        .map_err(PodNetworkError::Namespace)?;
                    let mut rtnl = open()?;
                    let lo = link_index(&mut rtnl, "lo")?;
                    set_up(&mut rtnl, lo, None)?;
                    Ok(PodNetns { file })
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The namespace open at `file` (the pod sandbox's, when the pod's
    /// network comes after its first container); never the agent's own.
    pub fn of(file: File) -> Result<PodNetns, PodNetworkError> {
        use std::os::unix::fs::MetadataExt as _;
        let own = std::fs::metadata("/proc/self/ns/net").map_err(PodNetworkError::Namespace)?;
        let given = file.metadata().map_err(PodNetworkError::Namespace)?;
        if (own.dev(), own.ino()) == (given.dev(), given.ino()) {
            return Err(PodNetworkError::Namespace(std::io::Error::other(
                "the pod's containers share the guest's own network namespace",
            )));
        }
        Ok(PodNetns { file })
    }

    /// A path to the namespace that stays valid while the agent holds it
    /// (what a container's spec names to join it).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// Moves the calling thread into the namespace, for good (threads it
    /// starts are born there).
    pub fn enter(&self) -> Result<(), PodNetworkError> {
        nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| PodNetworkError::Namespace(e.into()))
    }

    /// Runs `work` on a thread of its own in the namespace: the sockets it
    /// opens are the namespace's.
    pub fn run<T: Send>(
        &self,
        work: impl FnOnce() -> Result<T, PodNetworkError> + Send,
    ) -> Result<T, PodNetworkError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter()?;
                    work()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Runs `work` where the guest's own traffic leaves: in the pod's network
/// namespace when it has one, else on the calling thread (QEMU's user
/// network in the guest's namespace).
pub fn in_egress<T: Send>(
    netns: Option<&PodNetns>,
    work: impl FnOnce() -> T + Send,
) -> Result<T, PodNetworkError> {
    match netns {
        Some(netns) => netns.run(|| Ok(work())),
        None => Ok(work()),
    }
}

/// The NIC with `mac` in the thread's namespace; an error if several
/// have it (ipvlan slaves share their master's).
fn find_by_mac(
    rtnl: &mut Rtnl,
    config: &InterfaceConfig,
) -> Result<Option<Interface>, PodNetworkError> {
    find_nic(rtnl, &config.name, &config.mac)
}

/// The NIC with `mac`, for interface `name`.
fn find_nic(rtnl: &mut Rtnl, name: &str, mac: &[u8]) -> Result<Option<Interface>, PodNetworkError> {
    let mut found: Vec<Interface> = interfaces(rtnl)?
        .into_iter()
        .filter(|i| i.mac == mac && i.kind != LinkKind::Loopback)
        .collect();
    if found.len() > 1 {
        return Err(PodNetworkError::SharedMac {
            name: name.to_string(),
            mac: kabuto_netlink::format_mac(mac),
            count: found.len(),
        });
    }
    Ok(found.pop())
}

/// Waits (up to `wait`) until the NIC of `message` is in the guest — its
/// driver may still be probing — without changing anything.
pub fn await_nic(
    message: &agent::Interface,
    netns: Option<&PodNetns>,
    wait: Duration,
) -> Result<(), PodNetworkError> {
    let config = parse_interface(message)?;
    let deadline = Instant::now() + wait;
    loop {
        if find_by_mac(&mut open()?, &config)?.is_some() {
            return Ok(());
        }
        if let Some(reserved) = &config.reserved_mac {
            if find_nic(&mut open()?, &config.name, reserved)?.is_some() {
                return Ok(());
            }
        }
        if let Some(netns) = netns {
            if netns.run(|| find_by_mac(&mut open()?, &config))?.is_some() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(PodNetworkError::NoNic {
                name: config.name,
                mac: message.hwAddr.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Moves the NIC with the interface's MAC into `netns` and configures it
/// there: its name and MTU, its addresses (replacing the global ones it
/// had), up. A reserved NIC named by the message takes the interface's
/// MAC first. Returns it as the kernel now reports it.
pub fn update_interface(
    netns: &PodNetns,
    message: &agent::Interface,
) -> Result<agent::Interface, PodNetworkError> {
    let config = parse_interface(message)?;
    let mut guest = open()?;
    // The NIC still in the guest's namespace: the reserved one (which then
    // takes the interface's MAC) or the one with the interface's MAC.
    let reserved = match &config.reserved_mac {
        Some(reserved) => find_nic(&mut guest, &config.name, reserved)?,
        None => None,
    };
    let by_mac = find_by_mac(&mut guest, &config)?;
    if reserved.is_some() && by_mac.is_some() {
        return Err(PodNetworkError::SharedMac {
            name: config.name.clone(),
            mac: kabuto_netlink::format_mac(&config.mac),
            count: 2,
        });
    }
    if let Some(nic) = reserved.or(by_mac) {
        // Moved under its new name, which must be free there.
        netns.run(|| {
            match interfaces(&mut open()?)?
                .into_iter()
                .find(|i| i.name == config.name)
            {
                Some(other) => Err(PodNetworkError::NameTaken {
                    name: config.name.clone(),
                    other: kabuto_netlink::format_mac(&other.mac),
                }),
                None => Ok(()),
            }
        })?;
        let old_mac = nic.mac.clone();
        if nic.mac != config.mac {
            set_down_with_mac(&mut guest, nic.index, &config.mac)?;
            log::info!(
                "reserved NIC {} takes interface {}'s MAC {}",
                nic.name,
                config.name,
                kabuto_netlink::format_mac(&config.mac)
            );
        }
        if let Err(e) = move_to_netns(&mut guest, nic.index, netns.file.as_raw_fd(), &config.name) {
            // Reserved again, for a retry.
            if old_mac != config.mac {
                let _ = set_down_with_mac(&mut guest, nic.index, &old_mac);
            }
            return Err(e.into());
        }
    }
    let now = netns.run(|| configure(&config))?;
    log::info!(
        "interface {} configured: {} address(es), MTU {}",
        now.name,
        now.addresses.len(),
        now.mtu
    );
    Ok(interface_message(&now))
}

/// In the pod's namespace: the NIC named, sized, addressed and up.
fn configure(config: &InterfaceConfig) -> Result<Interface, PodNetworkError> {
    let mut rtnl = open()?;
    let no_nic = || PodNetworkError::NoNic {
        name: config.name.clone(),
        mac: kabuto_netlink::format_mac(&config.mac),
    };
    let nic = find_by_mac(&mut rtnl, config)?.ok_or_else(no_nic)?;
    if let Some(other) = interfaces(&mut rtnl)?
        .iter()
        .find(|i| i.name == config.name && i.index != nic.index)
    {
        return Err(PodNetworkError::NameTaken {
            name: config.name.clone(),
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
    interfaces(&mut rtnl)?
        .into_iter()
        .find(|i| i.index == nic.index)
        .ok_or_else(no_nic)
}

/// The namespace's interfaces by name, loopback left out.
fn indexes(rtnl: &mut Rtnl) -> Result<HashMap<String, u32>, PodNetworkError> {
    Ok(interfaces(rtnl)?
        .into_iter()
        .filter(|i| i.kind != LinkKind::Loopback)
        .map(|i| (i.name, i.index))
        .collect())
}

/// Replaces the routes of the pod's NICs with `messages` (routes without
/// a gateway first: a gateway must be reachable when its route is added).
pub fn update_routes(
    netns: &PodNetns,
    messages: &[agent::Route],
) -> Result<agent::Routes, PodNetworkError> {
    if messages.len() > MAX_ROUTES {
        return Err(PodNetworkError::TooMany {
            what: "routes",
            max: MAX_ROUTES,
        });
    }
    let mut configs = messages
        .iter()
        .map(parse_route)
        .collect::<Result<Vec<_>, _>>()?;
    netns.run(|| {
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
    })
}

/// Adds the host's static neighbour entries.
pub fn add_neighbours(
    netns: &PodNetns,
    messages: &[agent::ARPNeighbor],
) -> Result<(), PodNetworkError> {
    if messages.len() > MAX_NEIGHBOURS {
        return Err(PodNetworkError::TooMany {
            what: "neighbours",
            max: MAX_NEIGHBOURS,
        });
    }
    let parsed = messages
        .iter()
        .map(parse_neighbour)
        .collect::<Result<Vec<_>, _>>()?;
    netns.run(|| {
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
    })
}

/// The pod's interfaces (the guest's own without a pod network).
pub fn list_interfaces(netns: Option<&PodNetns>) -> Result<agent::Interfaces, PodNetworkError> {
    let list = || {
        Ok(agent::Interfaces {
            Interfaces: interfaces(&mut open()?)?
                .iter()
                .map(interface_message)
                .collect(),
            ..Default::default()
        })
    };
    match netns {
        Some(netns) => netns.run(list),
        None => list(),
    }
}

/// The pod's routes (the guest's own without a pod network).
pub fn list_routes(netns: Option<&PodNetns>) -> Result<agent::Routes, PodNetworkError> {
    match netns {
        Some(netns) => netns.run(|| list_routes_with(&mut open()?)),
        None => list_routes_with(&mut open()?),
    }
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
    use kabuto_netlink::format_mac;
    use kabuto_netlink::testing::{in_new_netns, veth_pair};
    use kabuto_protocol::network::{NUD_PERMANENT, RESERVED_MAC};

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

    /// A veth `nic` (its peer `wire` up, staying here) standing in for a
    /// guest NIC, as the host would describe it to be configured.
    fn nic(nic: &str, wire: &str, name: &str) -> agent::Interface {
        let mut rtnl = Rtnl::open().expect("netlink");
        veth_pair(&mut rtnl, nic, wire).expect("veth pair");
        let wire = link_index(&mut rtnl, wire).expect("peer");
        set_up(&mut rtnl, wire, None).expect("peer up");
        let mac = interfaces(&mut rtnl)
            .expect("links")
            .into_iter()
            .find(|i| i.name == nic)
            .expect("nic")
            .mac;
        agent::Interface {
            name: name.into(),
            device: name.into(),
            hwAddr: format_mac(&mac),
            mtu: 1400,
            IPAddresses: vec![address("10.1.0.5", "24"), address("fd00:1::5", "64")],
            ..Default::default()
        }
    }

    fn again(applied: &agent::Interface, name: &str) -> agent::Interface {
        agent::Interface {
            name: name.into(),
            device: name.into(),
            hwAddr: applied.hwAddr.clone(),
            mtu: applied.mtu,
            ..Default::default()
        }
    }

    #[test]
    fn the_hosts_interface_routes_and_neighbours_are_applied_in_the_pods_namespace() {
        in_new_netns(|| {
            let netns = PodNetns::create().expect("pod namespace");
            let message = nic("nic0", "wire0", "eth7");
            await_nic(&message, Some(&netns), Duration::from_secs(1)).expect("NIC");
            let applied = update_interface(&netns, &message).expect("interface");
            assert_eq!(applied.name, "eth7");
            assert_eq!(applied.mtu, 1400);
            let mut addresses: Vec<_> = applied
                .IPAddresses
                .iter()
                .map(|a| format!("{}/{}", a.address, a.mask))
                .collect();
            addresses.sort();
            assert_eq!(addresses, ["10.1.0.5/24", "fd00:1::5/64"]);
            // The NIC left the guest's namespace for the pod's.
            let here = interfaces(&mut Rtnl::open().expect("netlink")).expect("links");
            assert!(!here.iter().any(|i| i.name == "nic0" || i.name == "eth7"));
            // Sent again with another address: the old one goes.
            let mut changed = again(&applied, "eth7");
            changed.IPAddresses = vec![address("10.1.0.6", "24")];
            let applied = update_interface(&netns, &changed).expect("interface again");
            assert_eq!(applied.IPAddresses.len(), 1);
            assert_eq!(applied.IPAddresses[0].address, "10.1.0.6");

            // A second NIC whose kernel name is the first one's new name.
            let second = nic("eth7", "wire1", "eth8");
            let applied_second = update_interface(&netns, &second).expect("second NIC");
            assert_eq!(applied_second.name, "eth8");

            let routes = update_routes(
                &netns,
                &[
                    route("", "10.1.0.1", 0),
                    route("10.1.0.0/24", "", 0),
                    route("10.9.0.0/16", "10.1.0.1", 1300),
                ],
            )
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
            let listed = list_routes(Some(&netns)).expect("list");
            assert_eq!(listed.Routes.len(), routes.Routes.len());
            let listed = list_interfaces(Some(&netns)).expect("list");
            assert!(listed.Interfaces.iter().any(|i| i.name == "eth7"));

            add_neighbours(
                &netns,
                &[agent::ARPNeighbor {
                    toIPAddress: protobuf::MessageField::some(address("10.1.0.1", "32")),
                    device: "eth7".into(),
                    lladdr: "02:00:00:00:00:01".into(),
                    state: NUD_PERMANENT,
                    ..Default::default()
                }],
            )
            .expect("neighbour");
            let neighbours = netns
                .run(|| Ok(kabuto_netlink::neighbours(&mut open()?)?))
                .expect("neighbours");
            assert!(neighbours
                .iter()
                .any(|n| n.ip.to_string() == "10.1.0.1" && n.mac == [2, 0, 0, 0, 0, 1]));
        });
    }

    /// `ctr run --cni`: the NIC the VM reserved takes the MAC of the
    /// interface CNI added, then is configured as that interface; a pod
    /// namespace that is the agent's own is refused.
    #[test]
    fn a_reserved_nic_takes_over_the_interface_added_after_create() {
        in_new_netns(|| {
            // The agent's (its main thread's), not this thread's new one.
            let own = File::open("/proc/self/ns/net").expect("own netns");
            let e = PodNetns::of(own).err().expect("the guest's own namespace");
            assert!(kabuto_error::chain(&e).contains("guest's own"), "{e}");

            let netns = PodNetns::create().expect("pod namespace");
            let reserved = nic("nic0", "wire0", "eth0");
            let mut rtnl = open().expect("netlink");
            let index = link_index(&mut rtnl, "nic0").expect("nic0");
            set_down_with_mac(&mut rtnl, index, &RESERVED_MAC).expect("placeholder MAC");
            let mut message = reserved.clone();
            message.reserved_hwAddr = format_mac(&RESERVED_MAC);
            message.hwAddr = "0a:58:0a:d5:00:07".into();
            await_nic(&message, Some(&netns), Duration::from_secs(1)).expect("reserved NIC");
            let applied = update_interface(&netns, &message).expect("taken over");
            assert_eq!(applied.hwAddr, "0a:58:0a:d5:00:07");
            assert_eq!(applied.name, "eth0");
            assert_eq!(applied.IPAddresses.len(), 2);
            // Sent again (a retried start): the NIC is found by its new MAC.
            update_interface(&netns, &message).expect("sent again");
        });
    }

    #[test]
    fn what_the_guest_cannot_apply_is_refused_naming_it() {
        in_new_netns(|| {
            let refused = |e: PodNetworkError| kabuto_error::chain(&e);
            let netns = PodNetns::create().expect("pod namespace");
            let mut absent = nic("nic9", "wire9", "eth8");
            absent.hwAddr = "02:11:22:33:44:55".into();
            let e = refused(
                await_nic(&absent, Some(&netns), Duration::from_millis(100))
                    .expect_err("no such NIC"),
            );
            assert!(e.contains("eth8") && e.contains("02:11:22:33:44:55"), "{e}");

            update_interface(&netns, &nic("nic0", "wire0", "eth7")).expect("interface");
            let second = nic("nic1", "wire1", "eth7");
            let e = refused(update_interface(&netns, &second).expect_err("a taken name"));
            assert!(e.contains("eth7") && e.contains("taken"), "{e}");

            let mut unknown = route("", "10.1.0.1", 0);
            unknown.device = "eth9".into();
            let e = refused(update_routes(&netns, &[unknown]).expect_err("unknown device"));
            assert!(e.contains("eth9"), "{e}");
            let e = refused(
                update_routes(&netns, &[route("", "10.7.0.1", 0)])
                    .expect_err("unreachable gateway"),
            );
            assert!(e.contains("10.7.0.1"), "{e}");
            let flood = vec![agent::ARPNeighbor::default(); MAX_NEIGHBOURS + 1];
            let e = refused(add_neighbours(&netns, &flood).expect_err("too many"));
            assert!(e.contains("at most 256"), "{e}");
        });
    }
}
