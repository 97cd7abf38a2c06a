"""Shared fixtures: tiny corpora written to a temp dir, and Hydra config composition."""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lmlab.config import CONF_DIR

# Corpus caches that cannot go beside their data (a read-only folder) go here, never to ~/.cache;
# subprocesses of the tests inherit it.
# A user's plugin module lives outside lmlab/, here: `plugins=[my_extensions]` imports it from there.
sys.path.insert(0, str(Path(__file__).resolve().parent / "plugins"))
TEST_CACHE = tempfile.mkdtemp(prefix="lmlab-test-cache-")
# End-to-end commands start where a user starts them: a working folder of their own, never the checkout (from
# there `python -m lmlab...` imports the installed lmlab, as a user's does; CI installs the built wheel).
USER_DIR = Path(tempfile.mkdtemp(prefix="lmlab-user-"))
os.environ["LMLAB_CACHE_DIR"] = TEST_CACHE
# Real text for the few tests that use it: the folder LMLAB_DATA_DIR names (CI sets it), else the team's
# data folder beside the checkout.
SHARED_DATA = Path(os.environ.get("LMLAB_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Parallel workers (``-n auto``) share the cores: each trains in-process on one thread, or two workers on
    # two cores run four threads and each step waits for the other's. (The commands the tests start set
    # their own: TINY's device.num_threads=1.)
    import torch

    torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    from tests.commands import close_server

    close_server()  # this process's warm interpreter for lmlab commands (tests/commands.py)
    shutil.rmtree(TEST_CACHE, ignore_errors=True)  # the suite leaves nothing in /tmp
    shutil.rmtree(USER_DIR, ignore_errors=True)


NOUNS = "cat dog bird fish horse mouse lion bear wolf fox".split()
VERBS = "sees chases likes bites follows".split()


def make_sentences(n: int, seed: int) -> list[str]:
    """A learnable toy language: 'the NOUN VERB the NOUN .' with some fixed noun/verb pairings."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        subject = rng.choice(NOUNS)
        verb = VERBS[NOUNS.index(subject) % len(VERBS)]  # the verb is predictable from the subject
        lines.append(f"the {subject} {verb} the {rng.choice(NOUNS)} .")
    return lines


def write_corpus(folder: Path, train: int = 400, valid: int = 80, test: int = 80) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", train, 1), ("valid", valid, 2), ("test", test, 3)):
        (folder / f"{name}.txt").write_text("\n".join(make_sentences(n, seed)) + "\n")
    return folder


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (read-only real text), or skip where it is not beside the checkout."""
    if not (SHARED_DATA / "wikitext-2" / "wiki.valid.tokens").is_file():
        pytest.skip(f"{SHARED_DATA} is not here")
    return SHARED_DATA


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


# Small and fast: every end-to-end test starts from these and adds its own overrides.
TINY = [
    "dataset=text_dir",
    "dataset.batch_size=4",
    "dataset.eval_batch_size=4",
    "dataset.bptt=8",
    "model.embed_dim=32",
    "model.hidden_dim=32",
    "model.dropout=0.0",
    "trainer.epochs=3",
    "optimizer.lr=5",
    "hooks.progress.bar=false",
    "generate.num_words=5",
    "device=cpu",
    "device.num_threads=1",  # tiny ops: one thread is faster and never oversubscribes CI's 2 cores
]


@pytest.fixture
def compose_cfg():
    """compose_cfg(overrides, config_name='run') → a composed DictConfig (Hydra state cleared)."""

    def _compose(overrides: list[str], config_name: str = "run"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name, overrides=overrides)

    yield _compose
    GlobalHydra.instance().clear()


def train_tiny_run(folder: Path) -> tuple[Path, Path, list[str], dict]:
    """One finished 1-epoch TINY run under ``folder`` (for module-scoped fixtures that share it):
    its run folder, its corpus, the overrides it used, and its results."""
    from lmlab.job import train_and_report

    corpus = write_corpus(folder / "corpus")
    overrides = [*TINY, f"dataset.path={corpus}", "trainer.epochs=1"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        results = train_and_report(compose("run", overrides=overrides), folder / "run")
    GlobalHydra.instance().clear()
    return folder / "run", corpus, overrides, results


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One finished 1-epoch TINY run for the whole session (:func:`train_tiny_run`), for tests that only read
    its files (its checkpoint as an ensemble member, a copy to damage): never change them."""
    return train_tiny_run(tmp_path_factory.mktemp("trained"))
