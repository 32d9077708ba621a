"""A dataset added through an overlay only: a folder of PNGs in class subfolders and an NPZ file
go through prepare, train and sample as `python -m pipeline` stages, and Snakemake plans them.
Bad input (missing or empty folder, mixed image modes, a channel count that disagrees) stops in
one line naming the problem and the fix. The README's "Add a recipe" and "Add a dataset"
overlays validate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.config import DEFAULT_CONFIG, SCHEMA, deep_merge, load_config, read_yaml, validation_problems
from pipeline.data.sources import SOURCE_KINDS
from pipeline.errors import PipelineError
from pipeline.settings import config_problems

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circles", "squares", "stripes")


def make_class_folders(root: Path, per_class: int = 8) -> Path:
    """24 RGB PNGs of 24x20 pixels (not square, not the training size) in three class folders."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            image[..., label] = 255
            Image.fromarray(image).save(root / name / f"{i:02d}.png")
    return root


def make_npz(path: Path, count: int = 24, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(count, size, size), dtype=np.uint8)
    labels = np.arange(count) % 4
    np.savez(path, images=images, labels=labels)
    return images, labels


def dataset_overlay(tmp_path: Path) -> Path:
    """The overlay a user writes: two datasets, a tiny schedule, nothing else."""
    make_class_folders(tmp_path / "shapes")
    make_npz(tmp_path / "digits.npz")
    overlay = {
        "results": str(tmp_path / "results"),
        "device": "cpu",
        "datasets": {
            "shapes": {"kind": "image_folder", "channels": 3, "source": str(tmp_path / "shapes"),
                       "resolution": 16, "preset": "tiny", "batch_size": 4, "random_flip": True},
            "digits": {"kind": "array", "channels": 1, "source": str(tmp_path / "digits.npz"),
                       "resolution": 16, "preset": "tiny", "batch_size": 4, "random_flip": False},
        },
        "training": {"steps": 3, "log_every": 1, "checkpoint_every": 3, "threads_per_process": 1},
        "study": {"datasets": ["shapes", "digits"], "recipes": ["adm"], "seeds": [0], "averages": ["none"],
                  "precisions": ["fp32"], "sampling_steps": [5], "metrics": []},
        "sampling": {"n_samples": 4, "batch_size": 4, "chunk_size": 4},
        "fid": {"extractor": "effnet-lite0", "reference_images": 8},
        "report": {"selection": {"n_samples": 4}, "negative_control": {"recipe": "adm", "seeds": []},
                   "sam_selection": "best_fid_5"},
    }
    path = tmp_path / "my-datasets.yaml"
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return path


def stage(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stderr[-3000:]}"
    return result


def test_overlay_dataset_runs_prepare_train_sample_and_is_planned(tmp_path):
    overlay = dataset_overlay(tmp_path)
    configs = ["--config", str(DEFAULT_CONFIG), "--config", str(overlay)]
    results = tmp_path / "results"
    assert config_problems(load_config([DEFAULT_CONFIG, overlay])) == []

    for dataset, shape, labels in (("shapes", (24, 16, 16, 3), CLASSES), ("digits", (24, 16, 16, 1), None)):
        stage("prepare", "--dataset", dataset, *configs, "--workers", "1", "--no-progress")
        with h5py.File(results / dataset / "data.h5") as f:
            assert f["images"].shape == shape and f["images"].dtype == np.uint8
            assert f["labels"].shape == (24,)
            if labels is not None:  # class folders, in sorted order
                np.testing.assert_array_equal(f["labels"][...], np.repeat(np.arange(3), 8))
        stage("train", "--dataset", dataset, "--recipe", "adm", *configs, "--no-progress")
        weights = results / dataset / "adm" / "seed0" / "weights_raw.pt"
        assert weights.is_file()
        out = tmp_path / f"{dataset}_samples.h5"
        stage("sample", "--weights", str(weights), "--dataset", dataset, "--steps", "5", *configs,
              "--out", str(out), "--no-progress")
        with h5py.File(out) as f:
            assert f["images"].shape == (4, *shape[1:])

    # The folder's images were 24x20: resized and centre-cropped to 16x16, each keeping its class colour.
    with h5py.File(results / "shapes" / "data.h5") as f:
        images = f["images"][...].astype(float)
    for label in range(3):
        assert images[label * 8:(label + 1) * 8, ..., label].mean() > 240

    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--configfile", str(overlay)],
                         cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
    planned = dry.stdout + dry.stderr
    for dataset in ("shapes", "digits"):
        assert f"{results}/{dataset}/data.h5" in planned
        assert f"{results}/{dataset}/adm/seed0/weights_raw.pt" in planned


