#!/usr/bin/env python3
"""The median and spread of several scripts/bench-nbd.sh runs: reads the
JSON each run wrote (--json-out) and prints, per workload, each run's hlfs /
best-other ratio, their median and range, and the same for the server CPU
per I/O (hlfs / qemu-nbd) and hlfs's peak RSS. Markdown on stdout.

Usage: bench_nbd_median.py RUN.json RUN.json ...
Only the Python standard library is used.
"""

import json
import statistics
import sys


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def main(paths):
    if not paths or paths[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    runs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    first = runs[0]
    out = [f"### Median of {len(runs)} runs", "", "```sh"]
    out += [r["params"].get("invocation", "scripts/bench-nbd.sh") for r in runs[:1]]
    out += ["```", "", f"Commit `{first['params'].get('commit', '?')}`.", ""]
    out.append("| workload | target | hlfs / best other, each run | median | range | met |")
    out.append("|---|---|---|---|---|---|")
    for i, ratio in enumerate(first["ratios"]):
        values = [r["ratios"][i]["ratio"] for r in runs]
        known = [v for v in values if v is not None]
        med = statistics.median(known) if known else None
        spread = f"{min(known):.2f}–{max(known):.2f}" if known else "-"
        met = "n/a" if med is None else ("met" if med >= ratio["target"] else "**missed**")
        each = ", ".join(fmt(v) for v in values)
        out.append(f"| {ratio['label']} | ≥ {ratio['target']} | {each} | {fmt(med)} | {spread} | {met} |")
    out.append("")
    out.append("| workload | hlfs CPU / qemu-nbd CPU per I/O, each run | median | met (≤ 1.0) | hlfs peak RSS MiB, median |")
    out.append("|---|---|---|---|---|")
    for i, cpu in enumerate(first.get("cpu_ratios", [])):
        values = [r["cpu_ratios"][i]["ratio"] for r in runs if "cpu_ratios" in r]
        known = [v for v in values if v is not None]
        med = statistics.median(known) if known else None
        met = "n/a" if med is None else ("met" if med <= 1.0 else "**missed**")
        rss = [
            run["server_rss_peak_mib"]
            for r in runs
            for run in r["runs"]
            if run["server"] == "hlfs" and run["workload"] == cpu["workload"]
            and run.get("server_rss_peak_mib") is not None
        ]
        rss_med = statistics.median(rss) if rss else None
        out.append(f"| {cpu['label']} | {', '.join(fmt(v) for v in values)} | {fmt(med)} | {met} | {fmt(rss_med, 0)} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
