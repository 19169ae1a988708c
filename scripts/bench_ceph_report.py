#!/usr/bin/env python3
"""Summarises a scripts/bench-ceph.sh run (HLFS on the RADOS gateway and
directly on RADOS against RBD on the same Ceph cluster): reads the fio JSON files and the CPU samples the
script left in its output directory, prints the Markdown report to stdout and
writes it to OUT/report.md, with every number in OUT/report.json.

Usage (normally called by bench-ceph.sh, not by hand):
    bench_ceph_report.py OUT_DIR

OUT_DIR holds:
    params.json   run parameters written by the script
    machine.txt   the machine note
    legs.tsv      leg  status  note                              (one line per leg)
    runs.tsv      leg  workload  status  ceph_cpu_s  serve_cpu_s  fio_wall_s
                  settle_s  per-daemon-cpu  fio_json  fio_cpu_s
The fio parsing helpers are bench_nbd_report.py's. Only the standard library.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nbd_report import fio_metrics, fnum, read_tsv  # noqa: E402

# workload, label, headline metric, target ratio HLFS/RBD, CPU per I/O must be lower too
WORKLOADS = [
    ("randwrite", "rand-write 4 KiB, QD 32", "iops", 3.0, True),
    ("randread", "rand-read 4 KiB, QD 32 (HLFS: warm, after a full write)", "iops", 1.0, False),
    ("seqwrite", "seq-write 1 MiB, QD 8", "mbps", 1.0, False),
    ("seqread", "seq-read 1 MiB, QD 8", "mbps", 1.0, False),
    ("randwrite-fsync", "rand-write 4 KiB + fsync each, 1 job x QD 1", "iops", 3.0, True),
    ("seqread-cold", "seq-read 1 MiB, QD 8, one cold pass (HLFS: new server, empty read cache)", "mbps", 1.0, False),
]
PRECONDITION = ("precondition", "precondition: seq-write 1 MiB QD 8, whole device", "mbps", None, False)
LEGS = ["rbd", "hlfs", "rados"]
# The HLFS legs, each compared with RBD.
HLFS_LEGS = [("hlfs", "HLFS on the gateway (s3://)"), ("rados", "HLFS on RADOS (rados://)")]
UNIT = {"iops": "IOPS", "mbps": "MB/s"}


def load_runs(out):
    runs = {}
    for row in read_tsv(os.path.join(out, "runs.tsv")):
        row += [""] * (10 - len(row))
        leg, wl, status, ceph_s, serve_s, wall_s, settle_s, per, fio_json, fio_s = row[:10]
        num = lambda s: float(s) if s not in ("", "-") else None  # noqa: E731
        r = {
            "status": status,
            "ceph_cpu_s": num(ceph_s),
            "serve_cpu_s": num(serve_s),
            "fio_wall_s": num(wall_s),
            "settle_s": num(settle_s),
            "fio_cpu_s": num(fio_s),
            "ceph_cpu_by_daemon": {k: float(v) for k, v in (x.split("=", 1) for x in per.split() if "=" in x)},
        }
        if status == "ok":
            try:
                path = os.path.join(out, fio_json)
                r.update(fio_metrics(path))
                if r.get("fio_errors"):
                    r["status"] = "fio-error"
            except (OSError, ValueError, KeyError, IndexError) as e:
                r["status"] = "bad-json"
                r["note"] = str(e)
        if r.get("ios") and r["ceph_cpu_s"] is not None:
            r["ceph_cpu_us_per_io"] = r["ceph_cpu_s"] / r["ios"] * 1e6
        runs[(leg, wl)] = r
    return runs


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    with open(os.path.join(out, "params.json"), encoding="utf-8") as f:
        p = json.load(f)
    legs = {}
    for row in read_tsv(os.path.join(out, "legs.tsv")):
        row += [""] * (3 - len(row))
        legs[row[0]] = {"status": row[1], "note": row[2]}
    runs = load_runs(out)

    def ok(leg, wl):
        r = runs.get((leg, wl))
        return r if r and r["status"] == "ok" else None

    verdicts = []
    for hleg, _name in HLFS_LEGS:
        for wl, label, metric, target, cpu_too in WORKLOADS:
            rb, hl = ok("rbd", wl), ok(hleg, wl)
            ratio = hl[metric] / rb[metric] if (rb and hl and rb.get(metric)) else None
            cpu_r = rb.get("ceph_cpu_us_per_io") if rb else None
            cpu_h = hl.get("ceph_cpu_us_per_io") if hl else None
            met, why = None, ""
            if ratio is not None:
                met = ratio >= target
                if not met:
                    why = f"{UNIT[metric]} below {target:g}x"
                if cpu_too and cpu_r is not None and cpu_h is not None and not cpu_h < cpu_r:
                    met = False
                    why = (why + "; " if why else "") + "Ceph CPU per I/O not lower"
            verdicts.append({
                "leg": hleg, "workload": wl, "label": label, "metric": UNIT[metric], "target": target,
                "cpu_per_io_must_be_lower": cpu_too, "ratio": ratio, "met": met, "why": why,
            })

    def cell(r, key, digits=0):
        return fnum(r.get(key), digits) if r else "-"

    md = []
    md.append(f"### HLFS on the RADOS gateway and on RADOS vs RBD, same Ceph cluster, {p['date']}")
    md.append("")
    md.append("```sh")
    md.append(p["invocation"])
    md.append("```")
    md.append("")
    md.append(
        f"Commit `{p['commit']}`; {p['cpus']} CPUs ({p['cpu_model']}), {p['mem']} RAM, Linux {p['kernel']}; "
        f"{p['ceph']}; {p['fio']}. One throwaway single-node cluster (scripts/ceph-up.sh: mon, mgr, one "
        f"bluestore OSD on a sparse {p['osd_size']} file, radosgw, all on 127.0.0.1, pools of size 1). "
        f"Device size {p['size_human']}; {p['runtime']} s per workload (time_based, no ramp; the cold read is one pass), direct=1, "
        f"numjobs=1; each device written sequentially once before the workloads. Ceph daemons idle at "
        f"{p['ceph_idle_cores']:.3f} cores before the runs."
    )
    md.append("")
    for leg in LEGS:
        if leg in legs:
            s = legs[leg]
            md.append(f"- **{leg}** ({s['status']}): {s['note']}")
    md.append("")
    for hleg, name in HLFS_LEGS:
        if hleg not in legs:
            continue
        md.append(f"**{name} against RBD**")
        md.append("")
        md.append("| workload | RBD IOPS | RBD MB/s | HLFS IOPS | HLFS MB/s | HLFS / RBD | target | result "
                  "| Ceph CPU s RBD | Ceph CPU s HLFS | Ceph CPU µs/I/O RBD | Ceph CPU µs/I/O HLFS | hlfs serve CPU s |")
        md.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        leg_verdicts = [v for v in verdicts if v["leg"] == hleg]
        for v, (wl, label, metric, target, cpu_too) in zip(leg_verdicts, WORKLOADS):
            rb, hl = ok("rbd", wl), ok(hleg, wl)
            tgt = f"≥ {target:g}× {UNIT[metric]}" + (", less Ceph CPU/I/O" if cpu_too else "")
            res = "n/a" if v["met"] is None else ("met" if v["met"] else f"**missed** ({v['why']})")
            rv = "-" if v["ratio"] is None else f"{v['ratio']:.2f}"
            rbs = "" if rb or ("rbd", wl) not in runs else f" ({runs[('rbd', wl)]['status']})"
            hls = "" if hl or (hleg, wl) not in runs else f" ({runs[(hleg, wl)]['status']})"
            md.append(
                f"| {label} | {cell(rb, 'iops')}{rbs} | {cell(rb, 'mbps', 1)} | {cell(hl, 'iops')}{hls} | "
                f"{cell(hl, 'mbps', 1)} | {rv} | {tgt} | {res} | {cell(rb, 'ceph_cpu_s', 2)} | "
                f"{cell(hl, 'ceph_cpu_s', 2)} | {cell(rb, 'ceph_cpu_us_per_io', 1)} | "
                f"{cell(hl, 'ceph_cpu_us_per_io', 1)} | {cell(hl, 'serve_cpu_s', 2)} |"
            )
        md.append("")
    md.append("Every run, every leg:")
    md.append("")
    md.append("| workload | leg | IOPS | MB/s | p50 µs | p99 µs | I/Os | Ceph CPU s (by daemon) | Ceph µs/I/O "
              "| hlfs serve CPU s | fio CPU s | fio s + settle s |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for wl, label, _m, _t, _c in [PRECONDITION] + WORKLOADS:
        for leg in LEGS:
            r = runs.get((leg, wl))
            if r is None:
                continue
            by = ", ".join(f"{k.split('.')[0].replace('client', 'rgw')} {fnum(v, 2)}"
                           for k, v in sorted(r["ceph_cpu_by_daemon"].items()))
            timing = f"{fnum(r.get('fio_wall_s'), 1)} + {fnum(r.get('settle_s'))}"
            if r["status"] != "ok":
                md.append(f"| {label} | {leg} | **{r['status']}** | | | | | {fnum(r.get('ceph_cpu_s'), 2)} ({by}) | "
                          f"| {fnum(r.get('serve_cpu_s'), 2)} | | {timing} |")
                continue
            p99 = fnum(r.get("p99_us"))
            if r.get("sync_p99_us") is not None:
                p99 += f" (fsync {fnum(r['sync_p99_us'])})"
            md.append(
                f"| {label} | {leg} | {fnum(r.get('iops'))} | {fnum(r.get('mbps'), 1)} | {fnum(r.get('p50_us'))} | "
                f"{p99} | {fnum(r.get('ios'))} | {fnum(r.get('ceph_cpu_s'), 2)} ({by}) | "
                f"{fnum(r.get('ceph_cpu_us_per_io'), 1)} | {fnum(r.get('serve_cpu_s'), 2)} | "
                f"{fnum(r.get('fio_cpu_s'), 2)} | {timing} |"
            )
    md.append("")
    md.append(
        "Ceph CPU s is utime+stime of ceph-mon, ceph-mgr, ceph-osd and radosgw (all threads, /proc/PID/stat) "
        "from fio's start until the daemons and hlfs serve went idle again (the settle tail, at most "
        f"{p['settle_max']} s), so uploads HLFS does in the background after fio stops are counted; idle "
        "burn is not subtracted. Ceph µs/I/O = Ceph CPU s / fio's I/Os of the run (for fsync runs, writes; "
        "flushes are not counted as I/Os). hlfs serve CPU s is measured the same way. fio CPU s is the "
        "fio process's own (all threads, from start to exit): on the RBD leg it includes librbd, the client "
        "side of RBD; on the HLFS leg libnbd, with hlfs serve the client side of HLFS. p99 is completion "
        "latency. The rand-write + fsync workload runs one job at QD 1. On the rados leg, librados runs "
        "inside hlfs serve, so the client side of HLFS on RADOS is all in hlfs serve CPU s. "
        "RBD runs with librbd's cache "
        f"mode `{p['rbd_cache']}`"
        + (" (rbd_cache=true, writethrough until the first flush: the flush-free write workloads are "
           "acknowledged by the OSD, not by a client cache)" if p["rbd_cache"] == "default" else "")
        + ". HLFS acknowledges writes once they are in its local journal; data reaches the bucket when a "
        "segment is sealed and uploaded (the last, unsealed segment of a run stays local)."
    )
    note = legs.get("hlfs", legs.get("rados", {})).get("note", "")
    if "durability=local" in note and "--durability remote" not in note:
        md[-1] += (" hlfs serve ran with `--durability local`: an HLFS FLUSH returns once its local journal "
                   "is synced, an RBD flush once the OSD has the data, so the fsync rows compare different "
                   "promises (`HLFS_SERVE_ARGS=\"--durability remote\"` makes each FLUSH seal and upload).")
    text = "\n".join(md)
    print(text)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump({
            "params": p, "legs": legs,
            "runs": [dict(leg=leg, workload=wl, **r) for (leg, wl), r in runs.items()],
            "verdicts": verdicts,
        }, f, indent=2)
        f.write("\n")
    print(f"bench-ceph: report in {os.path.join(out, 'report.md')}, numbers in {os.path.join(out, 'report.json')}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
