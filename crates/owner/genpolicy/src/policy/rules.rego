# The rules of every generated policy. `kabuto-owner genpolicy` appends
# `policy_namespace`, `policy_shared_prefix`, `policy_data` (what exec
# decisions read), `policy_container` (the sandbox's definition, then the
# pod's containers as the generator resolved them, each with the default
# mounts merged in, as one `else` chain by name, evaluated until one
# matches), `policy_rootfs_prefix` and one `default <Request> := <bool>` line per request
# the settings decide. Each is its own rule because regorus builds a rule's
# value anew in every decision that reads it: a decision builds only what
# it reads.
#
# CreateContainerRequest: the container must be one of the pod's (found by
# its CRI name annotation, or the sandbox's pause container) and match it in
# image reference, args, env, working dir, user, capabilities, privileged
# mode, root filesystem, no_new_privileges and mounts. Allowed containers
# are recorded in the policy state so ExecProcessRequest can be checked
# against the commands of *that* container (its probes and lifecycle hooks).
#
# Two paths: `container_allowed` decides, written for speed (one rule, no
# function calls per env variable or mount: regorus' function calls cost
# microseconds each); only when it fails are `create_errors` computed, one
# message per failed check, for the denial's reason.
#
# A container's rule is selected by its name alone; should a request also
# claim to be the sandbox, two definitions match and the conflict denies.
#
# The gate fills each mount's `type`, `source` and `options` when the spec
# leaves them out, so rules read them directly.
#
# Conditional checks index a local object (`t := {true: …, false: …}` then
# `t[condition]`), never a literal or a call result directly: for those,
# regorus builds (and discards) an error with a formatted message and, when
# RUST_BACKTRACE is set, a captured backtrace — most of a decision's time.

annotations := object.get(input.OCI, "annotations", {})

container_type := object.get(annotations, "io.kubernetes.cri.container-type", "container")

container_name := annotations["io.kubernetes.cri.container-name"]

# policy_container: defined after policy_data, the containers as one else chain.

process := object.get(input.OCI, "process", {})

args := object.get(process, "args", [])

env := object.get(process, "env", [])

user := object.get(process, "user", {})

mounts := object.get(input.OCI, "mounts", [])

capabilities := object.get(process, "capabilities", {})

masked_paths := object.get(object.get(input.OCI, "linux", {}), "maskedPaths", [])

readonly_paths := object.get(object.get(input.OCI, "linux", {}), "readonlyPaths", [])

# What containerd (ctr and CRI) always masks and makes read-only for an
# unprivileged container: without them a container reads kernel memory and
# keys, or writes the guest kernel's sysctls (kernel.core_pattern runs a
# program as root in the guest).
required_masked_paths := {"/proc/kcore", "/proc/keys", "/sys/firmware"}

required_readonly_paths := {"/proc/bus", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}

missing_protected_paths := (required_masked_paths - {p | some p in masked_paths}) | (required_readonly_paths - {p | some p in readonly_paths})

image_name := object.get(annotations, "io.kubernetes.cri.image-name", "")

# Guest pull: the image the agent will pull is the storage's source, not
# the annotation; both must be allowed.
storages := object.get(input, "storages", [])

linux := object.get(input.OCI, "linux", {})

seccomp := object.get(linux, "seccomp", {})

# Where the runtime puts a container's root (it must not point at the
# guest's own files or another container's).
root_path := object.get(object.get(input.OCI, "root", {}), "path", "")

# Every container gets its own mount, PID, IPC, UTS and network namespace
# (the pod's, joined in the guest): without one it would share the agent's.
required_namespaces := {"mount", "pid", "ipc", "uts", "network"}

namespace := object.get(annotations, "io.kubernetes.cri.sandbox-namespace", policy_namespace)

CreateContainerRequest := {"allowed": true, "ops": record_container} if container_allowed

CreateContainerRequest := {"allowed": false, "reason": deny_reason} if not container_allowed

