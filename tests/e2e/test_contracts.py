"""The framework's contracts: a model of one's own plugs in without touching lmlab/, checkpoints never run
stored config, precision is checked against the device, the bench works on a fresh trainer."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from lmlab.data.corpus import SPLITS, _cache_name, cache_dir
from lmlab.errors import CheckpointError, ConfigError
from lmlab.job import train_and_report
from lmlab.training.checkpoint_format import model_from_checkpoint
from tests.commands import lmlab
from tests.conftest import TINY, train_tiny_run

# A complete model of a user's own: stateless, each word predicts the next from its embedding alone.
PLUGIN = """
import torch.nn.functional as F
from torch import nn

from lmlab.models import LanguageModel, register_model
from lmlab.config.schema import PositiveInt


@register_model("bigram")
class Bigram(LanguageModel):
    def __init__(self, vocab_size: int, dim: PositiveInt = 16) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding, self.out = nn.Embedding(vocab_size, dim), nn.Linear(dim, vocab_size)

    def forward(self, tokens, state):
        return self.embedding(tokens), state

    def loss(self, features, targets):
        return F.cross_entropy(self.out(features).flatten(0, -2), targets.flatten())

    def log_probs(self, features):
        return F.log_softmax(self.out(features), -1)

    def flops_per_token(self, train_tokens=None):
        flops = 2.0 * self.out.in_features * self.out.out_features
        return {"output": flops, "forward": flops}
"""


def test_a_model_of_ones_own_trains_generates_and_evaluates_through_the_clis(tmp_path, corpus_dir):
    plugin_dir = tmp_path / "plugin"
    (plugin_dir / "conf" / "model").mkdir(parents=True)
    (plugin_dir / "my_bigram.py").write_text(textwrap.dedent(PLUGIN))
    (plugin_dir / "conf" / "model" / "bigram.yaml").write_text("name: bigram\ndim: 12\n")
    out = tmp_path / "run"

    def users_command(module: str, *args: str):  # the user's module folder on their PYTHONPATH
        return lmlab(module, *args, "plugins=[my_bigram]", "device=cpu", pythonpath=(plugin_dir,))

    run = users_command(
        "lmlab.run", *(o for o in TINY if not o.startswith(("model.", "device"))), f"dataset.path={corpus_dir}",
        "model=bigram", f"hydra.searchpath=[file://{plugin_dir / 'conf'}]", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["best_val_ppl"] < 10 and results["num_params"] == 19 * 12 + 12 * 19 + 19
    best = out / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["model"] == {"name": "bigram", "arguments": {"dim": 12}}

    gen = users_command("lmlab.generate", f"checkpoint={best}", "num_words=6", "prompt=the cat", "seed=1")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("the cat") and len(gen.stdout.split()) >= 4
    ev = users_command(
        "lmlab.evaluate", f"checkpoint={best}", "dataset=text_dir", f"dataset.path={corpus_dir}",
        "dataset.eval_batch_size=4", "dataset.bptt=8",
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.splitlines()[-1])["loss"] == pytest.approx(results["test_loss"], rel=1e-5)

    without = lmlab("lmlab.generate", f"checkpoint={best}", "device=cpu", pythonpath=(plugin_dir,))
    assert without.returncode == 4 and "'bigram' is not a registered model" in without.stderr
    assert "plugins=[module]" in without.stderr and "Traceback" not in without.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny finished run: its checkpoints folder, corpus and overrides."""
    run, corpus, overrides, _ = train_tiny_run(tmp_path_factory.mktemp("trained"))
    return run / "checkpoints", corpus, overrides


def _tampered(source: Path, target: Path, edit) -> Path:
    state = torch.load(source, weights_only=True)
    edit(state)
    torch.save(state, target)
    return target


def _edits(marker: Path) -> dict:
    nested = {"_target_": "os.mkdir", "_args_": [str(marker)]}

    def v1(state, target):  # the old layout: a Hydra node
        state["version"] = 1
        state["model_config"] = {"_target_": target, "embed_dim": nested, "hidden_dim": 32}
        del state["model"]

    return {
        "nested _target_": lambda s: s["model"]["arguments"].update(embed_dim=nested),
        "unknown name": lambda s: s["model"].update(name="os.mkdir"),
        "wrong type": lambda s: s["model"]["arguments"].update(hidden_dim="32"),
        "unknown argument": lambda s: s["model"]["arguments"].update(_target_="os.mkdir"),
        "version 1, foreign class": lambda s: v1(s, "os.mkdir"),
        "version 1, nested _target_": lambda s: v1(s, "lmlab.models.RNNLanguageModel"),
    }


