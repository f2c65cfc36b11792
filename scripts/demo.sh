#!/usr/bin/env bash
# The main job: build and install kabuto, then
#  1. run a container in its own micro-VM through containerd and show that it
#     ran on the guest's kernel;
#  2. run a confidential pod (software TEE: this host has no SEV-SNP/TDX) that
#     attests to a local kabuto-kbs and reads a secret the KBS releases only
#     to a guest whose measurement and init-data the owner registered;
#  3. run a container from an image skopeo encrypted, which the guest pulls
#     from a local registry and decrypts with a key from the KBS (the host
#     never unpacks it).
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
registry_pid=
cleanup() {
  kill $containerd_pid $kbs_pid $registry_pid 2>/dev/null || true
  wait $containerd_pid $kbs_pid $registry_pid 2>/dev/null || true
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

# The owner's image: busybox, encrypted by skopeo to the owner's RSA key,
# in a private registry on loopback (the guest reaches it as 10.0.2.2).
reg_port=$(( 20000 + RANDOM % 20000 ))
mkdir -p "$owner/registry" "$owner/busybox" "$owner/empty"
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
  "$owner/registry/data" "$reg_port" > "$owner/registry/config.yml"
docker-registry serve "$owner/registry/config.yml" > "$owner/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$reg_port) 2>/dev/null && break; sleep 0.1; done
openssl genrsa -out "$owner/image-key.pem" 2048 2>/dev/null
openssl rsa -in "$owner/image-key.pem" -pubout -out "$owner/image-key.pub" 2>/dev/null
tar -xf "$demo/busybox-oci.tar" -C "$owner/busybox"
skopeo copy --quiet --encryption-key "jwe:$owner/image-key.pub" \
  "oci:$owner/busybox:latest" "oci:$owner/busybox-encrypted:latest"
encrypted_image="127.0.0.1:$reg_port/demo/busybox-encrypted:latest"
skopeo copy --quiet --dest-tls-verify=false "oci:$owner/busybox-encrypted:latest" "docker://$encrypted_image"

# The runtime classes: the same kabuto, launching VMs in the software TEE;
# the second one has the guest pull images itself.
cat > "$demo/confidential.toml" <<TOML
[hypervisor]
guest_network = "user"
[confidential]
tee = "software"
TOML
cat "$demo/confidential.toml" - > "$demo/confidential-guest-pull.toml" <<TOML
image_pull = "guest"
TOML
# The pod's init-data: where its KBS is, and its agent policy.
{
  printf 'version = "0.1.0"\nalgorithm = "sha256"\n\n[data]\n"aa.toml" = \x27\x27\x27\n'
  printf '[token_configs.kbs]\nurl = "https://10.0.2.2:%s"\ncert = """\n' "$port"
  cat "$owner/tls.crt"
  printf '"""\n\x27\x27\x27\n"policy.rego" = \x27\x27\x27\n'
  cat crates/common/policy/policies/allow-all.rego
  printf '\x27\x27\x27\n'
  # Image pulls: the decryption key from the KBS, the registry reached as 10.0.2.2.
  printf '"cdh.toml" = \x27\x27\x27\n[image]\nregistry_configuration_uri = "initdata:///registries.conf"\n'
  printf 'image_decryption_key_uris = ["kbs:///default/image-key/demo"]\n\x27\x27\x27\n'
  printf '"registries.conf" = \x27\x27\x27\n[[registry]]\nprefix = "127.0.0.1:%s"\n' "$reg_port"
  printf 'location = "10.0.2.2:%s"\ninsecure = true\n\x27\x27\x27\n' "$reg_port"
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
target/release/kabuto-kbs admin set-resource "${admin[@]}" default/image-key/demo "$owner/image-key.pem" >/dev/null

echo -n "secret read inside the confidential pod: "
# --net-host: the guest reaches the KBS over the host's network (the VM
# runs in the pod's network namespace, which `ctr run` makes empty).
ctr --address "$demo/containerd.sock" run --rm --net-host --runtime io.containerd.kabuto.v2 \
  --runtime-config-path "$demo/confidential.toml" --annotation "$annotation" \
  localhost/busybox:latest confidential \
  wget -qO- http://127.0.0.1:8006/cdh/resource/default/demo/secret

echo
echo "== confidential image: encrypted by skopeo, pulled and decrypted inside the guest"
# --rootfs with an empty directory: containerd fetches nothing; the guest
# pulls the image the annotation names.
ctr --address "$demo/containerd.sock" run --rm --net-host --runtime io.containerd.kabuto.v2 \
  --runtime-config-path "$demo/confidential-guest-pull.toml" --annotation "$annotation" \
  --annotation "io.kabuto.image=$encrypted_image" --rootfs "$owner/empty" confidential-image \
  sh -c 'echo "ran from the encrypted image $0 on kernel $(uname -r)"' "$encrypted_image"