def test_undeclared_dataset_says_how_to_declare_it(tmp_path, capsys):
    assert cli_main(["train", "--dataset", "mnist", "--recipe", "adm", "--config", str(DEFAULT_CONFIG)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "dataset 'mnist' is not declared: add an entry datasets.mnist" in err and "overlay" in err
    # Declared in an overlay, the same command gets past the config: it now wants the prepared data.
    overlay = tmp_path / "mnist.yaml"
    overlay.write_text(yaml.safe_dump({"results": str(tmp_path / "r"), "datasets": {"mnist": {
        "kind": "fashion_mnist_idx", "channels": 1, "source": str(tmp_path), "resolution": 16,
        "preset": "tiny", "batch_size": 4, "random_flip": False}}}))
    assert cli_main(["train", "--dataset", "mnist", "--recipe", "adm", "--config", str(DEFAULT_CONFIG),
                     "--config", str(overlay)]) == 2
    assert "mnist/data.h5 does not exist; run `python -m pipeline prepare --dataset mnist`" in capsys.readouterr().err


def prepare_error(capsys, tmp_path: Path, entry: dict) -> str:
    """prepare's one-line error for a dataset `custom` declared by `entry` in an overlay."""
    overlay = tmp_path / "bad.yaml"
    full = {"kind": "image_folder", "channels": 3, "resolution": 16, "preset": "tiny", "batch_size": 4,
            "random_flip": False, **entry}
    overlay.write_text(yaml.safe_dump({"results": str(tmp_path / "r"), "datasets": {"custom": full}}))
    status = cli_main(["prepare", "--dataset", "custom", "--config", str(DEFAULT_CONFIG), "--config", str(overlay),
                       "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "r" / "custom" / "data.h5").exists()
    return err


def test_bad_folders_and_arrays_are_one_line_with_the_fix(tmp_path, capsys):
    err = prepare_error(capsys, tmp_path, {"source": str(tmp_path / "nowhere")})
    assert "datasets.custom.source (or --source)" in err and "does not exist" in err
    assert "set datasets.custom.source to its path" in err

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    err = prepare_error(capsys, tmp_path, {"source": str(tmp_path / "empty")})
    assert "holds no image files" in err and "point datasets.custom.source at the folder" in err

    mixed = make_class_folders(tmp_path / "mixed", per_class=2)
    Image.new("L", (20, 20), 128).save(mixed / "circles" / "gray.png")
    err = prepare_error(capsys, tmp_path, {"source": str(mixed)})
    assert re.search(r"mixes image modes: 1 grayscale \(e\.g\. circles/gray\.png\) and 6 colour", err)
    assert "convert them all to one mode" in err

    err = prepare_error(capsys, tmp_path, {"source": str(tmp_path / "mixed" / "squares"), "channels": 1})
    assert "are colour (3 channel(s)" in err and "datasets.custom.channels is 1; set channels: 3" in err

    make_npz(tmp_path / "gray.npz")
    err = prepare_error(capsys, tmp_path, {"kind": "array", "source": str(tmp_path / "gray.npz")})
    assert "have 1 channel(s) but datasets.custom.channels is 3; set channels: 1" in err

    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((2, 8, 8), np.uint8))
    err = prepare_error(capsys, tmp_path, {"kind": "array", "source": str(tmp_path / "wrong.npz")})
    assert "has no array 'images' (it holds: pixels)" in err

    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    err = prepare_error(capsys, tmp_path, {"kind": "array", "source": str(tmp_path / "float.npz")})
    assert "is float32; store uint8 pixels" in err


def test_hdf5_array_resized_like_images(tmp_path):
    from pipeline.data.sources import open_source

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 40, 32, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "set.h5", "w") as f:
        f["images"] = images
    entry = {"kind": "array", "channels": 3}
    source = open_source("custom", tmp_path / "set.h5", download_allowed=False, downloads_dir=tmp_path,
                         resolution=16, entry=entry)
    got = np.concatenate([block.images for block in source.blocks()])
    assert got.shape == (6, 16, 16, 3) and source.label_names is None
    # 40x32 -> BOX halving to 20x16, already 16 on the short side: the centre 16 rows.
    halved = images.astype(float).reshape(6, 20, 2, 16, 2, 3).mean(axis=(2, 4))
    assert np.abs(got - halved[:, 2:18]).max() <= 1


def test_schema_kinds_are_the_readers():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["definitions"]["dataset"]["properties"]["kind"]["enum"] == list(SOURCE_KINDS)
    config = read_yaml(DEFAULT_CONFIG)
    assert {entry["kind"] for entry in config["datasets"].values()} <= set(SOURCE_KINDS)


def readme_overlay(heading: str) -> dict:
    """The first ```yaml block under a README heading."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert blocks, f"no yaml block under '## {heading}'"
    return yaml.safe_load(blocks[0])


@pytest.mark.parametrize("heading", ["Add a recipe", "Add a dataset"])
def test_readme_overlays_validate(heading, tmp_path):
    overlay = readme_overlay(heading)
    for entry in overlay.get("datasets", {}).values():
        assert entry["source"] and not Path(entry["source"]).exists()
        entry["source"] = str(tmp_path)  # where the reader's data would be
    for base in (read_yaml(DEFAULT_CONFIG), deep_merge(read_yaml(DEFAULT_CONFIG), read_yaml(REPO / "config/demo.yaml"))):
        config = deep_merge(base, overlay)
        assert validation_problems(config) == []
        assert config_problems(config) == []
    assert set(overlay["study"]["datasets" if heading == "Add a dataset" else "recipes"]) - set(
        read_yaml(DEFAULT_CONFIG)["datasets" if heading == "Add a dataset" else "recipes"])


def test_open_source_reads_config_entries_when_none_given(tmp_path):
    with pytest.raises(PipelineError, match="dataset 'mnist' is not declared"):
        from pipeline.data.sources import open_source

        open_source("mnist", tmp_path, download_allowed=False, downloads_dir=tmp_path, resolution=16)


def test_flat_folder_has_no_labels_and_subfolders_can_be_told_apart(tmp_path):
    from pipeline.data.sources import open_source

    folders = make_class_folders(tmp_path / "classes", per_class=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(folders.rglob("*.png")):
        path.rename(flat / f"{path.parent.name}_{path.name}")
    entry = {"kind": "image_folder", "channels": 3}
    source = open_source("custom", flat, download_allowed=False, downloads_dir=tmp_path, resolution=16, entry=entry)
    assert source.count == 6 and source.label_names is None
    # count: the size the source must hold, as for the official datasets.
    with pytest.raises(PipelineError, match="holds 6 images but the official training set has 7"):
        open_source("custom", flat, download_allowed=False, downloads_dir=tmp_path, resolution=16,
                    entry={**entry, "count": 7})
