"""Training-step time at 1 and 2 torch threads, on a quiet machine and beside a busy loop, in one run.

    python experiments/threads.py DATA_DIR [--steps 20] [overrides ...]

For each of {quiet, one busy-loop process beside it} x {device.num_threads=1, 2} x {OpenMP's default wait policy,
OMP_WAIT_POLICY=PASSIVE}, runs ``lmlab.bench`` (no baseline, no profiling) on DATA_DIR and prints the median ms per
training step. The busy loop is what "other work on the machine" costs a run that spins its threads while it waits
for a core. Results and the default chosen from them: experiments/threads.md.
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


def bench(data: Path, threads: int, passive: bool, steps: int, overrides: list[str], work: Path) -> float:
    out = work / f"t{threads}-{passive}-{time.monotonic_ns()}"
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    command = [
        sys.executable, "-m", "lmlab.bench", "dataset=text_dir", f"dataset.path={data}",
        f"device.num_threads={threads}", "bench.baseline=false", "bench.dispatch_steps=0", f"bench.steps={steps}",
        "trainer.precision=fp32", f"hydra.run.dir={out}", *overrides,
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=work)
    return json.loads((out / "bench.json").read_text())["train"]["ms_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", default=["+experiment=cpu_baseline"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for busy in (False, True):
            loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                for passive in (False, True):
                    for threads in (1, 2):
                        ms = bench(args.data.resolve(), threads, passive, args.steps, args.overrides, Path(tmp))
                        rows.append((busy, passive, threads, ms))
                        print(f"busy={busy} passive={passive} threads={threads}: {ms:.1f} ms/step", flush=True)
            finally:
                if loop is not None:
                    loop.kill()
    print(f"\n# {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, {' '.join(args.overrides)}\n")
    print("| machine | OpenMP wait | 1 thread ms/step | 2 threads ms/step | 2 / 1 |")
    print("|---|---|---|---|---|")
    for busy in (False, True):
        for passive in (False, True):
            one, two = (ms for b, p, t, ms in rows if b == busy and p == passive)
            print(f"| {'a busy loop beside' if busy else 'quiet'} | {'PASSIVE' if passive else 'default'} "
                  f"| {one:.1f} | {two:.1f} | {two / one:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
