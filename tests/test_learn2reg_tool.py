"""tools/lung250m4b_to_learn2reg.py: the shared pairs as a Learn2Reg data set, read back through utils."""
import filecmp
import os

import nibabel as nib
import numpy as np
import pytest

import utils
from conftest import ROOT, assert_one_line_error
from tools import lung250m4b_to_learn2reg as tool

TRAIN_SHAPE, VAL_SHAPE = (20, 16, 24), (18, 14, 22)


def write_mask(path, shape, rng):
    nib.save(nib.Nifti1Image((rng.random(shape) > 0.7).astype(np.uint8), np.eye(4)), str(path))


def offsets(shape):
    """(h1, w1, d1): original voxel + these = lung250m4b frame voxel."""
    return np.array(utils.frame_pads(shape, utils.LUNG250M4B)[::2])


@pytest.fixture
def fake_shared(tmp_path):
    """A tiny SHARED_DIR: training cases 032 and 036 (corrField keypoints for 036), validation case 002."""
    rng = np.random.default_rng(0)
    shared = tmp_path / "shared"
    for d in ("dilated_vessels_10", "corrfield_10", "dilated_vessels_val", "landmarks_val"):
        (shared / d).mkdir(parents=True)
    for case in ("case_032", "case_036"):
        for k in (1, 2):
            write_mask(shared / "dilated_vessels_10" / f"{case}_{k}.nii.gz", TRAIN_SHAPE, rng)
    for k in (1, 2):
        write_mask(shared / "dilated_vessels_val" / f"case_002_{k}.nii.gz", VAL_SHAPE, rng)
    corrfield = np.round(rng.random((7, 6)) * np.tile(np.array(TRAIN_SHAPE) - 1, 2), 3)
    np.savetxt(shared / "corrfield_10" / "case_036.csv", corrfield, delimiter=",", fmt="%.3f")
    original = np.round(rng.random((5, 6)) * np.tile(np.array(VAL_SHAPE) - 1, 2), 1)
    utils.write_landmarks(str(shared / "landmarks_val" / "case_002.csv"),
                          original[:, :3] + offsets(VAL_SHAPE), original[:, 3:] + offsets(VAL_SHAPE))
    return shared


def test_fake_shared_pairs_read_back(fake_shared, tmp_path, capsys):
    out = tmp_path / "l2r"
    tool.main([str(fake_shared), str(out)])
    js = str(out / "Lung250M4B_dataset.json")
    assert js in capsys.readouterr().out.strip().splitlines()[-1]
    train, val = utils.find_pairs(js), utils.find_pairs(js, "val")
    assert [p.id for p in train] == ["Lung250M4B_0032", "Lung250M4B_0036"]
    assert [p.id for p in val] == ["Lung250M4B_0002"]
    assert utils.find_pairs(str(out)) == train  # the folder names its only dataset JSON
    sources = {"Lung250M4B_0032": ("dilated_vessels_10", "case_032"), "Lung250M4B_0036": ("dilated_vessels_10", "case_036"),
               "Lung250M4B_0002": ("dilated_vessels_val", "case_002")}
    for p in train + val:
        folder, case = sources[p.id]
        assert p.fixed.endswith(f"imagesTr/{p.id}_0000.nii.gz") and p.moving.endswith(f"imagesTr/{p.id}_0001.nii.gz")
        assert filecmp.cmp(p.fixed, fake_shared / folder / f"{case}_1.nii.gz", shallow=False)
        assert filecmp.cmp(p.moving, fake_shared / folder / f"{case}_2.nii.gz", shallow=False)
    # validation landmarks: frame -> original voxels in the CSVs, back to the same frame points
    fixed, moving = utils.pair_landmarks(val[0], utils.LUNG250M4B)
    want_fixed, want_moving = utils.read_landmarks(str(fake_shared / "landmarks_val" / "case_002.csv"), utils.LUNG250M4B)
    assert np.allclose(fixed, want_fixed) and np.allclose(moving, want_moving)
    kp = np.loadtxt(val[0].fixed_kp, delimiter=",")
    assert np.allclose(kp, want_fixed - offsets(VAL_SHAPE))  # original voxels, no header
    # training: corrField keypoints as given (original voxels); in the frame moved by the offsets
    assert train[0].fixed_kp is None and train[0].moving_kp is None
    corrfield = np.loadtxt(fake_shared / "corrfield_10" / "case_036.csv", delimiter=",")
    assert np.allclose(np.loadtxt(train[1].fixed_kp, delimiter=","), corrfield[:, :3])
    assert np.allclose(np.loadtxt(train[1].moving_kp, delimiter=","), corrfield[:, 3:])
    fixed, moving = utils.pair_landmarks(train[1], utils.LUNG250M4B)
    assert np.allclose(fixed, corrfield[:, :3] + offsets(TRAIN_SHAPE))
    assert np.allclose(moving, corrfield[:, 3:] + offsets(TRAIN_SHAPE))
    # --overwrite into the same folder, under the same name, gives the same data set
    tool.main([str(fake_shared), str(out), "--overwrite"])
    assert utils.find_pairs(js) == train and utils.find_pairs(js, "val") == val


