#!/usr/bin/env python3
"""Soak load for chatd (run through scripts/soak.sh, which starts the daemon).

Healthy clients stay in one room for the whole run, talk slowly and read
everything; churning clients connect, chat, change rooms, rename, send
private messages and quit, and some of them never read. Every 10 s the
daemon's RSS, descriptors, threads and CPU go into a CSV; every minute it
gets a SIGHUP; every 10 s an admin call. At the end the run checks that
every line a healthy client sent reached every other healthy member of its
room, that no panic was logged, and that memory and descriptors stayed flat
after warm-up.

Traffic goes to loopback only, and everything stops by itself.
"""

import asyncio
import csv
import os
import random
import signal
import subprocess
import sys
import time

CHAT_HOST, CHAT_PORT = sys.argv[1].rsplit(":", 1)
PID = int(sys.argv[2])
MINUTES = float(sys.argv[3])
OUT = sys.argv[4]  # CSV path
CHATCTL = sys.argv[5]
LOG = sys.argv[6]  # the daemon's log file, scanned for panics

ROOMS = 25
HEALTHY_PER_ROOM = 20  # 500 healthy clients
CHURNERS = 1500  # concurrent churning clients
SEND_EVERY = 10.0  # seconds between a healthy client's lines
WARMUP = 120.0

rng = random.Random(9)
deadline = time.monotonic() + MINUTES * 60
sent = {}  # (room, nick) -> lines sent
received = {}  # (room, receiver nick) -> {sender nick: count}
members = {}  # room -> [nicks]
counters = {"churn_sessions": 0, "churn_errors": 0, "healthy_errors": 0}


async def connect():
    r, w = await asyncio.wait_for(asyncio.open_connection(CHAT_HOST, int(CHAT_PORT)), 10)
    return r, w


async def read_until(r, needle, limit=10):
    end = time.monotonic() + limit
    while True:
        line = await asyncio.wait_for(r.readline(), max(0.1, end - time.monotonic()))
        if not line:
            raise ConnectionError("eof")
        if needle in line:
            return line


async def healthy(room, i, ready):
    nick = f"h{room}x{i}"
    r, w = await connect()
    await read_until(r, b"You are now in")
    w.write(f"/nick {nick}\n/join soak{room}\n".encode())
    await w.drain()
    await read_until(r, f"You are now in soak{room}".encode())
    counts = received.setdefault((room, nick), {})
    members.setdefault(room, []).append(nick)
    sent[(room, nick)] = 0
    ready.set()

    async def reader():
        while True:
            line = await r.readline()
            if not line:
                counters["healthy_errors"] += 1
                return
            if line.startswith(b"<h") and b"> soak " in line:
                sender = line[1:line.index(b">")].decode()
                counts[sender] = counts.get(sender, 0) + 1

    task = asyncio.create_task(reader())
    await start_gate.wait()
    await asyncio.sleep(rng.random() * SEND_EVERY)
    while time.monotonic() < deadline:
        sent[(room, nick)] += 1
        w.write(f"soak {sent[(room, nick)]} from {nick}\n".encode())
        await w.drain()
        await asyncio.sleep(SEND_EVERY)
    await done_gate.wait()
    task.cancel()
    w.write(b"/quit soak over\n")
    try:
        await w.drain()
        w.close()
    except ConnectionError:
        pass


async def churner(k):
    while time.monotonic() < deadline - 5:
        reads = rng.random() > 0.1  # one in ten never reads
        try:
            r, w = await connect()
            drain = None
            if reads:
                async def sink():
                    while await r.read(65536):
                        pass
                drain = asyncio.create_task(sink())
            counters["churn_sessions"] += 1
            for _ in range(rng.randint(1, 6)):
                action = rng.random()
                if action < 0.4:
                    w.write(f"churn chatter {rng.random()}\n".encode())
                elif action < 0.6:
                    w.write(f"/join soak{rng.randrange(ROOMS)}\n".encode())
                elif action < 0.75:
                    w.write(f"/nick c{k}n{rng.randrange(1000)}\n".encode())
                elif action < 0.9:
                    w.write(f"/msg h{rng.randrange(ROOMS)}x0 private hello\n".encode())
                else:
                    w.write(b"/me churns\n")
                await w.drain()
                await asyncio.sleep(rng.uniform(0.5, 5))
            if rng.random() < 0.7:
                w.write(b"/quit bye\n")
                await w.drain()
            w.close()
            if drain:
                drain.cancel()
        except (ConnectionError, asyncio.TimeoutError, OSError):
            counters["churn_errors"] += 1
            await asyncio.sleep(1)
        await asyncio.sleep(rng.uniform(0, 2))