@pytest.mark.parametrize("attack", list(_edits(Path("x"))))
def test_checkpoints_never_build_what_they_name(attack, trained, tmp_path, compose_cfg):
    folder, corpus, overrides = trained
    marker = tmp_path / "pwned"
    edit = _edits(marker)[attack]
    best = _tampered(folder / "best.pt", tmp_path / "best.pt", edit)
    last = _tampered(folder / "last.pt", tmp_path / "last.pt", edit)
    with pytest.raises(CheckpointError, match="refused to build the model stored in|has checkpoint version 1"):
        model_from_checkpoint(best)  # what generate and evaluate call
    with pytest.raises(CheckpointError):  # resume
        train_and_report(
            compose_cfg([*overrides, "trainer.epochs=2", f"hooks.checkpoint.resume={last}"]), tmp_path / "run"
        )
    assert not marker.exists()


def test_generate_and_evaluate_refuse_a_nested_target_in_one_line(trained, tmp_path):
    folder, corpus, _ = trained
    marker = tmp_path / "pwned"
    best = _tampered(folder / "best.pt", tmp_path / "best.pt", _edits(marker)["nested _target_"])
    for module, extra in (("lmlab.generate", []), ("lmlab.evaluate", ["dataset=text_dir", f"dataset.path={corpus}"])):
        proc = lmlab(module, f"checkpoint={best}", "device=cpu", *extra)
        assert proc.returncode == 4 and proc.stderr.startswith("error: refused to build the model stored in")
        assert "embed_dim" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_missing_checkpoint_key_is_one_line():
    proc = lmlab("lmlab.generate", "device=cpu")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: checkpoint is not set: give the file to load, e.g. checkpoint=outputs/DAY/TIME/checkpoints/best.pt"
    )


def test_bf16_is_refused_where_missing_and_auto_picks_it_only_where_fast(
    monkeypatch, corpus_dir, tmp_path, compose_cfg
):
    import lmlab.runtime.devices
    from lmlab.runtime.devices import resolve_precision

    cpu = torch.device("cpu")
    for support, auto in ((None, "fp32"), ("emulated", "fp32"), ("fast", "bf16")):
        monkeypatch.setattr(lmlab.runtime.devices, "bf16_support", lambda device, s=support: s)
        assert resolve_precision("auto", cpu) == auto
        assert resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(lmlab.runtime.devices, "bf16_support", lambda device: None)
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.precision=bf16"])
    with pytest.raises(ConfigError, match="trainer.precision=bf16 needs bf16 support.*trainer.precision=auto"):
        train_and_report(cfg, tmp_path / "run")
    source = _cache_name({s: corpus_dir / f"{s}.txt" for s in SPLITS}).rsplit("-", 1)[0]
    assert not list(cache_dir().glob(f"{source}-*"))  # refused before the data was even read


def test_bench_runs_a_fresh_trainer_with_checkpoint_options(corpus_dir, tmp_path):
    out = tmp_path / "bench"
    proc = lmlab(
        "lmlab.bench", *TINY, f"dataset.path={corpus_dir}", "bench.steps=3", "bench.warmup=1",
        "bench.matmul_size=128", "hooks.checkpoint.save_every_steps=1", "hooks.non_finite.on_nan=skip_batch",
        f"hydra.run.dir={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "bench.json").read_text())["train"]["tokens_per_sec"] > 0


def test_transformer_reports_its_flops_in_the_bench(corpus_dir, tmp_path):
    out = tmp_path / "bench"
    proc = lmlab(
        "lmlab.bench", *(o for o in TINY if not o.startswith("model.")), "model=transformer", "optimizer=sgd",
        "model.d_model=32",
        "model.num_heads=2", "model.num_layers=1", "model.context=8", f"dataset.path={corpus_dir}",
        "bench.steps=2", "bench.warmup=1", "bench.matmul_size=128", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    flops = json.loads((out / "bench.json").read_text())["flops_per_token"]
    d, ff, vocab = 32, 128, 19
    assert flops["forward"] == 2 * d * 3 * d + 2 * d * d + 4 * d * ff + 4 * d * 8 + 2 * d * vocab
