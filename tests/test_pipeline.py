"""pipeline.py end to end at a micro size (the demo preset with its iteration counts cut down),
resume after a deleted output, and --force."""
import os
import re
import time

import numpy as np
import pytest
import torch

import decode_tokens
import make_phantoms
import pipeline
import utils


ROW_ORDER = ("real", "augmented", "synth", "mix", "warped", "deformed")  # the rows of a plain run


def stages_run(out, label=None):
    """The stages a log shows running (a curve's: of every N, or of the run labelled ` (N = n)`)."""
    tail = r"(?: \(N = \d+\))?" if label is None else re.escape(label)
    return re.findall(rf"\[pipeline\] (\w+){tail}: (?!done|changed)", out)


def contents(path):
    """A file's bytes, or for a checkpoint its tensors and values (bit for bit) as nested lists."""
    if not path.endswith(".pth"):
        return open(path, "rb").read()

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return (x.dtype, x.shape, x.view(-1).view(torch.uint8).tolist() if x.numel() else []) if torch.is_tensor(x) else x
    return plain(torch.load(path, weights_only=True))


def test_pipeline_micro_resume_and_force(micro, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "res")
    argv = ["--preset", "demo", "--out", out, "--seeds", "1", "--num-synth", "4"]
    pipeline.main(argv)
    captured = capsys.readouterr()
    first = stages_run(captured.out)
    assert "warning" not in captured.err  # the demo's phantoms are held out: nothing to warn about
    assert first[:6] == ["phantoms_train", "phantoms_val", "vqae", "tokens", "tokens_val", "diffusion"]
    assert first[8:11] == ["warped", "deformed", "realism_free"]
    for name in ("results.md", "eval_none.csv", "eval_real_s0.json", "eval_synth_s0.json", "eval_mix_s0.json",
                 "eval_augmented_s0.json", "eval_warped_s0.json", "eval_deformed_s0.json", "synth/manifest.json",
                 "warped/manifest.json", "deformed/deformed_dataset.json", "realism_free.md"):
        assert os.path.exists(os.path.join(out, name)), name
    md = open(os.path.join(out, "results.md")).read()
    for row in ("initial", "TTA only", "| real-3 |", "| synth-4, generator on 3 pairs |",
                "| real-3 + synth-4 (3-pair generator) |", "- synth-4, generator on 3 pairs: net",
                "| real-3 augmented (random affine + field per batch) |", "| real-3 + warped-4 (real maps, random motion) |",
                "| real-3 + deformed-4 (real pairs, random anatomy) |", "Per case against real-3 + synth-4 (3-pair generator)",
                "- real-3 + warped-4 (real maps, random motion): net", "free baselines' warped and deformed pairs"):
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

    # --force redoes stages (a prefix names several) and --jobs 2 runs the rows in two 1-thread worker
    # processes: they compute what one process computes, bit for bit
    # (checkpoints compared by content: torch.save names its archive after the writing process's temporary
    # file). Forked workers only: spawned ones (after CUDA) would not see this test's micro presets.
    if torch.cuda.is_initialized():
        return
    rows = ["eval_none.csv"] + [f"{f}_{r}_s0.{e}" for r in ROW_ORDER for f, e in (("reg", "pth"), ("eval", "csv"))]
    before = {f: contents(os.path.join(out, f)) for f in rows}
    del before["reg_synth_s0.pth"]["note"]  # the edit above; the forced training writes it afresh
    # the synthetic pairs too: the rows that train on them wait for them in the other worker
    for name in [f for f in os.listdir(os.path.join(out, "synth")) if f.endswith(".nii.gz")]:
        before["synth/" + name] = contents(os.path.join(out, "synth", name))
    pipeline.main(argv + ["--force", "reg_", "eval_", "synth", "--jobs", "2"])
    text = capsys.readouterr().out
    # the pairs remade bit for bit; the manifest records seconds, so the realism reports run again
    assert sorted(set(stages_run(text)) - {"realism", "realism_free"}) == sorted(
        ["synth", "eval_none"] + [f"{k}_{r}_s0" for r in ROW_ORDER for k in ("reg", "eval")])
    assert "11 stage chains, 2 at a time (1 threads each)" in text and "min wall" in text
    for f in rows:
        assert contents(os.path.join(out, f)) == before[f], f
    pipeline.main(argv + ["--jobs", "2"])  # and its records are the parent's: nothing left to redo
    assert stages_run(capsys.readouterr().out) == []

    # a second generator on token grids (3 of the training pairs' cases and 2 more) into the same
    # folder: its stages and rows are added, the real rows are not recomputed
    cases = utils.pair_ids(os.path.join(out, "phantoms_train")) + ["case_900", "case_901"]
    grids = torch.randint(6, (len(cases), 4, 4, 4), generator=torch.Generator().manual_seed(0)) * 3
    utils.write_tokens(str(tmp_path / "tok.pth"), grids, cases, 32, {"factor": 1, "frame": utils.LUNG250M4B})
    monkeypatch.setitem(decode_tokens.PRESETS, "demo", dict(decode_tokens.PRESETS["demo"], iters=3))
    pipeline.main(argv + ["--generator-tokens", str(tmp_path / "tok.pth")])
    text = capsys.readouterr().out
    assert stages_run(text) == ["decode", "diffusion_tok", "synth_tok", "realism_tok", "realism_free_tok"] + [
        f"{k}_{r}_s0" for r in ("decoded", "synth_tok", "mix_tok") for k in ("reg", "eval")]
    md = open(os.path.join(out, "results.md")).read()
    for row in ("| real-3 |", "| decoded-5 (token grids decoded) |", "| synth-4, generator on 3 pairs |",
                "| synth-4, generator on 5 token grids |", "| real-3 + synth-4 (5-grid generator) |",
                "- synth-4, generator on 5 token grids: net", "Realism (frame pooled by 4; real training pairs, decoded"):
        assert row in md, row
    assert len(utils.pair_ids(os.path.join(out, "mix_tok"))) == 3 + 4
    pipeline.main(argv)  # the first generator again: nothing to redo, every row stays in the table
    assert stages_run(capsys.readouterr().out) == []
    assert "| synth-4, generator on 5 token grids |" in open(os.path.join(out, "results.md")).read()