def test_refuses_a_shared_dir_without_its_folders(fake_shared, tmp_path):
    out = tmp_path / "l2r"
    with pytest.raises(utils.DataError, match="no dilated_vessels_10, corrfield_10, dilated_vessels_val, landmarks_val folder"):
        tool.main([str(tmp_path / "nowhere"), str(out)])
    os.rename(fake_shared / "landmarks_val", tmp_path / "elsewhere")
    with pytest.raises(utils.DataError, match="no landmarks_val folder"):
        tool.main([str(fake_shared), str(out)])
    assert not out.exists()


def test_refuses_an_out_dir_in_the_repository(fake_shared):
    out = os.path.join(ROOT, "learn2reg-test-output-never-written", "l2r")
    assert not os.path.exists(os.path.dirname(out))
    with pytest.raises(utils.DataError, match="scratch folder"):
        tool.main([str(fake_shared), out])
    with pytest.raises(utils.DataError, match="inside the git repository"):
        tool.main([str(fake_shared), ROOT, "--overwrite"])
    assert not os.path.exists(os.path.dirname(out))


def test_command_line_refusal_is_one_line(fake_shared, run):
    out = os.path.join(ROOT, "learn2reg-test-output-never-written")
    proc = run("tools/lung250m4b_to_learn2reg.py", fake_shared, out)
    assert_one_line_error(proc, out, "scratch folder")
    assert proc.returncode == 2 and not os.path.exists(out)


def test_refuses_a_non_empty_out_dir(fake_shared, tmp_path):
    out = tmp_path / "l2r"
    out.mkdir()
    (out / "notes.txt").write_text("someone's file\n")
    with pytest.raises(utils.DataError, match="not empty"):
        tool.main([str(fake_shared), str(out)])
    assert sorted(os.listdir(out)) == ["notes.txt"]
    tool.main([str(fake_shared), str(out), "--overwrite"])
    assert (out / "notes.txt").read_text() == "someone's file\n"  # --overwrite replaces only its own files
    assert len(utils.find_pairs(str(out))) == 2
    with pytest.raises(utils.DataError, match="another data set"):
        tool.main([str(fake_shared), str(out), "--overwrite", "--name", "Other"])  # two JSONs: ambiguous DATA
    with pytest.raises(utils.DataError, match="scratch folder"):
        tool.main([str(fake_shared), str(fake_shared / "l2r")])  # nor into the shared data


def test_real_shared_data(shared_data, tmp_path):
    out = tmp_path / "l2r"
    tool.main([shared_data, str(out)])
    js = str(out / "Lung250M4B_dataset.json")
    train, val = utils.find_pairs(js), utils.find_pairs(js, "val")
    assert len(train) == 10 and len(val) == 9
    assert [p.id for p in train] == [f"Lung250M4B_{i:04d}" for i in range(32, 42)]
    for p in val:
        case = "case_" + p.id[-3:]
        fixed, moving = utils.pair_landmarks(p, utils.LUNG250M4B)
        want_fixed, want_moving = utils.read_landmarks(os.path.join(shared_data, "landmarks_val", f"{case}.csv"), utils.LUNG250M4B)
        assert np.allclose(fixed, want_fixed) and np.allclose(moving, want_moving), p.id
        assert filecmp.cmp(p.fixed, os.path.join(shared_data, "dilated_vessels_val", f"{case}_1.nii.gz"), shallow=False)
    with_kp = [p for p in train if p.fixed_kp]
    assert [p.id[-3:] for p in with_kp] == ["036", "038", "039", "040", "041"]
    for p in with_kp:
        corrfield = np.loadtxt(os.path.join(shared_data, "corrfield_10", f"case_{p.id[-3:]}.csv"), delimiter=",")
        assert np.allclose(np.loadtxt(p.fixed_kp, delimiter=","), corrfield[:, :3], atol=1e-4)
        assert np.allclose(np.loadtxt(p.moving_kp, delimiter=","), corrfield[:, 3:], atol=1e-4)
