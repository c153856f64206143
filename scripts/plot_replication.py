#!/usr/bin/env python3
"""Draws the replication benchmark (benches/replication.rs).

Usage: scripts/plot_replication.py [target/bench/replication.json [target/bench/replication.png]]

Top row: TCP throughput vs epoch length, one panel per link and direction,
a line per output mode (unprotected is epoch-independent and drawn flat),
the runs as dots behind the medians. Bottom row: request/response latency
(p50 and p99 per mode and epoch), checkpoint pauses under TCP streams (CDF
of every sampled pause, the 2 ms target marked), failover (kill -> data
again per trial, with the backup's detect + restore), and memory (RSS of
primary and backup against guest RAM) beside unprotected remora vs QEMU.
Empty panels say what was not run.
"""
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = [("unprotected", "tab:gray"), ("buffered", "tab:red"), ("speculative", "tab:blue")]
MARKERS = {"unprotected": None, "buffered": "s", "speculative": "o"}
DIRS = [("guest_to_client", "guest -> client"), ("client_to_guest", "client -> guest")]


def finite(xs):
    return [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]


def median(xs):
    """Nearest-rank median, as the benchmark computes it."""
    xs = sorted(finite(xs))
    if not xs:
        return None
    return xs[math.ceil(len(xs) / 2) - 1]