def sample_proc():
    with open(f"/proc/{PID}/status") as f:
        status = dict(l.split(":", 1) for l in f if ":" in l)
    rss = int(status["VmRSS"].split()[0])
    threads = int(status["Threads"])
    fds = len(os.listdir(f"/proc/{PID}/fd"))
    with open(f"/proc/{PID}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu_ticks = int(fields[11]) + int(fields[12])
    return rss, fds, threads, cpu_ticks


async def sampler(rows):
    hz = os.sysconf("SC_CLK_TCK")
    start = time.monotonic()
    last_t, last_cpu = start, sample_proc()[3]
    next_hup = start + 60
    while time.monotonic() < deadline + 10:
        await asyncio.sleep(10)
        now = time.monotonic()
        rss, fds, threads, cpu = sample_proc()
        cpu_pct = 100.0 * (cpu - last_cpu) / hz / (now - last_t)
        last_t, last_cpu = now, cpu
        rows.append([round(now - start), rss, fds, threads, round(cpu_pct, 1), counters["churn_sessions"]])
        print(f"t={rows[-1][0]}s rss={rss}KiB fds={fds} threads={threads} cpu={cpu_pct:.0f}% sessions={counters['churn_sessions']}", flush=True)
        # An admin call every sample, a reload every minute.
        await asyncio.create_subprocess_exec(CHATCTL, "stats", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if now >= next_hup:
            os.kill(PID, signal.SIGHUP)
            next_hup += 60


async def main():
    global start_gate, done_gate
    start_gate, done_gate = asyncio.Event(), asyncio.Event()
    readies = []
    tasks = []
    for room in range(ROOMS):
        for i in range(HEALTHY_PER_ROOM):
            ready = asyncio.Event()
            readies.append(ready)
            tasks.append(asyncio.create_task(healthy(room, i, ready)))
            await asyncio.sleep(0.005)
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
    start_gate.set()
    rows = []
    samp = asyncio.create_task(sampler(rows))
    churn = [asyncio.create_task(churner(k)) for k in range(CHURNERS)]
    await asyncio.gather(*churn)
    # Let the last healthy lines arrive, then count.
    await asyncio.sleep(10)
    done_gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await samp

    with open(OUT, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["t_s", "rss_kib", "fds", "threads", "cpu_pct", "churn_sessions"])
        out.writerows(rows)

    expected = delivered = 0
    for (room, receiver), counts in received.items():
        for sender in members[room]:
            if sender != receiver:
                expected += sent[(room, sender)]
                delivered += min(counts.get(sender, 0), sent[(room, sender)])
    with open(LOG, errors="replace") as f:
        panics = sum("panicked" in l for l in f)
    warm = [r for r in rows if r[0] >= WARMUP] or rows
    rss0, rss1 = warm[0][1], max(r[1] for r in warm)
    fds_w = [r[2] for r in warm]
    print(f"healthy lines: {sum(sent.values())} sent, {delivered} of {expected} deliveries arrived")
    print(f"churn sessions: {counters['churn_sessions']}, churn errors: {counters['churn_errors']}, healthy cut: {counters['healthy_errors']}")
    print(f"after warm-up: RSS {rss0} → max {rss1} KiB, fds {min(fds_w)}..{max(fds_w)}; panics: {panics}")
    ok = True
    if delivered != expected or counters["healthy_errors"]:
        print("FAIL: a healthy client missed a line or was cut"); ok = False
    if panics:
        print("FAIL: the daemon panicked"); ok = False
    if rss1 > rss0 * 1.25 + 8192:
        print("FAIL: memory grew after warm-up"); ok = False
    if max(fds_w) > (CHURNERS + ROOMS * HEALTHY_PER_ROOM) + 100:
        print("FAIL: descriptors beyond the clients connected"); ok = False
    sys.exit(0 if ok else 1)


asyncio.run(main())
