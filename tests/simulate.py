"""Monte-Carlo checks of the report's statistics, shared by tests/test_stats.py and the long script.

    python tests/tools/coverage.py            # the long version: every table, printed

Three experiments, each a pure function of its arguments and a seed:
- `verdict_outcomes`: a simulated paper ran exactly our recipe; how often is it "reproduced"?
- `mcnemar_rejections`: two equally accurate models on clustered images; how often does plain
  or clustered McNemar reject at 5%?
- `bootstrap_coverage`: how often do percentile and BCa intervals cover a known true metric?

The world simulated (one draw per replicate):
- Test images come in patients of 1-5 images (shares below, mean 2.9, as in MURA's wrist train
  set, where a patient has 3.0 images); a patient's images share its label.
- Whether a trained model gets image i right: z + u_patient + v_image + eta > 0 with the latent
  parts normal and of total variance 1, so P(right) = Phi(z) and z = Phi^-1(true metric). u (the
  patient) and v (the image) are shared by every training run: hard images are hard for every
  seed; eta is the run's own noise. Each training run has its own true metric, drawn
  N(mu, sd_train^2).
- The paper's test set is a random 20% of images, one image per patient or so: binomial at its n.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from harness.metrics import compute_metrics
from harness.stats import (
    Interval,
    binomial_sd,
    bootstrap_metrics,
    bootstrap_seed_mean,
    bootstrap_seed_noise,
    clustered_mcnemar,
    mcnemar,
    overlap_verdict,
    prediction_interval,
    prediction_verdict,
    wilson_interval,
)

# Images per patient, 1..5 (MURA wrist train: 3,267 patients, 9,752 images).
CLUSTER_SIZES = np.array([1, 2, 3, 4, 5])
CLUSTER_SHARES = np.array([0.10, 0.20, 0.45, 0.20, 0.05])


def clustered_test_set(
    n_patients: int, positive_share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(patient id per image, label per image): MURA-like clusters of 1-5 images."""
    sizes = rng.choice(CLUSTER_SIZES, size=n_patients, p=CLUSTER_SHARES)
    patients = np.repeat(np.arange(n_patients), sizes)
    labels = np.repeat((rng.random(n_patients) < positive_share).astype(np.int8), sizes)
    return patients, labels


@dataclass(frozen=True)
class World:
    """One claim's world: the metric, its recipe mean, and how correlated the errors are."""

    metric: str = "accuracy"  # accuracy | recall
    mu: float = 0.75  # the recipe's mean true metric over training runs
    other: float = 0.85  # recall: the true specificity (negatives), fixed
    positive_share: float = 0.4  # MURA wrist: 3,987 of 9,752 images are abnormal
    n_patients: int = 690  # about 2,000 test images at 2.9 a patient
    n_paper: int = 1951  # the paper's denominator (recall: its 790 positives)
    rho_patient: float = 0.4  # latent variance shared by a patient's images (ICC on that scale)
    rho_image: float = 0.3  # latent variance of the image itself, shared by every run


def _right(
    z: np.ndarray, shared: np.ndarray, own_sd: float, rng: np.random.Generator
) -> np.ndarray:
    """(runs, images) bool: run r gets image i right, z[r] + shared[i] + eta > 0."""
    eta = rng.normal(0.0, own_sd, size=(z.shape[0], shared.shape[0]))
    return (z[:, None] + shared[None, :] + eta) > 0


