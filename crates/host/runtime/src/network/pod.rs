//! A pod's network namespace joined to its VM: every interface CNI made
//! there (veth, macvlan, ipvlan) bridged to a tap of its own, and what the
//! guest must be told — the interfaces with their MACs, MTUs and addresses,
//! the routes on them (with their own MTUs and sources) and the static
//! neighbours.
//!
//! Undone when dropped: the interfaces' ingress qdiscs are removed (the
//! taps go with their last fd, QEMU's), so the namespace is as CNI left
//! it. A shim killed before that leaves a [`JoinedRecord`] in its state
//! directory, from which the dead shim's cleanup (containerd's `shim
//! delete`) removes the qdiscs ([`unbridge_recorded`]).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use kabuto_netlink::{format_mac, neighbours, Neighbour};
use kabuto_protocol::agent;
use kabuto_protocol::network::{interface_message, neighbour_message, route_message, RESERVED_MAC};

use super::{bridge, interfaces, routes, unbridge, Interface, LinkKind, NetworkError, Route, Rtnl};

/// One guest NIC as QEMU must make it: `-netdev tap,fd=` and a virtio-net
/// device with the CNI interface's MAC and MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNic {
    /// The tap's fd in this process (QEMU gets a copy at its spawn).
    pub tap_fd: RawFd,
    pub mac: String,
    pub mtu: u32,
}

struct Nic {
    /// `None` once QEMU holds the tap.
    tap: Option<OwnedFd>,
    tap_name: String,
    interface: Interface,
}

/// A NIC the VM gets at boot, on a tap not yet joined to anything, for
/// the one interface CNI adds between create and start (`ctr run --cni`
/// configures the namespace of the task's pid — the VMM's — then).
struct ReservedNic {
    /// `None` once QEMU holds the tap.
    tap: Option<OwnedFd>,
    tap_name: String,
    tap_index: u32,
    /// Set once an interface took it over.
    taken: bool,
}

/// The MTU QEMU gives the reserved NIC (`host_mtu`, the most the guest can
/// set): its interface's MTU is not known at boot.
const RESERVED_MTU: u32 = 65535;

pub struct PodNetwork {
    path: PathBuf,
    netns: File,
    nics: Vec<Nic>,
    reserved: Option<ReservedNic>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
}

/// What a shim killed before its teardown leaves to undo in a pod
/// namespace of CRI's (or ctr's `--with-ns`): the namespace and the joined
/// interfaces, by name and index. Written to the sandbox's state directory;
/// the stale-sandbox cleanup (containerd's `shim delete` after a dead shim)
/// reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinedRecord {
    pub netns: PathBuf,
    pub interfaces: Vec<(String, u32)>,
}

/// Removes the redirects of `record` that are still there: the ingress
/// qdisc (and its filter) of each recorded interface present under its
/// name and index. The taps went with QEMU.
pub fn unbridge_recorded(record: &JoinedRecord) -> Result<usize, NetworkError> {
    let netns = open_netns(&record.netns)?;
    if is_hosts(&netns) {
        return Err(NetworkError::HostNamespace(record.netns.clone()));
    }
    in_netns(&netns, &record.netns, |rtnl| {
        let mut undone = 0;
        for interface in interfaces(rtnl)? {
            if record
                .interfaces
                .iter()
                .any(|(name, index)| *name == interface.name && *index == interface.index)
            {
                unbridge(rtnl, &interface)?;
                undone += 1;
            }
        }
        Ok(undone)
    })
}

/// Opens `path` as a network namespace; anything else is refused before
/// it is opened for reading (a FIFO cannot hang the caller, a device at
/// the path is never opened).
pub fn open_netns(path: &Path) -> Result<File, NetworkError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let netns_error = |source| NetworkError::Namespace {
        path: path.to_path_buf(),
        source,
    };
    let not_netns = || {
        netns_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a network namespace",
        ))
    };
    // O_PATH: a handle to whatever is there, without opening it.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(netns_error)?;
    let on_nsfs = nix::sys::statfs::fstatfs(&handle)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false);
    if !on_nsfs {
        return Err(not_netns());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(netns_error)?;
    // NS_GET_NSTYPE (_IO(0xb7, 0x3)): a namespace, but which kind?
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(not_netns());
    }
    Ok(file)
}

