"""The one place that finds, checks, downloads and reads data files.

Contract
--------
A data file is named by a path relative to a data directory (``"usps/zip.train.gz"``). Files the
project knows are listed in ``REGISTRY`` with their public URL and checksum (sha256 where known,
else md5).

``fetch(relpath)`` looks in ``data_dirs()`` in order: ``$NETS_DATA_DIR`` if set, then the user
cache (``$NETS_CACHE_DIR``, else ``$XDG_CACHE_HOME/nets``, else ``~/.cache/nets``). A file found
there is verified against its checksum; a mismatch is an error and the file is never overwritten.
A file found nowhere is downloaded into the cache: written to a temporary file beside its final
place, verified, then moved into place with ``os.replace``, so a failed or corrupt download
leaves nothing behind. Files not in the registry are returned unchecked when found and are never
downloaded.

Loaders return ``(images, labels)`` as numpy arrays: ``images: (n, features)`` float32 and
``labels: (n,)`` int32 in 0..9. Every problem with a file (missing, wrong checksum, truncated,
malformed) raises ``DataError``, whose message names the file, what was expected against what was
found, and how to obtain a good copy.

Example::

    images, labels = load_usps("train")      # (7291, 256) in [-1, 1], (7291,)
    (x_train, y_train), (x_test, y_test) = split(images, labels, (0.8, 0.2), seed=0)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import pathlib
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "DataError",
    "RemoteFile",
    "REGISTRY",
    "data_dirs",
    "fetch",
    "load_digits",
    "load_usps_splits",
    "load_usps",
    "load_mnist",
    "mnist_present",
    "load_text",
    "one_hot",
    "split",
]

DOWNLOAD_TIMEOUT_S = 60.0  # per blocking socket operation, not for the whole transfer
_CHUNK_BYTES = 1 << 20
_SPLITS = ("train", "test")
_USPS_PIXEL_TOLERANCE = 1e-6
_MNIST_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_USPS_BASE_URL = "https://hastie.su.domains/ElemStatLearn/datasets/"
_IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension


class DataError(ValueError):
    """A data file is missing, corrupt or malformed; the message says how to get a good copy."""


class _FormatError(ValueError):
    """Raised by the pure parsers; the loaders turn it into a DataError naming the file."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A known data file: where it lives relative to a data directory, its URL and checksum."""

    relpath: str
    url: str
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self):
        if self.sha256 is None and self.md5 is None:
            raise ValueError(f"RemoteFile {self.relpath!r} needs a sha256 or an md5 checksum")

    @property
    def checksum(self) -> tuple[str, str]:
        """(algorithm, hex digest): sha256 when known, else md5."""
        if self.sha256 is not None:
            return "sha256", self.sha256
        return "md5", self.md5


