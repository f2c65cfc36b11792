# The pod's network (UpdateInterface, UpdateRoutes, AddARPNeighbors): what
# a CNI network gives a pod and nothing else. NICs are named eth<N> (the
# CNI interface names Kubernetes uses), without hot-plug paths, reserved NICs, raw link
# flags or a link type; routes and static neighbours only on those NICs —
# never on the guest's loopback — and with no flags. The agent applies them
# in the pod's own network namespace (never the guest's) and refuses
# loopback, link-local and multicast addresses and route sources itself.
# Addresses, gateways and MTUs are the pod's, assigned when it starts: the
# policy cannot know them. A host can still put any unicast address on the
# pod's NIC — even the KBS's, diverting the pod's own connections to it to
# the pod itself — which gains it nothing it lacks: it carries every packet
# anyway, and the KBS path is TLS with an attested key. `genpolicy`'s
# `pod_network = false` denies all three.
pod_interface_name(name) if regex.match(`^eth[0-9]{1,3}$`, name)

default UpdateInterfaceRequest := false

UpdateInterfaceRequest if {
	i := input.interface
	pod_interface_name(i.name)
	i.device in {"", i.name}
	i.devicePath == ""
	# The NIC a VM reserves for a network added after create is for
	# trusted hosts only.
	object.get(i, "reserved_hwAddr", "") == ""
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
