"""bench_cpu.py's load measurement (bench_load: a fresh process loads the model, perf_counter from
before the imports, VmHWM) for two or more source trees, runs interleaved so that a busy machine
weighs on each alike; prints each run and the medians.

    python benchmarks/bench_load_ab.py MODEL[,MODEL...] N SRC_DIR[,SRC_DIR...]

Each SRC_DIR is put first on PYTHONPATH (e.g. /work/wt-base/src,/work/wt-new/src), run with this
interpreter, nice -n 10."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import LOAD  # noqa: E402


def main() -> None:
    models, n, srcs = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3].split(",")
    for model in models:
        res: dict[str, list[dict]] = {s: [] for s in srcs}
        for _ in range(n):
            for s in srcs:
                la = os.getloadavg()[0]
                env = dict(os.environ, PYTHONPATH=s)
                out = subprocess.run(["nice", "-n", "10", sys.executable, "-c", LOAD, model, "auto"], check=True,
                                     capture_output=True, text=True, env=env, cwd="/tmp").stdout
                r = json.loads(out.strip().splitlines()[-1])
                r["loadavg_before"] = round(la, 2)
                res[s].append(r)
                print(s, os.path.basename(model), json.dumps(r), flush=True)
        for s in srcs:
            rs = res[s]
            print(f"MEDIAN {s} {os.path.basename(model)}: load_s {statistics.median(r['load_s'] for r in rs):.2f} "
                  f"peak_rss_gb {statistics.median(r['load_peak_rss_gb'] for r in rs):.2f} "
                  f"runs {[round(r['load_s'], 2) for r in rs]} loadavg {[r['loadavg_before'] for r in rs]}", flush=True)


if __name__ == "__main__":
    main()
