#!/usr/bin/env bash
# Builds static chatd and chatctl on the host and the image around them.
# Needs no container registry: the image starts FROM scratch.
#
#   deploy/docker/build.sh            # image chatd:local
#   IMAGE=registry.example/chatd:1 deploy/docker/build.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

image=${IMAGE:-chatd:local}
target=x86_64-unknown-linux-gnu

# Which Compose runs here, told before a build of several minutes, not
# after: v2 is a docker plugin, v1.29 a program of its own.
if docker compose version >/dev/null 2>&1; then
    compose="docker compose"
elif command -v docker-compose >/dev/null 2>&1; then
    compose="docker-compose"
else
    compose=""
    echo "note: neither \`docker compose\` (v2) nor docker-compose (v1.29) is installed;" \
        "the image builds, but compose.yaml needs one (Debian: apt-get install docker-compose)" >&2
fi
# A static glibc executable: the binaries are pure Rust, so nothing needs
# dlopen. (Host names are resolved by glibc's NSS, which a static binary
# cannot load: give OTLP endpoints as IP addresses, see docs/OPERATIONS.md.)
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" -p chatd -p chatctl

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
for bin in chatd chatctl; do
    cp "target/$target/release/$bin" "$context/"
    # ldd says "statically linked" or "not a dynamic executable" for one.
    if ldd "$context/$bin" 2>&1 | grep -q '=>'; then
        echo "$bin is dynamically linked; the scratch image needs static binaries" >&2
        exit 1
    fi
    # Debug line tables stay in target/; the image gets the code only.
    if command -v strip >/dev/null; then strip "$context/$bin"; fi
done
cp config/chatd.toml "$context/chatd.toml"
mkdir "$context/empty"
cp deploy/docker/Dockerfile "$context/"
docker build --tag "$image" "$context"
echo "built $image"
if [ -n "$compose" ]; then
    echo "next: $compose up -d"
    echo "  (a cluster: deploy/docker/nats/build.sh, then $compose -f deploy/compose/cluster/compose.yaml up -d)"
fi
