"""Is lmlab's training at pytorch/examples' recipe the peer's, piece by piece? Four checks, each against the peer's
own code (its data.py and model.py, imported from the fetched checkout, never copied):

1. data: both read the same token stream from each split (the same words, in order, ``<eos>`` included);
2. model: with the same weights and no dropout, the same loss and gradients on one window;
3. training loop: from the same weights, no dropout, the same weights after N steps of SGD + clipping
   (lr 20 amplifies float rounding, so the difference grows from ~1e-8; it is printed per step count);
4. evaluation: lmlab's validation of the peer's trained weights gives the peer's own figure.

    python experiments/peer_equivalence.py CLOSED_DATA_DIR --peer /tmp/examples/word_language_model \\
        [--peer-checkpoint PEER_RUN.pt --peer-val-ppl 343.34]

CLOSED_DATA_DIR: the closed-vocabulary copy experiments/peer_parity.py writes (WORK/closed). Check 4 needs a
model the peer saved (its ``--save``, a pickled module: loaded with ``weights_only=False``, so only a file this
experiment itself made) and the validation perplexity the peer printed for it. Results: experiments/peer_parity.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from lmlab.config import CONF_DIR
from lmlab.factory import build_training_objects

NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def lmlab_objects(data: Path, dropout: float):
    overrides = ["dataset=text_dir", f"dataset.path={data}", "model.embed_dim=200", "model.hidden_dim=200",
                 f"model.dropout={dropout}", "scheduler.warmup_steps=0", "device=cpu"]  # fmt: skip
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return build_training_objects(compose("run", overrides=overrides))


def copy_weights(lm, peer, permutation: torch.Tensor | None = None, to_peer: bool = True) -> None:
    """lmlab's weights into the peer's model (or back), vocabulary rows in the other's order."""
    rows = slice(None) if permutation is None else permutation
    with torch.no_grad():
        if to_peer:
            peer.encoder.weight.copy_(lm.embedding.weight[rows])
            peer.decoder.bias.copy_(lm.decoder.bias[rows])
        else:
            lm.embedding.weight.copy_(peer.encoder.weight[rows])
            lm.decoder.bias.copy_(peer.decoder.bias[rows])
        for layer in range(2):
            for name in NAMES:
                ours, theirs = getattr(lm.rnns[layer], f"{name}_l0"), getattr(peer.rnn, f"{name}_l{layer}")
                (theirs if to_peer else ours).copy_(ours if to_peer else theirs)


def check_data(data: Path, peer_data) -> tuple:
    from lmlab.data.corpus import Corpus

    theirs = peer_data.Corpus(str(data))
    ours = Corpus.from_files({s: data / f"{s}.txt" for s in ("train", "valid", "test")}, cache=False)
    for split in ("train", "valid", "test"):
        same = [theirs.dictionary.idx2word[i] for i in getattr(theirs, split).tolist()] == ours.vocab.decode(
            getattr(ours, split).long().tolist()
        )
        print(f"1. data, {split}: {len(getattr(ours, split)):,} tokens, the same stream: {same}")
    return theirs, ours


def check_model(peer_model) -> None:
    from lmlab.models.rnn import RNNLanguageModel

    torch.manual_seed(0)
    vocab, width, steps, batch = 500, 32, 7, 4
    peer = peer_model.RNNModel("LSTM", vocab, width, width, 2, dropout=0.0, tie_weights=True)
    lm = RNNLanguageModel(vocab, embed_dim=width, hidden_dim=width, num_layers=2, dropout=0.0)
    copy_weights(lm, peer, to_peer=False)
    x, y = torch.randint(vocab, (steps, batch)), torch.randint(vocab, (steps, batch))
    out, _ = peer(x, peer.init_hidden(batch))
    F.nll_loss(out, y.view(-1)).backward()
    features, _ = lm(x, lm.init_state(batch))
    loss = lm.loss(features, y)
    loss.backward()
    worst = max(
        (getattr(peer.rnn, f"{n}_l{i}").grad - getattr(lm.rnns[i], f"{n}_l0").grad).abs().max().item()
        for i in range(2)
        for n in NAMES
    )
    worst = max(worst, (peer.encoder.weight.grad - lm.embedding.weight.grad.to_dense()).abs().max().item())
    print(f"2. model: loss {F.nll_loss(out, y.view(-1)).item():.7f} (peer) vs {loss.item():.7f}; largest gradient "
          f"difference {worst:.1e}")  # fmt: skip


def check_loop(data: Path, peer_model, steps: list[int]) -> None:
    for n in steps:
        objects = lmlab_objects(data, dropout=0.0)
        lm, stream = objects.model, objects.data.stream("train")
        peer = peer_model.RNNModel("LSTM", len(objects.data.vocab), 200, 200, 2, dropout=0.0, tie_weights=True)
        copy_weights(lm, peer)
        objects.trainer.train_steps(lm, stream, objects.optimizer, objects.device, n)
        tokens, hidden, criterion = stream.columns.long(), peer.init_hidden(stream.batch_size), nn.NLLLoss()
        for start in range(0, 35 * n, 35):  # the peer's own train(): detach, zero_grad, clip, p -= lr * grad
            hidden = tuple(h.detach() for h in hidden)
            peer.zero_grad()
            out, hidden = peer(tokens[start : start + 35], hidden)
            criterion(out, tokens[start + 1 : start + 36].reshape(-1)).backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), 0.25)
            for p in peer.parameters():
                p.data.add_(p.grad, alpha=-20)
        diff = (peer.encoder.weight - lm.embedding.weight).abs().max().item()
        print(f"3. loop: after {n:3d} steps the largest weight difference is {diff:.1e} "
              f"(weights up to {peer.encoder.weight.abs().max().item():.2f})")  # fmt: skip


def check_evaluation(data: Path, theirs, checkpoint: Path, printed: float) -> None:
    objects = lmlab_objects(data, dropout=0.2)
    peer = torch.load(checkpoint, weights_only=False)  # the peer's own pickled module, made by this experiment
    order = torch.tensor([theirs.dictionary.word2idx[w] for w in objects.data.vocab.words])
    copy_weights(objects.model, peer, order, to_peer=False)
    loss = objects.trainer.evaluate(objects.model, objects.data.stream("valid"), objects.device)
    print(f"4. evaluation: lmlab scores the peer's trained model at val ppl {math.exp(loss):.2f}; the peer printed "
          f"{printed:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--peer", type=Path, required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20, 30])
    parser.add_argument("--peer-checkpoint", type=Path)
    parser.add_argument("--peer-val-ppl", type=float)
    args = parser.parse_args()
    sys.path.insert(0, str(args.peer.resolve()))
    import data as peer_data
    import model as peer_model

    theirs, _ = check_data(args.data, peer_data)
    check_model(peer_model)
    check_loop(args.data, peer_model, args.steps)
    if args.peer_checkpoint:
        check_evaluation(args.data, theirs, args.peer_checkpoint, args.peer_val_ppl)


if __name__ == "__main__":
    main()
