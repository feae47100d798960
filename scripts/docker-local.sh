#!/bin/sh
# Builds the images of compose.yaml on a Debian machine that can reach a Debian mirror and
# PyPI but no container registry (README, "Containers"):
#   1. starts dockerd (--iptables=false --bridge=none) unless a daemon already answers;
#   2. edvit-base:bookworm, a bare Debian from debootstrap (once: skipped when it exists);
#   3. eclipse-mosquitto:2, a stand-in built from broker/Dockerfile, unless that tag exists;
#   4. edvit:local from the Dockerfile, FROM the base image (again on every run: cached).
# Then: `docker-compose up` (EDVIT_NODES=N for N nodes). Run it as root. Containers are the
# daemon's children: a dockerd this script starts keeps the script's priority, so
# `nice -n 19 scripts/docker-local.sh` keeps builds and the fleet off other work's CPU.
set -eu
cd "$(dirname "$0")/.."

BASE_IMAGE=${EDVIT_BASE_IMAGE:-edvit-base:bookworm}
BROKER_IMAGE=eclipse-mosquitto:2
IMAGE=edvit:local
DOCKERD_LOG=${EDVIT_DOCKERD_LOG:-/var/log/edvit-dockerd.log}
# The Debian mirror this machine's apt uses (deb.debian.org when none is found).
MIRROR=${EDVIT_DEBIAN_MIRROR:-$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -n 1 | tr -d ' ')}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if ! docker info >/dev/null 2>&1; then
    echo "starting dockerd (log: $DOCKERD_LOG)"
    # No iptables and no default bridge: what this kind of machine allows. Compose still
    # creates its own network for the fleet.
    nohup dockerd --iptables=false --bridge=none >"$DOCKERD_LOG" 2>&1 &
    tries=0
    until docker info >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -ge 60 ]; then
            echo "dockerd did not answer within 60 s; see $DOCKERD_LOG" >&2
            exit 1
        fi
        sleep 1
    done
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "building $BASE_IMAGE with debootstrap from $MIRROR"
    rootfs=$(mktemp -d /var/tmp/edvit-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { echo "debootstrap failed; see $rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # The CAs this host adds to Debian's (e.g. a TLS-inspecting proxy's): pip inside the
    # build trusts them once the Dockerfile installs ca-certificates.
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        mkdir -p "$rootfs/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        - "$BASE_IMAGE"
    rm -rf "$rootfs"
    trap - EXIT
fi

# docker-compose pulls only images it lacks: the stand-in is used only where the official
# image could not be pulled.
if ! docker image inspect "$BROKER_IMAGE" >/dev/null 2>&1; then
    echo "building $BROKER_IMAGE (Debian's mosquitto) from broker/Dockerfile"
    DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE="$BASE_IMAGE" \
        -t "$BROKER_IMAGE" broker
fi

# pip inside the build: PyPI, or this machine's index when it names one over the network.
set -- --build-arg BASE="$BASE_IMAGE"
for name in PIP_INDEX_URL PIP_DEFAULT_TIMEOUT; do
    value=$(printenv "$name" || true)
    [ -n "$value" ] && set -- "$@" --build-arg "$name=$value"
done
echo "building $IMAGE FROM $BASE_IMAGE"
DOCKER_BUILDKIT=0 docker build --network host "$@" -t "$IMAGE" .
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
    | grep -E "^($IMAGE|$BROKER_IMAGE|$BASE_IMAGE) " || true