deny_reason := concat("; ", create_errors) if count(create_errors) > 0
else := "the container does not match the pod's policy"

# The pod's sandbox (pause) container is created once, as its own sandbox;
# every other container joins that one (its `sandbox_id` picks whose
# namespaces it enters in the guest). Without this a host could create a
# second pause and have members join it instead of the pod's.
recorded_sandbox := object.get(data.state, "sandbox", "")

sandbox_ok if {
	container_type == "sandbox"
	recorded_sandbox == ""
	own_sandbox
}

# A container of the pod run as a VM of its own (ctr run, no pause): it is
# the pod's sandbox, the first and only one.
sandbox_ok if {
	container_type != "sandbox"
	recorded_sandbox == ""
	own_sandbox
}

own_sandbox if object.get(input, "sandbox_id", "") in {"", input.container_id}

sandbox_ok if {
	container_type != "sandbox"
	recorded_sandbox != ""
	object.get(input, "sandbox_id", "") == recorded_sandbox
	# Not under the pause's id (after the pause was removed): the agent
	# would make it a pod sandbox of its own.
	input.container_id != recorded_sandbox
}

record_sandbox := [{"op": "add", "path": "/sandbox", "value": input.container_id}] if own_sandbox
else := []

# The policy state starts with both maps (see the gate's `initial_state`):
# every record is an add of its own key, so concurrent creates all stay
# recorded.
initial_state := {"containers": {}, "processes": {}}

# The container's name, and its process as created (what exec must keep:
# env, user, capabilities, cwd, no_new_privileges).
record_container := array.concat(
	[
		{"op": "add", "path": concat("/", ["", "containers", input.container_id]), "value": policy_container.name},
		{"op": "add", "path": concat("/", ["", "processes", input.container_id]), "value": created_process},
	],
	record_sandbox,
)

created_process := {
	"env": env,
	"user": user,
	"capabilities": capabilities,
	"cwd": object.get(process, "cwd", ""),
	"noNewPrivileges": object.get(process, "noNewPrivileges", false),
}

# --- the decision ---

container_allowed if {
	c := policy_container
	namespace_ok
	sandbox_ok
	image_ok
	storages_ok
	root_path == concat("", [policy_rootfs_prefix, input.container_id])
	no_hooks
	devices_ok
	namespaces_ok
	sysctls_ok
	seccomp_ok
	args_ok
	# c.env decides; env_fast finds most variables without it.
	env_slow := {e | some e in env; not env_fast[e]}
	every e in env_slow {
		regex.match(c.env, e)
		not regex.match(loader_env, e)
	}
	object.get(process, "cwd", "") == c.cwd
	uid_ok := {true: true, false: object.get(user, "uid", 0) == c.uid}
	uid_ok[c.uid == null]
	gid_ok := {true: true, false: object.get(user, "gid", 0) == c.gid}
	gid_ok[c.gid == null]
	masks_ok := {true: true, false: count(missing_protected_paths) == 0}
	masks_ok[c.privileged]
	capabilities_ok
	root_ok := {true: object.get(object.get(input.OCI, "root", {}), "readonly", false), false: true}
	root_ok[c.read_only_root]
	nnp_ok := {true: object.get(process, "noNewPrivileges", false), false: true}
	nnp_ok[c.no_new_privileges]
	prefix := policy_shared_prefix

	# mount_ok, inlined: a function call per mount costs more than its body.
	every m in mounts {
		a := c.mounts[m.destination]
		options := m.options
		kind := m.type
		by_option := {true: true, false: "bind" in options}
		by_type := {true: true, false: by_option["rbind" in options]}
		is_bind := by_type[kind == "bind"]
		is_bind in a.bind
		type_ok := {true: true, false: {true: true, false: kind == a.type}[a.any_type]}
		type_ok[is_bind]
		every o in a.options {
			o in options
		}
		rw := count({"rw", "rrw"} & {o | some o in options}) > 0
		ro_ok := {true: rw == false, false: true}
		ro_ok["ro" in a.options]
		count(lifting_options & {o | some o in options}) == 0
		escapes := regex.match(`(^|/)\.\.(/|$)`, m.source)
		shared_ok := {true: false, false: startswith(m.source, prefix)}
		source_ok := {true: shared_ok[escapes], false: true}
		source_ok[is_bind]
	}
}

