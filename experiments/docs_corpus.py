"""Build a word-level corpus of real software documentation from a folder of .rst/.md/.txt files.

Issue #21 asks that the recipes generalise to a corpus bigger than wt2-small, where 15 minutes buy only
two or three epochs. This makes one of that shape from documentation already on a machine (here: the
reStructuredText examples and topics of the installed ``awscli`` package), WikiText-style:

- one paragraph per line; markup-only lines (``=====`` underlines, ``.. directive::``) dropped;
- tokens split at punctuation (``s3://bucket/key`` → ``s3 : // bucket / key``); words joined by ``-``,
  ``_``, ``'`` or ``.`` kept whole (``apply-archive-rule``, ``isn't``, ``1.5``); case kept;
- files go to train/valid/test by a hash of their path (no paragraph of a file is in two splits), with
  valid/test held at about ``--eval-tokens`` each and train stopped at ``--train-tokens`` (files taken in a fixed
  shuffled order, so that every split samples every part of the source);
- no vocabulary cap here: runs cap it with ``dataset.max_vocab`` (rarer train words → ``<unk>``).

    python experiments/docs_corpus.py --out /tmp/docs-corpus   # then dataset=text_dir dataset.path=...

The text is not committed (it is a package's documentation, rebuilt in seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

# A word (hyphens, underscores and apostrophes inside it kept: ``apply-archive-rule``, ``isn't``), a number,
# or a run of one punctuation mark (``::``, ``**``).
TOKEN = re.compile(r"[A-Za-z0-9]+(?:[-_'.][A-Za-z0-9]+)*|([^\sA-Za-z0-9])\1*")
MARKUP = re.compile(r"^\s*(?:[=\-~^*#+`'\"]{3,}|\.\. .*|::)\s*$")


def paragraphs(text: str) -> list[str]:
    """Paragraphs (blank-line separated) of one file as tokenised lines."""
    out, current = [], []
    for line in text.splitlines() + [""]:
        if MARKUP.match(line):
            continue
        if line.strip():
            current.extend(match.group(0) for match in TOKEN.finditer(line))
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def split_of(digest: str, eval_share: float) -> str:
    """A file's split from its path's digest (the bits its place in the shuffle does not use)."""
    bucket = int(digest[8:16], 16) / 0xFFFFFFFF
    return "valid" if bucket < eval_share else "test" if bucket < 2 * eval_share else "train"


def build(source: Path, out: Path, eval_tokens: int, train_tokens: int) -> dict[str, int]:
    files = [p for p in source.rglob("*") if p.suffix in {".rst", ".md", ".txt"} and p.is_file()]
    digests = {p: hashlib.sha256(str(p.relative_to(source)).encode()).hexdigest() for p in files}
    files.sort(key=digests.__getitem__)  # a fixed shuffle
    docs = [(digests[p], paragraphs(p.read_text(errors="replace"))) for p in files]
    total = sum(len(line.split()) for _, lines in docs for line in lines)
    eval_share = min(0.25, eval_tokens / max(total, 1))
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "valid": 0, "test": 0}
    limits = {"train": train_tokens, "valid": eval_tokens, "test": eval_tokens}
    handles = {name: (out / f"{name}.txt").open("w") for name in counts}
    try:
        for digest, lines in docs:
            name = split_of(digest, eval_share)
            if counts[name] >= limits[name]:
                continue
            for line in lines:
                handles[name].write(line + "\n")
                counts[name] += len(line.split())
    finally:
        for handle in handles.values():
            handle.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="folder of .rst/.md/.txt (default: awscli's)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-tokens", type=int, default=500_000, help="stop train at about this many tokens")
    parser.add_argument("--eval-tokens", type=int, default=60_000, help="about this many tokens in valid and test")
    args = parser.parse_args()
    source = args.source
    if source is None:
        try:
            import awscli
        except ImportError:
            sys.exit("no --source given and awscli is not installed; give a folder of documentation: --source DIR")
        source = Path(awscli.__file__).parent
    counts = build(source, args.out, args.eval_tokens, args.train_tokens)
    vocab = len({w for line in (args.out / "train.txt").open() for w in line.split()})
    print(f"{args.out}: " + ", ".join(f"{k} {v:,} tokens" for k, v in counts.items()) + f"; train vocabulary {vocab:,}")


if __name__ == "__main__":
    main()
