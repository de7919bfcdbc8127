#!/usr/bin/env bash
# Static checks of the Nix files that run without nixpkgs (it cannot be downloaded here): syntax
# of every .nix file (nix-instantiate --parse), formatting (nixpkgs-fmt --check), dead code
# (deadnix --fail -L), the shape of flake.lock, evaluation of the module's pure option tables,
# and the VM test's Python script (compiled and linted the way the NixOS test driver lints it).
# Building the package, `nix flake check` and the VM test itself need nixpkgs: they run on a
# machine with Nix and network (see docs/nixos.md). tests/nix_module.rs checks the rendered
# settings against the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# Debian's nix-bin names a build-users group that does not exist here; nothing is built.
export NIX_CONFIG="build-users-group ="

for tool in nix-instantiate nixpkgs-fmt deadnix pyflakes3 python3; do
  command -v "$tool" >/dev/null || { echo "check-nix: $tool is not installed (see .ci/run)" >&2; exit 1; }
done

mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.nix')
[ "${#files[@]}" -gt 0 ] || { echo "check-nix: no .nix files found" >&2; exit 1; }
echo "check-nix: ${#files[@]} files: ${files[*]}"

for f in "${files[@]}"; do
  nix-instantiate --parse "$f" >/dev/null
done
echo "check-nix: nix-instantiate --parse: ok"

nixpkgs-fmt --check "${files[@]}"
deadnix --fail -L "${files[@]}"
echo "check-nix: nixpkgs-fmt --check and deadnix --fail: ok"

python3 - <<'PY'
import json
lock = json.load(open("flake.lock"))
assert lock["version"] == 7 and lock["root"] == "root", "flake.lock: version 7 and a root node"
assert lock["nodes"]["root"]["inputs"] == {"nixpkgs": "nixpkgs"}, "flake.lock: one input, nixpkgs"
node = lock["nodes"]["nixpkgs"]
assert node["original"] == {"owner": "NixOS", "ref": "nixos-25.11", "repo": "nixpkgs", "type": "github"}
locked = node["locked"]
assert locked["type"] == "github" and locked["owner"] == "NixOS" and locked["repo"] == "nixpkgs"
assert len(locked["rev"]) == 40 and locked["narHash"].startswith("sha256-")
print("check-nix: flake.lock: nixpkgs", locked["rev"])
PY

nix-instantiate --eval --strict --json nix/module-data.nix >/dev/null
echo "check-nix: nix/module-data.nix evaluates"

script=$(mktemp --suffix=.py)
trap 'rm -f "$script"' EXIT
nix-instantiate --eval --strict --json nix/vm-test-script.nix \
  | python3 -c 'import json, sys; sys.stdout.write(json.load(sys.stdin))' >"$script"
python3 -m py_compile "$script"
# The NixOS test driver defines these names (its functions and one per node) for the script.
PYFLAKES_BUILTINS="start_all,subtest,hypervisor,s3,client" pyflakes3 "$script"
echo "check-nix: VM test script compiles and passes pyflakes"