def nothing(ax, what):
    ax.text(0.5, 0.5, f"{what}: not run", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def throughput(axes, bench):
    rows = bench.get("throughput", [])
    epochs = bench["epochs_ms"]
    links = bench["links"]
    panels = [(link, d) for link in links for d in DIRS]
    for ax, (link, (key, label)) in zip(axes, panels):
        ax.set_title(f"{label}\n{link['desc']}", fontsize=9)
        if not rows:
            nothing(ax, "throughput")
            continue
        for mode, color in MODES:
            pts = [r for r in rows if r["mode"] == mode]
            if not pts:
                continue
            if mode == "unprotected":
                cell = pts[0][link["name"]]
                y = cell[f"{key}_gbps"]
                if y is not None:
                    ax.plot([epochs[0], epochs[-1]], [y, y], "-", color=color, label=mode)
                    runs = finite(cell[f"{key}_runs"])
                    ax.scatter([epochs[0]] * len(runs), runs, color=color, alpha=0.3, s=10)
                continue
            pts.sort(key=lambda r: r["epoch_ms"])
            xs = [r["epoch_ms"] for r in pts]
            ys = [r[link["name"]][f"{key}_gbps"] for r in pts]
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], "-", color=color, marker=MARKERS[mode],
                    label=mode)
            for r in pts:
                runs = finite(r[link["name"]][f"{key}_runs"])
                ax.scatter([r["epoch_ms"]] * len(runs), runs, color=color, alpha=0.3, s=10)
        ax.set_xticks(epochs)
        ax.set_xlabel("epoch (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("Gbit/s (median of runs; dots: runs)")


def round_trips(ax, bench):
    rows = [r for r in bench.get("throughput", []) if r["rr_us"]["samples"] > 0]
    ax.set_title("64-byte request/response (unshaped LAN)", fontsize=9)
    if not rows:
        nothing(ax, "round trips")
        return
    labels, p50, p99, colors = [], [], [], []
    for r in rows:
        labels.append(r["mode"][:4] + ("" if r["epoch_ms"] is None else f"\n{r['epoch_ms']}ms"))
        p50.append((r["rr_us"]["p50"] or 0) / 1000)
        p99.append((r["rr_us"]["p99"] or 0) / 1000)
        colors.append(dict(MODES)[r["mode"]])
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, color=colors, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, color=colors, alpha=0.45, hatch="//", label="p99")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("round trip (ms)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def pauses(ax, bench):
    runs = bench.get("load", {}).get("protected", [])
    ax.set_title(f"checkpoint pause under TCP streams\n(speculative, {bench['target_epoch_ms']} ms epochs)", fontsize=9)
    samples = sorted(p for r in runs for p in finite(r["pauses_us"]))
    if not samples:
        nothing(ax, "pauses")
        return
    ys = [(i + 1) / len(samples) for i in range(len(samples))]
    ax.plot([s / 1000 for s in samples], ys, color="tab:blue")
    ax.axvline(2.0, color="tab:red", linestyle="--", label="target p99 2 ms")
    ax.axhline(0.99, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("pause (ms), log")
    ax.set_ylabel("fraction of checkpoints")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.3)


def failover(ax, bench):
    fo = bench.get("failover", {})
    runs = fo.get("runs", [])
    ax.set_title(
        f"failover: {fo.get('trials', 0)} kills, {fo.get('failed', 0)} failed; "
        f"{fo.get('lost_before_kill', 0)} trials lost protection before the kill",
        fontsize=9,
    )
    if not runs:
        nothing(ax, "failover")
        return
    xs = range(1, len(runs) + 1)
    ax.bar(xs, [r["resume_ms"] or 0 for r in runs], color="tab:blue", alpha=0.6, label="kill -> data at the client")
    ax.plot(xs, [r.get("first_frame_ms") or 0 for r in runs], "bx", label="backup host's first stream frame")
    ax.plot(xs, [(r["detect_ms"] or 0) + (r["restore_ms"] or 0) for r in runs], "k.", label="backup: detect + restore")
    ax.axhline(300, color="tab:red", linestyle="--", label="target p50 300 ms")
    m = median([r["resume_ms"] for r in runs])
    if m is not None:
        ax.axhline(m, color="tab:blue", linestyle=":", label=f"p50 {m:.0f} ms")
    ax.set_xlabel("trial")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def memory_and_qemu(ax, bench):
    mem = bench.get("memory", {}).get("runs", [])
    q = bench.get("qemu", {})
    ax.set_title("memory (mem:400) and remora vs QEMU", fontsize=9)
    if not mem and q.get("remora_gbps") is None:
        nothing(ax, "memory, QEMU")
        return
    guest = bench["mem_mib"]
    if mem:
        vals = [
            ("guest RAM", guest),
            ("primary\nRSS", median([m["primary_hwm_kib"] for m in mem]) / 1024),
            ("backup\nRSS", median([m["backup_hwm_kib"] for m in mem]) / 1024),
        ]
        ax.bar(range(3), [v for _, v in vals], color=["tab:gray", "tab:blue", "tab:green"])
        ax.set_xticks(range(3))
        ax.set_xticklabels([n for n, _ in vals], fontsize=7)
        ax.set_ylabel("MiB (VmHWM, median)")
        ax.axhline(1.1 * guest, color="tab:red", linestyle=":", linewidth=0.8, label="1.1x guest RAM")
        ax.legend(fontsize=7, loc="upper left")
    if q.get("remora_gbps") is not None:
        ax2 = ax.twinx() if mem else ax
        ax2.bar([3.6, 4.4], [q["remora_gbps"], q["qemu_gbps"] or 0], 0.7, color=["tab:gray", "tab:orange"])
        ax2.set_ylabel(f"Gbit/s, {q['mib']} MiB guest -> client")
        ticks = list(ax.get_xticks()) + [3.6, 4.4]
        labels = [t.get_text() for t in ax.get_xticklabels()] + ["remora\nunprot.", "QEMU"]
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=7)


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "target/bench/replication.json"
    out = sys.argv[2] if len(sys.argv) > 2 else "target/bench/replication.png"
    with open(src) as f:
        bench = json.load(f)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    throughput(axes[0], bench)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(handles, labels, fontsize=7)
    round_trips(axes[1][0], bench)
    pauses(axes[1][1], bench)
    failover(axes[1][2], bench)
    memory_and_qemu(axes[1][3], bench)
    fig.suptitle(
        f"remora replication: test guest, {bench['vcpus']} vCPUs, {bench['mem_mib']} MiB; "
        f"throughput {bench['run_s']:.1f} s runs (first {bench['skip_s']:.1f} s skipped), medians of {bench['runs']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
