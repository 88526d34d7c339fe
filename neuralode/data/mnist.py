"""MNIST without torchvision: IDX reader, dataset, downloader and fast CPU batching.

Files
-----
The standard IDX files (gzip-compressed or raw) are looked up in a directory ``root``:

============  =========================================================  ======
split         files                                                      images
============  =========================================================  ======
``train``     ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``  60,000
``test``      ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``    10,000
``train-5k``  ``train-5k-images-idx3-ubyte.gz``, ``train-5k-labels-idx1-ubyte.gz``  5,000
============  =========================================================  ======

``train`` and ``test`` are the official sets and can be downloaded (:func:`download_mnist`).
``train-5k`` is an offline subset (the first 500 training images of each digit, grouped by
digit) shipped with the project's shared data (``shared/data/mnist`` next to the repository);
it cannot be downloaded. A file may also be stored decompressed, without the ``.gz`` suffix.

Trust
-----
Every file is checked when loaded (``verify_sha256=True``): the SHA-256 of the decompressed
bytes for the test set and the offline subset, the MD5 of the official archive for the training
files; a pass is remembered in a ``.verified-<name>`` stamp so unchanged files are not hashed
again. An explicit ``root`` that does not exist is an error (:class:`DataDirNotFoundError`),
never replaced by another directory. :func:`download_mnist` has an overall wall-clock deadline
and a size cap, and only ever renames a complete, MD5-checked temp file to the real name.

Batching
--------
:class:`BatchLoader` yields ``(images, labels)``: float32 ``N x 1 x 28 x 28`` images normalized
with the usual MNIST statistics (:data:`MNIST_MEAN`, :data:`MNIST_STD`) and int64 labels. The
shuffling and the augmentation (:func:`random_crop`: zero-pad by 4 pixels, random 28x28 crop)
are a pure function of ``(seed, epoch)``, and with ``world_size > 1`` every rank draws the
randomness for the whole global batch and keeps its own contiguous slice, so any number of
processes sees exactly the images that one process sees.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import math
import os
import re
import socket
import stat
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["MIRRORS", "MNIST", "MNIST_MAX_BYTES", "MNIST_MD5", "MNIST_MEAN", "MNIST_SHA256",
           "MNIST_STD", "SPLITS", "BatchLoader", "ChecksumError", "DataDirNotFoundError",
           "DownloadError", "default_root", "denormalize", "download_mnist", "normalize",
           "random_crop", "read_idx", "resolve_data_dir", "shared_data_dir", "split_files",
           "verify_sha256"]

# Public base URLs of the official MNIST files, tried in this order.
MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

# MD5 of the official compressed archives (what the mirrors serve).
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# SHA-256 of the *decompressed* IDX bytes, keyed by file name without ``.gz``, from
# shared/data/README.md and checked against the shared copies. The official 60k training files
# are not listed: no local copy exists to confirm a digest, so they are checked by the MD5 of
# their official archive (MNIST_MD5) instead.
MNIST_SHA256: dict[str, str] = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-5k-images-idx3-ubyte":
        "a4a9358b9ba319305e7cd69b2c7410e463401e152d7e9e60189b94a3f159d012",
    "train-5k-labels-idx1-ubyte":
        "704256e87519240fd1d7ecdf681fe209864691e252c6642aeadc21f3c4d44b41",
}

# Upper bounds on the size of each downloaded archive: a download is aborted as soon as more
# bytes arrive (or Content-Length announces more). The official archives are 9,912,422,
# 28,881, 1,648,877 and 4,542 bytes (the t10k sizes are those of the shared copies; the train
# sizes could not be checked offline), so each bound leaves >= 20% headroom.
MNIST_MAX_BYTES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 12_000_000,
    "train-labels-idx1-ubyte.gz": 64_000,
    "t10k-images-idx3-ubyte.gz": 2_000_000,
    "t10k-labels-idx1-ubyte.gz": 16_000,
}
_DEFAULT_MAX_BYTES = 64 << 20  # for files not in MNIST_MAX_BYTES (custom checksum tables)

# split -> (images file, labels file, number of images)
SPLITS: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
    "train-5k": ("train-5k-images-idx3-ubyte.gz", "train-5k-labels-idx1-ubyte.gz", 5000),
}
DOWNLOADABLE_SPLITS = ("train", "test")

# Mean and standard deviation of the MNIST training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
_IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short (int16)",
    0x0C: "int (int32)",
    0x0D: "float (float32)",
    0x0E: "double (float64)",
}
_MAGIC_LABELS = 0x00000801
_MAGIC_IMAGES = 0x00000803
_DOWNLOAD_HINT = "MNIST(root, split=..., download=True), download_mnist(root) " \
                 "or the --download flag of `neuralode train mnist`"




class ChecksumError(ValueError):
    """A file's digest differs from the known one (altered, corrupt or not the MNIST file)."""


