"""Paired bootstrap of FD and KID (pipeline.fidelity.bootstrap) and its place in the fid stage."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.fidelity import frechet_distance, kernel_distance, resolve_extractor
from pipeline.fidelity.bootstrap import (_symmetric_quadratic_forms, check_paired, fd_replicates, kid_replicates,
                                         polynomial_kernel, psd_sqrt, read_fid_replicates, resample_positions)
from pipeline.fidelity.stats import read_reference
from pipeline.stages.fid_reference import build_reference
from pipeline.stats import paired_bootstrap_difference
# The tiny registered extractor and image helpers of the fidelity tests (importing registers it).
from test_fidelity import TINY, blobs, isolated_torch_home, noise, run_cli, write_images  # noqa: F401


def reference_moments(dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim)


@pytest.mark.parametrize("n, dim", [(60, 8), (6, 10)])  # Gram of D x D and, for n < D, of n x n
def test_fd_replicate_equals_plain_frechet_distance_on_the_resample(n, dim):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(n, dim))
    mu_r, sigma_r = reference_moments(dim, rng)
    replicates = fd_replicates(x, mu_r, sigma_r, psd_sqrt(sigma_r), 4, seed=7)
    for b, value in enumerate(replicates):
        xb = x[resample_positions(n, 7, b, "samples")]
        expected = frechet_distance(xb.mean(axis=0), np.cov(xb, rowvar=False), mu_r, sigma_r)
        assert value == pytest.approx(expected, rel=1e-7, abs=1e-8)
    assert len(set(np.round(replicates, 8))) == 4


def test_psd_sqrt_squares_back_and_clips_rounding():
    rng = np.random.default_rng(1)
    _, sigma = reference_moments(5, rng)
    root = psd_sqrt(sigma)
    np.testing.assert_allclose(root @ root, sigma, atol=1e-12)
    np.testing.assert_allclose(root, root.T)
    v = rng.normal(size=(5, 1))
    assert np.isfinite(psd_sqrt(v @ v.T - 1e-15 * np.eye(5))).all()


def test_positions_depend_only_on_seed_replicate_stream_and_size():
    a = resample_positions(50, 3, 2, "samples")
    assert a.dtype == np.int64 and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, resample_positions(50, 3, 2, "samples"))
    assert not np.array_equal(a, resample_positions(50, 3, 2, "reference"))
    assert not np.array_equal(a, resample_positions(50, 3, 3, "samples"))
    assert not np.array_equal(a, resample_positions(50, 4, 2, "samples"))


def test_kid_point_value_is_torch_fidelitys_and_replicates_match_explicit_resamples():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.3, 1, (40, 6)), rng.normal(0.5, 1, (30, 6))
    value, reps = kid_replicates(x, y, 3, seed=5)
    same_size, _, _ = kernel_distance(x[:30].astype(np.float32), y.astype(np.float32), subsets=1,
                                      subset_size=30)
    assert kid_replicates(x[:30], y, 0, seed=5)[0] == pytest.approx(same_size, rel=1e-4)

    # Within-set means over pairs of distinct underlying rows: a row never pairs with itself.
    for b, replicate in enumerate(reps):
        ix, iy = resample_positions(40, 5, b, "samples"), resample_positions(30, 5, b, "reference")
        kx, ky = polynomial_kernel(x[ix], x[ix]), polynomial_kernel(y[iy], y[iy])
        dx, dy = ix[:, None] != ix[None, :], iy[:, None] != iy[None, :]
        expected = kx[dx].mean() + ky[dy].mean() - 2 * polynomial_kernel(x[ix], y[iy]).mean()
        assert replicate == pytest.approx(expected, rel=1e-10)
    off_x, off_y = ~np.eye(40, dtype=bool), ~np.eye(30, dtype=bool)
    assert value == pytest.approx(polynomial_kernel(x, x)[off_x].mean() + polynomial_kernel(y, y)[off_y].mean()
                                  - 2 * polynomial_kernel(x, y).mean(), rel=1e-10)


def test_kid_replicates_centre_near_zero_on_identical_distributions():
    rng = np.random.default_rng(3)
    x, y = np.abs(rng.normal(0.5, 1, (200, 16))), np.abs(rng.normal(0.5, 1, (200, 16)))
    value, reps = kid_replicates(x, y, 300, seed=0)
    # Centred on the estimate (a self-pair bias would put them ~2.4 sd above) and near 0.
    assert abs(reps.mean() - value) < 0.2 * reps.std()
    assert abs(reps.mean()) < 2 * reps.std()
    shifted_value, _ = kid_replicates(x + 0.5, y, 0, seed=0)
    assert shifted_value > reps.mean() + 5 * reps.std()


def test_paired_fd_difference_covers_the_true_difference():
    """Two models on shared x_T: model B = model A's features + a fixed shift of known FD effect."""
    rng = np.random.default_rng(4)
    dim, n, repetitions = 3, 150, 100
    mu_r, sigma_r = np.zeros(dim), np.eye(dim)
    root = psd_sqrt(sigma_r)
    shift = np.array([0.4, 0.0, 0.0])
    # With identity reference and population covariance I for both models, FD_B - FD_A = |mu + s|^2 - |mu|^2.
    mu = np.array([0.3, 0.0, 0.0])
    true_difference = float(((mu + shift) ** 2).sum() - (mu ** 2).sum())
    hits = 0
    for rep in range(repetitions):
        common = rng.normal(size=(n, dim))  # the shared starting noise makes the models correlated
        a = mu + common
        b = mu + shift + 0.8 * common + 0.6 * rng.normal(size=(n, dim))
        fd_a = frechet_distance(a.mean(0), np.cov(a, rowvar=False), mu_r, sigma_r)
        fd_b = frechet_distance(b.mean(0), np.cov(b, rowvar=False), mu_r, sigma_r)
        interval = paired_bootstrap_difference(fd_b, fd_replicates(b, mu_r, sigma_r, root, 100, rep),
                                               fd_a, fd_replicates(a, mu_r, sigma_r, root, 100, rep))
        hits += interval.contains(true_difference)
    assert 0.88 <= hits / repetitions <= 0.99


