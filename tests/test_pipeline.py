"""pipeline.py end to end at a micro size (the demo preset with its iteration counts cut down),
resume after a deleted output, and --force."""
import os
import re

import pytest
import torch

import decode_tokens
import pipeline
import train_diffusion
import train_registration
import train_vqae
import utils


@pytest.fixture
def micro(monkeypatch):
    """The demo preset with a handful of iterations per stage (seconds instead of minutes), one
    thread (tiny models on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setitem(train_vqae.PRESETS, "demo", dict(train_vqae.PRESETS["demo"], samples=16, val_every=4))
    monkeypatch.setitem(train_diffusion.PRESETS, "demo", dict(train_diffusion.PRESETS["demo"], samples=64))
    monkeypatch.setitem(train_registration.PRESETS, "demo", dict(train_registration.PRESETS["demo"], iters=3))
    monkeypatch.setitem(pipeline.PRESETS, "demo", dict(pipeline.PRESETS["demo"], tta=2, augment=1, n_train=3,
                                                        n_val=2))
    yield
    torch.set_num_threads(n)


def stages_run(out):
    return re.findall(r"\[pipeline\] (\w+): (?!done|changed)", out)


def test_pipeline_micro_resume_and_force(micro, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "res")
    argv = ["--preset", "demo", "--out", out, "--seeds", "1", "--num-synth", "4"]
    pipeline.main(argv)
    first = stages_run(capsys.readouterr().out)
    assert first[:6] == ["phantoms_train", "phantoms_val", "vqae", "tokens", "tokens_val", "diffusion"]
    for name in ("results.md", "eval_none.csv", "eval_real_s0.json", "eval_synth_s0.json", "eval_mix_s0.json",
                 "synth/manifest.json"):
        assert os.path.exists(os.path.join(out, name)), name
    md = open(os.path.join(out, "results.md")).read()
    for row in ("initial", "TTA only", "| real-3 |", "| synth-4, generator on 3 pairs |",
                "| real-3 + synth-4 (3-pair generator) |", "- synth-4, generator on 3 pairs: net"):
        assert row in md, row
    assert "paired sign-flip permutation test" in md

    # nothing changed: every stage is skipped
    pipeline.main(argv)
    assert stages_run(capsys.readouterr().out) == []

    # the same folder spelled as a relative path is the same run (nothing deleted, nothing re-run)
    monkeypatch.chdir(tmp_path)
    pipeline.main(["--preset", "demo", "--out", "res", "--seeds", "1", "--num-synth", "4"])
    assert stages_run(capsys.readouterr().out) == []

    # a deleted output re-runs its stage; remade byte for byte (same seed), its readers stay
    ck_path = os.path.join(out, "reg_synth_s0.pth")
    os.remove(ck_path)
    pipeline.main(argv)
    assert stages_run(capsys.readouterr().out) == ["reg_synth_s0"]
    # a changed checkpoint re-runs the stage that reads it, nothing else
    torch.save(dict(torch.load(ck_path, weights_only=True), note="edited"), ck_path)
    pipeline.main(argv)
    out_text = capsys.readouterr().out
    assert stages_run(out_text) == ["eval_synth_s0"]
    assert f"changed since its last run ({ck_path})" in out_text

    # --force redoes one stage (a prefix names several)
    pipeline.main(argv + ["--force", "eval_"])
    assert stages_run(capsys.readouterr().out) == ["eval_none", "eval_real_s0", "eval_synth_s0", "eval_mix_s0"]

    # a second generator on token grids (3 of the training pairs' cases and 2 more) into the same
    # folder: its stages and rows are added, the real rows are not recomputed
    cases = utils.find_pairs(os.path.join(out, "phantoms_train")) + ["case_900", "case_901"]
    grids = torch.randint(6, (len(cases), 4, 4, 4), generator=torch.Generator().manual_seed(0)) * 3
    utils.write_tokens(str(tmp_path / "tok.pth"), grids, cases, 32, {"factor": 1})
    monkeypatch.setitem(decode_tokens.PRESETS, "demo", dict(decode_tokens.PRESETS["demo"], iters=3))
    pipeline.main(argv + ["--generator-tokens", str(tmp_path / "tok.pth")])
    text = capsys.readouterr().out
    assert stages_run(text) == ["decode", "diffusion_tok", "synth_tok", "realism_tok"] + [
        f"{k}_{r}_s0" for r in ("decoded", "synth_tok", "mix_tok") for k in ("reg", "eval")]
    md = open(os.path.join(out, "results.md")).read()
    for row in ("| real-3 |", "| decoded-5 (token grids decoded) |", "| synth-4, generator on 3 pairs |",
                "| synth-4, generator on 5 token grids |", "| real-3 + synth-4 (5-grid generator) |",
                "- synth-4, generator on 5 token grids: net", "Realism (4 mm; real training pairs, decoded"):
        assert row in md, row
    assert len(os.listdir(os.path.join(out, "mix_tok"))) == 2 * (3 + 4)
    pipeline.main(argv)  # the first generator again: nothing to redo, every row stays in the table
    assert stages_run(capsys.readouterr().out) == []
    assert "| synth-4, generator on 5 token grids |" in open(os.path.join(out, "results.md")).read()


def test_pipeline_needs_val_with_data(tmp_path):
    with pytest.raises(utils.DataError, match="--val"):
        pipeline.main(["--preset", "cpu", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
