"""The prepared GPU check (#20): one command, at most ~5 minutes, for whoever has a GPU at hand.

    python experiments/gpu_check.py [--data DIR] [--out DIR]

1. the GPU tests (``pytest -m gpu``: graphed losses = eager losses, exact resume, no host reads);
2. ``lmlab.bench`` on the default model (tied 2×650 LSTM, batch 20, BPTT 35): the plain PyTorch loop
   eager and in one CUDA graph, lmlab eager and graphed, each with full-fp32 and TF32 matmuls;
3. a 2-process DDP run where two GPUs exist;
4. one summary table (also ``gpu_check.json`` and ``gpu_check.md`` in ``--out``) for experiments/bench.md.

Needs PyTorch with CUDA; lmlab runs from this checkout. Its other dependencies (hydra-core, omegaconf,
antlr4-python3-runtime, pooch, platformdirs, tqdm, PyYAML, pytest) are installed from ``wheels/`` in the
checkout if they are missing there; on a machine without the internet, bring them along::

    pip download -d wheels hydra-core omegaconf pooch platformdirs tqdm PyYAML pytest  # where there is internet
    # (antlr4-python3-runtime==4.9.3 has no wheel on PyPI: `pip wheel -w wheels antlr4-python3-runtime==4.9.3`)

Data: ``--data DIR`` (train/valid/test.txt), else ``data/wt2-small`` in the checkout, else a synthetic
corpus of WikiText-2's vocabulary (``experiments/synthetic_corpus.py``; its perplexities mean nothing).
Without a GPU it dry-runs on the CPU (tiny steps) and says what it skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime==4.9.3",
          "pooch": "pooch", "platformdirs": "platformdirs", "tqdm": "tqdm", "yaml": "PyYAML",
          "pytest": "pytest"}  # fmt: skip


def ensure_dependencies() -> None:
    missing = [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return
    wheels = ROOT / "wheels"
    if not wheels.is_dir():
        sys.exit(f"missing: {', '.join(missing)}; put their wheels in {wheels} (see this script's docstring)")
    print(f"installing from {wheels}: {', '.join(missing)}", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), *missing]
    subprocess.run(pip, check=True)


def run(command: list[str], timeout: float, env: dict[str, str]) -> tuple[int, str, float]:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, output = 124, f"timed out after {timeout:.0f} s\n{err.stdout or ''}"
    return code, output, time.perf_counter() - started


def corpus(args: argparse.Namespace, out: Path, env: dict[str, str]) -> Path:
    for folder in (args.data, ROOT / "data" / "wt2-small"):
        if folder and (Path(folder) / "train.txt").is_file():
            return Path(folder)
    folder = out / "synthetic"
    if not (folder / "train.txt").is_file():
        print("no corpus given: writing a synthetic one (WikiText-2's vocabulary)", flush=True)
        subprocess.run([sys.executable, "experiments/synthetic_corpus.py", str(folder)], cwd=ROOT, env=env, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    args = parser.parse_args()
    ensure_dependencies()
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    data = corpus(args, args.out, env)
    skipped, rows, notes = [], [], []
    where = torch.cuda.get_device_name(0) if gpus else "no CUDA device: a dry run on the CPU"
    print(f"{where} | torch {torch.__version__} | data {data}", flush=True)

    code, output, seconds = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/e2e/test_gpu.py"], 200, env)
    summary = output.strip().splitlines()[-1] if output.strip() else "(no output)"
    notes.append(f"GPU tests: {summary} ({seconds:.0f} s)")
    if code not in (0, 5) and gpus:
        print(output[-3000:])

    device = ["device=cuda"] if gpus else ["device=cpu", "bench.steps=3", "bench.warmup=1", "bench.matmul_size=256"]
    graphs = ["false", "true"] if gpus else ["false"]
    precisions = ["highest", "high"] if gpus else ["highest"]
    if not gpus:
        skipped += ["graphed step (trainer.cuda_graph=true needs CUDA)", "TF32 matmuls", "2-process DDP"]
        refused = run([sys.executable, "-m", "lmlab.bench", "dataset=text_dir", f"dataset.path={data}", *device,
                       "trainer.cuda_graph=true", f"hydra.run.dir={args.out / 'refused'}"], 300, env)  # fmt: skip
        notes.append(f"trainer.cuda_graph=true on the CPU: exit {refused[0]}, {refused[1].strip().splitlines()[-1]}")
    for graph in graphs:
        for precision in precisions:
            folder = args.out / f"bench_graph-{graph}_{precision}"
            command = [sys.executable, "-m", "lmlab.bench", "dataset=text_dir", f"dataset.path={data}", *device,
                       f"trainer.cuda_graph={graph}", f"device.matmul_precision={precision}",
                       *(["bench.steps=50", "bench.warmup=5"] if gpus else []), f"hydra.run.dir={folder}"]  # fmt: skip
            code, output, seconds = run(command, 240, env)
            if code != 0:
                notes.append(f"bench graph={graph} {precision}: exit {code}: {output.strip().splitlines()[-1:]}")
                continue
            rows.extend(bench_rows(json.loads((folder / "bench.json").read_text()), graph, precision))
    if gpus >= 2:
        folder = args.out / "ddp"
        command = ["torchrun", "--nproc_per_node=2", "-m", "lmlab.run", "dataset=text_dir", f"dataset.path={data}",
                   "trainer.epochs=1", "trainer.limit_train_batches=200", "trainer.limit_eval_batches=20",
                   f"hydra.run.dir={folder}"]  # fmt: skip
        code, output, seconds = run(command, 240, env)
        results = folder / "results.json"
        if code == 0 and results.is_file():
            r = json.loads(results.read_text())
            notes.append(f"2-process DDP: {r['train_tokens_per_sec']:,.0f} tok/s, peak GPU {r['peak_gpu_mb']:.0f} MB")
        else:
            notes.append(f"2-process DDP: exit {code}: {output.strip().splitlines()[-1:]}")
    elif gpus == 1:
        skipped.append("2-process DDP (one GPU)")
    report(rows, notes, skipped, where, args.out)


def bench_rows(r: dict, graph: str, precision: str) -> list[dict]:
    """The plain loop's rows (eager, graphed) once per precision, and lmlab's row of this run."""
    d, b = r.get("dispatch") or {}, r.get("baseline") or {}
    label = "TF32" if precision == "high" else "fp32"
    rows = [{"run": f"lmlab, {'graphed' if r['cuda_graph'] == 'on' else 'eager'}, {label}",
             "tokens_per_sec": r["train"]["tokens_per_sec"], "ms_per_step": r["train"]["ms_per_step"],
             "operators": d.get("lmlab", {}).get("operators"), "host_reads": d.get("lmlab", {}).get("host_reads"),
             "peak_gpu_mb": r["peak_gpu_mb"], "cuda_graph": r["cuda_graph"]}]  # fmt: skip
    if graph == "false" and b:
        rows.append({"run": f"plain loop, eager, {label}", "tokens_per_sec": b["tokens_per_sec"],
                     "ms_per_step": b["ms_per_step"], "operators": d.get("plain", {}).get("operators"),
                     "host_reads": d.get("plain", {}).get("host_reads")})  # fmt: skip
        if "graphed" in b:
            rows.append({"run": f"plain loop, one CUDA graph, {label}", **b["graphed"]})
    return rows


def report(rows: list[dict], notes: list[str], skipped: list[str], where: str, out: Path) -> None:
    reference = next((r["tokens_per_sec"] for r in rows if r["run"] == "plain loop, eager, fp32"), None)

    def cell(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"GPU check, {time.strftime('%Y-%m-%d')}, {where}", "",
             "| run | tokens/s | ms/step | vs plain eager fp32 | operators/step | host reads/step | peak GPU MB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r["run"]):
        ratio = r["tokens_per_sec"] / reference if reference else None
        lines.append(
            f"| {r['run']} | {r['tokens_per_sec']:,.0f} | {r['ms_per_step']:.2f} | {cell(ratio, '.2f')} | "
            f"{cell(r.get('operators'), '.0f')} | {cell(r.get('host_reads'), '.1f')} | "
            f"{cell(r.get('peak_gpu_mb'), '.0f')} |"
        )
    lines += ["", *notes, *(f"skipped: {s}" for s in skipped)]
    text = "\n".join(lines)
    print("\n" + text)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"rows": rows, "notes": notes, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
