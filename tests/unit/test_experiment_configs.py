"""Every recipe (``conf/experiment/``) and every kept search candidate (``experiments/search/conf/experiment/``)
composes with today's keys and passes the checks a run makes before any work: a page in ``experiments/`` that
names one can be rerun as written."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lmlab.config import CONF_DIR
from lmlab.factory import refuse_unread_keys
from lmlab.validation import validate_config

SEARCH = Path(__file__).resolve().parents[2] / "experiments" / "search" / "conf"
RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
CANDIDATES = sorted(p.stem for p in (SEARCH / "experiment").glob("*.yaml"))


def _checked(overrides: list[str]) -> None:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("run", overrides=overrides)
        refuse_unread_keys(cfg)
        validate_config(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_and_passes_the_checks(name):
    _checked([f"+experiment={name}"])


@pytest.mark.parametrize("name", CANDIDATES)
def test_every_kept_search_candidate_composes_and_passes_the_checks(name, monkeypatch):
    monkeypatch.syspath_prepend(str(SEARCH.parent))  # a candidate's own hook (plugins=[dropout_curriculum])
    _checked([f"hydra.searchpath=[file://{SEARCH}]", f"+experiment={name}"])


def test_there_are_candidates_to_check():
    assert len(RECIPES) >= 8 and len(CANDIDATES) >= 10  # a moved folder must not make the tests above vacuous
