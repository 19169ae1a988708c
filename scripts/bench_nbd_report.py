#!/usr/bin/env python3
"""Summarises a scripts/bench-nbd.sh run: reads the fio JSON files and the
server CPU samples the script left in its results directory, prints a plain
table and the hlfs-vs-best-other ratios to stderr, a Markdown report to stdout
(ready for docs/BENCHMARKS.md), and optionally writes everything as JSON.

Usage (normally called by bench-nbd.sh, not by hand):
    bench_nbd_report.py RESULTS_DIR [--json-out FILE]

RESULTS_DIR holds:
    params.json   run parameters written by the script
    machine.txt   the machine note
    servers.tsv   server  status  note  command          (one line per server)
    runs.tsv      server  workload  status  cpu_s  wall_s  rss_kib  disk_kib  fio_json
Only the Python standard library is used.
"""

import json
import os
import sys

# Workload order, labels, the headline metric and the hlfs target ratio
# (hlfs / best of the other servers, higher is better).
WORKLOADS = [
    ("randwrite", "rand-write 4 KiB, QD 32", "iops", 1.2),
    ("randread", "rand-read 4 KiB, QD 32", "iops", 0.9),
    ("seqwrite", "seq-write 1 MiB, QD 8", "mbps", 0.9),
    ("seqread", "seq-read 1 MiB, QD 8", "mbps", 0.9),
    ("randwrite-fsync", "rand-write 4 KiB + fsync each, 8 jobs x QD 1", "iops", 2.0),
]
PRECONDITION = ("precondition", "precondition: seq-write 1 MiB over the whole export", "mbps", None)
SERVERS = ["hlfs", "qemu-nbd", "nbdkit"]
UNIT = {"iops": "IOPS", "mbps": "MB/s"}


def read_tsv(path):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                rows.append(line.split("\t"))
    return rows


