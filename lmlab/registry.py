"""Named extension points: every kind of thing a user can add (a model, a dataset, an evaluation method, a
logger) is one :class:`Registry`. A plugin module registers its class or function under a name with the
registry's decorator; ``plugins=[module]`` on the command line imports it; config and checkpoints then name
it — they never import anything themselves.

    MODELS   lmlab.models.base       @register_model("rnn")          model.name=rnn
    HEADS    lmlab.models.compose    @register_head("pointer")       model.heads=[pointer]
    DATASETS lmlab.data.datasets     @register_dataset("text_dir")   dataset.name=text_dir
    METHODS  lmlab.evaluation.methods @register_method("cache")       method=cache (lmlab.evaluate)
    LOGGERS  lmlab.loggers.base      @register_logger("wandb")       logger=[wandb,tensorboard]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lmlab.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, Any]):
    """Name → class (or function). ``key`` is the config key that names an entry (for error messages);
    ``base``, if given, is the class every entry must derive from."""

    def __init__(self, kind: str, key: str, base: type | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.key = key
        self.base = base

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make ``obj`` available as ``<key>=<name>``. A name is never silently re-bound."""

        def add(obj: T) -> T:
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"register_{self.kind}({name!r}) needs a {self.base.__name__} subclass, got {obj!r}")
            if self.get(name, obj) is not obj:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {self[name].__qualname__}")
            self[name] = obj
            return obj

        return add

    def lookup(self, name: Any) -> Any:
        """The entry called ``name``, or one line naming the key, the registered names and the fix."""
        if not isinstance(name, str) or name not in self:
            raise ConfigError(
                f"{self.key}={name!r} is not a registered {self.kind}; registered: {sorted(self)} "
                f"(one of your own: import the module that registers it with plugins=[module])"
            )
        return self[name]
