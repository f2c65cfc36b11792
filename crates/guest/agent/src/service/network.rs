//! The pod network's requests: UpdateInterface (before the pod's first
//! container; after it only for the NIC the VM reserved at boot, in a pod
//! that is not confidential: NIC hot-plug is not supported), UpdateRoutes,
//! AddARPNeighbors and the two lists; and where the guest's own traffic
//! leaves (the pod's network, else QEMU's user network).

use super::*;
use crate::pod_network::{self, PodNetns};

/// At most this many interfaces per pod.
const MAX_INTERFACES: usize = 16;

impl Agent {
    pub(super) fn update_interface(
        &self,
        req: agent::UpdateInterfaceRequest,
    ) -> Result<agent::Interface> {
        let interface = req.interface.as_ref().ok_or_else(|| {
            AgentError::InvalidArgument("UpdateInterfaceRequest has no interface".into())
        })?;
        // A network added between create and start (`ctr run --cni`) takes
        // over the NIC the VM reserved at boot: for a trusted host only. A
        // confidential pod's network is sealed at its first create.
        let late = !interface.reserved_hwAddr.is_empty();
        if late && self.is_confidential() {
            return Err(AgentError::InvalidArgument(format!(
                "interface {}: a confidential pod's network is fixed at its first create; \
                 a reserved NIC is not taken over",
                interface.name
            )));
        }
        // The driver may still be probing: wait before holding up creates.
        // (A late NIC a failed earlier attempt moved is in the sandbox's.)
        let netns = self.pod_netns().or_else(|| {
            late.then(|| self.sandbox_netns(&interface.name).ok().map(Arc::new))
                .flatten()
        });
        pod_network::await_nic(interface, netns.as_deref(), pod_network::NIC_WAIT)?;
        // Held throughout: a create either sees every interface applied
        // (and joins this network) or makes this request fail.
        let creating = lock(&self.creating);
        // Once a create began (even one that failed) the pod's network is
        // what it is: the guest's own may already be in use.
        let sealed = lock(&self.sandbox).network_sealed;
        let has_containers = sealed
            || !self
                .containers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
        if !creating.is_empty() || (has_containers && !late) {
            return Err(AgentError::InvalidArgument(format!(
                "interface {}: the pod already has containers; a NIC added after the pod \
                 started (hot-plug) is not supported",
                interface.name
            )));
        }
        let netns = {
            let sandbox = lock(&self.sandbox);
            if sandbox.interfaces.len() >= MAX_INTERFACES
                && !sandbox.interfaces.contains(&interface.name)
            {
                return Err(AgentError::InvalidArgument(format!(
                    "interface {}: a pod has at most {MAX_INTERFACES}",
                    interface.name
                )));
            }
            sandbox.network.clone()
        };
        // Kept only once a NIC is in it: a pod whose first interface
        // failed has no network (and may fall back to the user network).
        let netns = match netns {
            Some(netns) => netns,
            // The pod's containers are in their sandbox's namespace already.
            None if has_containers => Arc::new(self.sandbox_netns(&interface.name)?),
            None => Arc::new(PodNetns::create()?),
        };
        let applied = pod_network::update_interface(&netns, interface)?;
        let mut sandbox = lock(&self.sandbox);
        sandbox.network.get_or_insert(netns);
        if !sandbox.interfaces.contains(&applied.name) {
            sandbox.interfaces.push(applied.name.clone());
        }
        drop(sandbox);
        drop(creating);
        Ok(applied)
    }

    /// The network namespace of the pod's sandbox container.
    fn sandbox_netns(&self, interface: &str) -> Result<PodNetns> {
        let id = lock(&self.sandbox).id.clone();
        let no_sandbox = |why: String| {
            AgentError::InvalidArgument(format!(
                "interface {interface}: the pod's sandbox container {id}: {why}"
            ))
        };
        let sandbox = self
            .container(&id)
            .map_err(|e| no_sandbox(kabuto_error::chain(&e)))?;
        let file = sandbox
            .pod_namespaces
            .as_ref()
            .ok_or_else(|| no_sandbox("it holds no namespaces".into()))?
            .network()
            .map_err(|e| no_sandbox(e.to_string()))?;
        Ok(PodNetns::of(file)?)
    }

    /// The pod's network namespace, or why a request needs one first.
    fn required_netns(&self, request: &str) -> Result<Arc<PodNetns>> {
        self.pod_netns().ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "{request}: the pod has no network yet (UpdateInterface comes first)"
            ))
        })
    }

    pub(super) fn update_routes(&self, req: agent::UpdateRoutesRequest) -> Result<agent::Routes> {
        let routes = req.routes.as_ref().ok_or_else(|| {
            AgentError::InvalidArgument("UpdateRoutesRequest has no routes".into())
        })?;
        let netns = self.required_netns("UpdateRoutesRequest")?;
        Ok(pod_network::update_routes(&netns, &routes.Routes)?)
    }

    pub(super) fn add_arp_neighbors(
        &self,
        req: agent::AddARPNeighborsRequest,
    ) -> Result<agent::Empty> {
        let neighbours = req.neighbors.as_ref().ok_or_else(|| {
            AgentError::InvalidArgument("AddARPNeighborsRequest has no neighbors".into())
        })?;
        let netns = self.required_netns("AddARPNeighborsRequest")?;
        pod_network::add_neighbours(&netns, &neighbours.ARPNeighbors)?;
        Ok(agent::Empty::new())
    }

    pub(super) fn list_interfaces(
        &self,
        _req: agent::ListInterfacesRequest,
    ) -> Result<agent::Interfaces> {
        Ok(pod_network::list_interfaces(self.pod_netns().as_deref())?)
    }

    pub(super) fn list_routes(&self, _req: agent::ListRoutesRequest) -> Result<agent::Routes> {
        Ok(pod_network::list_routes(self.pod_netns().as_deref())?)
    }

    /// The pod's network namespace, once the host gave it interfaces.
    pub(super) fn pod_netns(&self) -> Option<Arc<PodNetns>> {
        lock(&self.sandbox).network.clone()
    }

    /// Before the pod's first container, a pod without a network of its
    /// own gets QEMU's user network in the guest's namespace for the
    /// guest's own traffic, when the kernel command line asks for it; a
    /// pod with one needs none (its NICs are the way out).
    pub(super) fn ensure_guest_network(&self) {
        if !self.user_network || self.pod_netns().is_some() {
            return;
        }
        let mut up = lock(&self.user_network_up);
        if *up {
            return;
        }
        match crate::net::setup_user_network() {
            Ok(()) => log::info!(
                "guest network up: {}/24 via {}",
                crate::net::GUEST_ADDRESS,
                crate::net::GATEWAY
            ),
            Err(e) => log::error!("guest network: {}", kabuto_error::chain(&e)),
        }
        *up = true;
    }
}
