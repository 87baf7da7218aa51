"""Images read from an HDF5 image brick (NSD's imgBrick) instead of files: rows by id in any
order, the same features as image files of the same pixels (bit for bit, through the batch
task that writes the store), and every up-front check's message."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from neurotask.pipeline.features.image_source import (BrickBatch, FileBatch, ImageBrick, ImageFiles, brick_rows,
                                                      check_brick, read_brick_images, read_brick_rows)
from neurotask.pipeline.features.images import synthetic_image
from neurotask.pipeline.features.preprocess import BadImagesError
from neurotask.pipeline.features.spaces import feature_spaces_from_config
from neurotask.pipeline.features.weights import write_random_checkpoints
from neurotask.pipeline.formats import nsd
from neurotask.pipeline.stages.featurize import Batch, _n_features, featurize_batch, space_provenance
from neurotask.storage import StudyStore

TINY = {"name": "tiny_conv", "kind": "torch_module", "factory": "torch.nn:Conv2d",
        "kwargs": {"in_channels": 3, "out_channels": 4, "kernel_size": 5, "stride": 8},
        "image_size": 64, "pool": 2}


def write_brick(path: Path, images: dict[int, np.ndarray], shape=(73000, 48, 40, 3), dtype=np.uint8,
                dataset: str = "imgBrick") -> Path:
    """A brick chunked per image (as simulate_nsd writes it), rows {0-based row: (H, W, 3)}."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(dataset, shape=shape, dtype=dtype, chunks=(1, *shape[1:]))
        for row, img in images.items():
            ds[row] = img
    return path


