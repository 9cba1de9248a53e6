"""Tasks: what each one loads, how it splits, and the one-line error for each bad input."""

import hashlib
import io
import pickle
import re
import struct
import sys

import numpy as np
import pytest
import torch

from dsd.data import DATA_TASKS, TASKS, DataError, cifar, load_task, splits
from dsd.data import text as text_source
from dsd.data.augment import apply, crop_flip, draw

from _fake_data import write_cifar, write_tensors, write_text


def _digest(data) -> str:
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test):
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# --- common checks ---------------------------------------------------------------------------

def test_task_names():
    assert TASKS == ("mnist1d", "digits", "cifar10", "cifar100", "text", "tensors")
    assert DATA_TASKS == ("cifar10", "cifar100", "text", "tensors")
    assert issubclass(DataError, ValueError)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'mnist'; choose one of mnist1d, digits"):
        load_task("mnist")
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction must be in"):
            load_task("digits", val_fraction=fraction)
    with pytest.raises(ValueError, match="seq_len must be at least 1, got 0"):
        load_task("text", seq_len=0)


@pytest.mark.filterwarnings("error")  # numpy's empty-slice warnings among them
@pytest.mark.parametrize("name, kwargs, n", [
    ("mnist1d", dict(mnist1d_samples=200), 160), ("digits", {}, 1347),
    ("tensors", dict(data="tensors"), 36), ("cifar10", dict(data="cifar"), 10)])
def test_a_val_fraction_that_leaves_no_training_example_is_refused(tmp_path, name, kwargs, n):
    if kwargs.get("data") == "tensors":
        kwargs = dict(data=write_tensors(tmp_path / "d.pt", n=40, shape=(3,), classes=2))
    elif kwargs.get("data") == "cifar":
        kwargs = dict(data=write_cifar(tmp_path, per_batch=2, test=2))
    fraction = 1 - 0.4 / n  # rounds to every example
    with pytest.raises(DataError, match=re.escape(
            f"val_fraction {fraction} splits the {n:,} training examples of task {name} into 0 "
            f"for training and {n:,} for validation; each needs at least 1: give a smaller "
            f"--val-fraction")):
        load_task(name, val_fraction=fraction, **kwargs)
    fraction = 1 - 0.6 / n  # leaves one
    assert len(load_task(name, val_fraction=fraction, **kwargs).y_train) == 1


@pytest.mark.parametrize("name", ["mnist1d", "digits"])
def test_generated_tasks_read_no_data(name, tmp_path):
    with pytest.raises(DataError, match=f"^task {name} is generated/shipped and reads no --data; "
                                        "--data is for cifar10, cifar100, text, tensors$"):
        load_task(name, data=tmp_path)


# The exact tensors of the generated tasks (sha256 of shapes, dtypes and bytes): results stay
# comparable across dsd versions.
@pytest.mark.parametrize("name, kwargs, kind, shape, digest", [
    ("mnist1d", dict(mnist1d_samples=200), "signal", (40,),
     "4b2ae2c180ab23aaafcb7e6031ed9ca206806207da803735aeaeda371f1d853a"),
    ("mnist1d", dict(mnist1d_samples=200, val_fraction=0.25), "signal", (40,),
     "068d287983e237783274b9a0b047f8e07dc996b0ca45126ee1f777371e9ac976"),
    ("digits", {}, "image", (8, 8),
     "c09d7e3a71ceb581364e44a0e8305ea67dfbbe98b85bb279bb8198209c320b91"),
    ("digits", dict(val_fraction=0.3), "image", (8, 8),
     "96bc897ba5437cf64b371e8a73a7e070d470b4851f199074dd0c07e0ac9662d7"),
])
def test_generated_tasks_unchanged(name, kwargs, kind, shape, digest):
    data = load_task(name, **kwargs)
    assert (data.kind, data.signal_shape, data.num_classes) == (kind, shape, 10)
    assert not data.augment and data.fill is None and data.vocab is None
    assert data.source in ("generated", "embedded: scikit-learn load_digits")
    assert _digest(data) == digest


