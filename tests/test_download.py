"""The download path against a real HTTP server on 127.0.0.1 (never the internet)."""

import functools
import hashlib
import io
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmlab.data import WikiText2
from lmlab.download import WIKITEXT2_FILES, ensure_wikitext2, git_blob_sha1
from lmlab.errors import DataError

FAKE = {name: f"= {split} =\n a b c {split}\n".encode() * 50 for split, name in WIKITEXT2_FILES.items()}
BLOBS = {name: git_blob_sha1(data) for name, data in FAKE.items()}


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on a free local port; yields (base_url, www_dir, request_log)."""
    www = tmp_path / "www"
    www.mkdir()
    log: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", www, log
    httpd.shutdown()


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in FAKE.items():
            archive.writestr(f"wikitext-2/{name}", data)
    return buf.getvalue()


def test_git_blob_sha1_matches_git():
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`


def test_zip_mirror_is_verified_and_extracted(server, tmp_path):
    base, www, _ = server
    archive = _zip_bytes()
    (www / "wt2.zip").write_bytes(archive)
    folder = ensure_wikitext2(tmp_path / "root", [f"{base}/wt2.zip"], BLOBS, hashlib.md5(archive).hexdigest())
    assert {p.name for p in folder.iterdir()} == set(FAKE)  # no temp or partial files left behind
    for name, data in FAKE.items():
        assert (folder / name).read_bytes() == data


def test_corrupt_file_is_rejected_and_next_mirror_used(server, tmp_path):
    base, www, log = server
    for mirror, corrupt in (("bad", True), ("good", False)):
        (www / mirror).mkdir()
        for split, name in WIKITEXT2_FILES.items():
            data = FAKE[name].replace(b"a b c", b"a X c") if corrupt and split == "valid" else FAKE[name]
            (www / mirror / f"{split}.txt").write_bytes(data)
    mirrors = [f"{base}/missing.zip", f"{base}/bad", f"{base}/good"]
    folder = ensure_wikitext2(tmp_path / "root", mirrors, BLOBS, "0" * 32)
    assert (folder / "wiki.valid.tokens").read_bytes() == FAKE["wiki.valid.tokens"]
    assert "/good/valid.txt" in log and "/good/train.txt" not in log  # only the missing file re-fetched
    assert sorted(p.name for p in folder.iterdir()) == sorted(FAKE)


def test_every_mirror_failing_names_where_it_looked(server, tmp_path):
    base, www, _ = server
    (www / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError) as err:
        WikiText2(root=tmp_path / "root", mirrors=[f"{base}/bad.zip", f"{base}/nothing"])
    message = str(err.value)
    assert str(tmp_path / "root" / "wikitext-2") in message
    assert "LMLAB_DATA_DIR" in message and "dataset.root" in message
    assert f"{base}/bad.zip: DataError: archive failed its MD5 check" in message
    assert f"{base}/nothing" in message
    assert not list((tmp_path / "root" / "wikitext-2").glob("*"))  # nothing half-written


def test_files_already_present_need_no_network(tmp_path):
    folder = tmp_path / "root" / "wikitext-2"
    folder.mkdir(parents=True)
    for name, data in FAKE.items():
        (folder / name).write_bytes(data)
    data = WikiText2(root=tmp_path / "root", mirrors=[], batch_size=2, eval_batch_size=2, bptt=4)
    assert len(data.corpus.train) == 50 * 9  # "= train =" + <eos>, "a b c train" + <eos>
