"""benchmarks/digits_quality.py: the Frechet distance and the feature classifier it uses."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ROOT

_spec = importlib.util.spec_from_file_location("digits_quality", os.path.join(ROOT, "benchmarks", "digits_quality.py"))
dq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dq)


def _spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A random covariance A A^T / dim + I: eigenvalues in [1, ~5], well conditioned."""
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + np.eye(dim)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_frechet_two_by_two_closed_form(seed):
    """FD(N(m1, C1), N(m2, C2)) = |m1 - m2|^2 + tr C1 + tr C2 - 2 tr (C1^1/2 C2 C1^1/2)^1/2
    (Dowson and Landau 1982; Heusel et al. 2017 eq. 6). For 2x2 matrices the trace of the
    square root of a PSD M is sqrt(tr M + 2 sqrt(det M)), and tr M = tr(C1 C2), det M =
    det C1 det C2, which gives a closed form free of any matrix square root.

    Tolerance: the eigenvalues of C1 and of C1^1/2 C2 C1^1/2 are >= 1 here, so each square
    root has derivative <= 1/2, and float64 eigen-decompositions are backward stable to
    ~eps ||C||: errors are a few hundred eps times the traces (~10); 1e-10 is ample."""
    rng = np.random.default_rng(seed)
    m1, m2 = rng.standard_normal(2), rng.standard_normal(2)
    c1, c2 = _spd(rng, 2), _spd(rng, 2)
    trace_sqrt = np.sqrt(np.trace(c1 @ c2) + 2.0 * np.sqrt(np.linalg.det(c1) * np.linalg.det(c2)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * trace_sqrt
    assert dq.frechet_distance_gaussians(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-10, abs=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 16))
def test_frechet_commuting_covariances(seed, dim):
    """For covariances diagonal in the same basis (C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T) the
    FD is |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 (the 2-Wasserstein distance between
    Gaussians with commuting covariances). Eigenvalues in [1, 5]: tolerance as above."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a, b = rng.uniform(1.0, 5.0, dim), rng.uniform(1.0, 5.0, dim)
    m1, m2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = dq.frechet_distance_gaussians(m1, (q * a) @ q.T, m2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9 * dim)


def test_frechet_against_scipy_sqrtm():
    """The general formula with scipy.linalg.sqrtm (Schur-based) as an independent matrix
    square root, in 32 dimensions with non-commuting covariances."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal(32), rng.standard_normal(32)
    c1, c2 = _spd(rng, 32), _spd(rng, 32)
    s1 = scipy_linalg.sqrtm(c1).real
    cross = scipy_linalg.sqrtm(s1 @ c2 @ s1).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2.0 * cross)
    assert dq.frechet_distance_gaussians(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_frechet_of_a_set_with_itself_is_zero():
    """FD(X, X) = 0: equal means and C^1/2 C C^1/2 = C^2, whose square root has trace tr C.
    Cancellation leaves round-off of order eps tr C (tr C ~ 64 here)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) / 8.0
    assert abs(dq.frechet_distance(x, x)) < 1e-9 * np.trace(np.cov(x, rowvar=False))


@pytest.mark.slow
def test_classifier_accuracy_and_floor():
    """The feature classifier reaches > 0.9 accuracy on the 20 % held-out real digits in a few
    seconds, and in its feature space real held-out digits are far closer (FD) to the real
    training digits than uniform noise images are."""
    pytest.importorskip("sklearn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        x_train, y_train, x_test, y_test = dq.real_digits()
        model = dq.train_classifier(x_train, y_train)
        seconds = time.perf_counter() - start
        assert dq.accuracy(model, x_test, y_test) > 0.9
        assert seconds < 60.0  # a few seconds on a quiet machine; generous for a loaded one
        train_features = dq.features(model, x_train)
        floor = dq.frechet_distance(dq.features(model, x_test), train_features)
        noise = torch.rand(x_test.shape, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
        assert floor < 0.25 * dq.frechet_distance(dq.features(model, noise), train_features)
    finally:
        torch.set_num_threads(threads)
