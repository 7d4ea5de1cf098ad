"""Wall time of the main job, ``scvi-unlearn demo --quick``, as a user runs it.

Runs the command in a fresh process (imports, training, shadows, the three unlearning rows,
the audits, the certificate and the re-run from the record included) ``--repeats`` times,
each into a new temporary folder (so no shadow cache is reused), and records the machine's
core count and load, which the time depends on.

Outputs: ``benchmarks/results/demo_time/results.{md,json}``.

    python benchmarks/demo_time.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import git_commit, utc_date


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    default_out = Path(__file__).parent / "results" / "demo_time"
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for _ in range(args.repeats):
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "scvi_unlearn.cli", "demo", "--quick", "--out", folder],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "exit_code": done.returncode,
                     "load_average_before": load_before})  # fmt: skip
        print(f"demo --quick: {seconds:.1f} s (exit {done.returncode})", flush=True)
        if done.returncode:
            print(done.stdout[-2000:], done.stderr[-2000:])
    commit = git_commit()
    result = {
        "command": "scvi-unlearn demo --quick",
        "runs": runs,
        "max_seconds": max(r["seconds"] for r in runs),
        "cpu_count": os.cpu_count(),
        "commit": commit,
        "date": utc_date(),
    }
    lines = [
        "# Wall time of `scvi-unlearn demo --quick`",
        "",
        f"Commit {commit}, {result['date']}; {os.cpu_count()} CPU cores; "
        f"`python benchmarks/demo_time.py --repeats {args.repeats}`.",
        "",
        "| run | seconds | exit code | load average before |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(runs):
        seconds, code, load = r["seconds"], r["exit_code"], r["load_average_before"]
        lines.append(f"| {i + 1} | {seconds:.1f} | {code} | {load:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
