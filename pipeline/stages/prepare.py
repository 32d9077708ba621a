"""Prepare a dataset once: read its raw source, write {results}/{dataset}/data.h5.

The file holds uint8 N x H x W x C images (chunked, gzip), labels where the dataset has them, and
provenance attributes: source kind and path, preprocessing, resolution, count, checksums of what
was read. Sources and their defaults are set under `datasets:` in config.yaml; a missing,
corrupt or truncated source stops with one message saying what is wrong and how to fix it, and
leaves nothing half-written behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.arguments import add_config_arguments, path_name, positive_int
from pipeline.config import section
from pipeline.data.hdf5 import read_info, write_image_set
from pipeline.data.sources import dataset_entry, open_source
from pipeline.errors import PipelineError
from pipeline.io.provenance import provenance
from pipeline.settings import read_settings

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", type=path_name, required=True,
                        help="dataset to prepare (a key of config 'datasets': config.yaml's or an overlay's)")
    add_config_arguments(parser, "the datasets.<dataset> entry with its name (pipeline.settings.PrepareSettings)",
                         reads="datasets.<dataset> and results")
    parser.add_argument("--source", default=None, metavar="PATH",
                        help="raw data path; unset = config datasets.<dataset>.source")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                        help="download the official files when no source is found; unset = config "
                             "datasets.<dataset>.download")
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help="keep only the first N images; unset = config datasets.<dataset>.max_images")
    parser.add_argument("--out", default=None, metavar="H5",
                        help="output file; unset = {results}/{dataset}/data.h5")
    parser.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding image files (folder and LMDB sources)")
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines, no bar")


def prepare_settings(config: Mapping[str, Any], dataset: str, source: str | None = None,
                     download: bool | None = None, max_images: int | None = None) -> dict[str, Any]:
    """The settings of one prepare job: config datasets.<dataset> with command-line overrides,
    validated (types and ranges) before any data is touched."""
    data = dataset_entry(dataset, section(config, "datasets", dataset))
    settings = {
        "dataset": dataset,
        # The reader and what it checks: kind, channels, count, test_count, class_folders, obtain.
        **{key: data[key] for key in ("kind", "channels", "count", "test_count", "class_folders", "obtain")
           if key in data},
        "source": source if source is not None else data.get("source"),
        "download": download if download is not None else data.get("download", False),
        "resolution": section(config, "datasets", dataset, "resolution"),
        "max_images": max_images if max_images is not None else data.get("max_images"),
    }
    key = f"datasets.{dataset}"
    if settings["source"] is not None and not isinstance(settings["source"], str):
        raise PipelineError(f"{key}.source must be a path (string) or null, not {settings['source']!r}.")
    if not isinstance(settings["download"], bool):
        raise PipelineError(f"{key}.download must be true or false, not {settings['download']!r}.")
    resolution = settings["resolution"]
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise PipelineError(f"{key}.resolution must be an integer >= 8, not {resolution!r}.")
    max_images = settings["max_images"]
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise PipelineError(f"{key}.max_images (or --max-images) must be a positive integer or "
                            f"null, not {max_images!r}.")
    return settings


def run(args: argparse.Namespace) -> None:
    entry, config = read_settings(args, "prepare", dataset=args.dataset)
    if config is None:
        config = {"datasets": {args.dataset: {k: v for k, v in entry.items() if k != "dataset"}}}
        if args.out:  # {results}/{dataset}/data.h5
            config["results"] = str(Path(args.out).parent.parent)
    settings = prepare_settings(config, args.dataset, args.source, args.download, args.max_images)
    if args.workers < 1:
        raise PipelineError(f"--workers must be >= 1, not {args.workers}.")
    results = Path(config.get("results", "results"))
    out = Path(args.out) if args.out else results / args.dataset / "data.h5"

    start = time.perf_counter()
    source = open_source(args.dataset, settings["source"], download_allowed=settings["download"],
                         downloads_dir=results / "downloads", resolution=settings["resolution"],
                         max_images=settings["max_images"], workers=args.workers, entry=settings)
    attrs = provenance("prepare", settings)
    write_image_set(out, source, attrs, progress=not args.no_progress)
    logger.info(f"prepare: wrote {out} ({source.count:,} images of {source.resolution}x"
                f"{source.resolution}x{source.channels}, {read_info(out)['test_count']:,} held-out test "
                f"images, {out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
