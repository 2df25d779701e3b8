"""CIFAR-10 for sCM: the training images from the official python batches or an image archive.

`load_cifar10(path)` returns every training image as uint8 [N, 3, 32, 32] and a description of the
source. It reads
  - the official python version: the folder `cifar-10-batches-py` (what torchvision's
    `CIFAR10(root, download=True)` leaves in root), a folder that holds it, or the archive
    `cifar-10-python.tar.gz` itself;
  - an image zip or folder laid out as `train/<class>/<name>.png|jpg` (any depth of folders; the
    images must be 32x32).
Whatever is missing or corrupt raises ImageDataError with one message that names it and says how
to get the data. `fid.py` beside this file holds the Inception features and the Frechet distance.
"""

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
HOW_TO_GET = (f"get the official python version with torchvision.datasets.CIFAR10(root, download=True) "
              f"(then pass root/cifar-10-batches-py) or from {CIFAR10_URL}")
BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SIZE = 32


class ImageDataError(ValueError):
    """Missing or unusable image data; the command line prints it as one line and exits with code 2."""


def load_cifar10(path):
    """(images uint8 [N, 3, 32, 32], description) from any of the layouts in the module docstring."""
    if not os.path.exists(path):
        raise ImageDataError(f"CIFAR-10 data not found at {path}; {HOW_TO_GET}")
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "cifar-10-batches-py")):
            if any(os.path.exists(os.path.join(folder, name)) for name in BATCH_NAMES):
                return _batches_from_folder(folder)
        return _images_from_folder(path)
    if zipfile.is_zipfile(path) or path.lower().endswith(".zip"):
        return _images_from_zip(path)
    if path.endswith((".tar.gz", ".tgz", ".tar")):
        return _batches_from_tar(path)
    raise ImageDataError(f"{path} is neither a folder, a zip of images nor the CIFAR-10 python archive "
                         f"(.tar.gz); {HOW_TO_GET}")

#----------------------------------------------------------------------------
# The official python batches: five pickled dicts with b"data", uint8 [n, 3072] (R, G, B planes).

class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch and nothing else: a pickle can run any code it names, so only the
    numpy classes that rebuild an array are allowed."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _decode_batch(raw, where):
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:
        raise ImageDataError(f"{where} is not a readable CIFAR-10 batch ({type(error).__name__}: {error}); "
                             f"the download may be corrupt: {HOW_TO_GET}") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIZE * SIZE:
        raise ImageDataError(f"{where} holds no uint8 image array of shape [N, 3072] under b'data'; "
                             f"the download may be corrupt: {HOW_TO_GET}")
    return data.reshape(-1, 3, SIZE, SIZE)


def _batches_from_folder(folder):
    missing = [name for name in BATCH_NAMES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ImageDataError(f"{folder} lacks {', '.join(missing)} of the CIFAR-10 training batches; {HOW_TO_GET}")
    parts = []
    for name in BATCH_NAMES:
        with open(os.path.join(folder, name), "rb") as file:
            parts.append(_decode_batch(file.read(), os.path.join(folder, name)))
    images = np.concatenate(parts)
    return images, f"CIFAR-10 python batches, {folder} ({len(images)} training images)"


def _batches_from_tar(path):
    try:
        with tarfile.open(path) as archive:
            members = {os.path.basename(m.name): m for m in archive.getmembers() if m.isfile()}
            missing = [name for name in BATCH_NAMES if name not in members]
            if missing:
                raise ImageDataError(f"{path} lacks {', '.join(missing)} of the CIFAR-10 training batches; {HOW_TO_GET}")
            parts = [_decode_batch(archive.extractfile(members[name]).read(), f"{path}:{name}") for name in BATCH_NAMES]
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ImageDataError(f"cannot read {path} as a tar archive ({type(error).__name__}: {error}); "
                             f"the download may be corrupt: {HOW_TO_GET}") from None
    images = np.concatenate(parts)
    return images, f"CIFAR-10 python archive {path} ({len(images)} training images)"

#----------------------------------------------------------------------------
# Image files in a zip or a folder.

def _decode_image(raw, where):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(raw)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageDataError(f"cannot decode image {where} ({type(error).__name__}: {error})") from None
    if pixels.shape != (SIZE, SIZE, 3):
        raise ImageDataError(f"image {where} is {pixels.shape[1]}x{pixels.shape[0]}, expected CIFAR-10's {SIZE}x{SIZE}")
    return pixels.transpose(2, 0, 1)


def _stack(images, where):
    if not images:
        raise ImageDataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {where}; {HOW_TO_GET}")
    return np.ascontiguousarray(np.stack(images))  # stacking [C, H, W] views of [H, W, C] keeps H, W, C order


def _images_from_zip(path):
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
            images = [_decode_image(archive.read(name), f"{path}:{name}") for name in names]
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ImageDataError(f"cannot read {path} as a zip archive ({type(error).__name__}: {error}); "
                             f"the file may be truncated") from None
    images = _stack(images, path)
    return images, f"image zip {path} ({len(images)} images)"


def _images_from_folder(folder):
    names = sorted(os.path.join(root, name) for root, _, files in os.walk(folder)
                   for name in files if name.lower().endswith(IMAGE_SUFFIXES))
    images = []
    for name in names:
        with open(name, "rb") as file:
            images.append(_decode_image(file.read(), name))
    images = _stack(images, folder)
    return images, f"image folder {folder} ({len(images)} images)"

#----------------------------------------------------------------------------
# Pixel statistics: the model sees (pixels / 255 - mean) * SIGMA_D / std.

def pixel_mean_std(images):
    """Mean and standard deviation of all pixel values in [0, 1] units, exact, from a histogram."""
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256) / 255
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    if std == 0:
        raise ImageDataError("every pixel of the data has the same value")
    return float(mean), float(std)


def save_image_grid(path, images, columns=8, pad=2):
    """Writes uint8 images [N, 3, H, W] (numpy or torch) as one PNG grid, `columns` images a row."""
    from PIL import Image
    images = np.asarray(images.cpu() if hasattr(images, "cpu") else images)
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = np.full((c, rows * (h + pad) + pad, columns * (w + pad) + pad), 255, np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[:, top:top + h, left:left + w] = image
    Image.fromarray(grid.transpose(1, 2, 0)).save(path, format="PNG")