class DataDirNotFoundError(ValueError):
    """An explicitly given data directory does not exist (or is not a directory).

    Deliberately *not* a ``FileNotFoundError``: code that falls back to another directory when
    files are missing must not swallow a mistyped path."""


class DownloadError(RuntimeError):
    """No mirror delivered a file (offline, deadline exceeded, too large, bad checksum...)."""


# --------------------------------------------------------------------------- IDX files


def _read_bytes(path: str | os.PathLike) -> bytes:
    """The file's IDX bytes, decompressed if it is gzip (detected by its magic bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip stream ({type(e).__name__}: {e}); "
                         "delete the file and download or copy it again") from e


def _parse_idx(data: bytes, path: str | os.PathLike) -> torch.Tensor:
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX header: expected at least 4 bytes, "
                         f"got {len(data)}")
    magic = int.from_bytes(data[:4], "big")
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero == b"\x00\x00" and dtype_code != _IDX_UBYTE:
        kind = _IDX_TYPE_NAMES.get(dtype_code, "not an IDX type")
        raise ValueError(f"{path}: unsupported IDX dtype code 0x{dtype_code:02X} ({kind}) in "
                         f"magic 0x{magic:08X}; only 0x08 (unsigned byte) is supported")
    if magic not in (_MAGIC_LABELS, _MAGIC_IMAGES):
        raise ValueError(f"{path}: wrong IDX magic number 0x{magic:08X}; expected "
                         f"0x{_MAGIC_LABELS:08X} (ubyte labels, 1-d) or "
                         f"0x{_MAGIC_IMAGES:08X} (ubyte images, 3-d)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header: expected {header} bytes, "
                         f"got {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims)
    actual = len(data) - header
    if actual < expected:
        raise ValueError(f"{path}: truncated IDX data: header says shape {dims}, i.e. "
                         f"{expected} data bytes, but only {actual} are present")
    if actual > expected:
        raise ValueError(f"{path}: IDX data has {actual - expected} unexpected trailing bytes "
                         f"(expected {expected} data bytes for shape {dims}, got {actual})")
    array = np.frombuffer(data, dtype=np.uint8, count=expected, offset=header)
    return torch.from_numpy(array.reshape(dims).copy())


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzip-compressed or raw) into a uint8 tensor.

    Supports MNIST images (magic 0x00000803, shape ``N x rows x cols``) and labels
    (magic 0x00000801, shape ``N``). Raises ``ValueError`` naming the file for a wrong magic
    number, an unsupported dtype code, truncated (or over-long) data and a corrupt gzip stream.
    """
    return _parse_idx(_read_bytes(path), path)


def _sha256_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    return name.removesuffix(".gz")


def verify_sha256(path: str | os.PathLike, expected: str | None = None) -> str:
    """Check the SHA-256 of a file's decompressed IDX bytes; return the hex digest.

    ``expected`` defaults to :data:`MNIST_SHA256`'s entry for the file's name (with or without
    ``.gz``); a ``KeyError`` is raised if the name is not in that table. Raises ``ValueError``
    on a mismatch.
    """
    if expected is None:
        key = _sha256_name(path)
        if key not in MNIST_SHA256:
            raise KeyError(f"{path}: no known SHA-256 for {key!r}; known files: "
                           f"{', '.join(sorted(MNIST_SHA256))}")
        expected = MNIST_SHA256[key]
    return _check_sha256(_read_bytes(path), path, expected)


