"""Match discriminator: RMSD labels, metrics, training on real CSP samples, p_match API."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from matcouple.coordinate.discriminator import MatchDiscriminator, default_model_path
from matcouple.coordinate.discriminator_data import (
    SampleSetConfig,
    generate_sample_set,
    is_match,
    read_sample_set,
    rmsd_to_references,
)
from matcouple.coordinate.discriminator_metrics import (
    at_threshold,
    calibration,
    roc_auc,
    roc_curve,
)
from matcouple.errors import CheckpointError, DatasetError, StructureInputError
from matcouple.settings import get_settings
from tests.conftest import skip_without_data


def _perturbed(structure: Structure, amplitude: float, seed: int = 0) -> Structure:
    copy = structure.copy()
    rng = np.random.default_rng(seed)
    for i in range(len(copy)):
        copy.translate_sites([i], rng.normal(0, amplitude, 3), frac_coords=False)
    return copy


@pytest.fixture()
def cesium_chloride_nacl() -> Structure:
    """NaCl in the CsCl structure (B2): a real high-pressure polymorph of rock-salt NaCl."""
    return Structure(Lattice.cubic(3.35), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture()
def rocksalt_nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


# ---------------------------------------------------------------- RMSD labels
def test_perturbed_copy_is_a_match_and_another_polymorph_is_not(
        rocksalt_nacl, cesium_chloride_nacl):
    d = get_settings().discriminator_rmsd_threshold
    shaken = _perturbed(rocksalt_nacl, 0.05)
    rmsd, index = rmsd_to_references(shaken, [cesium_chloride_nacl, rocksalt_nacl])
    assert index == 1 and 0 < rmsd < 0.1
    assert is_match(rmsd, d)
    other, _ = rmsd_to_references(cesium_chloride_nacl, [rocksalt_nacl])
    assert other is None and not is_match(other, d)
    # a tighter d turns a sloppy copy into a miss: the label is RMSD < d
    primitive = rocksalt_nacl.get_primitive_structure()
    sloppy, _ = rmsd_to_references(_perturbed(primitive, 0.3, seed=1), [rocksalt_nacl])
    assert sloppy is not None and sloppy > 0.05 and not is_match(sloppy, 0.05)


def test_invalid_sample_is_not_a_match(rocksalt_nacl):
    squashed = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]])
    assert rmsd_to_references(squashed, [rocksalt_nacl]) == (None, None)
    assert rmsd_to_references(None, [rocksalt_nacl]) == (None, None)


def test_sample_set_refuses_the_test_split_and_bad_counts(tmp_path):
    with pytest.raises(DatasetError, match="held back"):
        SampleSetConfig(splits=("test",)).resolved()
    with pytest.raises(DatasetError, match="compositions must be positive"):
        SampleSetConfig(compositions=0).resolved()
    with pytest.raises(DatasetError, match="unknown data set"):
        SampleSetConfig(dataset="carbon24").resolved()
    with pytest.raises(DatasetError, match="no such sample set"):
        read_sample_set(tmp_path / "missing.jsonl.gz")


# ---------------------------------------------------------------- metrics
def test_auc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.3
    p = np.round(rng.random(60) + 0.3 * y, 1)  # coarse scores: many ties
    pairs = [(a, b) for a, b in itertools.product(p[y], p[~y])]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert roc_auc(y, p) == pytest.approx(expected)
    fpr, tpr = roc_curve(y, p)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected)
    assert roc_auc(y, y.astype(float)) == 1.0 and roc_auc(y, -y.astype(float)) == 0.0
    assert np.isnan(roc_auc(np.ones(4, bool), np.arange(4.0)))


def test_precision_and_calibration_by_hand():
    y = np.array([1, 1, 0, 0, 1, 0], bool)
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.05])
    at = at_threshold(y, p, 0.5)
    assert (at["accepted"], at["precision"], at["recall"]) == (3, 2 / 3, 2 / 3)
    cal = calibration(y, p, bins=2)
    # bin [0, .5): p .2 .1 .05 with 1 match of 3; bin [.5, 1]: p .9 .8 .7 with 2 of 3
    assert cal["ece"] == pytest.approx(0.5 * abs(0.35 / 3 - 1 / 3) + 0.5 * abs(0.8 - 2 / 3))
    assert cal["brier"] == pytest.approx(np.mean((p - y) ** 2))


# ---------------------------------------------------------------- training on real samples
@pytest.fixture(scope="module")
def perov_samples(tmp_path_factory):
    """Real CSP samples: 12 Perov-5 compositions x 4 samples from the small CPU model."""
    skip_without_data("perov5")
    path = tmp_path_factory.mktemp("discrim") / "perov.jsonl.gz"
    checkpoint = get_settings().root / "models/generator/perov5_cpu.pt"
    summary = generate_sample_set(SampleSetConfig(
        dataset="perov5", splits=("val",), compositions=12, samples_per_composition=4,
        steps=40, batch_size=48, checkpoint=str(checkpoint), device="cpu", seed=1),
        path, progress=False)
    return path, summary


def test_sample_set_records(perov_samples):
    path, summary = perov_samples
    records = read_sample_set(path)
    assert len(records) == summary["samples"] == 48
    assert {r["dataset"] for r in records} == {"perov5"}
    assert len({r["composition"] for r in records}) == 12
    for r in records:
        assert r["sampler"]["steps"] == 40 and r["sampler"]["checkpoint"] == "perov5_cpu.pt"
        assert r["match"] == is_match(r["rmsd"], r["rmsd_threshold"])
        assert r["split"] in ("train", "val")  # the polymorph whose cell size was used
        if r["structure"] is not None:
            s = Structure.from_dict(r["structure"])
            assert s.composition.reduced_formula == r["composition"]
    # the CPU model matches a fair share of Perov-5 even with few steps, but not all
    assert 0 < summary["match"] < 48


def test_classifier_trains_and_its_auc_is_computed_correctly(perov_samples, tmp_path):
    from matcouple.coordinate.discriminator_train import (
        evaluate,
        group_folds,
        load_sample_features,
        train_discriminator,
    )

    path, _ = perov_samples
    data = load_sample_features([path], progress=False)
    folds = group_folds(data.groups, 3, seed=0)
    for fold in range(3):  # no composition in two folds
        assert not set(data.groups[folds == fold]) & set(data.groups[folds != fold])
    results = evaluate(data, folds, 0.5, variants=["logistic_all", "mlp_geometry"])
    for r in results.values():
        assert r["auc"] == pytest.approx(roc_auc(data.y, r["p"]))
        assert np.trapezoid(r["roc"]["tpr"], r["roc"]["fpr"]) == pytest.approx(r["auc"])
        assert np.all((r["p"] >= 0) & (r["p"] <= 1))
    # a fresh copy of the file: no feature cache, geometry only (the surrogate is skipped)
    fresh = tmp_path / "fresh.jsonl.gz"
    fresh.write_bytes(path.read_bytes())
    card = train_discriminator([fresh], tmp_path / "d.pt", folds=3, progress=False,
                               variants=["mlp_geometry"])
    assert list(card["metrics"]) == ["mlp_geometry"]
    assert card["auc"] == pytest.approx(results["mlp_geometry"]["auc"])
    assert (tmp_path / "d.json").exists() and (tmp_path / "d_roc.png").exists()
    assert (tmp_path / "d.pt").stat().st_size < 2_000_000
    with pytest.raises(DatasetError, match="unknown variant"):
        train_discriminator([fresh], tmp_path / "e.pt", variant="forest")
    blob = torch.load(tmp_path / "d.pt", weights_only=True)
    assert blob["features"] == card["model"]["features"]
    model = MatchDiscriminator.load(tmp_path / "d.pt")
    structures = [Structure.from_dict(r["structure"]) for r in read_sample_set(path)[:5]]
    assert all(0.0 <= q <= 1.0 for q in model.p_match(structures))


# ---------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def shipped() -> MatchDiscriminator:
    return MatchDiscriminator.default()


def test_shipped_model_scores_real_and_generated_structures(shipped, rocksalt_nacl):
    from matcouple.directive.sample import (
        composition_numbers,
        load_generator,
        sample_crystals,
        to_structures,
    )

    gen = load_generator(device="cpu")
    numbers = composition_numbers("MgO", gen, 2)
    sampled = to_structures(sample_crystals(gen, torch.tensor([4, 4]),
                                            torch.tensor(numbers * 2), steps=20, seed=0))
    structures = [s for s in sampled if s is not None] + [
        rocksalt_nacl, _perturbed(rocksalt_nacl, 0.1)]
    scores = shipped.p_match(structures)
    assert len(scores) == len(structures)
    assert all(isinstance(q, float) and 0.0 <= q <= 1.0 for q in scores)
    assert default_model_path().stat().st_size < 2_000_000
    assert shipped.meta["auc"] > 0.5


def test_p_match_does_not_depend_on_the_cell_chosen(shipped, rocksalt_nacl):
    primitive = rocksalt_nacl.get_primitive_structure()
    supercell = primitive * (2, 1, 1)
    scores = shipped.p_match([rocksalt_nacl, primitive, supercell])
    assert scores[1] == pytest.approx(scores[0], abs=1e-6)
    assert scores[2] == pytest.approx(scores[0], abs=1e-6)
    # a real crystal scores above the same atoms thrown into the same box at random
    rng = np.random.default_rng(0)
    scrambled = Structure(rocksalt_nacl.lattice, rocksalt_nacl.species, rng.random((8, 3)))
    assert shipped.p_match([scrambled])[0] < scores[0]


def test_bad_input_gets_a_clear_error(shipped, rocksalt_nacl, tmp_path):
    with pytest.raises(StructureInputError, match="empty list"):
        shipped.p_match([])
    disordered = rocksalt_nacl.copy()
    disordered.replace_species({"Na": {"Na": 0.5, "K": 0.5}})
    with pytest.raises(StructureInputError, match="disordered"):
        shipped.p_match([rocksalt_nacl, disordered])
    with pytest.raises(StructureInputError, match="not a pymatgen Structure"):
        shipped.p_match(["NaCl"])
    with pytest.raises(CheckpointError, match="not found"):
        MatchDiscriminator.load(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        MatchDiscriminator.load(tmp_path / "junk.pt")


def test_score_command(rocksalt_nacl, tmp_path):
    from matcouple.cli import app

    rocksalt_nacl.to(filename=str(tmp_path / "nacl.cif"))
    result = CliRunner().invoke(app, ["discriminator", "score", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert '"formula": "NaCl"' in result.output and '"p_match"' in result.output
    bad = CliRunner().invoke(app, ["discriminator", "score", str(tmp_path / "none.cif")])
    assert bad.exit_code == 1 and "error" in bad.output
