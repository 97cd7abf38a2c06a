"""Where a default run's memory goes, phase by phase, and its whole-command peak RSS.

    python experiments/synthetic_corpus.py /tmp/v33k
    python experiments/memory.py /tmp/v33k [--steps 20] [--no-phases]

DATA_DIR: a corpus with WikiText-2's vocabulary size (33,278 words; ``experiments/synthetic_corpus.py DIR`` writes one
with WikiText-2's split sizes). Part 1 runs the default run's pieces in this process and prints, after each, the
resident memory (VmRSS) and the peak so far (VmHWM): ``import torch``, lmlab's modules, ``torch._dynamo`` (which
``torch.optim`` imports on its first step), the data, the model, the optimizer, the training steps, validation, the
checkpoints, the test pass. Part 2 runs ``python -m lmlab.run dataset=text_dir dataset.path=DATA_DIR`` (the default
model and settings, ``--steps`` training and evaluation windows) as a user does and prints its ``peak_rss_mb``
(results.json). Results: experiments/memory.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(phase: str, rows: list) -> None:
    rows.append((phase, status_mb("VmRSS"), status_mb("VmHWM")))
    print(f"{phase:<48} RSS {rows[-1][1]:7.0f} MB | peak {rows[-1][2]:7.0f} MB", flush=True)


def phases(data: Path, steps: int) -> None:
    rows: list = []
    report("python", rows)
    import torch

    report("import torch", rows)
    from hydra import compose, initialize_config_dir

    from lmlab.config import CONF_DIR
    from lmlab.factory import build_training_objects, checkpoint_meta
    from lmlab.loggers import Logger

    report("import lmlab (hydra, the library)", rows)
    import torch._dynamo  # noqa: F401

    report("import torch._dynamo (torch.optim's first step does)", rows)
    overrides = [
        "dataset=text_dir", f"dataset.path={data}", "trainer.epochs=1", f"trainer.limit_train_batches={steps}",
        f"trainer.limit_eval_batches={steps}", "device=cpu",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=overrides)
    objects = build_training_objects(cfg)
    report(f"data, model ({sum(p.numel() for p in objects.model.parameters()):,} params), optimizer", rows)
    with tempfile.TemporaryDirectory() as out:
        fit = objects.trainer.fit(
            objects.model, objects.data, objects.optimizer, objects.schedule, objects.device, Path(out), Logger(),
            checkpoint_meta(cfg, objects.data.vocab.words),
        )  # fmt: skip
        report(f"{steps} training steps, validation, best.pt + last.pt", rows)
        objects.trainer.evaluate(objects.model, objects.data.stream("test"), objects.device)
        report("test pass", rows)
    print(f"(vocabulary {len(objects.data.vocab):,}, best val loss {fit.best_val_loss:.2f}, torch {torch.__version__})")


def whole_command(data: Path, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "lmlab.run", "dataset=text_dir", f"dataset.path={data}", "trainer.epochs=1",
             f"trainer.limit_train_batches={steps}", f"trainer.limit_eval_batches={steps}", "hydra.run.dir=run"],
            cwd=tmp, check=True, capture_output=True,
        )  # fmt: skip
        results = json.loads((Path(tmp) / "run" / "results.json").read_text())
    print(
        f"python -m lmlab.run (defaults, {steps} steps and windows): peak RSS {results['peak_rss_mb']:.0f} MB, "
        f"{results['num_params']:,} params, {time.perf_counter() - started:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-phases", action="store_true")
    args = parser.parse_args()
    if not args.no_phases:
        phases(args.data.resolve(), args.steps)
    whole_command(args.data.resolve(), args.steps)


if __name__ == "__main__":
    main()
