"""The CIFAR-10 loaders on a tiny generated CIFAR in every layout, with every kind of bad input, and
the FID code against closed forms: the Frechet distance of Gaussians, FID(x, x) = 0, TensorFlow 1's
bilinear resize, the Inception input range, and the checksum that guards the Inception file."""

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch

import image_data
from image_data import ImageDataError, fid

PER_BATCH = 3  # images per generated batch; the real ones hold 10000


def tiny_cifar(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (5 * PER_BATCH, 3, 32, 32), dtype=np.uint8)


def batch_bytes(images):
    return pickle.dumps({b"batch_label": b"tiny", b"labels": [0] * len(images),
                         b"data": images.reshape(len(images), -1)})


def png_bytes(image_chw):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


def write_batches(folder, images):
    folder.mkdir(parents=True)
    for i, name in enumerate(image_data.BATCH_NAMES):
        (folder / name).write_bytes(batch_bytes(images[i * PER_BATCH:(i + 1) * PER_BATCH]))
    return folder


def write_tar(path, images):
    with tarfile.open(path, "w:gz") as archive:
        for i, name in enumerate(image_data.BATCH_NAMES):
            raw = batch_bytes(images[i * PER_BATCH:(i + 1) * PER_BATCH])
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return path


def write_zip(path, images, extra=None):
    with zipfile.ZipFile(path, "w") as archive:
        for i, image in enumerate(images):  # names sort in the order of the images
            archive.writestr(f"train/c/{i:04d}.png", png_bytes(image))
        for name, raw in (extra or {}).items():
            archive.writestr(name, raw)
    return path


def test_every_layout_gives_the_same_images(tmp_path):
    images = tiny_cifar()
    batches = write_batches(tmp_path / "root" / "cifar-10-batches-py", images)
    folder = tmp_path / "folder" / "train" / "c"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        (folder / f"{i:04d}.png").write_bytes(png_bytes(image))
    sources = {"batches folder": batches, "its parent": tmp_path / "root",
               "tar.gz": write_tar(tmp_path / "cifar-10-python.tar.gz", images),
               "zip": write_zip(tmp_path / "train.zip", images), "image folder": tmp_path / "folder"}
    for name, path in sources.items():
        loaded, description = image_data.load_cifar10(str(path))
        assert loaded.dtype == np.uint8 and loaded.flags.c_contiguous, name
        np.testing.assert_array_equal(loaded, images, err_msg=name)
        assert str(len(images)) in description


def _corrupt_pickle():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))
    return pickle.dumps({b"data": Evil()})


def _bad_folder(tmp_path, replace=None, drop=None):
    folder = write_batches(tmp_path / "cifar-10-batches-py", tiny_cifar())
    if drop:
        (folder / drop).unlink()
    for name, raw in (replace or {}).items():
        (folder / name).write_bytes(raw)
    return folder


BAD_INPUTS = {
    "missing path": (lambda tmp: tmp / "nowhere", "not found"),
    "batch folder lacks a batch": (lambda tmp: _bad_folder(tmp, drop="data_batch_3"), "lacks data_batch_3"),
    "batch is not a pickle": (lambda tmp: _bad_folder(tmp, {"data_batch_2": b"garbage bytes"}), "not a readable"),
    "batch is truncated": (lambda tmp: _bad_folder(tmp, {"data_batch_1": batch_bytes(tiny_cifar()[:3])[:-40]}),
                           "not a readable"),
    "batch names code to run": (lambda tmp: _bad_folder(tmp, {"data_batch_4": _corrupt_pickle()}), "unexpected object"),
    "batch has the wrong shape": (lambda tmp: _bad_folder(tmp, {"data_batch_5": pickle.dumps({b"data": np.zeros((3, 100), np.uint8)})}),
                                  "[N, 3072]"),
    "tar is truncated": (lambda tmp: tmp.joinpath("c.tar.gz").write_bytes(write_tar(tmp / "t.tar.gz", tiny_cifar()).read_bytes()[:300])
                         and tmp / "c.tar.gz", "cannot read"),
    "tar lacks a batch": (lambda tmp: _tar_without(tmp, "data_batch_5"), "lacks data_batch_5"),
    "zip is truncated": (lambda tmp: tmp.joinpath("c.zip").write_bytes(write_zip(tmp / "t.zip", tiny_cifar()).read_bytes()[:500])
                         and tmp / "c.zip", "cannot read"),
    "zip holds no images": (lambda tmp: _zip_with({"train/readme.txt": b"hello"}, tmp), "no images"),
    "zip image undecodable": (lambda tmp: _zip_with({"train/c/0.png": b"not a png"}, tmp), "cannot decode"),
    "zip image not 32x32": (lambda tmp: _zip_with({"train/c/0.png": png_bytes(np.zeros((3, 28, 28), np.uint8))}, tmp),
                            "expected CIFAR-10's 32x32"),
    "empty folder": (lambda tmp: tmp.joinpath("empty").mkdir() or tmp / "empty", "no images"),
    "unknown file": (lambda tmp: tmp.joinpath("data.csv").write_text("1,2") and tmp / "data.csv", "neither"),
}


