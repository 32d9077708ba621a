"""Calibration images for the FID-proxy: held-out real images (the floor) or pixel noise (static).

A model's FD means little alone; beside it the report shows the same metric for
* floor: N real images the reference never saw, against the same reference. With a test split
  in data.h5 ("test_images", Fashion-MNIST and CIFAR-10) they are a seeded subset of it. LSUN
  Tower and FFHQ have none, so the floor uses training images outside the reference subset
  (fid.reference_images of them, drawn by `fid-reference` with seed REFERENCE_SEED); when the
  reference uses every training image no image is held out and the stage stops. With fewer
  than N held-out images, all of them are used and `n` records how many.
* static: x ~ N(0, 1) per pixel (image i from its own generator, so N does not change the first
  images), clipped to [-1, 1] and mapped to uint8 by the sampler's own conversion.

Writes samples.h5 in the `sample` stage's format, so the `fid` stage evaluates it unchanged:
"images" uint8 (N, H, W, C); "seeds" int64 (N,) for static (image i's generator seed) or
"source_rows" int64 (N,) for floor (the rows of the data.h5 dataset named by the source_dataset
attribute); attributes kind, n, n_requested, seed, source, source_dataset, resolution, channels,
data (path), data_sha256 (`artifact_sha256`: the same for two identical prepare runs) and provenance.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.arguments import add_config_arguments, int_at_least, nonnegative_int, positive_int
from pipeline import seeding
from pipeline.data.hdf5 import TEST_IMAGES, open_image_set, read_rows
from pipeline.diffusion.sampler import to_uint8
from pipeline.errors import PipelineError
from pipeline.fidelity.stats import reference_rows, select_rows
from pipeline.io import provenance, write_attrs
from pipeline.io.integrity import artifact_sha256, sealed_h5
from pipeline.progress import Progress
from pipeline.settings import read_settings
from pipeline.stages.fid_reference import REFERENCE_SEED

logger = logging.getLogger(__name__)

KINDS = ("floor", "static")


def held_out_rows(n_train: int, reference_images: int | None, reference_seed: int = REFERENCE_SEED) -> np.ndarray:
    """Sorted training rows (of n_train) outside the FID reference subset.

    :raises PipelineError: when the reference uses every training image.
    """
    used = reference_rows(n_train, reference_images, reference_seed)
    if used.size >= n_train:
        raise PipelineError(
            f"the FID reference uses all {n_train:,} training images (fid.reference_images = "
            f"{reference_images}), so no held-out image is left for the calibration floor of a "
            f"dataset without a test split. Set fid.reference_images below {n_train:,} (e.g. "
            f"{max(2, n_train - n_train // 5):,}) to hold images out.")
    return np.setdiff1d(np.arange(n_train, dtype=np.int64), used)


def floor_images(data: Path, n: int, seed: int, reference_images: int | None,
                 reference_seed: int = REFERENCE_SEED) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """min(n, available) held-out real images: uint8 (m, H, W, C), their rows (m,) and attrs
    saying where they come from."""
    with open_image_set(data) as f:
        if TEST_IMAGES in f:
            dataset, pool = TEST_IMAGES, np.arange(f[TEST_IMAGES].shape[0], dtype=np.int64)
            source = f"test split of {data} ({pool.size:,} images)"
        else:
            dataset = "images"
            pool = held_out_rows(f["images"].shape[0], reference_images, reference_seed)
            source = (f"training images of {data} outside the FID reference subset "
                      f"(fid.reference_images = {reference_images}, seed {reference_seed}; "
                      f"{pool.size:,} held out; the dataset has no test split)")
        chosen = pool[select_rows(pool.size, n, _generator(seed))]
        images = read_rows(f[dataset], chosen)
    return images, chosen, {"source": source, "source_dataset": dataset}


def static_images(n: int, seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """n noise images uint8 (n, H, W, C) for shape (H, W, C), and their generator seeds (n,)."""
    height, width, channels = shape
    seeds = np.asarray([seeding.derive_seed(seed, i, stream="calibration") for i in range(n)], dtype=np.int64)
    images = np.empty((n, height, width, channels), dtype=np.uint8)
    with Progress(logger, "calibration-samples static", n, "images") as bar:
        for i, image_seed in enumerate(seeds.tolist()):
            x = torch.randn((1, channels, height, width), generator=torch.Generator().manual_seed(image_seed))
            # The same [-1, 1] range and uint8 conversion as a model's clipped samples.
            images[i] = to_uint8(x.clamp(-1, 1)).permute(0, 2, 3, 1)[0].numpy()
            bar.update(1)
    return images, seeds


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seeding.derive_seed(seed, stream="calibration"))


def write_calibration_samples(data: str | Path, kind: str, n: int, seed: int, out: str | Path, *,
                              reference_images: int | None = None, reference_seed: int = REFERENCE_SEED,
                              settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the calibration samples.h5 of `kind` to `out`; return its attributes (without provenance)."""
    data, out = Path(data), Path(out)
    if kind not in KINDS:
        raise PipelineError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    if n < 2:
        raise PipelineError(f"--n is {n}; an FD needs at least 2 images.")
    with open_image_set(data) as f:
        image_shape = tuple(int(s) for s in f["images"].shape[1:])
    if kind == "floor":
        images, rows, where = floor_images(data, n, seed, reference_images, reference_seed)
        extra = {"source_rows": rows}
    else:
        images, seeds = static_images(n, seed, image_shape)
        where = {"source": "N(0, 1) per pixel, clipped to [-1, 1], mapped to uint8 like model samples",
                 "source_dataset": ""}
        extra = {"seeds": seeds}
    if len(images) < 2:
        raise PipelineError(f"{data} holds only {len(images)} held-out image(s); an FD needs at least 2.")
    attrs = {"kind": kind, "n": int(len(images)), "n_requested": int(n), "seed": int(seed), **where,
             "resolution": image_shape[0], "channels": image_shape[2], "data": str(data),
             "data_sha256": artifact_sha256(data, "delete it and rerun prepare")}
    with sealed_h5(out) as f:
        f.create_dataset("images", data=images, chunks=(min(len(images), 256), *image_shape),
                         compression="gzip", compression_opts=4)
        for name, values in extra.items():
            f.create_dataset(name, data=values)
        # str() because h5py cannot store str subclasses such as torch.__version__.
        write_attrs(f, {key: str(value) if isinstance(value, str) else value
                        for key, value in {**provenance("calibration-samples", settings), **attrs}.items()})
    return attrs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data.h5 written by prepare")
    parser.add_argument("--kind", required=True, choices=KINDS,
                        help="floor: held-out real images; static: Gaussian noise mapped to pixels")
    parser.add_argument("--n", type=positive_int, required=True, help="images (as many as the models' samples: "
                                                             "sampling.n_samples)")
    parser.add_argument("--seed", type=nonnegative_int, required=True, help="seed of the image subset or the noise "
                                                                "(sampling.seed)")
    parser.add_argument("--out", required=True, help="samples.h5 to write")
    parser.add_argument("--reference-images", type=int_at_least(2), default=None,
                        help="floor without a test split: the reference's subset size (default: "
                             "fid.reference_images of --settings or the config files)")
    add_config_arguments(parser, "n, seed and, for floor, reference_images (pipeline.settings.CalibrationSettings)",
                         reads="fid.reference_images")


def run(args: argparse.Namespace) -> None:
    settings, _ = read_settings(args, f"calibration_{args.kind}")
    reference_images = (args.reference_images if args.reference_images is not None
                        else settings.get("reference_images"))
    settings = {**settings, "kind": args.kind, "n": args.n, "seed": args.seed}
    if args.kind == "floor":
        settings["reference_images"] = reference_images
    else:
        settings.pop("reference_images", None)  # noise does not depend on the reference
    attrs = write_calibration_samples(args.data, args.kind, args.n, args.seed, args.out,
                                      reference_images=reference_images, settings=settings)
    logger.info("calibration-samples: %d %s images (%s) -> %s", attrs["n"], args.kind, attrs["source"],
                args.out)
