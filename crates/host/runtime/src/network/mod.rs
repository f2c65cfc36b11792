//! Pod networking on the host (Kata's "tcfilter" model): the interfaces
//! CNI made in the pod's network namespace, each joined to a tap device
//! that QEMU serves to the guest as virtio-net. Both interfaces get an
//! ingress qdisc whose one filter (u32, matching every packet) redirects
//! to the other's egress (mirred), so frames pass unchanged in both
//! directions and the namespace's own stack never sees them.
//!
//! Everything is netlink (`kabuto_netlink::Rtnl`, which also reads the
//! namespace's interfaces and routes), run by a thread inside the pod's
//! namespace. The tap is not persistent: with its last fd (QEMU's) it
//! disappears, with its qdisc and filter; the veth's qdisc is removed at
//! teardown ([`unbridge`]), or with the namespace.
//!
//! [`PodNetwork`] does this for a whole pod namespace; the sandbox holds
//! it for the VM's life (see `docs/design/pod-networking.md`).

mod pod;
mod tap;

use std::io;
use std::os::fd::OwnedFd;

use kabuto_netlink::core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL};
use kabuto_netlink::packet::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use kabuto_netlink::{failed, link_index, set_up, RouteNetlinkMessage};
pub use kabuto_netlink::{interfaces, routes, Interface, LinkKind, NetlinkError, Route, Rtnl};
pub use pod::{open_netns, unbridge_recorded, GuestNic, JoinedRecord, PodNetwork};
pub use tap::open_tap;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("network namespace {}", path.display())]
    Namespace {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "interface(s) {} appeared in the pod's network namespace after its VM started \
         (CNI chaining, a second network): NIC hot-plug is not supported — one interface \
         added between create and start (ctr run --cni) takes the NIC the VM reserved, which \
         a confidential pod (its network is fixed at boot) or a pod in a namespace of CNI's \
         does not have; give the pod its network before it starts (a CRI pod network, or \
         ctr run --with-ns network:<path>)",
        .0.join(", ")
    )]
    LateInterfaces(Vec<String>),
    #[error("the guest refused interface {interface}")]
    Guest {
        interface: String,
        #[source]
        source: crate::agent_client::AgentClientError,
    },
    #[error(
        "network namespace {} is the host's own: a pod network namespace must be one of its own",
        .0.display()
    )]
    HostNamespace(std::path::PathBuf),
    #[error(
        "interfaces {first} and {second} share MAC {mac} (ipvlan?): each guest NIC needs its own"
    )]
    SharedMac {
        first: String,
        second: String,
        mac: String,
    },
    #[error("{0} interfaces in the pod's network namespace: at most 16 are supported")]
    TooManyInterfaces(usize),
    #[error("tap {name}")]
    Tap {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// ETH_P_ALL: a filter for every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// The priority of the redirect filters (an explicit one finds them again).
const REDIRECT_PRIORITY: u16 = 1;
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

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
    join_to_tap(rtnl, interface, tap_index)?;
    Ok(TapBridge {
        tap,
        tap_name,
        tap_index,
        interface: interface.clone(),
    })
}

/// Joins `interface` to the existing tap `tap_index` (made by [`bridge`],
/// or reserved at boot): the tap takes the interface's MTU. On error the
/// interface is left as it was.
pub fn join_to_tap(
    rtnl: &mut Rtnl,
    interface: &Interface,
    tap_index: u32,
) -> Result<(), NetworkError> {
    let joined = (|| -> Result<(), NetlinkError> {
        set_up(rtnl, tap_index, Some(interface.mtu))?;
        // A stale qdisc (a crashed earlier pod) would keep its filters.
        remove_ingress(rtnl, tap_index)?;
        add_ingress(rtnl, tap_index)?;
        remove_ingress(rtnl, interface.index)?;
        add_ingress(rtnl, interface.index)?;
        add_redirect(rtnl, interface.index, tap_index)?;
        add_redirect(rtnl, tap_index, interface.index)
    })();
    if let Err(e) = joined {
        // The tap's qdisc goes with its fd, or with the next join.
        let _ = remove_ingress(rtnl, interface.index);
        return Err(e.into());
    }
    Ok(())
}

/// Undoes [`bridge`] on the interface's side (its qdisc, and with it the
/// filter); the tap goes when its last fd closes.
pub fn unbridge(rtnl: &mut Rtnl, interface: &Interface) -> Result<(), NetworkError> {
    Ok(remove_ingress(rtnl, interface.index)?)
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

fn add_ingress(rtnl: &mut Rtnl, index: u32) -> Result<(), NetlinkError> {
    rtnl.request(
        RouteNetlinkMessage::NewQueueDiscipline(ingress_message(index)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
    .map_err(failed(format!("adding an ingress qdisc to link {index}")))
}

/// Removes link `index`'s ingress qdisc and its filters; none is fine.
fn remove_ingress(rtnl: &mut Rtnl, index: u32) -> Result<(), NetlinkError> {
    match rtnl.request(
        RouteNetlinkMessage::DelQueueDiscipline(ingress_message(index)),
        NLM_F_ACK,
    ) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        Err(e) => Err(failed(format!(
            "removing the ingress qdisc of link {index}"
        ))(e)),
    }
}

/// `tc filter add dev FROM parent ffff: protocol all prio 1 u32 match u8 0
/// 0 action mirred egress redirect dev TO`.
fn add_redirect(rtnl: &mut Rtnl, from: u32, to: u32) -> Result<(), NetlinkError> {
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
    .map_err(failed(format!("redirecting link {from} to link {to}")))
}

#[cfg(test)]
mod tests;
