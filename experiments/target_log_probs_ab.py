"""A/B in one process: a pointer model's training step with the fused per-token output layer
(``lmlab.models.output.linear_target_log_probs``) against the plain ``log_softmax(linear(h)).gather``,
same model, same data, steps alternated in blocks so that both see the same machine state.

    python experiments/target_log_probs_ab.py --model pointer_transformer --vocab 13800   # cpu_transformer
    python experiments/target_log_probs_ab.py --model pointer_rnn --vocab 13800           # a full-softmax LSTM

(cpu_fast's LSTM scores words with an adaptive softmax, which has its own per-target path.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmlab.models import build_model, map_tensors, output, rnn, transformer
from lmlab.runtime.devices import tune_cpu_heap

SHAPES = {  # the recipes' models (conf/experiment/cpu_transformer.yaml, cpu_fast.yaml)
    "pointer_transformer": dict(pointer_window=1000, d_model=192, num_heads=3, num_layers=2, ff_dim=768,
                                dropout=0.1, dropout_attention=0.05, dropout_embedding=0.05, context=128),
    "pointer_rnn": dict(pointer_window=1000, cell="lstm", embed_dim=200, hidden_dim=400, num_layers=2,
                        tie_weights=True, dropout=0.2),  # cpu_fast's sizes with a full softmax
}  # fmt: skip


def plain(features, weight, bias, targets):
    return F.log_softmax(F.linear(features, weight, bias).float(), -1).gather(1, targets.unsqueeze(1)).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="pointer_transformer")
    parser.add_argument("--vocab", type=int, default=13800)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_cpu_heap("reuse")  # as the trainer does (device.cpu_heap)
    torch.manual_seed(0)
    model = build_model(args.model, args.vocab, **SHAPES[args.model]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, args.vocab, (args.bptt * 50 + 1, args.batch))
    state, position = model.init_state(args.batch), 0
    fused = output.linear_target_log_probs

    def step() -> None:
        nonlocal state, position
        if position + args.bptt + 1 > data.size(0):
            position = 0
        x, y = data[position : position + args.bptt], data[position + 1 : position + args.bptt + 1]
        position += args.bptt
        features, state = model(x, map_tensors(state, torch.Tensor.detach))
        optimizer.zero_grad(set_to_none=True)
        model.loss(features, y).backward()
        optimizer.step()

    def use(fn) -> None:  # the name each model module calls
        rnn.linear_target_log_probs = transformer.linear_target_log_probs = fn

    times: dict[str, list[float]] = {"plain": [], "fused": []}
    for fn in (plain, fused):  # warm-up of both
        use(fn)
        for _ in range(3):
            step()
    for _ in range(args.blocks):
        for name, fn in (("plain", plain), ("fused", fused)):
            use(fn)
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    use(fused)
    plain_ms, fused_ms = (1000 * statistics.median(times[k]) for k in ("plain", "fused"))
    tokens = args.batch * args.bptt
    steps = len(times["plain"])
    print(f"{args.model}, vocab {args.vocab}, {tokens} tokens/step, 1 thread, median of {steps} steps each")
    print(f"plain log_softmax+gather: {plain_ms:7.1f} ms/step  {1000 * tokens / plain_ms:6.0f} tok/s")
    speedup = plain_ms / fused_ms
    print(f"fused (output.py):        {fused_ms:7.1f} ms/step  {1000 * tokens / fused_ms:6.0f} tok/s  ({speedup:.2f}x)")


if __name__ == "__main__":
    main()
