"""What a user gets from ``pip install``: the wheel, installed outside the source tree, composes every
config group option (``hydra/launcher=slurm`` included) and the top-level configs of every command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# every module of the source tree (not the __main__ ones: importing those runs them)
SOURCE_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "lmlab").rglob("*.py")
    if p.name != "__main__.py"
)

COMPOSE_EVERY_OPTION = """
import sys
from pathlib import Path
from hydra import compose, initialize_config_dir
import lmlab
from lmlab.config import CONF_DIR

assert Path(lmlab.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), lmlab.__file__
import importlib
for name in sys.argv[2].split(","):  # every module of the source tree is in the wheel and imports
    importlib.import_module(name)
conf = Path(CONF_DIR)
composed = []
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    for top in ("run", "bench", "evaluate", "generate"):
        compose(top, overrides=["+checkpoint=x"] if top in ("evaluate", "generate") else [])
        composed.append(top)
    for option in sorted(conf.glob("*/**/*.yaml")):
        group = str(option.parent.relative_to(conf))
        plus = "+" if group in ("experiment", "sweep") else ""
        override = f"{plus}{group}={option.stem}"
        compose("run", overrides=[override], return_hydra_config=group.startswith("hydra"))
        composed.append(override)
print("\\n".join(composed))
"""


def test_the_installed_wheel_composes_every_config_option(tmp_path):
    # Built from a clean copy: a build/ folder left in the checkout by an earlier build must not leak
    # stale files into the wheel (setuptools reuses it).
    source = tmp_path / "source"
    leftovers = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "outputs", "multirun")
    for part in ("lmlab", "conf", "hydra_plugins", "setup.cfg", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy2
        copy(ROOT / part, source / part, **({"ignore": leftovers} if (ROOT / part).is_dir() else {}))
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("lmlab-*.whl"))
    shipped = {n.split("lmlab/conf/", 1)[1] for n in zipfile.ZipFile(wheel).namelist() if "lmlab/conf/" in n}
    in_tree = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped == in_tree  # every config file of the source tree is in the wheel
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", COMPOSE_EVERY_OPTION, str(site), ",".join(SOURCE_MODULES)], cwd=outside,
        capture_output=True, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    composed = done.stdout.split()
    assert "hydra/launcher=slurm" in composed and "+experiment=cpu_fast" in composed and "model=transformer" in composed
    assert len(composed) == 4 + len(in_tree) - 4  # every option, and the four top-level configs
