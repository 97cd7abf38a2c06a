"""``python -m lmlab.bench [any lmlab.run overrides] [bench.steps=N]``: how fast, against what limit.

Measures this machine's matmul peak (fp32, and bf16 where supported), then times ``bench.steps``
training steps and evaluation steps of the configured model after ``bench.warmup`` steps, through the
same :class:`~lmlab.training.trainer.Trainer` code a run uses. Model FLOPs per token are counted from the layer
shapes (forward; training = 3× forward), so "achieved GFLOP/s" is useful work, not hardware counters.
Prints a summary and writes ``bench.json`` to the run folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import astuple
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lmlab.runtime.cpu_load  # noqa: F401  (first of lmlab: its sample of the machine's load starts now)
from lmlab.config import CONF_DIR
from lmlab.config.help import answer_help
from lmlab.data.batching import TokenStream
from lmlab.factory import build, build_training_objects
from lmlab.runtime.devices import bf16_support, cpu_isa, peak_gpu_mb, peak_rss_mb, resolve_precision, synchronize
from lmlab.runtime.dispatch import DispatchCount, as_on_an_accelerator, count_dispatch, reads_are_free
from lmlab.runtime.files import atomic_write_text
from lmlab.runtime.job_records import task_wrapper, write_run_record
from lmlab.validation import model_arguments

from .plain_loop import BASELINES, PlainLoop


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    """Best GFLOP/s of square ``size`` matmuls over ~``seconds`` (after one warm-up product)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def benchmark(cfg: DictConfig) -> dict[str, Any]:
    steps, warmup = cfg.bench.steps, cfg.bench.warmup
    objects = build_training_objects(cfg)
    device, data, model, optimizer, trainer = (
        objects.device,
        objects.data,
        objects.model,
        objects.optimizer,
        objects.trainer,
    )
    # A step as a run takes it, guarded by the run's non-finite policy; no checkpoints, no progress.
    step_hooks = [objects.hooks["non_finite"]] if "non_finite" in objects.hooks else []
    train_stream, eval_stream = data.stream("train").to(device), data.stream("valid").to(device)

    peak = {"fp32": matmul_peak_gflops(device, torch.float32, cfg.bench.matmul_size)}
    if bf16_support(device):
        peak["bf16"] = matmul_peak_gflops(device, torch.bfloat16, cfg.bench.matmul_size)

    def timed_train(n: int) -> tuple[float, int]:
        start = time.perf_counter()
        tokens = trainer.train_steps(model, train_stream, optimizer, device, n, step_hooks)
        synchronize(device)
        return time.perf_counter() - start, tokens

    def timed_eval(n: int) -> tuple[float, int]:
        start = time.perf_counter()
        trainer.evaluate(model, eval_stream, device, limit=n)
        synchronize(device)
        return time.perf_counter() - start, sum(w.targets.numel() for w in eval_stream.windows(limit=n))

    timed_train(warmup)
    train_s, train_tokens = timed_train(steps)
    timed_eval(warmup)
    eval_s, eval_tokens = timed_eval(steps)
    # lmlab's own footprint, before the plain loop's model and the profiler's event buffers join it
    memory = {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(device)}

    plain = _plain_loop(cfg, len(data.vocab), device)
    baseline = _time_plain(plain, train_stream, steps, warmup) if plain else None
    dispatch = _dispatch(cfg, trainer, model, optimizer, train_stream, step_hooks, plain)
    flops = model.flops_per_token(data.corpus.train)
    train_tps, eval_tps = train_tokens / train_s, eval_tokens / eval_s
    precision = resolve_precision(cfg.trainer.precision, device)
    reference_peak = peak["bf16" if precision in ("bf16", "fp16") and "bf16" in peak else "fp32"]
    # A model that does not count its FLOPs (an optional capability) gets speeds without rates of peak.
    train_gflops = None if flops is None else 3 * flops["forward"] * train_tps / 1e9
    eval_gflops = None if flops is None else flops["forward"] * eval_tps / 1e9
    return {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa(),
        "precision": precision,
        "matmul_peak_gflops": peak,
        "model": {
            "name": cfg.model.name,
            "arguments": model_arguments(cfg.model),
            "vocab_size": len(data.vocab),
            "num_params": sum(p.numel() for p in model.parameters()),
        },
        "batch_size": data.batch_size,
        "eval_batch_size": data.eval_batch_size,
        "bptt": data.bptt,
        "steps": steps,
        "flops_per_token": flops and {**flops, "train": 3 * flops["forward"]},
        "train": {
            "tokens_per_sec": train_tps,
            "ms_per_step": 1000 * train_s / steps,
            "gflops": train_gflops,
            "fraction_of_peak": train_gflops and train_gflops / reference_peak,
        },
        "eval": {
            "tokens_per_sec": eval_tps,
            "ms_per_step": 1000 * eval_s / steps,
            "gflops": eval_gflops,
            "fraction_of_peak": eval_gflops and eval_gflops / reference_peak,
            "speedup_over_train": eval_tps / train_tps,
        },
        "cuda_graph": trainer.cuda_graph_status,
        "baseline": baseline and {**baseline, "lmlab_over_plain": train_tps / baseline["tokens_per_sec"]},
        "dispatch": dispatch,
        **memory,
    }


