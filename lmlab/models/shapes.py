"""A model's size before it is built: its parameters counted on the meta device, checked against the memory the
machine has free, so that a size typo (``model.hidden_dim=1e9``) or a file's stated size is one line, not an
allocation of terabytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from lmlab.errors import ConfigError, printable

# Copies of the weights a training step holds at least: the weights and their gradients (an optimizer's state
# adds more: Adam two).
TRAINING_COPIES = 2


class ShapesOnly(TorchFunctionMode):
    """Inside ``torch.device("meta")``: builds a module's shapes without its random normal fills, which have
    nothing to fill on the meta device and whose meta kernel (a Python reference implementation) imports
    ``torch._dynamo``: over a second and tens of MB for a shape check."""

    SKIPPED = (torch.Tensor.normal_, torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.nn.init.xavier_normal_,
               torch.nn.init.kaiming_normal_)  # fmt: skip

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in self.SKIPPED:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


def on_meta(cls: type, vocab_size: int, arguments: dict[str, Any]) -> torch.nn.Module:
    """``cls(vocab_size, **arguments)`` with every tensor on the meta device: shapes, no memory."""
    with torch.device("meta"), ShapesOnly():
        return cls(vocab_size, **arguments)


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on ``device``: a GPU's free memory, a Linux host's MemAvailable; None
    where it is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type != "cpu" or not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_fits(model: torch.nn.Module, device: torch.device, copies: int, what: str, fix: str) -> None:
    """Refuse ``model`` (built on meta) when ``copies`` of its parameters exceed ``device``'s free memory."""
    count = sum(p.numel() for p in model.parameters())
    need = copies * count * 4  # fp32
    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise ConfigError(
            f"{what} has {count:,} parameters: {copies} fp32 copies of them take {need / 2**30:,.1f} GiB, more "
            f"than the {free / 2**30:,.1f} GiB free on this {device.type}; {fix}"
        )


def refuse_unless_fits(
    cls: type, vocab_size: int, arguments: dict[str, Any], device: torch.device, copies: int, what: str, fix: str
) -> None:
    """Build ``cls`` on the meta device and :func:`check_fits` it; sizes too large even to describe (a storage
    size past 2**63 bytes) are refused the same way."""
    try:
        model = on_meta(cls, vocab_size, arguments)
    except (RuntimeError, OverflowError, MemoryError) as err:
        raise ConfigError(f"{what} is too large to build ({printable(err, 120)}); {fix}") from None
    check_fits(model, device, copies, what, fix)
