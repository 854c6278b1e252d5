"""K-label maps (--classes): one class per listed label through every stage, K = 1 identical to a
merged mask, the calibration for K classes, per-label Dice / HD95, and the bad inputs."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import make_phantoms
import utils
from conftest import assert_one_line_error
from models import VQAE, RegistrationNet

CLASSES = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def brains(tmp_path_factory):
    """2D label phantoms, 64x64: a Learn2Reg JSON (4 training + 2 validation pairs)."""
    root = tmp_path_factory.mktemp("labels")
    return make_phantoms.make_learn2reg(str(root / "l2r"), "BRAIN", 6, (64, 64), (1.0, 1.0), n_val=2)


def call(script, *argv):
    """A stage script's main() with a user's command line, in this process, on one thread."""
    import importlib

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return importlib.import_module(script).main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def weights(path):
    return torch.load(path, weights_only=True)["state"]


def test_one_class_is_the_merged_mask_bit_for_bit(brains, tmp_path):
    """--classes 3 and --labels 3 give the same tensors, VQ-AE and registration weights."""
    frame = utils.data_frame(brains)
    a = utils.load_pairs(brains, 1, frame, labels=[3], progress=False)[1]
    b = utils.load_pairs(brains, 1, frame, classes=[3], progress=False)[1]
    assert torch.equal(a, b) and a.shape[1] == 2
    for opt in ("--labels", "--classes"):
        call("train_vqae", 2, "--preset", "demo", "--data", brains, "--iters", 3, "--out", tmp_path / f"v{opt}.pth", opt, 3)
        call("train_registration", 2, brains, "--preset", "demo", "--iters", 2, "--out", tmp_path / f"r{opt}.pth", opt, 3)
    for kind in "vr":
        x, y = weights(tmp_path / f"{kind}--labels.pth"), weights(tmp_path / f"{kind}--classes.pth")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_calibration_recovers_the_occupancies_of_k_classes():
    """The weighted CE's optimum softmax is s_c ~ w_c q_c: calibrated pair_probs gives q back."""
    torch.manual_seed(0)
    q = torch.rand(2, 4, 5, 6).softmax(1)  # background + 3 classes, per map
    w = torch.tensor([VQAE.CLASS_WEIGHTS[0]] + [VQAE.CLASS_WEIGHTS[1]] * 3).view(1, 4, 1, 1)
    logits = torch.cat([(w * q).log(), (w * q.flip(1)).log()], 1)
    fixed, moving = VQAE.pair_probs(logits, calibrate=True)
    assert fixed.shape == (2, 3, 5, 6)
    assert torch.allclose(fixed, q[:, 1:], atol=1e-5) and torch.allclose(moving, q.flip(1)[:, 1:], atol=1e-5)
    raw = VQAE.pair_probs(logits)[0]
    assert not torch.allclose(raw, q[:, 1:], atol=1e-2)  # the raw softmax over-states every class


def test_every_stage_with_four_classes(brains, tmp_path):
    t = tmp_path
    call("train_vqae", 2, "--preset", "demo", "--data", brains, "--iters", 4, "--out", t / "vq.pth", "--classes", "1,2,3,4")
    vq = VQAE.from_checkpoint(str(t / "vq.pth"))
    assert vq.classes == 4 and vq.saved["classes"] == CLASSES and vq.config["model"]["classes"] == 4
    call("infer_vqae", t / "vq.pth", "--data", brains, "--out", t / "tok.pth")
    call("train_diffusion", 4, t / "tok.pth", "--preset", "demo", "--iters", 2, "--out", t / "diff.pth")
    call("synthesise", 3, "--preset", "demo", "--diffusion", t / "diff.pth", "--vqae", t / "vq.pth", "--out", t / "synth")
    img = nib.load(str(t / "synth" / "case_0000_1.nii.gz"))
    assert img.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(img.dataobj))) <= {0, *CLASSES}
    assert json.load(open(t / "synth" / "manifest.json"))["classes"] == CLASSES
    call("deform_pairs", "deformed", brains, 2, "--preset", "demo", "--out", t / "deformed", "--classes", "1,2,3,4")
    moved = np.asarray(nib.load(str(t / "deformed" / "case_0000_2.nii.gz")).dataobj)
    assert moved.dtype == np.uint8 and set(np.unique(moved)) == {0, *CLASSES}  # label maps in, label maps out
    with pytest.warns(UserWarning, match="a generator may miss a class"):  # a toy generator may miss one
        utils.load_pairs(str(t / "synth"), 1, utils.recorded_frame(str(t / "synth")), classes=[1, 2, 3, 4, 9],
                         progress=False)
    call("train_registration", 2, brains, "--preset", "demo", "--iters", 2, "--out", t / "reg.pth", "--classes", "1,2,3,4",
         "--augment")
    net = RegistrationNet.from_checkpoint(str(t / "reg.pth"))
    first = next(w for w in net.unets[0].parameters() if w.ndim == 4)  # the first 2D convolution
    assert first.shape[1] == 8 and net.saved["classes"] == CLASSES  # fixed and moving, 4 classes each
    call("evaluate_registration", 1, t / "reg.pth", "--data", brains, "--out", t / "eval")
    s = json.load(open(t / "eval.json"))
    assert s["classes"] == CLASSES
    for v in CLASSES:
        assert 0 <= s[f"dice_label{v}_tta"] <= 1 and s[f"hd95_label{v}_tta"] >= 0
    assert s["dice_mean_labels_initial"] < 1 and np.isfinite(s["hd95_tta"])


