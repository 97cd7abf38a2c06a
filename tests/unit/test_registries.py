"""One registry pattern for every extension point, proven with a plugin module outside lmlab/
(``my_extensions``): a dataset rebuilt from a checkpoint record, an evaluation method whose signature is
its schema, a logger beside TensorBoard, and a hook built from config."""

import json
from pathlib import Path

import pytest
import torch

from lmlab.data.datasets import DATASETS
from lmlab.data.rebuild import build_dataset, dataset_from_record
from lmlab.errors import CheckpointError, ConfigError
from lmlab.evaluation.methods import METHODS, EvaluationInputs, method_settings
from lmlab.factory import build_hooks, build_logger, import_plugins
from lmlab.models import LanguageModel, build_model
from lmlab.registry import Registry
from lmlab.training.hooks import Hook
from lmlab.training.trainer import Trainer
from lmlab.validation import validate_config

import_plugins(["my_extensions"])  # what plugins=[my_extensions] does
import my_extensions  # noqa: E402 - registered above, as the command line would


def test_a_registry_refuses_a_taken_name_and_a_foreign_class():
    registry = Registry("thing", "thing.name", LanguageModel)
    registry.register("a")(type("A", (LanguageModel,), {}))
    with pytest.raises(ValueError, match="thing name 'a' is already registered"):
        registry.register("a")(type("B", (LanguageModel,), {}))
    with pytest.raises(TypeError, match="needs a LanguageModel subclass"):
        registry.register("c")(dict)
    with pytest.raises(ConfigError, match=r"thing.name='z' is not a registered thing; registered: \['a'\] .*plugins="):
        registry.lookup("z")


def test_a_plugin_dataset_is_built_from_config_and_rebuilt_from_a_record(corpus_dir, compose_cfg, capsys):
    cfg = compose_cfg(["dataset=text_dir", "dataset.name=lowercased_text", f"dataset.path={corpus_dir}",
                       "+dataset.marker=m", "plugins=[my_extensions]"])  # fmt: skip
    validate_config(cfg)
    assert isinstance(build_dataset(cfg.dataset), my_extensions.LowercasedText)
    record = {"name": "lowercased_text", "path": str(corpus_dir), "marker": "seen", "batch_size": 4,
              "file_names": {"train": "/etc/passwd"}, "cache": True}  # fmt: skip
    data = dataset_from_record(record, "best.pt")
    assert type(data) is my_extensions.LowercasedText and data.marker == "seen" and data.batch_size == 4
    assert data.files["train"] == corpus_dir / "train.txt"  # file names are never the record's
    assert "seen, the checkpoint's own" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="damaged dataset record"):
        dataset_from_record({**record, "marker": {"_target_": "os.system"}}, "best.pt")
    with pytest.raises(ConfigError, match="dataset.name='mine' is not a registered dataset"):
        validate_config(compose_cfg(["dataset=text_dir", "dataset.name=mine", f"dataset.path={corpus_dir}"]))
    assert set(DATASETS) >= {"text_dir", "wikitext2", "wikitext103", "lowercased_text"}


def test_a_plugin_method_is_checked_by_its_signature_and_runs():
    assert METHODS.lookup("mixed_uniform") is my_extensions.mixed_uniform
    with pytest.raises(ConfigError, match=r"mixed_uniform.weight=1.5 is invalid: it must be a number in \[0, 1\)"):
        method_settings("mixed_uniform", {"weight": 1.5})
    with pytest.raises(ConfigError, match="mixed_uniform.wieght is not a setting of method mixed_uniform"):
        method_settings("mixed_uniform", {"wieght": 0.5})
    assert method_settings("cache", {"lambda": 0.2}) == {"lambda_": 0.2}  # a keyword takes a trailing _

    torch.manual_seed(0)
    model = build_model("rnn", 12, embed_dim=8, hidden_dim=8, num_layers=1, dropout=0.0).eval()
    with torch.no_grad():
        model.decoder.bias[0] = 12.0  # sure of word 0, which never comes: mixing in a uniform share helps a lot
    from lmlab.data.batching import TokenStream

    tokens = torch.randint(1, 12, (400,))
    inputs = EvaluationInputs(model, "test", lambda split, bptt=None: TokenStream(tokens, 4, bptt or 10),
                              lambda stream: Trainer().evaluate(model, stream, torch.device("cpu")))  # fmt: skip
    static = METHODS["static"](inputs)
    unmixed = METHODS["mixed_uniform"](inputs, **method_settings("mixed_uniform", {"weight": 0.0}))
    mixed = METHODS["mixed_uniform"](inputs, **method_settings("mixed_uniform", {"weight": 0.5}))
    assert unmixed.loss == pytest.approx(static.loss, rel=1e-5)
    assert static.loss > 8 and mixed.loss < 3.3 and mixed.settings == {"weight": 0.5}  # -log(0.5 / 12) = 3.18


