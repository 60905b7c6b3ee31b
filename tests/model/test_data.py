import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits

import dicesim.model.data as data_module
from dicesim.common.errors import ConfigError
from dicesim.config import DigitsData, FileData, section
from dicesim.model.data import (
    DATASETS,
    FASHION_FILES,
    FASHION_ROOT,
    BatchOrder,
    batch_ids,
    batch_ids_block,
    check_batch_size,
    load_dataset,
    node_probe_split,
    partition,
    read_idx,
    write_idx,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    ids = np.concatenate(parts)
    assert len(ids) == n and np.array_equal(np.sort(ids), np.arange(n))
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


# --------------------------------------------------------------------------- loading


def test_digits_shapes_dtypes_and_disjoint_splits() -> None:
    ds = load_dataset(DigitsData(probe_size=200, test_size=0.2), seed=0)
    assert ds.num_classes == 10 and ds.input_shape == (64,) and ds.task == "classification"
    assert ds.x_train.shape == (1797 - 200 - 359, 64) and ds.x_probe.shape == (200, 64)
    assert ds.x_test.shape == (359, 64)
    for x, y in [(ds.x_train, ds.y_train), (ds.x_probe, ds.y_probe), (ds.x_test, ds.y_test)]:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y)
    ids = ds.source_ids
    assert_exact_cover([ids["train"], ids["probe"], ids["test"]], 1797)
    # standardized with train statistics
    assert ds.x_train.mean(0).abs().max() < 1e-4
    # rows and labels really come from those source rows
    raw = load_dataset(section("data", {"name": "digits", "standardize": False}), seed=0)
    d = load_digits()
    assert np.allclose(raw.x_probe.numpy(), d.data[ids["probe"]] / 16)
    assert np.array_equal(raw.y_test.numpy(), d.target[ids["test"]])


def test_digits_read_without_scikit_learn_equal_load_digits() -> None:
    import subprocess

    from dicesim.model.data import _digits_arrays

    images, target = _digits_arrays()
    d = load_digits()
    assert images.dtype == d.images.dtype and np.array_equal(images, d.images)
    assert target.dtype == d.target.dtype and np.array_equal(target, d.target)
    code = ("import sys; from dicesim.config import DigitsData; from dicesim.model.data import "
            "load_dataset; load_dataset(DigitsData(), 0); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_digits_image_shape_and_seeded_split() -> None:
    ds = load_dataset(section("data", {"name": "digits", "image": True}), seed=3)
    assert ds.input_shape == (1, 8, 8) and ds.x_train.shape[1:] == (1, 8, 8)
    again = load_dataset(section("data", {"name": "digits", "image": True}), seed=3)
    assert torch.equal(ds.x_train, again.x_train)
    other = load_dataset(section("data", {"name": "digits", "image": True}), seed=4)
    assert not np.array_equal(ds.source_ids["probe"], other.source_ids["probe"])


def test_synthetic_classification_and_regression() -> None:
    cls = load_dataset(section("data", {"name": "synthetic", "n_samples": 500, "n_classes": 3,
                        "probe_size": 50}), seed=1)
    assert cls.num_classes == 3 and cls.input_shape == (20,) and cls.y_train.dtype == torch.int64
    assert set(cls.y_train.tolist()) == {0, 1, 2}
    reg = load_dataset(section("data", {"name": "synthetic", "task": "regression", "n_samples": 300,
                        "n_features": 10, "probe_size": 30}), seed=1)
    assert reg.num_classes == 0 and reg.task == "regression" and reg.input_shape == (10,)
    assert reg.y_train.dtype == torch.float32 and reg.y_probe.dtype == torch.float32
    assert len(reg.y_train) + len(reg.y_probe) + len(reg.y_test) == 300
    # targets are (nearly) linear in the features
    x = torch.cat([reg.x_train, torch.ones(len(reg.x_train), 1)], 1).double()
    w = torch.linalg.lstsq(x, reg.y_train.double()[:, None]).solution
    assert (x @ w - reg.y_train.double()[:, None]).std() < 0.15


@pytest.mark.parametrize("cfg, key", [
    ({"name": "digits", "probe_size": 0}, "data.probe_size"),
    ({"name": "digits", "probe_size": 1500}, "data.probe_size"),  # needs the data
    ({"name": "digits", "test_size": 1.5}, "data.test_size"),
    ({"name": "imagenet"}, "data.name"),
    ({"name": "synthetic", "task": "ranking"}, "data.task"),
    ({"name": "synthetic", "image": True}, "data.image"),
    ({"name": "digits", "max_train": 0}, "data.max_train"),
])
def test_bad_dataset_config(cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_dataset(section("data", cfg), seed=0)


def test_config_files_load() -> None:
    for name in ("digits", "synthetic", "synthetic_regression"):
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg["name"] in DATASETS
        cfg = {**cfg, "n_samples": 400, "probe_size": 40} if cfg["name"] == "synthetic" else cfg
        assert len(load_dataset(section("data", cfg), seed=0).x_train) > 0
    for name in DATASETS:
        assert yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["name"] == name


# --------------------------------------------------------------------------- idx & fashion


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    a = (np.arange(60).reshape(3, 4, 5) * 7 % 251).astype(dtype)
    write_idx(tmp_path / f"a.idx{suffix}", a)
    b = read_idx(tmp_path / f"a.idx{suffix}")
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_idx_header_is_big_endian_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 5, 6, 7]))  # written by hand
    assert read_idx(path).tolist() == [5, 6, 7]
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 5, 6, 7]))  # says 4, holds 3
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ConfigError, match="not an idx file"):
        read_idx(path)


