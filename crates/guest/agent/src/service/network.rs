//! The pod network's requests: UpdateInterface (only before the pod's
//! first container: NIC hot-plug is not supported), UpdateRoutes,
//! AddARPNeighbors and the two lists.

use super::*;
use crate::pod_network;

impl Agent {
    pub(super) fn update_interface(
        &self,
        req: agent::UpdateInterfaceRequest,
    ) -> Result<agent::Interface> {
        let interface = req.interface.as_ref().ok_or_else(|| {
            AgentError::InvalidArgument("UpdateInterfaceRequest has no interface".into())
        })?;
        // Held throughout: a create either sees every interface applied
        // (and shares this network) or makes this request fail.
        let creating = lock(&self.creating);
        let has_containers = !creating.is_empty()
            || !self
                .containers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
        if has_containers {
            return Err(AgentError::InvalidArgument(format!(
                "interface {}: the pod already has containers; a NIC added after the pod \
                 started (hot-plug) is not supported",
                interface.name
            )));
        }
        let applied = pod_network::update_interface(interface)?;
        lock(&self.sandbox).interfaces.push(applied.name.clone());
        drop(creating);
        Ok(applied)
    }

    pub(super) fn update_routes(&self, req: agent::UpdateRoutesRequest) -> Result<agent::Routes> {
        let routes = req.routes.as_ref().map(|r| &r.Routes[..]).unwrap_or(&[]);
        Ok(pod_network::update_routes(routes)?)
    }

    pub(super) fn add_arp_neighbors(
        &self,
        req: agent::AddARPNeighborsRequest,
    ) -> Result<agent::Empty> {
        let neighbours = req
            .neighbors
            .as_ref()
            .map(|n| &n.ARPNeighbors[..])
            .unwrap_or(&[]);
        pod_network::add_neighbours(neighbours)?;
        Ok(agent::Empty::new())
    }

    pub(super) fn list_interfaces(
        &self,
        _req: agent::ListInterfacesRequest,
    ) -> Result<agent::Interfaces> {
        Ok(pod_network::list_interfaces()?)
    }

    pub(super) fn list_routes(&self, _req: agent::ListRoutesRequest) -> Result<agent::Routes> {
        Ok(pod_network::list_routes()?)
    }

    /// True once the host gave the pod interfaces: its containers then
    /// live in the guest's network namespace, which holds them.
    pub(super) fn pod_has_network(&self) -> bool {
        !lock(&self.sandbox).interfaces.is_empty()
    }
}
