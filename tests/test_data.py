"""IDX parsing, validation, checksums and the download path (served from 127.0.0.1)."""

from __future__ import annotations

import errno
import gzip
import http.server
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import idx_bytes, mnist_with, synthetic_digits, write_synthetic
from mnist_cnn.data.datasets import FILES
from mnist_cnn.data.download import download
from mnist_cnn.data.idx import parse_idx
from mnist_cnn.data.splits import load_dataset, load_split, resolve_data_dir
from mnist_cnn.errors import DataError

TRAIN_IMAGES = FILES["train_images"].name
TRAIN_LABELS = FILES["train_labels"].name


def test_loads_synthetic_files_gz_and_raw(tmp_path):
    for gz in (True, False):
        folder = tmp_path / ("gz" if gz else "raw")
        write_synthetic(folder, n_train=50, n_test=20, gz=gz)
        mnist = load_dataset(folder, verify=False, download_missing=False)
        assert mnist.train_images.shape == (50, 28, 28) and mnist.train_images.dtype.is_floating_point is False
        assert mnist.train_labels.shape == (50,) and int(mnist.train_labels.max()) <= 9
        assert mnist.test_images.shape == (20, 28, 28)
        expected = synthetic_digits(50, seed=0)
        assert np.array_equal(mnist.train_images.numpy(), expected[0])
        assert np.array_equal(mnist.train_labels.numpy(), expected[1])


def test_checksums_are_checked_on_every_load(tmp_path):
    table = write_synthetic(tmp_path, n_train=50, n_test=20)
    load_dataset(tmp_path, verify=True, download_missing=False, dataset=mnist_with(table))  # its own table: fine
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: SHA-256 mismatch.*mnist-cnn download"):
        load_dataset(tmp_path, verify=True, download_missing=False)  # the official table: refused


def corrupt(folder: Path, name: str, content: bytes) -> None:
    for old in folder.glob(name + "*"):
        old.unlink()
    (folder / (name + ".gz")).write_bytes(content)