def _plain_loop(cfg: DictConfig, vocab_size: int, device: torch.device) -> PlainLoop | None:
    """The plain PyTorch loop of the same shapes and optimizer (None: off, or none for this model)."""
    make = BASELINES.get(cfg.model.name)
    if not cfg.bench.baseline or make is None:
        return None
    model = make(vocab_size, model_arguments(cfg.model))
    if model is None:
        return None
    model = model.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg.trainer.precision, device))
    return PlainLoop(model, build(cfg.optimizer)(model.parameters()), cfg.trainer.clip_grad_norm, dtype)


def _time_plain(plain: PlainLoop, stream: TokenStream, steps: int, warmup: int) -> dict[str, Any]:
    """The plain loop eagerly and, on a GPU, its whole step captured in a CUDA graph."""
    seconds, tokens = plain.time(stream, steps, warmup)
    timed: dict[str, Any] = {"tokens_per_sec": tokens / seconds, "ms_per_step": 1000 * seconds / steps}
    if stream.columns.device.type == "cuda":
        seconds, tokens = plain.time_graphed(stream, steps, warmup)
        windows = tokens / (stream.bptt * stream.batch_size)
        timed["graphed"] = {"tokens_per_sec": tokens / seconds, "ms_per_step": 1000 * seconds / windows}
    return timed


def _dispatch(cfg, trainer, model, optimizer, stream, hooks, plain: PlainLoop | None) -> dict[str, Any] | None:
    """Operators and host reads per training step, for lmlab and the plain loop (``bench.dispatch_steps``
    profiled steps each). Counted as the difference between two runs of different length, so the
    once-per-epoch set-up of a pass does not count as per-step work. On a CPU, lmlab's step is counted
    again under the accelerator's no-read policy (what a GPU step would read)."""
    n = cfg.bench.dispatch_steps
    if not n:
        return None
    device = stream.columns.device

    def per_step(run: Any) -> DispatchCount:
        short, long = count_dispatch(lambda: run(1)), count_dispatch(lambda: run(1 + n))
        return DispatchCount(*((b - a) / n for a, b in zip(astuple(short), astuple(long), strict=True)))

    def lmlab_steps(k: int) -> int:
        return trainer.train_steps(model, stream, optimizer, device, k, hooks)

    result: dict[str, Any] = {"steps": n, "lmlab": per_step(lmlab_steps).as_dict()}
    if reads_are_free(device):
        with as_on_an_accelerator():
            result["lmlab_accelerator_policy"] = per_step(lmlab_steps).as_dict()
    if plain is not None:
        result["plain"] = per_step(lambda k: plain.train(stream.windows(limit=k), k)).as_dict()
        result["lmlab_over_plain"] = result["lmlab"]["operators"] / result["plain"]["operators"]
    return result