def random_rows(rows, shape=(48, 40), seed=0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {int(r): np.asarray(synthetic_image(rng, *shape)) for r in rows}


# ---------------------------------------------------------------- reading rows


def test_rows_in_any_order_and_repeated_equal_the_bricks_rows(tmp_path):
    rows = [72999, 4, 1000, 17, 3]
    images = random_rows(rows)
    path = write_brick(tmp_path / "s.hdf5", images)
    ask = [1000, 3, 72999, 3, 17, 4]  # not increasing, one repeated
    got = read_brick_rows(path, ask)
    assert got.shape == (6, 48, 40, 3) and got.dtype == np.uint8
    for k, r in enumerate(ask):
        np.testing.assert_array_equal(got[k], images[r])
    names = [nsd.image_name(r + 1) for r in ask]
    assert brick_rows(names).tolist() == ask  # row = 1-based 73k id - 1
    decoded = BrickBatch(str(path), tuple(ask)).read(names, 32)
    assert len(decoded) == 6
    for img, r in zip(decoded, ask):  # what decode_images gives: writable C-ordered copies
        assert img.flags.c_contiguous and img.flags.writeable and img.flags.owndata
        np.testing.assert_array_equal(img, images[r])
    assert read_brick_rows(path, []).shape == (0, 48, 40, 3)


def test_a_batch_carries_the_path_and_its_rows_only(tmp_path):
    path = write_brick(tmp_path / "s.hdf5", random_rows([9, 2]))
    brick, problems = check_brick(path, [nsd.image_name(10), nsd.image_name(3)], 32)
    assert problems == [] and brick == ImageBrick(str(path), (73000, 48, 40, 3), "uint8")
    batch = brick.batch([nsd.image_name(10), nsd.image_name(3)])
    assert batch == BrickBatch(str(path), (9, 2))
    assert len(pickle.dumps(batch)) < 500  # no handle, no pixels: the worker opens the file
    assert brick.fingerprint() == {"kind": "hdf5_brick", "file": "s.hdf5", "dataset": "imgBrick",
                                   "shape": [73000, 48, 40, 3], "dtype": "uint8"}
    assert ImageFiles({"a": "/x/a.png"}).batch(["a"]) == FileBatch(("/x/a.png",))


def test_an_unreadable_row_is_named_and_the_others_are_read(tmp_path, monkeypatch):
    images = random_rows([0, 1, 2])
    path = write_brick(tmp_path / "s.hdf5", images)
    import neurotask.pipeline.features.image_source as source

    real = source.read_brick_rows

    def flaky(p, rows, dataset="imgBrick"):
        if 1 in list(rows):
            raise OSError("Can't synchronously read data (inflate() failed)")
        return real(p, rows, dataset)

    monkeypatch.setattr(source, "read_brick_rows", flaky)
    with pytest.raises(BadImagesError) as e:
        read_brick_images(path, [0, 1, 2], ["a", "b", "c"])
    assert list(e.value.failures) == ["b"]
    assert e.value.failures["b"].startswith(f"unreadable row 1 of imgBrick in {path} (OSError: ")


# ---------------------------------------------------------------- the same features as files


@pytest.mark.parametrize("tasks", [[], pytest.param(["colorization"], marks=pytest.mark.slow)])
def test_brick_batch_writes_the_same_features_as_image_files(tmp_path, tasks):
    """The same pixels as PNG files (lossless) and as brick rows: the batch task stores the
    same features, bit for bit, for a torch module and (slow) a Taskonomy encoder."""
    weights = tmp_path / "weights"
    write_random_checkpoints(weights, tasks, seed=3)
    spaces = feature_spaces_from_config({"tasks": tasks, "weights_dir": str(weights), "extra": [TINY]})
    assert len(spaces) == len(tasks) + 1
    provenances = [space_provenance(s) for s in spaces]
    ids = [40001, 7, 123, 72000, 9]  # 1-based 73k ids, not in row order
    names = [nsd.image_name(i) for i in ids]
    images = random_rows([i - 1 for i in ids], shape=(70, 90), seed=4)
    brick = write_brick(tmp_path / "nsd_stimuli.hdf5", images, shape=(73000, 70, 90, 3))
    paths = []
    for i, name in zip(ids, names):
        paths.append(str(tmp_path / "png" / f"{name}.png"))
        Path(paths[-1]).parent.mkdir(exist_ok=True)
        Image.fromarray(images[i - 1]).save(paths[-1])
    options = {"device": "cpu", "channels_last": "auto", "min_image_side": 32, "torch_threads": 1,
               "threads_per_worker": {}}
    batch = Batch(0, 0, len(names))
    stored = {}
    for label, source in (("files", FileBatch(tuple(paths))), ("brick", BrickBatch(str(brick), tuple(i - 1 for i in ids)))):
        store = StudyStore(tmp_path / f"{label}.zarr")
        store.create()
        for space in spaces:
            store.init_features(space.name, names, _n_features(space)[0], len(names))
        out = featurize_batch(store, batch, source, names, spaces, provenances, options)
        assert out == {"batch": 0, "device": "cpu", "bad": {}}
        stored[label] = {s.name: store.read_features(s.name).values for s in spaces}
    for space in spaces:
        a, b = stored["files"][space.name], stored["brick"][space.name]
        assert np.isfinite(a).all() and a.std() > 0
        np.testing.assert_array_equal(a, b, err_msg=space.name)


# ---------------------------------------------------------------- checks before any work


def test_every_brick_problem_is_named(tmp_path):
    names = [nsd.image_name(i) for i in (1, 5, 73000)]
    missing = tmp_path / "none.hdf5"
    assert check_brick(missing, names, 32) == (None, [f"stimulus file not found: {missing} (data.nsd.stimuli; "
                                                      "NSD's nsd_stimuli.hdf5)"])
    (tmp_path / "text.hdf5").write_text("not HDF5")
    _, problems = check_brick(tmp_path / "text.hdf5", names, 32)
    assert len(problems) == 1 and problems[0].startswith(f"cannot open {tmp_path / 'text.hdf5'} as HDF5")
    with h5py.File(tmp_path / "other.hdf5", "w") as f:
        f.create_dataset("betas", data=np.zeros(3))
    assert check_brick(tmp_path / "other.hdf5", names, 32)[1] == [
        f"{tmp_path / 'other.hdf5'}: no dataset 'imgBrick' (it holds betas); NSD's stimuli are in 'imgBrick'"]

    # dtype, too few rows and too small images: all three at once
    p = write_brick(tmp_path / "bad.hdf5", {}, shape=(1000, 16, 24, 3), dtype=np.float32)
    brick, problems = check_brick(p, names + [nsd.image_name(2000)], 32)
    assert brick is None and len(problems) == 3
    assert problems[0] == f"{p}: imgBrick holds float32 values; expected uint8 RGB (NSD: (73000, 425, 425, 3) uint8)"
    assert problems[1] == (f"{p}: imgBrick: its images are 24x16 pixels, too small: the minimum side is 32 "
                           "(features.min_image_side)")
    assert problems[2] == (f"{p}: imgBrick has 1000 rows (73k ids 1 .. 1000); 2 of the study's 4 images are "
                           "beyond them, 73k ids: 2000, 73000")
    assert check_brick(p, names[:2], 16)[1] == [problems[0]]  # the same brick, the rule met

    for shape in ((100, 8, 8), (100, 8, 8, 4)):  # greyscale, RGBA
        q = write_brick(tmp_path / f"s{len(shape)}{shape[-1]}.hdf5", {}, shape=shape)
        assert check_brick(q, names[:1], 4)[1] == [
            f"{q}: imgBrick has shape {shape}; expected (images, height, width, 3) (NSD: (73000, 425, 425, 3))"]
    many = [nsd.image_name(i) for i in range(200, 215)]
    q = write_brick(tmp_path / "few.hdf5", {}, shape=(100, 8, 8, 3))
    assert check_brick(q, many, 4)[1][0].endswith(
        "15 of the study's 15 images are beyond them, 73k ids: 200, 201, 202, 203, 204, 205, 206, 207, 208, 209 "
        "... and 5 more")
