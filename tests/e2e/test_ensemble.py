"""Ensembles: the mixture weights are the best on the data they are fitted to, a model with itself is the
model, ``lmlab.evaluate method=ensemble`` and ``+sweep=cpu_ensemble`` report them, mismatched members are
refused in one line."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmlab.evaluation.ensemble import mixture_loss, mixture_weights
from tests.commands import lmlab
from tests.conftest import TINY, train_tiny_run, write_corpus
from tests.e2e.test_sweeps import multirun

ROOT = Path(__file__).resolve().parents[2]


def test_mixture_weights_are_the_best_mixture():
    generator = torch.Generator().manual_seed(0)
    good_first = torch.rand(4000, generator=generator, dtype=torch.float64) * 0.5 + 0.3
    good_second = torch.rand(4000, generator=generator, dtype=torch.float64) * 0.5 + 0.3
    # each member is good on its own half of the targets and poor on the other
    probs = torch.stack([torch.cat([good_first[:2000], good_first[2000:] * 0.05]),
                         torch.cat([good_second[:2000] * 0.02, good_second[2000:]])])  # fmt: skip
    weights = mixture_weights(probs)
    assert weights.sum().item() == pytest.approx(1.0) and (weights > 0).all()
    grid = min(mixture_loss(probs, torch.tensor([w, 1 - w], dtype=torch.float64)) for w in torch.linspace(0, 1, 1001))
    assert mixture_loss(probs, weights) <= grid + 1e-9
    assert mixture_loss(probs, weights) < min(mixture_loss(probs, torch.eye(2, dtype=torch.float64)[k]) for k in (0, 1))

    dominated = torch.stack([good_first, good_first * 0.5])  # never better anywhere: its weight goes to 0
    assert mixture_weights(dominated)[1].item() < 0.01


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two finished TINY runs on the same corpus: an LSTM and a Transformer."""
    folder = tmp_path_factory.mktemp("ensemble")
    lstm, corpus, overrides, lstm_results = train_tiny_run(folder / "lstm")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmlab.config import CONF_DIR
    from lmlab.job import train_and_report

    GlobalHydra.instance().clear()
    # optimizer=sgd: TINY's optimizer.lr=5 is an SGD rate (a Transformer option brings AdamW otherwise)
    extra = ["model=transformer", "optimizer=sgd", "model.d_model=32", "model.num_heads=2", "model.num_layers=1"]
    extra.append("model.context=8")
    transformer_overrides = [o for o in overrides if not o.startswith(("model.embed_dim", "model.hidden_dim"))]
    transformer_overrides = [*transformer_overrides, *extra, f"dataset.path={corpus}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        transformer_results = train_and_report(compose("run", overrides=transformer_overrides), folder / "transformer")
    GlobalHydra.instance().clear()
    best = [lstm / "checkpoints" / "best.pt", folder / "transformer" / "checkpoints" / "best.pt"]
    return best, [lstm_results, transformer_results], folder


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return lmlab("lmlab.evaluate", "device=cpu", "method=ensemble", *args)


def test_a_model_with_itself_is_the_model(members, tmp_path):
    """Mixed with a copy of itself (the same file is refused as a member), a model scores as it does alone."""
    (lstm, _), (results, _), _ = members
    copy = tmp_path / "copy.pt"
    shutil.copy(lstm, copy)
    proc = _evaluate(f"checkpoint={lstm}", f"ensemble.members=[{copy}]", f"output={tmp_path / 'e.json'}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["loss"] == pytest.approx(results["test_loss"], rel=1e-5)  # the same targets, token for token
    assert report["settings"]["weights"] == [0.5, 0.5]


def test_two_kinds_of_model_mix_at_least_as_well_as_either_on_validation(members, tmp_path):
    (lstm, transformer), (lstm_results, transformer_results), _ = members
    proc = _evaluate(
        f"checkpoint={lstm}", f"ensemble.members=[{transformer}]", "ensemble.search=true",
        f"output={tmp_path / 'e.json'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout.splitlines()[-1])["settings"]
    assert sum(settings["weights"]) == pytest.approx(1.0, abs=1e-3)
    best_alone = min(lstm_results["best_val_ppl"], transformer_results["best_val_ppl"])
    assert settings["valid_ppl"] <= best_alone * (1 + 1e-6)  # the fitted mixture includes each member alone
    assert settings["member_ppl"][0] == pytest.approx(lstm_results["test_ppl"], rel=1e-5)
    assert settings["member_ppl"][1] == pytest.approx(transformer_results["test_ppl"], rel=1e-5)


def test_bad_members_are_refused_in_one_line(members, tmp_path):
    """Through the command: no members (exit 2), a member that is no checkpoint (the line and exit 4 that
    ``checkpoint=`` gives it). Every other kind of path that is no checkpoint (a folder, /dev/null, a FIFO,
    /dev/zero, a symlink loop): ``tests/e2e/test_hostile_members.py``, through the same loader."""
    (lstm, _), _, _ = members
    cases = [
        ([], "method=ensemble needs other models: ensemble.members=[PATH,...]", 2),
        ([f"ensemble.members=[{tmp_path / 'missing.pt'}]"], f"checkpoint not found: {tmp_path / 'missing.pt'}", 4),
    ]
    for args, message, code in cases:
        proc = _evaluate(f"checkpoint={lstm}", *args)
        assert proc.returncode == code and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_member_with_another_vocabulary_is_refused(members, tmp_path, compose_cfg):
    (lstm, _), _, _ = members
    from lmlab.job import train_and_report

    corpus = write_corpus(tmp_path / "corpus", train=30)  # a smaller sample of the toy language: fewer words
    train_and_report(compose_cfg([*TINY, f"dataset.path={corpus}", "trainer.epochs=1"]), tmp_path / "run")
    stranger = tmp_path / "run" / "checkpoints" / "best.pt"
    proc = _evaluate(f"checkpoint={lstm}", f"ensemble.members=[{stranger}]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"ensemble member {stranger} has another vocabulary" in proc.stderr
    assert "same dataset.max_vocab and dataset.min_freq" in proc.stderr


def test_the_cpu_ensemble_sweep_scores_its_jobs_together(tmp_path, corpus_dir):
    """``+sweep=cpu_ensemble``: both recipes trained side by side (joblib, one thread each), then one
    ``ensemble.json`` in the sweep folder, printed after the jobs' table."""
    output: list = []
    base = ["dataset=text_dir", "device=cpu", "hooks.progress.bar=false", "generate.num_words=5"]
    sweep = multirun(
        tmp_path, corpus_dir, "+sweep=cpu_ensemble", "trainer.epochs=1", "test_with=[]",
        "model.adaptive_cutoffs=[8,16]",  # the recipe's 2,000/6,000 are beyond this toy vocabulary
        base=base, output=output,
    )  # fmt: skip
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert [j.name for j in jobs] == ["0_experiment=cpu_transformer", "1_experiment=cpu_fast"]
    results = [json.loads((j / "results.json").read_text()) for j in jobs]
    assert all(r["torch_threads"] == 1 for r in results)
    record = json.loads((sweep / "ensemble.json").read_text())
    assert record["status"] == "completed" and record["members"] == [str(j) for j in jobs]
    assert record["valid_ppl"] <= min(r["best_val_ppl"] for r in results) * (1 + 1e-6)
    assert [round(p, 4) for p in record["member_ppl"]] == [round(r["test_ppl"], 4) for r in results]
    stdout = output[0].stdout
    assert f"ensemble of 2 jobs: test ppl {record['ppl']:.2f}" in stdout
    assert stdout.index("ensemble of 2 jobs") > stdout.index("best job:")


@pytest.mark.parametrize(
    "content, line",
    [
        ('{"status": "failed", "error": "an ensemble needs two finished jobs; this sweep has 1"}',
         "ensemble failed: an ensemble needs two finished jobs; this sweep has 1"),
        ('{"status": "completed", "ppl": 3.0}', "ensemble failed: "),  # fields missing
        ('{"status": "compl', "ensemble failed: "),  # truncated
        ("[1, 2]", "ensemble failed: "),  # not a record
        ("[" * 100_000 + "]" * 100_000, "ensemble failed: "),  # nested past Python's recursion limit
        ('{"status": "failed", "error": "\\u001b[2Jwiped"}', "ensemble failed: \\x1b[2Jwiped"),  # escaped
    ],
)  # fmt: skip
def test_a_failed_or_damaged_ensemble_record_is_one_line_and_counts_as_a_failure(
    content, line, tmp_path, capsys, monkeypatch
):
    from lmlab.evaluation.sweep_ensemble import print_ensemble
    from lmlab.runtime import job_records

    monkeypatch.setattr(job_records, "_summary_lines", [print_ensemble])  # the sweep named the ensemble callback
    (tmp_path / "ensemble.json").write_text(content)
    assert job_records.summarize_sweep(tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith(line) and len(err.splitlines()) == 1 and "Traceback" not in err and "\x1b" not in err


def test_a_sweep_that_asked_for_no_ensemble_never_reads_one(tmp_path, capsys, monkeypatch):
    from lmlab.runtime import job_records

    monkeypatch.setattr(job_records, "_summary_lines", [])
    (tmp_path / "ensemble.json").write_text("{damaged")  # left by an earlier sweep in this folder
    assert job_records.summarize_sweep(tmp_path) == 0
    assert "ensemble" not in capsys.readouterr().err


@pytest.mark.parametrize("interruption", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_a_crash_or_ctrl_c_while_scoring_is_a_failed_ensemble_not_a_warning(interruption, tmp_path, monkeypatch):
    """A crash is a failed ensemble (exit 1 after the summary); Ctrl-C is one too, and the command exits 130
    (SystemExit, no traceback) so that the summary follows with the line that resumes the sweep."""
    from omegaconf import OmegaConf

    from lmlab.evaluation import sweep_ensemble

    def crash(*args, **kwargs):
        raise interruption

    monkeypatch.setattr(sweep_ensemble, "ensemble_of_runs", crash)
    finished = [type("Run", (), {"folder": tmp_path / name, "finished": True})() for name in "ab"]
    monkeypatch.setattr(sweep_ensemble, "find_runs", lambda paths: finished)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "trainer": {"limit_eval_batches": 2}})
    if isinstance(interruption, KeyboardInterrupt):
        with pytest.raises(SystemExit) as stop:
            sweep_ensemble.EnsembleOfSweep().on_multirun_end(config)
        assert stop.value.code == 130
        error = "interrupted while scoring; resume the sweep to score it again"
    else:
        sweep_ensemble.EnsembleOfSweep().on_multirun_end(config)
        error = "RuntimeError: out of memory"
    record = json.loads((tmp_path / "ensemble.json").read_text())
    assert record == {"status": "failed", "error": error}
