"""Tests for neuralode.data.mnist: IDX reading, the dataset, the downloader and batching.

No network: downloads go to a local http.server on 127.0.0.1. Real data comes from the
offline copy in ../shared/data/mnist (relative to the repository root).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralode.data import mnist as M
from neuralode.data.mnist import (
    MNIST,
    MNIST_MEAN,
    MNIST_SHA256,
    MNIST_STD,
    BatchLoader,
    ChecksumError,
    DataDirNotFoundError,
    DownloadError,
    default_root,
    download_mnist,
    normalize,
    random_crop,
    read_idx,
    resolve_data_dir,
    verify_sha256,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Raw IDX bytes of a uint8 array (magic defaults to ubyte with the array's ndim)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write(path: Path, data: bytes, gz: bool = True) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def write_split(root: Path, split: str, n: int, n_labels: int | None = None, seed: int = 0):
    images, labels = synthetic(n, seed)
    if n_labels is not None:
        labels = np.resize(labels, n_labels)
    img_name, lbl_name, _ = M.SPLITS[split]
    write(root / img_name, idx_bytes(images))
    write(root / lbl_name, idx_bytes(labels))
    return images, labels


@pytest.fixture(scope="module")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"offline MNIST copy missing: {SHARED} (see shared/data/README.md)"
    return SHARED


@pytest.fixture(scope="module")
def test_set(shared_dir) -> MNIST:
    return MNIST(shared_dir, split="test")


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server over tmp_path/www; yields (base URL, www dir, requested paths)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/mnist/"


def make_mirror(www: Path, name: str, files: dict[str, bytes]) -> Path:
    d = www / name
    d.mkdir()
    for fname, data in files.items():
        (d / fname).write_bytes(data)
    return d


def test_archives(n: int = 20, seed: int = 0) -> dict[str, bytes]:
    images, labels = synthetic(n, seed)
    return {M.SPLITS["test"][0]: gzip.compress(idx_bytes(images), mtime=0),
            M.SPLITS["test"][1]: gzip.compress(idx_bytes(labels), mtime=0)}


test_archives.__test__ = False  # a helper, not a test


def md5s(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.md5(v).hexdigest() for k, v in files.items()}


def padded_crops(image: torch.Tensor, padding: int) -> dict[tuple[int, int], torch.Tensor]:
    """All (row, col) -> crop of the zero-padded image (reference, written independently)."""
    h, w = image.shape[-2:]
    p = torch.zeros(*image.shape[:-2], h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    p[..., padding:padding + h, padding:padding + w] = image
    return {(r, c): p[..., r:r + h, c:c + w]
            for r in range(2 * padding + 1) for c in range(2 * padding + 1)}


def crop_offset(out: torch.Tensor, image: torch.Tensor, padding: int) -> tuple[int, int]:
    matches = [rc for rc, crop in padded_crops(image, padding).items() if torch.equal(crop, out)]
    assert matches, "output is not a shifted crop of the padded input"
    return matches[0]


# --------------------------------------------------------------------------- IDX reader


def test_read_idx_gzip_and_raw_detected_by_magic_not_name(tmp_path):
    images, labels = synthetic(7)
    # a gzip file without .gz and a raw file named .gz
    a = read_idx(write(tmp_path / "images.idx", idx_bytes(images), gz=True))
    b = read_idx(write(tmp_path / "labels.gz", idx_bytes(labels), gz=False))
    assert a.dtype == torch.uint8 and a.shape == (7, 28, 28)
    assert b.dtype == torch.uint8 and b.shape == (7,)
    assert np.array_equal(a.numpy(), images) and np.array_equal(b.numpy(), labels)
    a[0, 0, 0] = 1  # a writable tensor that owns its memory
    assert read_idx(tmp_path / "images.idx")[0, 0, 0] == images[0, 0, 0]


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_truncated_data(tmp_path, gz):
    data = idx_bytes(synthetic(2)[0])[: 16 + 1000]
    path = write(tmp_path / "trunc", data, gz=gz)
    with pytest.raises(ValueError, match="truncated") as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "1568" in msg and "1000" in msg


def test_read_idx_truncated_header(tmp_path):
    path = write(tmp_path / "h", idx_bytes(synthetic(2)[0])[:10], gz=False)
    with pytest.raises(ValueError, match=r"truncated IDX header: expected 16 bytes, got 10"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = write(tmp_path / "long", idx_bytes(synthetic(2)[1]) + b"xyz")
    with pytest.raises(ValueError, match="3 unexpected trailing bytes"):
        read_idx(path)


@pytest.mark.parametrize("magic", [0x12345678, 0x00000802, 0x00000804])
def test_read_idx_wrong_magic(tmp_path, magic):
    path = write(tmp_path / "bad", idx_bytes(synthetic(2)[0], magic=magic)[:4] + b"\0" * 32,
                 gz=False)
    with pytest.raises(ValueError) as e:
        read_idx(path)
    msg = str(e.value)
    assert "wrong IDX magic" in msg and f"0x{magic:08X}" in msg
    assert "0x00000801" in msg and "0x00000803" in msg and str(path) in msg


def test_read_idx_unsupported_dtype(tmp_path):
    path = write(tmp_path / "float", (0x00000D01).to_bytes(4, "big") + (1).to_bytes(4, "big")
                 + b"\0" * 4)
    with pytest.raises(ValueError, match=r"unsupported IDX dtype code 0x0D \(float") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(synthetic(3)[0]))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good[: len(good) // 2])  # stream ends early
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(good[:10] + b"\xff" * 200)  # valid header, invalid deflate data
    for path in (cut, garbage):
        with pytest.raises(ValueError, match="corrupt gzip stream") as e:
            read_idx(path)
        assert str(path) in str(e.value)


# --------------------------------------------------------------------------- dataset


def test_real_test_split(test_set):
    assert len(test_set) == 10000
    assert test_set.images.dtype == torch.uint8 and test_set.images.shape == (10000, 28, 28)
    assert test_set.labels.dtype == torch.int64 and test_set.labels.shape == (10000,)
    assert test_set.labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]  # the well-known first digits
    assert torch.bincount(test_set.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958,
                                                        1028, 974, 1009]
    image, label = test_set[0]
    assert image.shape == (28, 28) and int(label) == 7
    assert 0 < test_set.images.float().mean() / 255 < 0.5


def test_real_train_5k(shared_dir):
    ds = MNIST(shared_dir, split="train-5k")
    assert ds.images.shape == (5000, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels, minlength=10).tolist() == [500] * 10
    assert torch.equal(ds.labels, torch.arange(10).repeat_interleave(500))


def test_sha256_real_files(shared_dir):
    for name, digest in MNIST_SHA256.items():
        assert verify_sha256(shared_dir / f"{name}.gz") == digest
    MNIST(shared_dir, split="train-5k", verify_sha256=True)
    MNIST(shared_dir, split="test", verify_sha256=True)


def test_sha256_fails_on_modified_copy(shared_dir, tmp_path):
    img, lbl, _ = M.SPLITS["train-5k"]
    shutil.copyfile(shared_dir / img, tmp_path / img)
    raw = bytearray(gzip.decompress((shared_dir / lbl).read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # still a valid label file with valid counts
    write(tmp_path / lbl, bytes(raw))
    with pytest.raises(ValueError, match="SHA-256") as e:
        verify_sha256(tmp_path / lbl)
    assert MNIST_SHA256[lbl.removesuffix(".gz")] in str(e.value)
    # loads only with the check switched off...
    assert MNIST(tmp_path, split="train-5k", verify_sha256=False).labels[-1] != 9
    with pytest.raises(ChecksumError, match="SHA-256"):  # ...and is caught by default
        MNIST(tmp_path, split="train-5k")
    with pytest.raises(KeyError, match="no known SHA-256"):
        verify_sha256(tmp_path / "something-else.gz")


def test_decompressed_files_are_found(shared_dir, tmp_path):
    for name in M.SPLITS["train-5k"][:2]:
        (tmp_path / name.removesuffix(".gz")).write_bytes(
            gzip.decompress((shared_dir / name).read_bytes()))
    ds = MNIST(tmp_path, split="train-5k", verify_sha256=True)
    assert len(ds) == 5000 and ds.images_path.name == "train-5k-images-idx3-ubyte"


def test_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        MNIST(tmp_path, split="train")
    msg = str(e.value)
    for needle in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", str(tmp_path),
                   "download=True", "--download"):
        assert needle in msg
    # only the missing one is listed
    write_split(tmp_path, "test", 3)
    (tmp_path / M.SPLITS["test"][1]).unlink()
    with pytest.raises(FileNotFoundError) as e:
        MNIST(tmp_path, split="test")
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)
    assert "t10k-images-idx3-ubyte.gz" not in str(e.value).split("in directory")[0]


def test_train_5k_cannot_be_downloaded(tmp_path):
    for call in (lambda: MNIST(tmp_path, split="train-5k", download=True),
                 lambda: MNIST(tmp_path, split="train-5k")):
        with pytest.raises(FileNotFoundError, match="offline subset") as e:
            call()
        assert "cannot be downloaded" in str(e.value) and "shared/data/mnist" in str(e.value)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        download_mnist(tmp_path, splits=("train-5k",), mirrors=[closed_port_url()])
    with pytest.raises(ValueError, match="unknown MNIST split"):
        MNIST(tmp_path, split="validation")


def test_counts_are_validated(tmp_path):
    write_split(tmp_path, "train-5k", 10)
    with pytest.raises(ValueError, match="expected 5000 images, the files hold 10"):
        MNIST(tmp_path, split="train-5k")
    write_split(tmp_path, "test", 10, n_labels=9)
    with pytest.raises(ValueError, match=r"10 images .* but 9 labels"):
        MNIST(tmp_path, split="test")


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURALODE_DATA", str(tmp_path / "data"))
    assert default_root() == tmp_path / "data"
    monkeypatch.delenv("NEURALODE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "neuralode" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "neuralode" / "mnist"
    monkeypatch.setenv("NEURALODE_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "env")):
        MNIST(split="test")


# --------------------------------------------------------------------------- downloader


def test_download_good_file(server, tmp_path):
    base, www, requests = server
    files = test_archives()
    make_mirror(www, "good", files)
    root = tmp_path / "root"
    paths = download_mnist(root, splits=("test",), mirrors=[base + "/good/"],
                           checksums=md5s(files))
    assert [p.name for p in paths] == list(files)
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    assert sorted(p.name for p in root.iterdir()) == sorted(files)  # no temp files left
    assert sorted(requests) == sorted(f"/good/{n}" for n in files)
    # already present: kept, nothing requested
    requests.clear()
    download_mnist(root, splits="test", mirrors=[base + "/good/"], checksums=md5s(files))
    assert requests == []


def test_download_checksum_mismatch_uses_next_mirror(server, tmp_path):
    base, www, requests = server
    good = test_archives(seed=0)
    make_mirror(www, "bad", test_archives(seed=1))  # valid IDX, wrong checksum
    make_mirror(www, "good", good)
    root = tmp_path / "root"
    download_mnist(root, splits=("test",), mirrors=[base + "/bad", base + "/good"],
                   checksums=md5s(good))
    for name, data in good.items():
        assert (root / name).read_bytes() == data
        assert requests.index(f"/bad/{name}") < requests.index(f"/good/{name}")
    assert sorted(p.name for p in root.iterdir()) == sorted(good)


def test_download_checksum_mismatch_everywhere(server, tmp_path):
    base, www, _ = server
    good = test_archives(seed=0)
    make_mirror(www, "bad", test_archives(seed=1))
    root = tmp_path / "root"
    with pytest.raises(RuntimeError) as e:
        download_mnist(root, splits=("test",), mirrors=[base + "/bad/"], checksums=md5s(good))
    msg = str(e.value)
    assert "could not download t10k-images-idx3-ubyte.gz from any mirror" in msg
    assert "checksum mismatch" in msg and md5s(good)["t10k-images-idx3-ubyte.gz"] in msg
    assert list(root.iterdir()) == []  # the bad download was deleted


def test_download_unreachable_mirror_falls_back(server, tmp_path):
    base, www, requests = server
    files = test_archives()
    make_mirror(www, "good", files)
    make_mirror(www, "empty", {})  # 404s
    root = tmp_path / "root"
    download_mnist(root, splits=["test"], mirrors=[closed_port_url(), base + "/empty/",
                                                   base + "/good/"],
                   checksums=md5s(files), timeout=5)
    for name, data in files.items():
        assert (root / name).read_bytes() == data
        assert f"/empty/{name}" in requests


def test_download_all_mirrors_down(tmp_path):
    mirrors = [closed_port_url(), closed_port_url()]
    root = tmp_path / "root"
    with pytest.raises(RuntimeError) as e:
        download_mnist(root, splits=("test",), mirrors=mirrors, timeout=5)
    msg = str(e.value)
    assert "could not download t10k-images-idx3-ubyte.gz from any mirror (tried: " in msg
    for m in mirrors:
        assert m + "t10k-images-idx3-ubyte.gz" in msg
    assert "errors:" in msg and "If you are offline, copy the four files" in msg
    assert "train-images-idx3-ubyte.gz" in msg and str(root) in msg
    assert list(root.iterdir()) == []


def test_dataset_download_end_to_end(server, shared_dir, tmp_path, monkeypatch):
    """MNIST(download=True) with the default mirror list and MD5 table, both pointed at the
    local server serving the real test files."""
    base, www, _ = server
    files = {n: (shared_dir / n).read_bytes() for n in M.SPLITS["test"][:2]}
    make_mirror(www, "mnist", files)
    monkeypatch.setattr(M, "MIRRORS", [closed_port_url(), base + "/mnist/"])
    for name, digest in md5s(files).items():
        monkeypatch.setitem(M.MNIST_MD5, name, digest)
    ds = MNIST(tmp_path / "cache", split="test", download=True, verify_sha256=True)
    assert len(ds) == 10000 and ds.labels[:3].tolist() == [7, 2, 1]


# --------------------------------------------------------------------------- data you can trust


def test_nonexistent_data_dir_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALODE_DATA", str(tmp_path / "cache"))  # default root: empty
    missing = tmp_path / "typo"
    for call in (lambda: MNIST(missing, split="test"),
                 lambda: resolve_data_dir("test", missing)):
        with pytest.raises(DataDirNotFoundError) as e:
            call()
        assert not isinstance(e.value, FileNotFoundError)  # a fallback can't swallow it
        msg = str(e.value)
        assert str(missing) in msg and "does not exist" in msg and "--download" in msg
        assert "t10k-images-idx3-ubyte.gz" in msg
    a_file = write(tmp_path / "file", b"x")
    with pytest.raises(DataDirNotFoundError, match="is not a directory"):
        MNIST(a_file, split="test")
    with pytest.raises(DataDirNotFoundError, match="offline subset"):
        resolve_data_dir("train-5k", missing)
    # an explicit existing directory is returned as is, even without the files
    (tmp_path / "empty").mkdir()
    assert resolve_data_dir("test", tmp_path / "empty") == tmp_path / "empty"
    assert resolve_data_dir("test", missing, download=True) == missing  # download creates it
    # only the default location falls back to the shared copy
    assert resolve_data_dir("test") == M.shared_data_dir()
    assert resolve_data_dir("train") == tmp_path / "cache"  # not in shared: default reported
    with pytest.raises(FileNotFoundError, match="missing file"):  # default root: missing files
        MNIST(split="test")


def altered_copy(shared_dir: Path, dest: Path, split: str) -> Path:
    """Copy a split and change one pixel of its last image: still a valid IDX file."""
    img, lbl, _ = M.SPLITS[split]
    shutil.copyfile(shared_dir / lbl, dest / lbl)
    raw = bytearray(gzip.decompress((shared_dir / img).read_bytes()))
    raw[-400] ^= 0xFF
    return write(dest / img.removesuffix(".gz"), bytes(raw), gz=False)  # gzip is slow


def test_altered_image_is_rejected(shared_dir, tmp_path):
    path = altered_copy(shared_dir, tmp_path, "test")
    assert read_idx(path).shape == (10000, 28, 28)  # structurally fine
    with pytest.raises(ChecksumError) as e:
        MNIST(tmp_path, split="test")
    msg = str(e.value)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path) in msg and MNIST_SHA256["t10k-images-idx3-ubyte"] in msg and actual in msg
    assert not (tmp_path / f".verified-{path.name}").exists()


def test_verification_stamp_skips_the_hash_until_the_file_changes(shared_dir, tmp_path,
                                                                   monkeypatch):
    for name in M.SPLITS["train-5k"][:2]:  # decompressed, so an edit keeps the size
        write(tmp_path / name.removesuffix(".gz"), gzip.decompress((shared_dir / name)
                                                                   .read_bytes()), gz=False)
    MNIST(tmp_path, split="train-5k")
    img = tmp_path / M.SPLITS["train-5k"][0].removesuffix(".gz")
    stamp = json.loads((tmp_path / f".verified-{img.name}").read_text())
    assert stamp["digest"] == MNIST_SHA256["train-5k-images-idx3-ubyte"]
    assert stamp["size"] == img.stat().st_size
    calls = []
    real = M._check_sha256
    monkeypatch.setattr(M, "_check_sha256", lambda *a: calls.append(a[1]) or real(*a))
    MNIST(tmp_path, split="train-5k")
    assert calls == []  # both files stamped: no hashing
    # alter an image, then put size and mtime back: the stamp must not be trusted
    st = img.stat()
    raw = bytearray(img.read_bytes())
    raw[-1] ^= 0xFF
    img.write_bytes(bytes(raw))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (img.stat().st_size, img.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(ChecksumError, match=str(img)):
        MNIST(tmp_path, split="train-5k")
    assert calls == [img]
    # the read-only shared copy gets no stamps
    MNIST(shared_dir, split="train-5k")
    assert not list(shared_dir.glob(".verified-*"))


def test_official_train_archive_checked_by_md5(tmp_path, monkeypatch):
    monkeypatch.setitem(M.SPLITS, "train", (*M.SPLITS["train"][:2], 20))
    write_split(tmp_path, "train", 20)
    for name in M.SPLITS["train"][:2]:
        monkeypatch.setitem(M.MNIST_MD5, name, hashlib.md5((tmp_path / name).read_bytes())
                            .hexdigest())
    assert len(MNIST(tmp_path, split="train")) == 20
    assert (tmp_path / ".verified-train-labels-idx1-ubyte.gz").is_file()
    write_split(tmp_path, "train", 20, seed=1)  # same shapes, other content
    with pytest.raises(ChecksumError, match=r"MD5 of the archive is [0-9a-f]{32}, expected"):
        MNIST(tmp_path, split="train")


PAYLOAD = {n: bytes(range(256)) * 8 for n in M.SPLITS["test"][:2]}


class _TrickyHandler(http.server.BaseHTTPRequestHandler):
    """/good/F serves PAYLOAD; /slow/ 1 byte/s; /slowhead/ headers at 1 byte/s;
    /biglength/ announces 10**9 bytes; /flood/ streams without Content-Length;
    /short/ closes before Content-Length bytes."""
    protocol_version = "HTTP/1.0"
    stop: threading.Event

    def log_message(self, *args):
        pass

    def _trickle(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.stop.wait(1.0):
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()

    def do_GET(self):
        kind, _, name = self.path.strip("/").partition("/")
        body = PAYLOAD.get(name, b"")
        try:
            if kind == "slowhead":
                self._trickle(b"HTTP/1.0 200 OK\r\nContent-Length: 2048\r\n\r\n")
                return
            self.send_response(200)
            if kind == "flood":
                self.end_headers()
                while not self.stop.is_set():
                    self.wfile.write(b"\0" * 65536)
                return
            length = {"biglength": 10**9, "short": len(body) + 100}.get(kind, len(body))
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if kind == "slow":
                self._trickle(body)
            elif kind in ("good", "short", "biglength"):
                self.wfile.write(body)
        except OSError:  # the client went away
            pass


@pytest.fixture
def tricky(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    stop = threading.Event()
    handler = type("Handler", (_TrickyHandler,), {"stop": stop})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


def no_files_left(root: Path) -> bool:
    return not root.exists() or list(root.iterdir()) == []


@pytest.mark.parametrize("kind", ["slow", "slowhead"])
def test_download_deadline_stops_a_trickling_server(tricky, tmp_path, kind):
    root = tmp_path / "root"
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as e:  # two mirrors, one deadline for the whole call
        download_mnist(root, splits="test", mirrors=[f"{tricky}/{kind}", f"{tricky}/{kind}"],
                       checksums=md5s(PAYLOAD), timeout=30, deadline=2.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 4.0, elapsed  # per-read timeout 30 s never fired: the deadline did
    assert "deadline" in str(e.value) and "If you are offline" in str(e.value)
    assert no_files_left(root)


def test_download_size_cap(tricky, tmp_path):
    root = tmp_path / "root"
    for kind, needle in (("biglength", "Content-Length 1000000000 exceeds the size cap"),
                         ("flood", "more than the size cap of 100000 bytes")):
        t0 = time.monotonic()
        with pytest.raises(DownloadError, match=needle):
            download_mnist(root, splits="test", mirrors=[f"{tricky}/{kind}"],
                           checksums=md5s(PAYLOAD), max_bytes=100_000, deadline=20)
        assert time.monotonic() - t0 < 5
        assert no_files_left(root)
    # the default caps are the per-file table
    with pytest.raises(DownloadError, match="exceeds the size cap of 2000000 bytes"):
        download_mnist(root, splits="test", mirrors=[f"{tricky}/biglength"],
                       checksums=md5s(PAYLOAD), deadline=20)


def test_download_truncated_or_corrupt_is_rejected(tricky, tmp_path):
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="incomplete transfer: got 2048 of 2148 bytes"):
        download_mnist(root, splits="test", mirrors=[f"{tricky}/short"],
                       checksums=md5s(PAYLOAD), deadline=20)
    assert no_files_left(root)
    wrong = {n: "0" * 32 for n in PAYLOAD}
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_mnist(root, splits="test", mirrors=[f"{tricky}/good"], checksums=wrong,
                       deadline=20)
    assert no_files_left(root)
    download_mnist(root, splits="test", mirrors=[f"{tricky}/good"], checksums=md5s(PAYLOAD))
    assert {p.name: p.read_bytes() for p in root.iterdir()} == PAYLOAD


def test_killed_download_leaves_no_file_and_its_temp_is_cleaned(tricky, tmp_path):
    root = tmp_path / "root"
    name = M.SPLITS["test"][0]
    code = ("import sys; from neuralode.data.mnist import download_mnist; "
            "download_mnist(sys.argv[1], splits='test', mirrors=[sys.argv[2]], "
            "checksums=dict.fromkeys(['t10k-images-idx3-ubyte.gz', "
            "'t10k-labels-idx1-ubyte.gz'], '0' * 32), deadline=120)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), f"{tricky}/slow"], env=env)
    try:
        t0 = time.monotonic()
        while not list(root.glob(f".{name}.*.part")):
            assert proc.poll() is None, "the download ended early"
            assert time.monotonic() - t0 < 45, "the download never started"
            time.sleep(0.1)
        time.sleep(1.5)  # a byte or so has arrived
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    parts = list(root.glob(f".{name}.*.part"))
    assert len(parts) == 1 and not (root / name).exists()  # no file under the real name
    live = root / f".{name}.{os.getppid()}.abc.part"  # a live process's download: kept
    live.write_bytes(b"")
    download_mnist(root, splits="test", mirrors=[f"{tricky}/good"], checksums=md5s(PAYLOAD))
    assert sorted(p.name for p in root.iterdir()) == sorted([*PAYLOAD, live.name])
    assert (root / name).read_bytes() == PAYLOAD[name]


# --------------------------------------------------------------------------- normalize / crop


def test_normalize():
    x = torch.tensor([[0, 255], [128, 1]], dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = (x.double() / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(normalize(x.float() / 255), y, rtol=0, atol=1e-6)
    torch.testing.assert_close(M.denormalize(y), x.float() / 255, rtol=0, atol=1e-6)
    assert x.dtype == torch.uint8 and x[0, 1] == 255  # input untouched


def test_random_crop_shape_dtype_and_identity(test_set):
    batch = test_set.images[:32]
    for inp in (batch, batch.unsqueeze(1), normalize(batch).unsqueeze(1)):
        out = random_crop(inp, padding=4, generator=torch.Generator().manual_seed(0))
        assert out.shape == inp.shape and out.dtype == inp.dtype
        same = random_crop(inp, padding=0)
        assert torch.equal(same, inp) and same.data_ptr() != inp.data_ptr()
    with pytest.raises(ValueError):
        random_crop(batch[0])


def test_random_crop_is_a_shifted_crop_of_the_padded_input():
    torch.manual_seed(0)
    batch = torch.randint(1, 256, (40, 2, 12, 10), dtype=torch.uint8)  # no zeros: unambiguous
    out = random_crop(batch, padding=3, generator=torch.Generator().manual_seed(1))
    offsets = {crop_offset(out[i], batch[i], 3) for i in range(len(batch))}
    assert all(0 <= r <= 6 and 0 <= c <= 6 for r, c in offsets)
    assert len(offsets) > 15  # offsets differ per image
    assert {r for r, _ in offsets} == set(range(7)) and {c for _, c in offsets} == set(range(7))


def test_random_crop_reproducible(test_set):
    batch = test_set.images[:64]
    a = random_crop(batch, generator=torch.Generator().manual_seed(5))
    b = random_crop(batch, generator=torch.Generator().manual_seed(5))
    c = random_crop(batch, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- BatchLoader


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (103, 28, 28), dtype=torch.uint8, generator=g)
    return images, torch.arange(103)  # labels = index, to track what is served


def collect(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), batches


def test_loader_covers_every_index_once(tiny):
    for drop_last, n_batches in ((False, 7), (True, 6)):
        loader = BatchLoader(tiny, batch_size=16, drop_last=drop_last)
        assert len(loader) == n_batches
        x, y, batches = collect(loader, 0)
        assert len(batches) == n_batches
        assert [len(b[1]) for b in batches] == [16] * 6 + ([7] if not drop_last else [])
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert batches[0][1].dtype == torch.int64
        if not drop_last:
            assert sorted(y.tolist()) == list(range(103))
        else:
            assert len(set(y.tolist())) == 96
        torch.testing.assert_close(x, normalize(tiny[0][y]).unsqueeze(1))


def test_loader_epochs_and_determinism(tiny):
    loader = BatchLoader(tiny, batch_size=16, augment=True, seed=3)
    _, y0, _ = collect(loader, 0)
    x1, y1, _ = collect(loader, 1)
    assert not torch.equal(y0, y1)
    again = BatchLoader(tiny, batch_size=16, augment=True, seed=3)
    xa, ya, _ = collect(again, 1)
    assert torch.equal(ya, y1) and torch.equal(xa, x1)
    other_seed = BatchLoader(tiny, batch_size=16, augment=True, seed=4)
    assert not torch.equal(collect(other_seed, 1)[1], y1)
    # resuming mid-epoch gives the same batches
    tail = list(again.iter_epoch(1, start_batch=4))
    full = list(again.iter_epoch(1))
    assert len(tail) == 3
    for (a, b), (c, d) in zip(tail, full[4:]):
        assert torch.equal(a, c) and torch.equal(b, d)
    # unshuffled order
    _, y, _ = collect(BatchLoader(tiny, batch_size=10, shuffle=False), 5)
    assert y.tolist() == list(range(103))


def test_loader_augmentation(tiny):
    plain = BatchLoader(tiny, batch_size=16, seed=1)
    aug = BatchLoader(tiny, batch_size=16, seed=1, augment=True)
    xp, yp, _ = collect(plain, 2)
    xa, ya, _ = collect(aug, 2)
    assert torch.equal(yp, ya)  # augmentation does not change the order
    assert not torch.equal(xp, xa)
    raw = ((xa * MNIST_STD + MNIST_MEAN) * 255).round().to(torch.uint8)
    shifted = 0
    for i in range(0, 103, 7):
        r, c = crop_offset(raw[i, 0], tiny[0][ya[i]], 4)
        shifted += (r, c) != (4, 4)
    assert shifted > 5


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_ranks_match_single_process(tiny, world_size, drop_last):
    kwargs = {"batch_size": 16, "augment": True, "seed": 7, "drop_last": drop_last}
    single = BatchLoader(tiny, **kwargs)
    ranks = [BatchLoader(tiny, rank=r, world_size=world_size, **kwargs)
             for r in range(world_size)]
    for epoch in (0, 3):
        ref = collect(single, epoch)[2]
        parts = [collect(loader, epoch)[2] for loader in ranks]
        assert all(len(p) == len(ref) == len(single) for p in parts)
        for b, (x, y) in enumerate(ref):
            sizes = [len(p[b][1]) for p in parts]
            if len(y) == 16:
                assert sizes == [16 // world_size] * world_size
            assert torch.equal(torch.cat([p[b][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[b][1] for p in parts]), y)


def test_loader_argument_errors(tiny, test_set):
    with pytest.raises(ValueError, match=r"batch_size \(10\) must be divisible by world_size"):
        BatchLoader(tiny, batch_size=10, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(tiny, batch_size=8, rank=2, world_size=2)
    with pytest.raises(TypeError):
        BatchLoader(tiny[0], batch_size=8)
    loader = BatchLoader(test_set, batch_size=128)  # a dataset works too
    assert len(loader) == 79
    x, y = next(iter(loader))
    assert x.shape == (128, 1, 28, 28) and y.shape == (128,)


def test_public_names():
    for name in M.__all__:
        assert hasattr(M, name), name
    assert M.MIRRORS[-1].startswith("http://yann.lecun.com") and len(M.MIRRORS) >= 3
    assert os.path.basename(M.MIRRORS[0].rstrip("/")) == "mnist"
