"""An LMDB of encoded images, as LSUN ships its scene categories (e.g. tower_train_lmdb/).

LSUN's databases map an image id (the key) to the encoded image bytes (WebP, or JPEG in older
copies). Records are read in key order, the order in which guided-diffusion's LSUN script
visits them, so max_images takes the same first images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import lmdb

from pipeline.data.base import (ImageBlock, ImageSource, RecordDigest, decode_blocks,
                                select_count)
from pipeline.errors import PipelineError


def is_lmdb(path: Path) -> bool:
    """A folder holding data.mdb, or an .mdb file itself."""
    return (path.is_dir() and (path / "data.mdb").is_file()) or (path.is_file() and path.suffix == ".mdb")


def _open_env(path: Path) -> lmdb.Environment:
    try:
        # Read-only without a lock file: the source may sit on a read-only medium.
        return lmdb.open(str(path), subdir=path.is_dir(), readonly=True, lock=False,
                         readahead=False, meminit=False, max_readers=4)
    except lmdb.Error as err:
        raise PipelineError(f"{path} is not a readable LMDB: {err}") from None


class LmdbSource(ImageSource):
    """Images stored as encoded bytes in an LMDB.

    :param expected_count: records the complete database must hold, or None (LSUN: whatever it
                           holds).
    :param workers: decoding processes.
    """

    kind = "lmdb"

    def __init__(self, dataset: str, path: Path, resolution: int, channels: int,
                 expected_count: int | None, max_images: int | None = None,
                 workers: int = 1) -> None:
        path = Path(path)
        with _open_env(path) as env:
            available = env.stat()["entries"]
        count = select_count(f"LMDB {path}", available, expected_count, max_images)
        self.workers = workers
        self._digest = RecordDigest()
        self._mode = "L" if channels == 1 else "RGB"
        preprocessing = (f"first {count} LMDB records in key order, decoded and converted to "
                         f"{self._mode}, resized like guided-diffusion's center_crop_arr (BOX "
                         f"halving while the short side >= 2x{resolution}, BICUBIC to "
                         f"{resolution}, centre crop)")
        super().__init__(dataset, path, count, resolution, channels, None, preprocessing)

    def _records(self) -> Iterator[tuple[str, bytes]]:
        with _open_env(self.path) as env, env.begin(buffers=False) as txn:
            cursor = txn.cursor()
            try:
                for position, (key, value) in enumerate(cursor):
                    if position == self.count:
                        return
                    self._digest.update(key, value)
                    yield f"{self.path} record {key.decode(errors='replace')!r}", value
            except lmdb.Error as err:
                raise PipelineError(f"{self.path} is corrupt: {err}") from None
        if self._digest.records < self.count:
            raise PipelineError(f"{self.path} ended after {self._digest.records:,} records, but its "
                                f"header announced {self.count:,}: truncated database.")

    def blocks(self) -> Iterator[ImageBlock]:
        for images in decode_blocks(self._records(), self.resolution, self._mode, self.workers):
            yield ImageBlock(images)

    def checksums(self) -> dict[str, Any]:
        return {self.path.name: {
            "sha256_of_records": self._digest.hexdigest(), "records": self._digest.records,
            "method": "sha256 over (key, value) of each record used, in key order, each part "
                      "preceded by its 8-byte little-endian length"}}
