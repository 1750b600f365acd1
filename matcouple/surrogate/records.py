"""How a prediction is stored in MongoDB (one document per structure and model version)."""

from __future__ import annotations

from typing import Any


def prediction_document(row, predictor, run: str | None = None) -> dict[str, Any]:
    """Value and calibrated sigma per target, with the model that produced them."""
    doc: dict[str, Any] = {
        "structure_id": row.id,
        "model_version": predictor.version,
        "uncertainty_mode": predictor.mode,
        "calibrated": predictor.calibrated,
        "predictions": {t: {"value": row.values[t], "sigma": row.sigmas[t]}
                        for t in predictor.targets if t in row.values},
        "error": row.error,
    }
    if run:
        doc["run"] = run
    return doc