def _check_sha256(data: bytes, path: str | os.PathLike, expected: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected.lower():
        raise ChecksumError(f"{path}: SHA-256 of the decompressed data is {digest}, expected "
                            f"{expected.lower()}; the file was altered, is corrupt or is not the "
                            "expected MNIST file: delete it and download or copy it again")
    return digest


def _md5_file(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Verification stamps: ``.verified-<file name>`` beside a file records the file's size, mtime,
# ctime and inode at the time its digest matched; while all four are unchanged a later load
# skips the hash. Any write to the file changes its ctime, which cannot be set back by hand.
_STAMP_PREFIX = ".verified-"
_STAMP_VERSION = 1


def _stamp_path(path: Path) -> Path:
    return path.with_name(_STAMP_PREFIX + path.name)


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino}


def _stamp_record(path: Path, st: os.stat_result, algorithm: str, digest: str) -> dict:
    return {"version": _STAMP_VERSION, "file": path.name, **_stat_key(st),
            "algorithm": algorithm, "digest": digest}


def _stamp_matches(path: Path, st: os.stat_result, algorithm: str, digest: str) -> bool:
    try:
        with open(_stamp_path(path), encoding="utf-8") as f:
            return json.load(f) == _stamp_record(path, st, algorithm, digest)
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, st: os.stat_result, algorithm: str, digest: str) -> None:
    """Best effort: nothing is written into a directory without write permission bits (such as
    the read-only shared data), even for root; any OSError just leaves the file unstamped."""
    directory = path.parent
    try:
        if not stat.S_IMODE(directory.stat().st_mode) & 0o222 or not os.access(directory,
                                                                                os.W_OK):
            return
        fd, tmp = tempfile.mkstemp(prefix=_stamp_path(path).name + ".", suffix=".tmp",
                                   dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(_stamp_record(path, st, algorithm, digest), f)
            os.replace(tmp, _stamp_path(path))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def _verify_file(path: Path, data: bytes | None = None) -> bool:
    """Check ``path`` against the known digest for its name; return False if none is known.

    Files listed in :data:`MNIST_SHA256` are checked by the SHA-256 of their decompressed bytes
    (``data``, read if not given), official archives by the MD5 in :data:`MNIST_MD5`. A valid
    stamp skips the hash; a successful check writes one. Raises :class:`ChecksumError`.
    """
    path = Path(path)
    key = _sha256_name(path)
    if key in MNIST_SHA256:
        algorithm, expected = "sha256-decompressed", MNIST_SHA256[key].lower()
    elif path.name in MNIST_MD5:
        algorithm, expected = "md5-archive", MNIST_MD5[path.name].lower()
    else:
        return False
    before = path.stat()
    if _stamp_matches(path, before, algorithm, expected):
        return True
    if algorithm == "sha256-decompressed":
        _check_sha256(_read_bytes(path) if data is None else data, path, expected)
    else:
        digest = _md5_file(path)
        if digest != expected:
            raise ChecksumError(f"{path}: MD5 of the archive is {digest}, expected {expected} "
                                "(the official file's); the file was altered or is corrupt: "
                                "delete it and download it again")
    if _stat_key(path.stat()) == _stat_key(before):  # unchanged while we read it
        _write_stamp(path, before, algorithm, expected)
    return True


# --------------------------------------------------------------------------- locations


def default_root() -> Path:
    """The per-user MNIST directory: ``$NEURALODE_DATA`` if set, else
    ``$XDG_CACHE_HOME/neuralode/mnist``, else ``~/.cache/neuralode/mnist``."""
    env = os.environ.get("NEURALODE_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "neuralode" / "mnist"


def shared_data_dir() -> Path:
    """Where the project's offline copy lives: ``shared/data/mnist`` beside the repository
    (may not exist, e.g. for an installed package)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


def split_files(split: str) -> tuple[str, str]:
    """The (images, labels) file names of a split."""
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; valid splits are: "
                         f"{', '.join(SPLITS)}")
    images, labels, _ = SPLITS[split]
    return images, labels


def _missing_files_hint(split: str, root: Path) -> str:
    if split in DOWNLOADABLE_SPLITS:
        return (f"Get them with {_DOWNLOAD_HINT}; offline, copy the official files "
                f"({', '.join(SPLITS['train'][:2] + SPLITS['test'][:2])}) into that "
                "directory or point root / $NEURALODE_DATA at a directory holding them")
    return _offline_subset_message(root)


def _check_data_dir(root: Path, split: str, download: bool) -> None:
    """Raise :class:`DataDirNotFoundError` if ``root`` is not a directory (a missing one is
    fine when ``download`` will create it)."""
    if root.is_dir() or (download and not root.exists()):
        return
    what = "is not a directory" if root.exists() else "does not exist"
    files = ", ".join(SPLITS[split][:2]) if split in SPLITS else "the MNIST files"
    raise DataDirNotFoundError(
        f"MNIST data directory {root} {what} (split {split!r}: missing file(s) {files}). "
        "Check the path for a typo, or create the directory and put the files there; no other "
        f"directory is used in its place. {_missing_files_hint(split, root)}")


def resolve_data_dir(split: str, data_dir: str | os.PathLike | None = None,
                     download: bool = False) -> Path:
    """The directory to read ``split`` from.

    An explicit ``data_dir`` is used as it is, never replaced by another directory: if it does
    not exist (and ``download`` is false) :class:`DataDirNotFoundError` is raised; missing
    files in it are left for :class:`MNIST` to report. Without ``data_dir``: the per-user
    :func:`default_root` if it holds the split's files or ``download`` is set, else the
    project's offline copy (:func:`shared_data_dir`) if *it* holds them, else
    :func:`default_root` (whose missing files :class:`MNIST` then reports).
    """
    split_files(split)  # validates the split name
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        _check_data_dir(root, split, download)
        return root
    root = default_root()
    names = SPLITS[split][:2]
    if download or all(_find(root, n) for n in names):
        return root
    shared = shared_data_dir()
    if all(_find(shared, n) for n in names):
        return shared
    return root


def _find(root: Path, name: str) -> Path | None:
    """``root/name`` or its decompressed twin (``name`` without ``.gz``)."""
    for candidate in (root / name, root / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _offline_subset_message(root: Path) -> str:
    shared = shared_data_dir()
    where = f" (here: {shared})" if (shared / SPLITS["train-5k"][0]).is_file() else ""
    return ("the 'train-5k' split is an offline subset of the MNIST training set (the first 500 "
            "images of each digit, grouped by digit) that is shipped with the project's shared "
            f"data in shared/data/mnist next to the repository{where}; it cannot be downloaded. "
            f"Pass root= that directory or copy its train-5k-*.gz files into {root}")


# --------------------------------------------------------------------------- dataset


class MNIST(torch.utils.data.Dataset):
    """MNIST from IDX files on disk.

    Args:
        root: directory holding the files (default :func:`default_root`).
        split: ``"train"`` (60,000 official), ``"test"`` (10,000 official) or ``"train-5k"``
            (5,000-image offline subset).
        download: download missing ``train``/``test`` files from :data:`MIRRORS` (creating
            ``root`` if needed).
        verify_sha256: check every file against its known digest (default on): the
            SHA-256 of the decompressed bytes for the files :data:`MNIST_SHA256` lists (test set
            and the offline subset), the MD5 of the official archive (:data:`MNIST_MD5`) for the
            compressed official training files; a file with neither (a decompressed training
            file) only warns. A file that passed gets a stamp ``.verified-<name>`` beside it
            (size, mtime, ctime, inode, digest) and is not hashed again while it is unchanged.
            Headers, shapes and counts are always checked.

    Raises:
        DataDirNotFoundError: ``root`` was given but is not an existing directory (unless
            ``download`` creates it); the default root is exempt (missing files are reported).
        FileNotFoundError: a file of the split is missing.
        ChecksumError: a file's digest differs from the known one (a ``ValueError``).
        ValueError: a malformed IDX file, wrong counts.

    Attributes:
        images: uint8 tensor ``N x 28 x 28``; labels: int64 tensor ``N``.

    ``dataset[i]`` is ``(images[i], labels[i])`` (``i`` may also be a slice or index tensor).
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train",
                 download: bool = False, verify_sha256: bool = True):
        images_name, labels_name = split_files(split)
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.split = split
        if self.root != default_root():
            _check_data_dir(self.root, split, download)
        paths = {n: _find(self.root, n) for n in (images_name, labels_name)}
        missing = [n for n, p in paths.items() if p is None]
        if missing and download:
            if split not in DOWNLOADABLE_SPLITS:
                raise FileNotFoundError(f"missing {', '.join(missing)} in {self.root}: "
                                        + _offline_subset_message(self.root))
            download_mnist(self.root, splits=(split,))
            paths = {n: _find(self.root, n) for n in (images_name, labels_name)}
            missing = [n for n, p in paths.items() if p is None]
        if missing:
            raise FileNotFoundError(f"MNIST split {split!r}: missing file(s) "
                                    f"{', '.join(missing)} in directory {self.root}. "
                                    + _missing_files_hint(split, self.root))
        self.images_path = paths[images_name]
        self.labels_path = paths[labels_name]
        raw = {p: _read_bytes(p) for p in (self.images_path, self.labels_path)}
        images = _parse_idx(raw[self.images_path], self.images_path)
        labels = _parse_idx(raw[self.labels_path], self.labels_path)
        self._validate(images, labels, SPLITS[split][2])
        if verify_sha256:
            for path, data in raw.items():
                if not _verify_file(path, data):
                    warnings.warn(f"{path}: no checksum known for this file; only its IDX "
                                  "header and size were checked", stacklevel=2)
        self.images = images
        self.labels = labels.to(torch.int64)

    def _validate(self, images: torch.Tensor, labels: torch.Tensor, count: int) -> None:
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
            raise ValueError(f"{self.images_path}: expected images of shape N x 28 x 28, got "
                             f"{tuple(images.shape)}")
        if labels.dim() != 1:
            raise ValueError(f"{self.labels_path}: expected 1-d labels, got shape "
                             f"{tuple(labels.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"MNIST split {self.split!r} in {self.root}: {len(images)} images "
                             f"({self.images_path.name}) but {len(labels)} labels "
                             f"({self.labels_path.name})")
        if len(images) != count:
            raise ValueError(f"MNIST split {self.split!r} in {self.root}: expected {count} "
                             f"images, the files hold {len(images)}")
        if len(labels) and int(labels.max()) > 9:
            raise ValueError(f"{self.labels_path}: labels must be digits 0..9, found "
                             f"{int(labels.max())}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return f"MNIST(split={self.split!r}, n={len(self)}, root={str(self.root)!r})"


# --------------------------------------------------------------------------- download


_PART_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.part$")
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5


class _DeadlineExceeded(OSError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_parts(root: Path, name: str) -> list[Path]:
    """Delete temp files of ``name`` left by downloads whose process is gone (killed, crashed);
    those of a live process (a concurrent download) are kept. Returns the deleted paths."""
    removed = []
    for part in root.glob(f".{name}.*.part"):
        m = _PART_RE.match(part.name)
        if m is None or m["name"] != name:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):  # ours (another thread) or a live download
            continue
        try:
            part.unlink()
            removed.append(part)
        except FileNotFoundError:
            pass
    return removed


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """An unopened connection for ``url`` (through $http_proxy / $https_proxy unless
    $no_proxy exempts the host) and the request target to send."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"unsupported URL {url!r}: only http:// and https:// are supported")
    https = parts.scheme == "https"
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if https:
            conn = cls(p.hostname, p.port or 8080, timeout=timeout)
            conn.set_tunnel(parts.hostname, parts.port or 443)
            return conn, target
        return http.client.HTTPConnection(p.hostname, p.port or 8080, timeout=timeout), url
    return cls(parts.hostname, parts.port, timeout=timeout), target


def _fetch(url: str, dest_dir: Path, name: str, timeout: float, deadline: float,
           max_bytes: int) -> tuple[Path, str]:
    """Download ``url`` into a temp file in ``dest_dir``; return (temp path, md5).

    ``deadline`` is a ``time.monotonic()`` instant by which everything (connecting, headers,
    body, redirects) must be done: a watchdog shuts the socket down when it passes, so a
    server trickling bytes cannot keep the download alive. ``timeout`` bounds each blocking
    socket operation. More than ``max_bytes`` (announced or received) aborts the download.
    The temp file is ``.<name>.<pid>.<random>.part``: removed on any error here, and by
    :func:`_remove_stale_parts` on a later attempt if this process is killed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".part", dir=dest_dir)
    tmp_path = Path(tmp)
    expired = threading.Event()
    current: list[http.client.HTTPConnection] = []

    def on_deadline() -> None:
        expired.set()
        for conn in current:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0 or expired.is_set():
            raise _DeadlineExceeded("overall download deadline exceeded")
        return left

    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), on_deadline)
    watchdog.daemon = True
    watchdog.start()
    n = 0
    try:
        with os.fdopen(fd, "wb") as out:
            h = hashlib.md5()
            for _ in range(_MAX_REDIRECTS + 1):
                conn, target = _connection(url, min(timeout, remaining()))
                current[:] = [conn]
                try:
                    conn.connect()
                    if expired.is_set():
                        on_deadline()
                    remaining()
                    conn.request("GET", target, headers={"User-Agent": "neuralode",
                                                         "Accept-Encoding": "identity"})
                    r = conn.getresponse()
                    if r.status in _REDIRECTS and r.getheader("Location"):
                        url = urllib.parse.urljoin(url, r.getheader("Location"))
                        continue
                    if r.status != 200:
                        raise OSError(f"HTTP {r.status} {r.reason}")
                    length = r.getheader("Content-Length")
                    length = int(length) if length and length.strip().isdigit() else None
                    if length is not None and length > max_bytes:
                        raise OSError(f"Content-Length {length} exceeds the size cap of "
                                      f"{max_bytes} bytes for {name}; aborted before reading")
                    while True:
                        remaining()
                        chunk = r.read1(min(1 << 16, max_bytes - n + 1))
                        if not chunk:
                            break
                        n += len(chunk)
                        if n > max_bytes:
                            raise OSError(f"received more than the size cap of {max_bytes} "
                                          f"bytes for {name}; aborted")
                        out.write(chunk)
                        h.update(chunk)
                    remaining()  # EOF may come from the watchdog's shutdown
                    if length is not None and length != n:
                        raise OSError(f"incomplete transfer: got {n} of {length} bytes")
                    break
                finally:
                    conn.close()
            else:
                raise OSError(f"more than {_MAX_REDIRECTS} redirects")
            out.flush()
            os.fsync(out.fileno())
        return tmp_path, h.hexdigest()
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if expired.is_set() and isinstance(e, (OSError, http.client.HTTPException)):
            raise _DeadlineExceeded(f"overall download deadline exceeded after {n} bytes "
                                    "of the body") from e
        raise
    finally:
        watchdog.cancel()


