#!/usr/bin/env python3
"""Draws the failover demo (examples/failover_demo.rs): the client's
throughput across the failover, with the kill marked.

Usage: scripts/plot_demo.py [target/demo/failover.json [target/demo/failover.png]]

Top: what the client received per 100 ms over the whole stream. Bottom:
the failover up close, per 10 ms. Bars are coloured by the host whose
frames carried the stream on the LAN in that interval (primary, backup,
both; grey: neither, the client read what its socket buffer held). Red dashed line: the primary killed (SIGKILL); green dashed line:
the backup's first stream data on the LAN; shaded: the time the client
received nothing around the failover.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

PRIMARY = "tab:blue"
BACKUP = "tab:orange"
BOTH = "tab:purple"
NONE = "lightgray"


def colors(n, wp, wb):
    out = []
    for i in range(n):
        p = i < len(wp) and wp[i] > 0
        b = i < len(wb) and wb[i] > 0
        out.append(BOTH if p and b else PRIMARY if p else BACKUP if b else NONE)
    return out


def bars(ax, values, bin_s, wp, wb, lo=None, hi=None):
    idx = [i for i in range(len(values)) if (lo is None or (i + 1) * bin_s > lo) and (hi is None or i * bin_s < hi)]
    cs = colors(len(values), wp, wb)
    ax.bar([i * bin_s for i in idx], [values[i] for i in idx], width=bin_s, align="edge",
           color=[cs[i] for i in idx], edgecolor="white", linewidth=0.3)


def marks(ax, d, label):
    kill = d["kill_s"]
    ymax = ax.get_ylim()[1]
    ax.axvline(kill, color="red", linestyle="--", linewidth=1.5)
    fb = d.get("first_backup_data_s")
    if fb is not None:
        ax.axvline(fb, color="green", linestyle="--", linewidth=1.2)
    gap = d.get("client_gap_s")
    if gap:
        ax.axvspan(gap[0], gap[1], color="red", alpha=0.10)
    if label:
        ax.text(kill, ymax * 0.97, "primary killed  ", color="red", va="top", ha="right", fontsize=9)
        if fb is not None:
            ax.text(fb, ymax * 0.97, "  backup's first data (+%d ms)" % round((fb - kill) * 1000), color="green",
                    va="top", ha="left", fontsize=9)


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "target/demo/failover.json"
    out = sys.argv[2] if len(sys.argv) > 2 else "target/demo/failover.png"
    with open(src) as f:
        d = json.load(f)
    kill = d["kill_s"]
    fig, (top, bot) = plt.subplots(2, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [1, 1]})

    # The whole stream, per 100 ms.
    bin_s = d["bin_ms"] / 1000.0
    mbit = d["mbit"]
    bars(top, mbit, bin_s, d.get("wire_primary_mbit", []), d.get("wire_backup_mbit", []))
    top.set_ylim(0, max(max(mbit, default=1.0), 1.0) * 1.3)
    marks(top, d, True)
    top.set_xlabel("time since the client connected (s)")
    top.set_ylabel("Mbit/s per 100 ms")
    received_mib = d["received"] / (1 << 20)
    top.set_title(
        "remora failover: %.0f MiB from the guest to a client over TCP, primary killed mid-stream (%s output): %s"
        % (received_mib, d.get("output", "speculative"), "sha256 matches" if d["exact"] else "NOT EXACT"),
        fontsize=10,
    )
    top.legend(
        handles=[
            Patch(color=PRIMARY, label="sent by the primary host"),
            Patch(color=BACKUP, label="sent by the backup host"),
            Patch(color=BOTH, label="both (the failover)"),
            Patch(color=NONE, label="neither: read from the client's socket buffer"),
        ],
        loc="upper left",
        fontsize=8,
    )
    top.grid(axis="y", alpha=0.3)

    # The failover up close, per 10 ms.
    fine = d.get("fine_mbit") or []
    fs = d.get("fine_ms", 10) / 1000.0
    end = d.get("first_backup_data_s") or kill
    gap = d.get("client_gap_s")
    if gap:
        end = max(end, gap[1])
    lo, hi = kill - 0.25, end + 0.3
    bars(bot, fine, fs, d.get("wire_primary_fine_mbit", []), d.get("wire_backup_fine_mbit", []), lo, hi)
    shown = [fine[i] for i in range(len(fine)) if lo < (i + 1) * fs and i * fs < hi]
    bot.set_ylim(0, max(max(shown, default=1.0), 1.0) * 1.15)
    bot.set_xlim(lo, hi)
    marks(bot, d, True)
    bot.set_xlabel("time since the client connected (s)")
    bot.set_ylabel("Mbit/s per 10 ms")
    lines = []
    if gap:
        lines.append("client: received nothing for %d ms; the stream resumed %d ms after the kill"
                     % (round((gap[1] - gap[0]) * 1000), round((gap[1] - kill) * 1000)))
    if d.get("failover"):
        lines.append(d["failover"].replace("remora backup: failover: ", "backup: "))
    bot.set_title("\n".join(["the failover, per 10 ms"] + lines), fontsize=9)
    bot.grid(axis="y", alpha=0.3)

    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("plot: %s" % out)


if __name__ == "__main__":
    main()
