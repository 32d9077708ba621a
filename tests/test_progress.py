"""Progress in the logs: without a terminal, long loops write plain timestamped lines to stderr,
every stage's summary goes there too, and training keeps a status.json in its run folder."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import progress
from pipeline.cli import main as cli_main
from pipeline.errors import PipelineError
from pipeline.io.integrity import save_torch, sealed_h5
from pipeline.nn.presets import build_unet
from pipeline.stages.train import STATUS_FILE, WEIGHTS
from test_fidelity import TINY, blobs, isolated_torch_home, run_cli, write_prepared  # noqa: F401 (a fixture)
from test_train import data_h5, tiny_settings  # noqa: F401 (data_h5 is a fixture)

REPO = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"  # the timestamp that starts every log line
DUR = r"\d[\dhms]*"  # a duration: 4s, 3m05s, 2h07m


def run_stage(*argv: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` with stderr a pipe (not a terminal), as under Snakemake."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(progress.INTERVAL_VARIABLE, None)
    done = subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def lines_matching(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.fullmatch(pattern, line)]


# ------------------------------------------------------------------------------------------
# The reporter.

def count_lines(caplog, every: float, updates: int, **kwargs) -> list[str]:
    logger = logging.getLogger("pipeline.test_progress")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        with progress.Progress(logger, "loop", updates, "draws", every=every, **kwargs) as bar:
            for _ in range(updates):
                bar.update(1, loss=0.5)
    return [record.getMessage() for record in caplog.records]


def test_plain_lines_come_first_every_interval_and_last(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    every_update = count_lines(caplog, every=0, updates=10)
    assert len(every_update) == 10
    assert every_update[0].startswith("loop: draws 1/10 (10%), loss 0.5, ")
    assert re.fullmatch(r"loop: draws 10/10 \(100%\), loss 0\.5, [\d.,e+]+ draws/s, elapsed \d+s, ETA 0s",
                        every_update[-1])
    # An hour apart: only the first unit and the last are reported.
    sparse = count_lines(caplog, every=3600, updates=10)
    assert [line.split(",")[0] for line in sparse] == ["loop: draws 1/10 (10%)", "loop: draws 10/10 (100%)"]
    # A loop that stops early (a converged estimate) still reports where it stopped.
    logger = logging.getLogger("pipeline.test_progress")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        with progress.Progress(logger, "power", 100, "iterations", every=3600) as bar:
            for _ in range(7):
                bar.update(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "power: iterations 1/100 (1%)", "power: iterations 7/100 (7%)"]


def test_a_terminal_gets_a_bar_and_no_lines_unless_no_progress(caplog, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert count_lines(caplog, every=0, updates=5) == []
    assert "5/5" in terminal.getvalue()  # tqdm drew its bar there
    assert len(count_lines(caplog, every=0, updates=5, bar=False)) == 5  # --no-progress
    assert count_lines(caplog, every=0, updates=5, enabled=False) == []  # another DDP process


def test_durations_and_interval_settings(monkeypatch):
    assert [progress.duration(s) for s in (0, 59.4, 185, 7620, 3 * 86400 + 4 * 3600, float("inf"))] == [
        "0s", "59s", "3m05s", "2h07m", "3d04h", "?"]
    monkeypatch.delenv(progress.INTERVAL_VARIABLE, raising=False)
    assert progress.interval_from_environment() == progress.DEFAULT_INTERVAL == 30
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "2.5")
    assert progress.interval_from_environment() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(progress.INTERVAL_VARIABLE, bad)
        with pytest.raises(PipelineError, match=progress.INTERVAL_VARIABLE):
            progress.interval_from_environment()


def test_a_negative_interval_is_refused_with_exit_2(tmp_path, capsys):
    assert cli_main(["quantize", "--weights", str(tmp_path / "w.pt"), "--precision", "int8",
                     "--out", str(tmp_path / "q.pt"), "--progress-every", "-1"]) == 2
    assert "--progress-every must be a number of seconds >= 0" in capsys.readouterr().err
    progress.configure(progress.DEFAULT_INTERVAL)


# ------------------------------------------------------------------------------------------
# Stages run as Snakemake runs them: stderr to a file, --no-progress.

def test_train_logs_progress_and_summary_and_keeps_a_status_file(data_h5, tmp_path):  # noqa: F811
    settings = tiny_settings("adm", steps=6)
    argv = ["train", "--dataset", "fashion_mnist", "--recipe", "adm", "--seed", "3",
            "--settings", json.dumps(settings), "--data", str(data_h5), "--out-dir", str(tmp_path / "cli"),
            "--no-progress", "--progress-every", "0"]

    # Interrupted at step 3: the checkpoint's status says how far the run is.
    first = run_stage(*argv, "--stop-after", "3")
    status = json.loads((tmp_path / "cli" / STATUS_FILE).read_text())
    assert status["state"] == "running" and (status["step"], status["total"]) == (3, 6)
    assert status["steps_per_second"] > 0 and status["eta_seconds"] > 0 and status["loss"] > 0
    assert "stopped after 3 steps of this call (--stop-after) at step 3/6" in first.stderr

    # Resumed to the end.
    done = run_stage(*argv)
    assert done.stdout == ""
    steps = lines_matching(done.stderr, rf"{STAMP} train adm: steps (\d)/6 \(\d+%\), loss [\d.e-]+, "
                                        rf"[\d.,e+]+ steps/s, elapsed {DUR}, ETA {DUR}")
    assert [re.search(r"steps (\d)/6", line).group(1) for line in steps] == ["4", "5", "6"]
    assert lines_matching(done.stderr, rf"{STAMP} train adm: 6 steps done \(3 in this call, .*\), final loss "
                                       rf".*; wrote weights_raw\.pt, weights_ema\.pt, weights_swa\.pt and "
                                       rf"train\.h5 in .*")
    assert lines_matching(done.stderr, rf"{STAMP} train: finished in {DUR}")
    status = json.loads((tmp_path / "cli" / STATUS_FILE).read_text())
    assert set(status) == {"state", "step", "total", "loss", "steps_per_second", "eta_seconds", "eta",
                           "updated_at"}
    assert (status["state"], status["step"], status["total"], status["eta_seconds"]) == ("finished", 6, 6, 0)
    updated = datetime.datetime.fromisoformat(status["updated_at"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - updated).total_seconds()) < 600

    # Logging changes no output: the same bytes as an uninterrupted run that logs nothing. Both in
    # subprocesses, so that both use the same torch thread count (the test process's may have been
    # changed by earlier tests, and float sums depend on it).
    quiet = [a if a != str(tmp_path / "cli") else str(tmp_path / "plain") for a in argv]
    run_stage(*quiet[:-2], "--progress-every", "3600")
    for name in WEIGHTS.values():
        a = torch.load(tmp_path / "cli" / name, weights_only=True)
        b = torch.load(tmp_path / "plain" / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with h5py.File(tmp_path / "cli" / "train.h5") as f, h5py.File(tmp_path / "plain" / "train.h5") as g:
        for key in ("loss", "mse", "vb", "grad_norm", "lr"):
            np.testing.assert_array_equal(f[key][...], g[key][...])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """Random tiny-preset weights (nonzero output) and 12 RGB 16x16 training images."""
    folder = tmp_path_factory.mktemp("progress")
    model = build_unet("tiny", in_channels=3)
    g = torch.Generator().manual_seed(2)
    state = {name: t + 0.05 * torch.randn(t.shape, generator=g) for name, t in model.state_dict().items()}
    save_torch(state, folder / "weights.pt")
    images = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    with sealed_h5(folder / "data.h5") as f:
        f.create_dataset("images", data=images)
    return folder / "weights.pt", folder / "data.h5"


def test_sample_logs_images_and_summary(tiny_model, tmp_path):
    weights, _ = tiny_model
    settings = {"dataset": "test", "preset": "tiny", "resolution": 16, "device": "cpu",
                "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True},
                "n_samples": 4, "batch_size": 2, "chunk_size": 2, "seed": 0}
    out = tmp_path / "samples.h5"
    done = run_stage("sample", "--weights", str(weights), "--dataset", "test", "--steps", "2",
                     "--settings", json.dumps(settings), "--out", str(out), "--no-progress",
                     "--progress-every", "0")
    assert done.stdout == "" and out.is_file()
    lines = lines_matching(done.stderr, rf"{STAMP} sample T'=2: images ([24])/4 \(\d+%\), [\d.,e+]+ images/s, "
                                        rf"elapsed {DUR}, ETA {DUR}")
    assert [re.search(r"images (\d)/4", line).group(1) for line in lines] == ["2", "4"]
    assert lines_matching(done.stderr, rf"{STAMP} sample: 4 images at T'=2 \(2 chunk\(s\) computed now\) -> "
                                       rf"{re.escape(str(out))}, .*grid\.png")
    assert lines_matching(done.stderr, rf"{STAMP} sample: finished in {DUR}")


def test_lpf_logs_loss_evaluations_and_its_results(tiny_model, tmp_path):
    weights, data = tiny_model
    out = tmp_path / "lpf.h5"
    done = run_stage("lpf", "--weights", str(weights), "--data", str(data), "--preset", "tiny",
                     "--out", str(out), "--device", "cpu", "--config", str(REPO / "config.yaml"),
                     "--draws", "2", "--n-eval", "4", "--batch-size", "4", "--sigma-sweep",
                     "--no-progress", "--progress-every", "0")
    assert done.stdout == "" and out.is_file()
    # L(theta), then 2 draws for each of the 2 scalings at the one sigma.
    lines = lines_matching(done.stderr, rf"{STAMP} lpf 2 draws x 1 sigmas x 2 scalings: loss evaluations "
                                        rf"(\d)/5 \(\d+%\), [\d.,e+]+ loss evaluations/s, elapsed {DUR}, ETA {DUR}")
    assert len(lines) == 5
    (summary,) = lines_matching(done.stderr, rf"{STAMP} lpf: wrote {re.escape(str(out))} in {DUR}: .*")
    with h5py.File(out) as f:
        assert f"lpf {float(f['lpf'][()]):.5g}" in summary and f"sigma {float(f['sigma'][()]):.5g}" in summary


def test_fd_stages_log_images_replicates_and_summaries(tmp_path, monkeypatch, capsys):
    """fid-reference, calibration-samples and fid in-process, stderr captured (not a terminal)."""
    data = write_prepared(tmp_path / "data.h5", blobs(40, seed=0))
    reference = tmp_path / "fid_ref_tiny.h5"
    every = ["--no-progress", "--progress-every", "0"]
    assert run_cli(["fid-reference", "--data", str(data), "--extractor", TINY, "--batch-size", "10",
                    "--kid-rows", "20", "--out", str(reference), *every], monkeypatch) == 0
    err = capsys.readouterr().err
    assert len(lines_matching(err, rf"{STAMP} FD-{TINY} features: images 40/40 \(100%\), .* images/s, .*")) == 1
    assert lines_matching(err, rf"{STAMP} fid-reference: wrote {re.escape(str(reference))}: .* in [\d.]+ s")

    samples = tmp_path / "static" / "samples.h5"
    assert run_cli(["calibration-samples", "--data", str(data), "--kind", "static", "--n", "30", "--seed", "3",
                    "--out", str(samples), "--progress-every", "0"], monkeypatch) == 0  # no bar to turn off
    err = capsys.readouterr().err
    assert len(lines_matching(err, rf"{STAMP} calibration-samples static: images \d+/30 \(\d+%\), .*")) == 30
    assert lines_matching(err, rf"{STAMP} calibration-samples: 30 static images \(.*\) -> {re.escape(str(samples))}")

    out = tmp_path / "fid.h5"
    settings = json.dumps({"extractor": TINY, "inception_weights": None, "reference_images": None,
                           "batch_size": 10, "kid_rows": 20,
                           "bootstrap": {"fd_replicates": 4, "kid_replicates": 0, "seed": 0}})
    assert run_cli(["fid", "--samples", str(samples), "--reference", str(reference), "--out", str(out),
                    "--settings", settings, "--kid-subsets", "2", *every], monkeypatch) == 0
    err = capsys.readouterr().err
    # One chunk of rows (pipeline.fidelity.stats.CHUNK_ROWS) holds all 30 images.
    assert len(lines_matching(err, rf"{STAMP} FD-{TINY} features: images 30/30 \(100%\), .*")) == 1
    replicates = lines_matching(err, rf"{STAMP} fid FD-{TINY} bootstrap: replicates (\d)/4 .*ETA {DUR}")
    assert [re.search(r"replicates (\d)/4", line).group(1) for line in replicates] == ["1", "2", "3", "4"]
    with h5py.File(out) as f:
        value = float(f.attrs["value"])
    assert lines_matching(err, rf"{STAMP} fid: wrote {re.escape(str(out))}: FD-{TINY} = {value:.4f}, KID = .*")
    assert lines_matching(err, rf"{STAMP} fid: finished in {DUR}")
    progress.configure(progress.DEFAULT_INTERVAL)