# --- CIFAR -----------------------------------------------------------------------------------

def _read(path):
    with open(path, "rb") as file:
        return pickle.load(file, encoding="bytes")


def _write(path, content, protocol=2):
    path.write_bytes(pickle.dumps(content, protocol=protocol))


def _moments(raw):
    """Per-channel mean and std on the 0..1 scale of uint8 rows (N, 3072)."""
    planes = raw.reshape(len(raw), 3, -1) / 255.0
    return planes.mean(axis=(0, 2)), planes.std(axis=(0, 2))


def test_cifar10_decodes_pixels_labels_and_normalisation(tmp_path):
    folder = write_cifar(tmp_path, per_batch=6, test=5)
    test_batch = _read(folder / "test_batch")
    test_batch[b"data"][0] = 0
    test_batch[b"data"][0, 1 * 1024 + 5 * 32 + 7] = 255  # green, row 5, column 7
    test_batch[b"data"][0, 2 * 1024 + 31 * 32 + 0] = 51  # blue, row 31, column 0
    _write(folder / "test_batch", test_batch)
    data = load_task("cifar10", data=folder, val_fraction=0.2)

    batches = [_read(folder / f"data_batch_{i}") for i in range(1, 6)]
    raw = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([b[b"labels"] for b in batches])
    val, train = splits.carve(len(raw), 0.2)
    mean, std = _moments(raw[train])
    scale = dict(dtype=torch.float32)

    def denormalise(x):
        return (x * torch.tensor(std, **scale).view(3, 1, 1)
                + torch.tensor(mean, **scale).view(3, 1, 1))

    assert (data.kind, data.signal_shape, data.num_classes) == ("image", (3, 32, 32), 10)
    assert data.augment and data.source == str(folder.resolve())
    assert data.x_train.dtype == torch.float32 and data.x_train.shape == (24, 3, 32, 32)
    assert (len(data.y_val), len(data.y_test)) == (6, 5)
    for x, y, rows in ((data.x_train, data.y_train, train), (data.x_val, data.y_val, val)):
        assert torch.equal(y, torch.tensor(labels[rows]))
        want = torch.tensor(raw[rows].reshape(-1, 3, 32, 32) / 255.0, **scale)
        torch.testing.assert_close(denormalise(x), want, atol=1e-5, rtol=0)
    assert torch.equal(data.y_test, torch.tensor(test_batch[b"labels"]))
    pixels = denormalise(data.x_test[0]) * 255
    assert pixels[1, 5, 7].item() == pytest.approx(255, abs=1e-3)
    assert pixels[2, 31, 0].item() == pytest.approx(51, abs=1e-3)
    torch.testing.assert_close(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(data.x_train.std(dim=(0, 2, 3), correction=0), torch.ones(3))
    # The fill is what a black pixel becomes: the untouched pixels of test image 0.
    torch.testing.assert_close(torch.tensor(data.fill), data.x_test[0, :, 0, 0])
    torch.testing.assert_close(torch.tensor(data.fill), torch.tensor(-mean / std, **scale))


def test_cifar100_reads_fine_labels_from_the_folder_or_its_parent(tmp_path):
    folder = write_cifar(tmp_path, classes=100, per_batch=12, test=4, seed=3)
    from_parent = load_task("cifar100", data=tmp_path)
    from_folder = load_task("cifar100", data=folder)
    assert _digest(from_parent) == _digest(from_folder)
    assert from_parent.source == from_folder.source == str(folder.resolve())
    assert from_parent.num_classes == 100
    assert torch.equal(from_parent.y_test, torch.tensor(_read(folder / "test")[b"fine_labels"]))
    train = _read(folder / "train")
    _, kept = splits.carve(12, 0.1)
    assert torch.equal(from_parent.y_train, torch.tensor(train[b"fine_labels"])[kept])


class _Python2Pickler(pickle._Pickler):
    """Writes strings as Python 2's cPickle did (STRING opcodes), as in the real CIFAR files."""

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin-1"))

    def save_bytes(self, obj):
        size = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([size]) if size < 256
                    else pickle.BINSTRING + struct.pack("<i", size)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, str: save_str, bytes: save_bytes}