def _seed_probs(
    world: World, true_values: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, patients, probs (S, n)) of S runs with the given true metrics on a new test set."""
    patients, labels = clustered_test_set(world.n_patients, world.positive_share, rng)
    n = labels.shape[0]
    shared = (rng.normal(0, np.sqrt(world.rho_patient), world.n_patients)[patients]
              + rng.normal(0, np.sqrt(world.rho_image), n))
    own = float(np.sqrt(1 - world.rho_patient - world.rho_image))
    z = ndtri(np.clip(true_values, 1e-4, 1 - 1e-4))
    if world.metric == "accuracy":
        right = _right(z, shared, own, rng)
    elif world.metric == "recall":
        z_neg = np.full_like(z, ndtri(world.other))
        right = np.where(labels[None, :] == 1, _right(z, shared, own, rng),
                         _right(z_neg, shared, own, rng))
    else:
        raise ValueError(f"metric must be accuracy or recall; got {world.metric!r}")
    pred = np.where(right, labels[None, :], 1 - labels[None, :])
    # Scores that threshold to the prediction; their spread keeps AUROC defined, unused here.
    probs = np.clip(0.5 + (pred - 0.5) * 0.6 + rng.normal(0, 0.05, pred.shape), 0.01, 0.99)
    return labels, patients, probs


def verdict_outcomes(
    sd_train: float,
    n_sims: int,
    seed: int,
    *,
    world: World = World(),
    n_seeds: int = 3,
    n_resamples: int = 200,
    correct_noise: bool = True,
) -> tuple[Counter[str], Counter[str]]:
    """(new rule's labels, old rule's labels) when the paper ran exactly our recipe.

    Each replicate draws S + 1 training runs' true metrics from N(mu, sd_train^2): S are ours,
    scored on a new clustered test set of ours; one is the paper's, scored binomially at
    `world.n_paper`. The new rule is `prediction_interval` + `prediction_verdict` (bootstrap by
    patient); the old one is `verdict` on the percentile interval of the seed mean with the
    Wilson interval of the paper's counts.
    """
    rng = np.random.default_rng(seed)
    # The bootstrap's draws come from their own stream, so the simulated worlds do not depend
    # on which estimate is computed.
    boot_rng = np.random.default_rng([seed, 1])
    new: Counter[str] = Counter()
    old: Counter[str] = Counter()
    for _ in range(n_sims):
        true_values = np.clip(rng.normal(world.mu, sd_train, n_seeds + 1), 0.01, 0.99)
        labels, patients, probs = _seed_probs(world, true_values[:n_seeds], rng)
        k = int(rng.binomial(world.n_paper, true_values[-1]))
        printed = k / world.n_paper
        mean_iv = bootstrap_seed_mean(
            labels, probs, 0.5, (world.metric,), n_resamples=n_resamples, clusters=patients,
            unit="patient", rng=boot_rng,
        )[world.metric]
        noise = bootstrap_seed_noise(
            labels, probs, 0.5, (world.metric,), n_resamples=n_resamples, clusters=patients,
            rng=boot_rng,
        )[world.metric] if correct_noise else 0.0
        values = [compute_metrics(labels, p, 0.5, (world.metric,))[world.metric] for p in probs]
        m = float(np.mean(values))
        pi = prediction_interval(values, mean_iv.se, binomial_sd(m, world.n_paper),
                                 seed_noise=noise, n_paper=world.n_paper)
        new[prediction_verdict(printed, pi).label] += 1
        old[overlap_verdict(printed, mean_iv, wilson_interval(k, world.n_paper)).label] += 1
    return new, old


def mcnemar_rejections(
    n_sims: int,
    seed: int,
    *,
    n_patients: int = 690,
    icc: float = 0.4,
    accuracy: float = 0.75,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Share of true nulls rejected at `alpha` by plain and clustered McNemar, and the bootstrap.

    Two models with the same true accuracy on MURA-like clusters; each model's latent correctness
    has a patient part of variance `icc` (the intra-cluster correlation on the latent scale), the
    two models' patient parts correlated 0.5 and their image parts 0.5 (they agree on most
    images), so a patient where A beats B tends to favour A on all its images.
    """
    rng = np.random.default_rng(seed)
    z = float(ndtri(accuracy))
    hits = {"plain": 0, "clustered (Obuchowski)": 0, "clustered (Durkalski)": 0}
    for _ in range(n_sims):
        patients, labels = clustered_test_set(n_patients, 0.4, rng)
        n = labels.shape[0]
        cov = np.array([[1.0, 0.5], [0.5, 1.0]])
        u = rng.multivariate_normal([0, 0], cov * icc, n_patients)[patients]
        e = rng.multivariate_normal([0, 0], cov * (1 - icc), n)
        right = (z + u + e) > 0
        pred = np.where(right, labels[:, None], 1 - labels[:, None]).astype(np.int8)
        a, b = pred[:, 0], pred[:, 1]
        hits["plain"] += mcnemar(labels, a, b).p_value < alpha
        hits["clustered (Obuchowski)"] += clustered_mcnemar(labels, a, b, patients).p_value < alpha
        hits["clustered (Durkalski)"] += clustered_mcnemar(
            labels, a, b, patients, weighting="cluster").p_value < alpha
    return {k: v / n_sims for k, v in hits.items()}


def binormal_truth(separation: float, threshold_z: float) -> dict[str, float]:
    """True AUROC, recall and specificity of scores N(0,1) (negatives) and N(d,1) (positives).

    A score s is called positive when s >= threshold_z; probabilities are Phi(s - threshold_z),
    so the threshold on them is 0.5.
    """
    return {
        "auroc": float(ndtr(separation / np.sqrt(2))),
        "recall": float(ndtr(separation - threshold_z)),
        "specificity": float(ndtr(threshold_z)),
    }


def bootstrap_coverage(
    n_images: int,
    n_sims: int,
    seed: int,
    *,
    methods: tuple[str, ...] = ("percentile", "bca"),
    separation: float = 1.2,
    threshold_z: float = 0.6,
    positive_share: float = 0.4,
    n_resamples: int = 1000,
) -> dict[str, dict[str, float]]:
    """method -> metric -> share of test sets of `n_images` whose interval covers the truth.

    Binormal scores (`binormal_truth`); a test set whose point estimate is undefined counts as a
    miss, so both methods face the same sets.
    """
    truth = binormal_truth(separation, threshold_z)
    rng = np.random.default_rng(seed)
    metrics = tuple(truth)
    hits = {m: {k: 0 for k in metrics} for m in methods}
    for _ in range(n_sims):
        y = (rng.random(n_images) < positive_share).astype(np.int8)
        s = rng.normal(0, 1, n_images) + separation * y
        p = ndtr(s - threshold_z)
        draw_seed = int(rng.integers(2**31))
        for method in methods:
            ivs: dict[str, Interval] = bootstrap_metrics(
                y, p, 0.5, metrics, n_resamples=n_resamples, method=method,  # type: ignore[arg-type]
                rng=draw_seed,
            )
            for k in metrics:
                hits[method][k] += bool(ivs[k].contains(truth[k]))
    return {m: {k: v / n_sims for k, v in h.items()} for m, h in hits.items()}
