"""Datasets, the train/probe/test split, partition over nodes and per-node batches.

The probe set Z' (docs/design.md §2) is held out from the training pool and shared by all
nodes; `node_probe_split` gives the per-node validation option. Training sample i
has global id i (its row in `x_train`); partitions and batches are lists of these ids.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dicesim.common.arrays import spans
from dicesim.common.errors import ConfigError
from dicesim.config import DATASETS as DATASETS  # re-exported
from dicesim.config import Cifar100Data, Data, SyntheticData

PARTITIONS = ("iid", "dirichlet", "label_skew")
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {  # official names; each may also be gzipped (+ ".gz")
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
DEFAULT_ROOTS = {"fashion_mnist": FASHION_ROOT, "mnist": "~/data", "cifar10": "~/data",
                 "cifar100": "~/data"}
CIFAR_PIXELS = 3 * 32 * 32
# the official binary distributions: files, the folder their archive unpacks to, its address
CIFAR = {
    "cifar10": ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"],
                "cifar-10-batches-bin", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
    "cifar100": (["train.bin"], ["test.bin"], "cifar-100-binary",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"),
}
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
BATCHED_REDRAW = 64  # nodes changing epoch at once from which their orders are drawn batched
_NODE_PROBE_STREAM = 2**31 - 1  # keeps node_probe_split's RNG apart from the batch epochs


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # [N, *input_shape] float32
    y_train: torch.Tensor  # [N] int64 (classification) or float32 (regression)
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int  # 0 for regression
    input_shape: tuple[int, ...]
    # rows of the source each split came from ("test" indexes the official test file if any)
    source_ids: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return "classification" if self.num_classes > 0 else "regression"


# --------------------------------------------------------------------------- idx files


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (plain or .gz): magic 0 0 <type> <ndim>, big-endian int32 dims, data."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read idx file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ConfigError(f"{path}: not an idx file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    offset = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:offset], ">i4")) if len(raw) >= offset else ()
    if len(dims) != ndim or len(raw) != offset + int(np.prod(dims)) * dtype.itemsize:
        raise ConfigError(f"{path}: idx file is truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as an idx file (gzipped if the name ends in .gz); the inverse of read_idx."""
    path = Path(path)
    code = {np.dtype(t).newbyteorder("="): c for c, t in _IDX_TYPES.items()}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------- sources
# Each returns (x_pool, y_pool, official test (x, y) or None, num_classes, scale):
# x as [N, C, H, W] (or [N, D] for synthetic) in any numeric dtype, divided by `scale`.

Source = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None, int, float]


def _digits() -> Source:
    images, target = _digits_arrays()
    return images[:, None], target.astype(np.int64), None, 10, 16.0


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (images [1797, 8, 8], targets) read straight from the file
    load_digits reads, without importing scikit-learn (about a second of start-up);
    load_digits itself where that file is not where this scikit-learn keeps it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _synthetic(cfg: SyntheticData, seed: int) -> Source:
    task, n, d, classes, noise = cfg.task, cfg.n_samples, cfg.n_features, cfg.n_classes, cfg.noise
    rng = np.random.default_rng([seed, 7])
    if task == "regression":  # y = x . w* + noise
        x = rng.normal(size=(n, d))
        w = rng.normal(size=d) / np.sqrt(d)
        return x, (x @ w + noise * rng.normal(size=n)).astype(np.float32), None, 0, 1.0
    # Gaussian blobs: unit-variance clouds around centres ~ N(0, I), balanced classes
    y = rng.permutation(np.arange(n) % classes)
    x = rng.normal(size=(classes, d))[y] + rng.normal(size=(n, d))
    return x, y.astype(np.int64), None, classes, 1.0


def _find_idx(root: Path, name: str) -> Path | None:
    return next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)


