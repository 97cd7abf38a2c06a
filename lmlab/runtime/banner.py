"""The lines a run starts with: what runs where, then — as soon as each is known — the data, the model and
the plan, so that a run redirected to a file says what it is doing long before its first progress line.

    lmlab run: python -m lmlab.run model=lstm trainer.epochs=20
    run folder: outputs/2026-12-08/10-21-07.123456
    device: cpu (AVX2), 2 threads, precision fp32
    data: wikitext2 at /data/wikitext-2: vocabulary 33,278 | tokens train 2,088,628, valid 217,646, test 245,569
    model: rnn, cell lstm (RNNLanguageModel), 28,434,378 parameters
    plan: 20 epochs of 2,983 steps (batch 20 x 35 tokens); Ctrl-C stops after the step and saves last.pt (the
          line it prints resumes the run)

The first two lines are printed by ``lmlab.run`` before torch is imported; each function here returns one of the
others; the caller prints it (and :mod:`lmlab.runtime.run_log` keeps it in run.log).
"""

from __future__ import annotations

from typing import Any

import torch

from lmlab.runtime import devices
from lmlab.runtime.devices import cpu_isa


def device_line(device: torch.device, precision: str) -> str:
    where = f"cpu ({cpu_isa()})" if device.type == "cpu" else str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    threads = f"{torch.get_num_threads()} threads" if devices.thread_choice is None else devices.thread_choice
    return f"device: {where}, {threads}, precision {precision}"


def data_line(name: str, data: Any) -> str:
    corpus = data.corpus
    sizes = ", ".join(f"{split} {getattr(corpus, split).numel():,}" for split in ("train", "valid", "test"))
    return f"data: {name} at {data.path}: vocabulary {len(data.vocab):,} | tokens {sizes}"


def model_line(name: str, model: torch.nn.Module) -> str:
    return f"model: {name} ({type(model).__name__}), {sum(p.numel() for p in model.parameters()):,} parameters"


def plan_line(epochs: int, steps: int, batch_size: int, bptt: int, processes: int = 1) -> str:
    spread = f" over {processes} processes" if processes > 1 else ""
    return (
        f"plan: {epochs} epoch{'s' * (epochs != 1)} of {steps:,} steps (batch {batch_size} x {bptt} tokens){spread}; "
        "Ctrl-C stops after the step and saves last.pt (the line it prints resumes the run)"
    )
