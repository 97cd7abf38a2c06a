"""The checkpoint file format: what is written reads back; damaged or foreign files are refused in one line."""

import pytest
import torch

from lmlab.errors import CheckpointError
from lmlab.models import build_model
from lmlab.runtime.files import atomic_save
from lmlab.training.checkpoint_format import TrainState, load_checkpoint, model_from_checkpoint, training_checkpoint

ARGUMENTS = {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1, "dropout": 0.0, "tie_weights": True}
VOCAB = ["<unk>", "<eos>", "the", "cat", "sat"]


def _saved(tmp_path, **changes):
    model = build_model("rnn", len(VOCAB), **ARGUMENTS)
    meta = {"model": {"name": "rnn", "arguments": ARGUMENTS}, "vocab": VOCAB, "config": {"seed": 1}}
    state = TrainState()
    state.epoch, state.best_val_loss = 3, 1.5
    ckpt = {**training_checkpoint(meta, model, state), **changes}
    path = tmp_path / "best.pt"
    atomic_save(ckpt, path)
    return path, model


def test_a_checkpoint_reads_back_as_written(tmp_path):
    path, model = _saved(tmp_path)
    state = load_checkpoint(path)
    assert state["vocab"] == VOCAB and state["epoch"] == 3 and state["best_val_loss"] == 1.5
    rebuilt, vocab, _ = model_from_checkpoint(path)
    assert len(vocab) == len(VOCAB)
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": 99}, "has checkpoint version 99; this lmlab reads"),
        ({"version": "2"}, "(not a number)"),
        ({"vocab": "cat"}, "vocab"),
        ({"model": {"name": "rnn", "arguments": {**ARGUMENTS, "dropout": 1.5}}},
         "refused to build the model stored in .*: model.dropout=1.5 is invalid: it must be a number in \\[0, 1\\)$"),
        ({"model": {"name": "os.system", "arguments": {}}}, "model.name='os.system' is not a registered model"),
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_is_refused_naming_the_field(tmp_path, changes, message):
    path, _ = _saved(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        model_from_checkpoint(path)
    assert "Fix it with" not in str(err.value)  # the file's value: a command-line fix would not apply
