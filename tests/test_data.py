"""Tests for training/data.py: the shared data files, checksums, corrupt files and downloads."""

import functools
import gzip
import hashlib
import http.server
import os
import pathlib
import re
import shutil
import threading

import numpy as np
import pytest

from training import data

# The Makefile exports NETS_DATA_DIR=../shared/data; the same default when pytest runs alone.
SHARED = pathlib.Path(
    os.environ.get("NETS_DATA_DIR") or pathlib.Path(__file__).resolve().parents[2] / "shared/data"
)

# Counted independently of the loader (awk over the files, and the published MNIST counts).
USPS_HISTOGRAMS = {
    "train": [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644],
    "test": [359, 264, 198, 166, 200, 160, 170, 147, 166, 177],
}
MNIST_TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
README_MD5 = {
    "mnist/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "mnist/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def _sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _files_under(directory):
    return sorted(p for p in pathlib.Path(directory).rglob("*") if p.is_file())


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """No test reads or writes the user's cache; each starts with NETS_DATA_DIR unset."""
    monkeypatch.delenv("NETS_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NETS_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def shared(monkeypatch):
    monkeypatch.setenv("NETS_DATA_DIR", str(SHARED))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """An empty data directory that NETS_DATA_DIR points at."""
    directory = tmp_path / "data"
    directory.mkdir()
    monkeypatch.setenv("NETS_DATA_DIR", str(directory))
    return directory


def _place(directory, relpath, content):
    path = directory / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _register(monkeypatch, relpath, content):
    """Point the registry entry for relpath at content's sha256."""
    remote = data.RemoteFile(relpath, data.REGISTRY[relpath].url, sha256=_sha256_bytes(content))
    monkeypatch.setitem(data.REGISTRY, relpath, remote)


def _sha256_bytes(content):
    return hashlib.sha256(content).hexdigest()


def _usps_bytes(labels, pixel=-1.0):
    lines = [f"{label} " + " ".join([f"{pixel:.4f}"] * 256) for label in labels]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _idx_bytes(array, magic):
    array = np.asarray(array, dtype=np.uint8)
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return header + array.tobytes()


# --- the real files ---------------------------------------------------------------------------


@pytest.mark.parametrize("split, n", [("train", 7291), ("test", 2007)])
def test_usps_real(shared, split, n):
    images, labels = data.load_usps(split, download=False)
    assert images.shape == (n, 256) and images.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert images.min() == -1.0 and images.max() == 1.0
    histogram = np.bincount(labels, minlength=10)
    assert histogram.tolist() == USPS_HISTOGRAMS[split]
    assert histogram.sum() == n


def test_usps_splits_cut_each_split_and_refuse_too_many(shared):
    (x_train, y_train), (x_test, y_test) = data.load_usps_splits(5, 0)
    assert x_train.shape == (5, 256) and y_train.shape == (5,)
    assert x_test.shape == (2007, 256) and y_test.shape == (2007,)
    full_test = data.load_usps("test", download=False)[0]
    np.testing.assert_array_equal(x_test, full_test)
    with pytest.raises(data.DataError, match="usps test: asked for the first 3000 digits, "
                                             "there are 2007"):
        data.load_usps_splits(0, 3000)


def test_usps_first_row_matches_file(shared):
    fields = gzip.open(SHARED / "usps/zip.test.gz", "rt").readline().split()
    images, labels = data.load_usps("test", download=False)
    assert labels[0] == int(float(fields[0]))
    np.testing.assert_array_equal(images[0], np.array(fields[1:], dtype=np.float32))


def test_mnist_test_real(shared):
    images, labels = data.load_mnist("test", download=False)
    assert images.shape == (10000, 784) and images.dtype == np.float32
    assert labels.shape == (10000,) and labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_HISTOGRAM
    raw = gzip.decompress((SHARED / "mnist/t10k-images-idx3-ubyte.gz").read_bytes())
    np.testing.assert_array_equal(images[0] * 255, np.frombuffer(raw[16 : 16 + 784], np.uint8))


def test_digits():
    images, labels = data.load_digits()
    assert images.shape == (1797, 64) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_tinyshakespeare(shared):
    text = data.load_text(download=False)
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:")


@pytest.mark.parametrize("relpath", sorted(p for p, r in data.REGISTRY.items() if r.sha256))
def test_shared_file_sha256_matches_registry(relpath):
    assert _sha256(SHARED / relpath) == data.REGISTRY[relpath].sha256


@pytest.mark.parametrize("relpath", sorted(README_MD5))
def test_shared_file_md5_matches_registry(relpath):
    digest = hashlib.md5((SHARED / relpath).read_bytes()).hexdigest()
    assert digest == README_MD5[relpath] == data.REGISTRY[relpath].md5


def test_every_shared_file_is_registered():
    shared_files = {p.relative_to(SHARED).as_posix() for p in _files_under(SHARED)}
    assert shared_files - {"README.md"} <= set(data.REGISTRY)
    assert len(shared_files - {"README.md"}) == 5


# --- directories ------------------------------------------------------------------------------


def test_data_dirs_order(tmp_path, monkeypatch, isolated_dirs):
    assert data.data_dirs() == [isolated_dirs]
    monkeypatch.setenv("NETS_DATA_DIR", str(tmp_path / "d"))
    assert data.data_dirs() == [tmp_path / "d", isolated_dirs]
    monkeypatch.delenv("NETS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.data_dirs() == [tmp_path / "d", tmp_path / "xdg" / "nets"]
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_dirs() == [tmp_path / "d", tmp_path / "home" / ".cache" / "nets"]


def test_data_dir_comes_before_cache(data_dir, isolated_dirs):
    relpath = "usps/zip.test.gz"
    shutil.copytree(SHARED / "usps", data_dir / "usps")
    shutil.copytree(SHARED / "usps", isolated_dirs / "usps")
    assert data.fetch(relpath, download=False) == data_dir / relpath


# --- corrupt and missing files ----------------------------------------------------------------


def test_one_byte_changed_is_refused(data_dir):
    relpath = "usps/zip.test.gz"
    content = bytearray((SHARED / relpath).read_bytes())
    content[len(content) // 2] ^= 0xFF
    path = _place(data_dir, relpath, bytes(content))
    with pytest.raises(data.DataError) as info:
        data.load_usps("test")
    message = str(info.value)
    assert str(path) in message
    assert data.REGISTRY[relpath].sha256 in message and _sha256(path) in message
    assert data.REGISTRY[relpath].url in message and "NETS_DATA_DIR" in message
    assert path.read_bytes() == bytes(content), "a file in NETS_DATA_DIR must not be replaced"


def test_md5_only_entry_is_verified_by_md5(data_dir, monkeypatch):
    relpath = "mnist/train-labels-idx1-ubyte.gz"
    path = _place(data_dir, relpath, gzip.compress(_idx_bytes([1, 2], 2049)))
    with pytest.raises(data.DataError, match=data.REGISTRY[relpath].md5):
        data.fetch(relpath)
    remote = data.RemoteFile(relpath, "unused", md5=hashlib.md5(path.read_bytes()).hexdigest())
    monkeypatch.setitem(data.REGISTRY, relpath, remote)
    assert data.fetch(relpath) == path


def test_truncated_gzip_is_refused(data_dir, monkeypatch):
    relpath = "usps/zip.test.gz"
    content = (SHARED / relpath).read_bytes()
    truncated = content[: len(content) // 2]
    path = _place(data_dir, relpath, truncated)
    with pytest.raises(data.DataError, match="checksum"):
        data.load_usps("test")
    _register(monkeypatch, relpath, truncated)  # so the checksum passes and gunzip must fail
    with pytest.raises(data.DataError, match="gzip") as info:
        data.load_usps("test")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "labels, pixel, expected",
    [
        ([3, 11, 4], -1.0, "found value 11 at line 2"),
        ([3, "2.5"], -1.0, "found value 2.5 at line 2"),
        (["-1.0000"], -1.0, "found value -1 at line 1"),
        ([3], 1.5, "found 1.5 at line 1"),
    ],
)
def test_usps_bad_values_are_refused(data_dir, monkeypatch, labels, pixel, expected):
    content = _usps_bytes(labels, pixel)
    path = _place(data_dir, "usps/zip.test.gz", content)
    _register(monkeypatch, "usps/zip.test.gz", content)
    with pytest.raises(data.DataError, match=expected) as info:
        data.load_usps("test")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("last_fields, expected", [
    ([], "line 2: expected 257 numbers, found 256"),
    (["x"], "line 2: expected 257 numbers, found a non-number"),
])
def test_usps_malformed_line_is_refused(data_dir, monkeypatch, last_fields, expected):
    lines = ["1 " + " ".join(["-1"] * 256), "2 " + " ".join(["-1"] * 255 + last_fields)]
    content = gzip.compress("\n".join(lines).encode())
    _place(data_dir, "usps/zip.test.gz", content)
    _register(monkeypatch, "usps/zip.test.gz", content)
    with pytest.raises(data.DataError, match=expected):
        data.load_usps("test")


def test_text_that_is_not_utf8_is_refused(data_dir, monkeypatch):
    relpath = "tinyshakespeare/input.txt"
    content = "First Citizen:".encode() + b"\xff\xfe"
    path = _place(data_dir, relpath, content)
    _register(monkeypatch, relpath, content)
    with pytest.raises(data.DataError, match="expected UTF-8 text") as info:
        data.load_text(relpath)
    assert str(path) in str(info.value)


def test_usps_synthetic_round_trip(data_dir, monkeypatch):
    content = _usps_bytes(["7.0000", "0", "9"], pixel=0.25)
    _place(data_dir, "usps/zip.test.gz", content)
    _register(monkeypatch, "usps/zip.test.gz", content)
    images, labels = data.load_usps("test")
    assert labels.tolist() == [7, 0, 9]
    np.testing.assert_array_equal(images, np.full((3, 256), 0.25, np.float32))


def _place_mnist(directory, images, labels, image_magic=2051, label_magic=2049):
    """Uncompressed IDX files: found locally, so no checksum applies."""
    _place(directory, "mnist/t10k-images-idx3-ubyte", _idx_bytes(images, image_magic))
    return _place(directory, "mnist/t10k-labels-idx1-ubyte", _idx_bytes(labels, label_magic))


def test_mnist_uncompressed_round_trip(data_dir):
    pixels = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    _place_mnist(data_dir, pixels, [5, 9])
    images, labels = data.load_mnist("test")
    assert labels.tolist() == [5, 9] and labels.dtype == np.int32
    np.testing.assert_allclose(images, pixels.reshape(2, 784) / 255, rtol=1e-6)


def test_mnist_wrong_magic_is_refused(data_dir):
    _place_mnist(data_dir, np.zeros((2, 28, 28)), [1, 2], image_magic=2049)
    with pytest.raises(data.DataError, match="expected IDX magic number 2051, found 2049") as info:
        data.load_mnist("test")
    assert str(data_dir / "mnist/t10k-images-idx3-ubyte") in str(info.value)


def test_mnist_gzipped_wrong_magic_is_refused(data_dir, monkeypatch):
    relpath = "mnist/t10k-labels-idx1-ubyte.gz"
    content = gzip.compress(_idx_bytes([1, 2], 2051))
    _place(data_dir, "mnist/t10k-images-idx3-ubyte", _idx_bytes(np.zeros((2, 28, 28)), 2051))
    _place(data_dir, relpath, content)
    _register(monkeypatch, relpath, content)
    with pytest.raises(data.DataError, match="magic number 2049, found 2051"):
        data.load_mnist("test")


@pytest.mark.parametrize("extra, found", [(b"", 1567), (b"\x00\x00", 1569)])
def test_mnist_payload_length_is_checked(data_dir, extra, found):
    content = _idx_bytes(np.zeros((2, 28, 28)), 2051)[:-1] + extra
    _place(data_dir, "mnist/t10k-images-idx3-ubyte", content)
    _place(data_dir, "mnist/t10k-labels-idx1-ubyte", _idx_bytes([1, 2], 2049))
    with pytest.raises(data.DataError, match=f"expect 1568 payload bytes, found {found}"):
        data.load_mnist("test")


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x08", "expected an IDX header with magic 2051, found 3 bytes"),
    (_idx_bytes(np.zeros((2, 28, 28)), 2051)[:10], "expected a 16-byte IDX header, found 10 "
                                                   "bytes"),
])
def test_mnist_short_header_is_refused(data_dir, content, message):
    _place(data_dir, "mnist/t10k-images-idx3-ubyte", content)
    _place(data_dir, "mnist/t10k-labels-idx1-ubyte", _idx_bytes([1, 2], 2049))
    with pytest.raises(data.DataError, match=message):
        data.load_mnist("test")


def test_mnist_image_size_is_checked(data_dir):
    _place_mnist(data_dir, np.zeros((2, 16, 16)), [1, 2])
    with pytest.raises(data.DataError, match="expected 28x28 images"):
        data.load_mnist("test")


def test_mnist_counts_must_agree(data_dir):
    _place_mnist(data_dir, np.zeros((2, 28, 28)), [1, 2, 3])
    with pytest.raises(data.DataError, match="2 images but .* 3 labels"):
        data.load_mnist("test")


def test_mnist_labels_in_range(data_dir):
    _place_mnist(data_dir, np.zeros((2, 28, 28)), [1, 10])
    with pytest.raises(data.DataError, match="found value 10 at index 1"):
        data.load_mnist("test")


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_file_without_download(data_dir, isolated_dirs, split):
    with pytest.raises(data.DataError) as info:
        data.load_usps(split, download=False)
    relpath = f"usps/zip.{split}.gz"
    message = str(info.value)
    assert str(data_dir / relpath) in message and str(isolated_dirs / relpath) in message
    assert data.REGISTRY[relpath].url in message and "NETS_DATA_DIR" in message


@pytest.mark.parametrize("relpath", ["usps/zip.test.gz", "mnist/train-labels-idx1-ubyte.gz"])
def test_a_missing_file_names_the_checksum_its_copy_must_match(data_dir, relpath):
    """Missing and not downloaded (download=False, or the download failed): the message
    names what to fetch and the checksum the copy will be verified against."""
    with pytest.raises(data.DataError) as info:
        data.fetch(relpath, download=False)
    algorithm, digest = data.REGISTRY[relpath].checksum
    assert f"{algorithm} {digest}" in str(info.value)
    with pytest.raises(data.DataError) as info:
        data.fetch(relpath, url="http://127.0.0.1:9/absent.gz")
    assert "could not download" in str(info.value) and digest in str(info.value)


def test_missing_mnist_train_names_its_url(shared):
    with pytest.raises(data.DataError, match="ossci-datasets.*train-images-idx3-ubyte.gz"):
        data.load_mnist("train", download=False)


def test_unregistered_file_is_never_downloaded(data_dir):
    with pytest.raises(data.DataError, match="not in the registry"):
        data.fetch("mine/corpus.txt", url="http://127.0.0.1:9/corpus.txt")
    _place(data_dir, "mine/corpus.txt", "héllo".encode())
    assert data.load_text("mine/corpus.txt") == "héllo"


@pytest.mark.parametrize("loader", [data.load_usps, data.load_mnist])
def test_invalid_split_name(loader):
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        loader("val")


def test_remote_file_needs_a_checksum():
    with pytest.raises(ValueError, match="sha256 or an md5"):
        data.RemoteFile("a/b", "http://example.com/b")


# --- downloads from a local server ------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (root, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_into_empty_cache(server, data_dir, isolated_dirs):
    root, base = server
    relpath = "usps/zip.test.gz"
    shutil.copy(SHARED / relpath, root / "zip.test.gz")
    path = data.fetch(relpath, url=f"{base}/zip.test.gz")
    assert path == isolated_dirs / relpath
    assert _sha256(path) == data.REGISTRY[relpath].sha256
    assert _files_under(isolated_dirs) == [path]
    assert data.fetch(relpath, download=False) == path
    assert data.load_usps("test", download=False)[0].shape == (2007, 256)


def test_corrupt_download_leaves_nothing(server, data_dir, isolated_dirs):
    root, base = server
    relpath = "usps/zip.test.gz"
    content = bytearray((SHARED / relpath).read_bytes())
    content[100] ^= 0xFF
    (root / "zip.test.gz").write_bytes(bytes(content))
    url = f"{base}/zip.test.gz"
    with pytest.raises(data.DataError) as info:
        data.fetch(relpath, url=url)
    message = str(info.value)
    assert url in message and data.REGISTRY[relpath].sha256 in message
    assert _files_under(isolated_dirs) == []
    assert _files_under(data_dir) == []


def test_404_raises_and_leaves_nothing(server, data_dir, isolated_dirs):
    _, base = server
    url = f"{base}/absent.gz"
    with pytest.raises(data.DataError, match="404") as info:
        data.fetch("usps/zip.test.gz", url=url)
    assert url in str(info.value) and "usps/zip.test.gz" in str(info.value)
    assert _files_under(isolated_dirs) == []


def test_corrupt_local_file_is_not_replaced_by_download(server, data_dir, isolated_dirs):
    root, base = server
    relpath = "usps/zip.test.gz"
    shutil.copy(SHARED / relpath, root / "zip.test.gz")
    path = _place(data_dir, relpath, b"not the data")
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.fetch(relpath, url=f"{base}/zip.test.gz")
    assert path.read_bytes() == b"not the data"
    assert _files_under(isolated_dirs) == []


# --- helpers ----------------------------------------------------------------------------------


def test_one_hot():
    labels = np.array([2, 0, 3, 2], dtype=np.int32)
    encoded = data.one_hot(labels, 4)
    expected = np.zeros((4, 4), np.float32)
    for row, label in enumerate(labels):
        expected[row, label] = 1
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, expected)
    with pytest.raises(ValueError, match="0..3, found 4"):
        data.one_hot(np.array([1, 4]), 4)
    with pytest.raises(ValueError, match="found -1"):
        data.one_hot(np.array([-1]), 4)


def test_split_partitions_and_keeps_pairs():
    images = np.arange(100, dtype=np.float32).reshape(50, 2)
    labels = np.arange(50, dtype=np.int32)
    parts = data.split(images, labels, (0.6, 0.2, 0.2), seed=0)
    assert [len(y) for _, y in parts] == [30, 10, 10]
    joined = np.concatenate([y for _, y in parts])
    assert sorted(joined.tolist()) == list(range(50))
    assert not np.array_equal(joined, labels), "the split must shuffle"
    for x, y in parts:
        np.testing.assert_array_equal(x, images[y])
    again = data.split(images, labels, (0.6, 0.2, 0.2), seed=0)
    other = data.split(images, labels, (0.6, 0.2, 0.2), seed=1)
    np.testing.assert_array_equal(again[0][1], parts[0][1])
    assert not np.array_equal(other[0][1], parts[0][1])


@pytest.mark.parametrize(
    "fractions, match",
    [((0.6, 0.3), "sum to 1"), ((0.5, 0.6, -0.1), "sizes"), ((0.99, 0.01), "sizes")],
)
def test_split_rejects_bad_fractions(fractions, match):
    images, labels = np.zeros((10, 3)), np.zeros(10, np.int32)
    with pytest.raises(ValueError, match=match):
        data.split(images, labels, fractions, seed=0)


def test_hold_out_last_takes_the_final_examples_in_order():
    x, t = np.arange(10).reshape(5, 2), np.arange(5)
    (x_kept, t_kept), (x_held, t_held) = data.hold_out_last(x, t, 2)
    np.testing.assert_array_equal(x_kept, x[:3])
    np.testing.assert_array_equal(t_held, [3, 4])
    np.testing.assert_array_equal(x_held, [[6, 7], [8, 9]])
    (x_kept, _), (x_held, _) = data.hold_out_last(x, t, 0)
    assert x_kept.shape == (5, 2) and x_held.shape == (0, 2)
    for count in (5, -1):
        with pytest.raises(ValueError, match=f"--held-out: got {count}; allowed: fewer than "
                                             "the 5 training examples"):
            data.hold_out_last(x, t, count)


@pytest.mark.parametrize("call, message", [
    (lambda: data.load_usps_splits(-5, 0),
     "load_usps_splits: train_examples must be >= 0 (0: all of them), got -5"),
    (lambda: data.load_usps_splits(0, -7),
     "load_usps_splits: test_examples must be >= 0 (0: all of them), got -7"),
    (lambda: data.load_usps("val"),
     "load_usps: split must be one of ('train', 'test'), got 'val'"),
    (lambda: data.load_mnist("val"),
     "load_mnist: split must be one of ('train', 'test'), got 'val'"),
    (lambda: data.one_hot(np.array([0, 12]), 10), "one_hot: labels must be in 0..9, found 12"),
    (lambda: data.one_hot(np.array([0.5]), 10),
     "one_hot: labels must be a 1-d integer array, got float64 (1,)"),
    (lambda: data.split(np.zeros((5, 2)), np.zeros(4, np.int32), (0.5, 0.5), seed=0),
     "split: images and labels differ in length: 5 != 4"),
    (lambda: data.split(np.zeros((5, 2)), np.zeros(5, np.int32), (0.6, 0.3), seed=0),
     "split: fractions must sum to 1, got [0.6, 0.3]"),
    (lambda: data.split(np.zeros((5, 2)), np.zeros(5, np.int32), (0.99, 0.01), seed=0),
     "split: fractions [0.99, 0.01] of 5 examples give sizes [5 0]"),
])
def test_bad_arguments_are_refused_naming_the_function(call, message):
    """Negative sizes would cut digits off the end (images[:-5]); every message names the
    function, the argument and the value."""
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
