#!/usr/bin/env bash
# `make test-compose`, part 1: the engine and every image the stack runs, built on this machine from
# Debian packages and PyPI only (no container registry is reachable here, and none is named).
#
#   tests/compose/build_images.sh          # installs what is missing, rebuilds what changed
#   BELAY_COMPOSE_FRESH=1 tests/compose/build_images.sh   # also remakes the base root filesystem
#
# What it makes (all under build/compose/ or docker/pip/, both ignored by git):
#   - podman with runc, the cgroupfs manager, netavark + aardvark-dns (containers find each other by
#     name) and catatonit (compose's `init: true`), from Debian; podman-compose from PyPI into .venv;
#   - build/compose/containers.conf: podman's settings for this machine (runc, cgroupfs, no journald,
#     container ulimits within the machine's own), used through CONTAINERS_CONF by this script and the
#     test, so the machine-wide /etc/containers is left alone;
#   - localhost/belay-test/debian:bookworm: a minbase root filesystem made by mmdebstrap from this
#     machine's own apt sources and settings, imported with `podman import`;
#   - localhost/belay-test/{python,redis,prometheus,alertmanager}: tests/compose/images/*, FROM it;
#   - belay:0.1.0-cpu: docker/Dockerfile on that python, pip reading docker/pip/ (a wheelhouse of
#     requirements.txt collected here with this machine's pip settings, torch's local CPU wheel
#     included), so the image build itself reaches no index;
#   - belay-reward-example:0.1.0: examples/reward_server/Dockerfile on Belay's image (its three pins
#     are already installed there, so its pip install has nothing to fetch).
# Layers are cached: a second run with nothing changed takes seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
WORK=$REPO/build/compose
VENV=${VENV:-.venv}
mkdir -p "$WORK"
export CONTAINERS_CONF=$WORK/containers.conf
export CONTAINERS_REGISTRIES_CONF=$WORK/registries.conf

BASE_IMAGE=localhost/belay-test/debian:bookworm
PYTHON_IMAGE=localhost/belay-test/python:3.11-bookworm
BELAY_IMAGE=belay:0.1.0-cpu                 # what docker-compose.cpu.yml names
REWARD_EXAMPLE_IMAGE=belay-reward-example:0.1.0   # what deploy/compose/reward-example.override.yml names
PODMAN_COMPOSE_PIN=podman-compose==1.6.0

started=$(date +%s)
step_started=$started
step() {
    local now; now=$(date +%s)
    [ -z "${step_name:-}" ] || printf 'build_images: %-28s %4ss\n' "$step_name" "$((now - step_started))"
    step_name=$1 step_started=$now
}

