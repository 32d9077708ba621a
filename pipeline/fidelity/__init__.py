"""Fréchet distances of image sets: feature extractors (Inception, EfficientNet-Lite0) and statistics."""

from pipeline.fidelity.extractors import (
    BUILTIN_EXTRACTORS,
    EFFNET_LITE0,
    INCEPTION,
    INCEPTION_WEIGHTS_NAME,
    Extractor,
    file_sha256,
    metric_name,
    register_builtin_extractors,
    resolve_extractor,
    resolve_inception_weights,
)
from pipeline.fidelity.stats import (
    FeatureStats,
    H5Images,
    Reference,
    feature_statistics,
    frechet_distance,
    image_shape,
    kernel_distance,
    read_reference,
    write_reference,
)

__all__ = [
    "BUILTIN_EXTRACTORS", "EFFNET_LITE0", "INCEPTION", "INCEPTION_WEIGHTS_NAME", "Extractor",
    "FeatureStats", "H5Images", "Reference", "feature_statistics", "file_sha256",
    "frechet_distance", "image_shape", "kernel_distance", "metric_name", "read_reference",
    "register_builtin_extractors", "resolve_extractor", "resolve_inception_weights",
    "write_reference",
]
