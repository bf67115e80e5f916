"""bench/all: every benchmark in one run, then one summary table.

Runs bench/fetch, bench/agent, bench/herd, bench/scale and bench/boot in turn
(each prints its own table too), keeps their raw figures in bench/results/, and
prints the headline figures with the ratio to the peer measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(name: str, argv: list[str]) -> bool:
    print(f"\n===== bench/{name} " + "=" * 50, flush=True)
    out = RESULTS / f"{name}.txt"
    with out.open("w") as f:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert p.stdout is not None
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
        return p.wait() == 0


def load(name: str) -> dict:
    try:
        return json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer runs and no 500-client process herds (a few minutes)")
    ap.add_argument("--skip", action="append", default=[],
                    help="leave out a benchmark (fetch, agent, herd, scale, boot)")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    py = sys.executable
    q = args.quick
    plan = {
        "fetch": [py, str(HERE / "fetch.py"), "-n", "10" if q else "30",
                  "--json", str(RESULTS / "fetch.json")],
        "agent": [py, str(HERE / "agent_bench.py"), "--rounds", "10" if q else "30",
                  "--json", str(RESULTS / "agent.json")],
        "herd": [py, str(HERE / "herd.py"), "--runs", "1" if q else "3",
                 "--sizes", "50,200" if q else "50,200,500",
                 "--json", str(RESULTS / "herd.json")],
        "scale": [py, str(HERE / "scale"), "--clients", "2000" if q else "10000"],
        "boot": [py, str(HERE / "boot_bench.py"), "--runs", "1" if q else "3",
                 "--json", str(RESULTS / "boot.json")],
    }
    failed = [name for name, argv in plan.items()
              if name not in args.skip and not run(name, argv)]

    print("\n===== summary " + "=" * 55)
    load1, load5, load15 = os.getloadavg()
    print(f"load average now: {load1:.1f} {load5:.1f} {load15:.1f} ({os.cpu_count()} cores)")
    rows: list[tuple[str, str, str, str]] = []
    fetch = load("fetch")
    for mine, ref, what in (("ours", "mandos", "our client -> mandosd vs Debian's pair"),
                            ("deb-mandosd", "mandos", "Debian's client -> mandosd vs -> Mandos"),
                            ("ours-debkeys", "ours-mandos",
                             "our client -> mandosd vs -> Mandos")):
        a, b = fetch.get(mine), fetch.get(ref)
        if a and b:
            rows.append((f"single fetch, median: {what}", f"{a['median_ms']:.0f} ms",
                         f"{b['median_ms']:.0f} ms", f"{b['median_ms'] / a['median_ms']:.1f}x"))
    a, b = fetch.get("deb-mandosd"), fetch.get("mandos")
    if a and b:
        rows.append(("server CPU per secret, one fetch (Debian's client)",
                     f"{a['server_cpu_ms']:.2f} ms", f"Mandos {b['server_cpu_ms']:.1f} ms",
                     f"{b['server_cpu_ms'] / max(a['server_cpu_ms'], 1e-9):.0f}x"))
    agent = load("agent")

    def med(ms: list[float]) -> float:
        s = sorted(ms)
        return s[len(s) // 2] if s else float("nan")

    if agent.get("ours", {}).get("ms"):
        a = med(agent["ours"]["ms"])
        for peer in ("mandos", "clevis"):
            if agent.get(peer, {}).get("ms"):
                b = med(agent[peer]["ms"])
                rows.append((f"agent: question to answer vs {peer}", f"{a:.0f} ms",
                             f"{b:.0f} ms", f"{b / a:.1f}x"))
    herd = load("herd")
    sys.path.insert(0, str(HERE))
    from herd import SYSTEMS  # the row names

    for key in ("lg-rawpk", "lg-x509"):
        for n, f in sorted(herd.get(SYSTEMS[key], {}).items(), key=lambda kv: int(kv[0])):
            what = "raw keys" if key == "lg-rawpk" else "legacy X.509"
            rows.append((f"herd of {n}, load generator, {what}: all served",
                         f"{f['seconds']:.2f} s", f"{int(f['failed'])} failed",
                         f"{f['peak_rss_mib']:.0f} MiB peak"))
            rows.append((f"herd of {n}, {what}: server CPU per secret (target 0.7 ms)",
                         f"{f['cpu_ms_per_secret']:.2f} ms", "-",
                         "met" if f["cpu_ms_per_secret"] <= 0.7 else "NOT met"))
    for mine, ref, what in (("deb-mandosd", "deb-mandos", "Debian's client"),
                            ("ours-mandosd", "ours-mandos", "our client"),
                            ("lg-rawpk", "lg-mandos", "load generator")):
        a, b = herd.get(SYSTEMS[mine], {}), herd.get(SYSTEMS[ref], {})
        for n in sorted(set(a) & set(b), key=int):
            r = b[n]["cpu_ms_per_secret"] / max(a[n]["cpu_ms_per_secret"], 1e-9)
            rows.append((f"herd of {n}, {what}: secrets per server CPU-second",
                         f"{1000 / a[n]['cpu_ms_per_secret']:.0f}/s",
                         f"Mandos {1000 / b[n]['cpu_ms_per_secret']:.0f}/s", f"{r:.0f}x"))
    boot = load("boot")
    if boot.get("boots"):
        def boot_med(variant: str, key: str) -> float:
            return med([b[key] for b in boot["boots"] if b["variant"] == variant
                        and b.get(key) is not None])

        if any(b["variant"] == "clevis" for b in boot["boots"]):
            a, c = boot_med("ours", "to_answer"), boot_med("clevis", "to_answer")
            rows.append(("boot (TCG): question to answer", f"{a:.2f} s", f"clevis {c:.2f} s",
                         f"{c / a:.1f}x"))
        sizes = boot.get("sizes", {})
        if "ours" in sizes and "clevis" in sizes:
            rows.append(("initrd size", f"{sizes['ours'] / 1e6:.1f} MB",
                         f"clevis {sizes['clevis'] / 1e6:.1f} MB",
                         f"{(sizes['ours'] - sizes['clevis']) / 1e6:+.1f} MB"))
    width = [max(len(r[i]) for r in rows + [("figure", "ours", "peer", "ratio")])
             for i in range(4)]
    for r in [("figure", "ours", "peer", "ratio"), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, width, strict=True)) + " |")
    print("\nRaw figures: bench/results/*.json and *.txt (scale and boot print their own)")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