def test_pipeline_needs_val_with_data(tmp_path):
    with pytest.raises(utils.DataError, match="--val"):
        pipeline.main(["--preset", "cpu", "--data", str(tmp_path), "--out", str(tmp_path / "o")])


def threads_stage(argv):
    """A stage that writes the number of torch threads its process runs with to argv[0]."""
    open(argv[0], "w").write(str(torch.get_num_threads()))


def test_run_chains_spawned_workers_and_a_failing_stage(tmp_path, capsys):
    """Workers with more than one thread are spawned (a forked OpenMP hangs) and get their share of
    the threads; they write what the stage writes alone. A failing stage fails the run after the
    running ones are finished and recorded."""
    n = torch.get_num_threads()
    torch.set_num_threads(4)  # 2 jobs x 2 threads: spawned workers
    try:
        def chains(root, bad=False):
            return [[dict(name=f"ph{i}_{k}", outputs=[str(root / f"ph{i}_{k}")], fn=make_phantoms.main,
                          argv=[str(root / f"ph{i}_{k}"), 0 if bad and i == 1 else 1, "--seed", i + k,
                                "--size", 32, 26, 32]) for k in range(2)]
                    + [dict(name=f"threads{i}", outputs=[str(root / f"threads{i}")], fn=threads_stage,
                            argv=[str(root / f"threads{i}")])] for i in range(2)]
        pipeline.run_chains(pipeline.Stages(str(tmp_path / "a"), []), chains(tmp_path / "a"), 1)
        pipeline.run_chains(pipeline.Stages(str(tmp_path / "b"), []), chains(tmp_path / "b"), 2)
        assert "2 stage chains, 2 at a time (2 threads each)" in capsys.readouterr().out
        for i in range(2):
            assert open(tmp_path / "a" / f"threads{i}").read() == "4"
            assert open(tmp_path / "b" / f"threads{i}").read() == "2"
            for k in range(2):
                for c in utils.pair_ids(str(tmp_path / "a" / f"ph{i}_{k}")):
                    for j in (1, 2):
                        a, b = (utils.load_volume(str(tmp_path / x / f"ph{i}_{k}" / f"{c}_{j}.nii.gz")) for x in "ab")
                        assert np.array_equal(a, b)
        with pytest.raises(utils.DataError, match=">= 1"):
            pipeline.run_chains(pipeline.Stages(str(tmp_path / "c"), []), chains(tmp_path / "c", bad=True), 2)
        done = utils.read_json(str(tmp_path / "c" / "stages.json"))
        assert done["ph0_0"]["complete"] and not done["ph1_0"]["complete"] and "ph1_1" not in done
    finally:
        torch.set_num_threads(n)


def slow_write_stage(argv):
    time.sleep(float(argv[1]))
    open(argv[0], "w").write("made")