/// True when `netns` is the host's own network namespace (pid 1's) or this
/// process's: joining its interfaces to a VM would take them from the
/// host (or from other pods).
fn is_hosts(netns: &File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(this) = netns.metadata() else {
        return true;
    };
    ["/proc/1/ns/net", "/proc/self/ns/net"].iter().any(|own| {
        std::fs::metadata(own).is_ok_and(|m| m.dev() == this.dev() && m.ino() == this.ino())
    })
}

/// Runs `work` with a netlink socket in `netns`, on a thread of its own
/// (setns changes only the calling thread, which then ends).
pub(super) fn in_netns<T: Send>(
    netns: &File,
    path: &Path,
    work: impl FnOnce(&mut Rtnl) -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    let netns_error = |source| NetworkError::Namespace {
        path: path.to_path_buf(),
        source,
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| netns_error(e.into()))?;
                let mut rtnl = Rtnl::open().map_err(netns_error)?;
                work(&mut rtnl)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The routes on the links `on` (but IPv6 link-local ones, which the
/// guest makes itself) and the static neighbours there: what the guest
/// is told with them.
fn routes_and_neighbours(
    rtnl: &mut Rtnl,
    on: &[u32],
) -> Result<(Vec<Route>, Vec<Neighbour>), NetworkError> {
    let on_one = |device: Option<u32>| device.is_some_and(|d| on.contains(&d));
    let routes = routes(rtnl)?
        .into_iter()
        .filter(|r| on_one(r.device) && !r.is_ipv6_link_local())
        .collect();
    let neighbours = neighbours(rtnl)?
        .into_iter()
        .filter(|n| on_one(Some(n.device)))
        .collect();
    Ok((routes, neighbours))
}

/// Refuses interfaces that would give the guest two NICs with one MAC
/// (ipvlan slaves share their master's): the guest finds NICs by MAC.
fn check_macs(all: &[Interface]) -> Result<(), NetworkError> {
    let joined: Vec<&Interface> = all.iter().filter(|i| joinable(i)).collect();
    for (n, a) in joined.iter().enumerate() {
        if let Some(b) = joined[n + 1..].iter().find(|b| b.mac == a.mac) {
            return Err(NetworkError::SharedMac {
                first: a.name.clone(),
                second: b.name.clone(),
                mac: format_mac(&a.mac),
            });
        }
    }
    if joined.len() > MAX_NICS {
        return Err(NetworkError::TooManyInterfaces(joined.len()));
    }
    Ok(())
}

/// The most NICs a pod VM gets (the guest agent takes 16).
const MAX_NICS: usize = 16;

/// The interfaces a guest NIC stands in for.
fn joinable(interface: &Interface) -> bool {
    matches!(
        interface.kind,
        LinkKind::Veth | LinkKind::MacVlan | LinkKind::IpVlan
    )
}

impl PodNetwork {
    /// Joins every interface of the namespace at `path` to a tap; `None`
    /// when it has none (only loopback: a pod without a network). On error
    /// nothing is left in the namespace.
    pub fn attach(path: &Path) -> Result<Option<PodNetwork>, NetworkError> {
        let netns = open_netns(path)?;
        if is_hosts(&netns) {
            return Err(NetworkError::HostNamespace(path.to_path_buf()));
        }
        let (nics, routes, neighbours) = in_netns(&netns, path, |rtnl| {
            let all = interfaces(rtnl)?;
            check_macs(&all)?;
            for other in all
                .iter()
                .filter(|i| i.kind != LinkKind::Loopback && !joinable(i))
            {
                log::warn!(
                    "{}: interface {} ({:?}) is not given to the guest: only veth, macvlan and ipvlan are",
                    path.display(),
                    other.name,
                    other.kind
                );
            }
            let mut nics = Vec::new();
            let joined = (|| {
                for interface in all.iter().filter(|i| joinable(i)) {
                    let tap_name = format!("tap{}_kb", nics.len());
                    let b = bridge(rtnl, interface, &tap_name)?;
                    nics.push(Nic {
                        tap: Some(b.tap),
                        tap_name: b.tap_name,
                        interface: b.interface,
                    });
                }
                let joined: Vec<u32> = nics.iter().map(|n| n.interface.index).collect();
                routes_and_neighbours(rtnl, &joined)
            })();
            match joined {
                Ok((routes, neighbours)) => Ok((nics, routes, neighbours)),
                Err(e) => {
                    for nic in &nics {
                        let _ = unbridge(rtnl, &nic.interface);
                    }
                    Err(e)
                }
            }
        })?;
        if nics.is_empty() {
            return Ok(None);
        }
        for nic in &nics {
            log::info!(
                "{}: {} ({}, MTU {}) joined to {}",
                path.display(),
                nic.interface.name,
                format_mac(&nic.interface.mac),
                nic.interface.mtu,
                nic.tap_name
            );
        }
        Ok(Some(PodNetwork {
            path: path.to_path_buf(),
            netns,
            nics,
            reserved: None,
            routes,
            neighbours,
        }))
    }

    /// A new network namespace for the VMM, with one tap for a NIC the VM
    /// reserves: the namespace CNI configures after create when the pod
    /// asked for a new one (`ctr run --cni`).
    pub fn reserve() -> Result<PodNetwork, NetworkError> {
        let namespace_error = |source| NetworkError::Namespace {
            path: PathBuf::from("(the VM's new network namespace)"),
            source,
        };
        let (netns, tap, tap_name, tap_index) = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // Only this thread moves, and it ends here.
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| namespace_error(e.into()))?;
                    let netns = File::open("/proc/thread-self/ns/net").map_err(namespace_error)?;
                    let (tap, tap_name) =
                        super::open_tap("tap0_kb").map_err(|source| NetworkError::Tap {
                            name: "tap0_kb".into(),
                            source,
                        })?;
                    let mut rtnl = Rtnl::open().map_err(namespace_error)?;
                    let tap_index = super::link_index(&mut rtnl, &tap_name)?;
                    Ok::<_, NetworkError>((netns, tap, tap_name, tap_index))
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            netns.as_raw_fd()
        ));
        log::info!("the VM's network namespace has NIC {tap_name} reserved for a later interface");
        Ok(PodNetwork {
            path,
            netns,
            nics: Vec::new(),
            reserved: Some(ReservedNic {
                tap: Some(tap),
                tap_name,
                tap_index,
                taken: false,
            }),
            routes: Vec::new(),
            neighbours: Vec::new(),
        })
    }

    /// What a crashed shim's cleanup must undo here; `None` for the VM's
    /// own namespace (a reserved NIC's), which ends with QEMU.
    pub fn record(&self) -> Option<JoinedRecord> {
        if self.reserved.is_some() {
            return None;
        }
        Some(JoinedRecord {
            netns: self.path.clone(),
            interfaces: self
                .nics
                .iter()
                .map(|n| (n.interface.name.clone(), n.interface.index))
                .collect(),
        })
    }

    /// True while the VM's reserved NIC waits for its interface.
    pub fn has_reserved_nic(&self) -> bool {
        self.reserved.as_ref().is_some_and(|r| !r.taken)
    }

    /// The namespace the VMM must run in (valid while this is held).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Joins the interface CNI added since boot to the reserved NIC; the
    /// UpdateInterface message that has the guest's NIC take it over, or
    /// `None` when nothing was added. More than one interface, or one
    /// without a reserved NIC, is refused (no hot-plug); on error the
    /// namespace is as it was.
    pub fn join_late_interface(&mut self) -> Result<Option<agent::Interface>, NetworkError> {
        let joined = self.joined();
        let reserved = self.reserved.as_ref().filter(|r| !r.taken);
        let reserved_tap = reserved.map(|r| r.tap_index);
        let late = in_netns(&self.netns, &self.path, |rtnl| {
            let all = interfaces(rtnl)?;
            check_macs(&all)?;
            let late: Vec<Interface> = all
                .into_iter()
                .filter(|i| joinable(i) && !joined.contains(&i.name))
                .collect();
            let (interface, tap_index) = match (late.len(), reserved_tap) {
                (0, _) => return Ok(None),
                (1, Some(tap_index)) => (late[0].clone(), tap_index),
                _ => {
                    return Err(NetworkError::LateInterfaces(
                        late.into_iter().map(|i| i.name).collect(),
                    ))
                }
            };
            super::join_to_tap(rtnl, &interface, tap_index)?;
            match routes_and_neighbours(rtnl, &[interface.index]) {
                Ok((routes, neighbours)) => Ok(Some((interface, routes, neighbours))),
                Err(e) => {
                    let _ = unbridge(rtnl, &interface);
                    Err(e)
                }
            }
        })?;
        let Some((interface, routes, neighbours)) = late else {
            return Ok(None);
        };
        let Some(reserved) = self.reserved.as_mut() else {
            return Err(NetworkError::LateInterfaces(vec![interface.name]));
        };
        reserved.taken = true;
        log::info!(
            "{}: {} ({}, MTU {}) joined to the reserved {}",
            self.path.display(),
            interface.name,
            format_mac(&interface.mac),
            interface.mtu,
            reserved.tap_name
        );
        let mut message = interface_message(&interface);
        message.reserved_hwAddr = format_mac(&RESERVED_MAC);
        self.nics.push(Nic {
            tap: None,
            tap_name: reserved.tap_name.clone(),
            interface,
        });
        self.routes.extend(routes);
        self.neighbours.extend(neighbours);
        Ok(Some(message))
    }

    /// Undoes [`PodNetwork::join_late_interface`] when the guest refused
    /// the interface: its redirect goes, its NIC stays reserved.
    pub fn unjoin_late_interface(&mut self, name: &str) {
        let Some(at) = self.nics.iter().position(|n| n.interface.name == name) else {
            return;
        };
        let nic = self.nics.remove(at);
        let index = nic.interface.index;
        self.routes.retain(|r| r.device != Some(index));
        self.neighbours.retain(|n| n.device != index);
        if let Some(reserved) = self.reserved.as_mut() {
            reserved.taken = false;
        }
        let undone = in_netns(&self.netns, &self.path, |rtnl| {
            unbridge(rtnl, &nic.interface)
        });
        if let Err(e) = undone {
            log::warn!(
                "{}: removing the redirect of {name}: {}",
                self.path.display(),
                kabuto_error::chain(&e)
            );
        }
    }

    /// The NICs QEMU must make, in order.
    pub fn guest_nics(&self) -> Vec<GuestNic> {
        let reserved = self.reserved.iter().filter_map(|r| {
            Some(GuestNic {
                tap_fd: r.tap.as_ref()?.as_raw_fd(),
                mac: format_mac(&RESERVED_MAC),
                mtu: RESERVED_MTU,
            })
        });
        self.nics
            .iter()
            .filter_map(|nic| {
                Some(GuestNic {
                    tap_fd: nic.tap.as_ref()?.as_raw_fd(),
                    mac: format_mac(&nic.interface.mac),
                    mtu: nic.interface.mtu,
                })
            })
            .chain(reserved)
            .collect()
    }

    /// Closes this process's tap fds once QEMU holds its own: a VM that
    /// dies then takes its taps with it.
    pub fn release_taps(&mut self) {
        for nic in &mut self.nics {
            nic.tap.take();
        }
        if let Some(reserved) = self.reserved.as_mut() {
            reserved.tap.take();
        }
    }

    /// UpdateInterface's interfaces.
    pub fn interfaces(&self) -> Vec<agent::Interface> {
        self.nics
            .iter()
            .map(|nic| interface_message(&nic.interface))
            .collect()
    }

    fn name_of(&self, index: u32) -> &str {
        self.nics
            .iter()
            .find(|n| n.interface.index == index)
            .map(|n| n.interface.name.as_str())
            .unwrap_or_default()
    }

    /// UpdateRoutes's routes.
    pub fn routes(&self) -> Vec<agent::Route> {
        self.routes
            .iter()
            .map(|r| route_message(r, self.name_of(r.device.unwrap_or_default())))
            .collect()
    }

    /// AddARPNeighbors's entries.
    pub fn neighbours(&self) -> Vec<agent::ARPNeighbor> {
        self.neighbours
            .iter()
            .map(|n| neighbour_message(n, self.name_of(n.device)))
            .collect()
    }

    /// The namespace's interfaces that are not joined to a tap now —
    /// added after the sandbox started (`ctr run --cni`, CNI chaining).
    pub fn unjoined_interfaces(
        path: &Path,
        joined: &[String],
    ) -> Result<Vec<String>, NetworkError> {
        let netns = open_netns(path)?;
        in_netns(&netns, path, |rtnl| {
            Ok(interfaces(rtnl)?
                .into_iter()
                .filter(|i| joinable(i) && !joined.contains(&i.name))
                .map(|i| i.name)
                .collect())
        })
    }

    /// The names of the joined interfaces.
    pub fn joined(&self) -> Vec<String> {
        self.nics.iter().map(|n| n.interface.name.clone()).collect()
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let nics = &self.nics;
        let undone = in_netns(&self.netns, &self.path, |rtnl| {
            for nic in nics {
                unbridge(rtnl, &nic.interface)?;
            }
            Ok(())
        });
        if let Err(e) = undone {
            log::warn!(
                "{}: removing the tap redirects: {}",
                self.path.display(),
                kabuto_error::chain(&e)
            );
        }
    }
}
