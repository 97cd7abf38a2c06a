"""The download path against a real HTTP server on 127.0.0.1 (never the internet)."""

import dataclasses
import functools
import hashlib
import io
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmlab.data.datasets import WikiText2, WikiText103
from lmlab.data.sources import WIKITEXT2, WIKITEXT103, ensure_corpus
from lmlab.errors import DataError

FAKE = {name: f"= {split} =\n a b c {split}\n".encode() * 50 for split, name in WIKITEXT2.files.items()}
SHA1 = {name: hashlib.sha1(data).hexdigest() for name, data in FAKE.items()}
SOURCES = [WIKITEXT2, WIKITEXT103]


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


def _zip_bytes(folder: str, data: dict[str, bytes] = FAKE) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, content in data.items():
            archive.writestr(f"{folder}/{name}", content)
    return buf.getvalue()


def _fake(source, zip_md5="0" * 32):
    """The source with the fixtures' hashes in place of the official ones."""
    return dataclasses.replace(source, sha1=SHA1, zip_md5=zip_md5)


def test_official_hashes_are_the_local_files(shared_data):
    """WikiText-2's valid/test are here in their official bytes: the table's SHA-1s must match them."""
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        assert hashlib.sha1((shared_data / "wikitext-2" / name).read_bytes()).hexdigest() == WIKITEXT2.sha1[name]


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.folder)
def test_zip_mirror_is_verified_and_extracted(server, tmp_path, source):
    base, www, _ = server
    archive = _zip_bytes(source.folder)
    (www / "corpus.zip").write_bytes(archive)
    folder = ensure_corpus(_fake(source, hashlib.md5(archive).hexdigest()), tmp_path / "root", [f"{base}/corpus.zip"])
    assert folder == tmp_path / "root" / source.folder
    assert {p.name for p in folder.iterdir()} == set(FAKE)  # no temp, partial or archive files left behind
    for name, data in FAKE.items():
        assert (folder / name).read_bytes() == data


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.folder)
def test_corrupt_mirrors_are_rejected_and_next_mirror_used(server, tmp_path, source):
    base, www, log = server
    corrupt = {**FAKE, "wiki.train.tokens": FAKE["wiki.train.tokens"].replace(b"a b c", b"a X c")}
    archive = _zip_bytes(source.folder, corrupt)  # a well-formed archive with one bad member
    (www / "corrupt.zip").write_bytes(archive)
    for mirror, files in (("bad", corrupt), ("good", FAKE)):
        (www / mirror).mkdir()
        for split, name in source.files.items():
            (www / mirror / f"{split}.txt").write_bytes(files[name])
    mirrors = [f"{base}/missing.zip", f"{base}/corrupt.zip", f"{base}/bad", f"{base}/good"]
    folder = ensure_corpus(_fake(source, hashlib.md5(archive).hexdigest()), tmp_path / "root", mirrors)
    assert (folder / "wiki.train.tokens").read_bytes() == FAKE["wiki.train.tokens"]
    assert "/good/train.txt" in log and "/good/valid.txt" not in log  # only the missing file re-fetched
    assert sorted(p.name for p in folder.iterdir()) == sorted(FAKE)


@pytest.mark.parametrize("dataset", [WikiText2, WikiText103], ids=lambda c: c.source.folder)
def test_every_mirror_failing_names_where_it_looked(server, tmp_path, dataset):
    base, www, _ = server
    (www / "bad.zip").write_bytes(b"not a zip")
    offline = "http://127.0.0.1:9/nothing.zip"  # nothing listens on port 9: as when offline
    with pytest.raises(DataError) as err:
        dataset(root=tmp_path / "root", mirrors=[f"{base}/bad.zip", f"{base}/nothing", offline])
    message = str(err.value)
    assert message.startswith(f"{dataset.source.name} files ")
    assert str(tmp_path / "root" / dataset.source.folder) in message
    assert "LMLAB_DATA_DIR" in message and "dataset.root" in message
    assert f"{base}/bad.zip: DataError: archive failed its MD5 check" in message
    assert f"{base}/nothing" in message and offline in message
    assert not list((tmp_path / "root" / dataset.source.folder).glob("*"))  # nothing half-written


@pytest.mark.parametrize("dataset", [WikiText2, WikiText103], ids=lambda c: c.source.folder)
def test_files_already_present_need_no_network(tmp_path, dataset):
    folder = tmp_path / "root" / dataset.source.folder
    folder.mkdir(parents=True)
    for name, data in FAKE.items():
        (folder / name).write_bytes(data)
    data = dataset(root=tmp_path / "root", mirrors=[], batch_size=2, eval_batch_size=2, bptt=4)
    assert len(data.corpus.train) == 50 * 9  # "= train =" + <eos>, "a b c train" + <eos>


def test_wt103_recipe_trains_on_a_stand_in_corpus_and_its_checkpoint_evaluates(tmp_path, compose_cfg):
    """+experiment=wt103_lstm (adaptive softmax, WikiText103 dataset) end to end, shrunk to test size."""
    import json
    import os

    from lmlab.job import train_and_report
    from tests.commands import lmlab

    folder = tmp_path / "root" / "wikitext-103"
    folder.mkdir(parents=True)
    for name, data in FAKE.items():
        (folder / name).write_bytes(data)
    cfg = compose_cfg([
        "+experiment=wt103_lstm", f"dataset.root={tmp_path / 'root'}", "dataset.mirrors=[]", "dataset.batch_size=4",
        "dataset.eval_batch_size=2", "dataset.bptt=8", "model.embed_dim=16", "model.hidden_dim=16",
        "model.num_layers=1", "model.adaptive_cutoffs=[3,5]", "trainer.epochs=1", "hooks.progress.bar=false",
        "generate.num_words=3", "device=cpu", "device.num_threads=1",
    ])  # fmt: skip
    assert cfg.model.softmax == "adaptive" and cfg.dataset.name == "wikitext103"
    results = train_and_report(cfg, tmp_path / "run")
    best, report = tmp_path / "run" / "checkpoints" / "best.pt", tmp_path / "report.json"
    env = {**os.environ, "LMLAB_DATA_DIR": str(tmp_path / "root")}  # the user's data root, not the record's
    done = lmlab("lmlab.evaluate", f"checkpoint={best}", "device=cpu", f"output={report}", env=env)
    assert done.returncode == 0, done.stderr
    loss = json.loads(report.read_text())["loss"]
    assert loss == pytest.approx(results["test_loss"], rel=1e-5)  # its dataset rebuilt from the checkpoint's record