@pytest.mark.parametrize(
    "name, content, message",
    [
        (TRAIN_IMAGES, b"", "file is empty"),
        (TRAIN_IMAGES, gzip.compress(idx_bytes(synthetic_digits(50)[0]))[:2000], "truncated"),
        (TRAIN_IMAGES, b"this is not gzip at all" * 10, "not a valid gzip file"),
        (
            TRAIN_IMAGES,
            gzip.compress(b"\x00\x00\x0c\x03" + idx_bytes(np.zeros((50, 28, 28), np.uint8))[4:]),
            "wrong magic number",
        ),
        (TRAIN_IMAGES, gzip.compress(idx_bytes(np.zeros((50, 27, 27), np.uint8))), "27x27, expected 28x28"),
        (TRAIN_IMAGES, gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8))[:-5]), "truncated or corrupt"),
        (TRAIN_IMAGES, gzip.compress(idx_bytes(np.zeros(50, np.uint8))), "expected images"),
        (TRAIN_LABELS, gzip.compress(idx_bytes(np.zeros(49, np.uint8))), "50 images but .* 49 labels"),
        (TRAIN_LABELS, gzip.compress(idx_bytes(np.full(50, 10, np.uint8))), "label 10 is not one of the 10 classes"),
    ],
)
def test_bad_files_give_one_clear_error_naming_the_file(tmp_path, name, content, message):
    write_synthetic(tmp_path, n_train=50, n_test=20)
    corrupt(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as info:
        load_split(tmp_path, "train", verify=False)
    assert name in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_says_how_to_get_it(tmp_path):
    write_synthetic(tmp_path, n_train=50, n_test=20)
    (tmp_path / (TRAIN_LABELS + ".gz")).unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz not found: run `mnist-cnn download"):
        load_split(tmp_path, "train", verify=False)


def test_parse_idx_rejects_short_input():
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\x00\x00", "x")
    with pytest.raises(DataError, match="header cut short"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00", "x")


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_CNN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("MNIST_CNN_DATA")
    assert resolve_data_dir(None) == tmp_path / "cache" / "mnist-cnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir(None) == Path.home() / ".cache" / "mnist-cnn"


# --- download, against a server on 127.0.0.1 started by the test ---------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hang_s = 2.0

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        mode, _, name = self.path.strip("/").partition("/")
        if mode == "good" and name in self.files:
            self.reply(200, "application/octet-stream", self.files[name])
        elif mode == "html":
            self.reply(200, "text/html; charset=utf-8", b"<html><body>Moved</body></html>")
        elif mode == "junk":
            self.reply(200, "application/x-gzip", os.urandom(2000))
        elif mode == "reset":
            self.close_connection = True
            self.connection.close()
        elif mode == "hang":
            time.sleep(self.hang_s)
            self.reply(200, "application/octet-stream", b"late")
        else:
            self.send_error(404)

    def reply(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    """Serves the synthetic files under /good/; other prefixes misbehave on purpose."""
    source = tmp_path / "source"
    table = write_synthetic(source, n_train=50, n_test=20)
    Handler.files = {p.name: p.read_bytes() for p in source.iterdir()}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", table
    httpd.shutdown()
    httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_download_skips_bad_mirrors_and_verifies(server, tmp_path, caplog):
    base, table = server
    target = tmp_path / "cache"
    mirrors = tuple(f"{base}/{m}/" for m in ("html", "missing", "junk", "reset", "hang", "good"))
    fetched = download(target, mirrors, timeout=0.5, dataset=mnist_with(table))
    assert len(fetched) == 4
    mnist = load_dataset(target, download_missing=False, dataset=mnist_with(table))
    assert mnist.train_images.shape == (50, 28, 28)
    assert leftovers(target) == []
    text = caplog.text
    for reason in ("HTML page", "HTTP 404", "wrong bytes", "RemoteDisconnected", "timed out"):
        assert reason in text


def test_download_with_no_working_mirror_says_where_to_put_files(server, tmp_path):
    base, table = server
    target = tmp_path / "cache"
    with pytest.raises(DataError, match=f"copy the data set's files .* into {target}"):
        download(target, (f"{base}/missing/", "http://127.0.0.1:9/"), timeout=0.5, dataset=mnist_with(table))
    assert list(target.iterdir()) == []


def test_download_only_fetches_missing_files(server, tmp_path):
    base, table = server
    target = tmp_path / "cache"
    download(target, (f"{base}/good/",), dataset=mnist_with(table))
    (target / (TRAIN_LABELS + ".gz")).unlink()
    assert [p.name for p in download(target, (f"{base}/good/",), dataset=mnist_with(table))] == [TRAIN_LABELS + ".gz"]


def failing_disk(monkeypatch, code: int) -> None:
    """Every write into a download's temp file fails with OSError `code`."""
    from mnist_cnn.data import download as data_module

    class FailingFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(data_module, "open", lambda path, mode: FailingFile(open(path, mode)), raising=False)


def test_disk_full_during_download_leaves_nothing_behind(server, tmp_path, monkeypatch):
    base, table = server
    target = tmp_path / "cache"
    failing_disk(monkeypatch, errno.ENOSPC)
    with pytest.raises(DataError, match="disk full while downloading"):
        download(target, (f"{base}/good/",), dataset=mnist_with(table))
    assert list(target.iterdir()) == []


def test_a_network_failure_in_the_middle_of_a_transfer_goes_to_the_next_mirror(server, tmp_path, caplog, monkeypatch):
    """SSL errors, resets and cut-short bodies while reading are each a warning and the next mirror."""
    import http.client
    import ssl
    import urllib.request

    base, table = server
    failures = iter(
        [
            ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac"),
            ConnectionResetError(104, "Connection reset by peer"),
            http.client.IncompleteRead(b"partial", 1000),
        ]
    )
    real_urlopen = urllib.request.urlopen

    def flaky_urlopen(url, timeout):
        resp = real_urlopen(url, timeout=timeout)
        if "/flaky/" in url:
            error = next(failures, None)
            if error is not None:
                real_read = resp.read
                calls = {"n": 0}

                def read(n=-1):
                    calls["n"] += 1
                    if calls["n"] == 2:  # the first chunk arrives, then the connection breaks
                        raise error
                    return real_read(min(n, 64))

                resp.read = read
        return resp

    monkeypatch.setattr(urllib.request, "urlopen", flaky_urlopen)
    Handler.files.update({f"flaky/{k}": v for k, v in Handler.files.items()})
    target = tmp_path / "cache"
    mirrors = (f"{base}/good/flaky/", f"{base}/good/")
    # /good/flaky/NAME is served like /good/NAME; the first three transfers break mid-read
    fetched = download(target, mirrors, timeout=0.5, dataset=mnist_with(table))
    assert len(fetched) == 4
    assert leftovers(target) == []
    for reason in ("SSLError", "ConnectionResetError", "IncompleteRead"):
        assert reason in caplog.text


def test_a_write_failure_is_not_mistaken_for_a_bad_mirror(server, tmp_path, monkeypatch):
    """Disk errors while writing stop the download (the next mirror would fail alike)."""
    base, table = server
    target = tmp_path / "cache"
    failing_disk(monkeypatch, errno.EIO)
    with pytest.raises(DataError, match=f"cannot write to data folder {target}: Input/output error"):
        download(target, (f"{base}/good/", f"{base}/good/"), dataset=mnist_with(table))
    assert list(target.iterdir()) == []


def test_load_split_reads_and_downloads_only_that_split(server, tmp_path):
    base, table = server
    target = tmp_path / "cache"
    images, labels = load_split(
        target, "test", dataset=mnist_with(table), download_missing=True, mirrors=(f"{base}/good/",)
    )
    assert images.shape == (20, 28, 28) and labels.shape == (20,)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        spec.name + ".gz" for key, spec in table.items() if key.startswith("test")
    )


def test_a_recorded_data_folder_is_used_after_the_flag_and_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MNIST_CNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "recorded").mkdir()
    assert resolve_data_dir(None, tmp_path / "recorded") == tmp_path / "recorded"
    assert resolve_data_dir(None, tmp_path / "moved-away") == tmp_path / "cache" / "mnist-cnn"
    assert resolve_data_dir(tmp_path / "flag", tmp_path / "recorded") == tmp_path / "flag"
    monkeypatch.setenv("MNIST_CNN_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None, tmp_path / "recorded") == tmp_path / "env"


# --- a data folder that is not one, or cannot be read: one line, not "missing files" or a traceback ------------


def cli_error(argv: list[str], capsys) -> str:
    from mnist_cnn.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_file_where_the_data_folder_should_be_is_one_line(tmp_path, capsys):
    afile = tmp_path / "mnist"
    afile.write_text("not a folder")
    train = ["train", "--data-dir", str(afile), "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"]
    assert f"{afile}: not a folder but a file; the data folder holds" in cli_error(train, capsys)
    assert not (tmp_path / "run").exists()
    inside = ["train", "--data-dir", str(afile / "sub"), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert "a file is where one of its parent folders should be" in cli_error(inside, capsys)
    assert "not a folder but a file" in cli_error(["download", "--data-dir", str(afile)], capsys)
    with pytest.raises(DataError, match="not a folder but a file"):
        load_split(afile, "test", verify=False)  # no download: not "train-images... not found"


def test_an_unreadable_data_folder_is_one_line(tmp_path, monkeypatch):
    """Permission denied on the folder's entries (as a chmod 000 folder gives a user who is not
    root): Path.is_file() raises, where it says False for a missing file."""
    folder = tmp_path / "mnist"
    write_synthetic(folder, n_train=50, n_test=20)
    real_stat = Path.stat

    def denied(self, *args, **kwargs):
        if self.parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", denied)
    with pytest.raises(DataError, match=f"^{folder}: cannot read the data folder \\(Permission denied\\)$"):
        load_dataset(folder, verify=False, download_missing=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every folder")
def test_a_data_folder_without_permissions_is_one_line(tmp_path, capsys):
    folder = tmp_path / "mnist"
    write_synthetic(folder, n_train=50, n_test=20)
    folder.chmod(0)
    try:
        argv = ["train", "--data-dir", str(folder), "--out", str(tmp_path / "run"), "--device", "cpu"]
        assert "cannot read the data folder (Permission denied)" in cli_error(argv, capsys)
    finally:
        folder.chmod(0o755)
