"""The whole experiment in one resumable command: VQ-AE -> tokens -> diffusion -> synthetic pairs ->
registration nets trained on real / synthetic / real+synthetic pairs -> Dice/TRE table.

    python pipeline.py --preset demo|cpu|paper [--data FOLDER] [--val FOLDER] [--landmarks FOLDER]
                       [--out results/PRESET] [--seeds 3] [--num-synth N] [--force STAGE ...]

Each stage calls the stage script's own main() with the command line a user would type, so what
runs here is exactly what the README documents. A stage whose outputs exist and whose command line
is unchanged is skipped (a killed run resumes); --force STAGE redoes it (a prefix such as `reg`
matches all registration stages). --preset demo without --data makes phantom pairs first.
"""
import argparse
import glob
import inspect
import json
import os
import shutil
import time

import numpy as np

import evaluate_registration
import infer_vqae
import make_phantoms
import synthesise
import train_diffusion
import train_registration
import train_vqae
import utils

# batch sizes per stage, synthetic pairs, TTA iterations, phantoms made for the demo
PRESETS = {
    "paper": dict(vqae_batch=8, diff_batch=8, reg_batch=8, num_synth=256, tta=50, augment=0),
    "cpu": dict(vqae_batch=2, diff_batch=32, reg_batch=2, num_synth=256, tta=50, augment=20),
    "demo": dict(vqae_batch=2, diff_batch=16, reg_batch=2, num_synth=32, tta=10, augment=4, n_train=6, n_val=3),
}
ROWS = {"real": "real training pairs", "synth": "synthetic pairs", "mix": "real + synthetic pairs"}


class Stages:
    """Runs a stage unless its outputs exist with the same command line (kept in stages.json)."""

    def __init__(self, out, force):
        self.out, self.force = out, force
        self.path, self.times_path = os.path.join(out, "stages.json"), os.path.join(out, "times.json")
        self.done = json.load(open(self.path)) if os.path.exists(self.path) else {}
        # seconds per stage, kept across resumed runs (the table reports every stage's share)
        self.times = json.load(open(self.times_path)) if os.path.exists(self.times_path) else {}

    def __call__(self, name, outputs, fn, argv, preset=None, inputs=()):
        # the record: command line, the stage's preset table (editing a preset re-runs the stage) and
        # the modification times of the files it reads (a re-made checkpoint re-runs what uses it)
        table = getattr(inspect.getmodule(fn), "PRESETS", {}).get(preset)
        argv = [str(a) for a in argv]
        # paths as absolute paths, so `../data` and `/abs/data` for the same folder are the same run
        record = {"argv": [os.path.abspath(a) if os.sep in a else a for a in argv],
                  "preset": json.loads(json.dumps(table, default=str)),
                  "inputs": {os.path.abspath(i): os.path.getmtime(i) for i in inputs}}
        forced = any(name.startswith(f) for f in self.force)
        if not forced and self.done.get(name) == record and all(os.path.exists(o) for o in outputs):
            print(f"[pipeline] {name}: done, skipped")
            return
        for o in outputs:  # stale or forced: start clean
            shutil.rmtree(o) if os.path.isdir(o) else (os.path.exists(o) and os.remove(o))
        print(f"[pipeline] {name}: {fn.__module__}.py {' '.join(argv)}")
        t = time.time()
        fn(argv)
        self.times[name] = time.time() - t
        self.done[name] = record
        utils.write_json(self.path, self.done)
        utils.write_json(self.times_path, self.times)


def mix_folder(real, synth, out):
    """real + synthetic pairs in one folder of symbolic links (names do not collide)."""
    os.makedirs(out, exist_ok=True)
    for f in glob.glob(os.path.join(real, "case_*_[12].nii.gz")) + glob.glob(os.path.join(synth, "case_*_[12].nii.gz")):
        link = os.path.join(out, os.path.basename(f))
        if not os.path.exists(link):
            os.symlink(os.path.abspath(f), link)
    return out


def sign_flip_p(d, rounds=20000, seed=0):
    """Two-sided paired permutation (sign-flip) test of mean(d) = 0."""
    d = np.asarray(d)
    flips = np.random.default_rng(seed).choice([-1, 1], size=(rounds, len(d)))
    return float((np.abs((flips * d).mean(1)) >= abs(d.mean()) - 1e-12).mean())