def test_several_loggers_at_once_a_plugin_one_and_tensorboard(tmp_path, compose_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg(["plugins=[my_extensions]", "logger=[tensorboard]", "+logger.epochs_file.file_name=e.txt"])
    validate_config(cfg)
    logger = build_logger(cfg, tmp_path, group="sweep", name="lr=1")
    kinds = [type(each).__name__ for each in logger.loggers]
    assert kinds == ["ConsoleLogger", "TensorBoardLogger", "EpochsFile"]
    assert logger.loggers[2].labels == ("sweep", "lr=1")
    logger.start()
    logger.log_step(10, {"train/loss": 5.0, "lr": 20.0})
    metrics = {"epoch": 1, "train_loss": 5.0, "val_loss": 4.0, "val_ppl": 54.6, "lr": 20.0, "tokens_per_sec": 9.0,
               "elapsed_s": 1.0}  # fmt: skip
    logger.log_epoch(metrics)
    logger.finish()
    assert json.loads((tmp_path / "e.txt").read_text()) == {"epoch": 1, "val_ppl": 54.6}
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(10, 4.0)]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 5.0)]
    with pytest.raises(ConfigError, match="logger.epochs_file.bogus is not a setting of EpochsFile"):
        validate_config(compose_cfg(["plugins=[my_extensions]", "+logger.epochs_file.bogus=1"]))
    with pytest.raises(ConfigError, match="logger.nope='?.*is not a registered logger|logger='nope'"):
        validate_config(compose_cfg(["+logger.nope.x=1"]))


def test_hooks_are_built_from_config_in_order_with_a_users_own_last(compose_cfg):
    cfg = compose_cfg(["plugins=[my_extensions]", "+hooks.count._target_=my_extensions.CountSteps",
                       "+hooks.count.stop_after=3", "hooks.time_budget.max_time_s=60"])  # fmt: skip
    validate_config(cfg)
    hooks = build_hooks(cfg.hooks)
    assert list(hooks) == ["stop_on_signal", "time_budget", "non_finite", "learning_check", "weight_averaging",
                           "checkpoint", "progress", "dropout_budget", "count"]  # fmt: skip
    assert all(isinstance(h, Hook) for h in hooks.values())
    assert hooks["count"].stop_after == 3 and hooks["time_budget"].max_time_s == 60
    with pytest.raises(ConfigError, match="hooks.count.stop_after=0 is invalid: it must be a positive integer"):
        validate_config(compose_cfg(["+hooks.count._target_=my_extensions.CountSteps", "+hooks.count.stop_after=0"]))
    with pytest.raises(ConfigError, match="hooks.checkpoint cannot be null"):
        build_hooks(compose_cfg(["hooks.checkpoint=null"]).hooks)
    assert "time_budget" not in build_hooks(compose_cfg(["hooks.time_budget=null"]).hooks)
    with pytest.raises(ConfigError, match="hooks.odd builds a PosixPath, not a hook"):
        build_hooks(compose_cfg(["+hooks.odd._target_=pathlib.Path"]).hooks)


def test_each_extension_is_one_file_and_one_yaml(corpus_dir, compose_cfg):
    """The plugin's YAMLs sit outside conf/ and are found through hydra.searchpath, as the README says."""
    conf = Path(__file__).resolve().parents[1] / "plugins" / "conf"
    overrides = [f"hydra.searchpath=[file://{conf}]", "plugins=[my_extensions]", "hooks=counting",
                 "logger=[tensorboard,epochs_file]", "dataset=lowercased", f"dataset.path={corpus_dir}"]  # fmt: skip
    cfg = compose_cfg(overrides)
    validate_config(cfg)
    assert build_hooks(cfg.hooks)["count"].stop_after == 5
    assert isinstance(build_dataset(cfg.dataset), my_extensions.LowercasedText)
    assert list(cfg.logger) == ["tensorboard", "epochs_file"]
