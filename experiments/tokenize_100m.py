"""Benchmark: tokenise a generated 100 M-token corpus (WikiText-103-shaped), cold and from the cache.

    python experiments/tokenize_100m.py [--tokens 100000000] [--dir /tmp/lmlab-100m]

Writes the corpus once (Zipf-distributed words over a 267,735-word vocabulary, ~57 words per line as in
WikiText-103), then times ``Corpus.from_files`` in a fresh process pinned to one core: first with no
cache (tokenise + write the memory-mapped cache), then again (load the cache). Each child reports its
wall time and peak RSS (ru_maxrss). Figures go to experiments/tokenize.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VOCAB = 267_735
WORDS_PER_LINE = 57


def make_corpus(folder: Path, tokens: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, rng.integers(2, 11))) + str(i) for i in range(VOCAB)], dtype=object)
    weights = 1.0 / np.arange(1, VOCAB + 1)
    cdf = np.cumsum(weights / weights.sum())
    for split, n in (("train", tokens), ("valid", 217_646), ("test", 245_569)):
        with open(folder / f"{split}.txt", "w") as f:
            done = 0
            while done < n:
                chunk = min(2_000_000, n - done)
                drawn = words[np.minimum(np.searchsorted(cdf, rng.random(chunk)), VOCAB - 1)]
                lengths = rng.integers(1, 2 * WORDS_PER_LINE, size=chunk // WORDS_PER_LINE + 2)
                ends = np.minimum(np.cumsum(lengths), chunk)
                starts = np.concatenate(([0], ends[:-1]))
                f.write("\n".join(" ".join(drawn[a:b]) for a, b in zip(starts, ends, strict=True) if b > a) + "\n")
                done += chunk


CHILD = """
import json, resource, sys, time
started = time.perf_counter()
from pathlib import Path
import torch
torch.set_num_threads(1)
from lmlab.data.corpus import Corpus
folder = Path(sys.argv[1])
corpus = Corpus.from_files({s: folder / f"{s}.txt" for s in ("train", "valid", "test")})
seconds = time.perf_counter() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": peak_mb, "train_tokens": len(corpus.train),
                  "vocab": len(corpus.vocab), "dtype": str(corpus.train.dtype)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lmlab-100m"))
    args = parser.parse_args()
    if not (args.dir / "test.txt").is_file():
        started = time.perf_counter()
        make_corpus(args.dir, args.tokens)
        print(f"generated {args.dir} in {time.perf_counter() - started:.0f} s", flush=True)
    for cache in args.dir.glob(".lmlab-cache-*"):
        cache.unlink()
    size_mb = sum(p.stat().st_size for p in args.dir.glob("*.txt")) / 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for label in ("cold (tokenise + write cache)", "warm (memory-mapped cache)"):
        out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", CHILD, str(args.dir)],
                             capture_output=True, text=True, env=env, check=True)  # fmt: skip
        print(f"{label}: {json.loads(out.stdout)}  [{size_mb:.0f} MB of text]", flush=True)


if __name__ == "__main__":
    main()
