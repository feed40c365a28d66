"""The cost model: predicted seconds of one microbatch, linear in five features of its forest.

Features (``FEATURES``): unique tokens (linear layers), causal query-key pairs of tree attention,
nodes (one DFS push/pop each), rollouts (one loss each) and a constant. The coefficients are
fitted to measured timings by non-negative least squares (``CostModel.fit``, used by
``tools/calibrate.py``); ``data.py`` loads a fitted model from its JSON file. Pure numpy.

Shape suffixes: M rows and N unknowns of a least-squares system, K its unknowns whose column is
not all zero; R measured microbatches, F = len(FEATURES) features.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from megatron_dta.forest import PrefixForest

FEATURES = ("per_token", "attention", "per_node", "per_leaf", "constant")


def price(features, coef_F: np.ndarray):
    """``features @ coef_F`` ([F] -> float, [R, F] -> [R]) summed feature by feature in a fixed order.
    Every DP rank plans its batch alone and must reach the same plan, but BLAS's dot and gemv round
    differently by CPU kernel (seen: OpenBLAS's Haswell and native kernels one ulp apart, which is
    enough to flip a tie); elementwise products and sums round the same everywhere."""
    features = np.asarray(features, dtype=np.float64)
    total = features[..., 0] * coef_F[0]
    for f in range(1, len(coef_F)):
        total = total + features[..., f] * coef_F[f]
    return total


def triangle(n):
    """Causal query-key pairs of the first ``n`` positions of a path: n (n + 1) / 2."""
    return n * (n + 1) // 2


def nnls(a_MN: np.ndarray, b_M: np.ndarray) -> np.ndarray:
    """Non-negative least squares, min ||A x - b|| s.t. x >= 0 (Lawson-Hanson active set).

    Columns are scaled to unit norm first: cost features span ten orders of magnitude.
    """
    a_MN = np.asarray(a_MN, dtype=np.float64)
    b_M = np.asarray(b_M, dtype=np.float64)
    n = a_MN.shape[1]
    scale_N = np.linalg.norm(a_MN, axis=0)
    live_N = scale_N > 0  # an all-zero feature gets coefficient 0
    a_MK = a_MN[:, live_N] / scale_N[live_N]
    k = a_MK.shape[1]
    x_K = np.zeros(k)
    passive_K = np.zeros(k, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(a_MK.shape) * max(np.abs(a_MK).sum(axis=0).max(initial=0), 1)
    for _ in range(3 * k + 10):
        grad_K = a_MK.T @ (b_M - a_MK @ x_K)
        if passive_K.all() or grad_K[~passive_K].max(initial=-np.inf) <= tol:
            break
        passive_K[np.argmax(np.where(passive_K, -np.inf, grad_K))] = True
        while True:
            s_K = np.zeros(k)
            s_K[passive_K] = np.linalg.lstsq(a_MK[:, passive_K], b_M, rcond=None)[0]
            if s_K[passive_K].min() > 0:
                break
            # Step from x towards s until the first passive coefficient hits zero; drop it.
            neg_K = passive_K & (s_K <= 0)
            alpha = np.min(x_K[neg_K] / (x_K[neg_K] - s_K[neg_K]))
            x_K = x_K + alpha * (s_K - x_K)
            passive_K &= x_K > tol
            x_K[~passive_K] = 0.0
        x_K = s_K
    out_N = np.zeros(n)
    out_N[live_N] = x_K / scale_N[live_N]
    return out_N


@dataclass
class CostModel:
    """Predicted seconds for one microbatch: a non-negative linear function of its forest.

    The defaults are a guess of the right shape (roughly a 1-2B model on one H100: attention
    matches the linear layers at ~10K keys per query, each node costs a DFS push/pop of kernel
    launches); ``tools/calibrate.py`` replaces them with a fit on the running hardware.
    """

    per_token: float = 2e-5  # s per unique token (all linear layers, forward + backward)
    attention: float = 2e-9  # s per causal query-key pair: sum over nodes of own x (prefix + own)
    per_node: float = 5e-4  # s per forest node (one push and one pop of the DFS)
    per_leaf: float = 1e-4  # s per rollout (its loss; each ends at a leaf or at a prefix node)
    constant: float = 5e-3  # s per microbatch
    fit_error: float | None = None  # rms relative error of the fit that produced it, if any

    def __post_init__(self):
        for name in FEATURES:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")

    @property
    def coefficients(self) -> np.ndarray:
        """[F] in the order of ``FEATURES`` (a fresh array: callers may modify it)."""
        return np.array([getattr(self, name) for name in FEATURES], dtype=np.float64)

    @staticmethod
    def features(forest: PrefixForest) -> np.ndarray:
        """[F] features of one microbatch holding the rollouts of ``forest``, in ``FEATURES`` order."""
        pairs = sum(triangle(n.end) - triangle(n.offset) for n in forest.nodes)
        return np.array(
            [forest.unique_tokens, pairs, len(forest.nodes), len(forest.sequences), 1], dtype=np.float64
        )

    def predict(self, forest_or_features: PrefixForest | np.ndarray) -> float | np.ndarray:
        """Seconds for a forest, a feature vector [F], or a matrix of them [R, F]."""
        if isinstance(forest_or_features, PrefixForest):
            forest_or_features = self.features(forest_or_features)
        return price(forest_or_features, self.coefficients)

    @classmethod
    def fit(cls, features_RF: np.ndarray, seconds_R: np.ndarray) -> tuple[CostModel, float]:
        """Fit coefficients >= 0 to measured ``seconds`` of microbatches with ``features`` rows.

        Minimises the relative error (each row divided by its time), since timings span orders of
        magnitude. Returns the model and its rms relative error, also kept as ``fit_error``.
        """
        features_RF = np.asarray(features_RF, dtype=np.float64)
        seconds_R = np.asarray(seconds_R, dtype=np.float64)
        if (
            features_RF.ndim != 2
            or features_RF.shape[1] != len(FEATURES)
            or len(features_RF) != len(seconds_R)
        ):
            raise ValueError(
                f"fit needs features [rows, {len(FEATURES)}] and one time per row, got "
                f"{features_RF.shape} and {seconds_R.shape}"
            )
        if not np.all(seconds_R > 0):
            raise ValueError("every measured time must be > 0 seconds")
        coef_F = nnls(features_RF / seconds_R[:, None], np.ones(len(seconds_R)))
        error = float(np.sqrt(np.mean((features_RF @ coef_F / seconds_R - 1) ** 2)))
        return cls(**dict(zip(FEATURES, coef_F.tolist())), fit_error=error), error

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError(
                f"{path}: a cost model file is a JSON object with keys among {sorted(known)}; "
                f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}"
            )
        return cls(**data)
