"""Out-of-distribution score (pure): how far an image's member features lie from the training images'.

Why: the members assign every input one of seven classes, a CT slice or a photograph of a cat included.
training/ fits, on the training split's penultimate-layer features (``dermscore.features``), class means
and a shared, shrunk covariance of the members' features concatenated (Mahalanobis distance with
class-conditional means, Lee et al. 2018); the bundle's ``ood`` file holds the means and the whitening
matrix, hashed in the manifest like the weights.

``ood_score`` = min over classes of the Mahalanobis distance, divided by sqrt(feature dimensions): 0 at
a class mean, larger the less the image looks like any training class; only its comparison with the
bundle's threshold (a high percentile of the validation images' scores) has a meaning, so a score is
read against that threshold, which turns it into the ``out-of-distribution`` flag.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dermscore.bundle import Bundle
from dermscore.errors import BundleError

METHOD = "mahalanobis-class-means"


@dataclass(frozen=True)
class OodDetector:
    """Class means and whitening matrix in the concatenated feature space of ``members``."""

    members: tuple[str, ...]
    means: np.ndarray  # (classes, features)
    whitener: np.ndarray  # (features, features): (f - mean) @ whitener has identity covariance

    @cached_property
    def _whitened_means(self) -> np.ndarray:
        return self.means @ self.whitener

    @classmethod
    def load(cls, bundle: Bundle) -> OodDetector | None:
        """The bundle's detector, None for a bundle without one (its file was verified with the weights)."""
        if bundle.ood is None:
            return None
        path = bundle.path / bundle.ood.file
        if bundle.ood.method != METHOD:
            raise BundleError(f"{path}: OOD method {bundle.ood.method!r} is unknown to this dermscore ({METHOD}).")
        detector = cls.from_file(path)
        if set(detector.members) - {m.name for m in bundle.members}:
            raise BundleError(f"{path}: OOD statistics name members {detector.members} that bundle {bundle.name} "
                              "does not have. Refit them with `python -m training calibrate`.")
        return detector

    @classmethod
    def from_file(cls, path: Path) -> OodDetector:
        """Read an ``ood.npz`` (members, means, whitener), checking the shapes agree."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                detector = cls(tuple(str(m) for m in stored["members"]), np.asarray(stored["means"], dtype=np.float64),
                               np.asarray(stored["whitener"], dtype=np.float64))
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{path}: cannot read the OOD statistics ({exc}). Refit them with training/.") from exc
        if detector.means.shape[1] != detector.whitener.shape[0]:
            raise BundleError(f"{path}: OOD means and whitening matrix disagree in size. Refit them with training/.")
        return detector

    def score(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """(n,) ood_score from ``member -> (n, d)`` features."""
        z = np.concatenate([np.asarray(features[m], dtype=np.float64) for m in self.members], axis=1) @ self.whitener
        # ||z - mu||^2 = |z|^2 - 2 z.mu + |mu|^2, for every class at once
        means = self._whitened_means
        squared = (z * z).sum(1)[:, None] - 2.0 * z @ means.T + (means * means).sum(1)[None, :]
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0) / z.shape[1])