# Variables that change what a process loads, runs or trusts: only ever
# allowed by name and value (env_exact, from the manifest or the image),
# never through a pattern such as envFrom's `PREFIX*=.*` — a ConfigMap the
# host serves must not set LD_PRELOAD=/volume/x.so, PATH=/volume or
# NODE_OPTIONS=--require /volume/x.js. (A list cannot be complete: values
# envFrom brings are the host's by nature; secrets and settings an owner
# relies on belong in the data hub.)
loader_env := `^(LD_[A-Z_]*|PATH|GCONV_PATH|HOSTALIASES|LOCALDOMAIN|RES_OPTIONS|NLSPATH|LOCPATH|MALLOC_[A-Z_]*|GLIBC_TUNABLES|TMPDIR|IFS|ENV|BASH_ENV|SHELLOPTS|BASHOPTS|PS4|PROMPT_COMMAND|NODE_OPTIONS|NODE_PATH|PYTHON[A-Z_]*|PERL5LIB|PERL5OPT|PERLLIB|RUBYLIB|RUBYOPT|GEM_PATH|GEM_HOME|JAVA_TOOL_OPTIONS|_JAVA_OPTIONS|JDK_JAVA_OPTIONS|JAVA_OPTS|CLASSPATH|DOTNET_[A-Z_]*|CORECLR_[A-Z_]*|GOFLAGS|OPENSSL_[A-Z_]*|SSL_CERT_FILE|SSL_CERT_DIR|CURL_CA_BUNDLE|REQUESTS_CA_BUNDLE|NODE_EXTRA_CA_CERTS|[Hh][Tt][Tt][Pp][Ss]?_[Pp][Rr][Oo][Xx][Yy]|[Aa][Ll][Ll]_[Pp][Rr][Oo][Xx][Yy]|[Nn][Oo]_[Pp][Rr][Oo][Xx][Yy])=`

# Variables `c.env` accepts, found cheaply: literal ones by lookup, others
# by the small regex of the parts of c.env that name them (each a subset
# of c.env).
env_fast contains e if {
	c := policy_container
	some e in env
	c.env_exact[e]
}

env_fast contains e if {
	c := policy_container
	some e in env
	not c.env_exact[e]
	parts := split(e, "=")
	regex.match(c.env_by_name[parts[0]], e)
}

namespace_ok if policy_namespace == ""

namespace_ok if namespace == policy_namespace

image_ok if count(policy_container.images) == 0

image_ok if image_name in policy_container.images

# A container whose root must be guest-pulled (the owner's choice, in the
# policy: `guest_pull`) has exactly one storage, the guest pull of a pinned
# image; without one the host's rootfs would run. Otherwise any storages
# are guest pulls of allowed images, and none means the host's rootfs.
storages_ok if {
	policy_container.guest_pull
	count(storages) == 1
	s := storages[0]
	s.driver == "image_guest_pull"
	object.get(s, "source", "") in policy_container.images
}

storages_ok if {
	not policy_container.guest_pull
	every s in storages {
		s.driver == "image_guest_pull"
		source_ok := {true: true, false: object.get(s, "source", "") in policy_container.images}
		source_ok[count(policy_container.images) == 0]
	}
}

# Hooks are programs the runtime runs, some as root in the guest's own
# namespaces: a pod's policy never allows one.
no_hooks if {
	every _, list in object.get(input.OCI, "hooks", {}) {
		count(list) == 0
	}
}

# No devices (e.g. /dev/sev-guest) unless the container is privileged.
devices_ok if policy_container.privileged

devices_ok if {
	count(object.get(linux, "devices", [])) == 0
	count(device_grants_denied) == 0
}

