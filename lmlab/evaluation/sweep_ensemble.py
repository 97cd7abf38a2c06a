"""Score a finished multirun's jobs as one ensemble (:mod:`lmlab.evaluation.ensemble`).

A Hydra callback, named by a sweep config (``conf/sweep/cpu_ensemble.yaml``)::

    hydra:
      callbacks:
        ensemble:
          _target_: lmlab.evaluation.sweep_ensemble.EnsembleOfSweep

When the sweep is over, in the process that launched it, the best checkpoint of every finished job is
scored on the test split as one mixture (weights fitted on the validation split unless ``search`` is
false), with the data the jobs trained on (the first checkpoint's record, as ``lmlab.evaluate`` reads it).
The result goes to ``ensemble.json`` in the sweep folder, and its line follows the sweep's table (the
callback adds it to :func:`lmlab.runtime.job_records.summarize_sweep`); a failure is written there too
(``status: failed``, one line) and makes the command exit 1, while the jobs' own results stay as they are.
A sweep that did not name the callback never reads an ``ensemble.json`` left in its folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmlab.data.rebuild import SplitStreams, dataset_from_record
from lmlab.errors import LmlabError, printable
from lmlab.evaluation.ensemble import load_members, score_ensemble
from lmlab.metrics import perplexity
from lmlab.runtime.devices import recorded_precision, select_device
from lmlab.runtime.files import atomic_write_text
from lmlab.runtime.job_records import add_to_sweep_summary
from lmlab.runtime.run_table import find_runs
from lmlab.training.checkpoint_format import model_from_checkpoint

ENSEMBLE_FILE = "ensemble.json"  # in the sweep folder


def ensemble_of_runs(
    folders: list[Path], split: str = "test", search: bool = True, limit: int | None = None
) -> dict[str, Any]:
    """Score the best checkpoints of the runs in ``folders`` as one mixture on ``split`` (at most ``limit``
    windows of each split, as the jobs' ``trainer.limit_eval_batches``); the record for ``ensemble.json``."""
    started = time.perf_counter()
    checkpoints = [str(folder / "checkpoints" / "best.pt") for folder in folders]
    device = select_device("auto", cpu_heap=None)  # as lmlab.evaluate's device=auto picks it; the heap left as is
    first, vocab, state = model_from_checkpoint(checkpoints[0], device)
    config = state.get("config")
    data = dataset_from_record(config.get("dataset") if isinstance(config, dict) else None, checkpoints[0])
    others, dtypes = load_members(checkpoints[1:], vocab, device)
    models, dtypes = [first, *others], [recorded_precision(config, device), *dtypes]
    stream = SplitStreams(data, vocab, device)
    names = [str(f) for f in folders]
    loss, _, settings = score_ensemble(models, stream, split, search, limit, names=names, dtypes=dtypes)
    return {
        "status": "completed",
        "split": split,
        "loss": loss,
        "ppl": perplexity(loss),
        **settings,
        "seconds": time.perf_counter() - started,
    }


class EnsembleOfSweep(Callback):
    """When a multirun ends, score its finished jobs together and write ``ensemble.json`` in its folder."""

    def __init__(self, split: str = "test", search: bool = True) -> None:
        self.split = split
        self.search = search

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # a resumed sweep's earlier ensemble describes checkpoints that are about to change
        Path(config.hydra.sweep.dir, ENSEMBLE_FILE).unlink(missing_ok=True)
        add_to_sweep_summary(print_ensemble)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Every way out writes ``ensemble.json``: the figures, or ``status: failed`` and why (the summary then
        exits 1); Hydra would turn an exception raised here into a warning and exit 0."""
        sweep_dir = Path(config.hydra.sweep.dir)
        finished = [run.folder for run in find_runs([sweep_dir]) if run.finished]
        limit = OmegaConf.select(config, "trainer.limit_eval_batches")
        interrupted = False
        try:
            if len(finished) < 2:
                raise LmlabError(f"an ensemble needs two finished jobs; this sweep has {len(finished)}")
            record = ensemble_of_runs(sorted(finished), self.split, self.search, limit)
        except LmlabError as err:
            record = {"status": "failed", "error": str(err)}
        except KeyboardInterrupt:
            interrupted = True
            record = {"status": "failed", "error": "interrupted while scoring; resume the sweep to score it again"}
        except Exception as err:  # noqa: BLE001 - a crash is a failed ensemble, not a warning
            record = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        atomic_write_text(sweep_dir / ENSEMBLE_FILE, json.dumps(record, indent=2) + "\n")
        if interrupted:
            raise SystemExit(130)  # the sweep's summary follows, with the command that resumes it


def print_ensemble(sweep_dir: Path) -> int:
    """The sweep summary's line for its ``ensemble.json``: the figures, or why it failed (then 1)."""
    path = sweep_dir / ENSEMBLE_FILE
    try:
        record = json.loads(path.read_text())
        if record.get("status") != "completed":
            print(f"ensemble failed: {printable(record.get('error', '?'), 500)}", file=sys.stderr, flush=True)
            return 1
        weights, alone = (", ".join(f"{x:.2f}" for x in record[key]) for key in ("weights", "member_ppl"))
        line = f"ensemble of {len(record['members'])} jobs: {printable(record['split'], 20)} ppl {record['ppl']:.2f}"
    except FileNotFoundError:  # the sweep stopped before its end (Hydra refused a job's config)
        return 0
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:  # damaged: say so
        reason = printable(f"{type(err).__name__}: {err}", 200)
        print(f"ensemble failed: {path} cannot be read ({reason})", file=sys.stderr, flush=True)
        return 1
    print(f"{line} (weights {weights}; alone {alone}): {path}", flush=True)
    return 0
