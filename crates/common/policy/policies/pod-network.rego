# The pod's network (UpdateInterface, UpdateRoutes, AddARPNeighbors): what
# a CNI network gives a pod and nothing else. NICs are named eth<N> (the
# CNI interface names Kubernetes uses), without hot-plug paths, raw link
# flags or a link type; routes and static neighbours only on those NICs —
# never on the guest's loopback, where a route would make the pod's
# traffic to an address (the KBS's, say) land on the guest itself — and
# with no flags. Addresses, gateways and MTUs are the pod's, assigned when
# it starts: the policy cannot know them, and the host, which carries every
# packet anyway, gains nothing by choosing them (the KBS path is TLS with
# an attested key).
pod_interface_name(name) if regex.match(`^eth[0-9]{1,3}$`, name)

default UpdateInterfaceRequest := false

UpdateInterfaceRequest if {
	i := input.interface
	pod_interface_name(i.name)
	i.device in {"", i.name}
	i.devicePath == ""
	i.raw_flags == 0
	i.type == ""
}

default UpdateRoutesRequest := false

UpdateRoutesRequest if {
	every r in input.routes.Routes {
		pod_interface_name(r.device)
		r.flags == 0
	}
}

default AddARPNeighborsRequest := false

AddARPNeighborsRequest if {
	every n in input.neighbors.ARPNeighbors {
		pod_interface_name(n.device)
		n.state == 128
		n.flags == 0
	}
}
