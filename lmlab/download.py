"""Fetch WikiText-2 from a list of mirrors, verify every byte, and only then move files into place.

Transfers use pooch's HTTP downloader (progress bar, retries of the underlying requests); each file
lands in a temp file beside its destination, is checked against a known hash, and is renamed into
place, so an interrupted or corrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

import pooch

from lmlab.errors import DataError

WIKITEXT2_DIR = "wikitext-2"
WIKITEXT2_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
# git blob SHA-1 of each official token file (identical bytes in the zip and in pytorch/examples).
WIKITEXT2_BLOB_SHA1 = {
    "wiki.train.tokens": "2d84b35af79e411d73ea7cae83c73964c6ac83b4",
    "wiki.valid.tokens": "eec944eb2d9e46061cd34a6913528797db6842fc",
    "wiki.test.tokens": "6f3fc88e4cd88456ea892971f9f12243e8428624",
}
WIKITEXT2_ZIP_MD5 = "542ccefacc6c27f945fb54453812b3cd"


def git_blob_sha1(data: bytes) -> str:
    """The hash git gives a file's content: sha1 of ``b"blob <size>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def default_data_root() -> Path:
    """``$LMLAB_DATA_DIR`` if set, else the user's cache folder (``~/.cache/lmlab`` on Linux)."""
    env = os.environ.get("LMLAB_DATA_DIR")
    return Path(env).expanduser() if env else Path(pooch.os_cache("lmlab"))


def ensure_wikitext2(
    root: str | os.PathLike | None,
    mirrors: list[str],
    blob_sha1: dict[str, str] = WIKITEXT2_BLOB_SHA1,
    zip_md5: str = WIKITEXT2_ZIP_MD5,
) -> Path:
    """Return ``<root>/wikitext-2`` holding the three token files, downloading the missing ones.

    Each mirror is either a ``.zip`` URL (the official archive, checked by MD5, its members by blob
    SHA-1) or a base URL under which ``train.txt``/``valid.txt``/``test.txt`` lie (each checked by
    blob SHA-1). Mirrors are tried in order until every file is in place.
    """
    root = Path(root).expanduser() if root else default_data_root()
    target = root / WIKITEXT2_DIR
    missing = [name for name in WIKITEXT2_FILES.values() if not (target / name).is_file()]
    if not missing:
        return target
    errors = []
    for url in mirrors:
        try:
            if url.endswith(".zip"):
                _from_zip(url, target, missing, blob_sha1, zip_md5)
            else:
                _from_files(url, target, missing, blob_sha1)
        except Exception as err:  # any failure of one mirror means: try the next
            errors.append(f"  {url}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        missing = [name for name in missing if not (target / name).is_file()]
        if not missing:
            return target
    raise DataError(
        f"WikiText-2 files {missing} are not in {target} and could not be downloaded.\n"
        f"Mirrors tried:\n" + "\n".join(errors) + "\n"
        "Fix: put wiki.{train,valid,test}.tokens into <root>/wikitext-2/ and set the data root with "
        "dataset.root=PATH or the LMLAB_DATA_DIR environment variable (or go online once)."
    )


def _fetch(url: str, dest_dir: Path) -> bytes:
    """Download ``url`` to a temp file in ``dest_dir`` (with a progress bar) and return its bytes."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=dest_dir)
    os.close(fd)
    try:
        pooch.HTTPDownloader(progressbar=True, timeout=60)(url, tmp, None)
        return Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)


def _place(data: bytes, name: str, target: Path, blob_sha1: dict[str, str], source: str) -> None:
    digest = git_blob_sha1(data)
    if digest != blob_sha1[name]:
        raise DataError(
            f"{name} from {source} failed its check (blob sha1 {digest}, expected {blob_sha1[name]}); not used"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target / name)


def _from_zip(url: str, target: Path, names: list[str], blob_sha1: dict[str, str], zip_md5: str) -> None:
    data = _fetch(url, target)
    digest = hashlib.md5(data).hexdigest()
    if digest != zip_md5:
        raise DataError(f"archive failed its MD5 check ({digest}, expected {zip_md5}); not used")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in names:
            _place(archive.read(f"{WIKITEXT2_DIR}/{name}"), name, target, blob_sha1, url)


def _from_files(base_url: str, target: Path, names: list[str], blob_sha1: dict[str, str]) -> None:
    by_name = {name: split for split, name in WIKITEXT2_FILES.items()}
    for name in names:
        url = f"{base_url.rstrip('/')}/{by_name[name]}.txt"
        _place(_fetch(url, target), name, target, blob_sha1, url)
