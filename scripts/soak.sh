#!/usr/bin/env bash
# Soak test: scripts/soak.sh MINUTES — not part of the default test command.
#
# Starts a release chatd on loopback, runs scripts/soak.py against it (500
# healthy clients that stay and read everything, 1,500 churning ones, admin
# calls, a SIGHUP every minute), samples the daemon every 10 s into
# docs/reliability/soak.csv and draws docs/reliability/soak.png. Exits
# non-zero if a healthy client missed a line, the daemon panicked, or memory
# or descriptors grew after warm-up. Runs under nice so the machine stays
# usable. Needs python3 with matplotlib (Debian: python3-matplotlib).
# SOAK_PROFILE=debug uses the debug build instead of a release one.
set -euo pipefail

minutes=${1:?usage: scripts/soak.sh MINUTES}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
profile=${SOAK_PROFILE:-release}
if [ "$profile" = release ]; then
    nice -n 10 cargo build --release -p chatd -p chatctl
    bin=target/release
else
    nice -n 10 cargo build -p chatd -p chatctl
    bin=target/debug
fi
python=/usr/bin/python3
out=docs/reliability
mkdir -p "$out"
work=$(mktemp -d)
chatd_pid=
cleanup() {
    [ -n "$chatd_pid" ] && kill "$chatd_pid" 2>/dev/null && wait "$chatd_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# 20,000 descriptors per process: the load generator holds ~2,000 sockets,
# the daemon as many.
ulimit -n 20000
port=$($python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUNTIME_DIRECTORY="$work/run" CHATD_SERVER__STATE_DIR="$work/state" \
CHATD_CHAT__LISTEN="127.0.0.1:$port" CHATD_UDP__ENABLED=false \
CHATD_ADMIN__LISTEN="127.0.0.1:0" CHATD_ADMIN__SOCKET="$work/run/admin.sock" \
CHATD_LIMITS__MAX_CLIENTS_PER_IP=5000 CHATD_LIMITS__CONNECT_RATE_PER_IP=0 \
CHATD_LOG__LEVEL=warn \
    nice -n 10 "$bin/chatd" 2>"$work/chatd.log" &
chatd_pid=$!
for _ in $(seq 100); do
    $python -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null && break
    sleep 0.1
done

status=0
CHATCTL_ENDPOINT="unix:$work/run/admin.sock" RUNTIME_DIRECTORY="$work/run" \
    nice -n 10 $python scripts/soak.py "127.0.0.1:$port" "$chatd_pid" "$minutes" \
    "$out/soak.csv" "$bin/chatctl" "$work/chatd.log" | tee "$out/soak.txt" || status=$?
$python scripts/soak_plot.py "$out/soak.csv" "$out/soak.png"
exit "$status"