def test_fid_files_of_the_same_n_pair_up(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data.h5", blobs(80, seed=0))
    reference = build_reference(data, resolve_extractor(TINY), tmp_path / "fid_ref_tiny.h5",
                                kid_rows=50, batch_size=40)
    ref = read_reference(reference)
    np.testing.assert_allclose(ref.sigma_sqrt @ ref.sigma_sqrt, ref.stats.sigma, atol=1e-8)
    outs = {}
    for name, images in (("good", blobs(60, seed=9)), ("bad", noise(60))):
        samples = write_images(tmp_path / f"{name}.h5", images)
        outs[name] = tmp_path / f"fid_{name}.h5"
        settings = ('{"extractor": "%s", "inception_weights": null, "reference_images": null, "batch_size": 30, '
                    '"kid_rows": 40, "bootstrap": {"fd_replicates": 20, "kid_replicates": 30, "seed": 1}}' % TINY)
        assert run_cli(["fid", "--samples", str(samples), "--reference", str(reference), "--out",
                        str(outs[name]), "--settings", settings, "--no-progress"], monkeypatch) == 0
    good, bad = read_fid_replicates(outs["good"]), read_fid_replicates(outs["bad"])
    check_paired(good, bad)
    assert good.fd_replicates.shape == (20,) and good.kid_replicates.shape == (30,)
    with h5py.File(outs["good"]) as f:
        attrs = dict(f.attrs)
    assert attrs["bootstrap_seed"] == 1 and attrs["bootstrap_kid_sample_rows"] == 40
    assert attrs["bootstrap_kid_reference_rows"] == 50 and "left out" in attrs["bootstrap_fd_resampled"]
    for kept in ("value", "kid_value", "metric_name", "n_samples"):
        assert kept in attrs
    # torch-fidelity's subset KID is off unless asked for (fid.kid_subsets, --kid-subsets).
    assert attrs["kid_subsets"] == 0 and "kid_mean" not in attrs and "kid_std" not in attrs
    # The replicates scatter around the point values, and the paired difference is clearly positive.
    assert good.fd_replicates.min() < 1.5 * good.value and np.isfinite(good.kid_value)
    difference = paired_bootstrap_difference(bad.value, bad.fd_replicates, good.value, good.fd_replicates)
    assert difference.low > 0
    # A file of another N is not paired with these.
    samples = write_images(tmp_path / "small.h5", blobs(30, seed=9))
    small = tmp_path / "fid_small.h5"
    assert run_cli(["fid", "--samples", str(samples), "--reference", str(reference), "--out", str(small),
                    "--settings", settings, "--kid-subsets", "5", "--no-progress"], monkeypatch) == 0
    with pytest.raises(PipelineError, match="not paired: n_samples"):
        check_paired(good, read_fid_replicates(small))


def test_bootstrap_settings_reach_the_fid_stage_but_not_the_reference():
    from pipeline.config import load_config
    from pipeline.settings import stage_settings
    config = load_config(None)
    assert stage_settings(config, "fid")["bootstrap"] == {"fd_replicates": 50, "kid_replicates": 200, "seed": 0}
    reference = stage_settings(config, "fid_reference")
    assert "bootstrap" not in reference and reference["kid_rows"] == config["fid"]["kid_rows"]


@pytest.mark.parametrize("block_rows", [1, 3, 7, 40, 1024])
def test_symmetric_kernel_blocks_give_the_full_quadratic_forms(block_rows):
    # Only blocks on and right of the diagonal are built; any block size must give w^T K w.
    rng = np.random.default_rng(6)
    x = rng.normal(0.2, 1, (23, 5))
    weights = rng.integers(0, 3, (4, 23)).astype(float)
    full = np.einsum("wi,ij,wj->w", weights, polynomial_kernel(x, x), weights)
    np.testing.assert_allclose(_symmetric_quadratic_forms(x, weights, block_rows), full, rtol=1e-12)


def test_kid_reference_terms_give_the_fid_stage_the_same_bits(tmp_path, monkeypatch):
    """kid-reference computes the reference's share of the KID bootstrap once; a fid job reading it
    writes the numbers it computes alone, and refuses terms of another reference or bootstrap."""
    data = write_images(tmp_path / "data.h5", blobs(80, seed=0))
    reference = build_reference(data, resolve_extractor(TINY), tmp_path / "fid_ref_tiny.h5",
                                kid_rows=50, batch_size=40)
    samples = write_images(tmp_path / "good.h5", blobs(60, seed=9))

    def kid_reference(name: str, replicates: int, seed: int):
        out = tmp_path / name
        settings = '{"bootstrap": {"fd_replicates": 0, "kid_replicates": %d, "seed": %d}}' % (replicates, seed)
        assert run_cli(["kid-reference", "--reference", str(reference), "--out", str(out),
                        "--settings", settings], monkeypatch) == 0
        return out

    def fid(name: str, *flags: str) -> int:
        settings = ('{"extractor": "%s", "inception_weights": null, "reference_images": null, "batch_size": 30, '
                    '"kid_rows": 40, "bootstrap": {"fd_replicates": 3, "kid_replicates": 30, "seed": 1}}' % TINY)
        return run_cli(["fid", "--samples", str(samples), "--reference", str(reference), "--out",
                        str(tmp_path / name), "--settings", settings, "--no-progress", *flags], monkeypatch)

    terms = kid_reference("kid_ref_tiny.h5", 40, 1)  # more replicates than the job draws: a prefix serves
    with h5py.File(terms) as f:
        assert f["within"].shape == (41,) and f.attrs["bootstrap_seed"] == 1 and f.attrs["n_kid_rows"] == 50
    assert fid("alone.h5") == 0 and fid("shared.h5", "--kid-reference", str(terms)) == 0
    alone, shared = read_fid_replicates(tmp_path / "alone.h5"), read_fid_replicates(tmp_path / "shared.h5")
    assert shared.kid_value == alone.kid_value and np.array_equal(shared.kid_replicates, alone.kid_replicates)
    assert np.array_equal(shared.fd_replicates, alone.fd_replicates)

    for name, replicates, seed, problem in (("seed.h5", 30, 0, "seed 0"), ("few.h5", 20, 1, "holds 20 replicates")):
        with pytest.raises(PipelineError, match=problem):
            evaluate_with(tmp_path, samples, reference, kid_reference(name, replicates, seed))
    other = build_reference(data, resolve_extractor(TINY), tmp_path / "other" / "fid_ref_tiny.h5",
                            kid_rows=49, batch_size=40)
    with pytest.raises(PipelineError, match="another reference file"):
        evaluate_with(tmp_path, samples, other, terms)


def evaluate_with(tmp_path, samples, reference, terms):
    from pipeline.stages.fid import evaluate
    return evaluate(samples, reference, tmp_path / "refused.h5", kid_rows=40, fd_bootstrap=0, kid_bootstrap=30,
                    bootstrap_seed=1, kid_reference=terms)