def _fashion(root: Path) -> Source:
    paths = {k: _find_idx(root, f) for k, f in FASHION_FILES.items()}
    if not root.is_dir() or None in paths.values():
        names = ", ".join(f"{f}(.gz)" for f in FASHION_FILES.values())
        raise ConfigError(
            f"data.root={root}: Fashion-MNIST idx files not found; install them with "
            f"`apt-get install dataset-fashion-mnist` or pass data.root=<dir with {names}>")
    a = {k: read_idx(p) for k, p in paths.items()}
    for s in ("train", "test"):
        x, y = a[f"x_{s}"], a[f"y_{s}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(f"data.root={root}: {s} images {x.shape} and labels {y.shape} "
                              "do not match (expected [N, H, W] and [N])")
    y_tr, y_te = a["y_train"].astype(np.int64), a["y_test"].astype(np.int64)
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return a["x_train"][:, None], y_tr, (a["x_test"][:, None], y_te), num_classes, 255.0


def read_cifar(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `label_bytes` label bytes and 3072 pixel bytes (1024 red, 1024 green,
    1024 blue, rows of 32): images [N, 3, 32, 32] uint8 and labels [N, label_bytes]."""
    record = label_bytes + CIFAR_PIXELS
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw.size == 0 or raw.size % record:
        raise ConfigError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte "
                          "records; the file is truncated or not the binary version, fetch it "
                          "again")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, :label_bytes]


def _cifar(name: str, root: Path, coarse: bool) -> Source:
    """CIFAR-10 / CIFAR-100 from the official binary files under root (or under the folder
    the archive unpacks to, inside root); numpy only."""
    train_files, test_files, folder, url = CIFAR[name]
    base = root / folder if (root / folder).is_dir() else root
    label_bytes = 2 if name == "cifar100" else 1  # CIFAR-100: coarse byte, then fine byte
    column, classes = (0, 20) if coarse else (label_bytes - 1, 100 if label_bytes == 2 else 10)
    split = []
    for files in (train_files, test_files):
        images, labels = [], []
        for file in files:
            path = base / file
            if not path.is_file():
                raise ConfigError(f"{path}: not found; download {url}, unpack it under "
                                  f"data.root (giving {folder}/) or pass data.root=<that folder>")
            x, y = read_cifar(path, label_bytes)
            if y[:, column].max() >= classes:
                raise ConfigError(f"{path}: label {int(y[:, column].max())} is not one of "
                                  f"{classes} classes; is it the {name} file? fetch {url}")
            images.append(x)
            labels.append(y[:, column].astype(np.int64))
        split.append((np.concatenate(images), np.concatenate(labels)))
    (x, y), test = split
    return x, y, test, classes, 255.0


def _torchvision(name: str, root: Path) -> Source:
    try:
        from torchvision import datasets
    except ImportError as exc:
        raise ConfigError(f"data.name={name} needs torchvision: pip install 'dicesim[vision]'"
                          ) from exc
    cls = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    try:
        train, test = (cls(str(root), train=t, download=False) for t in (True, False))
    except RuntimeError as exc:
        raise ConfigError(
            f"data.root={root}: no {cls.__name__} files found there; download them once with "
            f"torchvision.datasets.{cls.__name__}('{root}', download=True) "
            f"or pass data.root=<dir>") from exc

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> [N, C, H, W]
        return x, np.asarray(ds.targets, dtype=np.int64)

    x, y = arrays(train)
    return x, y, arrays(test), 10, 255.0


# --------------------------------------------------------------------------- loading


def _limit(ids: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Seeded subset of at most cap ids (all of them when cap is None)."""
    return ids if cap is None or cap >= len(ids) else rng.choice(ids, cap, replace=False)


def load_dataset(cfg: Data, seed: int) -> Dataset:
    """Load `cfg.name` and split it (seeded) into train / probe / test tensors."""
    name = str(cfg.name)
    root = Path(os.path.expanduser(str(getattr(cfg, "root", None) or DEFAULT_ROOTS.get(name, "."))))
    if name == "digits":
        x, y, official_test, num_classes, scale = _digits()
    elif name == "synthetic":
        x, y, official_test, num_classes, scale = _synthetic(cfg, seed)
    elif name == "fashion_mnist":
        x, y, official_test, num_classes, scale = _fashion(root)
    elif name in CIFAR:
        coarse = isinstance(cfg, Cifar100Data) and cfg.labels == "coarse"
        x, y, official_test, num_classes, scale = _cifar(name, root, coarse)
    else:
        x, y, official_test, num_classes, scale = _torchvision(name, root)

    rng = np.random.default_rng(seed)
    n, probe_size = len(y), cfg.probe_size
    if official_test is None:
        n_test = max(1, round(cfg.test_size * n))
    else:
        n_test = 0
    if n - n_test - probe_size < 1:
        raise ConfigError(f"data.probe_size={probe_size} must leave training data "
                          f"({n - n_test} samples for train + probe)")
    perm = rng.permutation(n)
    ids = {"probe": perm[:probe_size], "test": perm[probe_size:probe_size + n_test],
           "train": _limit(perm[probe_size + n_test:], cfg.max_train, rng)}
    if official_test is not None:
        ids["test"] = np.arange(len(official_test[1]))
    ids["test"] = _limit(ids["test"], cfg.max_test, rng)
    ids = {k: np.sort(v) for k, v in ids.items()}

    image = cfg.image
    if image and x.ndim != 4:
        raise ConfigError(f"data.image=true needs an image dataset; data.name={name} is flat")
    shape = tuple(x.shape[1:]) if image else (int(np.prod(x.shape[1:])),)
    src = {"train": (x, y), "probe": (x, y), "test": official_test or (x, y)}
    xs = {k: src[k][0][v].reshape(len(v), *shape).astype(np.float32) / np.float32(scale)
          for k, v in ids.items()}
    if cfg.standardize:  # per-feature, with train statistics
        mean, std = xs["train"].mean(0), xs["train"].std(0)
        std[std < 1e-8] = 1.0
        xs = {k: (v - mean) / std for k, v in xs.items()}
    t = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in xs.items()}
    lab = {k: torch.from_numpy(src[k][1][v].astype(np.int64 if num_classes else np.float32))
           for k, v in ids.items()}
    return Dataset(name, t["train"], lab["train"], t["probe"], lab["probe"], t["test"],
                   lab["test"], num_classes, shape, ids)


