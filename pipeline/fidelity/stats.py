"""Feature statistics of image sets, Fréchet distance and KID, all through torch-fidelity.

An image source is a uint8 array (N, H, W, C) or an `H5Images` (an HDF5 file and dataset name
holding the same layout), with C = 1 (repeated to 3 channels) or C = 3. HDF5 is read in chunks.

Features come from torch-fidelity's own extraction loop (`get_featuresdict_from_dataset`), which
has no on-disk cache, so features computed with other weights can never be read back. The
statistics are accumulated in float64 chunk by chunk, so N is bounded by time, not memory.

KID needs features, not moments. A reference therefore keeps the float32 features of a fixed
random subset of its rows (at most `kid_rows`, 10,000 by default, drawn with a seeded
torch.Generator); the samples side keeps the same. KID is torch-fidelity's polynomial-kernel
MMD over `subsets` random subsets of `subset_size` rows of each side. For the bootstrap
(pipeline.fidelity.bootstrap) the samples side can also keep every used row's features, and the
reference stores the symmetric square root of its covariance.

Reference file (results/{dataset}/fid_ref_{extractor}.h5):
    mu            float64 (D,)      mean feature of the images used
    sigma         float64 (D, D)    their covariance (ddof = 1, as numpy.cov)
    kid_features  float32 (K, D)    features of the KID subset
    kid_rows      int64 (K,)        which rows of the source those are
    sigma_sqrt    float64 (D, D)    symmetric PSD square root of sigma (FD bootstrap); older
                                    files lack it and get it computed when read
    attrs         extractor, metric_name, weights_sha256, feature_dim, n_images, image_height,
                  image_width, image_channels, torch_fidelity_version, ... (see the stage)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from pipeline.device import claim_gpu
from pipeline.errors import PipelineError
from pipeline.fidelity.bootstrap import psd_sqrt
from pipeline.fidelity.extractors import Extractor
from pipeline.io.integrity import open_verified_h5, sealed_h5
from pipeline.io.provenance import write_attrs
from pipeline.progress import Progress

logger = logging.getLogger(__name__)

# Rows read from HDF5 per chunk: about CHUNK_BYTES of images, and at most CHUNK_ROWS so that a
# chunk's float64 features (CHUNK_ROWS x 2048 x 8 bytes = 64 MiB for Inception) stay small too.
CHUNK_BYTES = 64 << 20
CHUNK_ROWS = 4096
REMAKE = "delete it and rerun the rule that makes it"
DEFAULT_KID_ROWS = 10_000


@dataclass(frozen=True)
class H5Images:
    """uint8 images (N, H, W, C) in dataset `dataset` of the HDF5 file `path`."""

    path: Path
    dataset: str = "images"


ImageSource = H5Images | np.ndarray


def image_shape(source: ImageSource) -> tuple[int, int, int, int]:
    """(N, H, W, C) of a source, after checking it is uint8 with 1 or 3 channels."""
    if isinstance(source, H5Images):
        path = Path(source.path)
        if not path.is_file():
            raise PipelineError(f"image file {path} does not exist.")
        try:
            with open_verified_h5(path, REMAKE) as f:
                if source.dataset not in f:
                    raise PipelineError(f"{path} has no dataset '{source.dataset}'; expected uint8 "
                                        f"images of shape (N, H, W, C).")
                images = f[source.dataset]
                shape, dtype, where = images.shape, images.dtype, f"{path}:{source.dataset}"
        except OSError as err:
            raise PipelineError(f"{path} is not a readable HDF5 file: {err}") from None
    else:
        shape, dtype, where = source.shape, source.dtype, "the image array"
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
        raise PipelineError(f"{where} must hold uint8 images of shape (N, H, W, C) with C = 1 or 3; "
                            f"found {dtype} {tuple(shape)}.")
    return tuple(int(s) for s in shape)


def select_rows(n: int, max_rows: int | None, generator: torch.Generator) -> np.ndarray:
    """Sorted indices of min(n, max_rows) rows, a uniform random subset drawn from `generator`."""
    if max_rows is None or max_rows >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(torch.randperm(n, generator=generator)[:max_rows].numpy()).astype(np.int64)


def reference_rows(n: int, max_images: int | None, seed: int) -> np.ndarray:
    """Sorted rows (at most max_images of n) whose features `feature_statistics(seed=seed,
    max_images=max_images)` uses: its generator's first draw. The calibration floor of a
    dataset without a test split avoids exactly these."""
    return select_rows(n, max_images, torch.Generator().manual_seed(seed))


def iter_image_chunks(source: ImageSource, rows: np.ndarray, chunk_rows: int
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, uint8 images (b, H, W, C)) for the sorted `rows`, reading in chunks.

    HDF5 is read as contiguous slices of `chunk_rows` rows and the wanted rows picked in memory:
    cheaper than point selection when many rows are wanted, and never all rows at once.
    """
    def chunks(array: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n = array.shape[0]
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                wanted = rows[lo:hi]
                yield wanted, np.asarray(array[start:stop])[wanted - start]

    if isinstance(source, H5Images):
        with open_verified_h5(source.path, REMAKE) as f:
            yield from chunks(f[source.dataset])
    else:
        yield from chunks(source)


def to_fidelity_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) -> uint8 (B, 3, H, W), as torch-fidelity extractors take it.

    Grayscale (C = 1) is repeated to three channels, the usual convention for FID of gray data.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class _TensorImages(Dataset):
    """A uint8 (B, 3, H, W) tensor as the map-style Dataset torch-fidelity iterates."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class RunningMoments:
    """Mean and covariance of feature rows added chunk by chunk, in float64.

    The rows are shifted by the first chunk's mean before the sums, so the final subtraction of
    n * mean mean^T does not cancel catastrophically when features have a large common offset.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        """features: (b, D) rows."""
        x = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        centred = x - self.shift
        self.n += x.shape[0]
        self.sum += centred.sum(axis=0)
        self.outer += centred.T @ centred

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """mu (D,) and sigma (D, D), sigma with ddof = 1 like numpy.cov."""
        if self.n < 2:
            raise PipelineError(f"a covariance needs at least 2 images; got {self.n}.")
        offset = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(offset, offset)) / (self.n - 1)
        return self.shift + offset, (sigma + sigma.T) / 2