REGISTRY: dict[str, RemoteFile] = {
    remote.relpath: remote
    for remote in (
        RemoteFile(
            "usps/zip.train.gz",
            _USPS_BASE_URL + "zip.train.gz",
            sha256="66ebf231ab51f2cf6ac1a892d0f98ccffee1079d7a5db638c1f11f366046ca16",
        ),
        RemoteFile(
            "usps/zip.test.gz",
            _USPS_BASE_URL + "zip.test.gz",
            sha256="8dacc3c6e136af6c3488de9e5113a7daf140c8c2f1f0b61c54ee02f03f1a962f",
        ),
        RemoteFile(
            "mnist/t10k-images-idx3-ubyte.gz",
            _MNIST_BASE_URL + "t10k-images-idx3-ubyte.gz",
            sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            md5="9fb629c4189551a2d022fa330f9573f3",
        ),
        RemoteFile(
            "mnist/t10k-labels-idx1-ubyte.gz",
            _MNIST_BASE_URL + "t10k-labels-idx1-ubyte.gz",
            sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            md5="ec29112dd5afa0611ce80d1b7f02629c",
        ),
        RemoteFile(
            "mnist/train-images-idx3-ubyte.gz",
            _MNIST_BASE_URL + "train-images-idx3-ubyte.gz",
            md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
        ),
        RemoteFile(
            "mnist/train-labels-idx1-ubyte.gz",
            _MNIST_BASE_URL + "train-labels-idx1-ubyte.gz",
            md5="d53e105ee54ea40749a09fcbcd1e9432",
        ),
        RemoteFile(
            "tinyshakespeare/input.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
            "tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Finding, verifying and downloading files.


def cache_dir() -> pathlib.Path:
    """The user's cache directory for this project: ``$NETS_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/nets``, else ``~/.cache/nets``. Downloads go here, and the experiments'
    compilation cache (`training.harness.use_compilation_cache`) lives beneath it."""
    if os.environ.get("NETS_CACHE_DIR"):
        return pathlib.Path(os.environ["NETS_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nets"
    return pathlib.Path.home() / ".cache" / "nets"


def data_dirs() -> list[pathlib.Path]:
    """Directories searched for data files, in order: ``$NETS_DATA_DIR`` if set, then the cache."""
    dirs = [cache_dir()]
    if os.environ.get("NETS_DATA_DIR"):
        dirs.insert(0, pathlib.Path(os.environ["NETS_DATA_DIR"]).expanduser())
    return dirs


def _how_to_obtain(relpath: str, url: str | None = None) -> str:
    remote = REGISTRY.get(relpath)
    url = url or (remote.url if remote else None)
    source = f"download it from {url}" if url else "obtain a copy"
    if remote is not None:  # what the copy must match: a missing file's message names it too
        source += " ({} {})".format(*remote.checksum)
    return (
        f"To fix: {source} and set NETS_DATA_DIR to a directory holding it as {relpath} "
        f"(or put it in the cache, {cache_dir() / relpath})."
    )


def _hexdigest(path: pathlib.Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: pathlib.Path, remote: RemoteFile) -> None:
    algorithm, expected = remote.checksum
    actual = _hexdigest(path, algorithm)
    if actual != expected:
        raise DataError(
            f"{path}: checksum mismatch: expected {algorithm} {expected}, found {actual}. "
            f"The file is corrupt, truncated or a different version; replace or delete it. "
            + _how_to_obtain(remote.relpath)
        )


def _locate(relpath: str) -> pathlib.Path | None:
    for directory in data_dirs():
        if (directory / relpath).is_file():
            return directory / relpath
    return None


def _copy_with_digest(response, out, digest, description: str) -> None:
    """Copy ``response`` to ``out`` in chunks, feeding ``digest``; a bar only for a person."""
    from tqdm import tqdm

    from training.logbook import interactive  # here: loading data needs neither JAX nor tqdm

    total = int(response.headers.get("Content-Length") or 0) or None
    hidden = not interactive()
    with tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=hidden) as progress:
        for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
            out.write(chunk)
            progress.update(len(chunk))


def _download(remote: RemoteFile, url: str, target: pathlib.Path) -> None:
    """Stream ``url`` to ``target`` via a temporary file in the same directory.

    The temporary file is removed on any failure, so ``target`` is either absent or verified.
    """
    algorithm, expected = remote.checksum
    digest = hashlib.new(algorithm)
    temp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        temp = pathlib.Path(temp_name)
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                _copy_with_digest(response, out, digest, remote.relpath)
        if digest.hexdigest() != expected:
            raise DataError(
                f"downloaded {remote.relpath} from {url}: checksum mismatch: expected {algorithm} "
                f"{expected}, found {digest.hexdigest()}; nothing was written to {target}. "
                + _how_to_obtain(remote.relpath)
            )
        os.chmod(temp, 0o644)  # mkstemp creates the file private; the data is public
        os.replace(temp, target)
    except BaseException as err:
        if temp is not None:
            temp.unlink(missing_ok=True)
        failed = isinstance(err, (OSError, http.client.HTTPException, ValueError))
        if failed and not isinstance(err, DataError):
            raise DataError(
                f"could not download {remote.relpath} from {url} into {target}: {err}. "
                + _how_to_obtain(remote.relpath, url)
            ) from err
        raise


def fetch(relpath: str, *, download: bool = True, url: str | None = None) -> pathlib.Path:
    """Path to the verified data file ``relpath``, downloading it into the cache if needed.

    Args:
      relpath: path relative to a data directory, e.g. ``"usps/zip.train.gz"``.
      download: if False, a file found in no data directory is an error.
      url: download from here instead of the registry's URL (the checksum still comes from the
        registry).

    Returns:
      The path of the file in the first of ``data_dirs()`` that holds it.

    Raises:
      DataError: the file is found but fails its checksum, or is missing and cannot be downloaded.
    """
    remote = REGISTRY.get(relpath)
    found = _locate(relpath)
    if found is not None:
        if remote is not None:
            _verify(found, remote)
        return found
    looked = ", ".join(str(directory / relpath) for directory in data_dirs())
    if remote is None:
        raise DataError(
            f"{relpath} not found (looked in {looked}) and it is not in the registry, so it cannot "
            f"be downloaded; set NETS_DATA_DIR to a directory holding it as {relpath}."
        )
    if not download:
        raise DataError(
            f"{relpath} not found (looked in {looked}) and download=False. "
            + _how_to_obtain(relpath, url)
        )
    target = cache_dir() / relpath
    _download(remote, url or remote.url, target)
    return target


# ---------------------------------------------------------------------------------------------
# Pure parsers: bytes in, arrays out, _FormatError on anything unexpected.


def _decompress(raw: bytes) -> bytes:
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise _FormatError(
            f"truncated or corrupt gzip data ({type(err).__name__}: {err})"
        ) from None


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _parse_usps(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """ESL text format, one digit per line: label, then 256 grey values in [-1, 1].

    Returns:
      images: (n, 256) float32 in [-1, 1]; labels: (n,) int32 in 0..9.
    """
    lines = _decode_text(raw).splitlines()
    numbered = [(number, line.split()) for number, line in enumerate(lines, 1)]
    numbered = [(number, fields) for number, fields in numbered if fields]
    for number, fields in numbered:
        if len(fields) != 257:
            raise _FormatError(f"line {number}: expected 257 numbers, found {len(fields)}")
    try:
        values = np.array([fields for _, fields in numbered], dtype=np.float64).reshape(-1, 257)
    except ValueError:
        number = next(n for n, fields in numbered if not all(map(_is_number, fields)))
        raise _FormatError(f"line {number}: expected 257 numbers, found a non-number") from None
    line_numbers = [number for number, _ in numbered]
    labels, images = values[:, 0], values[:, 1:]
    bad = np.flatnonzero((labels != np.round(labels)) | (labels < 0) | (labels > 9))
    if bad.size:
        raise _FormatError(
            f"labels expected in 0-9, found value {labels[bad[0]]:g} at line {line_numbers[bad[0]]}"
        )
    outside = ~(np.abs(images) <= 1 + _USPS_PIXEL_TOLERANCE)  # NaN is outside too
    if outside.any():
        row, col = np.argwhere(outside)[0]
        raise _FormatError(
            f"grey values expected in [-1, 1], found {images[row, col]:g} "
            f"at line {line_numbers[row]}"
        )
    return np.clip(images, -1, 1).astype(np.float32), labels.astype(np.int32)


def _parse_idx(raw: bytes, magic: int) -> np.ndarray:
    """IDX file of unsigned bytes: big-endian int32 magic, one int32 per dim, then the payload.

    Returns:
      uint8 array whose shape is the dims in the header.
    """
    if len(raw) < 4:
        raise _FormatError(f"expected an IDX header with magic {magic}, found {len(raw)} bytes")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise _FormatError(f"expected IDX magic number {magic}, found {found}")
    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise _FormatError(f"expected a {header_bytes}-byte IDX header, found {len(raw)} bytes")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload_bytes = len(raw) - header_bytes
    if payload_bytes != math.prod(dims):
        raise _FormatError(
            f"header dims {dims} expect {math.prod(dims)} payload bytes, found {payload_bytes}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims)


def _parse_mnist_images(raw: bytes) -> np.ndarray:
    """Returns images: (n, 784) float32 in [0, 1]."""
    pixels = _parse_idx(raw, _IDX_IMAGES_MAGIC)
    if pixels.shape[1:] != (28, 28):
        raise _FormatError(f"expected 28x28 images, found dims {pixels.shape}")
    return pixels.reshape(len(pixels), 28 * 28).astype(np.float32) / 255


def _parse_mnist_labels(raw: bytes) -> np.ndarray:
    """Returns labels: (n,) int32 in 0..9."""
    labels = _parse_idx(raw, _IDX_LABELS_MAGIC)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise _FormatError(
            f"labels expected in 0-9, found value {labels[bad[0]]} at index {bad[0]}"
        )
    return labels.astype(np.int32)


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _FormatError(f"expected UTF-8 text: {err}") from None


def _parse_file(path: pathlib.Path, relpath: str, parse: Callable[[bytes], object]):
    """Read ``path`` (gunzipped if it ends in .gz) and parse it; a DataError names the file."""
    raw = path.read_bytes()
    try:
        return parse(_decompress(raw) if path.suffix == ".gz" else raw)
    except _FormatError as err:
        raise DataError(f"{path}: {err}. " + _how_to_obtain(relpath)) from None


def _check_split(split: str, function: str) -> None:
    """ValueError naming `function` unless split is one of _SPLITS."""
    if split not in _SPLITS:
        raise ValueError(f"{function}: split must be one of {_SPLITS}, got {split!r}")


# ---------------------------------------------------------------------------------------------
# Loaders.


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's embedded 8x8 digits; no network.

    Returns:
      images: (1797, 64) float32 in [0, 1] (8x8 row-major, counts of 16 divided by 16);
      labels: (1797,) int32 in 0..9.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return (digits.data / 16).astype(np.float32), digits.target.astype(np.int32)


def load_usps(split: str, *, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """USPS zip-code digits of LeCun et al. (1989), as distributed with ESL (Hastie et al.).

    Args:
      split: "train" (n = 7291) or "test" (n = 2007).

    Returns:
      images: (n, 256) float32 in [-1, 1], 16x16 row-major as in the file, background -1;
      labels: (n,) int32 in 0..9.
    """
    _check_split(split, "load_usps")
    relpath = f"usps/zip.{split}.gz"
    return _parse_file(fetch(relpath, download=download), relpath, _parse_usps)


def load_usps_splits(train_examples: int = 0, test_examples: int = 0):
    """((x_train, labels_train), (x_test, labels_test)) of `load_usps`, each cut to its first
    `train_examples` / `test_examples` digits (0: all 7,291 / 2,007); a negative count is a
    ValueError, more than there are a DataError naming the split."""
    for name, limit in (("train_examples", train_examples), ("test_examples", test_examples)):
        if limit < 0:  # images[:-5] would quietly drop the last digits
            raise ValueError(f"load_usps_splits: {name} must be >= 0 (0: all of them), got "
                             f"{limit}")
    splits = []
    for split, limit in (("train", train_examples), ("test", test_examples)):
        images, labels = load_usps(split)
        if limit > images.shape[0]:
            raise DataError(f"load_usps_splits: usps {split}: asked for the first {limit} "
                            f"digits, there are {images.shape[0]}")
        splits.append((images[:limit], labels[:limit]) if limit else (images, labels))
    return tuple(splits)


def _mnist_path(relpath: str, download: bool) -> pathlib.Path:
    """The registry's ``.gz`` if present (verified), else a local uncompressed copy (unverified)."""
    if _locate(relpath) is None:
        uncompressed = _locate(relpath.removesuffix(".gz"))
        if uncompressed is not None:
            return uncompressed
    return fetch(relpath, download=download)


def _mnist_relpaths(split: str) -> tuple[str, str]:
    """The registry's (images, labels) ``.gz`` paths of an MNIST split."""
    prefix = "t10k" if split == "test" else "train"
    return f"mnist/{prefix}-images-idx3-ubyte.gz", f"mnist/{prefix}-labels-idx1-ubyte.gz"


def mnist_present(split: str) -> bool:
    """Whether a data directory holds any of the MNIST ``split``'s files (gzipped or not),
    checked or not: what decides to load them, so that a corrupt or half-present copy is
    loaded, and refused, rather than passed over as absent."""
    _check_split(split, "mnist_present")
    return any(_locate(relpath) is not None or _locate(relpath.removesuffix(".gz")) is not None
               for relpath in _mnist_relpaths(split))


def load_mnist(split: str, *, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from the canonical IDX files, gzipped or not.

    Args:
      split: "train" (n = 60000) or "test" (n = 10000).

    Returns:
      images: (n, 784) float32 in [0, 1], 28x28 row-major; labels: (n,) int32 in 0..9.
    """
    _check_split(split, "load_mnist")
    images_relpath, labels_relpath = _mnist_relpaths(split)
    images_path = _mnist_path(images_relpath, download)
    labels_path = _mnist_path(labels_relpath, download)
    images = _parse_file(images_path, images_relpath, _parse_mnist_images)
    labels = _parse_file(labels_path, labels_relpath, _parse_mnist_labels)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            f"labels; expected equal counts. " + _how_to_obtain(images_relpath)
        )
    return images, labels


def load_text(relpath: str = "tinyshakespeare/input.txt", *, download: bool = True) -> str:
    """A UTF-8 text corpus, by default Tiny Shakespeare (1,115,394 characters)."""
    return _parse_file(fetch(relpath, download=download), relpath, _decode_text)


# ---------------------------------------------------------------------------------------------
# Helpers for experiments.


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """labels: (n,) integers in [0, num_classes) -> (n, num_classes) float32 one-hot rows."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"one_hot: labels must be a 1-d integer array, got {labels.dtype} "
                         f"{labels.shape}")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise ValueError(f"one_hot: labels must be in 0..{num_classes - 1}, found "
                         f"{labels[outside][0]}")
    return np.eye(num_classes, dtype=np.float32)[labels]


def hold_out_last(x, t, count: int, what: str = "training examples"):
    """((x, t) without their last `count` examples, (x, t) of those): a held-out split taken
    from the end, in order. Raises ValueError (naming the --held-out option) unless
    0 <= count < the number of examples."""
    n = x.shape[0]
    if not 0 <= count < n:
        raise ValueError(f"option --held-out: got {count}; allowed: fewer than the {n} {what}")
    cut = n - count
    return (x[:cut], t[:cut]), (x[cut:], t[cut:])


def split(
    images: np.ndarray, labels: np.ndarray, fractions: Sequence[float], *, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Shuffle with a seeded permutation and cut into parts of the given fractions.

    Args:
      images: (n, ...); labels: (n,).
      fractions: positive, summing to 1, e.g. (0.6, 0.2, 0.2) for train / held-out / test.
      seed: seed of the permutation; equal seeds give equal splits.

    Returns:
      One (images, labels) pair per fraction; part sizes are the rounded cumulative fractions
      of n, so they sum to n.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"split: images and labels differ in length: {n} != {len(labels)}")
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or not np.isclose(fractions.sum(), 1.0, rtol=0, atol=1e-9):
        raise ValueError(f"split: fractions must sum to 1, got {fractions.tolist()}")
    bounds = np.round(np.cumsum(fractions) * n).astype(np.int64)
    bounds[-1] = n
    sizes = np.diff(bounds, prepend=0)
    if (sizes <= 0).any():
        raise ValueError(f"split: fractions {fractions.tolist()} of {n} examples give sizes "
                         f"{sizes}, each must be >= 1")
    parts = np.split(np.random.default_rng(seed).permutation(n), bounds[:-1])
    return tuple((images[part], labels[part]) for part in parts)
