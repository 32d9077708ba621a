"""Draw N images from a weights file with T' respaced ancestral DDPM steps; resumable in chunks.

Image i starts from its own x_T and draws its own per-step noise from a generator seeded with
seeding.derive_seed(seed, i, stream="sample"). Every model sampled with the same seed (fp32 or
int8, any recipe or average) therefore sees identical noise, and the result does not depend on
the batch size. The predicted x_0 is clipped to [-1, 1] at every step, as in ADM.

Images are computed in chunks of `chunk_size` (the last one may be shorter). Each finished chunk
is saved atomically into a scratch folder `.{out name}.chunks/` beside the output, together with
`run.json`, the settings that determine the pixels (weights SHA-256, preset, diffusion, T', N,
seed, chunk size). A rerun of the same command skips the chunks already there; a scratch folder
of another run is refused. When all chunks exist, the grid PNG and samples.h5 appear (each
atomically) and the scratch folder is removed.

samples.h5: "images" uint8 (N, H, W, C), "seeds" int64 (N,) (image i's generator seed), and
attributes steps, n, seed, weights (path), weights_sha256, preset, resolution, channels,
clip_denoised, chunk_size, diffusion (JSON), sampling_seconds (summed over all chunks and
resumes), device and provenance. The grid PNG shows the first min(64, N) images, 8 per row,
2 px apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image

from pipeline.arguments import add_config_arguments, nonnegative_int, path_name, positive_int
from pipeline import seeding
from pipeline.device import resolve_device
from pipeline.diffusion.gaussian import GaussianDiffusion, create_diffusion
from pipeline.diffusion.sampler import sample_images, to_uint8
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, provenance, write_attrs
from pipeline.io.integrity import DamagedFile, discard_if_damaged, seal_zip, sealed_h5, verify_zip
from pipeline.io.checkpoint import load_weights
from pipeline.nn.channels_last_norm import channels_last_inference
from pipeline.nn.forward_compile import CompilePolicy, apply_policy
from pipeline.nn.presets import build_unet
from pipeline.nn.unet import UNetModel
from pipeline.settings import read_settings
from pipeline.io.hashing import file_sha256
from pipeline.progress import Progress

FIRST_CONV = "input_blocks.0.0.weight"
LAST_CONV = "out.2.weight"
GRID_COLUMNS, GRID_IMAGES, GRID_PADDING = 8, 64, 2

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# Settings and the model.

def build_sampling_model(settings: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                         device: torch.device) -> UNetModel:
    """The preset's UNet holding `state_dict`, in eval mode on `device` (channels-last on CPU).

    Image channels are read from the weights (first conv: (model_channels, C, 3, 3)), so one
    preset serves RGB and grayscale datasets; the last conv must then have 2C outputs with
    learned sigma and C without.
    """
    if FIRST_CONV not in state_dict or LAST_CONV not in state_dict:
        raise PipelineError(f"the weights have no '{FIRST_CONV}' or '{LAST_CONV}'; they are not an ADM "
                            f"UNet state_dict with guided-diffusion key names.")
    channels = int(state_dict[FIRST_CONV].shape[1])
    learn_sigma = bool(settings["diffusion"]["learn_sigma"])
    expected_out = 2 * channels if learn_sigma else channels
    if int(state_dict[LAST_CONV].shape[0]) != expected_out:
        raise PipelineError(f"the weights output {state_dict[LAST_CONV].shape[0]} channels for {channels}-channel "
                            f"images, but learn_sigma={learn_sigma} needs {expected_out}; check "
                            f"training.diffusion.learn_sigma.")
    model = build_unet(settings["preset"], in_channels=channels, learn_sigma=learn_sigma)
    if model.image_size != int(settings["resolution"]):
        raise PipelineError(f"preset '{settings['preset']}' is built for {model.image_size}px images but the "
                            f"dataset's resolution is {settings['resolution']}px.")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise PipelineError(f"the weights do not fit preset '{settings['preset']}': {err}") from None
    model = model.to(device).eval()
    # oneDNN's convolutions run faster in NHWC; PyTorch's GroupNorm for NHWC does not, so ours
    # replaces it (fmnist16, batch 250, one thread: the forward takes 0.79-0.83x the time;
    # bench/group_norm.py).
    if device.type == "cpu":
        model = channels_last_inference(model)
    return model


def sampling_diffusion(settings: Mapping[str, Any], steps: int) -> GaussianDiffusion:
    """The training diffusion respaced to `steps` evenly spaced timesteps."""
    diffusion = settings["diffusion"]
    if not 1 <= steps <= int(diffusion["steps"]):
        raise PipelineError(f"--steps must be in 1..{diffusion['steps']} (the training diffusion's "
                            f"length), got {steps}.")
    return create_diffusion(steps=int(diffusion["steps"]), noise_schedule=diffusion["noise_schedule"],
                            learn_sigma=bool(diffusion["learn_sigma"]), timestep_respacing=str(steps))


def image_seeds(seed: int, start: int, stop: int) -> list[int]:
    """Generator seeds of images start..stop-1: a function of (seed, index) only."""
    return [seeding.derive_seed(seed, i, stream="sample") for i in range(start, stop)]


def sample_range(model: UNetModel, diffusion: GaussianDiffusion, seed: int, start: int, stop: int,
                 batch_size: int, image_size: int,
                 on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Images start..stop-1 as uint8 (stop - start, H, W, C), computed `batch_size` at a time.

    `on_batch(n)` is called after each batch of n images (progress bars).
    """
    channels = model.in_channels
    parts = []
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        x = sample_images(model, diffusion, (hi - lo, channels, image_size, image_size),
                          image_seeds(seed, lo, hi), clip_denoised=True)
        if not bool(torch.isfinite(x).all()):  # would become black pixels, then a finite FD
            raise PipelineError(f"sampling produced NaN or infinite pixels in images {lo}..{hi - 1}; "
                                f"nothing is written: the weights' outputs overflow, check or retrain them.")
        parts.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
        if on_batch is not None:
            on_batch(hi - lo)
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------
# The resumable stage.

