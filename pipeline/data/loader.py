"""Training batches from data.h5: a pure function of (seed, step), split across processes.

Every draw belongs to a GLOBAL sample, never to a process:
* order: epoch e visits the N images in a permutation drawn from a generator seeded by
  (seed, e); the stream of epochs is cut into global batches, so global sample j of step s is
  position s * batch_size + j of that stream (a batch may straddle two epochs);
* flips: step s draws batch_size bits from a generator seeded by (seed, s), bit j flips
  global sample j horizontally (ADM's random_flip);
* rank r of world_size takes global samples [r * B_local, (r + 1) * B_local), B_local =
  batch_size // world_size.
So `batch(step)` needs no iteration state (resuming = asking for the step), and two processes
with b samples each see exactly what one process with 2b sees.

Images stay in memory as one uint8 array when they take at most `max_memory_bytes` (default
4 GiB: CIFAR-10 is 150 MB, FFHQ-64 0.86 GB; the full LSUN tower at 64x64, 8.7 GB, stays on
disk). Otherwise each batch's rows are read from the HDF5 file, and the next step's rows are
fetched in a background thread while the current step trains.

Gathering, flipping and scaling run in numpy, single-threaded on purpose: torch would spread
these tiny ops over its intra-op threads, which on a busy 2-core machine made the loader 20x
slower (5k vs 113k images/s) while the training step competes for the same cores.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.data.hdf5 import open_image_set, read_rows
from pipeline.errors import PipelineError

DEFAULT_MAX_MEMORY_BYTES = 4 << 30

# Stream ids for the loader's two kinds of draws (kept apart from pipeline.seeding's streams).
_ORDER_STREAM = 1001
_FLIP_STREAM = 1002


def _generator(seed: int, stream: int, counter: int) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, counter) through numpy's SeedSequence."""
    state = np.random.SeedSequence([int(seed), stream, int(counter)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


class TrainingBatches:
    """Random-order, randomly flipped training batches of a prepared image set.

    :param path: data.h5 written by `python -m pipeline prepare`.
    :param batch_size: the GLOBAL batch size (all processes together).
    :param seed: the training seed.
    :param random_flip: flip half the samples horizontally (guided-diffusion's default).
    :param rank: this process's index among `world_size` data-parallel processes.
    :param max_memory_bytes: keep the images in memory up to this size, else read from disk.
    """

    def __init__(self, path: str | Path, batch_size: int, seed: int, random_flip: bool = True,
                 rank: int = 0, world_size: int = 1,
                 max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise PipelineError(f"rank {rank} is not one of world_size {world_size} processes.")
        if batch_size < 1 or batch_size % world_size:
            raise PipelineError(f"batch_size {batch_size} must be a positive multiple of the "
                                f"{world_size} processes.")
        self.path = Path(path)
        self.batch_size = batch_size
        self.seed = seed
        self.random_flip = random_flip
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size

        with open_image_set(self.path) as f:
            images = f["images"]
            self.num_images, height, width, self.channels = images.shape
            if height != width:
                raise PipelineError(f"{self.path} holds {height}x{width} images; training wants squares.")
            self.image_size = height
            self.in_memory = images.size <= max_memory_bytes
            # (N, H, W, C) uint8; None when rows are read from disk per batch.
            self.images: np.ndarray | None = images[...] if self.in_memory else None
        if self.num_images == 0:
            raise PipelineError(f"{self.path} holds no images.")

        self._orders: dict[int, torch.Tensor] = {}
        self._file_pid: int | None = None
        self._file = None
        self._prefetch: dict[int, Future] = {}
        self._executor: ThreadPoolExecutor | None = None

    # --------------------------------------------------------------------------------------
    # The draws: pure functions of (seed, step).

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """(N,) int64: the permutation of image indices visited in `epoch`."""
        order = self._orders.get(epoch)
        if order is None:
            order = torch.randperm(self.num_images, generator=_generator(self.seed, _ORDER_STREAM, epoch))
            # A batch touches at most a few consecutive epochs; keep only the latest two.
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    def sample_indices(self, step: int) -> torch.Tensor:
        """(B_local,) int64: image indices of this process's samples at `step`."""
        start = step * self.batch_size + self.rank * self.local_batch_size
        positions = torch.arange(start, start + self.local_batch_size)
        epochs, offsets = positions // self.num_images, positions % self.num_images
        indices = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            indices[mask] = self.epoch_order(epoch)[offsets[mask]]
        return indices

    def flips(self, step: int) -> torch.Tensor:
        """(B_local,) bool: which of this process's samples are flipped at `step`."""
        if not self.random_flip:
            return torch.zeros(self.local_batch_size, dtype=torch.bool)
        bits = torch.randint(0, 2, (self.batch_size,), generator=_generator(self.seed, _FLIP_STREAM, step))
        start = self.rank * self.local_batch_size
        return bits[start:start + self.local_batch_size].bool()

    # --------------------------------------------------------------------------------------
    # The batch.

    def batch(self, step: int) -> torch.Tensor:
        """(B_local, C, H, W) float32 in [-1, 1] (x / 127.5 - 1) on the CPU for `step` >= 0."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # (B, H, W, C) uint8, a fresh array either way.
        if self.in_memory:
            images = self.images[self.sample_indices(step).numpy()]
        else:
            images = self._disk_rows(step)
        flips = self.flips(step).numpy()
        if flips.any():
            images[flips] = images[flips, :, ::-1]  # width is axis 2 of (B, H, W, C)
        x = images.transpose(0, 3, 1, 2).astype(np.float32, order="C")
        x /= 127.5
        x -= 1.0
        return torch.from_numpy(x)

    def _read(self, step: int) -> np.ndarray:
        if self._file is None or self._file_pid != os.getpid():
            # h5py handles must not cross a fork: each process opens its own.
            self._file, self._file_pid = open_image_set(self.path), os.getpid()
            self._executor, self._prefetch = ThreadPoolExecutor(max_workers=1), {}
        return read_rows(self._file["images"], self.sample_indices(step).numpy())

    def _disk_rows(self, step: int) -> np.ndarray:
        """Rows of `step` from disk, then start reading those of step + 1 in the background."""
        pending = self._prefetch.pop(step, None) if self._file_pid == os.getpid() else None
        images = pending.result() if pending is not None else self._read(step)
        for old in self._prefetch.values():
            old.cancel()
        self._prefetch = {step + 1: self._executor.submit(self._read, step + 1)}
        return images

    def close(self) -> None:
        """Release the HDF5 handle and the prefetch thread (disk mode); safe to call twice."""
        if self._executor is not None and self._file_pid == os.getpid():
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._file.close()
        self._file = self._executor = None
        self._prefetch = {}
