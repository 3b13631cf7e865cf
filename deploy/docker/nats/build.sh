#!/usr/bin/env bash
# Builds the nats-server image (chatd-nats:local) for the compose profile
# `cluster` from the host's nats-server (Debian: apt-get install
# nats-server) and the libraries `ldd` lists for it. Needs no container
# registry: the image starts FROM scratch.
#
#   deploy/docker/nats/build.sh            # image chatd-nats:local
#   IMAGE=registry.example/nats:2.9 deploy/docker/nats/build.sh
set -euo pipefail
cd "$(dirname "$0")"

image=${IMAGE:-chatd-nats:local}
bin=${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}
[ -x "$bin" ] || {
    echo "nats-server not found (apt-get install nats-server, or set NATS_SERVER)" >&2
    exit 1
}

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs/usr/sbin" "$context/empty"
cp "$bin" "$context/rootfs/usr/sbin/nats-server"
# Every library ldd lists, and the loader, at the path the binary asks for
# (symbolic links followed, so the image holds the files themselves).
# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
# "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
if [ -z "$libs" ]; then
    echo "ldd lists no library for $bin: is it really dynamically linked?" >&2
    ldd "$bin" >&2 || true
fi
for lib in $libs; do
    mkdir -p "$context/rootfs$(dirname "$lib")"
    cp -L "$lib" "$context/rootfs$lib"
done
cp Dockerfile "$context/"
docker build --tag "$image" "$context"
# It runs: the binary finds its libraries inside the image.
docker run --rm "$image" --version
echo "built $image"
