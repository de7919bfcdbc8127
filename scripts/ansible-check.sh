#!/usr/bin/env bash
# The Ansible collection lvp.provisioner (integrations/ansible/): `ansible-test sanity` (every
# sanity test that runs with --local, no containers), then its integration playbook against a
# real daemon started here (TLS on loopback, client certificates or an API token; directory volumes;
# images from file://): provision, the re-run reports no change, images prefetched, resize
# when the daemon's OpenAPI document has the route, delete.
# Needs ansible-core in $ANSIBLE_VENV (default /opt/ansible; .ci/run installs it) and qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${ANSIBLE_VENV:-/opt/ansible}
[ -x "$venv/bin/ansible-test" ] || { echo "ansible-core is not installed in $venv (.ci/run installs it)" >&2; exit 1; }
export PATH="$venv/bin:$PATH"
bin=${LVP_BIN:-$root/target/debug/libvirt-volume-provisioner}
[ -x "$bin" ] || cargo build --locked --quiet

work=$(mktemp -d)
daemon=""
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# ansible-test wants the collection at ansible_collections/<namespace>/<name>.
coll=$work/ansible_collections/lvp/provisioner
mkdir -p "$(dirname "$coll")"
cp -r integrations/ansible "$coll"

# ansible-test bootstraps pip in each sanity virtualenv with a get-pip.py from its own CI file
# host, which CI cannot reach; scripts/ansible-get-pip.py stands in (ensurepip, then PyPI).
reqs=$(python3 -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))' 2>/dev/null \
  || "$venv/bin/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')
pip_version=$(grep -oP "^\s+pip='\K[0-9.]+" "$reqs/_internal/python_requirements.py" | head -1)
mkdir -p ~/.ansible/test/cache
cp scripts/ansible-get-pip.py ~/.ansible/test/cache/get_pip_${pip_version//./_}.py

echo "== ansible-test sanity (--local, Python 3.11) =="
(cd "$coll" && ansible-test sanity --python 3.11 --local --color no)

echo "== integration playbook against a real daemon =="
mkdir -p "$work/d/images" "$work/outside"
qemu-img create -q -f qcow2 "$work/d/images/base.qcow2" 64M
qemu-img create -q -f qcow2 "$work/d/images/second.qcow2" 32M
qemu-img create -q -f qcow2 "$work/outside/bad.qcow2" 32M
# TLS with optional client certificates and an API token: the modules reach it both ways.
pki=$work/pki; mkdir -p "$pki"
ossl() { openssl "$@" 2>/dev/null; }
ossl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=Test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt"
issue() { # name, extension lines
  printf '%b' "$2" > "$pki/$1.ext"
  ossl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$pki/$1.key" -out "$pki/$1.csr"
  ossl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -sha256 -extfile "$pki/$1.ext" -out "$pki/$1.crt"
}
issue server 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n'
issue ansible 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n'
token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf 'ansible:%s\n' "$token" > "$work/d/tokens"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/d/config.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[storage]
data_dir = "$work/d/state"
[volumes]
backend = "directory"
[volumes.directory]
path = "$work/d/volumes"
[cache]
dir = "$work/d/cache"
[sources]
file_roots = ["$work/d/images"]
[tls]
cert_file = "$pki/server.crt"
key_file = "$pki/server.key"
client_ca_file = "$pki/ca.crt"
client_auth = "optional"
[auth]
tokens_file = "$work/d/tokens"
[telemetry]
probe_interval = "1h"
[log]
level = "warn"
TOML
"$bin" --config "$work/d/config.toml" serve 2> "$work/daemon.log" &
daemon=$!
for _ in $(seq 100); do
  curl -fsS --cacert "$pki/ca.crt" "https://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
# The modules run on /usr/bin/python3 (no packages beyond the standard library); the token
# reaches them through the environment, never the command line.
export LVP_TOKEN=$token ANSIBLE_COLLECTIONS_PATH=$work ANSIBLE_NOCOLOR=1
python=/usr/bin/python3; [ -x "$python" ] || python=$(command -v python3)
ansible-playbook -i localhost, -c local "$coll/tests/playbooks/provision.yml" \
  -e ansible_python_interpreter="$python" \
  -e lvp_url="https://127.0.0.1:$port" -e pki="$pki" \
  -e image_url="file://$work/d/images/base.qcow2" \
  -e image2_url="file://$work/d/images/second.qcow2" \
  -e bad_image_url="file://$work/outside/bad.qcow2" \
  || { echo "--- daemon log ---" >&2; cat "$work/daemon.log" >&2; exit 1; }