def test_cifar_reads_python2_pickles_and_newer_protocols(tmp_path):
    folder = write_cifar(tmp_path, per_batch=2, test=2)
    want = _digest(load_task("cifar10", data=folder))
    path = folder / "data_batch_2"
    batch = _read(path)
    file = io.BytesIO()
    _Python2Pickler(file, protocol=2).dump(batch)
    # Python 2 numpy lived in numpy.core; numpy 2 writes numpy._core.
    python2 = file.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in python2 and b"U\x04data" in python2
    path.write_bytes(python2)
    assert _digest(load_task("cifar10", data=folder)) == want
    for protocol in (2, 5):
        extras = {b"extra": {1, 2}, b"scalar": np.int64(3), b"blob": bytearray(b"ab")}
        _write(path, batch | extras, protocol=protocol)
        assert _digest(load_task("cifar10", data=folder)) == want


def test_cifar_cache_sees_a_rewritten_file(tmp_path):
    folder = write_cifar(tmp_path, per_batch=2, test=2)
    assert len(load_task("cifar10", data=folder).y_test) == 2
    hits = cifar._arrays.cache_info().hits
    load_task("cifar10", data=folder)
    assert cifar._arrays.cache_info().hits == hits + 1
    write_cifar(tmp_path, per_batch=2, test=3)
    assert len(load_task("cifar10", data=folder).y_test) == 3


class _Boom:
    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_cifar_unpickler_refuses_foreign_globals_without_running_them(tmp_path):
    folder = write_cifar(tmp_path, per_batch=2, test=2)
    boom = _Boom()
    boom.marker = tmp_path / "ran"
    _write(folder / "test_batch", {b"data": boom, b"labels": [0]})
    with pytest.raises(DataError, match=r"test_batch names the global (posix|os|nt)\.system, "
                                        r"which a CIFAR batch never holds; refusing"):
        load_task("cifar10", data=folder)
    assert not boom.marker.exists()
    _write(folder / "test_batch", {b"data": _Boom, b"labels": [0]})  # a class, by reference
    with pytest.raises(DataError, match=r"test_batch names the global test_tasks\._Boom"):
        load_task("cifar10", data=folder)


def test_cifar_needs_data(tmp_path):
    with pytest.raises(DataError, match=r"^task cifar10 needs --data DIR: the folder "
                                        r"cifar-10-batches-py extracted from cifar-10-python"
                                        r"\.tar\.gz \(https://www\.cs\.toronto\.edu/~kriz/"
                                        r"cifar\.html\), or its parent$"):
        load_task("cifar10")
    with pytest.raises(DataError, match="cifar-100-python extracted from cifar-100-python"):
        load_task("cifar100")
    with pytest.raises(DataError, match=f"--data {tmp_path / 'nope'} does not exist; give"):
        load_task("cifar10", data=tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=f"--data {tmp_path / 'file'} is not a directory"):
        load_task("cifar10", data=tmp_path / "file")


def test_cifar_names_missing_files(tmp_path):
    folder = write_cifar(tmp_path, per_batch=2, test=2)
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match=f"{folder} lacks data_batch_3, test_batch; it must hold "
                                        "data_batch_1, data_batch_2, .*, test_batch"):
        load_task("cifar10", data=folder)
    with pytest.raises(DataError, match=f"{tmp_path} lacks train, test; it must hold train, "
                                        "test: the folder cifar-100-python"):
        load_task("cifar100", data=tmp_path)