# --- the engine -------------------------------------------------------------------------------------
step engine
need=()
for pair in podman:podman runc:runc netavark:/usr/lib/podman/netavark aardvark-dns:/usr/lib/podman/aardvark-dns \
            catatonit:catatonit mmdebstrap:mmdebstrap iptables:iptables \
            golang-github-containernetworking-plugin-dnsname:/usr/lib/cni/dnsname; do
    package=${pair%%:*} probe=${pair#*:}
    if [[ $probe == /* ]]; then [ -e "$probe" ] || need+=("$package"); else command -v "$probe" >/dev/null || need+=("$package"); fi
done
if [ ${#need[@]} -gt 0 ]; then
    echo "build_images: installing ${need[*]} from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$VENV/bin/python" -m pip show podman-compose 2>/dev/null | grep -q "^Version: ${PODMAN_COMPOSE_PIN#*==}$" \
    || "$VENV/bin/python" -m pip install -q "$PODMAN_COMPOSE_PIN"

# Container ulimits: podman's defaults (nofile 1048576, nproc 4194304 as root) are above what this
# machine lets a process raise to, and runc then refuses to start anything. Stay within its own.
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] && nproc=65536
nproc=$(( nproc / 2 < 32768 ? nproc / 2 : 32768 ))
cat > "$CONTAINERS_CONF" <<EOF
# Written by tests/compose/build_images.sh for this machine; read through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
init_path = "/usr/bin/catatonit"
[engine]
# crun refuses this machine's hybrid cgroups; runc with the cgroupfs manager (nothing here is systemd)
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "netavark"
EOF
# Short image names resolve to local images only: nothing here may be pulled from a registry (a
# missing image is an error, not a download).
cat > "$CONTAINERS_REGISTRIES_CONF" <<EOF
# Written by tests/compose/build_images.sh; read through CONTAINERS_REGISTRIES_CONF.
unqualified-search-registries = []
short-name-mode = "disabled"
EOF

# --- the base root filesystem -------------------------------------------------------------------------
step base-rootfs
if [ -n "${BELAY_COMPOSE_FRESH:-}" ] || ! podman image exists "$BASE_IMAGE"; then
    # This machine's own apt sources (its Debian entries) and settings, read now, never committed.
    sources=$(grep -l -E '^(URIs:.*|deb .*)debian' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1 || true)
    [ -n "$sources" ] || { echo "build_images: no Debian apt source on this machine" >&2; exit 1; }
    aptopts=()
    for conf in /etc/apt/apt.conf.d/*; do
        grep -q -E 'Check-Valid-Until|Check-Date|Acquire::(http|https)::Proxy' "$conf" 2>/dev/null && aptopts+=(--aptopt="$conf")
    done
    rm -f "$WORK/debian-bookworm.tar"
    mmdebstrap --quiet --variant=minbase --include=ca-certificates,debian-archive-keyring \
        "${aptopts[@]}" --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
        bookworm "$WORK/debian-bookworm.tar" "$sources"
    podman import --quiet --change 'CMD ["/bin/bash"]' "$WORK/debian-bookworm.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$WORK/debian-bookworm.tar"
fi

# --- images ------------------------------------------------------------------------------------------
build() {  # build TAG CONTEXT [podman build options...]; the build's output in build/compose/build-*.log
    local tag=$1 context=$2; shift 2
    local output=$WORK/build-$(echo "$tag" | tr '/:' '__').log
    local previous; previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    podman build --network host --layers "$@" -t "$tag" "$context" >"$output" 2>&1 \
        || { tail -40 "$output" >&2; echo "build_images: building $tag failed (whole log: $output)" >&2; exit 1; }
    # the image this tag named before, if the build made a new one: GBs each for Belay's image
    if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$tag")" ]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
}
pip_quiet() {  # pip, without the warnings about this machine's empty extra indexes
    "$VENV/bin/python" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

step image-python
build "$PYTHON_IMAGE" tests/compose/images/python

# --- the wheelhouse Belay's image installs from -------------------------------------------------------
step wheelhouse
# Resolved for the image's Python, not this machine's: environment markers differ (Debian's 3.11.2
# needs async-timeout for redis, a 3.11.3+ does not).
image_python=$(podman run --rm "$PYTHON_IMAGE" python3.11 -c 'import platform; print(platform.python_version())')
no_deps_pins=$(grep -o -E -- '--no-deps [a-z0-9-]+==[0-9.]+' Makefile | cut -d' ' -f2)
stamp=$( (cat requirements.txt; echo "$no_deps_pins") | sha256sum | cut -c1-16)-$image_python
# (the stamp lives outside docker/pip/, which the image build copies: a new stamp would be a new layer)
if [ "$(cat "$WORK/wheelhouse.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf docker/pip/wheels "$WORK/wheelhouse.stamp"
    torch_pin=$(grep -E '^torch==' requirements.txt)
    # This machine's pip settings (its find-links hold torch's CPU wheel) pick the wheels; sdists are
    # built into wheels here. Then what the image's Python needs besides, as binaries, the wheels just
    # made included. Then the packages the Makefile (and docker/Dockerfile) install --no-deps.
    pip_quiet wheel -q --wheel-dir docker/pip/wheels "$torch_pin" -r requirements.txt
    # (resolved by the image's own Python in a container, with this machine's CA certificates: pip's
    # --python-version leaves markers such as python_full_version at this machine's)
    podman run --rm --network host -v "$REPO/docker/pip/wheels:/wheels" \
        -v "$REPO/requirements.txt:/requirements.txt:ro" -v "$(readlink -f "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"):/ca.crt:ro" \
        -e PIP_CERT=/ca.crt -e PIP_DISABLE_PIP_VERSION_CHECK=1 -e PIP_DEFAULT_TIMEOUT=180 "$PYTHON_IMAGE" sh -c \
        "python3.11 -m venv /tmp/venv && /tmp/venv/bin/pip download -q --only-binary=:all: --find-links /wheels \
         --dest /wheels '$torch_pin' -r /requirements.txt"
    # shellcheck disable=SC2086
    pip_quiet wheel -q --no-deps --wheel-dir docker/pip/wheels $no_deps_pins
    printf '[global]\nno-index = true\nfind-links = /tmp/pip/wheels\n' > docker/pip/pip.conf
    echo "$stamp" > "$WORK/wheelhouse.stamp"
fi

step image-redis
build localhost/belay-test/redis:bookworm tests/compose/images/redis
step image-prometheus
build localhost/belay-test/prometheus:bookworm tests/compose/images/prometheus
step image-alertmanager
build localhost/belay-test/alertmanager:bookworm tests/compose/images/alertmanager
step image-belay
build "$BELAY_IMAGE" . -f docker/Dockerfile --build-arg BASE="$PYTHON_IMAGE"
step image-reward-example
build "$REWARD_EXAMPLE_IMAGE" . -f examples/reward_server/Dockerfile --build-arg BASE="$BELAY_IMAGE"
step done

echo "build_images: all images in $(( $(date +%s) - started ))s"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
    | grep -E 'belay-test/|belay:0\.1\.0-cpu|belay-reward-example' | sed 's/^/build_images:   /'