# The device cgroup's allow rules containerd writes for an unprivileged
# container: null, zero, full, random, urandom, tty, console, ptmx, the pts
# (any minor) and tun. With CAP_MKNOD (containerd's default) any other
# allow rule — a block device, "a"ll devices — would let the container
# open the guest's disks or memory through a node it creates.
default_device_grants := {
	["c", 1, 3], ["c", 1, 5], ["c", 1, 7], ["c", 1, 8], ["c", 1, 9],
	["c", 5, 0], ["c", 5, 1], ["c", 5, 2], ["c", 136, null], ["c", 10, 200],
}

device_grants_denied contains g if {
	some g in object.get(object.get(linux, "resources", {}), "devices", [])
	object.get(g, "allow", false) == true
	not [object.get(g, "type", "a"), object.get(g, "major", null), object.get(g, "minor", null)] in default_device_grants
}

namespaces_ok if {
	types := {n.type | some n in object.get(linux, "namespaces", [])}
	count(required_namespaces - types) == 0
}

# Exactly the pod's sysctls (securityContext.sysctls), each with its value.
sysctls_ok if {
	allowed := policy_container.sysctls
	every k, v in object.get(linux, "sysctl", {}) {
		allowed[k] == v
	}
}

# A filter may only restrict the container: no user notification (a
# listener outside the container would decide its syscalls). When the pod
# asks for one (seccompProfile), a filter that denies by default.
seccomp_ok if {
	not seccomp_notifies
	seccomp_present_ok := {true: seccomp_denies_by_default, false: true}
	seccomp_present_ok[policy_container.seccomp]
}

seccomp_notifies if object.get(seccomp, "listenerPath", "") != ""

seccomp_notifies if seccomp.defaultAction == "SCMP_ACT_NOTIFY"

seccomp_notifies if {
	some rule in object.get(seccomp, "syscalls", [])
	rule.action == "SCMP_ACT_NOTIFY"
}

default seccomp_denies_by_default := false

seccomp_denies_by_default if {
	action := object.get(seccomp, "defaultAction", "SCMP_ACT_ALLOW")
	action != "SCMP_ACT_ALLOW"
	action != "SCMP_ACT_LOG"
}

args_ok if policy_container.args_exact == args

args_ok if {
	patterns := policy_container.args_patterns
	patterns != null
	count(patterns) == count(args)
	every i, p in patterns {
		regex.match(p, args[i])
	}
}

capabilities_ok if policy_container.capabilities == null

capabilities_ok if {
	allowed_list := policy_container.capabilities
	allowed_list != null

	# Bounding, effective and permitted are usually one list, the allowed
	# one in its order: only other (non-empty) lists are checked by member.
	lists := {object.get(capabilities, set, []) | some set in ["bounding", "effective", "permitted", "inheritable", "ambient"]}
	others := {l | some l in lists; l != allowed_list; count(l) > 0}
	every l in others {
		allowed := {c | some c in allowed_list}
		every cap in l {
			allowed[cap]
		}
	}
}

# Options that lift what a mount of host files must keep (nodev, nosuid;
# the recursive forms apply after everything else).
lifting_options := {"dev", "suid", "rdev", "rsuid", "rexec"}

