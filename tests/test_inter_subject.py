"""Inter-subject data sets (OASIS's Learn2Reg layout: training[] lists one image per subject, no
training_paired_images, registration_val pairs subjects, no keypoints): the drawn training pairs,
the segmentations of validation images training[] does not list, evaluation by Dice alone, and
pipeline.py on such a set with label maps."""
import json
import os

import numpy as np
import pytest

import evaluate_registration
import make_phantoms
import utils
from conftest import assert_one_line_error

CLASSES = "1,2,3,4"


@pytest.fixture(scope="module")
def oasis(tmp_path_factory):
    """7 subjects of 64x64 2D label phantoms: 4 for training, 3 in 2 registration_val pairs."""
    root = tmp_path_factory.mktemp("oasis")
    return make_phantoms.make_learn2reg(str(root / "l2r"), "OAS", 7, (64, 64), (1.0, 1.0), n_val=3, inter_subject=True)


def test_training_pairs_are_drawn_from_the_subjects(oasis):
    d = json.load(open(oasis))
    assert d["training_paired_images"] == [] and d["pairings"] == "unpaired" and len(d["training"]) == 4 and "keypoints" not in d["training"][0]
    train = utils.find_pairs(oasis)
    assert train == utils.find_pairs(oasis)  # seeded: every stage sees the same pairs
    fixed = [os.path.basename(p.fixed) for p in train]
    moving = [os.path.basename(p.moving) for p in train]
    subjects = [f"OAS_{i:04d}_0000.nii.gz" for i in range(1, 5)]
    assert sorted(fixed) == sorted(moving) == subjects  # N subjects, N pairs: each once fixed, once moving
    assert all(f != m for f, m in zip(fixed, moving)) and all("labelsTr" in p.fixed for p in train)
    assert train[0].id == utils.pair_id(train[0].fixed, train[0].moving) and "-" in train[0].id
    val = utils.find_pairs(oasis, "val")
    assert [p.id for p in val] == ["OAS_0005-OAS_0006", "OAS_0006-OAS_0007"]
    # the validation subjects are not in training[]: their label maps are found beside the images
    assert all("labelsTr" in f for p in val for f in (p.fixed, p.moving))
    assert not {p.fixed for p in val} & {p.fixed for p in train}
    assert utils.evaluation_landmarks(val, utils.data_frame(oasis)) is None  # no keypoints: Dice alone


def test_validation_subjects_listed_in_training_are_not_drawn(oasis, tmp_path):
    d = json.load(open(oasis))
    d["training"] += [{"image": f"./imagesTr/OAS_000{i}_0000.nii.gz", "label": f"./labelsTr/OAS_000{i}_0000.nii.gz"}
                      for i in (5, 6, 7)]
    js = os.path.join(os.path.dirname(oasis), "listed_dataset.json")
    utils.write_json(js, d)
    train = utils.find_pairs(js)
    assert len(train) == 4 and not any(s in p.fixed for p in train for s in ("0005", "0006", "0007"))
    d["training"] = d["training"][:1]
    utils.write_json(js, d)
    with pytest.raises(utils.DataError, match="draws them from 2 or more training"):
        utils.find_pairs(js)
    d["registration_val"] = []
    utils.write_json(js, d)
    with pytest.raises(utils.DataError, match="needs 2 or more training"):
        utils.find_pairs(js)
    # a paired set (or one that says nothing but lists training_paired_images, empty) is never drawn from
    del d["pairings"]
    d["training"] = json.load(open(oasis))["training"]
    utils.write_json(js, d)
    with pytest.raises(utils.DataError, match="lists no pairs"):
        utils.find_pairs(js)
    del d["training_paired_images"]
    utils.write_json(js, d)
    assert len(utils.find_pairs(js)) == 4  # neither said: OASIS's layout


def test_one_validation_pair_is_one_row(tmp_path):
    import pipeline

    utils.write_csv(str(tmp_path / "eval_real_s0.csv"), ["case", "initial", "net", "tta"],
                    [{"case": "A-B", "initial": 0.5, "net": 0.6, "tta": 0.7}])
    m = pipeline.per_case_means(str(tmp_path), "real", [0])
    assert m["net"].tolist() == [0.6] and m["tta"].tolist() == [0.7]


def test_evaluation_without_keypoints_scores_dice(oasis, tmp_path, run):
    s = evaluate_registration.evaluate(2, "none", oasis, out=str(tmp_path / "ev"), preset="demo", log=lambda *a: None,
                                       classes=[1, 2, 3, 4])
    assert s["metric"] == "dice" and s["num_landmarks"] == 0 and not any(k.startswith("tre_") for k in s)
    rows = np.genfromtxt(tmp_path / "ev.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert list(rows.dtype.names) == ["case", "initial", "net", "tta"] and len(rows) == 2  # one row per pair
    np.testing.assert_allclose(rows["tta"].mean(), s["dice_mean_labels_tta"], atol=1e-3)  # Dice, mean over labels
    assert s["dice_mean_labels_tta"] > s["dice_mean_labels_initial"]  # TTA aligns the labels
    # landmarks asked for but not there: an error, not Dice (a folder of pairs always needs its landmarks/)
    proc = run("evaluate_registration.py", 0, "none", "--preset", "demo", "--data", oasis, "--landmarks",
               tmp_path / "nowhere", "--out", tmp_path / "g")
    assert_one_line_error(proc, "nowhere")


def test_pipeline_on_an_inter_subject_set_with_classes(oasis, micro, tmp_path):
    """pipeline.py on the inter-subject 2D JSON with --classes at micro size: every row, Dice in place of
    TRE in the table, the per-case tests and the figures; per-label columns; the realism reports."""
    import pipeline

    out = str(tmp_path / "res")
    pipeline.main(["--preset", "demo", "--data", oasis, "--out", out, "--seeds", "1", "--num-synth", "4",
                   "--classes", CLASSES])
    md = open(os.path.join(out, "results.md")).read()
    for col in ("dice_net", "dice_label1_tta", "hd95_label4_tta", "dice_mean_labels_tta", "std_logjac"):
        assert col in md, col
    assert "tre_net_mean" not in md and "No keypoints: Dice" in md
    assert "(2 cases, Dice averaged" in md and "positive = better" in md and ("Dice +" in md or "Dice -" in md)
    for row in ("| real-4 |", "| real-4 + synth-4 (4-pair generator) |", "| real-4 + deformed-4 (real pairs, random anatomy) |"):
        assert row in md, row
    for name in ("realism.md", "realism_free.md", "results_tre.png", "results_pairs.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert utils.spatial_dims(utils.recorded_frame(os.path.join(out, "synth"))) == 2


def test_realism_never_finds_a_shared_image_as_its_own_neighbour(oasis, tmp_path):
    """Inter-subject pairs share images (each is fixed in one pair, moving in another): the memorisation
    statistic of the real pairs compares a map with other images only, not with itself (Dice 1)."""
    import realism_report

    groups, _ = realism_report.report([], oasis, str(tmp_path / "r"), labels=[1, 2, 3, 4])
    nn = next(iter(groups.values()))["nn_dice"]
    assert len(nn) == 8 and nn.max() < 0.999
