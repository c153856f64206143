#!/usr/bin/env python3
"""Draws the relay benchmark (benches/relay.rs): goodput vs epoch length.

Usage: scripts/plot_relay.py [target/bench/relay.json [target/bench/relay.png]]

One panel per link setting (columns) and flow count (rows: 1 flow, 8
flows); in each, a line per mode (direct is epoch-independent and drawn
flat), one line style per congestion control.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = [("direct", "tab:gray"), ("buffered", "tab:red"), ("speculative", "tab:blue")]
STYLES = ["-", "--", ":", "-."]
MARKERS = {"direct": None, "buffered": "s", "speculative": "o"}


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "target/bench/relay.json"
    out = sys.argv[2] if len(sys.argv) > 2 else "target/bench/relay.png"
    with open(src) as f:
        bench = json.load(f)
    rows = bench["rows"]
    links = bench["links"]
    flows = bench["flows"]
    epochs = bench["epochs_ms"]
    ccs = bench["cc"]

    fig, axes = plt.subplots(
        len(flows), len(links), figsize=(4.2 * len(links), 3.6 * len(flows)), squeeze=False, sharex=True
    )
    for r, nflows in enumerate(flows):
        for c, link in enumerate(links):
            ax = axes[r][c]
            for k, cc in enumerate(ccs):
                style = STYLES[k % len(STYLES)]
                for mode, color in MODES:
                    pts = [
                        x
                        for x in rows
                        if x["cc"] == cc and x["link"] == link["name"] and x["flows"] == nflows and x["mode"] == mode
                    ]
                    if not pts:
                        continue
                    if mode == "direct":
                        xs, ys = [epochs[0], epochs[-1]], [pts[0]["gbps"]] * 2
                    else:
                        pts.sort(key=lambda x: x["epoch_ms"])
                        xs = [x["epoch_ms"] for x in pts]
                        ys = [x["gbps"] for x in pts]
                    label = f"{mode} ({cc})" if len(ccs) > 1 else mode
                    ax.plot(xs, ys, style, color=color, marker=MARKERS[mode], label=label)
            ax.set_title(f"{link['desc']}\n{nflows} flow{'s' if nflows > 1 else ''}", fontsize=9)
            ax.set_xticks(epochs)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if r == len(flows) - 1:
                ax.set_xlabel("epoch (ms), commit delay %s ms" % bench.get("commit_delay_ms", "?"))
            if c == 0:
                ax.set_ylabel("goodput server -> client (Gbit/s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(
        "remora relay: TCP goodput inner -> outer vs epoch length "
        f"({bench['run_s']:.1f} s runs, first {bench['skip_s']:.1f} s skipped)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