@dataclass
class FeatureStats:
    """Feature moments of an image set plus the rows KID needs.

    mu: float64 (D,); sigma: float64 (D, D); n: images used; kid_features: float32 (K, D);
    kid_rows: int64 (K,) rows of the source whose features those are; features: float32 (n, D)
    of every used row in row order, only when asked for (keep_features=True), else None.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    kid_features: np.ndarray
    kid_rows: np.ndarray
    features: np.ndarray | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])


def feature_statistics(source: ImageSource, extractor: Extractor, *, max_images: int | None = None,
                       kid_rows: int = DEFAULT_KID_ROWS, batch_size: int = 64, seed: int = 0,
                       cuda: bool | None = None, progress: bool = False,
                       keep_features: bool = False) -> FeatureStats:
    """Features of (a seeded random subset of at most `max_images` of) a source's images.

    The extractor runs through torch-fidelity on the GPU when one is available (`cuda=None`).
    Returns the float64 moments of all used images and the float32 features of at most
    `kid_rows` of them, both subsets drawn from torch.Generator(seed). keep_features=True also
    returns every used row's float32 features (n x D x 4 bytes of memory).
    """
    n, height, width, channels = image_shape(source)
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        claim_gpu()  # torch-fidelity runs on the current device: make it a GPU no other job holds
    generator = torch.Generator().manual_seed(seed)
    rows = select_rows(n, max_images, generator)
    if rows.size < 2:
        raise PipelineError(f"feature statistics need at least 2 images; the source has {rows.size}.")
    keep = rows[select_rows(rows.size, kid_rows, generator)]

    network = extractor.build(cuda)
    moments = RunningMoments()
    kept: list[np.ndarray] = []
    every: list[np.ndarray] = []
    chunk_rows = max(batch_size, min(CHUNK_ROWS, CHUNK_BYTES // (height * width * channels)))
    with Progress(logger, f"{extractor.metric_name} features", int(rows.size), "images", bar=progress) as bar:
        for chunk_indices, images in iter_image_chunks(source, rows, chunk_rows):
            batch = _TensorImages(to_fidelity_images(images))
            features = get_featuresdict_from_dataset(batch, network, batch_size, cuda,
                                                     save_cpu_ram=True, verbose=False)
            features = features[extractor.feature_layer].double().numpy()
            if not np.isfinite(features).all():
                raise PipelineError(f"the '{extractor.name}' extractor produced non-finite features; "
                                    f"its weights ({extractor.weights_path}) are broken.")
            moments.add(features)
            kept.append(features[np.isin(chunk_indices, keep)].astype(np.float32))
            if keep_features:
                every.append(features.astype(np.float32))
            bar.update(len(chunk_indices))
    mu, sigma = moments.mean_and_covariance()
    return FeatureStats(mu, sigma, moments.n, np.concatenate(kept), keep,
                        np.concatenate(every) if keep_features else None)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), by torch-fidelity's own function."""
    stat1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    stat2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    if stat1["mu"].shape != stat2["mu"].shape:
        raise PipelineError(f"feature dimensions differ: {stat1['mu'].shape[0]} vs {stat2['mu'].shape[0]}.")
    return float(fid_statistics_to_metric(stat1, stat2, False)[KEY_METRIC_FID])