# A mount is allowed by the container's rule at its destination (its own
# mounts and the defaults). Rules say whether it must be a bind (`bind`:
# the allowed values of "is a bind"), the filesystem type of a mount that
# is not one (unless `any_type`) and the options it must carry (`ro` for
# read-only mounts, which then must not also say `rw`). Binds may only come
# from the directory the runtime shares into the guest, by a path without
# `..`: never a guest path such as / or /dev. (Symlinks the host plants in
# the shared directory are the agent's to refuse: it resolves every shared
# bind source beneath that directory.)
# (The same check as a function, for the denial's reasons.)
mount_ok(m, rules, prefix) if {
	a := rules[m.destination]
	options := m.options
	kind := m.type
	by_option := {true: true, false: "bind" in options}
	by_type := {true: true, false: by_option["rbind" in options]}
	is_bind := by_type[kind == "bind"]
	is_bind in a.bind
	type_ok := {true: true, false: {true: true, false: kind == a.type}[a.any_type]}
	type_ok[is_bind]
	every o in a.options {
		o in options
	}
	rw := count({"rw", "rrw"} & {o | some o in options}) > 0
	ro_ok := {true: rw == false, false: true}
	ro_ok["ro" in a.options]
	count(lifting_options & {o | some o in options}) == 0
	escapes := regex.match(`(^|/)\.\.(/|$)`, m.source)
	shared_ok := {true: false, false: startswith(m.source, prefix)}
	source_ok := {true: shared_ok[escapes], false: true}
	source_ok[is_bind]
}

# --- the reasons, computed only for a denial ---

create_errors contains "the container has no io.kubernetes.cri.container-name annotation, so it is not one of the pod's" if {
	container_type != "sandbox"
	not annotations["io.kubernetes.cri.container-name"]
}

create_errors contains sprintf("container %q is not in the pod's policy", [container_name]) if {
	container_type != "sandbox"
	not policy_container
}

create_errors contains sprintf("the pod's sandbox is %q already: a second one is not allowed", [recorded_sandbox]) if {
	container_type == "sandbox"
	recorded_sandbox != ""
}

create_errors contains sprintf("a sandbox container must be its own sandbox, not a member of %q", [object.get(input, "sandbox_id", "")]) if {
	container_type == "sandbox"
	not own_sandbox
}

create_errors contains sprintf("the pod's sandbox %q has not been created: a member cannot come first", [object.get(input, "sandbox_id", "")]) if {
	container_type != "sandbox"
	recorded_sandbox == ""
	not own_sandbox
}

create_errors contains sprintf("the pod's sandbox is %q already: container %q cannot be a second one", [recorded_sandbox, input.container_id]) if {
	container_type != "sandbox"
	recorded_sandbox != ""
	own_sandbox
	input.container_id != recorded_sandbox
}

create_errors contains sprintf("container id %q is the pod sandbox's", [input.container_id]) if {
	container_type != "sandbox"
	input.container_id == recorded_sandbox
}

create_errors contains sprintf("sandbox_id %q is not the pod's sandbox %q", [object.get(input, "sandbox_id", ""), recorded_sandbox]) if {
	container_type != "sandbox"
	recorded_sandbox != ""
	object.get(input, "sandbox_id", "") != recorded_sandbox
}

create_errors contains sprintf("the pod's namespace is %q, not %q", [policy_namespace, namespace]) if {
	policy_container
	not namespace_ok
}

create_errors contains sprintf("image %q is not allowed for container %q (allowed: %v)", [image_name, c.name, c.images]) if {
	c := policy_container
	not image_ok
}

create_errors contains sprintf("guest pull of %q (storage driver %q) is not allowed for container %q (allowed: %v)", [object.get(s, "source", ""), object.get(s, "driver", ""), c.name, c.images]) if {
	c := policy_container
	not storages_ok
	some s in storages
	not {true: true, false: object.get(s, "source", "") in c.images}[count(c.images) == 0]
}

create_errors contains sprintf("container %q must run the pinned image pulled by the guest (exactly one image_guest_pull storage), not a root filesystem from the host", [c.name]) if {
	c := policy_container
	c.guest_pull
	count(storages) != 1
}

create_errors contains sprintf("root.path %q is not the container's root (%s%s)", [root_path, policy_rootfs_prefix, input.container_id]) if {
	policy_container
	root_path != concat("", [policy_rootfs_prefix, input.container_id])
}

create_errors contains sprintf("hooks (%s) are not allowed for container %q", [kind, c.name]) if {
	c := policy_container
	some kind, list in object.get(input.OCI, "hooks", {})
	count(list) > 0
}