# --------------------------------------------------------------------------- nodes & batches


def partition(labels: np.ndarray, n_nodes: int, scheme: str = "iid", alpha: float = 1.0,
              seed: int = 0, min_size: int = 1, classes_per_node: int = 2
              ) -> list[np.ndarray]:
    """Split ids 0..len(labels)-1 over nodes; each node gets sorted ids, every id exactly once."""
    labels = np.asarray(labels)
    n = len(labels)
    if n_nodes < 1:
        raise ConfigError(f"nodes={n_nodes} must be >= 1")
    if scheme == "iid":
        parts = np.array_split(np.random.default_rng(seed).permutation(n), n_nodes)
        if len(parts[-1]) < min_size:
            raise ConfigError(f"nodes={n_nodes}: {n} training samples leave a node with "
                              f"{len(parts[-1])} (< {min_size}); use fewer nodes")
        return [np.sort(p) for p in parts]
    if scheme == "label_skew":
        return label_skew(labels, n_nodes, classes_per_node, seed, min_size)
    if scheme != "dirichlet":
        raise ConfigError(f"data.partition={scheme} is unknown; choose one of "
                          f"{', '.join(PARTITIONS)}")
    if not alpha > 0:
        raise ConfigError(f"data.alpha={alpha} must be > 0 for data.partition=dirichlet")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError("data.partition=dirichlet needs class labels; use data.partition=iid")
    for attempt in range(100):
        rng = np.random.default_rng(seed + attempt)
        chunks: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
        for c in np.unique(labels):
            ids = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(n_nodes, float(alpha)))
            if not np.isfinite(p).all() or p.sum() <= 0:  # underflow at tiny alpha
                p = np.eye(n_nodes)[rng.integers(n_nodes)]
            cuts = np.minimum(np.floor(np.cumsum(p)[:-1] * len(ids)).astype(int), len(ids))
            for node, part in enumerate(np.split(ids, cuts)):
                chunks[node].append(part)
        parts = [np.sort(np.concatenate(c)) for c in chunks]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ConfigError(f"data.alpha={alpha}: 100 Dirichlet draws all left a node with fewer than "
                      f"{min_size} samples; raise data.alpha or use fewer nodes")