def download_mnist(root: str | os.PathLike | None = None,
                   splits: Sequence[str] = ("train", "test"),
                   mirrors: Sequence[str] | None = None, timeout: float = 30.0,
                   checksums: Mapping[str, str] | None = None,
                   force: bool = False, deadline: float = 900.0,
                   max_bytes: Mapping[str, int] | int | None = None) -> list[Path]:
    """Download the official MNIST archives of ``splits`` into ``root``; return their paths.

    Each file is tried on every mirror in order (``mirrors`` defaults to :data:`MIRRORS`),
    written to a temporary file ``.<name>.<pid>.<random>.part`` in ``root``, checked against
    its MD5 in ``checksums`` (default :data:`MNIST_MD5`) and only then renamed atomically to
    its name, so a file under the real name is always complete and checked. On a mismatch or
    any error the temp file is deleted and the next mirror is tried; temp files left by a
    download that was killed (its process is gone) are deleted on the next attempt. Files
    already present are kept unless ``force`` (:class:`MNIST` verifies them when loading).

    Limits: ``deadline`` seconds of wall-clock time for the whole call (connecting, headers,
    body, every mirror and file), enforced even against a server that trickles bytes;
    ``timeout`` seconds for any single blocking socket operation; ``max_bytes`` per file
    (default :data:`MNIST_MAX_BYTES`; an int applies to every file): a larger Content-Length
    or more received bytes abort the download. Raises :class:`DownloadError` (a
    ``RuntimeError``) naming every URL tried and its error if no mirror delivers a file.
    """
    root = Path(root).expanduser() if root is not None else default_root()
    if isinstance(splits, str):
        splits = (splits,)
    if mirrors is None:
        mirrors = MIRRORS
    elif isinstance(mirrors, str):
        mirrors = [mirrors]
    if not mirrors:
        raise ValueError("download_mnist: no mirrors given")
    for value, what in ((deadline, "deadline"), (timeout, "timeout")):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"download_mnist: {what} must be a positive number of seconds, "
                             f"got {value!r}")
    table = MNIST_MD5 if checksums is None else checksums
    names: list[str] = []
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown MNIST split {split!r}; downloadable splits are: "
                             f"{', '.join(DOWNLOADABLE_SPLITS)}")
        if split not in DOWNLOADABLE_SPLITS:
            raise ValueError(_offline_subset_message(root))
        names.extend(split_files(split))
    end = time.monotonic() + deadline
    root.mkdir(parents=True, exist_ok=True)
    official = ", ".join(SPLITS["train"][:2] + SPLITS["test"][:2])
    done = []
    for name in names:
        dest = root / name
        _remove_stale_parts(root, name)
        if dest.is_file() and not force:
            done.append(dest)
            continue
        if name not in table:
            raise ValueError(f"download_mnist: no MD5 checksum given for {name}")
        expected = table[name].lower()
        if isinstance(max_bytes, int):
            cap = max_bytes
        else:
            cap = (max_bytes or MNIST_MAX_BYTES).get(name, _DEFAULT_MAX_BYTES)
        tried, errors = [], []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            if time.monotonic() >= end:
                errors.append(f"{url}: not tried, the overall deadline of {deadline:g} s "
                              "had passed")
                continue
            tried.append(url)
            try:
                tmp, digest = _fetch(url, root, name, timeout, end, cap)
            except _DeadlineExceeded as e:
                errors.append(f"{url}: {e} ({deadline:g} s for the whole download)")
                continue
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
                continue
            if digest != expected:
                tmp.unlink(missing_ok=True)
                errors.append(f"{url}: checksum mismatch (MD5 {digest}, expected {expected})")
                continue
            os.replace(tmp, dest)
            done.append(dest)
            break
        else:
            raise DownloadError(f"could not download {name} from any mirror (tried: "
                                f"{', '.join(tried) or 'none'}; errors: {'; '.join(errors)}). "
                                f"If you are offline, copy the four files ({official}) into "
                                f"{root}")
    return done