def test_bad_class_inputs(brains, tmp_path, run):
    proc = run("train_vqae.py", 2, "--preset", "demo", "--data", brains, "--iters", 1, "--out", tmp_path / "v.pth",
               "--classes", "1,9")
    assert_one_line_error(proc, "no map holds label 9 of --classes 1,9")
    for bad in ([1, 1], [1, 300]):  # written as uint8 label maps
        with pytest.raises(utils.DataError, match="distinct label values up to 255"):
            utils.check_label_options(None, bad)
    with pytest.raises(utils.DataError, match="give one"):
        call("train_registration", 2, brains, "--preset", "demo", "--iters", 1, "--out", tmp_path / "r.pth",
             "--classes", "1,2", "--labels", "3")
    soft = tmp_path / "soft"
    make_phantoms.make_pairs(str(soft), 2)  # 3D phantoms: soft occupancies, not label maps
    with pytest.raises(utils.DataError, match="case_000_1.nii.gz: holds non-integer"):
        utils.framed_volume(str(soft / "case_000_1.nii.gz"), 4, utils.LUNG250M4B, classes=[1, 2])
    call("train_registration", 2, brains, "--preset", "demo", "--iters", 1, "--out", tmp_path / "r2.pth", "--classes", "1,2")
    with pytest.raises(utils.DataError, match="r2.pth: trained on classes \\[1, 2\\], not --classes 1,2,3"):
        call("evaluate_registration", 1, tmp_path / "r2.pth", "--data", brains, "--out", tmp_path / "e", "--classes", "1,2,3")
    with pytest.raises(utils.DataError, match="r2.pth"):
        call("train_registration", 2, brains, "--preset", "demo", "--iters", 2, "--out", tmp_path / "r2.pth",
             "--classes", "1,3", "--resume")
    with pytest.raises(utils.DataError, match="--labels does not apply"):
        call("evaluate_registration", 1, tmp_path / "r2.pth", "--data", brains, "--out", tmp_path / "e", "--labels", "1")



def test_label_maps_are_held_as_uint8_and_train_bit_for_bit(brains, tmp_path, monkeypatch):
    """K hard label maps load as uint8 indices (utils.LabelPairs), one-hot per batch: the same batches,
    so the same VQ-AE and registration weights as the float occupancies, at 1/(2K) of float16's memory."""
    ids, held = utils.load_pairs(brains, 1, utils.data_frame(brains), classes=CLASSES, compact=True, progress=False)
    full = utils.load_pairs(brains, 1, utils.data_frame(brains), classes=CLASSES, progress=False)[1]
    assert isinstance(held, utils.LabelPairs) and held.index.dtype == torch.uint8 and held.shape == full.shape
    assert held.nbytes * 2 * len(CLASSES) == full.half().nbytes
    assert torch.equal(held[torch.tensor([2, 0])], full[[2, 0]].half()) and torch.equal(torch.stack(list(held)), full.half())
    assert torch.equal(utils.foreground(held, CLASSES), utils.foreground(full, CLASSES).half())
    pooled = utils.load_pairs(brains, 2, utils.data_frame(brains), classes=CLASSES, compact=True, progress=False)[1]
    assert torch.is_tensor(pooled)  # soft occupancies stay as they are
    for compact in (True, False):
        if not compact:
            plain = utils.load_pairs
            monkeypatch.setattr(utils, "load_pairs", lambda *a, **k: plain(*a, **{**k, "compact": False}))
        call("train_vqae", 2, "--preset", "demo", "--data", brains, "--iters", 3, "--out", tmp_path / f"vq{compact}.pth",
             "--classes", "1,2,3,4")
        call("train_registration", 2, brains, "--preset", "demo", "--iters", 2, "--out", tmp_path / f"reg{compact}.pth",
             "--classes", "1,2,3,4", "--augment")
    for name in ("vq", "reg"):
        a, b = weights(tmp_path / f"{name}True.pth"), weights(tmp_path / f"{name}False.pth")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_pipeline_with_classes_in_2d(brains, micro, tmp_path):
    """pipeline.py on the 2D JSON with --classes at micro size: every row, per-label columns, the realism
    reports and figures, the synthetic pairs in the 2D frame."""
    import pipeline

    out = str(tmp_path / "res")
    pipeline.main(["--preset", "demo", "--data", brains, "--out", out, "--seeds", "1", "--num-synth", "4",
                   "--classes", "1,2,3,4"])
    md = open(os.path.join(out, "results.md")).read()
    for col in ("dice_label1_tta", "hd95_label4_tta", "dice_mean_labels_tta", "std_logjac"):
        assert col in md, col
    for row in ("| real-4 |", "| real-4 + synth-4 (4-pair generator) |", "| real-4 + deformed-4 (real pairs, random anatomy) |"):
        assert row in md, row
    for name in ("realism.md", "realism_free.md", "results_tre.png", "results_pairs.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert utils.spatial_dims(utils.recorded_frame(os.path.join(out, "synth"))) == 2