def label_skew(labels: np.ndarray, n_nodes: int, per_node: int, seed: int,
               min_size: int = 1) -> list[np.ndarray]:
    """Each node holds `per_node` classes: node k's slots are classes
    π[(k·c + i) mod C], i < c, of a seeded permutation π, so every class is used once
    n·c ≥ C and class counts differ by at most one; each class's samples (shuffled) are
    split evenly over the nodes that hold it."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError("data.partition=label_skew needs class labels; use data.partition=iid")
    classes = np.unique(labels)
    C = len(classes)
    if not 1 <= per_node <= C:
        raise ConfigError(f"data.classes_per_node={per_node}: the data has {C} classes; "
                          f"set data.classes_per_node between 1 and {C}")
    if n_nodes * per_node < C:
        raise ConfigError(f"data.classes_per_node={per_node}: {n_nodes} nodes × {per_node} "
                          f"leave some of the {C} classes unused; set "
                          f"data.classes_per_node >= {-(-C // n_nodes)}")
    rng = np.random.default_rng([seed, 5150])
    order = classes[rng.permutation(C)]
    held = [order[(k * per_node + np.arange(per_node)) % C] for k in range(n_nodes)]
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    for c in classes:
        holders = [k for k in range(n_nodes) if c in held[k]]
        ids = rng.permutation(np.flatnonzero(labels == c))
        for k, part in zip(holders, np.array_split(ids, len(holders)), strict=True):
            chunks[k].append(part)
    parts = [np.sort(np.concatenate(c)) for c in chunks]
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise ConfigError(f"data.classes_per_node={per_node}: a node holds only {smallest} "
                          f"samples (< {min_size}); raise data.classes_per_node or use "
                          "fewer nodes")
    return parts


def check_batch_size(parts: list[np.ndarray], batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    for node, ids in enumerate(parts):
        if batch_size > len(ids):
            raise ConfigError(f"batch_size={batch_size} is larger than node {node}'s local data "
                              f"({len(ids)} samples); lower batch_size or use fewer nodes")


def batch_ids(local_ids: np.ndarray, batch_size: int, step: int, seed: int,
              node: int) -> np.ndarray:
    """Node `node`'s batch at `step`: epochs of seeded permutations without replacement.

    Depends only on the arguments (not on ranks); the last len % batch_size ids of each
    epoch's permutation are dropped.
    """
    local_ids = np.asarray(local_ids)
    if not 1 <= batch_size <= len(local_ids):
        raise ConfigError(f"batch_size={batch_size} must be in [1, {len(local_ids)}] "
                          f"(node {node}'s local data)")
    epoch, k = divmod(step, len(local_ids) // batch_size)
    perm = _epoch_order(len(local_ids), seed, node, epoch)
    return local_ids[perm[k * batch_size:(k + 1) * batch_size]]


@functools.lru_cache(maxsize=4096)
def _epoch_order(n: int, seed: int, node: int, epoch: int) -> np.ndarray:
    """One epoch's order of a node's n samples (cached: every batch of the epoch reads it)."""
    perm = _permutation(n, seed, node, epoch)
    perm.flags.writeable = False
    return perm


def _permutation(n: int, seed: int, node: int, epoch: int) -> np.ndarray:
    """default_rng([seed, node, epoch]).permutation(n). Words below 2^32 enter the seed
    sequence as one uint32 each, so an array of them is the same entropy, and numpy reads
    it about 3× faster than the Python list (this runs once per node and epoch)."""
    key = (seed, node, epoch)
    if all(0 <= v < 2**32 for v in key):
        entropy = np.random.SeedSequence(np.array(key, dtype=np.uint32))
        return np.random.Generator(np.random.PCG64(entropy)).permutation(n)
    return np.random.default_rng(list(key)).permutation(n)


# numpy's SeedSequence hash constants (numpy/random/bit_generator.pyx) and PCG64's 128-bit
# LCG multiplier (numpy/random/src/pcg64): `_pcg64_states` redoes their seeding for many
# keys at once; numpy's own Generator still draws every permutation.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4
_PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341
_WORD = (1 << 32) - 1


def _pcg64_states(keys: np.ndarray) -> list[tuple[int, int]]:
    """(state, inc) of PCG64(SeedSequence(row)) for each row of keys [N, w ≤ 4] (words
    below 2^32): SeedSequence's entropy mixing and generate_state(4, uint64) as uint32
    array arithmetic over all rows, then PCG64's seeding step in Python integers."""
    keys = np.asarray(keys, dtype=np.uint32)
    const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:  # hash_const is advanced on every call
        nonlocal const
        value = value ^ np.uint32(const)
        const = (const * _MULT_A) & _WORD
        value = value * np.uint32(const)  # uint32 arrays wrap (mod 2^32), as in C
        return value ^ (value >> np.uint32(16))

    zero = np.zeros(len(keys), dtype=np.uint32)
    pool = [hashmix(keys[:, i] if i < keys.shape[1] else zero) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                mixed = np.uint32(_MIX_L) * pool[dst] - np.uint32(_MIX_R) * hashmix(pool[src])
                pool[dst] = mixed ^ (mixed >> np.uint32(16))
    const, words = _INIT_B, []
    for i in range(2 * _POOL):  # generate_state(4, np.uint64): 8 words from the pool, cycled
        value = pool[i % _POOL] ^ np.uint32(const)
        const = (const * _MULT_B) & _WORD
        value = value * np.uint32(const)
        words.append((value ^ (value >> np.uint32(16))).astype(np.uint64))
    seed_hi, seed_lo, inc_hi, inc_lo = (
        words[2 * j] | (words[2 * j + 1] << np.uint64(32)) for j in range(4))
    one = np.uint64(1)
    inc = ((inc_hi << one) | (inc_lo >> np.uint64(63)), (inc_lo << one) | one)  # 2·seq + 1
    # pcg_setseq_128_srandom_r: state 0, step (0·M + inc), add the seed, step (s·M + inc)
    state = _add128(_mul128(_add128(inc, (seed_hi, seed_lo)), _PCG_MULT), inc)
    return [((a << 64) | b, (c << 64) | d) for a, b, c, d in zip(
        state[0].tolist(), state[1].tolist(), inc[0].tolist(), inc[1].tolist(), strict=True)]


U128 = tuple[np.ndarray, np.ndarray]  # (high, low) uint64 words of 128-bit integers


def _add128(a: U128, b: U128) -> U128:
    low = a[1] + b[1]  # wraps mod 2^64; the carry is whether it wrapped
    return a[0] + b[0] + (low < a[1]).astype(np.uint64), low


def _mul128(a: U128, factor: int) -> U128:
    """a · factor mod 2^128: the full 64×64 product of the low words from 32-bit halves,
    plus the cross terms (mod 2^64) in the high word."""
    f_hi, f_lo = np.uint64(factor >> 64), np.uint64(factor & ((1 << 64) - 1))
    half, mask = np.uint64(32), np.uint64(_WORD)
    x0, x1 = a[1] & mask, a[1] >> half
    y0, y1 = f_lo & mask, f_lo >> half
    p00, p01, p10, p11 = x0 * y0, x0 * y1, x1 * y0, x1 * y1
    middle = (p00 >> half) + (p01 & mask) + (p10 & mask)
    low = (p00 & mask) | (middle << half)
    high = p11 + (p01 >> half) + (p10 >> half) + (middle >> half)
    return high + a[0] * f_lo + a[1] * f_hi, low


_CHECKED: list[bool] = []  # [whether _draw_orders matched numpy], once per process


def _draw_orders(out: np.ndarray, starts: np.ndarray, sizes: np.ndarray, seed: int,
                 nodes: np.ndarray, epochs: np.ndarray) -> None:
    """out[starts[i]:starts[i] + sizes[i]] = _permutation(sizes[i], seed, nodes[i],
    epochs[i]) for every i: the same arrays, 2-3× faster for many keys. The seeding of
    every generator is done at once; one Generator, re-seeded per key, shuffles each span
    in place (numpy's permutation(n) is shuffle(arange(n))). Keys outside [0, 2^32), or a
    numpy whose seeding differs from the one written out here (checked once against numpy
    itself), take _permutation one by one."""
    exact = 0 <= seed <= _WORD and len(nodes) > 0
    keys = np.stack([np.full(len(nodes), seed if exact else 0), nodes, epochs], axis=1)
    exact = exact and keys.min() >= 0 and keys.max() <= _WORD
    if exact and not _CHECKED:
        m, k, e = int(sizes[0]), int(nodes[0]), int(epochs[0])
        probe = np.arange(m)
        _shuffle_all(probe[None], np.zeros(1, np.int64), sizes[:1], keys[:1])
        _CHECKED.append(np.array_equal(probe, _permutation(m, seed, k, e)))
    if not exact or not _CHECKED[0]:
        for start, m, k, e in zip(starts.tolist(), sizes.tolist(), nodes.tolist(),
                                  epochs.tolist(), strict=True):
            out[start:start + m] = _permutation(m, seed, k, e)
        return
    out[spans(starts, sizes)] = spans(np.zeros_like(starts), sizes)  # arange(m) per span
    _shuffle_all(out, starts, sizes, keys)


def _shuffle_all(out: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                 keys: np.ndarray) -> None:
    flat = out.reshape(-1)
    bits = np.random.PCG64()
    shuffle = np.random.Generator(bits).shuffle
    inner = {"state": 0, "inc": 0}
    state = {"bit_generator": "PCG64", "state": inner, "has_uint32": 0, "uinteger": 0}
    for start, m, (seeded, inc) in zip(starts.tolist(), sizes.tolist(), _pcg64_states(keys),
                                       strict=True):
        inner["state"], inner["inc"] = seeded, inc
        bits.state = state
        shuffle(flat[start:start + m])


class BatchOrder:
    """The batches of many nodes at once: `ids(t, nodes)` is the [len(nodes), B] array whose
    row i is `batch_ids(parts[nodes[i]], B, t, seed, nodes[i])`, exactly.

    Every node's ids and its current epoch's order live in two flat arrays (O(samples)
    memory); a step gathers every node's batch with one numpy indexing operation, and a
    node's order is redrawn (one seeded permutation, as batch_ids draws it) only when its
    epoch changes. `parts` must not be edited afterwards."""

    def __init__(self, parts: list[np.ndarray], batch_size: int, seed: int):
        self.parts = [np.asarray(p) for p in parts]
        self.sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        bad = np.flatnonzero((batch_size < 1) | (batch_size > self.sizes))
        if bad.size:
            node = int(bad[0])
            raise ConfigError(f"batch_size={batch_size} must be in [1, {self.sizes[node]}] "
                              f"(node {node}'s local data)")
        self.batch_size, self.seed = batch_size, seed
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.flat = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)
        self.per_epoch = self.sizes // batch_size
        self.order = np.zeros(len(self.flat), dtype=np.int64)  # position within the node
        self.epoch = np.full(len(self.parts), -1, dtype=np.int64)  # epoch held in `order`
        self.within = np.arange(batch_size, dtype=np.int64)

    def ids(self, t: int, nodes: np.ndarray | list[int]) -> np.ndarray:
        nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
        epoch, k = np.divmod(t, self.per_epoch[nodes])
        stale = np.flatnonzero(self.epoch[nodes] != epoch)  # once per node and epoch
        if len(stale) >= BATCHED_REDRAW:
            redraw, at = nodes[stale], epoch[stale]
            sizes = self.sizes[redraw]
            _draw_orders(self.order, self.offsets[redraw], sizes, self.seed, redraw, at)
            self.epoch[redraw] = at
        else:
            for i in stale.tolist():
                node, e = int(nodes[i]), int(epoch[i])
                start = self.offsets[node]
                self.order[start:start + self.sizes[node]] = _epoch_order(
                    int(self.sizes[node]), self.seed, node, e)  # cached across runs too
                self.epoch[node] = e
        start = self.offsets[nodes][:, None]
        pos = self.order[start + (k * self.batch_size)[:, None] + self.within]
        return self.flat[start + pos]