def sample_to_file(settings: Mapping[str, Any], weights: str | Path, out: str | Path, grid: str | Path,
                   steps: int, progress: bool = True, stop_after_chunks: int | None = None) -> list[int]:
    """Sample settings["n_samples"] images from `weights` into `out` (samples.h5) and `grid` (PNG).

    `settings` holds preset, resolution, diffusion, device, n_samples, batch_size, chunk_size
    and seed (see pipeline.settings.SampleSettings). `stop_after_chunks` returns after computing that many
    chunks in this call without writing the outputs (tests use it to interrupt a run).

    :return: the indices of the chunks computed by this call (finished ones are skipped).
    """
    weights, out, grid = Path(weights), Path(out), Path(grid)
    n, chunk_size, seed = int(settings["n_samples"]), int(settings["chunk_size"]), int(settings["seed"])
    batch_size = int(settings["batch_size"])
    if min(n, chunk_size, batch_size) < 1:
        raise PipelineError("n_samples, chunk_size and batch_size must all be positive.")
    device = resolve_device(settings.get("device", "auto"))
    model = build_sampling_model(settings, load_weights(weights), device)
    diffusion = sampling_diffusion(settings, steps)
    image_size = int(settings["resolution"])
    # The whole job's work decides, not what a resumed run has left: every chunk takes one path.
    compiled = apply_policy(model, CompilePolicy.from_config(settings.get("forward_compile")), device,
                            n * int(steps), min(batch_size, chunk_size, n),
                            (model.in_channels, image_size, image_size), f"sample T'={steps}")

    # Only what changes the pixels identifies a run; batch size and device do not.
    run_key = {"weights_sha256": file_sha256(weights), "preset": settings["preset"],
               "resolution": image_size, "channels": model.in_channels,
               "diffusion": dict(settings["diffusion"]), "steps": int(steps), "n_samples": n,
               "seed": seed, "chunk_size": chunk_size, "clip_denoised": True,
               # compiled forwards move a pixel by at most one level: their chunks do not mix with eager ones
               "forward_compiled": compiled}
    scratch = out.parent / f".{out.name}.chunks"
    _open_scratch(scratch, run_key)

    chunks = [(c, c * chunk_size, min((c + 1) * chunk_size, n)) for c in range(math.ceil(n / chunk_size))]
    todo = [chunk for chunk in chunks if not _usable_chunk(_chunk_path(scratch, chunk[0]))]
    done_images = n - sum(stop - start for _, start, stop in todo)
    bar = Progress(logger, f"sample T'={steps}", n, "images", initial=done_images, bar=progress)
    computed = []
    for index, start, stop in todo:
        if stop_after_chunks is not None and len(computed) >= stop_after_chunks:
            bar.close()
            return computed
        began = time.perf_counter()
        images = sample_range(model, diffusion, seed, start, stop, batch_size, image_size, bar.update)
        _save_chunk(scratch, index, images, time.perf_counter() - began)
        computed.append(index)
    bar.close()

    attrs = provenance("sample", {**settings, "steps": int(steps)}, **run_key, n=n, weights=str(weights),
                       device=str(device))
    first_images = write_samples(out, scratch, chunks, (image_size, image_size, model.in_channels),
                                 np.asarray(image_seeds(seed, 0, n), dtype=np.int64), attrs)
    save_grid(first_images, grid)
    shutil.rmtree(scratch)
    return computed


