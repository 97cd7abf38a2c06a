"""Fetch a named corpus (WikiText-2, WikiText-103) from a list of mirrors, verify every byte, and only
then move files into place.

Transfers use pooch's HTTP downloader (progress bar, retries of the underlying requests); each file
lands in a temp file beside its destination, is checked against the SHA-1 of the official file, and is
renamed into place, so an interrupted or corrupted download never leaves a file that looks complete.
Archives are streamed from disk (hashed and extracted in 1 MB blocks): WikiText-103's 180 MB zip and
its 516 MB train file never sit in memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pooch

from lmlab.errors import DataError
from lmlab.runtime.files import first_missing, remove_made_folders

_BLOCK = 1 << 20


@dataclass(frozen=True)
class CorpusSource:
    """A published corpus: its folder name (also the folder inside the official zip), its files and
    their SHA-1 (``sha1sum``) and the official zip's MD5."""

    name: str
    folder: str
    sha1: dict[str, str]  # file name -> SHA-1 of its bytes
    zip_md5: str
    files: dict[str, str] = field(
        default_factory=lambda: {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
    )


# SHA-1s as published with GluonNLP's WikiText datasets (valid/test re-checked against the official bytes
# here); the zip MD5s are the ones torchtext checks.
WIKITEXT2 = CorpusSource(
    "WikiText-2",
    "wikitext-2",
    {
        "wiki.train.tokens": "863f29c46ef9d167fff4940ec821195882fe29d1",
        "wiki.valid.tokens": "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422",
        "wiki.test.tokens": "c7b8ce0aa086fb34dab808c5c49224211eb2b172",
    },
    "542ccefacc6c27f945fb54453812b3cd",
)
WIKITEXT103 = CorpusSource(
    "WikiText-103",
    "wikitext-103",
    {
        "wiki.train.tokens": "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211",
        "wiki.valid.tokens": "c326ac59dc587676d58c422eb8a03e119582f92b",
        "wiki.test.tokens": "8a5befc548865cec54ed4273cf87dbbad60d1e47",
    },
    "9ddaacaf6af0710eda8c456decff7832",
)


def default_data_root() -> Path:
    """``$LMLAB_DATA_DIR`` if set, else the user's cache folder (``~/.cache/lmlab`` on Linux)."""
    env = os.environ.get("LMLAB_DATA_DIR")
    return Path(env).expanduser() if env else Path(pooch.os_cache("lmlab"))


def ensure_corpus(source: CorpusSource, root: str | os.PathLike | None, mirrors: list[str]) -> Path:
    """Return ``<root>/<source.folder>`` holding the corpus files, downloading the missing ones.

    Each mirror is either a ``.zip`` URL (the official archive, checked by MD5, its members by SHA-1)
    or a base URL under which ``train.txt``/``valid.txt``/``test.txt`` lie (each checked by SHA-1).
    Mirrors are tried in order until every file is in place.
    """
    root = Path(root).expanduser() if root else default_data_root()
    target = root / source.folder
    made = first_missing(target)
    missing = [name for name in source.files.values() if not (target / name).is_file()]
    if not missing:
        return target
    errors = []
    for url in mirrors:
        try:
            (_from_zip if url.endswith(".zip") else _from_files)(source, url, target, missing)
        except Exception as err:  # any failure of one mirror means: try the next
            errors.append(f"  {url}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        missing = [name for name in missing if not (target / name).is_file()]
        if not missing:
            return target
    remove_made_folders(target, made)  # the download failed: leave no empty folders behind
    names = ",".join(n.split(".")[1] for n in source.files.values())
    raise DataError(
        f"{source.name} files {missing} are not in {target} and could not be downloaded.\n"
        "Mirrors tried:\n" + ("\n".join(errors) or "  (none configured)") + "\n"
        f"Fix: put wiki.{{{names}}}.tokens into <root>/{source.folder}/ and set the data root with "
        "dataset.root=PATH or the LMLAB_DATA_DIR environment variable (or go online once); or train on a "
        "folder of your own: dataset=text_dir dataset.path=DIR"
    )


def _digest(chunks: Iterable[bytes], algorithm: str) -> str:
    h = hashlib.new(algorithm)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _blocks(f: IO[bytes]) -> Iterable[bytes]:
    return iter(lambda: f.read(_BLOCK), b"")


def _fetch(url: str, dest_dir: Path) -> Path:
    """Download ``url`` to a temp file in ``dest_dir`` (with a progress bar); the caller removes it."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=dest_dir)
    os.close(fd)
    try:
        pooch.HTTPDownloader(progressbar=True, timeout=60)(url, tmp, None)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _place(reader: IO[bytes], name: str, target: Path, source: CorpusSource, origin: str) -> None:
    """Copy ``reader`` to a temp file beside ``target/name``, check its SHA-1, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target)
    h = hashlib.sha1()
    try:
        with os.fdopen(fd, "wb") as f:
            for block in _blocks(reader):
                h.update(block)
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != source.sha1[name]:
            raise DataError(
                f"{name} from {origin} failed its check (sha1 {h.hexdigest()}, expected {source.sha1[name]}); not used"
            )
        os.replace(tmp, target / name)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _from_zip(source: CorpusSource, url: str, target: Path, names: list[str]) -> None:
    archive_path = _fetch(url, target)
    try:
        with open(archive_path, "rb") as f:
            digest = _digest(_blocks(f), "md5")
        if digest != source.zip_md5:
            raise DataError(f"archive failed its MD5 check ({digest}, expected {source.zip_md5}); not used")
        with zipfile.ZipFile(archive_path) as archive:

            def place(name: str) -> None:
                with archive.open(f"{source.folder}/{name}") as member:
                    _place(member, name, target, source, url)

            _each(names, place)
    finally:
        archive_path.unlink(missing_ok=True)


def _from_files(source: CorpusSource, base_url: str, target: Path, names: list[str]) -> None:
    by_name = {name: split for split, name in source.files.items()}

    def place(name: str) -> None:
        url = f"{base_url.rstrip('/')}/{by_name[name]}.txt"
        downloaded = _fetch(url, target)
        try:
            with open(downloaded, "rb") as f:
                _place(f, name, target, source, url)
        finally:
            downloaded.unlink(missing_ok=True)

    _each(names, place)


def _each(names: list[str], place: Callable[[str], None]) -> None:
    """Place every file a mirror has good, then report the first that failed (the next mirror is asked
    only for what is still missing)."""
    failures = []
    for name in names:
        try:
            place(name)
        except Exception as err:
            failures.append(err)
    if failures:
        raise failures[0]
