#!/usr/bin/env python3
"""Draws the soak CSV: scripts/soak_plot.py CSV PNG."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = list(csv.DictReader(open(sys.argv[1])))
t = [int(r["t_s"]) / 60 for r in rows]
fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
for ax, key, label in zip(
    axes,
    ["rss_kib", "fds", "threads", "cpu_pct"],
    ["RSS (MiB)", "open descriptors", "threads", "CPU (% of one core)"],
):
    values = [float(r[key]) / (1024 if key == "rss_kib" else 1) for r in rows]
    ax.plot(t, values)
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
axes[-1].set_xlabel("minutes")
fig.suptitle("chatd soak: 500 healthy + 1,500 churning clients, SIGHUP every minute")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=80)