_ORDERS: dict[tuple[int, int, int], tuple[BatchOrder, list[int]]] = {}
_ORDERS_KEPT = 8


def batch_ids_block(parts: list[np.ndarray], nodes: np.ndarray | list[int], batch_size: int,
                    t: int, seed: int) -> np.ndarray:
    """[len(nodes), batch_size]: row i equals batch_ids(parts[nodes[i]], batch_size, t, seed,
    nodes[i]) — the same samples in the same order — without a Python call per node.

    The BatchOrder behind it is kept between calls (per parts list, batch size and seed;
    the list's arrays must not be replaced or edited in place while it is used)."""
    key = (id(parts), batch_size, seed)
    held = _ORDERS.get(key)
    arrays = list(map(id, parts))
    if held is None or held[1] != arrays:
        if len(_ORDERS) >= _ORDERS_KEPT:
            _ORDERS.pop(next(iter(_ORDERS)))
        held = _ORDERS[key] = (BatchOrder(parts, batch_size, seed), arrays)
    return held[0].ids(t, nodes)


def node_probe_split(local_ids: np.ndarray, fraction: float, seed: int,
                     node: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of a node's ids into (train_ids, probe_ids), probe ~ fraction of them."""
    local_ids = np.asarray(local_ids)
    n = len(local_ids)
    k = max(1, round(fraction * n))
    if not 0 < fraction < 1 or k >= n:
        raise ConfigError(f"per-node probe fraction={fraction} must be in (0, 1) and leave "
                          f"node {node} ({n} samples) training data")
    return hold_out(local_ids, k, seed, node)


def hold_out(local_ids: np.ndarray, count: int, seed: int,
             node: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_ids, probe_ids) with `count` of a node's ids held out, both sorted."""
    local_ids = np.asarray(local_ids)
    perm = np.random.default_rng([seed, node, _NODE_PROBE_STREAM]).permutation(len(local_ids))
    return np.sort(local_ids[perm[count:]]), np.sort(local_ids[perm[:count]])


NOISE_STREAM = 7_368_787  # keeps the label-corruption RNG apart from every other stream


def flip_labels(y: torch.Tensor, parts: list[np.ndarray], noise: np.ndarray, classes: int,
                seed: int) -> torch.Tensor:
    """`data.label_noise`: round(p_k · |D_k|) of node k's samples get a wrong label (seeded
    per node, always another class); a copy of y."""
    y = y.clone()
    for k, ids in enumerate(parts):
        rng = np.random.default_rng([seed, k, NOISE_STREAM])
        chosen = rng.choice(ids, size=int(round(noise[k] * len(ids))), replace=False)
        shift = torch.as_tensor(rng.integers(1, classes, size=len(chosen)))
        y[chosen] = (y[chosen] + shift) % classes  # never the true class
    return y
