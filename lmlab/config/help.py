"""``--help`` of each command: its usage, the config groups it reads and their options, in well under a second.

Hydra's own help composes the config once per group to list them (seconds, before torch is even imported) and
lists every group under ``conf/``, read or not. This one reads the command's YAML defaults list and the group
folders only (no Hydra, no torch). The composed config is one flag away: ``--cfg job``; Hydra's own flags:
``--hydra-help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from lmlab.config import CONF_DIR

# Groups a command reads that are not in its defaults list: added with + (``+experiment=cpu_fast``).
ADDED_GROUPS = {"run": ("experiment", "sweep"), "bench": ("experiment",)}


def groups_read(config_name: str, conf_dir: str | Path = CONF_DIR) -> dict[str, str | None]:
    """The config groups ``config_name`` reads (its defaults list, followed into the configs it includes), each
    with its default option (None: none unless added with +)."""
    groups: dict[str, str | None] = _defaults_list_groups(config_name, Path(conf_dir))
    for group in ADDED_GROUPS.get(config_name, ()):
        groups.setdefault(group, None)
    return groups


def _defaults_list_groups(config_name: str, conf: Path) -> dict[str, str | None]:
    defaults = yaml.safe_load((conf / f"{config_name}.yaml").read_text()).get("defaults", [])
    groups: dict[str, str | None] = {}
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_" and (conf / f"{entry}.yaml").is_file():
            groups.update(_defaults_list_groups(entry, conf))  # a whole config included (bench: run)
        elif isinstance(entry, dict):
            for key, option in entry.items():
                group = str(key).split("@")[0]
                if not group.startswith(("override ", "hydra/")) and (conf / group).is_dir():
                    groups[group] = option
    return groups


def help_text(command: str, config_name: str, usage: str, conf_dir: str | Path = CONF_DIR) -> str:
    conf = Path(conf_dir)
    lines = [usage, "", "Config groups it reads (group=option; * the default, + added with +group=option):"]
    for group, default in groups_read(config_name, conf).items():
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        marked = [f"{o}*" if o == default else o for o in options]
        lines.append(f"  {'+' if default is None else ' '}{group}: {', '.join(marked)}")
    lines += [
        "",
        "Set any key of the composed config with key=value (the keys: --cfg job, below).",
        f"The composed config, with your overrides: python -m {command} [overrides] --cfg job",
        f"Hydra's own flags (multirun, shell completion, config dirs): python -m {command} --hydra-help",
    ]
    return "\n".join(lines)


def answer_help(command: str, config_name: str, usage: str) -> None:
    """If the command line asks for ``--help``/``-h``, print this command's help and exit 0."""
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(help_text(command, config_name, usage))
        sys.exit(0)
