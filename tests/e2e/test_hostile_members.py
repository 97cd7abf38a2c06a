"""Hostile ensemble members and model sizes a file states: ``lmlab.evaluate method=ensemble`` handed paths that
are no checkpoint, or checkpoints whose records name files, URLs, imports or sizes. Each is one line with its
exit code (4: a file you gave) and nothing else happens: Python's audit hooks (PEP 578) record every file the
command opens or writes and every connection it makes, and the command opens no file a member's record
names, connects nowhere and writes only its ``output``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from tests.commands import lmlab
from tests.e2e.test_trust import AUDIT


def _crafted(trained, folder: Path, name: str, edit) -> Path:
    """A copy of the session's tiny checkpoint with ``edit(state)`` applied (the original stays as it is)."""
    state = torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)
    edit(state)
    path = folder / name
    torch.save(state, path)
    return path


def _hostile_record(state: dict) -> None:
    state["config"] = {
        **state["config"],
        "dataset": {"_target_": "os.system", "command": "touch /tmp/lmlab-pwned", "path": "/etc",
                    "mirrors": ["http://127.0.0.1:9/wikitext-2-v1.zip"]},
        "plugins": ["evilmod"],
    }  # fmt: skip


def _arguments(**changes):
    return lambda state: state["model"]["arguments"].update(changes)


@pytest.fixture
def audited(tmp_path):
    """(run ``lmlab.evaluate`` under the audit hook → (the finished process, its events), the allowed output)."""
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    output = tmp_path / "out" / "report.json"

    def run(*args: str):
        done = lmlab(
            "lmlab.evaluate", *args, "device=cpu", "device.num_threads=1", f"output={output}", pythonpath=(audit,)
        )
        return done, json.loads((audit / "events.json").read_text())

    return run, output


def _outside_effects(events: list, output: Path, allowed_reads: tuple[str, ...]) -> list:
    """Connections, files made or removed, writes other than ``output``, and reads of the paths a record named."""
    mine = str(output.parent)  # the atomic write of the output: a temp file beside it, renamed
    bad = [e for e in events if e[0] in ("socket.connect", "os.remove", "shutil.copyfile")]
    harmless = (f"('{mine}", "('.',", "('/tmp/torchinductor_")  # the current folder (exists), torch's own cache
    bad += [e for e in events if e[0] in ("os.mkdir", "os.rename") and not e[1].startswith(harmless)]
    written = [e for e in events if e[0] == "open" and e[2] not in ("r", "rb")]
    hooks_own = str(output.parent.parent / "audit" / "events.json")
    bad += [e for e in written if not e[1].startswith((mine, "/dev/", hooks_own, *allowed_reads))]
    # what the hostile record names: a text folder at /etc (its split files), and the marker os.system would
    # touch (other files under /etc, such as the system's MIME or SSL tables, are the libraries' own reads)
    named = ("/etc/train.txt", "/etc/valid.txt", "/etc/test.txt", "/etc/wikitext", "/tmp/lmlab-pwned")
    bad += [e for e in events if e[0] == "open" and e[1].startswith(named)]
    return bad


def test_a_members_record_chooses_no_file_url_or_import(trained, tmp_path, audited):
    """The data come from the evaluated checkpoint's record; a member's record (a dataset of ``os.system``,
    ``/etc``, a mirror URL, ``plugins: [evilmod]``) is never read for anything."""
    run, output = audited
    member = _crafted(trained, tmp_path, "member.pt", _hostile_record)
    done, events = run(f"checkpoint={trained[0] / 'checkpoints' / 'best.pt'}", "method=ensemble",
                       f"ensemble.members=[{member}]")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(output.read_text())["settings"]["weights"] == [0.5, 0.5]
    assert not _outside_effects(events, output, (os.environ["LMLAB_CACHE_DIR"],))
    assert not Path("/tmp/lmlab-pwned").exists()


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "fifo")
    return folder / "fifo"


def _loop(folder: Path) -> Path:
    (folder / "a.pt").symlink_to(folder / "b.pt")
    (folder / "b.pt").symlink_to(folder / "a.pt")
    return folder / "a.pt"


@pytest.mark.parametrize(
    "member, message",
    [
        (lambda t, d: _loop(d), "checkpoint not found: {member}"),
        (lambda t, d: d, "checkpoint not found: {member}"),
        (lambda t, d: Path("/dev/null"), "checkpoint not found: /dev/null"),
        (lambda t, d: _fifo(d), "checkpoint not found: {member}"),
        (lambda t, d: Path("/dev/zero"), "checkpoint not found: /dev/zero"),
        (lambda t, d: Path("/proc/self/environ"), "/proc/self/environ is not a readable checkpoint: it is a text file"),
        (lambda t, d: _crafted(t, d, "layers.pt", _arguments(num_layers=10**6)),
         "model.num_layers=1000000 is invalid: it must be a positive integer up to 1,000"),
        (lambda t, d: _crafted(t, d, "wide.pt", _arguments(hidden_dim=10**9)), "make no model"),
        (lambda t, d: _crafted(t, d, "window.pt", _arguments(heads=["pointer"], pointer_window=10**12)),
         "model.pointer_window=1000000000000 is invalid"),
        (lambda t, d: _crafted(t, d, "target.pt", _arguments(_target_="os.system")), "model._target_ is not a setting"),
        (lambda t, d: _crafted(t, d, "head.pt", _arguments(heads=["os.system"])), "is not a registered model head"),
    ],
    ids=["symlink loop", "a folder", "/dev/null", "a FIFO", "/dev/zero", "/proc file", "10**6 layers", "10**9 wide",
         "10**12 window", "_target_",
         "a head that is an import path"],
)  # fmt: skip
def test_a_member_that_is_no_checkpoint_or_states_an_absurd_size_is_refused_before_it_is_built(
    member, message, trained, tmp_path
):
    """The loader every member goes through (as ``checkpoint=`` and ``init_from`` do), in-process: the sizes
    are refused before a module is built (10**6 layers would take an hour to build, on the meta device too)."""
    from lmlab.data import Vocabulary
    from lmlab.errors import CheckpointError
    from lmlab.evaluation.ensemble import load_members

    path = member(trained, tmp_path)
    vocab = Vocabulary(torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)["vocab"])
    with pytest.raises(CheckpointError, match=re.escape(message.format(member=path))):
        load_members([str(path)], vocab, torch.device("cpu"))


def test_a_refused_member_is_one_line_exit_4_and_nothing_else_happens(trained, tmp_path, audited):
    run, output = audited
    path = _crafted(trained, tmp_path, "layers.pt", _arguments(num_layers=10**6))
    done, events = run(f"checkpoint={trained[0] / 'checkpoints' / 'best.pt'}", "method=ensemble",
                       f"ensemble.members=[{path}]")  # fmt: skip
    assert done.returncode == 4, done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "model.num_layers=1000000 is invalid" in done.stderr
    assert not output.exists() and not _outside_effects(events, output, ())


def test_a_symlink_to_the_evaluated_checkpoint_is_the_evaluated_checkpoint(trained, tmp_path):
    best = trained[0] / "checkpoints" / "best.pt"
    alias = tmp_path / "alias.pt"
    alias.symlink_to(best)
    done = lmlab("lmlab.evaluate", f"checkpoint={best}", "method=ensemble", f"ensemble.members=[{alias}]")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "the checkpoint being evaluated" in done.stderr