create_errors contains sprintf("device cgroup rule %v is not allowed for container %q (only containerd's defaults)", [g, c.name]) if {
	c := policy_container
	not c.privileged
	some g in device_grants_denied
}

create_errors contains sprintf("device %s is not allowed for container %q", [object.get(d, "path", ""), c.name]) if {
	c := policy_container
	not c.privileged
	some d in object.get(linux, "devices", [])
}

create_errors contains sprintf("container %q must have its own %s namespace", [c.name, t]) if {
	c := policy_container
	types := {n.type | some n in object.get(linux, "namespaces", [])}
	some t in required_namespaces - types
}

create_errors contains sprintf("sysctl %s=%s is not allowed for container %q", [k, v, c.name]) if {
	c := policy_container
	some k, v in object.get(linux, "sysctl", {})
	not c.sysctls[k] == v
}

create_errors contains sprintf("seccomp user notification is not allowed for container %q", [c.name]) if {
	c := policy_container
	seccomp_notifies
}

create_errors contains sprintf("container %q must run under a seccomp filter that denies by default (seccompProfile)", [c.name]) if {
	c := policy_container
	c.seccomp
	not seccomp_denies_by_default
}

create_errors contains sprintf("storage driver %q is not allowed for container %q", [object.get(s, "driver", ""), c.name]) if {
	c := policy_container
	some s in storages
	s.driver != "image_guest_pull"
}

create_errors contains sprintf("args %v are not allowed for container %q", [args, c.name]) if {
	c := policy_container
	not args_ok
}

# Only the variable's name: its value may be a secret.
create_errors contains sprintf("env variable %s is not allowed for container %q", [split(e, "=")[0], c.name]) if {
	c := policy_container
	some e in env
	not regex.match(c.env, e)
}

create_errors contains sprintf("env variable %s is only allowed with the exact value the pod or image gives it, not through a pattern (container %q)", [split(e, "=")[0], c.name]) if {
	c := policy_container
	some e in env
	not c.env_exact[e]
	regex.match(loader_env, e)
}

create_errors contains sprintf("working directory %q is not allowed for container %q (expected %q)", [object.get(process, "cwd", ""), c.name, c.cwd]) if {
	c := policy_container
	object.get(process, "cwd", "") != c.cwd
}

create_errors contains sprintf("uid %v is not allowed for container %q (expected %v)", [uid, c.name, c.uid]) if {
	c := policy_container
	c.uid != null
	uid := object.get(user, "uid", 0)
	uid != c.uid
}

create_errors contains sprintf("gid %v is not allowed for container %q (expected %v)", [gid, c.name, c.gid]) if {
	c := policy_container
	c.gid != null
	gid := object.get(user, "gid", 0)
	gid != c.gid
}

# A privileged container has no masked paths (and every capability).
create_errors contains sprintf("privileged mode is not allowed for container %q (no masked paths)", [c.name]) if {
	c := policy_container
	not c.privileged
	count(masked_paths) == 0
}

create_errors contains sprintf("container %q must keep %s masked or read-only", [c.name, concat(", ", sort(missing_protected_paths))]) if {
	c := policy_container
	not c.privileged
	count(masked_paths) > 0
	count(missing_protected_paths) > 0
}

create_errors contains sprintf("capability %s is not allowed for container %q", [cap, c.name]) if {
	c := policy_container
	c.capabilities != null
	some set in ["bounding", "effective", "permitted", "inheritable", "ambient"]
	some cap in object.get(capabilities, set, [])
	not cap in c.capabilities
}

create_errors contains sprintf("container %q must have a read-only root filesystem", [c.name]) if {
	c := policy_container
	c.read_only_root
	not object.get(object.get(input.OCI, "root", {}), "readonly", false)
}

create_errors contains sprintf("container %q must run with no_new_privileges (allowPrivilegeEscalation: false)", [c.name]) if {
	c := policy_container
	c.no_new_privileges
	not object.get(process, "noNewPrivileges", false)
}