def load_fio(path):
    """fio JSON, tolerating text fio may print before the object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in " + path)
    return json.JSONDecoder().raw_decode(text[start:])[0]


def pct(lat, p):
    """Percentile p (e.g. '99.000000') of a fio *_ns block, in µs."""
    v = (lat or {}).get("percentile", {}).get(p)
    return None if v is None else v / 1000.0


def fio_metrics(path):
    d = load_fio(path)
    jobs = d.get("jobs", [])
    if not jobs:
        raise ValueError("no jobs in " + path)
    j = jobs[0]  # group_reporting: one aggregated job
    rd, wr = j.get("read", {}), j.get("write", {})
    side = wr if wr.get("total_ios", 0) >= rd.get("total_ios", 0) else rd
    m = {
        "direction": "write" if side is wr else "read",
        "iops": side.get("iops", 0.0),
        "mbps": side.get("bw_bytes", 0) / 1e6,
        "ios": side.get("total_ios", 0),
        "p50_us": pct(side.get("clat_ns"), "50.000000"),
        "p99_us": pct(side.get("clat_ns"), "99.000000"),
        "p999_us": pct(side.get("clat_ns"), "99.900000"),
        "fio_errors": j.get("error", 0),
        "fio_client_cpu_pct": (j.get("usr_cpu", 0.0) + j.get("sys_cpu", 0.0)),
    }
    sync = j.get("sync", {})
    if sync.get("total_ios", 0):
        m["syncs"] = sync.get("total_ios")
        m["sync_p99_us"] = pct(sync.get("lat_ns"), "99.000000")
    return m


def fnum(v, digits=0):
    """1234567.8 -> '1 234 568' (the style of docs/BENCHMARKS.md)."""
    if v is None:
        return "-"
    if digits:
        return f"{v:,.{digits}f}".replace(",", " ")
    return f"{v:,.0f}".replace(",", " ")


def headline(m, metric):
    if m is None:
        return None
    return m.get(metric)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    res = argv[1]
    json_out = None
    if len(argv) >= 4 and argv[2] == "--json-out":
        json_out = argv[3]

    with open(os.path.join(res, "params.json"), encoding="utf-8") as f:
        params = json.load(f)
    machine = ""
    mpath = os.path.join(res, "machine.txt")
    if os.path.exists(mpath):
        with open(mpath, encoding="utf-8", errors="replace") as f:
            machine = f.read()

    servers = {}
    for row in read_tsv(os.path.join(res, "servers.tsv")):
        row += [""] * (4 - len(row))
        servers[row[0]] = {"status": row[1], "note": row[2], "command": row[3]}

    runs = {}  # (server, workload) -> dict
    for row in read_tsv(os.path.join(res, "runs.tsv")):
        row += [""] * (8 - len(row))
        srv, wl, status, cpu_s, wall_s, rss_kib, disk_kib, fio_json = row[:8]
        r = {
            "status": status,
            "server_cpu_s": float(cpu_s) if cpu_s else None,
            "wall_s": float(wall_s) if wall_s else None,
            "server_rss_peak_mib": int(rss_kib) / 1024 if rss_kib else None,
            "disk_used_mib": int(disk_kib) / 1024 if disk_kib else None,
        }
        if r["server_cpu_s"] is not None and r["wall_s"]:
            r["server_cpu_cores"] = r["server_cpu_s"] / r["wall_s"]
        if status == "ok":
            try:
                r.update(fio_metrics(os.path.join(res, fio_json)))
                if r.get("fio_errors"):
                    r["status"] = "fio-error"
            except (OSError, ValueError) as e:
                r["status"] = "bad-json"
                r["note"] = str(e)
        if r.get("iops") and r.get("server_cpu_cores") is not None:
            r["server_cpu_us_per_op"] = r["server_cpu_cores"] / r["iops"] * 1e6
            r["server_cpu_s_per_100k_io"] = r["server_cpu_cores"] / r["iops"] * 1e5
        if r.get("mbps") and r.get("server_cpu_cores") is not None:
            r["server_cpu_s_per_gib"] = r["server_cpu_cores"] / (r["mbps"] * 1e6 / 2**30)
        runs[(srv, wl)] = r

    order = [s for s in SERVERS if s in servers] + [s for s in servers if s not in SERVERS]

    def ok(srv, wl):
        r = runs.get((srv, wl))
        return r if r and r["status"] == "ok" else None

    # Ratios: hlfs / best of the others.
    ratios = []
    for wl, label, metric, target in WORKLOADS:
        h = headline(ok("hlfs", wl), metric)
        others = [(s, headline(ok(s, wl), metric)) for s in order if s != "hlfs"]
        others = [(s, v) for s, v in others if v]
        best = max(others, key=lambda sv: sv[1]) if others else None
        ratio = h / best[1] if (h is not None and best) else None
        ratios.append({
            "workload": wl,
            "label": label,
            "metric": UNIT[metric],
            "hlfs": h,
            "best_other": best[0] if best else None,
            "best_other_value": best[1] if best else None,
            "ratio": ratio,
            "target": target,
            "met": None if ratio is None else ratio >= target,
        })

    # CPU per I/O: hlfs / qemu-nbd (lower is better; the target is <= 1).
    cpu_ratios = []
    for wl, label, _metric, _target in WORKLOADS:
        h, q = ok("hlfs", wl), ok("qemu-nbd", wl)
        hv = h.get("server_cpu_us_per_op") if h else None
        qv = q.get("server_cpu_us_per_op") if q else None
        ratio = hv / qv if (hv and qv) else None
        cpu_ratios.append({"workload": wl, "label": label, "hlfs_us_per_op": hv,
                           "qemu_nbd_us_per_op": qv, "ratio": ratio,
                           "met": None if ratio is None else ratio <= 1.0})

    # ---- plain table (stderr) ----
    err = sys.stderr
    print("", file=err)
    print("== results (server CPU = utime+stime of the server process over the whole fio run, ramp included) ==", file=err)
    hdr = f"{'workload':<17} {'server':<9} {'IOPS':>10} {'MB/s':>9} {'p50 us':>9} {'p99 us':>10} {'CPU s':>7} {'cores':>6} {'CPU us/op':>9}  status"
    print(hdr, file=err)
    print("-" * len(hdr), file=err)
    for wl, _label, _metric, _t in [PRECONDITION] + WORKLOADS:
        for srv in order:
            r = runs.get((srv, wl))
            if r is None:
                continue
            print(f"{wl:<17} {srv:<9} {fnum(r.get('iops')):>10} {fnum(r.get('mbps'), 1):>9} "
                  f"{fnum(r.get('p50_us')):>9} {fnum(r.get('p99_us')):>10} "
                  f"{fnum(r.get('server_cpu_s'), 2):>7} {fnum(r.get('server_cpu_cores'), 2):>6} "
                  f"{fnum(r.get('server_cpu_us_per_op'), 1):>9}  {r['status']}"
                  + (f" (fsync p99 {fnum(r.get('sync_p99_us'))} us)" if r.get("sync_p99_us") else ""), file=err)
    for srv in order:
        s = servers[srv]
        if s["status"] != "ok":
            print(f"{'':<17} {srv:<9} {s['status'].upper()}: {s['note']}", file=err)
    print("", file=err)
    print("== hlfs / best of the others (higher is better) ==", file=err)
    for r in ratios:
        verdict = "n/a" if r["met"] is None else ("met" if r["met"] else "MISSED")
        rv = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        bo = f"{r['best_other']} {fnum(r['best_other_value'], 1 if r['metric'] == 'MB/s' else 0)}" if r["best_other"] else "-"
        print(f"  {r['label']:<46} {r['metric']:<5} hlfs {fnum(r['hlfs'], 1 if r['metric'] == 'MB/s' else 0):>10}"
              f"  best other {bo:<20} ratio {rv:>5}  target >= {r['target']}: {verdict}", file=err)
    print("", file=err)

    # ---- Markdown (stdout) ----
    out = []
    p = params
    out.append(f"### NBD servers under fio (`ioengine=nbd`), {p.get('date', '')}")
    out.append("")
    out.append("```sh")
    out.append(p.get("invocation", "scripts/bench-nbd.sh"))
    out.append("```")
    out.append("")
    out.append(f"Commit `{p.get('commit', '?')}`; {p.get('cpus', '?')} CPUs ({p.get('cpu_model', '?')}), "
               f"{p.get('mem', '?')} RAM, Linux {p.get('kernel', '?')}; export {p.get('size_human', '?')} "
               f"in `{p.get('dir', '?')}` ({p.get('fs', '?')}); {p.get('runtime', '?')} s per workload after "
               f"{p.get('ramp', '?')} s ramp; each export written sequentially once before the workloads.")
    out.append("")
    for srv in order:
        s = servers[srv]
        cmd = s["command"] or "-"
        out.append(f"- **{srv}**: `{cmd}`" + ("" if s["status"] == "ok" else f" — **{s['status']}**: {s['note']}"))
    out.append("")
    out.append("| workload | server | IOPS | MB/s | p50 µs | p99 µs | server CPU s | CPU s / GiB | CPU s / 100K I/O | peak RSS MiB |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for wl, label, _metric, _t in WORKLOADS:
        for srv in order:
            r = runs.get((srv, wl))
            if r is None:
                continue
            if r["status"] != "ok":
                out.append(f"| {label} | {srv} | {r['status']} | | | | | | | |")
                continue
            p99 = fnum(r.get("p99_us"))
            if r.get("sync_p99_us") is not None:
                p99 += f" (fsync {fnum(r['sync_p99_us'])})"
            out.append(f"| {label} | {srv} | {fnum(r.get('iops'))} | {fnum(r.get('mbps'), 1)} | "
                       f"{fnum(r.get('p50_us'))} | {p99} | {fnum(r.get('server_cpu_s'), 2)} | "
                       f"{fnum(r.get('server_cpu_s_per_gib'), 2)} | "
                       f"{fnum(r.get('server_cpu_s_per_100k_io'), 2)} | "
                       f"{fnum(r.get('server_rss_peak_mib'))} |")
    out.append("")
    out.append("| workload | metric | hlfs | best other | hlfs / best | target | |")
    out.append("|---|---|---|---|---|---|---|")
    for r in ratios:
        d = 1 if r["metric"] == "MB/s" else 0
        bo = f"{fnum(r['best_other_value'], d)} ({r['best_other']})" if r["best_other"] else "-"
        rv = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        verdict = "n/a" if r["met"] is None else ("met" if r["met"] else "**missed**")
        out.append(f"| {r['label']} | {r['metric']} | {fnum(r['hlfs'], d)} | {bo} | {rv} | ≥ {r['target']} | {verdict} |")
    out.append("")
    out.append("| workload | hlfs CPU µs/op | qemu-nbd CPU µs/op | hlfs / qemu-nbd | target | |")
    out.append("|---|---|---|---|---|---|")
    for r in cpu_ratios:
        rv = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        verdict = "n/a" if r["met"] is None else ("met" if r["met"] else "**missed**")
        out.append(f"| {r['label']} | {fnum(r['hlfs_us_per_op'], 1)} | {fnum(r['qemu_nbd_us_per_op'], 1)} | {rv} | ≤ 1.0 | {verdict} |")
    out.append("")
    out.append("Server CPU is utime+stime of the server process (all threads) from fio's start to its exit, "
               "ramp included; per I/O and per GiB it is the CPU rate (CPU s / wall s) over fio's rate. "
               "Peak RSS is the server's VmHWM during the workload (reset before each).")
    print("\n".join(out))

    if json_out:
        doc = {
            "params": params,
            "machine": machine,
            "servers": servers,
            "runs": [dict(server=s, workload=w, **r) for (s, w), r in runs.items()],
            "ratios": ratios,
            "cpu_ratios": cpu_ratios,
        }
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"bench-nbd: JSON written to {json_out}", file=err)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
