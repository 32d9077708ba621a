"""Does a training step ever wait on data? Loader images/s vs demo training-step images/s.

    .venv/bin/python bench/data_loader.py [--data results/fashion_mnist/data.h5] [--repeats 5]

Reads results/fashion_mnist/data.h5 when it exists, else builds a synthetic 60,000 x 32x32x1 set
in a temporary folder. The loader figure is the median over repeats of 200 batches of 32; the
training figure (when pipeline.nn.presets exists) is the median over repeats of one full step of
the "demo" UNet (forward, hybrid loss, backward, AdamW) at batch 32 on this machine's device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.loader import TrainingBatches  # noqa: E402
from pipeline.io.integrity import seal_h5  # noqa: E402

BATCH = 32


def synthetic_image_set(folder: Path) -> Path:
    """60,000 random 32x32x1 uint8 images laid out like a prepared data.h5."""
    path = folder / "synthetic.h5"
    images = np.random.default_rng(0).integers(0, 256, size=(60_000, 32, 32, 1), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(64, 32, 32, 1), compression="gzip",
                         compression_opts=4)
        seal_h5(f)  # readers refuse a data.h5 without its checksums
    return path


def loader_images_per_second(path: Path, repeats: int, steps: int = 200) -> float:
    batches = TrainingBatches(path, batch_size=BATCH, seed=0)
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for step in range(r * steps, (r + 1) * steps):
            batches.batch(step)
        rates.append(steps * BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


def train_step_images_per_second(channels: int, repeats: int) -> float | None:
    try:
        from pipeline.nn.presets import build_unet
    except ModuleNotFoundError as err:
        if err.name != "pipeline.nn.presets":
            raise
        return None
    from pipeline.diffusion.gaussian import create_diffusion

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_unet("demo", in_channels=channels).to(device)
    diffusion = create_diffusion(steps=1000, learn_sigma=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(BATCH, channels, 32, 32, device=device) * 2 - 1

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (BATCH,), device=device)
        loss = diffusion.training_losses(model, x, t, torch.randn_like(x))["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocations, lazy inits
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        rates.append(BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="results/fashion_mnist/data.h5")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.data)
        label = str(path)
        if not path.is_file():
            path, label = synthetic_image_set(Path(tmp)), "synthetic 60,000 x 32x32x1"
        with h5py.File(path, "r") as f:
            channels = f["images"].shape[-1]
        loader = loader_images_per_second(path, args.repeats)
        print(f"loader: {loader:,.0f} images/s ({label}, batch {BATCH})")
    train = train_step_images_per_second(channels, args.repeats)
    if train is None:
        print("demo training step: unavailable (pipeline.nn.presets not present)")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"demo training step: {train:,.1f} images/s (batch {BATCH}, {device})")
    print(f"ratio loader / training step: {loader / train:,.0f}x")


if __name__ == "__main__":
    main()