def figures(out, evals, real, synth, factor, n=4):
    """results_tre.png: per-landmark TRE box plots per row (net, tta; seeds pooled);
    results_pairs.png: MIPs of real training pairs next to synthetic ones (fixed blue, moving orange)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for i, k in enumerate(("net", "tta")):
        data = [np.concatenate([np.genfromtxt(f[:-5] + ".csv", delimiter=",", names=True, dtype=None,
                                              encoding=None)[k] for f in files]) for files in evals.values()]
        ax[i].boxplot(data, showfliers=False)
        ax[i].set_xticks(range(1, len(data) + 1), [r.replace(" / ", "/\n").replace(" + ", " +\n") for r in evals],
                         fontsize=7)
        ax[i].set_title(f"TRE after the {'net alone' if k == 'net' else 'net + TTA'} (mm)")
    utils.save_figure(fig, os.path.join(out, "results_tre.png"))
    fig, ax = plt.subplots(2, n, figsize=(3 * n, 6.2))
    for row, folder in enumerate((real, synth)):
        for j, c in enumerate(utils.find_pairs(folder)[:n]):
            pair = [utils.framed_volume(os.path.join(folder, f"{c}_{k}.nii.gz"), factor).numpy() for k in (1, 2)]
            ax[row, j].imshow(utils.mip_rgb(*pair)), ax[row, j].axis("off")
            ax[row, j].set_title(f"{'real' if row == 0 else 'synthetic'} {c}", fontsize=8)
    utils.save_figure(fig, os.path.join(out, "results_pairs.png"))


def report(out, seeds, times, preset, real=None, synth=None):
    """results.md: the paper-style table (mean +- sd over seeds), a per-case comparison, figures."""
    evals = {"initial / TTA only": [os.path.join(out, "eval_none.json")]}
    evals.update({ROWS[r]: [os.path.join(out, f"eval_{r}_s{s}.json") for s in range(seeds)] for r in ROWS})
    evals = {k: [f for f in v if os.path.exists(f)] for k, v in evals.items()}  # a partial run: rows so far
    cols = [f"tre_{k}_{q}" for k in ("net", "tta") for q in ("mean", "p25", "p50", "p75")] + ["dice_tta", "folding_pct"]
    lines = [f"# Results ({preset} preset)", "", "TRE in mm (mean over landmarks; mean ± sd over seeds); "
             "`net` = registration net alone, `tta` = after test-time adaptation.", "",
             "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    first = json.load(open(evals["initial / TTA only"][0]))
    lines.append("| initial | " + f"{first['tre_initial_mean']:.2f} (Dice {first['dice_initial']:.3f})" + " |" * len(cols))
    for name, files in evals.items():
        if not files:
            lines.append(f"| {name} | not run yet |" + " |" * (len(cols) - 1))
            continue
        js = [json.load(open(f)) for f in files]
        cells = [f"{np.mean([j[c] for j in js]):.2f} ± {np.std([j[c] for j in js]):.2f}" if len(js) > 1
                 else f"{js[0][c]:.2f}" for c in cols]
        partial = f" ({len(js)} of {seeds} seeds)" if name in ROWS.values() and len(js) < seeds else ""
        lines.append(f"| {name} | " + " | ".join(cells) + partial + " |")
    per_case = {}
    for r in ("real", "synth"):
        csvs = [os.path.join(out, f"eval_{r}_s{s}.csv") for s in range(seeds)]
        rows = [np.genfromtxt(c, delimiter=",", names=True, dtype=None, encoding=None) for c in csvs
                if os.path.exists(c)]
        if not rows:
            break
        cases = sorted(set(rows[0]["case"]))
        per_case[r] = {k: np.array([np.mean([x[k][x["case"] == c].mean() for x in rows]) for c in cases])
                       for k in ("net", "tta")}
    for k in ("net", "tta") if len(per_case) == 2 else ():
        if k == "net":
            lines += ["", f"Per case, synthetic vs real ({len(cases)} cases, TRE averaged over seeds):", ""]
        d = per_case["synth"][k] - per_case["real"][k]
        lines.append(f"- {k}: synthetic better in {(d < 0).sum()}/{len(d)} cases, mean difference {d.mean():+.2f} mm, "
                     f"paired sign-flip permutation p = {sign_flip_p(d):.3f}")
    total = sum(times.values())
    lines += ["", f"Wall time per stage (summed over resumed runs): total {total / 60:.1f} min", ""]
    lines += [f"- {k}: {v / 60:.1f} min ({100 * v / max(total, 1e-9):.0f} %)" for k, v in times.items()]
    if real and synth:
        figures(out, {k: v for k, v in evals.items() if v}, real, synth, train_registration.PRESETS[preset]["factor"])
    lines += ["", "Figures: `results_tre.png` (TRE box plots per row), `results_pairs.png` (real vs synthetic pairs).", ""]
    md = "\n".join(lines) + "\n"
    with utils.atomic_path(os.path.join(out, "results.md")) as tmp:
        open(tmp, "w").write(md)
    print(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="demo")
    ap.add_argument("--data"), ap.add_argument("--val"), ap.add_argument("--landmarks")
    ap.add_argument("--out")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--num-synth", type=int)
    ap.add_argument("--reg-iters", type=int, help="override the registration preset's iterations")
    ap.add_argument("--force", nargs="*", default=[], metavar="STAGE")
    a = ap.parse_args(argv)
    p, P = PRESETS[a.preset], a.preset
    out = a.out or os.path.join("results", P)
    os.makedirs(out, exist_ok=True)
    run = Stages(out, a.force)
    if a.data is None:
        if P != "demo":
            raise utils.DataError("--data is required for the cpu and paper presets")
        a.data, a.val = os.path.join(out, "phantoms_train"), os.path.join(out, "phantoms_val")
        run("phantoms_train", [a.data], make_phantoms.main, [a.data, p["n_train"], "--seed", 0])
        run("phantoms_val", [a.val], make_phantoms.main, [a.val, p["n_val"], "--seed", 1000])
    if a.val is None:
        raise utils.DataError("--val is required with --data")
    lms = a.landmarks or os.path.join(a.val, "landmarks")
    f = lambda name: os.path.join(out, name)  # noqa: E731
    run("vqae", [f("vqae.pth")], train_vqae.main,
        [p["vqae_batch"], "--preset", P, "--data", a.data, "--val", a.val, "--out", f("vqae.pth")], P)
    run("tokens", [f("tokens.pth")], infer_vqae.main,
        [f("vqae.pth"), "--data", a.data, "--out", f("tokens.pth"), "--augment", p["augment"]], P, [f("vqae.pth")])
    # validation pairs' tokens: held-out reconstruction Dice and the diffusion model's validation loss
    run("tokens_val", [f("tokens_val.pth")], infer_vqae.main,
        [f("vqae.pth"), "--data", a.val, "--out", f("tokens_val.pth")], P, [f("vqae.pth")])
    run("diffusion", [f("diffusion.pth")], train_diffusion.main,
        [p["diff_batch"], f("tokens.pth"), "--val", f("tokens_val.pth"), "--vqae", f("vqae.pth"), "--preset", P,
         "--out", f("diffusion.pth")], P, [f("tokens.pth"), f("tokens_val.pth")])
    n = a.num_synth or p["num_synth"]
    run("synth", [f("synth")], synthesise.main,
        [n, "--preset", P, "--diffusion", f("diffusion.pth"), "--vqae", f("vqae.pth"), "--out", f("synth")], P, [f("diffusion.pth"), f("vqae.pth")])
    folders = {"real": a.data, "synth": f("synth"), "mix": mix_folder(a.data, f("synth"), f("mix"))}
    reads = {"real": [a.data], "synth": [f("synth")], "mix": [a.data, f("synth")]}  # mix/ only holds links
    iters = ["--iters", a.reg_iters] if a.reg_iters else []
    ev = ["--data", a.val, "--landmarks", lms, "--overwrite"]
    run("eval_none", [f("eval_none.json")], evaluate_registration.main,
        [p["tta"], "none", "--preset", P, "--out", f("eval_none"), *ev], P)
    for r, folder in folders.items():
        for s in range(a.seeds):
            ck = f(f"reg_{r}_s{s}.pth")
            run(f"reg_{r}_s{s}", [ck], train_registration.main,
                [p["reg_batch"], folder, "--preset", P, "--seed", s, "--out", ck, *iters], P, reads[r])
            run(f"eval_{r}_s{s}", [f(f"eval_{r}_s{s}.json")], evaluate_registration.main,
                [p["tta"], ck, "--out", f(f"eval_{r}_s{s}"), *ev], P, [ck])
    report(out, a.seeds, run.times, P, a.data, f("synth"))


if __name__ == "__main__":
    utils.run_main(main)
