"""What the five measure stages (lpf, perturbation, surface, hessian, exposure) share.

Settings of a measure resolve in three layers, later winning: the built-in defaults of the stage
(the method spec's values), the merged config's `metrics.<name>` block, and command-line flags.
The network is described by, in this order: --preset (with the config's diffusion), the train.h5
written beside the weights by the train stage, or the config entry of --dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml

from pipeline.arguments import add_config_arguments, nonnegative_int, path_name, positive_int
from pipeline.config import section
from pipeline.data.hdf5 import read_info
from pipeline.errors import PipelineError
from pipeline.device import resolve_device
from pipeline.flatness.model_setup import ModelSettings, load_model
from pipeline.flatness.weights import num_elements, parameter_norm, trainable_parameters
from pipeline.nn.channels_last_norm import channels_last_inference
from pipeline.nn.forward_compile import CompilePolicy, apply_policy
from pipeline.io import provenance, write_attrs
from pipeline.io.integrity import open_verified_h5, sealed_h5
from pipeline.progress import Progress, duration
from pipeline.settings import read_settings

SUPPRESS = argparse.SUPPRESS
OPTIONAL_FLAGS = ("data", "dataset", "preset", "device")
SUMMARY_SCALARS = 8  # the closing log line quotes at most this many scalar results
# Measures whose forwards run without autograd. On the CPU they run the UNet channels-last with
# ChannelsLastGroupNorm, as sampling does (fmnist16, one thread: 0.82x the NCHW forward's time at
# batch 500, 0.89x at 128). The Hessian's double backward would take PyTorch's slow channels-last
# GroupNorm backward, so it stays NCHW.
INFERENCE_MEASURES = ("lpf", "perturbation", "surface", "exposure")

logger = logging.getLogger(__name__)


def add_common_arguments(parser: argparse.ArgumentParser, name: str, loss_based: bool = True) -> None:
    """Flags every measure stage takes. Metric flags default to "not given" so config can fill them."""
    # SUPPRESS keeps "(default: None)" out of the help; prepare() fills the missing attributes.
    parser.add_argument("--weights", required=True, default=SUPPRESS, help="weights file (a plain state_dict)")
    parser.add_argument("--out", required=True, default=SUPPRESS, help="output HDF5 file")
    parser.add_argument("--data", default=SUPPRESS,
                        help="prepared data.h5 (default: {results}/{dataset}/data.h5)")
    parser.add_argument("--dataset", type=path_name, default=SUPPRESS,
                        help="dataset name: the config entry that names the UNet preset")
    add_config_arguments(parser, "a config slice (pipeline.settings.MetricSettings)",
                         reads=f"settings are read from metrics.{name}")
    parser.add_argument("--preset", default=SUPPRESS,
                        help="UNet preset, overriding train.h5 beside the weights and the dataset's entry")
    parser.add_argument("--device", default=SUPPRESS, help="auto | cpu | cuda (default: config 'device')")
    parser.add_argument("--seed", type=nonnegative_int, default=SUPPRESS,
                        help="seed of the evaluation set and the random directions/probes (built-in 0)")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, default=SUPPRESS,
                        help="images per forward pass; every random draw is independent of it (built-in 256)")
    if loss_based:
        parser.add_argument("--terms", choices=("mse+vb", "mse"), default=SUPPRESS,
                            help="loss terms: the hybrid training loss or the eps-MSE alone "
                                 "(built-in mse+vb; mse when sigma is not learned)")
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines, no bar")


@dataclasses.dataclass
class MeasureContext:
    """Everything a measure stage needs after resolution."""

    name: str
    settings: dict[str, Any]
    model_settings: ModelSettings
    model_source: str
    model: torch.nn.Module
    device: torch.device
    data_path: Path
    data_shape: tuple[int, int, int, int]
    progress: bool
    started: float
    compile_policy: CompilePolicy = dataclasses.field(default_factory=CompilePolicy)
    forward_compiled: bool = False

    def compile_forward(self, image_forwards: int, batch_size: int) -> None:
        """Compile the model's forward if config forward_compile says a job of `image_forwards`
        images pays (batch_size: the loop's full batch)."""
        self.forward_compiled = apply_policy(self.model, self.compile_policy, self.device, image_forwards,
                                             batch_size, self.image_shape, self.name)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        _, height, width, channels = self.data_shape
        return channels, height, width

    def bar(self, total: int, desc: str, unit: str = "loss evaluations") -> Progress:
        return Progress(logger, f"{self.name} {desc}", total, unit, bar=self.progress)


def resolve_settings(args: argparse.Namespace, name: str, defaults: Mapping[str, Any],
                     config: Mapping[str, Any]) -> dict[str, Any]:
    """defaults <- config metrics.<name> <- flags given on the command line."""
    block = (config.get("metrics") or {}).get(name) or {}
    unknown = set(block) - set(defaults)
    if unknown:
        raise PipelineError(f"config metrics.{name} has unknown keys {sorted(unknown)}; "
                            f"allowed: {sorted(defaults)}.")
    settings = {**defaults, **block}
    for key in defaults:
        if hasattr(args, key):
            settings[key] = getattr(args, key)
    return settings


def _train_settings_beside(weights: Path) -> dict[str, Any] | None:
    train_log = weights.parent / "train.h5"
    if not train_log.is_file():
        return None
    with open_verified_h5(train_log, "delete it and rerun the train rule") as f:
        text = f.attrs.get("settings_yaml")
    return yaml.safe_load(text) if text else None


def resolve_model_settings(args: argparse.Namespace, config: Mapping[str, Any],
                           in_channels: int) -> tuple[ModelSettings, str]:
    """The network's description and where it came from (recorded in the output)."""
    trained = _train_settings_beside(Path(args.weights))
    if args.preset:
        diffusion = (trained or {}).get("diffusion") or section(config, "training", "diffusion")
        return ModelSettings(args.preset, in_channels, dict(diffusion)), "--preset"
    if trained and "preset" in trained and "diffusion" in trained:
        return (ModelSettings(trained["preset"], in_channels, dict(trained["diffusion"])),
                str(Path(args.weights).parent / "train.h5"))
    if args.dataset:
        preset = section(config, "datasets", args.dataset, "preset")
        diffusion = section(config, "training", "diffusion")
        return ModelSettings(preset, in_channels, dict(diffusion)), f"config datasets.{args.dataset}"
    raise PipelineError("cannot tell which network the weights belong to: pass --preset or --dataset, "
                        "or keep the train stage's train.h5 beside the weights.")


def prepare(args: argparse.Namespace, name: str, defaults: Mapping[str, Any]) -> MeasureContext:
    """Resolve settings, read the data's shape, build the model and load the weights."""
    started = time.time()
    for optional in OPTIONAL_FLAGS:
        if not hasattr(args, optional):
            setattr(args, optional, None)
    settings_slice, merged = read_settings(args, name, dataset=args.dataset)
    config = settings_slice if merged is None else merged  # by hand: the whole config (results, ...)
    settings = resolve_settings(args, name, defaults, config)
    if "batch_size" in settings and int(settings["batch_size"]) < 1:
        raise PipelineError(f"batch_size must be >= 1, got {settings['batch_size']}.")
    if args.data:
        data_path = Path(args.data)
    elif args.dataset:
        data_path = Path(config.get("results", "results")) / args.dataset / "data.h5"
    else:
        raise PipelineError("pass --data (a prepared data.h5) or --dataset.")
    shape = tuple(int(s) for s in read_info(data_path)["shape"])
    model_settings, source = resolve_model_settings(args, config, in_channels=shape[3])
    device = resolve_device(args.device or config.get("device", "auto"))
    model = load_model(model_settings, args.weights, device, image_size=shape[1])
    if name in INFERENCE_MEASURES and device.type == "cpu":
        model = channels_last_inference(model)
    return MeasureContext(name=name, settings=settings, model_settings=model_settings, model_source=source,
                          model=model, device=device, data_path=data_path, data_shape=shape,
                          progress=not args.no_progress, started=started,
                          compile_policy=CompilePolicy.from_config(config.get("forward_compile")))


def write_results(ctx: MeasureContext, args: argparse.Namespace, arrays: Mapping[str, Any],
                  extra: Mapping[str, Any] | None = None) -> None:
    """Write `arrays` ("group/name" keys allowed) to --out atomically, with provenance attributes.

    The provenance settings hold the resolved measure settings, the network description, the
    input files and `extra` (loss terms, evaluation set, conventions).
    """
    params = trainable_parameters(ctx.model)
    settings = {
        ctx.name: ctx.settings,
        "model": {**ctx.model_settings.describe(), "source": ctx.model_source,
                  "num_parameters": num_elements(params)},
        "weights": str(Path(args.weights)),
        "data": str(ctx.data_path),
        "device": str(ctx.device),
        "forward_compiled": ctx.forward_compiled,
        **(extra or {}),
    }
    attrs = provenance(ctx.name, settings, wall_seconds=round(time.time() - ctx.started, 3),
                       parameter_norm=parameter_norm(params))
    for key, value in (extra or {}).items():
        if isinstance(value, (str, int, float, bool)):
            attrs[key] = value
    # Plain str, not str subclasses (torch.__version__ is one): h5py maps those to fixed-width
    # numpy unicode, which HDF5 cannot store.
    attrs = {key: str(value) if isinstance(value, str) else value for key, value in attrs.items()}
    refuse_non_finite(ctx.name, args.out, arrays)
    with sealed_h5(args.out) as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=np.asarray(value))
        write_attrs(f, attrs)
    scalars = [f"{key} {float(value):.5g}" for key, value in arrays.items()
               if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)]
    logger.info("%s: wrote %s in %s: %s", ctx.name, args.out, duration(time.time() - ctx.started),
                ", ".join(scalars[:SUMMARY_SCALARS]) or f"{len(arrays)} arrays")


def may_be_undefined(key: str) -> bool:
    """Results that are NaN by definition in a degenerate case: a spread over one draw (stderr,
    std) and radii relative to a zero parameter norm."""
    leaf = key.rsplit("/", 1)[-1]
    return leaf.endswith(("stderr", "_std")) or leaf == "relative_radii"


def refuse_non_finite(name: str, out: str | Path, arrays: Mapping[str, Any]) -> None:
    """:raises PipelineError: a result holds inf, or NaN where NaN means no more than "undefined"
    would not apply: such a file would carry a number that is not one."""
    for key, value in arrays.items():
        values = np.asarray(value)
        if not np.issubdtype(values.dtype, np.number):
            continue
        bad = np.isinf(values) if may_be_undefined(key) else ~np.isfinite(values)
        if bad.any():
            raise PipelineError(f"{name}: result '{key}' holds {int(bad.sum())} NaN or infinite value(s) "
                                f"of {values.size}, so {out} is not written; the model's outputs "
                                f"overflowed: check the weights (sample them) or lower the perturbation.")


def ticker(bar: Progress) -> Callable[[], None]:
    return lambda: bar.update(1)