def _open_scratch(scratch: Path, run_key: Mapping[str, Any]) -> None:
    """Create the scratch folder for `run_key`, or check that an existing one belongs to it."""
    key_path = scratch / "run.json"
    key_text = json.dumps(run_key, sort_keys=True, indent=1)
    if _read_run_key(key_path) == json.loads(key_text):
        return
    if scratch.exists():
        # Chunks of other weights or settings (say, the model was retrained), or of an unreadable
        # run.json, can never be reused.
        logger.warning("sample: discarding %s: its chunks belong to other weights or settings", scratch)
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    with atomic_path(key_path) as tmp:
        tmp.write_text(key_text)


def _read_run_key(key_path: Path) -> Any:
    """The settings a scratch folder belongs to, or None when run.json is missing or damaged."""
    try:
        return json.loads(key_path.read_text())
    except (OSError, ValueError):
        return None


def _chunk_path(scratch: Path, index: int) -> Path:
    return scratch / f"chunk_{index:06d}.npz"


def _save_chunk(scratch: Path, index: int, images: np.ndarray, seconds: float) -> None:
    # fsync before the rename: a finished chunk must survive a crash of the machine too.
    with atomic_path(_chunk_path(scratch, index)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, seconds=np.float64(seconds))
        seal_zip(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def _usable_chunk(path: Path) -> bool:
    """True for a chunk that exists and passes its checksum; a damaged one is deleted (with a
    warning) so that it is computed again, like a missing one."""
    return path.exists() and discard_if_damaged(path, lambda p: verify_zip(p, "it is recomputed"),
                                                lambda text: logger.warning("sample: %s", text))


def _read_chunk(path: Path, shape: tuple[int, ...], scratch: Path) -> tuple[np.ndarray, float]:
    """A chunk's uint8 images of the expected shape and its sampling seconds."""
    try:
        verify_zip(path, f"delete {scratch} to resample")
        with np.load(path) as chunk:
            images, seconds = chunk["images"], float(chunk["seconds"])
    except DamagedFile:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise PipelineError(f"{path} cannot be read ({err}); delete {scratch} to resample.") from None
    if images.shape != shape or images.dtype != np.uint8:
        raise PipelineError(f"{path} holds {images.dtype} images of shape {images.shape}, expected "
                            f"uint8 {shape}; delete {scratch} to resample.")
    return images, seconds


def write_samples(path: Path, scratch: Path, chunks: list[tuple[int, int, int]],
                  image_shape: tuple[int, int, int], seeds: np.ndarray,
                  attrs: Mapping[str, Any]) -> np.ndarray:
    """Assemble samples.h5 from the scratch chunks, one chunk in memory at a time.

    Writes "images" uint8 (N, H, W, C), chunked and compressed, "seeds" int64 (N,), `attrs` and
    sampling_seconds (the chunks' summed compute time). Returns the first min(64, N) images.
    """
    n = len(seeds)
    first, seconds = [], 0.0
    with sealed_h5(path) as f:
        images = f.create_dataset("images", shape=(n, *image_shape), dtype=np.uint8,
                                  chunks=(min(n, 256), *image_shape), compression="gzip", compression_opts=4)
        for index, start, stop in chunks:
            part, part_seconds = _read_chunk(_chunk_path(scratch, index), (stop - start, *image_shape), scratch)
            images[start:stop] = part
            seconds += part_seconds
            if start < GRID_IMAGES:
                first.append(part[:GRID_IMAGES - start])
        f.create_dataset("seeds", data=seeds)
        # str() because h5py cannot store str subclasses such as torch.__version__.
        write_attrs(f, {key: str(value) if isinstance(value, str) else value
                        for key, value in {**attrs, "sampling_seconds": seconds}.items()})
    return np.concatenate(first)


def save_grid(images: np.ndarray, path: str | Path, columns: int = GRID_COLUMNS,
              padding: int = GRID_PADDING) -> None:
    """A PNG of uint8 (n, H, W, C) images, `columns` per row on black, grayscale when C = 1.

    Size: width = c * W + (c + 1) * padding with c = min(columns, n); height likewise with
    ceil(n / columns) rows.
    """
    n, height, width, channels = images.shape
    cols, rows = min(columns, n), math.ceil(n / columns)
    canvas = np.zeros((rows * height + (rows + 1) * padding, cols * width + (cols + 1) * padding, channels),
                      dtype=np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        canvas[top:top + height, left:left + width] = image
    picture = Image.fromarray(canvas[..., 0], mode="L") if channels == 1 else Image.fromarray(canvas, mode="RGB")
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


# ------------------------------------------------------------------------------------------
# Command line.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="state_dict (.pt) of the variant to sample "
                                                         "(trained fp32 weights or a quantize output)")
    parser.add_argument("--dataset", type=path_name, required=True,
                        help="dataset name (sets preset, resolution, diffusion)")
    parser.add_argument("--steps", type=positive_int, required=True, help="respaced sampling steps T' (e.g. 20, 100)")
    add_config_arguments(parser, "the resolved settings (pipeline.settings.SampleSettings)",
                         reads="the dataset's entry, training.diffusion, device and sampling")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="number of images; None = config sampling.n_samples")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per model call; None = config "
                                                                     "sampling.batch_size")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="images per resumable chunk; None = config sampling.chunk_size")
    parser.add_argument("--seed", type=nonnegative_int, default=None, help="base seed of the per-image noise; None = "
                                                               "config sampling.seed")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda; None = config device")
    parser.add_argument("--out", required=True, help="samples.h5 to write")
    parser.add_argument("--grid", default=None, help="PNG grid of the first 64 images; None = "
                                                     "grid.png beside --out")
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines, no bar")


def run(args: argparse.Namespace) -> None:
    settings, _ = read_settings(args, "sample", dataset=args.dataset)
    overrides = {"n_samples": args.n, "batch_size": args.batch_size, "chunk_size": args.chunk_size,
                 "seed": args.seed, "device": args.device}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    out = Path(args.out)
    grid = Path(args.grid) if args.grid else out.parent / "grid.png"
    computed = sample_to_file(settings, args.weights, out, grid, args.steps, progress=not args.no_progress)
    logger.info("sample: %d images at T'=%d (%d chunk(s) computed now) -> %s, %s",
                settings["n_samples"], args.steps, len(computed), out, grid)