def _tar_without(tmp, missing):
    with tarfile.open(tmp / "cifar.tar.gz", "w:gz") as archive:
        for name in image_data.BATCH_NAMES:
            if name != missing:
                raw = batch_bytes(tiny_cifar()[:PER_BATCH])
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                archive.addfile(info, io.BytesIO(raw))
    return tmp / "cifar.tar.gz"


def _zip_with(members, tmp):
    with zipfile.ZipFile(tmp / "images.zip", "w") as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)
    return tmp / "images.zip"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_data_raises_one_line_naming_the_problem(tmp_path, case, capfd):
    make, expected = BAD_INPUTS[case]
    with pytest.raises(ImageDataError) as error:
        image_data.load_cifar10(str(make(tmp_path)))
    message = str(error.value)
    assert expected in message, message
    assert "\n" not in message
    if case in ("missing path", "batch folder lacks a batch", "batch is not a pickle", "zip holds no images"):
        assert "torchvision" in message and image_data.CIFAR10_URL in message  # how to get the data
    assert "must never run" not in capfd.readouterr().out


def test_pixel_statistics_are_exact():
    images = tiny_cifar()
    mean, std = image_data.pixel_mean_std(images)
    values = images.astype(np.float64) / 255
    assert mean == pytest.approx(values.mean(), abs=1e-12) and std == pytest.approx(values.std(), abs=1e-12)
    with pytest.raises(ImageDataError):
        image_data.pixel_mean_std(np.full((2, 3, 4, 4), 7, np.uint8))


def test_image_grid_places_each_image(tmp_path):
    from PIL import Image
    images = tiny_cifar()[:10]
    image_data.save_image_grid(tmp_path / "grid.png", torch.as_tensor(images), columns=4, pad=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png")).transpose(2, 0, 1)
    assert grid.shape == (3, 3 * 34 + 2, 4 * 34 + 2)
    np.testing.assert_array_equal(grid[:, 2 + 34:2 + 34 + 32, 2 + 2 * 34:2 + 2 * 34 + 32], images[6])

#----------------------------------------------------------------------------
# FID.

def gaussian_stats(rng, d):
    A = rng.standard_normal((d, d))
    return rng.standard_normal(d), A @ A.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    # 2x2 covariances that do not commute: tr (S1 S2)^(1/2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))),
    # since the two eigenvalues l1, l2 of S1 S2 satisfy (sqrt(l1) + sqrt(l2))^2 = l1 + l2 + 2 sqrt(l1 l2).
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.1, 0.4])
    S1, S2 = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])
    product = S1 @ S2
    trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * trace_sqrt
    assert fid.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(expected, rel=1e-12)
    # Diagonal covariances: sum of (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    assert fid.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)
    # Symmetric in its two arguments, on a 16-d pair.
    rng = np.random.default_rng(0)
    (m1, C1), (m2, C2) = gaussian_stats(rng, 16), gaussian_stats(rng, 16)
    assert fid.frechet_distance(m1, C1, m2, C2) == pytest.approx(fid.frechet_distance(m2, C2, m1, C1), rel=1e-10)