def test_cifar_too_few_images(tmp_path):
    folder = write_cifar(tmp_path, classes=100, per_batch=1, test=1)
    with pytest.raises(DataError, match=f"^{folder} holds 1 training and 1 test images; it needs "
                                        "at least 2 and 1"):
        load_task("cifar100", data=folder)
    write_cifar(tmp_path, classes=100, per_batch=2, test=0)
    with pytest.raises(DataError, match="holds 2 training and 0 test images"):
        load_task("cifar100", data=folder)


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", r"test_batch is not a readable pickle \(UnpicklingError"),
    (pickle.dumps({b"data": 1}, protocol=2)[:-5], r"test_batch is not a readable pickle"),
    ([1, 2], r"test_batch is not a CIFAR batch: it needs the keys b'data' and b'labels', "
             r"found list"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"found b'data'; re-extract"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
     r"test_batch: b'data' must be uint8 rows of 3072 pixels \(N, 3072\), got uint8 \(2, 100\)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"got float32"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]},
     r"test_batch: b'labels' must be 2 integer labels, one per row of b'data', got int64 \(3,\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
     r"test_batch: labels must be in 0\.\.9, got 0\.\.10"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 0]}, r"got -1\.\.0"),
])
def test_cifar_bad_batch_files(tmp_path, content, message):
    folder = write_cifar(tmp_path, per_batch=2, test=2)
    path = folder / "test_batch"
    path.write_bytes(content) if isinstance(content, bytes) else _write(path, content)
    with pytest.raises(DataError, match=message) as error:
        load_task("cifar10", data=folder)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# --- text ------------------------------------------------------------------------------------

def test_text_chunks_targets_and_contiguous_splits(tmp_path):
    path = write_text(tmp_path / "corpus.txt", chars=2000)
    text = path.read_text()
    data = load_task("text", data=path, seq_len=16)
    assert data.vocab == "".join(sorted(set(text))) and data.num_classes == len(data.vocab)
    assert (data.kind, data.signal_shape, data.source) == ("text", (16,), str(path.resolve()))
    ids = torch.tensor([data.vocab.index(c) for c in text])
    chunks = (len(text) - 1) // 16  # 124: test the last 12, validation the 11 before
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (101, 11, 12)
    x = torch.cat([data.x_train, data.x_val, data.x_test])
    y = torch.cat([data.y_train, data.y_val, data.y_test])
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x, ids[:chunks * 16].view(chunks, 16))
    assert torch.equal(y, ids[1:chunks * 16 + 1].view(chunks, 16))
    assert torch.equal(data.y_train[:, :-1], data.x_train[:, 1:])


def test_text_embedded_corpus():
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    data = load_task("text")
    assert data.vocab == "".join(sorted(set(text))) and data.num_classes == len(set(text))
    assert 80 <= data.num_classes <= 200
    assert data.source.startswith("embedded: pydoc_data.topics")
    total = sum(len(x) for x in (data.x_train, data.x_val, data.x_test))
    assert total == (len(text) - 1) // 128
    assert "".join(data.vocab[i] for i in data.x_train[0].tolist()) == text[:128]


def test_text_without_the_embedded_corpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    text_source._embedded.cache_clear()
    try:
        with pytest.raises(DataError, match="lacks pydoc_data.topics .*; give --data FILE"):
            load_task("text")
    finally:
        text_source._embedded.cache_clear()


def test_text_minimum_length(tmp_path):
    # 3 chunks of 16 and one more character for the last target: 49 characters.
    assert len(load_task("text", data=write_text(tmp_path / "a.txt", 49), seq_len=16).x_train) == 1
    path = write_text(tmp_path / "b.txt", 48)
    with pytest.raises(DataError, match=f"^{path} has 48 characters; seq_len 16 with val_fraction "
                                        "0.1 needs at least 49"):
        load_task("text", data=path, seq_len=16)
    with pytest.raises(DataError, match="needs at least 97 "):  # 6 chunks: 1 train, 4 val, 1 test
        load_task("text", data=path, seq_len=16, val_fraction=0.9)
    assert len(load_task("text", data=write_text(tmp_path / "c.txt", 97), seq_len=16,
                         val_fraction=0.9).x_train) == 1


