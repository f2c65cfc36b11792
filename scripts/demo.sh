#!/usr/bin/env bash
# The main job: build and install kabuto, then
#  1. run a container in its own micro-VM through containerd and show that it
#     ran on the guest's kernel;
#  2. run a confidential pod (software TEE: this host has no SEV-SNP/TDX) that
#     attests to a local kabuto-kbs and reads a secret the KBS releases only
#     to a guest whose measurement and init-data the owner registered.
# Uses a private containerd and KBS under /tmp/kabuto-demo; a system
# containerd is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:/usr/local/bin:$PATH"
target/release/kabuto install
target/release/kabuto check

demo=/tmp/kabuto-demo
mkdir -p "$demo"
cat > "$demo/containerd.toml" <<TOML
version = 2
root = "$demo/root"
state = "$demo/state"
[grpc]
  address = "$demo/containerd.sock"
[ttrpc]
  address = "$demo/containerd.sock.ttrpc"
TOML
containerd --config "$demo/containerd.toml" > "$demo/containerd.log" 2>&1 &
containerd_pid=$!
kbs_pid=
cleanup() {
  kill $containerd_pid $kbs_pid 2>/dev/null || true
  wait $containerd_pid $kbs_pid 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do ctr --address "$demo/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done

target/release/make-test-image "$demo/busybox-oci.tar"
ctr --address "$demo/containerd.sock" image import "$demo/busybox-oci.tar" >/dev/null

echo "host kernel:      $(uname -r)"
echo -n "container kernel: "
ctr --address "$demo/containerd.sock" run --rm --runtime io.containerd.kabuto.v2 \
  localhost/busybox:latest demo uname -r

echo
echo "== confidential pod (software TEE; INSECURE, for hosts without TEE hardware)"
owner="$demo/owner"
rm -rf "$owner" && mkdir -p "$owner"
# The owner's KBS, with a TLS certificate the guest reaches as 10.0.2.2.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=kabuto demo KBS" -addext "subjectAltName=IP:10.0.2.2,IP:127.0.0.1" \
  -addext "basicConstraints=critical,CA:FALSE" -addext "extendedKeyUsage=serverAuth" \
  -keyout "$owner/tls.key" -out "$owner/tls.crt" 2>/dev/null
target/release/kabuto-kbs admin keygen --private "$owner/admin.key" --public "$owner/admin.pub" >/dev/null
port=$(( 20000 + RANDOM % 20000 ))
cat > "$owner/kbs.toml" <<TOML
listen = "127.0.0.1:$port"
store = "$owner/store.redb"
token_key = "$owner/token.key"
[tls]
cert = "$owner/tls.crt"
key = "$owner/tls.key"
[[admin_keys]]
public_key = "$owner/admin.pub"
roles = ["admin"]
TOML
target/release/kabuto-kbs serve --config "$owner/kbs.toml" 2> "$owner/kbs.log" &
kbs_pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
admin=(--url "https://127.0.0.1:$port" --key "$owner/admin.key" --ca "$owner/tls.crt")

# The runtime class: the same kabuto, launching VMs in the software TEE.
cat > "$demo/confidential.toml" <<TOML
[hypervisor]
guest_network = "user"
[confidential]
tee = "software"
TOML
# The pod's init-data: where its KBS is, and its agent policy.
{
  printf 'version = "0.1.0"\nalgorithm = "sha256"\n\n[data]\n"aa.toml" = \x27\x27\x27\n'
  printf '[token_configs.kbs]\nurl = "https://10.0.2.2:%s"\ncert = """\n' "$port"
  cat "$owner/tls.crt"
  printf '"""\n\x27\x27\x27\n"policy.rego" = \x27\x27\x27\n'
  cat crates/common/policy/policies/allow-all.rego
  printf '\x27\x27\x27\n'
} > "$owner/init-data.toml"
init_data_digest=$(sha256sum "$owner/init-data.toml" | cut -d' ' -f1)
annotation="io.katacontainers.config.hypervisor.cc_init_data=$(gzip -c "$owner/init-data.toml" | base64 -w0)"

# The owner registers what it expects, and the secret.
measurement=$(KABUTO_CONFIG_PATH="$demo/confidential.toml" target/release/kabuto guest measure)
target/release/kabuto-kbs admin trust-software-tee "${admin[@]}" /var/lib/kabuto/swtee/root.crt >/dev/null
target/release/kabuto-kbs admin set-reference-values "${admin[@]}" measurement "[\"$measurement\"]" >/dev/null
target/release/kabuto-kbs admin set-reference-values "${admin[@]}" init_data "[\"$init_data_digest\"]" >/dev/null
echo "the owner's secret" > "$owner/secret"
target/release/kabuto-kbs admin set-resource "${admin[@]}" default/demo/secret "$owner/secret" >/dev/null

echo -n "secret read inside the confidential pod: "
ctr --address "$demo/containerd.sock" run --rm --runtime io.containerd.kabuto.v2 \
  --runtime-config-path "$demo/confidential.toml" --annotation "$annotation" \
  localhost/busybox:latest confidential \
  wget -qO- http://127.0.0.1:8006/cdh/resource/default/demo/secret