# --------------------------------------------------------------------------- batching


def normalize(images: torch.Tensor) -> torch.Tensor:
    """float32 ``(x - MNIST_MEAN) / MNIST_STD`` with ``x`` in [0, 1]: uint8 input is divided by
    255, floating input is taken to be in [0, 1] already."""
    x = images.to(torch.float32)
    if images.dtype == torch.uint8:  # x is a fresh tensor: work in place
        return x.mul_(1.0 / (255.0 * MNIST_STD)).sub_(MNIST_MEAN / MNIST_STD)
    return (x - MNIST_MEAN) / MNIST_STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: back to [0, 1] floats."""
    return x * MNIST_STD + MNIST_MEAN


def _crop_offsets(n: int, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """(2, n) int64 offsets in [0, 2 * padding]: row offsets then column offsets."""
    return torch.randint(0, 2 * padding + 1, (2, n), generator=generator)


def _crop(batch: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad ``batch`` (N x H x W or N x C x H x W) by ``padding`` and take for image i the
    H x W window at (row, col) = offsets[:, i] of the padded image."""
    if padding == 0:
        return batch.clone()
    x = batch.unsqueeze(1) if batch.dim() == 3 else batch
    n, c, h, w = x.shape
    padded = x.new_zeros(n, c, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    # windows[i, ch, r, s] is the h x w crop at offset (r, s): a view, nothing is copied.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    offsets = offsets.to(batch.device)
    out = windows[torch.arange(n, device=batch.device), :, offsets[0], offsets[1]]
    return out.squeeze(1) if batch.dim() == 3 else out


def random_crop(batch: torch.Tensor, padding: int = 4,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad every image with ``padding`` zeros on each side and take a random crop of the
    original size, independently per image (the standard MNIST/CIFAR augmentation).

    ``batch`` is ``N x H x W`` or ``N x C x H x W`` of any dtype; the result has the same shape
    and dtype. Offsets are drawn with ``torch.randint`` from ``generator`` (a CPU generator;
    ``None`` uses the global one). ``padding=0`` returns a copy of the input.
    """
    if batch.dim() not in (3, 4):
        raise ValueError(f"random_crop expects N x H x W or N x C x H x W, got shape "
                         f"{tuple(batch.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return batch.clone()
    return _crop(batch, _crop_offsets(batch.shape[0], padding, generator), padding)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch), the same on every platform and process."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


class BatchLoader:
    """Deterministic shuffled minibatches of MNIST for CPU training, without a DataLoader.

    Args:
        data: an :class:`MNIST` (anything with ``images`` and ``labels``) or an
            ``(images, labels)`` pair. uint8 images (``N x 28 x 28`` or ``N x 1 x 28 x 28``) are
            normalized with :func:`normalize`; floating images are used as they are.
        batch_size: the global batch size (over all ranks).
        shuffle: a fresh permutation each epoch, seeded by ``(seed, epoch)``.
        augment: :func:`random_crop` with ``padding`` (applied before normalization, so the
            padding is black).
        drop_last: drop the last incomplete global batch.
        rank, world_size: with ``world_size > 1`` rank ``r`` gets the ``r``-th contiguous slice
            of ``batch_size // world_size`` images of every global batch. The permutation and
            the crop offsets are drawn for the whole epoch from the same generator on every rank,
            so the union of the ranks' batches is exactly the one-process batch. An incomplete
            last batch is split as evenly as possible (some ranks may get fewer, even zero,
            images: use ``drop_last=True`` for multi-process training).

    Iteration yields ``(images float32 B x 1 x 28 x 28, labels int64 B)`` for the current epoch
    (:meth:`set_epoch`); :meth:`iter_epoch` can start at a given batch to resume mid-epoch.
    ``len(loader)`` is the number of batches per epoch.
    """

    def __init__(self, data, batch_size: int, shuffle: bool = True, augment: bool = False,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 padding: int = 4):
        if hasattr(data, "images") and hasattr(data, "labels"):
            images, labels = data.images, data.labels
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            images, labels = data
        else:
            raise TypeError("BatchLoader needs a dataset with .images and .labels or an "
                            f"(images, labels) pair, got {type(data).__name__}")
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise ValueError(f"images must be N x H x W or N x C x H x W, got shape "
                             f"{tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size ({batch_size}) must be divisible by "
                             f"world_size ({world_size})")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.padding = int(padding)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = len(self.labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int, start_batch: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, start_batch + 1, ...`` of ``epoch`` (for resuming)."""
        n = len(self.labels)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        # Offsets for every position of the epoch, drawn after the permutation so that
        # turning augmentation on does not change the order.
        offsets = (_crop_offsets(n, self.padding, generator)
                   if self.augment and self.padding > 0 else None)
        for b in range(start_batch, len(self)):
            start = b * self.batch_size
            size = min(self.batch_size, n - start)
            lo = start + self.rank * size // self.world_size
            hi = start + (self.rank + 1) * size // self.world_size
            index = order[lo:hi]
            images = self.images[index]
            if offsets is not None:
                images = _crop(images, offsets[:, lo:hi], self.padding)
            if images.dtype == torch.uint8:
                images = normalize(images)
            yield images, self.labels[index]