def write_fashion(root: Path, n_train: int = 30, n_test: int = 12) -> None:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8),
              "y_train": (np.arange(n_train) % 10).astype(np.uint8),
              "x_test": rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8),
              "y_test": (np.arange(n_test) % 10).astype(np.uint8)}
    for i, (key, name) in enumerate(FASHION_FILES.items()):
        write_idx(root / (name + (".gz" if i % 2 else "")), arrays[key])  # plain and gzipped


def test_fashion_mnist_from_dir(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    cfg = {"name": "fashion_mnist", "root": str(tmp_path), "probe_size": 5}
    ds = load_dataset(section("data", cfg), seed=0)
    assert ds.x_train.shape == (25, 16) and ds.x_probe.shape == (5, 16)
    assert ds.x_test.shape == (12, 16) and ds.num_classes == 10
    assert ds.y_test.tolist() == [i % 10 for i in range(12)]  # official test file, in order
    assert_exact_cover([ds.source_ids["train"], ds.source_ids["probe"]], 30)
    img = load_dataset(section("data", {**cfg, "image": True, "max_train": 10,
                                             "max_test": 4}), seed=0)
    assert img.x_train.shape == (10, 1, 4, 4) and img.x_test.shape == (4, 1, 4, 4)
    raw = load_dataset(section("data", {**cfg, "standardize": False}), seed=0)
    assert 0 <= raw.x_train.min() and raw.x_train.max() <= 1


def test_fashion_mnist_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset(FileData(name="fashion_mnist", root=str(tmp_path / "nope")), seed=0)
    assert "\n" not in str(err.value) and "data.root=" in str(err.value)
    (tmp_path / FASHION_FILES["x_train"]).write_bytes(b"")  # only some files present
    with pytest.raises(ConfigError, match="apt-get"):
        load_dataset(FileData(name="fashion_mnist", root=str(tmp_path)), seed=0)


@pytest.mark.skipif(not Path(FASHION_ROOT).is_dir(),
                    reason="dataset-fashion-mnist not installed: "
                           "apt-get install dataset-fashion-mnist")
def test_fashion_mnist_installed() -> None:
    ds = load_dataset(section("data", {"name": "fashion_mnist", "max_train": 1000,
                                            "probe_size": 100}), seed=0)
    assert ds.x_train.shape == (1000, 784) and ds.x_probe.shape == (100, 784)
    assert ds.x_test.shape == (10000, 784) and ds.num_classes == 10
    assert np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10


def test_torchvision_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails even if installed
    with pytest.raises(ConfigError, match=r"torchvision: pip install 'dicesim\[vision\]'"):
        load_dataset(section("data", {"name": "mnist"}), seed=0)


# --------------------------------------------------------------------------- CIFAR binaries


def _write_cifar(folder: Path, name: str, rng: np.random.Generator, per_file: int = 7
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official binary files of `name` in `folder`, with random records: each file's
    (images [N, 3, 32, 32], labels [N, label bytes])."""
    files = ([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
             if name == "cifar10" else ["train.bin", "test.bin"])
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for file in files:
        x = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        if name == "cifar10":
            y = rng.integers(0, 10, (per_file, 1), dtype=np.uint8)
        else:
            fine = rng.integers(0, 100, per_file, dtype=np.uint8)
            y = np.stack([fine // 5, fine], 1).astype(np.uint8)  # coarse byte, then fine
        # one record = label byte(s) + 1024 red + 1024 green + 1024 blue, rows of 32
        (folder / file).write_bytes(np.concatenate([y, x.reshape(per_file, -1)], 1).tobytes())
        written[file] = (x, y)
    return written


@pytest.mark.parametrize(("name", "folder", "labels"), [
    ("cifar10", "cifar-10-batches-bin", "fine"), ("cifar10", "", "fine"),
    ("cifar100", "cifar-100-binary", "fine"), ("cifar100", "cifar-100-binary", "coarse")])
def test_cifar_binary_files_are_read_exactly(tmp_path: Path, name: str, folder: str,
                                             labels: str) -> None:
    written = _write_cifar(tmp_path / folder, name, np.random.default_rng(3))
    values = {"name": name, "root": str(tmp_path), "probe_size": 5, "standardize": False,
              "image": True, **({"labels": labels} if name == "cifar100" else {})}
    ds = load_dataset(section("data", values), seed=0)
    test_file = "test_batch.bin" if name == "cifar10" else "test.bin"
    train = [v for k, v in written.items() if k != test_file]
    x_pool = np.concatenate([x for x, _ in train])
    column = 0 if labels == "coarse" or name == "cifar10" else 1
    y_pool = np.concatenate([y[:, column] for _, y in train]).astype(np.int64)
    assert ds.input_shape == (3, 32, 32)
    assert ds.num_classes == {"cifar10": 10, "cifar100": 100 if labels == "fine" else 20}[name]
    for split in ("train", "probe"):
        ids = ds.source_ids[split]
        np.testing.assert_array_equal(getattr(ds, f"x_{split}").numpy(),
                                      x_pool[ids].astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(getattr(ds, f"y_{split}").numpy(), y_pool[ids])
    x_test, y_test = written[test_file]
    np.testing.assert_array_equal(ds.x_test.numpy(), x_test.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(ds.y_test.numpy(), y_test[:, column])
    assert len(ds.y_train) + len(ds.y_probe) == len(y_pool)


def test_cifar_missing_or_malformed_file_is_one_line(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path, "cifar10", np.random.default_rng(0))
    (tmp_path / "data_batch_3.bin").unlink()
    cfg = section("data", {"name": "cifar10", "root": str(tmp_path), "probe_size": 5})
    with pytest.raises(ConfigError, match=r"data_batch_3.bin: not found; download "
                                          r"https://www.cs.toronto.edu/~kriz/cifar-10-binary"):
        load_dataset(cfg, seed=0)
    x, y = written["data_batch_3.bin"]
    record = np.concatenate([y, x.reshape(len(y), -1)], 1).tobytes()
    (tmp_path / "data_batch_3.bin").write_bytes(record[:-1])  # one byte short
    with pytest.raises(ConfigError, match=r"data_batch_3.bin: 21510 bytes is not a whole "
                                          r"number of 3073-byte records") as err:
        load_dataset(cfg, seed=0)
    assert "\n" not in str(err.value)
    (tmp_path / "data_batch_3.bin").write_bytes(b"\x0b" + record[1:])  # label 11 of 10
    with pytest.raises(ConfigError, match=r"label 11 is not one of 10 classes"):
        load_dataset(cfg, seed=0)


# --------------------------------------------------------------------------- partition


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "label_skew"])
def test_partition_assigns_every_sample_once(scheme: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    parts = partition(labels, 8, scheme, alpha=0.5, seed=1, min_size=10)
    assert len(parts) == 8 and min(len(p) for p in parts) >= 10
    assert_exact_cover(parts, 1000)
    again = partition(labels, 8, scheme, alpha=0.5, seed=1, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_partition_is_balanced() -> None:
    parts = partition(np.zeros(103, dtype=np.int64), 10, "iid", seed=0)
    assert sorted({len(p) for p in parts}) == [10, 11]


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = np.repeat(np.arange(10), 200)
    skewed = max_class_share(labels, partition(labels, 10, "dirichlet", 0.1, seed=0, min_size=5))
    uniform = max_class_share(labels, partition(labels, 10, "dirichlet", 100.0, seed=0))
    iid = max_class_share(labels, partition(labels, 10, "iid", seed=0))
    assert skewed > 0.5 and uniform < 0.2 and iid < 0.2


@pytest.mark.parametrize("nodes, per_node, sizes", [(10, 2, (50, 50)), (4, 3, (100, 150)),
                                                     (3, 4, (150, 200)), (25, 1, (16, 25))])
def test_label_skew_gives_each_node_its_classes(nodes: int, per_node: int,
                                                sizes: tuple[int, int]) -> None:
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 50))
    parts = partition(labels, nodes, "label_skew", seed=7, classes_per_node=per_node)
    assert_exact_cover(parts, len(labels))
    held = [set(labels[p].tolist()) for p in parts]
    assert all(len(h) == per_node for h in held)  # exactly c classes each (50 per class)
    assert set().union(*held) == set(range(10))  # every class used
    # a class shared by m nodes gives each ⌊50/m⌋ or ⌈50/m⌉ of its samples
    for c in range(10):
        shares = [int((labels[p] == c).sum()) for p, h in zip(parts, held, strict=True)
                  if c in h]
        assert max(shares) - min(shares) <= 1 and sum(shares) == 50
    assert sizes[0] <= min(len(p) for p in parts) <= max(len(p) for p in parts) <= sizes[1]
    again = partition(labels, nodes, "label_skew", seed=7, classes_per_node=per_node)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, nodes, "label_skew", seed=8, classes_per_node=per_node)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_bad_label_skew_settings() -> None:
    labels = np.arange(100) % 4
    for per_node in (0, 5):
        with pytest.raises(ConfigError, match=f"data.classes_per_node={per_node}: the data "
                                              "has 4 classes"):
            partition(labels, 4, "label_skew", seed=0, classes_per_node=per_node)
    with pytest.raises(ConfigError, match="classes_per_node >= 2"):  # 2 nodes × 1 < 4 classes
        partition(labels, 2, "label_skew", seed=0, classes_per_node=1)
    with pytest.raises(ConfigError, match="only 3 samples"):  # 25 per class, 8 holders
        partition(labels, 32, "label_skew", seed=0, min_size=4, classes_per_node=1)
    with pytest.raises(ConfigError, match="class labels"):
        partition(labels.astype(np.float32), 4, "label_skew", seed=0)


def test_bad_partition_settings() -> None:
    labels = np.arange(100) % 4
    with pytest.raises(ConfigError, match="data.alpha"):
        partition(labels, 4, "dirichlet", alpha=0.0, seed=0)
    with pytest.raises(ConfigError, match="iid, dirichlet"):
        partition(labels, 4, "shards", alpha=1.0, seed=0)
    with pytest.raises(ConfigError, match="data.alpha"):  # cannot give every node 30 samples
        partition(labels, 4, "dirichlet", alpha=0.01, seed=0, min_size=30)
    with pytest.raises(ConfigError, match="nodes=20"):
        partition(labels, 20, "iid", seed=0, min_size=6)
    with pytest.raises(ConfigError, match="class labels"):
        partition(labels.astype(np.float32), 4, "dirichlet", seed=0)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("n, bs", [(40, 8), (43, 8)])
def test_batch_ids_epochs(n: int, bs: int) -> None:
    local = np.arange(1000, 1000 + 3 * n, 3)
    bpe = n // bs
    for epoch in range(3):
        batches = [batch_ids(local, bs, epoch * bpe + k, seed=5, node=2) for k in range(bpe)]
        seen = np.concatenate(batches)
        assert all(len(b) == bs for b in batches) and len(set(seen)) == bpe * bs
        assert set(seen) <= set(local)
        if n % bs == 0:
            assert sorted(seen) == sorted(local)
    assert np.array_equal(batch_ids(local, bs, 7, 5, 2), batch_ids(local.copy(), bs, 7, 5, 2))
    assert not np.array_equal(batch_ids(local, bs, 7, 5, 2), batch_ids(local, bs, 7, 5, 3))
    assert not np.array_equal(batch_ids(local, bs, 0, 5, 2), batch_ids(local, bs, bpe, 5, 2))


def test_batch_size_checks() -> None:
    parts = [np.arange(100), np.arange(100, 140)]
    check_batch_size(parts, 40)
    with pytest.raises(ConfigError, match=r"batch_size=64 is larger than node 1's local data "
                                          r"\(40 samples\)"):
        check_batch_size(parts, 64)
    with pytest.raises(ConfigError, match="batch_size"):
        batch_ids(parts[1], 64, 0, 0, 1)


def test_node_probe_split() -> None:
    local = np.arange(50, 150)
    train, probe = node_probe_split(local, 0.2, seed=0, node=3)
    assert len(probe) == 20 and len(train) == 80
    assert np.array_equal(np.sort(np.concatenate([train, probe])), local)
    again = node_probe_split(local, 0.2, seed=0, node=3)
    assert np.array_equal(probe, again[1])
    assert not np.array_equal(probe, node_probe_split(local, 0.2, seed=0, node=4)[1])
    with pytest.raises(ConfigError, match="fraction"):
        node_probe_split(local, 1.0, seed=0, node=3)


# --------------------------------------------------------------------------- batches, vectorized


@pytest.mark.parametrize("batched_from", [1, 64])  # 1: every redraw batched (_draw_orders)
@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_batch_ids_block_equals_batch_ids(scheme: str, batched_from: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "BATCHED_REDRAW", batched_from)
    labels = np.random.default_rng(1).integers(0, 5, size=997)
    parts = partition(labels, 13, scheme, alpha=0.8, seed=4, min_size=7)
    assert len({len(p) for p in parts}) > 1  # uneven partition sizes
    bs, seed = 7, 11
    every = np.arange(len(parts))
    subsets = [every, every[::-1], np.array([5]), np.array([3, 3, 0]), every[1::3]]
    # many steps: several epochs of the smallest and the largest node, boundaries included
    for t in [*range(60), 100, 101, 2**20 + 3]:
        for nodes in subsets:
            block = batch_ids_block(parts, nodes, bs, t, seed)
            expect = np.stack([batch_ids(parts[k], bs, t, seed, k) for k in nodes])
            assert block.dtype == expect.dtype and np.array_equal(block, expect), (t, nodes)


def _numpy_orders(sizes, seed, nodes, epochs) -> np.ndarray:
    return np.concatenate([np.random.default_rng([seed, k, e]).permutation(m)
                           for m, k, e in zip(sizes, nodes, epochs, strict=True)])


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**32, 2**40 + 5, 2**70 + 1])
def test_batched_orders_are_numpys_generators(seed: int) -> None:
    """_draw_orders seeds PCG64 from SeedSequence([seed, node, epoch]) itself, for many keys
    at once: every span is exactly default_rng([seed, node, epoch]).permutation(m), for
    keys over the whole 32-bit range, sizes from 1, and keys past it (numpy one by one)."""
    rng = np.random.default_rng(3)
    sizes = np.concatenate([[1, 2, 3], rng.integers(1, 300, 200)])
    nodes = np.concatenate([[0, 2**32 - 1, 5], rng.integers(0, 2**32, 200)])
    epochs = np.concatenate([[2**32 - 1, 0, 1], rng.integers(0, 2**32, 200)])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = np.full(int(sizes.sum()), -1)
    data_module._draw_orders(out, starts, sizes, seed, nodes, epochs)
    assert np.array_equal(out, _numpy_orders(sizes, seed, nodes, epochs))


def test_batched_orders_fall_back_when_numpy_seeds_differently(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The once-per-process check against numpy: a seeding that does not reproduce numpy's
    (simulated here) is noticed and every order is drawn by numpy itself."""
    monkeypatch.setattr(data_module, "_CHECKED", [])
    monkeypatch.setattr(data_module, "_pcg64_states",
                        lambda keys: [(12345, 6789 | 1)] * len(keys))
    sizes, nodes, epochs = np.array([9, 4, 16]), np.array([1, 2, 3]), np.array([0, 5, 2])
    out = np.zeros(int(sizes.sum()), np.int64)
    data_module._draw_orders(out, np.array([0, 9, 13]), sizes, 4, nodes, epochs)
    assert data_module._CHECKED == [False]
    assert np.array_equal(out, _numpy_orders(sizes, 4, nodes, epochs))


def test_batch_order_goes_back_in_time_and_checks_sizes() -> None:
    parts = [np.arange(10, 30), np.arange(30, 39), np.arange(0, 10)]
    order = BatchOrder(parts, 4, seed=2)
    for t in [9, 0, 3, 2, 17, 1]:  # epochs change in both directions
        assert np.array_equal(order.ids(t, [0, 1, 2]),
                              np.stack([batch_ids(p, 4, t, 2, k) for k, p in enumerate(parts)]))
    with pytest.raises(ConfigError, match=r"batch_size=10 must be in \[1, 9\] \(node 1"):
        BatchOrder(parts, 10, seed=2)


def test_batch_ids_block_follows_a_new_parts_list() -> None:
    parts = [np.arange(0, 16), np.arange(16, 32)]
    first = batch_ids_block(parts, [0, 1], 4, 1, 0)
    parts[1] = np.arange(100, 116)  # a node's ids replaced (e.g. a held-out probe split)
    again = batch_ids_block(parts, [0, 1], 4, 1, 0)
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1] + 84)


@pytest.mark.parametrize("seed", [0, 2**32 - 1, 2**32, 2**40 + 5])
def test_batch_ids_block_with_large_seeds(seed: int) -> None:
    parts = [np.arange(0, 20), np.arange(20, 33)]
    for t in range(8):
        assert np.array_equal(batch_ids_block(parts, [0, 1], 5, t, seed),
                              np.stack([batch_ids(p, 5, t, seed, k) for k, p in enumerate(parts)]))
        for k in range(2):  # and batch_ids itself still draws default_rng([seed, node, epoch])
            epoch, i = divmod(t, len(parts[k]) // 5)
            perm = np.random.default_rng([seed, k, epoch]).permutation(len(parts[k]))
            assert np.array_equal(batch_ids(parts[k], 5, t, seed, k),
                                  parts[k][perm[i * 5:(i + 1) * 5]])
