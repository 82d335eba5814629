"""A small CIFAR-10 in the exact on-disk format of the real `cifar-10-python.tar.gz`, for tests.

The real batches were pickled by Python 2's cPickle (protocol 2): keys, batch labels and file names
are Python 2 `str`, written with the BINSTRING opcodes, and `data` is a numpy uint8 array (N, 3072)
pickled through `numpy.core.multiarray._reconstruct`. Loaded with `pickle.load(f, encoding="latin1")`
(as torchvision and job.data do) the keys come out as `str`; with `encoding="bytes"` they come out as
`bytes` (b"data", b"labels", ...), just as with the real files. Python 3's pickler cannot write that
(it pickles `bytes` as `_codecs.encode(...)` calls), so this module emits the opcodes itself.

Each row of `data` is one image as 1024 red, then 1024 green, then 1024 blue bytes, each plane in
row-major order. The images are learnable: a class colour (PALETTE) plus a class stripe direction
plus bounded noise, so a tiny model beats chance within an epoch or two.
"""

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
README_FILE = "readme.html"
# Member order of the real archive (`tar tzf cifar-10-python.tar.gz`).
ARCHIVE_ORDER = ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta",
                 "data_batch_2", "data_batch_5", "data_batch_1"]
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
README = b'<meta HTTP-EQUIV="REFRESH" content="0; url=http://www.cs.toronto.edu/~kriz/cifar.html">\n'
# One (R, G, B) per class; every pair of classes differs by >= 80 in some channel.
PALETTE = np.array([
    [200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [200, 40, 200],
    [40, 200, 200], [120, 120, 120], [220, 140, 60], [60, 140, 220], [140, 60, 140],
], dtype=np.int16)
NOISE = 24  # per-pixel noise is uniform in [-NOISE, NOISE]


class _Py2Pickler:
    """Writes the subset of Python 2 cPickle protocol 2 that the CIFAR-10 batches use."""

    def __init__(self):
        self.out = io.BytesIO()
        self.memo = 0

    def _put(self):  # cPickle memoizes every str, container and global; nothing here refers back
        self.memo += 1
        self.out.write(b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo))

    def dump(self, obj) -> bytes:
        self.out.write(pickle.PROTO + b"\x02")
        self.save(obj)
        self.out.write(pickle.STOP)
        return self.out.getvalue()

    def save(self, obj):
        w = self.out.write
        if obj is None:
            w(pickle.NONE)
        elif isinstance(obj, bool):
            w(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                w(pickle.BININT1 + bytes([obj]))
            elif 0 <= obj < 65536:
                w(pickle.BININT2 + struct.pack("<H", obj))
            else:
                w(pickle.BININT + struct.pack("<i", obj))
        elif isinstance(obj, (bytes, str)):  # a Python 2 str: raw bytes (str here is taken as latin-1)
            data = obj.encode("latin1") if isinstance(obj, str) else obj
            if len(data) < 256:
                w(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
            else:
                w(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
            self._put()
        elif isinstance(obj, tuple):
            if 1 <= len(obj) <= 3:
                for item in obj:
                    self.save(item)
                w({1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}[len(obj)])
            else:
                w(pickle.MARK)
                for item in obj:
                    self.save(item)
                w(pickle.TUPLE)
            self._put()
        elif isinstance(obj, list):
            w(pickle.EMPTY_LIST)
            self._put()
            for start in range(0, len(obj), 1000):  # cPickle's batch size
                w(pickle.MARK)
                for item in obj[start:start + 1000]:
                    self.save(item)
                w(pickle.APPENDS)
        elif isinstance(obj, dict):
            w(pickle.EMPTY_DICT)
            self._put()
            w(pickle.MARK)
            for key, value in obj.items():
                self.save(key)
                self.save(value)
            w(pickle.SETITEMS)
        elif isinstance(obj, np.ndarray):
            self.save_uint8_array(np.ascontiguousarray(obj))
        else:
            raise TypeError(f"cannot pickle {type(obj).__name__} the Python 2 way")

    def _global(self, module: str, name: str):
        self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self._put()

    def save_uint8_array(self, array: np.ndarray):
        """ndarray.__reduce__ of Python 2 numpy: _reconstruct(ndarray, (0,), 'b') then BUILD with its state."""
        assert array.dtype == np.uint8 and array.flags.c_contiguous
        w = self.out.write
        self._global("numpy.core.multiarray", "_reconstruct")
        self._global("numpy", "ndarray")
        self.save((0,))
        self.save(b"b")
        w(pickle.TUPLE3)
        self._put()
        w(pickle.REDUCE)
        self._put()
        w(pickle.MARK)
        self.save(1)
        self.save(tuple(array.shape))
        self._global("numpy", "dtype")  # dtype('u1', 0, 1) with its state (3, '|', None, None, None, -1, -1, 0)
        self.save(b"u1")
        self.save(0)
        self.save(1)
        w(pickle.TUPLE3)
        self._put()
        w(pickle.REDUCE)
        self._put()
        w(pickle.MARK + pickle.BININT1 + b"\x03")
        self.save(b"|")
        w(pickle.NONE * 3 + pickle.BININT + struct.pack("<i", -1) + pickle.BININT + struct.pack("<i", -1))
        self.save(0)
        w(pickle.TUPLE)
        self._put()
        w(pickle.BUILD)
        self.save(False)
        self.save(array.tobytes())
        w(pickle.TUPLE)
        self._put()
        w(pickle.BUILD)


def py2_pickle(obj: dict) -> bytes:
    """Python 2 protocol-2 pickle of a dict whose values are str/bytes, ints, lists or uint8 arrays."""
    return _Py2Pickler().dump(obj)


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 32, 32, 3) uint8 RGB images (height, width, channel, as a photo is stored): class colour,
    a class-dependent stripe pattern and noise."""
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    angle = labels[:, None, None] * (np.pi / 10)
    stripes = np.where(np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.8) > 0, 20, -20)
    img = PALETTE[labels][:, None, None, :] + stripes[..., None].astype(np.int16)
    img = img + rng.integers(-NOISE, NOISE + 1, size=(n, 32, 32, 3), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def to_rows(images_hwc: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) RGB -> CIFAR-10 rows (N, 3072): the red plane, then green, then blue, row-major."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2)).reshape(len(images_hwc), 3072)


def _batch(label: str, name_prefix: str, images_hwc: np.ndarray, labels: np.ndarray) -> dict:
    # Key order as the real files load: batch_label, labels, data, filenames.
    return {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": to_rows(images_hwc),
        b"filenames": [f"{name_prefix}_{i:05d}_{LABEL_NAMES[v]}.png".encode() for i, v in enumerate(labels)],
    }


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cifar10(root: Path, n_train_per_batch: int = 100, n_test: int = 100, seed=0) -> dict:
    """Write root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta, readme.html}.

    Returns what was written: folder; train_x (5 * n_train_per_batch, 3072) and test_x (n_test, 3072)
    uint8 rows as stored; train_hwc / test_hwc, the same images as (N, 32, 32, 3) RGB; train_y /
    test_y, int64 label arrays; md5, {file name: md5 hexdigest}.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train_y = rng.integers(0, 10, size=5 * n_train_per_batch)
    test_y = rng.integers(0, 10, size=n_test)
    train_hwc, test_hwc = _images(train_y, rng), _images(test_y, rng)
    for i, name in enumerate(TRAIN_FILES):
        part = slice(i * n_train_per_batch, (i + 1) * n_train_per_batch)
        entry = _batch(f"training batch {i + 1} of 5", f"train_b{i + 1}", train_hwc[part], train_y[part])
        (folder / name).write_bytes(py2_pickle(entry))
    (folder / TEST_FILE).write_bytes(py2_pickle(_batch("testing batch 1 of 1", "test", test_hwc, test_y)))
    meta = {b"num_cases_per_batch": n_train_per_batch, b"label_names": [n.encode() for n in LABEL_NAMES],
            b"num_vis": 3072}
    (folder / META_FILE).write_bytes(py2_pickle(meta))
    (folder / README_FILE).write_bytes(README)
    return {
        "folder": folder,
        "train_x": to_rows(train_hwc), "train_y": train_y.astype(np.int64), "train_hwc": train_hwc,
        "test_x": to_rows(test_hwc), "test_y": test_y.astype(np.int64), "test_hwc": test_hwc,
        "md5": {p.name: _md5(p) for p in sorted(folder.iterdir())},
    }


def make_archive(root: Path, n_train_per_batch: int = 100, n_test: int = 100, seed=0) -> tuple[Path, str]:
    """Write root/cifar-10-python.tar.gz as the real archive is laid out (a cifar-10-batches-py/ folder
    entry, then its eight files) and return (its path, its md5 hexdigest). Byte-for-byte reproducible
    for the same arguments (fixed mtimes, owners and gzip header)."""
    root = Path(root)
    staging = root / "_fakecifar_staging"
    make_cifar10(staging, n_train_per_batch, n_test, seed)
    path = root / ARCHIVE
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, data: bytes | None):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 1244000000, 1000, 1000, "kriz", "kriz"
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        add(FOLDER + "/", None)
        for name in ARCHIVE_ORDER:
            add(f"{FOLDER}/{name}", (staging / FOLDER / name).read_bytes())
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(buffer.getvalue())
    for name in ARCHIVE_ORDER:
        (staging / FOLDER / name).unlink()
    (staging / FOLDER).rmdir()
    staging.rmdir()
    return path, _md5(path)
