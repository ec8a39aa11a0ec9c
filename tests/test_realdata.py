"""On the real MNIST files ($MNIST_CNN_DATA or ../shared/data/mnist); skipped when absent."""

import functools
import http.server
import threading

import pytest

from mnist_cnn.data.datasets import FILES
from mnist_cnn.data.download import download
from mnist_cnn.data.splits import load_dataset

pytestmark = pytest.mark.realdata


def test_real_files_pass_every_check_including_sha256(real_dir):
    mnist = load_dataset(real_dir, verify=True, download_missing=False)
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.bincount().tolist()[:2] == [5923, 6742]
    mean = mnist.train_images.float().div(255).mean().item()
    assert mean == pytest.approx(0.1307, abs=5e-5)


def test_download_of_the_official_files_from_a_local_mirror(real_dir, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(real_dir))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        fetched = download(tmp_path, (f"http://127.0.0.1:{httpd.server_address[1]}/",))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sorted(p.name for p in fetched) == sorted(spec.name + ".gz" for spec in FILES.values())
    load_dataset(tmp_path, verify=True, download_missing=False)


def test_one_epoch_on_the_full_training_set_reaches_97_percent(real_run):
    final = (real_run / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert int(final[0]) == 1
    test_acc = float(final[5])
    print(f"one epoch, full training set: test accuracy {test_acc:.4f}")
    assert test_acc >= 0.97
