"""Heads compose on any body (lmlab.models.compose): ``model.heads=[...]`` builds one class from a body and its
heads, in one order whatever the list's; the names of the classes once written per pair still name the same
model (in a config and in old checkpoints); a head's setting without its head, an unknown or repeated head,
and a body that cannot carry a head are each refused in one line; optional capabilities stay optional."""

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import (
    COMBINED_NAMES,
    LanguageModel,
    ReadsTrainingText,
    build_model,
    check_model_arguments,
    model_class,
)
from lmlab.runtime.files import atomic_save
from lmlab.training.checkpoint_format import TrainState, model_from_checkpoint, training_checkpoint

SIZES = {
    "rnn": {"embed_dim": 8, "hidden_dim": 8, "dropout": 0.0},
    "transformer": {"d_model": 8, "num_heads": 2, "num_layers": 1, "dropout": 0.0},
}


@pytest.mark.parametrize("old_name", sorted(COMBINED_NAMES))
def test_a_combined_name_is_its_body_with_its_heads(old_name):
    body, heads = COMBINED_NAMES[old_name]
    assert model_class(old_name) is model_class(body, heads) is model_class(body, list(reversed(heads)))
    assert issubclass(model_class(old_name), model_class(body))
    torch.manual_seed(0)
    old = build_model(old_name, 30, **SIZES[body])
    torch.manual_seed(0)
    new = build_model(body, 30, heads=list(reversed(heads)), **SIZES[body])
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(), strict=True))


@pytest.mark.parametrize("body", SIZES)
@pytest.mark.parametrize("heads", [[], ["pointer"], ["ngram"], ["pointer", "ngram"]])
def test_every_body_takes_every_set_of_heads(body, heads):
    model = build_model(body, 30, heads=heads, **SIZES[body]).eval()
    if isinstance(model, ReadsTrainingText):
        model.take_corpus(torch.randint(0, 30, (500,)))
    assert isinstance(model, ReadsTrainingText) == ("ngram" in heads)  # only the counts read the text
    tokens = torch.randint(0, 30, (7, 2))
    features, _ = model(tokens[:-1], model.init_state(2))
    assert torch.allclose(model.log_probs(features).exp().sum(-1), torch.ones(6, 2), atol=1e-5)
    flops = model.flops_per_token()
    assert set(flops) >= {
        "forward",
        *(("pointer",) if "pointer" in heads else ()),
        *(("gate",) if "ngram" in heads else ()),
    }


def test_a_checkpoint_that_names_the_old_class_loads_as_the_composed_model(tmp_path):
    """Checkpoints written before heads composed store ``pointer_rnn`` and no ``heads``."""
    arguments = {**SIZES["rnn"], "pointer_window": 4}
    model = build_model("pointer_rnn", 12, **arguments)
    vocab = ["<unk>", "<eos>", *(f"w{i}" for i in range(10))]
    meta = {"model": {"name": "pointer_rnn", "arguments": arguments}, "vocab": vocab, "config": {}}
    atomic_save(training_checkpoint(meta, model, TrainState()), tmp_path / "old.pt")
    loaded, _, _ = model_from_checkpoint(tmp_path / "old.pt")
    assert type(loaded) is model_class("rnn", ["pointer"])
    pairs = zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"pointer_window": 5}, r"model.pointer_window is a setting of the pointer head.*model.heads=\[pointer\]"),
        ({"ngram_order": 3}, r"model.ngram_order is a setting of the ngram head.*model.heads=\[ngram\]"),
        (
            {"heads": ["poiner"]},
            r"model.heads='poiner' is not a registered model head; registered: \['ngram', 'pointer'\]",
        ),
        ({"heads": ["pointer", "pointer"]}, r"names a head twice"),
        ({"heads": "pointer"}, r"model.heads='pointer' is not a list of head names"),
        ({"heads": ["pointer"], "embed_dmi": 3}, r"model.embed_dmi is not a setting of PointerRNNLanguageModel"),
        ({"heads": ["pointer"], "pointer_window": 0}, r"model.pointer_window=0 is invalid"),
    ],
)
def test_a_bad_head_setting_is_refused_in_one_line(arguments, message):
    with pytest.raises(ConfigError, match=message):
        check_model_arguments("rnn", arguments)


class Widthless(LanguageModel):
    """A body of one's own that does not say how wide its context vectors are."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = torch.nn.Embedding(vocab_size, 4)

    def forward(self, tokens, state):
        return self.embedding(tokens), state


def test_a_body_without_context_vectors_cannot_take_a_head():
    from lmlab.models.compose import _composed

    for head in ("pointer", "ngram"):
        with pytest.raises(ConfigError, match=rf"the {head} head reads the body's context vectors, and Widthless"):
            _composed(Widthless, (head,))(10)
    assert Widthless(10).flops_per_token() is None  # optional: the benchmark reports no FLOPs for it


def test_the_config_options_are_the_bodies_with_heads(compose_cfg):
    """``model=pointer_lstm`` is ``model=lstm model.heads=[pointer]``: the same settings, one class."""
    for option, heads in (("pointer_lstm", ["pointer"]), ("ngram_pointer_transformer", ["pointer", "ngram"])):
        base = "lstm" if "lstm" in option else "transformer"
        named = compose_cfg([f"model={option}"]).model
        composed = compose_cfg([f"model={base}", f"model.heads=[{','.join(heads)}]"]).model
        assert list(named.heads) == heads and named.name == composed.name
        assert model_class(named.name, named.heads) is model_class(composed.name, composed.heads)


def test_the_bench_compares_no_plain_loop_with_a_body_that_has_heads():
    from lmlab.bench.plain_loop import plain_rnn

    assert plain_rnn(10, {"heads": [], "embed_dim": 4, "hidden_dim": 4}) is not None
    assert plain_rnn(10, {"heads": ["pointer"], "embed_dim": 4, "hidden_dim": 4}) is None