def copy_stage(argv):
    open(argv[1], "w").write(open(argv[0]).read())  # fails if the stage it needs has not written argv[0]


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_chains_waits_for_the_stages_a_chain_needs(tmp_path, jobs):
    """A chain listed first whose stage needs another chain's (`after`) waits for it, while a chain
    that needs nothing runs beside it; a stage done before counts as settled; a need that no chain
    meets, or (one job) a chain listed before what it needs, is an error, not a hang."""
    run = pipeline.Stages(str(tmp_path), [])
    made, copied, free = (str(tmp_path / f) for f in ("made", "copied", "free"))

    def stage(name, fn, argv, **more):
        return dict(name=name, outputs=[argv[-1] if fn is copy_stage else argv[0]], fn=fn, argv=argv, **more)
    waiting = [stage("copy", copy_stage, [made, copied], after=[(str(tmp_path), "make")])]
    chains = [[stage("make", slow_write_stage, [made, 0.5])], [stage("free", slow_write_stage, [free, 0])]]
    if jobs == 1:
        with pytest.raises(RuntimeError, match="copy is listed before"):
            pipeline.run_chains(run, [waiting] + chains, 1)
        pipeline.run_chains(run, chains + [waiting], 1)
    else:
        pipeline.run_chains(run, [waiting] + chains, 2)
    assert open(copied).read() == "made" and os.path.exists(free)
    os.remove(copied)
    pipeline.run_chains(run, [waiting] + chains, 2)  # "make" is skipped (done): "copy" may go at once
    assert open(copied).read() == "made"
    orphan = [stage("copy2", copy_stage, [made, copied + "2"], after=[(str(tmp_path), "nothing")])]
    with pytest.raises(RuntimeError, match="copy2 waits for stages no chain runs"):
        pipeline.run_chains(run, chains + [orphan], 2)


def test_report_compares_rows_over_the_seeds_both_have(tmp_path):
    """A partial run (real-10 with seeds 0 and 1, synth only seed 0): the per-case test pairs seed 0
    with seed 0, not synth's seed 0 with the mean of real's two seeds."""
    out = str(tmp_path)
    stats = {f"tre_{k}_{q}": 5.0 for k in ("net", "tta") for q in ("mean", "p25", "p50", "p75")}
    stats.update(dice_tta=0.7, folding_pct=0.0, tre_initial_mean=14.0, dice_initial=0.2)
    utils.write_json(os.path.join(out, "eval_none.json"), stats)
    cases = ["case_001", "case_002", "case_003"]
    tre = {("real", 0): [10.0, 10.0, 10.0], ("real", 1): [20.0, 20.0, 20.0], ("synth", 0): [9.0, 11.0, 8.0]}
    for (row, s), values in tre.items():
        utils.write_json(os.path.join(out, f"eval_{row}_s{s}.json"), stats)
        with open(os.path.join(out, f"eval_{row}_s{s}.csv"), "w") as f:
            f.write("case,net,tta\n" + "".join(f"{c},{v},{v / 2}\n" for c, v in zip(cases, values)))
    pipeline.report(out, 2, {}, "demo", labels={"real": "real-3", "synth": "synth-4"})
    md = open(os.path.join(out, "results.md")).read()
    # seed 0 alone: differences -1, +1, -2 (mean -0.67, 2 of 3 better); with real's mean over both seeds: -6.67
    assert "- synth-4 (seeds 0): net -0.67 mm, better in 2/3" in md
    assert "| synth-4 | " in md and "(1 of 2 seeds)" in md


def test_held_out_check_compares_contents_not_names(phantoms, tmp_path, capsys):
    """The demo's training and validation phantoms share names (case_000 ...) but not contents: no
    warning. A validation pair copied into the training folder under another name is found."""
    import shutil

    val = str(tmp_path / "val")
    make_phantoms.make_pairs(val, 2, seed=1000)
    assert pipeline.shared_pairs(phantoms, val) == ([], [])
    train = str(tmp_path / "train")
    shutil.copytree(phantoms, train)
    for k in (1, 2):
        shutil.copy(os.path.join(val, f"case_001_{k}.nii.gz"), os.path.join(train, f"copy_{k}.nii.gz"))
    assert pipeline.shared_pairs(train, val) == (["case_001"], ["copy"])
    pipeline.warn_overlap(pipeline.shared_pairs(train, val)[0], train)
    assert "holds validation cases (case_001)" in capsys.readouterr().err