def kernel_distance(features1: np.ndarray, features2: np.ndarray, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """KID (mean, std over subsets, subset size used) by torch-fidelity's polynomial-kernel MMD.

    features: (K1, D) and (K2, D). The subset size is capped at the smaller side so that small
    runs still get a (noisier) value instead of an error.
    """
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise PipelineError(f"KID needs at least 2 feature rows per side; got {len(features1)} "
                            f"and {len(features2)}.")
    metric = kid_features_to_metric(torch.from_numpy(np.asarray(features1)),
                                    torch.from_numpy(np.asarray(features2)),
                                    kid_subsets=subsets, kid_subset_size=size, rng_seed=seed,
                                    verbose=False)
    return float(metric[KEY_METRIC_KID_MEAN]), float(metric[KEY_METRIC_KID_STD]), size


# ------------------------------------------------------------------------------------------
# Reference statistics files.

@dataclass
class Reference:
    """A reference file read back: its statistics and its attributes."""

    stats: FeatureStats
    attrs: dict[str, Any]
    sigma_sqrt: np.ndarray  # (D, D), psd_sqrt(stats.sigma)


def write_reference(path: str | Path, stats: FeatureStats, attrs: Mapping[str, Any]) -> None:
    """Write stats, psd_sqrt(sigma) and attrs to `path` atomically (layout: module docstring)."""
    sigma_sqrt = psd_sqrt(stats.sigma)
    with sealed_h5(path) as f:
        f.create_dataset("mu", data=stats.mu)
        f.create_dataset("sigma", data=stats.sigma)
        f.create_dataset("kid_features", data=stats.kid_features, chunks=True)
        f.create_dataset("kid_rows", data=stats.kid_rows)
        f.create_dataset("sigma_sqrt", data=sigma_sqrt)
        write_attrs(f, h5_safe_attrs(attrs))


def h5_safe_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Plain `str` for every str subclass (torch.__version__ is one), which h5py cannot store."""
    return {k: str(v) if isinstance(v, str) else v for k, v in attrs.items()}


REQUIRED_REFERENCE_ATTRS = ("extractor", "weights_sha256", "n_images", "image_height",
                            "image_width", "image_channels")


def read_reference(path: str | Path) -> Reference:
    """Read a file written by `write_reference`; anything missing -> PipelineError."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"reference statistics {path} do not exist; run "
                            f"`python -m pipeline fid-reference` first.")
    try:
        with open_verified_h5(path, "delete it and rerun `python -m pipeline fid-reference`") as f:
            missing = [k for k in ("mu", "sigma", "kid_features", "kid_rows") if k not in f]
            missing += [k for k in REQUIRED_REFERENCE_ATTRS if k not in f.attrs]
            if missing:
                raise PipelineError(f"{path} is not a fid-reference file (missing {', '.join(missing)}).")
            stats = FeatureStats(f["mu"][...], f["sigma"][...], int(f.attrs["n_images"]),
                                 f["kid_features"][...], f["kid_rows"][...])
            attrs = {k: _plain_attr(v) for k, v in f.attrs.items()}
            sigma_sqrt = f["sigma_sqrt"][...] if "sigma_sqrt" in f else psd_sqrt(stats.sigma)
    except OSError as err:
        raise PipelineError(f"{path} is not a readable HDF5 file: {err}") from None
    return Reference(stats, attrs, sigma_sqrt)


def _plain_attr(value: Any) -> Any:
    """HDF5 attribute -> str/int/float/bool/list, so it can be compared and dumped as JSON."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def h5_attrs(path: str | Path) -> dict[str, Any]:
    """The root attributes of an HDF5 file as plain Python values (for provenance records)."""
    with h5py.File(path, "r") as f:
        return {k: _plain_attr(v) for k, v in f.attrs.items()}