def _rate(part: dict[str, Any]) -> str:
    if part["gflops"] is None:
        return ""
    return f" | {part['gflops']:.1f} GFLOP/s = {100 * part['fraction_of_peak']:.0f}% of peak"


def summary(r: dict[str, Any]) -> str:
    m, t, e, flops = r["model"], r["train"], r["eval"], r["flops_per_token"]
    gpu = "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
    peaks = ", ".join(f"{k} {v:,.0f}" for k, v in r["matmul_peak_gflops"].items())
    return "\n".join(
        [
            f"device {r['device']} ({r['torch_threads']} threads, CPU {r.get('cpu_isa', '?')}) "
            f"| matmul peak GFLOP/s: {peaks}",
            f"model {m['name']} {_brief(m['arguments'])} | vocab {m['vocab_size']:,} | {m['num_params']:,} params "
            f"| batch {r['batch_size']} bptt {r['bptt']} | {r['precision']}",
            "FLOPs/token: not counted by this model (flops_per_token)"
            if flops is None
            else f"FLOPs/token: forward {flops['forward'] / 1e6:.2f} M, train {flops['train'] / 1e6:.2f} M",
            f"train: {t['tokens_per_sec']:,.0f} tok/s | {t['ms_per_step']:.1f} ms/step{_rate(t)}",
            f"eval:  {e['tokens_per_sec']:,.0f} tok/s | {e['ms_per_step']:.1f} ms/step{_rate(e)} "
            f"| {e['speedup_over_train']:.1f}x train",
            _baseline_line(r),
            *_dispatch_lines(r),
            f"peak RSS {r['peak_rss_mb']:.0f} MB | peak GPU {gpu} MB",
        ]
    )


def _brief(arguments: dict[str, Any]) -> str:
    """The model's size-defining arguments, e.g. ``cell=lstm embed_dim=650 hidden_dim=650 num_layers=2``."""
    keys = ("cell", "embed_dim", "hidden_dim", "d_model", "num_heads", "num_layers", "softmax", "context")
    return " ".join(f"{k}={arguments[k]}" for k in keys if k in arguments)


def _baseline_line(r: dict[str, Any]) -> str:
    b = r["baseline"]
    graph = f"lmlab's CUDA graph: {r['cuda_graph']}"
    if b is None:
        return f"plain PyTorch loop: not timed (bench.baseline=false, or none for these model settings) | {graph}"
    line = (
        f"plain PyTorch loop, same shapes: {b['tokens_per_sec']:,.0f} tok/s | {b['ms_per_step']:.1f} ms/step "
        f"| lmlab/plain {b['lmlab_over_plain']:.2f}x | {graph}"
    )
    if "graphed" in b:
        g = b["graphed"]
        line += f"\nplain loop in one CUDA graph: {g['tokens_per_sec']:,.0f} tok/s | {g['ms_per_step']:.2f} ms/step"
    return line


def _dispatch_lines(r: dict[str, Any]) -> list[str]:
    d = r["dispatch"]
    if d is None:
        return []

    def shown(c: dict[str, float]) -> str:
        return f"{c['operators']:.1f} operators ({c['nested']:.0f} nested), {c['host_reads']:.1f} host reads"

    lines = [f"per training step: lmlab {shown(d['lmlab'])}"]
    if "plain" in d:
        lines.append(
            f"                   plain {shown(d['plain'])} | lmlab/plain {d['lmlab_over_plain']:.2f}x operators"
        )
    if "lmlab_accelerator_policy" in d:
        lines.append(f"  as on a GPU (no-read policy): lmlab {shown(d['lmlab_accelerator_policy'])}")
    return lines


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
@task_wrapper
def bench(cfg: DictConfig) -> dict[str, Any]:
    result = benchmark(cfg)
    folder = Path(HydraConfig.get().runtime.output_dir)
    write_run_record(cfg, folder)
    out = folder / "bench.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"written to {out}")
    return result


def main() -> None:
    answer_help(
        "lmlab.bench", "bench", "python -m lmlab.bench [any lmlab.run overrides] [bench.steps=N] [bench.baseline=false]"
    )
    bench()


if __name__ == "__main__":
    main()