def test_text_bad_files(tmp_path):
    with pytest.raises(DataError, match=f"--data {tmp_path / 'no.txt'} does not exist"):
        load_task("text", data=tmp_path / "no.txt")
    with pytest.raises(DataError, match=f"--data {tmp_path} is not a file"):
        load_task("text", data=tmp_path)
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"abc" + "é".encode("latin-1") + b"def" * 100)
    with pytest.raises(DataError, match=f"^{path} is not UTF-8 text: byte offset 3 \\(0xe9\\)"):
        load_task("text", data=path)


# --- tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_tensors_with_and_without_a_test_split(tmp_path, suffix):
    path = write_tensors(tmp_path / f"d{suffix}", n=40, shape=(6,), classes=3)
    data = load_task("tensors", data=path)
    assert (data.kind, data.signal_shape, data.source) == ("signal", (6,), str(path.resolve()))
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (32, 4, 4)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert abs(data.x_train.mean().item()) < 1e-5
    assert data.x_train.std(correction=0).item() == pytest.approx(1, abs=1e-5)

    path = write_tensors(tmp_path / f"t{suffix}", n=40, shape=(2, 5, 5), classes=3, test=True)
    data = load_task("tensors", data=path, val_fraction=0.25)
    assert (data.kind, data.signal_shape) == ("image", (2, 5, 5))
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (30, 10, 10)
    raw = np.load(path) if suffix == ".npz" else {k: v.numpy() for k, v in torch.load(path).items()}
    _, train = splits.carve(40, 0.25)
    mean, std = raw["x"][train].mean(dtype=np.float64), raw["x"][train].std(dtype=np.float64)
    torch.testing.assert_close(data.x_test, torch.tensor((raw["x_test"] - mean) / std,
                                                                dtype=torch.float32))
    assert torch.equal(data.y_test, torch.tensor(raw["y_test"]))


