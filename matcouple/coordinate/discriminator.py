"""The match discriminator g_phi: p_match of a generated crystal (paper section 4, item 4).

A small MLP on per-structure features (:mod:`discriminator_features`), standardised with
the training set's mean and spread, followed by Platt scaling fitted on held-out
compositions so that p_match reads as a probability. The model file holds only tensors,
numbers and strings and loads with ``torch.load(weights_only=True)``; its JSON card sits
beside it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.core import Structure
from torch import nn

from matcouple.coordinate.discriminator_features import GEOMETRY, SURROGATE, feature_matrix
from matcouple.errors import CheckpointError
from matcouple.settings import get_settings

MODEL_FORMAT = "matcouple-match-discriminator-v1"


class MatchClassifier(nn.Module):
    """Standardised features -> logit of a match (no hidden layer: logistic regression)."""

    def __init__(self, n_features: int, hidden: Sequence[int] = (32, 32),
                 dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("std", torch.ones(n_features, dtype=torch.float64))
        self.register_buffer("platt", torch.tensor([1.0, 0.0], dtype=torch.float64))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std as float32; a missing feature (NaN) becomes the mean."""
        z = (x.double() - self.mean) / self.std
        return torch.nan_to_num(z, nan=0.0).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits of raw (unstandardised) features."""
        return self.net(self.standardise(x)).squeeze(-1)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated p_match: sigmoid(a * logit + b)."""
        a, b = self.platt.float()
        return torch.sigmoid(a * self.logits(x) + b)


@lru_cache(maxsize=1)
def shipped_surrogate():
    """The shipped Crysformer ensemble, loaded once per process (loading compiles it), with
    dropout off: the discriminator was trained on that mode's value and sigma."""
    from matcouple.surrogate.predict import SurrogatePredictor

    return SurrogatePredictor.default(mc_samples=0)


def default_model_path() -> Path:
    """``$MATCOUPLE_DISCRIMINATOR_MODEL``, else Settings.discriminator_model in the checkout."""
    env = os.environ.get("MATCOUPLE_DISCRIMINATOR_MODEL")
    if env:
        return Path(env).expanduser().resolve()
    settings = get_settings()
    path = Path(settings.discriminator_model)
    return path if path.is_absolute() else settings.root / path


def save_model(path: Path, classifier: MatchClassifier, *, features: Sequence[str],
               hidden: Sequence[int], dropout: float, meta: dict[str, Any]) -> None:
    """Write the release file (weights, feature names, calibration, small metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": MODEL_FORMAT, "features": list(features), "hidden": list(hidden),
                "dropout": float(dropout),
                "state_dict": {k: v.detach().cpu() for k, v in
                               classifier.state_dict().items()},
                "meta": meta}, path)


class MatchDiscriminator:
    """p_match = g_phi(X) for generated crystals; loads the shipped model by default."""

    def __init__(self, classifier: MatchClassifier, features: Sequence[str], *,
                 meta: dict[str, Any] | None = None, path: Path | None = None,
                 predictor=None) -> None:
        self.classifier = classifier.eval()
        self.features = list(features)
        self.meta = meta or {}
        self.path = path
        self._predictor = predictor
        unknown = [f for f in self.features if f not in (*GEOMETRY, *SURROGATE)]
        if unknown:
            raise CheckpointError(f"{path}: unknown features {unknown}; the model was made "
                                  "by another version of matcouple")

    @property
    def uses_surrogate(self) -> bool:
        return any(f in SURROGATE for f in self.features)

    @property
    def threshold(self) -> float:
        """p_match at or above which a structure is trusted (Settings.discriminator_p_match_min)."""
        return get_settings().discriminator_p_match_min

    @classmethod
    def load(cls, path: Path | str, predictor=None) -> MatchDiscriminator:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"discriminator model {path} not found (train one with "
                                  "`matcouple discriminator train`)")
        try:
            blob = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable model file: {exc}") from exc
        if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{path} is not a match discriminator model")
        classifier = MatchClassifier(len(blob["features"]), blob["hidden"], blob["dropout"])
        try:
            classifier.load_state_dict(blob["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit the stored layout: {exc}") \
                from exc
        return cls(classifier, blob["features"], meta=blob.get("meta", {}), path=path,
                   predictor=predictor)

    @classmethod
    def default(cls) -> MatchDiscriminator:
        """The shipped model (``models/discriminator/discriminator.pt``)."""
        return cls.load(default_model_path())

    def predictor(self):
        """The shipped surrogate ensemble when the model reads its outputs."""
        if self._predictor is None and self.uses_surrogate:
            self._predictor = shipped_surrogate()
        return self._predictor

    def features_of(self, structures: Sequence[Structure]) -> np.ndarray:
        """The feature columns this model reads, in its order."""
        matrix = feature_matrix(structures, predictor=self.predictor())
        names = list(GEOMETRY) + (list(SURROGATE) if self.uses_surrogate else [])
        return matrix[:, [names.index(f) for f in self.features]]

    @torch.no_grad()
    def p_match_features(self, features: np.ndarray) -> np.ndarray:
        """p_match of precomputed feature rows (as :meth:`features_of` returns them)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float64))
        return self.classifier.probabilities(x).double().numpy()

    def p_match(self, structures: Sequence[Structure]) -> list[float]:
        """Probability that each structure matches a real crystal of its composition."""
        return [float(p) for p in self.p_match_features(self.features_of(structures))]