create_errors contains sprintf("mount %s is not allowed for container %q", [m.destination, c.name]) if {
	c := policy_container
	some m in mounts
	not mount_ok(m, c.mounts, policy_shared_prefix)
}

# --- exec ---

# Only the commands the pod's manifest runs in that container (probes,
# lifecycle hooks) and those the settings allow everywhere.
exec_container := object.get(object.get(data.state, "containers", {}), input.container_id, "")

exec_command_allowed if input.process.args in policy_data.exec[exec_container]

exec_command_allowed if input.process.args in policy_data.allowed_exec

# An exec runs as the container runs, as containerd builds it from the
# container's process: same env (a terminal may set TERM), user,
# capabilities and cwd; no_new_privileges may be added, never dropped. So
# an allowed probe cannot gain LD_PRELOAD, a PATH into a volume, uid 0 or
# capabilities.
created := object.get(object.get(data.state, "processes", {}), input.container_id, null)

exec_env := {e | some e in object.get(input.process, "env", [])}

created_env := {e | some e in created.env}

exec_env_added := {e | some e in exec_env; not created_env[e]; e != "TERM=xterm"}

exec_env_dropped := {e | some e in created_env; not exec_env[e]; not startswith(e, "TERM=")}

exec_env_ok if {
	count(exec_env_added) == 0
	count(exec_env_dropped) == 0
}

# Compared as sets: the runtime may serialise a list in another order than
# containerd sends it (oci-spec keeps capabilities in hash sets).
capability_sets(caps) := {k: {c | some c in object.get(caps, k, [])} | some k in ["bounding", "effective", "permitted", "inheritable", "ambient"]}

user_identity(u) := {
	"uid": object.get(u, "uid", 0),
	"gid": object.get(u, "gid", 0),
	"additionalGids": {g | some g in object.get(u, "additionalGids", [])},
}

exec_user_ok if user_identity(object.get(input.process, "user", {})) == user_identity(created.user)

exec_capabilities_ok if {
	capability_sets(object.get(input.process, "capabilities", {})) == capability_sets(created.capabilities)
}

exec_process_ok if {
	created != null
	exec_env_ok
	exec_user_ok
	exec_capabilities_ok
	object.get(input.process, "cwd", "") == created.cwd
	nnp_ok := {true: true, false: created.noNewPrivileges == false}
	nnp_ok[object.get(input.process, "noNewPrivileges", false)]
}

exec_allowed if {
	exec_command_allowed
	exec_process_ok
}

ExecProcessRequest := true if exec_allowed

ExecProcessRequest := {"allowed": false, "reason": exec_deny_reason} if not exec_allowed

exec_deny_reason := sprintf("exec of %v in container %q is not in the pod's policy", [object.get(input.process, "args", []), exec_container]) if {
	not exec_command_allowed
} else := sprintf("exec in container %q: the container was not created under this policy", [input.container_id]) if {
	created == null
} else := sprintf("exec in container %q must keep the container's %s", [exec_container, concat(", ", exec_process_errors)])

exec_process_errors contains "env" if not exec_env_ok

exec_process_errors contains "user" if {
	created != null
	not exec_user_ok
}

exec_process_errors contains "capabilities" if {
	created != null
	not exec_capabilities_ok
}

exec_process_errors contains "cwd" if object.get(input.process, "cwd", "") != created.cwd

exec_process_errors contains "no_new_privileges" if {
	created.noNewPrivileges
	not object.get(input.process, "noNewPrivileges", false)
}

RemoveContainerRequest := {"allowed": true, "ops": [
	{"op": "remove", "path": concat("/", ["", "containers", input.container_id])},
	{"op": "remove", "path": concat("/", ["", "processes", input.container_id])},
]} if {
	data.state.containers[input.container_id]
}

RemoveContainerRequest := true if not data.state.containers[input.container_id]

# The pod network's rules (UpdateInterface, UpdateRoutes, AddARPNeighbors)
# follow: kabuto_policy::POD_NETWORK_RULES, shared with the confidential
# default.