def test_fid_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(1)
    (m1, C1), (m2, C2) = gaussian_stats(rng, 8), gaussian_stats(rng, 8)
    x1 = rng.multivariate_normal(m1, C1, 200_000)
    x2 = rng.multivariate_normal(m2, C2, 200_000)
    estimate = fid.frechet_distance(*fid.feature_statistics(x1), *fid.feature_statistics(x2))
    assert estimate == pytest.approx(fid.frechet_distance(m1, C1, m2, C2), rel=0.02)


@pytest.mark.parametrize("n", [500, 20])  # 20 samples of 64 features: a rank-deficient covariance
def test_fid_of_features_with_themselves_is_zero(n):
    features = np.random.default_rng(2).standard_normal((n, 64)) * np.linspace(0.1, 3, 64)
    mu, sigma = fid.feature_statistics(features)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    shifted = fid.frechet_distance(mu + 0.5, sigma, mu, sigma)
    assert shifted == pytest.approx(64 * 0.25, rel=1e-6)


def test_statistics_cache_round_trip(tmp_path):
    mu, sigma = gaussian_stats(np.random.default_rng(3), 32)
    fid.save_statistics(tmp_path / "ref.npz", mu, sigma, "32 features")
    mu2, sigma2, description = fid.load_statistics(tmp_path / "ref.npz")
    assert description == "32 features"
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-6)  # float32 upper triangle, mirrored
    np.testing.assert_array_equal(sigma2, sigma2.T)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ImageDataError, match="cannot read FID reference"):
        fid.load_statistics(tmp_path / "bad.npz")


def test_resize_is_tensorflow_1_bilinear():
    # TF1's resize_bilinear (align_corners=False, no half-pixel centers) samples output pixel i at
    # input coordinate i * in / out, clamped at the last pixel. Reference in float64 numpy.
    rng = np.random.default_rng(4)
    image = rng.random((5, 7))
    size = 11

    def taps(n_in):
        src = np.arange(size) * n_in / size
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low

    (r0, r1, fr), (c0, c1, fc) = taps(5), taps(7)
    rows = image[r0] * (1 - fr)[:, None] + image[r1] * fr[:, None]
    expected = rows[:, c0] * (1 - fc) + rows[:, c1] * fc
    resized = fid.resize_tf_bilinear(torch.tensor(image)[None, None], size)[0, 0].numpy()
    np.testing.assert_allclose(resized, expected, atol=1e-12)


class SpyInception(torch.nn.Module):
    """Stands in for the Inception network: records its input, returns per-channel min and max."""

    def forward(self, x):
        self.seen = x
        return torch.cat([x.amin(dim=(2, 3)), x.amax(dim=(2, 3)), torch.zeros(len(x), 2042)], dim=1)


def test_features_see_299x299_inputs_in_tensorflow_range():
    images = np.zeros((3, 3, 32, 32), np.uint8)
    images[:2, :, :16] = 255
    images[2] = 64
    spy = SpyInception()
    features = fid.inception_features(spy, images, batch_size=2)
    assert features.shape == (3, 2048) and features.dtype == np.float64
    assert spy.seen.shape == (1, 3, 299, 299)  # the last of two batches
    # pixels / 128 - 1: 0 -> -1, 64 -> -0.5, 255 -> 0.9921875 (TF-Inception's input range)
    assert (features[:2, :3] == -1).all() and (features[:2, 3:6] == 127 / 128).all()
    np.testing.assert_allclose(features[2, :6], -0.5, atol=1e-6)


def test_inception_file_is_checked_before_it_is_loaded(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not see an unchecked file")
    monkeypatch.setattr(torch.jit, "load", refuse)
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the Inception network")
    with pytest.raises(ImageDataError, match="SHA-1") as error:
        fid.load_inception(str(fake))
    assert fid.INCEPTION_SHA1 in str(error.value) and fid.INCEPTION_WHEEL in str(error.value)
    with pytest.raises(ImageDataError, match="not found"):
        fid.load_inception(str(tmp_path / "missing.pt"))
