"""Write a synthetic corpus with WikiText-2's vocabulary size and split sizes (for memory and speed
measurements where the real train split is not at hand; its perplexities mean nothing).

    python experiments/synthetic_corpus.py /tmp/v33k
    python -m lmlab.run dataset=text_dir dataset.path=/tmp/v33k trainer.epochs=1 trainer.limit_train_batches=40
"""

import sys
from pathlib import Path

import numpy as np

VOCAB = 33_278  # WikiText-2's vocabulary, <eos> included
SPLITS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}  # WikiText-2's token counts
WORDS_PER_LINE = 20


def main(folder: Path) -> None:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(VOCAB)])
    zipf = 1 / np.arange(1, VOCAB + 1) ** 1.1
    for split, n_tokens in SPLITS.items():
        ids = rng.choice(VOCAB, size=n_tokens, p=zipf / zipf.sum())
        if split == "train":
            ids[:VOCAB] = np.arange(VOCAB)  # every word occurs in train, so the vocabulary is full size
        lines = np.array_split(words[ids], n_tokens // WORDS_PER_LINE)
        (folder / f"{split}.txt").write_text("".join(" ".join(line) + "\n" for line in lines))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    main(target)
