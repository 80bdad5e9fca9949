#!/usr/bin/env python
"""Sample quality on scikit-learn's 8x8 digits, with nothing downloaded.

Every number this script prints is measured when it runs; nothing is tabulated by hand.

A small MLP classifier (64 -> 128 -> 64 -> 10, SiLU) is trained on a fixed 80 % split of the
real digits (the ``digits`` data plugin, pixels in [-1, 1]) and its accuracy on the other
20 % is reported. Its 64-wide penultimate layer is the feature space for

a. the Frechet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule",
   eq. 6 -- FID with this classifier in place of Inception) between the Gaussians fitted to
   the features of generated and of real training digits:

       FD = |m1 - m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2),

   computed in float64 with symmetric eigen-decompositions (both square roots are of
   positive semi-definite matrices; tiny negative eigenvalues from round-off are clipped);
b. for conditional runs, label accuracy: the fraction of samples the classifier assigns to
   the label they were sampled with.

FD depends on the number of samples (the covariance estimate is biased), so generated sets
have the size of the held-out split by default, and the floor printed beside them is the FD
of the real held-out digits against the real training digits: a model cannot be expected to
beat it. (The diffusion runs train on all 1797 digits, so "held out" holds only for the
classifier.) Samples are clipped to [-1, 1] before they are classified.

Usage::

    python benchmarks/digits_quality.py runs/digits-unet [RUN_DIR ...]
    python benchmarks/digits_quality.py --grid --steps 400 --grid-dir runs/digits-grid
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import yaml
from torch import nn

import fundiff

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_RECIPE = os.path.join(HERE, os.pardir, "recipes", "digits-unet.yaml")
SPLIT_SEED = 0  # the permutation that splits the real digits into train / held-out
CLASSIFIER_SEED = 0
TEST_FRACTION = 0.2

# (parameterization, weighting) pairs of the grid: four parameterizations with min-snr,
# three weightings with v (v / min-snr is shared).
GRID = (
    ({"name": "eps"}, {"name": "min-snr", "gamma": 5.0}),
    ({"name": "x0"}, {"name": "min-snr", "gamma": 5.0}),
    ({"name": "v"}, {"name": "min-snr", "gamma": 5.0}),
    ({"name": "edm"}, {"name": "min-snr", "gamma": 5.0}),
    ({"name": "v"}, {"name": "eps-mse"}),
    ({"name": "v"}, {"name": "edm"}),
)


# --------------------------------------------------------------------------------------
# Frechet distance


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (eigenvalues clipped at 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_gaussians(m1, c1, m2, c2) -> float:
    """Frechet (2-Wasserstein squared) distance between N(m1, C1) and N(m2, C2), float64:
    |m1 - m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2) (Dowson and Landau 1982)."""
    m1, m2 = np.asarray(m1, np.float64), np.asarray(m2, np.float64)
    c1, c2 = np.asarray(c1, np.float64), np.asarray(c2, np.float64)
    s1 = _sqrt_psd(c1)
    cross = s1 @ c2 @ s1
    cross_values = np.clip(np.linalg.eigvalsh((cross + cross.T) / 2.0), 0.0, None)
    value = float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * np.sum(np.sqrt(cross_values)))
    return max(value, 0.0)


def frechet_distance(features_a, features_b) -> float:
    """FD between the Gaussians fitted (mean, unbiased covariance) to two feature sets (N, D)."""
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    return frechet_distance_gaussians(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------------------
# Real digits and the feature classifier


def real_digits(registry: Optional[fundiff.Registry] = None):
    """(x_train, y_train, x_test, y_test): the digits plugin's data, split 80/20 by a fixed
    permutation."""
    registry = registry or fundiff.Registry.discover()
    data = registry.build("data", "digits").load()
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(data.x.shape[0], generator=generator)
    n_test = int(round(TEST_FRACTION * data.x.shape[0]))
    test, train = order[:n_test], order[n_test:]
    return data.x[train], data.labels[train], data.x[test], data.labels[test]


class DigitClassifier(nn.Module):
    """64 -> 128 -> 64 -> 10 MLP; ``features`` is the 64-wide penultimate layer."""

    def __init__(self, numel: int = 64, width: int = 128, feature_dim: int = 64, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(numel, width), nn.SiLU(), nn.Linear(width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.clamp(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 50, batch_size: int = 256, seed: int = CLASSIFIER_SEED) -> DigitClassifier:
    """Adam with cross-entropy and weight decay; a little Gaussian input noise (std 0.1)
    keeps the features smooth for the slightly off-manifold generated digits."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier(numel=x[0].numel())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    x = x.float()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            inputs = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(inputs), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x.float()).argmax(1) == y).float().mean())


@torch.no_grad()
def features(model: DigitClassifier, x: torch.Tensor) -> np.ndarray:
    return model.features(x.float()).double().numpy()