def test_tensors_integer_inputs_kept_and_splits_partition(tmp_path):
    x = torch.arange(30 * 4).view(30, 4)  # row i starts with 4 * i: rows identify themselves
    y = torch.arange(30) % 5
    y[7] = 8  # the largest label anywhere sets num_classes
    torch.save((x, y), tmp_path / "pair.pt")
    data = load_task("tensors", data=tmp_path / "pair.pt")
    rows = torch.cat([data.x_train, data.x_val, data.x_test])
    assert data.x_train.dtype == torch.int64 and data.num_classes == 9
    assert sorted((rows[:, 0] // 4).tolist()) == list(range(30))
    assert torch.equal(rows, x[rows[:, 0] // 4])
    assert torch.equal(torch.cat([data.y_train, data.y_val, data.y_test]), y[rows[:, 0] // 4])
    list_form = tmp_path / "list.pt"
    torch.save([x, y], list_form)
    assert _digest(load_task("tensors", data=list_form)) == _digest(data)


def test_tensors_num_classes_counts_the_test_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3, 3, 3)), y=np.zeros(10, np.int64),
             x_test=np.ones((2, 3, 3, 3)), y_test=np.array([0, 6]))
    data = load_task("tensors", data=tmp_path / "d.npz")
    assert (data.kind, data.num_classes) == ("image", 7)
    assert torch.equal(data.x_train, torch.zeros(9, 3, 3, 3))  # constant: centred only


def _save(path, **arrays):
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        torch.save({k: torch.as_tensor(v) for k, v in arrays.items()}, path)
    return path


X, Y = np.zeros((10, 3), np.float32), np.zeros(10, np.int64)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize("arrays, message", [
    (dict(inputs=X, y=Y), r"holds inputs, y; give a \.pt or \.npz file holding x and y"),
    (dict(x=X, y=Y, x_test=X), r" holds x_test without y_test; give both or neither"),
    (dict(x=X, y=Y, y_test=Y), r" holds y_test without x_test"),
    (dict(x=X, y=Y[:9]), r": y has 9 labels but x has 10 examples"),
    (dict(x=X, y=Y.astype(np.float32)), r": y is float32 of shape \(10,\); give 1-D integer"),
    (dict(x=X, y=Y.reshape(5, 2)), r": y is int64 of shape \(5, 2\)"),
    (dict(x=X, y=Y - 1), r": y holds the negative label -1; class ids start at 0"),
    (dict(x=X[:0], y=Y[:0]), r": x is empty \(shape \(0, 3\)\)"),
    (dict(x=X[:, 0], y=Y), r": x has shape \(10,\); give \(N, L\) signals"),
    (dict(x=X.reshape(10, 3, 1, 1, 1), y=Y), r": x has shape \(10, 3, 1, 1, 1\)"),
    (dict(x=X > 0, y=Y), r": x is bool; give floating inputs or integer ids"),
    (dict(x=X + np.nan, y=Y), r": x holds NaN or Inf"),
    (dict(x=X, y=Y, x_test=X[:, :2], y_test=Y), r": x_test is float32 \(2,\) per example but x "
                                               r"is float32 \(3,\)"),
    (dict(x=X, y=Y, x_test=X.astype(np.int64), y_test=Y), r": x_test is int64 \(3,\)"),
    (dict(x=X, y=Y, x_test=X, y_test=Y[:3]), r": y_test has 3 labels but x_test has 10"),
    (dict(x=X[:2], y=Y[:2]), r" has 2 examples; it needs at least 3: one each for train"),
])
def test_tensors_bad_contents(tmp_path, suffix, arrays, message):
    path = _save(tmp_path / f"d{suffix}", **arrays).resolve()
    with pytest.raises(DataError, match=message) as error:
        load_task("tensors", data=path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_tensors_bad_files(tmp_path):
    with pytest.raises(DataError, match="^task tensors needs --data FILE: a .pt or .npz file"):
        load_task("tensors")
    with pytest.raises(DataError, match=f"--data {tmp_path / 'no.pt'} does not exist"):
        load_task("tensors", data=tmp_path / "no.pt")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(DataError, match=f"--data {tmp_path / 'dir.npz'} is not a file"):
        load_task("tensors", data=tmp_path / "dir.npz")
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"d\.csv: task tensors reads \.pt and \.npz files, not "
                                        r"\.csv"):
        load_task("tensors", data=tmp_path / "d.csv")
    for name in ("bad.pt", "bad.npz"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(DataError, match=f"{tmp_path / name} cannot be read \\("):
            load_task("tensors", data=tmp_path / name)
    torch.save({"x": torch.zeros(4, 2), "y": [0, 1, 0, 1]}, tmp_path / "list.pt")
    with pytest.raises(DataError, match=r"list\.pt: y is a list, not a tensor or array"):
        load_task("tensors", data=tmp_path / "list.pt")
    torch.save(torch.zeros(3), tmp_path / "one.pt")
    with pytest.raises(DataError, match=r"one\.pt holds a Tensor; give .* \(a dict, or an "
                                        r"\(x, y\) pair\)"):
        load_task("tensors", data=tmp_path / "one.pt")
    np.savez(tmp_path / "objects.npz", x=np.array([object()] * 3), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"objects\.npz cannot be read \(ValueError: Object "
                                        r"arrays cannot be loaded"):
        load_task("tensors", data=tmp_path / "objects.npz")


# --- crop_flip -------------------------------------------------------------------------------

def _reference(x, dy, dx, flip, padding, fill):
    out = []
    for i in range(len(x)):
        c, h, w = x[i].shape
        padded = torch.tensor(fill, dtype=x.dtype).view(c, 1, 1).repeat(1, h + 2 * padding,
                                                                         w + 2 * padding)
        padded[:, padding:padding + h, padding:padding + w] = x[i]
        crop = padded[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("shape, padding", [((16, 3, 32, 32), 4), ((9, 2, 5, 7), 2),
                                            ((4, 1, 3, 3), 0)])
def test_crop_flip_matches_the_per_example_reference(shape, padding):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fill = tuple(float(-1 - c) for c in range(shape[1]))
    got = crop_flip(x, torch.Generator().manual_seed(7), padding=padding, fill=fill)
    dy, dx, flip = draw(torch.Generator().manual_seed(7), shape[0], padding)
    assert torch.equal(got, _reference(x, dy, dx, flip, padding, fill))
    assert got.is_contiguous()


def test_crop_flip_border_takes_the_fill():
    x = torch.full((64, 3, 8, 8), 5.0)
    fill = (-1.0, -2.0, -3.0)
    out = crop_flip(x, torch.Generator().manual_seed(0), padding=4, fill=fill)
    dy, dx, _ = draw(torch.Generator().manual_seed(0), 64, 4)
    for c, value in enumerate(fill):
        assert set(out[:, c].unique().tolist()) <= {5.0, value}
        border = (out[:, c] == value).sum(dim=(1, 2))
        inside = (8 - (dy - 4).abs()) * (8 - (dx - 4).abs())
        assert torch.equal(border, 64 - inside)
    assert (border > 0).any() and (border == 0).any()


def test_crop_flip_keeps_channels_last():
    x = torch.randn(6, 3, 10, 10)
    want = crop_flip(x, torch.Generator().manual_seed(3), fill=(0.5, 0.0, -0.5))
    got = crop_flip(x.to(memory_format=torch.channels_last), torch.Generator().manual_seed(3),
                    fill=(0.5, 0.0, -0.5))
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)


def test_crop_flip_depends_only_on_the_seed():
    x = torch.randn(32, 3, 12, 12)
    fill = (0.0, 0.0, 0.0)
    first = crop_flip(x, torch.Generator().manual_seed(11), fill=fill)
    assert torch.equal(first, crop_flip(x, torch.Generator().manual_seed(11), fill=fill))
    assert not torch.equal(first, crop_flip(x, torch.Generator().manual_seed(12), fill=fill))
    dy, dx, flip = draw(torch.Generator().manual_seed(0), 4000, 4)
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(9))
    assert 0.45 < flip.float().mean().item() < 0.55


def test_apply_to_a_share_of_the_drawn_batch():
    """A rank augments its share of a global batch as a single process augments the batch."""
    x = torch.randn(10, 3, 6, 6)
    offsets = draw(torch.Generator().manual_seed(2), 10, 3)
    whole = apply(x, offsets, padding=3, fill=(1.0, 2.0, 3.0))
    assert torch.equal(whole, crop_flip(x, torch.Generator().manual_seed(2), padding=3,
                                        fill=(1.0, 2.0, 3.0)))
    share = slice(1, None, 4)
    assert torch.equal(apply(x[share], [o[share] for o in offsets], padding=3,
                             fill=(1.0, 2.0, 3.0)), whole[share])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crop_flip_on_the_gpu_draws_what_the_cpu_draws():
    x = torch.randn(8, 3, 32, 32)
    fill = (-1.0, 0.0, 1.0)
    want = crop_flip(x, torch.Generator().manual_seed(5), fill=fill)
    got = crop_flip(x.cuda(), torch.Generator().manual_seed(5), fill=fill)
    assert got.is_cuda and torch.equal(got.cpu(), want)


def test_crop_flip_bad_arguments():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"fill has shape \(2,\); give one value per channel "
                                         r"\(3\)"):
        crop_flip(torch.zeros(2, 3, 4, 4), g, fill=(0.0, 0.0))
    with pytest.raises(ValueError, match=r"x must be a batch \(B, C, H, W\), got shape "
                                         r"\(3, 4, 4\)"):
        crop_flip(torch.zeros(3, 4, 4), g, fill=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="padding must be at least 0, got -1"):
        crop_flip(torch.zeros(2, 3, 4, 4), g, padding=-1, fill=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="padding must be at least 0, got -1"):
        apply(torch.zeros(2, 3, 4, 4), draw(g, 2, 1), padding=-1, fill=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="offsets are for 3, 3, 3 examples; x has 2"):
        apply(torch.zeros(2, 3, 4, 4), draw(g, 3, 1), padding=1, fill=(0.0, 0.0, 0.0))
