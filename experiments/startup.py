"""How soon each lmlab command answers, beside ``python -c "import torch"`` measured in the same run.

    python experiments/startup.py DATA_DIR [--repeats 5]

DATA_DIR holds train.txt/valid.txt/test.txt. Each command runs ``--repeats`` times from a temporary folder; the
median wall time to the line that matters (the help text, the refusal, the banner's first line, the first generated
word) and the child's peak RSS are printed, each as a ratio to ``import torch``'s: absolute times move with the
machine, ratios much less. A default-size checkpoint (the 2x650 LSTM, one step) is made first for
``lmlab.generate``. Results: experiments/startup.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str], cwd: Path, until: str | None = None) -> tuple[float, float]:
    """(seconds until a stdout/stderr line containing ``until`` appeared, or to the exit; peak RSS in MB).
    With ``until``, the command is stopped once the line is seen (the rest is not what is measured)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = None
    for line in process.stdout:
        if until is not None and until in line and seconds is None:
            seconds = time.perf_counter() - started
            process.terminate()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = status
    if seconds is None:
        seconds = time.perf_counter() - started
        if until is not None:
            raise RuntimeError(f"{' '.join(command)} never printed {until!r}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = args.data.resolve()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(
            [py, "-m", "lmlab.run", "dataset=text_dir", f"dataset.path={data}", "trainer.epochs=1",
             "trainer.limit_train_batches=1", "trainer.limit_eval_batches=1", "hydra.run.dir=ckpt"],
            cwd=work, check=True, capture_output=True,
        )  # fmt: skip
        checkpoint = work / "ckpt" / "checkpoints" / "best.pt"
        cases = {
            'python -c "import torch"': ([py, "-c", "import torch"], None),
            'python -c "import torch._dynamo"': ([py, "-c", "import torch._dynamo"], None),
            "lmlab.run --help": ([py, "-m", "lmlab.run", "--help"], "Config groups"),
            "lmlab.generate --help": ([py, "-m", "lmlab.generate", "--help"], "Config groups"),
            "lmlab.run model.hidden_dim=-1 (refused)": ([py, "-m", "lmlab.run", "model.hidden_dim=-1"], "error:"),
            "lmlab.run: banner's first line": (
                [py, "-m", "lmlab.run", "dataset=text_dir", f"dataset.path={data}", "hydra.run.dir=run"],
                "lmlab run:",
            ),
            "lmlab.run: device line (torch loaded)": (
                [py, "-m", "lmlab.run", "dataset=text_dir", f"dataset.path={data}", "hydra.run.dir=run2"],
                "device:",
            ),
            "lmlab.generate num_words=1, default-size checkpoint": (
                [py, "-m", "lmlab.generate", f"checkpoint={checkpoint}", "num_words=1", "seed=1"],
                None,
            ),
        }
        figures = {}
        for name, (command, until) in cases.items():
            runs = [timed(command, work, until) for _ in range(args.repeats)]
            figures[name] = (statistics.median(s for s, _ in runs), max(m for _, m in runs))
    base_s, base_mb = figures['python -c "import torch"']
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
          f"median of {args.repeats}\n")  # fmt: skip
    print("| command (until) | seconds | x import torch | peak RSS MB | x import torch |")
    print("|---|---|---|---|---|")
    for name, (seconds, mb) in figures.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base_s:.2f} | {mb:.0f} | {mb / base_mb:.2f} |")


if __name__ == "__main__":
    main()