class Judge:
    """The trained classifier, the real feature statistics and the floor."""

    def __init__(self, registry: Optional[fundiff.Registry] = None):
        start = time.perf_counter()
        self.x_train, self.y_train, self.x_test, self.y_test = real_digits(registry)
        self.model = train_classifier(self.x_train, self.y_train)
        self.seconds = time.perf_counter() - start
        self.test_accuracy = accuracy(self.model, self.x_test, self.y_test)
        self.train_features = features(self.model, self.x_train)
        self.floor = frechet_distance(features(self.model, self.x_test), self.train_features)

    def score(self, samples: torch.Tensor, labels: Optional[torch.Tensor]) -> tuple[float, Optional[float]]:
        fd = frechet_distance(features(self.model, samples.cpu()), self.train_features)
        label_accuracy = None if labels is None else accuracy(self.model, samples.cpu(), labels.cpu())
        return fd, label_accuracy


# --------------------------------------------------------------------------------------
# Runs


def score_run(judge: Judge, run_dir: str, num_samples: int, seed: int) -> dict:
    pipeline = fundiff.load_run(run_dir)
    start = time.perf_counter()
    samples, labels = pipeline.sample(num_samples, seed=seed)
    seconds = time.perf_counter() - start
    fd, label_accuracy = judge.score(samples, labels)
    recipe = pipeline.recipe.to_dict()
    return {
        "run": run_dir,
        "parameterization": recipe["parameterization"]["name"],
        "weighting": recipe["weighting"]["name"],
        "steps": recipe["train"]["steps"],
        "sampler": f"{recipe['sampler']['name']} {recipe['sampler'].get('steps', '')}".strip(),
        "fd": fd,
        "label_accuracy": label_accuracy,
        "sample_seconds": seconds,
    }


def grid_recipe(parameterization: dict, weighting: dict, steps: int) -> dict:
    with open(BASE_RECIPE) as f:
        recipe = yaml.safe_load(f)
    recipe = copy.deepcopy(recipe)
    recipe["parameterization"] = dict(parameterization)
    recipe["weighting"] = dict(weighting)
    recipe["train"]["steps"] = steps
    return recipe


def run_grid(grid_dir: str, steps: int, only: Optional[Sequence[int]] = None) -> list[tuple[str, float]]:
    """Train each grid configuration (skipping finished ones) at ``steps`` steps; returns
    (run_dir, training seconds) pairs."""
    done = []
    for index, (parameterization, weighting) in enumerate(GRID):
        if only is not None and index not in only:
            continue
        run_dir = os.path.join(grid_dir, f"{parameterization['name']}-{weighting['name']}-{steps}")
        marker = os.path.join(run_dir, "train_seconds.txt")  # written when a run has finished
        if not os.path.exists(marker):
            start = time.perf_counter()
            # resume=True continues an interrupted run from its last checkpoint (or starts fresh)
            fundiff.train(grid_recipe(parameterization, weighting, steps), run_dir, quiet=True, resume=True)
            with open(marker, "w") as f:
                f.write(f"{time.perf_counter() - start:.1f}\n")
        with open(marker) as f:
            seconds = float(f.read())
        print(f"trained {run_dir} in {seconds:.0f} s", file=sys.stderr, flush=True)
        done.append((run_dir, seconds))
    return done


def table(judge: Judge, rows: list[dict]) -> str:
    lines = [
        f"classifier: MLP 64-128-64-10 on {len(judge.y_train)} real digits, test accuracy "
        f"{judge.test_accuracy:.3f} on {len(judge.y_test)} held-out digits (trained in {judge.seconds:.1f} s)",
        f"floor: FD(real held-out, real train) = {judge.floor:.3f}",
        "",
        "| run | parameterization | weighting | train steps | train s | sampler | FD | label acc. |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        acc = "-" if row["label_accuracy"] is None else f"{row['label_accuracy']:.3f}"
        train_s = row.get("train_seconds")
        train_s = "-" if train_s is None or train_s != train_s else f"{train_s:.0f}"
        lines.append(
            f"| {row['run']} | {row['parameterization']} | {row['weighting']} | {row['steps']} | {train_s} | "
            f"{row['sampler']} | {row['fd']:.3f} | {acc} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run directories to score")
    parser.add_argument("--grid", action="store_true", help="train and score the parameterization x weighting grid")
    parser.add_argument("--steps", type=int, default=1000, help="grid: training steps per configuration (the equal budget)")
    parser.add_argument("--grid-dir", default="runs/digits-grid", help="grid: where the runs go (finished runs are reused)")
    parser.add_argument("--only", type=int, nargs="*", help="grid: indices of the configurations to run (0-5)")
    parser.add_argument("-n", "--num-samples", type=int, default=None, help="samples per run (default: the held-out size)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for these tiny models on a shared machine)")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.runs and not args.grid:
        parser.error("give run directories, or --grid")
    judge = Judge()
    num_samples = args.num_samples or len(judge.y_test)
    runs = [(run, None) for run in args.runs]
    if args.grid:
        runs += run_grid(args.grid_dir, args.steps, args.only)
    rows = []
    for run_dir, seconds in runs:
        row = score_run(judge, run_dir, num_samples, args.seed)
        row["train_seconds"] = seconds
        rows.append(row)
        print(f"scored {run_dir}: FD {row['fd']:.3f}", file=sys.stderr, flush=True)
    text = table(judge, rows)
    header = (
        f"command: {shlex.join(['python', *sys.argv])}\n"
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; samples per run: {num_samples}, seed {args.seed}\n"
    )
    print(header + "\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
