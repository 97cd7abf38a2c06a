"""Does every model option learn with the defaults it gets? Trains each ``conf/model`` option at its real
default sizes, with the optimizer and schedule its config brings, for a few steps on a real corpus, and
prints the validation loss beside the uniform guess ln V, for several seeds (experiments/defaults.md).

    python experiments/defaults_check.py DATA_DIR [--steps 20] [--eval-batches 20] [--seeds 1111 1 2]
        [--models lstm gru ...] [--set KEY=VALUE ...]

DATA_DIR holds train.txt, valid.txt, test.txt; --set adds a Hydra override to every run.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lmlab.config import CONF_DIR
from lmlab.factory import build_training_objects, checkpoint_meta
from lmlab.loggers import Logger


def model_options() -> list[str]:
    return sorted(p.stem for p in Path(CONF_DIR, "model").glob("*.yaml"))


def validation_loss(overrides: list[str]) -> tuple[float, int, str, float]:
    """(best validation loss, vocabulary size, optimizer, seconds) of one short run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=overrides)
    started = time.perf_counter()
    objects = build_training_objects(cfg)
    with tempfile.TemporaryDirectory() as out:
        fit = objects.trainer.fit(
            objects.model, objects.data, objects.optimizer, objects.schedule, objects.device, Path(out),
            Logger(), checkpoint_meta(cfg, objects.data.vocab.words),
        )  # fmt: skip
    optimizer = f"{type(objects.optimizer).__name__} lr {cfg.optimizer.lr:g}"
    return fit.best_val_loss, len(objects.data.vocab), optimizer, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111, 1, 2])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print("| model | optimizer | seed | val loss | ln V | val ppl | s |\n|---|---|---|---|---|---|---|")
    for model in args.models or model_options():
        for seed in args.seeds:
            overrides = [
                f"model={model}", f"seed={seed}", "dataset=text_dir", f"dataset.path={args.data}", "device=cpu",
                "trainer.epochs=1", f"trainer.limit_train_batches={args.steps}",
                f"trainer.limit_eval_batches={args.eval_batches}", "hooks.progress.bar=false", *args.overrides,
            ]  # fmt: skip
            loss, vocab, optimizer, seconds = validation_loss(overrides)
            row = [model, optimizer, seed, f"{loss:.3f}", f"{math.log(vocab):.3f}", f"{math.exp(min(loss, 700)):.4g}"]
            print("| " + " | ".join(map(str, [*row, f"{seconds:.0f}"])) + " |", flush=True)


if __name__ == "__main__":
    main()