def test_curve_micro_nested_subsets_extra_set_and_resume(micro, tmp_path, capsys):
    """--curve 2,3 on 3 training phantoms with one of them also an extra evaluation pair: nested subsets
    with the extra pair last, each N a run of its own without the synthetic-only row (N = every pair:
    an earlier plain run in OUT/n3 is reused, nothing redone), the extra set evaluated only where no
    subset holds it, curve.md / curve.png (with two jobs: one queue over every N); a second call (one job)
    redoes nothing."""
    import shutil

    train, val = str(tmp_path / "train"), str(tmp_path / "val")
    make_phantoms.make_pairs(train, 3, seed=0)
    make_phantoms.make_pairs(val, 2, seed=1000)
    extra_lms = tmp_path / "extra_lms"
    extra_lms.mkdir()
    shutil.copy(os.path.join(train, "landmarks", "case_000.csv"), extra_lms)  # case_000: held to the end
    out = str(tmp_path / "curve")
    common = ["--preset", "demo", "--data", train, "--val", val, "--seeds", "1", "--num-synth", "2"]
    pipeline.main(common + ["--out", os.path.join(out, "n3")])  # a plain run first: the curve's N = 3 reuses it
    capsys.readouterr()
    argv = common + ["--out", out, "--curve", "3,2", "--extra-val", train, "--extra-landmarks", str(extra_lms)]
    pipeline.main(argv + ["--jobs", "2"])  # one queue for every N, each N's stages recorded in its own folder
    text = capsys.readouterr().out
    assert "N = 3: the subset holds extra evaluation pairs" in text
    assert stages_run(text, " (N = 3)") == [] and "vqae" in stages_run(text, " (N = 2)")
    assert utils.read_json(os.path.join(out, "subsets.json")) == {"n2": ["case_001", "case_002"],
                                                                   "n3": ["case_001", "case_002", "case_000"]}
    assert utils.pair_ids(os.path.join(out, "subsets", "n2")) == ["case_001", "case_002"]
    assert not os.path.exists(os.path.join(out, "subsets", "n3"))  # N = every pair: the data itself
    for n in (2, 3):
        sub = os.path.join(out, f"n{n}")
        seen = {c.split("_aug")[0] for c in utils.read_tokens(os.path.join(sub, "tokens.pth"))["case_ids"]}
        assert seen == set(utils.read_json(os.path.join(out, "subsets.json"))[f"n{n}"])  # the subset alone
        for r in ("real", "augmented", "mix", "warped", "deformed"):
            assert os.path.exists(os.path.join(sub, f"eval_{r}_s0.json")), (n, r)
        assert os.path.exists(os.path.join(sub, "reg_synth_s0.pth")) == (n == 3)  # the plain run's row
        assert os.path.exists(os.path.join(sub, "eval_extra_real_s0.json")) == (n == 2)
        assert f"| real-{n} |" in open(os.path.join(sub, "results.md")).read()
    md = open(os.path.join(out, "curve.md")).read()
    for line in ("| 2 | real-2 |", "| 3 | real-3 + deformed-2 (real pairs, random anatomy) |",
                 "## extra evaluation pairs (pseudo ground truth)", "N = 2: Per case against real-2 + synth-2"):
        assert line in md, line
    assert md.count("| 3 |") == 5  # the validation pairs only
    assert os.path.exists(os.path.join(out, "curve.png"))
    pipeline.main(argv)
    assert stages_run(capsys.readouterr().out) == []


@pytest.mark.parametrize("curve,extra,message", [
    ("2,9", False, "fewer than N = 9"), ("1,2", False, "at least 2"), ("2,2", False, "listed once"),
    ("2,x", False, "expected pair counts"), ("2,3", True, "not held out")])
def test_curve_bad_input_is_refused_before_any_work(phantoms, tmp_path, run, curve, extra, message):
    """Bad --curve values, and a validation set that holds a training pair of a subset: one line, no stage run."""
    import shutil

    val = str(tmp_path / "val")
    make_phantoms.make_pairs(val, 1, seed=1000)
    if extra:  # a training pair copied into the validation set under another name
        for k in (1, 2):
            shutil.copy(os.path.join(phantoms, f"case_002_{k}.nii.gz"), os.path.join(val, f"copy_{k}.nii.gz"))
        shutil.copy(os.path.join(phantoms, "landmarks", "case_002.csv"), os.path.join(val, "landmarks", "copy.csv"))
    out = tmp_path / "out"
    proc = run("pipeline.py", "--preset", "demo", "--data", phantoms, "--val", val, "--out", out, "--curve", curve)
    from conftest import assert_one_line_error
    assert_one_line_error(proc, message)
    assert not os.path.exists(out / "stages.json") and not os.path.exists(out / "n2")
