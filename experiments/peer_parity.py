"""lmlab against pytorch/examples' word_language_model at the peer's own recipe, both programs unmodified.

The recipe (the peer's defaults plus ``--tied``): a 2×200 tied LSTM, dropout 0.2, plain SGD at lr 20 divided by
4 when validation does not improve, gradient norm clipped at 0.25, batch 20, BPTT 35, evaluation batch 10.
Both programs read one closed-vocabulary copy of DATA_DIR (valid/test words unseen in train become
``<unk>``: the peer builds its dictionary from all three splits, lmlab from train alone, so only a closed
vocabulary makes the two score the same task). Each command is timed whole, start-up, data, test and (for
lmlab) the generated sample included, one after the other on an otherwise quiet machine.

    git clone https://github.com/pytorch/examples /tmp/examples          # the peer, fetched, never vendored
    python experiments/peer_parity.py DATA_DIR --peer /tmp/examples/word_language_model \\
        [--seeds 1111 1 2] [--epochs 1] [--long-epochs 6] [--warmup] [--lanes N] [--work DIR]

Prints one markdown table per (epochs) setting and writes every figure to WORK/parity.json. ``--warmup``
adds lmlab as its own defaults run it (``optimizer=sgd`` ramps the LR up over 50 steps); the parity rows
switch that off (``scheduler.warmup_steps=0``), as the peer has no warm-up. Results:
experiments/peer_parity.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

PEER, LMLAB = "pytorch/examples", "lmlab"
PEER_FLAGS = ["--tied", "--emsize", "200", "--nhid", "200", "--dropout", "0.2", "--lr", "20", "--clip", "0.25"]
LMLAB_RECIPE = [
    "dataset=text_dir",
    "model=lstm",
    "model.embed_dim=200",
    "model.hidden_dim=200",
    "model.dropout=0.2",
    "optimizer=sgd",
    "optimizer.lr=20",
    "trainer.clip_grad_norm=0.25",
    "dataset.batch_size=20",
    "dataset.eval_batch_size=10",
    "dataset.bptt=35",
]
PEER_EPOCH = re.compile(r"end of epoch\s+(\d+).*valid ppl\s+([\d.]+)")
PEER_TEST = re.compile(r"test ppl\s+([\d.]+)")


def closed_vocabulary_copy(source: Path, target: Path) -> Path:
    """train.txt as it is; valid/test with every word unseen in train replaced by ``<unk>`` (lines kept)."""
    target.mkdir(parents=True, exist_ok=True)
    train = (source / "train.txt").read_text(encoding="utf-8")
    (target / "train.txt").write_text(train, encoding="utf-8")
    known = set(train.split())
    for split in ("valid", "test"):
        lines = (source / f"{split}.txt").read_text(encoding="utf-8").split("\n")
        closed = [" ".join(w if w in known else "<unk>" for w in line.split()) for line in lines]
        (target / f"{split}.txt").write_text("\n".join(closed), encoding="utf-8")
    return target


def timed(command: list[str], cwd: Path, log: Path, core: int | None) -> float:
    """Seconds the whole command took; with ``core``, the command runs on that core alone with one thread."""
    env, pin = dict(os.environ), None
    if core is not None:
        env["OMP_NUM_THREADS"] = "1"  # read by torch at start (the peer has no thread option)

        def pin() -> None:
            os.sched_setaffinity(0, {core})

    started = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True, env=env, preexec_fn=pin)
    return time.perf_counter() - started


def run_peer(job: Job, peer: Path, data: Path, work: Path, core: int | None) -> dict:
    log = work / f"{job.name}.log"
    command = [sys.executable, str(peer / "main.py"), "--data", str(data), "--epochs", str(job.epochs)]
    command += ["--seed", str(job.seed), *PEER_FLAGS, "--save", str(work / f"{job.name}.pt")]
    wall = timed(command, work, log, core)
    text = log.read_text()
    val = [float(ppl) for _, ppl in PEER_EPOCH.findall(text)]
    return {
        "best_val_ppl": min(val),
        "test_ppl": float(PEER_TEST.search(text).group(1)),
        "wall_s": wall,
        "val_ppl_per_epoch": val,
    }


def run_lmlab(job: Job, data: Path, work: Path, core: int | None) -> dict:
    folder = work / job.name
    overrides = [*LMLAB_RECIPE, f"dataset.path={data}", f"trainer.epochs={job.epochs}", f"seed={job.seed}"]
    overrides += [f"hydra.run.dir={folder}"] + ([] if job.warmup else ["scheduler.warmup_steps=0"])
    overrides += [] if core is None else ["device.num_threads=1"]
    wall = timed([sys.executable, "-m", "lmlab.run", *overrides], work, work / f"{job.name}.log", core)
    results = json.loads((folder / "results.json").read_text())
    epochs_seen = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {
        "best_val_ppl": results["best_val_ppl"],
        "test_ppl": results["test_ppl"],
        "wall_s": wall,
        "val_ppl_per_epoch": [e["val_ppl"] for e in epochs_seen],
    }


@dataclass(frozen=True)
class Job:
    program: str  # PEER or LMLAB
    seed: int
    epochs: int
    warmup: bool = False  # lmlab only: keep its default SGD warm-up

    @property
    def label(self) -> str:
        return self.program + (" (its warm-up)" if self.warmup else "")

    @property
    def name(self) -> str:
        return f"{self.program.split('/')[-1]}{'-warmup' if self.warmup else ''}-seed{self.seed}-epochs{self.epochs}"


def table(rows: list[dict]) -> str:
    """Per program: mean val/test perplexity over seeds (and each seed's), mean wall time, per-epoch val."""
    lines = [
        "| program | seeds | val ppl (mean) | test ppl (mean) | per seed val / test | wall s (mean) "
        "| val ppl per epoch (first seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    programs = list(dict.fromkeys(r["program"] for r in rows))
    means = {}
    for program in programs:
        mine = [r for r in rows if r["program"] == program]
        val, test = (statistics.mean(r[k] for r in mine) for k in ("best_val_ppl", "test_ppl"))
        means[program] = val, test, statistics.mean(r["wall_s"] for r in mine)
        seeds = ", ".join(f"{r['seed']}: {r['best_val_ppl']:.2f} / {r['test_ppl']:.2f}" for r in mine)
        curve = " → ".join(f"{v:.1f}" for v in mine[0]["val_ppl_per_epoch"])
        lines.append(
            f"| {program} | {len(mine)} | {val:.2f} | {test:.2f} | {seeds} | {means[program][2]:.1f} | {curve} |"
        )
    peer = means.get("pytorch/examples")
    if peer:
        for program, (val, test, wall) in means.items():
            if program != "pytorch/examples":
                lines.append(
                    f"\n{program} against the peer: val {100 * (val / peer[0] - 1):+.2f}%, "
                    f"test {100 * (test / peer[1] - 1):+.2f}%, whole command {peer[2] / wall:.2f}× faster"
                )
    return "\n".join(lines)


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    isa = torch.backends.cpu.get_cpu_capability() + (" + bf16" if "avx512_bf16" in info else "")
    name = names[0] if names else platform.processor()
    return f"{name}, {os.cpu_count()} cores, {isa}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="folder with train.txt, valid.txt, test.txt")
    parser.add_argument("--peer", type=Path, required=True, help="pytorch/examples' word_language_model folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111, 1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--long-epochs", type=int, default=0, help="also one seed (the first) for this many epochs")
    parser.add_argument("--warmup", action="store_true", help="also lmlab with its default SGD warm-up (first seed)")
    parser.add_argument(
        "--lanes",
        type=int,
        default=0,
        help="0: one command at a time with torch's default threads (the timing to report); "
        "N: N commands at once, each on a core of its own with one thread (perplexities sooner)",
    )
    parser.add_argument("--work", type=Path, default=Path("parity-work"))
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = closed_vocabulary_copy(args.data, work / "closed")
    print(f"# {cpu_description()}, {time.strftime('%Y-%m-%d')}, lanes {args.lanes}", flush=True)
    settings = [(args.epochs, args.seeds)] + ([(args.long_epochs, args.seeds[:1])] if args.long_epochs else [])
    jobs = []  # interleaved, so a drift of the machine's speed touches both programs alike
    for epochs, seeds in reversed(settings):  # the longest first: lanes then finish close together
        for seed in seeds:
            jobs += [Job(PEER, seed, epochs), Job(LMLAB, seed, epochs)]
            jobs += [Job(LMLAB, seed, epochs, warmup=True)] if args.warmup and seed == seeds[0] else []

    def run(job: Job, core: int | None) -> dict:
        figures = (
            run_peer(job, args.peer.resolve(), data, work, core)
            if job.program == PEER
            else run_lmlab(job, data, work, core)
        )
        row = {"program": job.label, "seed": job.seed, "epochs": job.epochs, **figures}
        print(json.dumps(row), flush=True)
        return row

    if args.lanes:
        free = queue.SimpleQueue()
        for core in sorted(os.sched_getaffinity(0))[: args.lanes]:
            free.put(core)

        def on_a_free_core(job: Job) -> dict:
            core = free.get()
            try:
                return run(job, core)
            finally:
                free.put(core)

        with ThreadPoolExecutor(args.lanes) as pool:
            rows = list(pool.map(on_a_free_core, jobs))
    else:
        rows = [run(job, None) for job in jobs]
    for epochs, _ in settings:
        print(f"\n## {epochs} epoch{'s' * (epochs > 1)}\n\n{table([r for r in rows if r['epochs'] == epochs])}\n")
    machine = cpu_description() + (f", {args.lanes} lanes of one core and one thread" if args.lanes else "")
    (work / "parity.json").write_text(json.dumps({"machine": machine, "runs": rows}, indent=1))
    assert all(math.isfinite(r["test_ppl"]) for r in rows)


if __name__ == "__main__":
    main()
