"""The whole experiment in one resumable command: VQ-AE -> tokens -> diffusion -> synthetic pairs ->
registration nets trained on real / synthetic / real+synthetic pairs -> Dice/TRE table.

    python pipeline.py --preset demo|cpu|paper [--data DATA] [--val DATA] [--landmarks FOLDER]
                       [--generator-tokens TOKENS] [--out results/PRESET] [--seeds N] [--num-synth N]
                       [--reg-iters N] [--frame derived|lung250m4b] [--force STAGE ...] [--jobs 1]

DATA: a folder of ID_1 / ID_2 pairs (then --val is required, with landmark CSVs in --landmarks,
default VAL/landmarks) or a Learn2Reg dataset JSON (--val defaults to its registration_val pairs and
their keypoints). --frame: see utils.data_frame (default: derived for a JSON, lung250m4b for a folder).

The generator trains on --data (the registration nets' real pairs) unless --generator-tokens names
a token file whose VQ-AE is not available (the reference's 97 grids; not in the paper's code): then
decode_tokens.py fits a decoder on the --data pairs that have a grid there, its decoded pairs become
one more row, and the diffusion model trains on the token grids themselves. Both kinds of generator
can share one --out: the real rows are computed once and results.md holds every row run so far,
named by what its nets trained on, each tested per case against the real pairs.

Each stage calls the stage script's own main() with the command line a user would type, so what
runs here is exactly what the README documents. A stage whose outputs exist and whose command line
is unchanged is skipped (a killed run resumes); --force STAGE redoes it (a prefix such as `reg`
matches all registration stages). --preset demo without --data makes phantom pairs first.
Everything runs in this one process, except that --jobs N runs N registration trainings and
evaluations at once in worker processes (CPU throughput); for several GPUs run the printed stage
commands under torchrun (README, "More than one GPU").
"""
import argparse
import concurrent.futures as cf
import inspect
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
import torch

import decode_tokens
import evaluate_registration
import infer_vqae
import make_phantoms
import realism_report
import synthesise
import train_diffusion
import train_registration
import train_vqae
import utils

# TTA iterations, augmented token copies per pair, seeds per registration row, phantoms made for the
# demo. Batch sizes and the number of synthetic pairs come from each stage's own preset table.
# decode_folds: decode_tokens.py's K-fold check inside the pipeline (0: none; on 2 cores it would
# cost five more fits, and the check is a measurement of its own: RESULTS.md).
PRESETS = {
    "paper": dict(tta=50, augment=0, seeds=3, decode_folds=5),
    "cpu": dict(tta=50, augment=20, seeds=3, decode_folds=0),
    "demo": dict(tta=10, augment=4, seeds=1, n_train=6, n_val=3, decode_folds=0),
}
# registration rows in report order: the real pairs, the decoded token grids, then each generator's
# synthetic pairs and their mix with the real pairs (plain: the generator trained on --data; _tok: on
# --generator-tokens)
ROWS = ("real", "decoded", "synth", "mix", "synth_tok", "mix_tok")


DIGESTS = {}  # file identity and change times -> digest: every stage of a run lists the data folder again


def digest(path):
    """Size and SHA-256 of a file's bytes: a copy of the same data (a re-mounted or re-copied data
    folder gets new modification times) is the same input, an edited file is not."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # ctime: any write or utime moves it
    if key not in DIGESTS:
        DIGESTS[key] = [st.st_size, utils.sha256(path)]
    return list(DIGESTS[key])


def changed_inputs(old, new):
    """The input paths (files inside folders named relative to them) whose record (a file's [size,
    sha256], a folder's {name: ...}) differs."""
    out = []
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [os.path.join(path, k) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(path)
    return out


def contents(path):
    """What a stage reads, for its record: the digest of every file below `path` (links followed), so
    editing, adding or removing any input file re-runs the stage. A dataset JSON stands for its folder
    (the images and keypoints it lists)."""
    if path.endswith("_dataset.json"):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        return digest(path)
    found = {}
    for root, _, files in os.walk(path, followlinks=True):
        for name in sorted(files):
            full = os.path.join(root, name)
            if os.path.exists(full):  # a dangling link is not an input
                found[os.path.relpath(full, path)] = digest(full)
    return found


class Stages:
    """Runs a stage unless its outputs exist from a complete run with the same record (kept in
    stages.json). A training stage killed midway is resumed from its checkpoint (--resume)."""

    def __init__(self, out, force):
        self.out, self.force = out, force
        self.path, self.times_path = os.path.join(out, "stages.json"), os.path.join(out, "times.json")
        self.done = json.load(open(self.path)) if os.path.exists(self.path) else {}
        # seconds per stage, kept across resumed runs (the table reports every stage's share)
        self.times = json.load(open(self.times_path)) if os.path.exists(self.times_path) else {}

    def __call__(self, name, outputs, fn, argv, preset=None, inputs=(), resume=None):
        """resume: the arguments that continue an interrupted run of the stage (None: it restarts)."""
        job = self.plan(name, outputs, fn, argv, preset, inputs, resume)
        if job:
            t = time.time()
            fn(job["argv"])
            self.finish(job, time.time() - t)

    def plan(self, name, outputs, fn, argv, preset=None, inputs=(), resume=None):
        """None if the stage is done; otherwise its outputs are cleared (or kept to resume), it is
        recorded as started and returned as a job {name, record, fn, argv} for finish()."""
        # the record: command line, the stage's preset table (editing a preset re-runs the stage) and
        # the contents of the files it reads (a changed input or re-made checkpoint re-runs it)
        table = getattr(inspect.getmodule(fn), "PRESETS", {}).get(preset)
        argv = [str(a) for a in argv]
        # paths as absolute paths, so `../data` and `/abs/data` for the same folder are the same run
        record = {"argv": [os.path.abspath(a) if os.sep in a else a for a in argv],
                  "preset": json.loads(json.dumps(table, default=str)),
                  "inputs": {os.path.abspath(i): contents(i) for i in inputs}}
        forced = any(name.startswith(f) for f in self.force)
        previous = self.done.get(name, {})
        changed = [k for k in ("argv", "preset") if previous.get(k) != record[k]]
        changed += changed_inputs(previous.get("inputs", {}), record["inputs"])
        same = bool(previous) and not changed
        if not forced and same and previous["complete"] and all(os.path.exists(o) for o in outputs):
            print(f"[pipeline] {name}: done, skipped")
            return None
        if resume is not None and not forced and same and not previous["complete"]:
            argv = argv + resume  # killed midway: continue from its last checkpoint
        else:
            if previous and not forced and not same:  # say why a stage's outputs go
                more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
                print(f"[pipeline] {name}: changed since its last run ({', '.join(changed[:3])}{more}): "
                      "redone from the start")
            for o in outputs:  # stale or forced: start clean
                if os.path.isdir(o):
                    shutil.rmtree(o)
                elif os.path.exists(o):
                    os.remove(o)
        print(f"[pipeline] {name}: {fn.__module__}.py {' '.join(argv)}", flush=True)
        self.done[name] = {**record, "complete": False}
        utils.write_json(self.path, self.done)
        return {"name": name, "record": record, "fn": fn, "argv": argv}

    def finish(self, job, seconds):
        self.times[job["name"]] = seconds
        self.done[job["name"]] = {**job["record"], "complete": True}
        utils.write_json(self.path, self.done)
        utils.write_json(self.times_path, self.times)


def _worker_init(threads):
    """A run_chains worker: its share of the threads, and (Linux) it dies with the pipeline process, so
    a killed pipeline leaves no stage running that a resumed one would redo beside it."""
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_chains(run, chains, jobs):
    """Runs each chain's stages in order (a registration training, then its evaluation: a chain is a
    list of run() keyword arguments). jobs > 1: up to `jobs` chains at once, each stage in a worker
    process with 1/jobs of torch's threads - on a CPU, two 1-thread registration trainings (or test-time
    adaptations) finish more pairs per second than one 2-thread one (RESULTS.md). With the same threads
    per process a stage computes bit for bit what it computes alone; its time in times.json overlaps
    the other workers'. The records stay with this process: a stage is planned when it is its chain's
    turn, so an evaluation reads the checkpoint its training has just written. A failing stage stops
    new ones from starting; the running ones finish and are recorded, then its error is raised."""
    if jobs == 1:
        for chain in chains:
            for stage in chain:
                run(**stage)
        return
    threads = max(1, torch.get_num_threads() // jobs)
    # fork starts a worker with this process's modules as they are, but a forked child's OpenMP
    # hangs in its first region of more than one thread (libgomp), and its CUDA cannot start again
    fork = threads == 1 and sys.platform.startswith("linux") and not torch.cuda.is_initialized()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    print(f"[pipeline] {len(chains)} stage chains, {jobs} at a time ({threads} threads each)", flush=True)
    queue, running, errors = [list(c) for c in chains], {}, []
    start = time.time()
    pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,))
    try:
        while running or (queue and not errors):
            while queue and not errors and len(running) < jobs:
                chain = queue.pop(0)
                while chain:
                    job = run.plan(**chain.pop(0))
                    if job:
                        running[pool.submit(job["fn"], job["argv"])] = (chain, job, time.time())
                        break
            if not running:
                continue
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in done:
                chain, job, t = running.pop(f)
                if f.exception() is not None:
                    errors.append(f.exception())  # the others finish and are recorded; nothing new starts
                    continue
                run.finish(job, time.time() - t)
                if chain:
                    queue.insert(0, chain)  # its next stage (the evaluation) goes first
    except BaseException:
        # this process failed (or was interrupted): stop the workers now rather than wait for their
        # stages; those stay recorded as started and resume from their checkpoints next time
        for p in list(pool._processes.values()):  # no public call stops a busy worker
            p.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise errors[0]
    print(f"[pipeline] {len(chains)} stage chains, {jobs} at a time: {(time.time() - start) / 60:.1f} min wall",
          flush=True)


def mix_folder(real, synth, out, frame):
    """real + synthetic pairs in one folder of symbolic links (real_ID_1, synth_ID_1, ...: names never
    collide) and mix_dataset.json (with the frame: both kinds are placed as for the rows alone),
    rebuilt on every run so it always mirrors the two sources."""
    if (utils.recorded_frame(synth) or utils.LUNG250M4B) != frame:
        raise utils.DataError(f"{synth}: its pairs were made in another frame than {real}'s; they cannot be mixed")
    js = os.path.join(out, "mix_dataset.json")
    if os.path.isdir(out):
        for f in os.listdir(out):
            path = os.path.join(out, f)
            if not os.path.islink(path) and path != js:
                raise utils.DataError(f"{out}: holds {f}, which is not a link this pipeline made")
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    listed = []
    for prefix, source in (("real", real), ("synth", synth)):
        for p in utils.find_pairs(source):
            names = {k: f"{prefix}_{p.id}_{i}.nii.gz" for i, k in ((1, "fixed"), (2, "moving"))}
            for k, name in names.items():
                os.symlink(os.path.abspath(getattr(p, k)), os.path.join(out, name))
            listed.append(names)
    utils.write_dataset_json(js, "mix", listed, frame=frame, description="real and synthetic pairs (links)")
    return out


def sign_flip_p(d, rounds=20000, seed=0):
    """Two-sided paired permutation (sign-flip) test of mean(d) = 0."""
    d = np.asarray(d)
    flips = np.random.default_rng(seed).choice([-1, 1], size=(rounds, len(d)))
    return float((np.abs((flips * d).mean(1)) >= abs(d.mean()) - 1e-12).mean())


def figures(out, evals, real, synth, factor, frame, n=4):
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
        for j, p in enumerate(utils.find_pairs(folder)[:n]):
            pair = [utils.framed_volume(f, factor, utils.recorded_frame(folder) or frame).numpy() for f in (p.fixed, p.moving)]
            ax[row, j].imshow(utils.mip_rgb(*pair))
            ax[row, j].axis("off")
            ax[row, j].set_title(f"{'real' if row == 0 else 'synthetic'} {p.id}", fontsize=8)
    utils.save_figure(fig, os.path.join(out, "results_pairs.png"))


def log_prefix_paths(prefix):
    return [prefix + ext for ext in (".csv", ".json", ".png", ".md")]


def eval_csv(out, row, seed):
    return os.path.join(out, f"eval_{row}_s{seed}.csv")


def per_case_means(out, row, seeds):
    """{case: ...} arrays of a row's per-case TRE (net, tta), averaged over the given seeds; None if none ran."""
    rows = [np.genfromtxt(c, delimiter=",", names=True, dtype=None, encoding=None)
            for c in (eval_csv(out, row, s) for s in seeds) if os.path.exists(c)]
    if not rows:
        return None
    cases = sorted(set(rows[0]["case"]))
    return {k: np.array([np.mean([x[k][x["case"] == c].mean() for x in rows]) for c in cases]) for k in ("net", "tta")}


def report(out, seeds, times, preset, real=None, synth=None, labels=None, frame=None):
    """results.md: the paper-style table (mean +- sd over seeds) of every row run so far in `out`,
    named by labels (kept in rows.json across runs), each row's per-case difference to the real
    pairs with a paired test, stage times, figures."""
    labels_path = os.path.join(out, "rows.json")
    names = utils.read_json(labels_path) if os.path.exists(labels_path) else {}
    names.update(labels or {})
    utils.write_json(labels_path, names)
    evals = {"initial / TTA only": [os.path.join(out, "eval_none.json")]}
    evals.update({names.get(r, r): [os.path.join(out, f"eval_{r}_s{s}.json") for s in range(seeds)]
                  for r in ROWS if r in names})
    evals = {k: [f for f in v if os.path.exists(f)] for k, v in evals.items()}  # a partial run: rows so far
    cols = [f"tre_{k}_{q}" for k in ("net", "tta") for q in ("mean", "p25", "p50", "p75")] + ["dice_tta", "folding_pct"]
    lines = [f"# Results ({preset} preset)", "", "TRE in mm (mean over landmarks; mean ± sd over seeds); "
             "`net` = registration net alone, `tta` = after test-time adaptation. Rows are named by what "
             "the nets trained on.", "", "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    first = json.load(open(evals["initial / TTA only"][0]))
    lines.append("| initial | " + f"{first['tre_initial_mean']:.2f} (Dice {first['dice_initial']:.3f})" + " |" * len(cols))
    for name, files in evals.items():
        if not files:
            lines.append(f"| {name} | not run yet |" + " |" * (len(cols) - 1))
            continue
        js = [json.load(open(f)) for f in files]
        cells = [f"{np.mean([j[c] for j in js]):.2f} ± {np.std([j[c] for j in js]):.2f}" if len(js) > 1
                 else f"{js[0][c]:.2f}" for c in cols]
        partial = f" ({len(js)} of {seeds} seeds)" if name != "initial / TTA only" and len(js) < seeds else ""
        lines.append(f"| {name} | " + " | ".join(cells) + partial + " |")
    # each row against the real pairs over the seeds both have (a partial run may lack some)
    paired = {r: [s for s in range(seeds) if all(os.path.exists(eval_csv(out, x, s)) for x in ("real", r))]
              for r in ROWS[1:] if r in names}
    compared = [(r, ss, per_case_means(out, "real", ss), per_case_means(out, r, ss)) for r, ss in paired.items() if ss]
    if compared:
        n = len(compared[0][2]["net"])
        lines += ["", f"Per case against {names['real']} ({n} cases, TRE averaged over the seeds both rows have; "
                  "negative = better than the real pairs; paired sign-flip permutation test):", ""]
    for r, ss, base, m in compared:
        cells = []
        for k in ("net", "tta"):
            d = m[k] - base[k]
            cells.append(f"{k} {d.mean():+.2f} mm, better in {(d < 0).sum()}/{len(d)}, p = {sign_flip_p(d):.3f}")
        some = f" (seeds {', '.join(map(str, ss))})" if len(ss) < seeds else ""
        lines.append(f"- {names[r]}{some}: " + "; ".join(cells))
    total = sum(times.values())
    lines += ["", f"Time per stage (summed over resumed runs; stages run by --jobs overlap): total {total / 60:.1f} min", ""]
    lines += [f"- {k}: {v / 60:.1f} min ({100 * v / max(total, 1e-9):.0f} %)" for k, v in times.items()]
    for f, what in (("realism", "real training pairs, VQ-AE reconstructions, synthetic pairs"),
                    ("realism_tok", "real training pairs, decoded token grids, synthetic pairs of the token generator")):
        if os.path.exists(os.path.join(out, f + ".md")):
            lines += ["", f"Realism (frame pooled by 4; {what}):", "", open(os.path.join(out, f + ".md")).read().strip()]
    if real and synth:
        figures(out, {k: v for k, v in evals.items() if v}, real, synth, train_registration.PRESETS[preset]["factor"], frame)
    lines += ["", "Figures: `results_tre.png` (TRE box plots per row), `results_pairs.png` (real vs synthetic pairs); "
              "how much deformation the VQ-AE (or the token decoder) and the diffusion model keep: "
              "`realism.csv` / `.png` (`realism_tok.*`).", ""]
    md = "\n".join(lines) + "\n"
    with utils.atomic_path(os.path.join(out, "results.md")) as tmp:
        open(tmp, "w").write(md)
    print(md)


def generator(run, path, preset, data, val, n, tag="", tokens=None, frame_args=()):
    """A generator and its n synthetic pairs (stages and files named with `tag`). Without `tokens`
    the paper's: VQ-AE on the pairs in `data` (`val`: held-out pairs for its and the diffusion
    model's validation), tokens, diffusion. With a token file `tokens`: decode_tokens.py fits a
    decoder on the `data` pairs that have a grid there (`decoded/`), the diffusion model trains on
    the grids. Then synthesis and a realism report. Returns (synthetic folder, decoded folder or None)."""
    p = PRESETS[preset]
    diffusion, synth, batch = path(f"diffusion{tag}.pth"), path(f"synth{tag}"), train_diffusion.PRESETS[preset]["batch"]
    if tokens is None:
        vqae = path(f"vqae{tag}.pth")
        run(f"vqae{tag}", utils.log_paths(vqae), train_vqae.main,
            [train_vqae.PRESETS[preset]["batch"], "--preset", preset, "--data", data, "--val", val, "--out", vqae,
             *frame_args],
            preset, [data, val], resume=["--resume"])
        tokens, val_tokens = path(f"tokens{tag}.pth"), path(f"tokens_val{tag}.pth")
        run(f"tokens{tag}", utils.log_paths(tokens), infer_vqae.main,
            [vqae, "--data", data, "--out", tokens, "--augment", p["augment"]], preset, [vqae, data])
        # validation pairs' tokens: held-out reconstruction Dice and the diffusion model's validation loss
        run(f"tokens_val{tag}", utils.log_paths(val_tokens), infer_vqae.main,
            [vqae, "--data", val, *(["--split", "val"] if utils.dataset_json(val) else []), "--out", val_tokens], preset,
            [vqae, val])
        decoder, inputs, decoded = ["--vqae", vqae], [tokens, val_tokens, vqae], None
        train_args = ["--val", val_tokens]
        # the deformation each generator stage keeps: real vs VQ-AE reconstructions vs synthetic pairs
        groups, realism = [synth], ["--vqae", vqae]
    else:
        decoded = path("decoded")
        run("decode", [decoded], decode_tokens.main,
            [tokens, "--data", data, "--out", decoded, "--preset", preset, "--folds", p["decode_folds"]], preset,
            [tokens, data], resume=[])  # decode_tokens.py keeps finished fits
        model = os.path.join(decoded, "decoder.pth")
        decoder, inputs, train_args = ["--decoder", model], [tokens, model], []
        groups, realism = [decoded, synth], []
    run(f"diffusion{tag}", utils.log_paths(diffusion), train_diffusion.main,
        [batch, tokens, *train_args, *decoder, "--preset", preset, "--out", diffusion], preset, inputs,
        resume=["--resume"])
    run(f"synth{tag}", [synth], synthesise.main,
        [n, "--preset", preset, "--diffusion", diffusion, *decoder, "--out", synth], preset, [diffusion, inputs[-1]],
        resume=[])  # synthesise.py keeps complete pairs
    report = path(f"realism{tag}")
    run(f"realism{tag}", log_prefix_paths(report), realism_report.main,
        [*groups, "--reference", data, "--val", val, *realism, "--out", report, "--overwrite", *frame_args], preset,
        [data, val, *groups, *realism[1:]])
    return synth, decoded


def reg_chain(out, tag, data, reads, preset, seed, tta, val, landmarks, iters=(), frame_args=()):
    """One registration row and seed as a stage chain: reg_TAG trains on `data` (the files it reads:
    `reads`), then eval_TAG evaluates its net on `val` with `tta` test-time-adaptation iterations."""
    ck = os.path.join(out, f"reg_{tag}.pth")
    ev = ["--data", val, *(["--landmarks", landmarks] if landmarks else []), "--overwrite"]
    return [dict(name=f"reg_{tag}", outputs=[ck], fn=train_registration.main, preset=preset, inputs=reads,
                 argv=[train_registration.PRESETS[preset]["batch"], data, "--preset", preset, "--seed", seed,
                       "--out", ck, *iters, *frame_args], resume=["--resume"]),
            dict(name=f"eval_{tag}", outputs=[os.path.join(out, f"eval_{tag}.json")], fn=evaluate_registration.main,
                 argv=[tta, ck, "--out", os.path.join(out, f"eval_{tag}"), *ev], preset=preset,
                 inputs=[ck, val, *([landmarks] if landmarks else [])])]


def warn_overlap(both, source):
    """Validation cases that the nets or the generator saw make rows that are not held out: say so."""
    if both:
        print(f"[pipeline] warning: {source} holds validation cases ({', '.join(both[:3])}"
              f"{' ...' if len(both) > 3 else ''}): the rows are not held out", file=sys.stderr)


def shared_pairs(train, val):
    """Validation pairs whose fixed volume is byte for byte one of the training pairs' (whatever the names)."""
    seen = {digest(p.fixed)[1] for p in utils.find_pairs(train)}
    return [p.id for p in utils.find_pairs(val, utils.val_split(val)) if digest(p.fixed)[1] in seen]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="demo")
    ap.add_argument("--data")
    ap.add_argument("--val")
    ap.add_argument("--landmarks")
    ap.add_argument("--out")
    ap.add_argument("--seeds", type=int, help="seeds per registration row (default: the preset's, 1 at demo, else 3)")
    ap.add_argument("--num-synth", type=int)
    ap.add_argument("--generator-tokens", metavar="TOKENS",
                    help="token grids the generator trains on, decoded by a decoder fitted on --data (not in the paper)")
    ap.add_argument("--reg-iters", type=int, help="override the registration preset's iterations")
    ap.add_argument("--frame", choices=utils.FRAME_NAMES, help="the frame of the real pairs (utils.data_frame)")
    ap.add_argument("--force", nargs="*", default=[], metavar="STAGE")
    ap.add_argument("--jobs", type=int, default=1,
                    help="registration trainings and evaluations run this many at a time, each in its own process "
                         "with 1/JOBS of the threads (on a 2-core CPU: 2; RESULTS.md)")
    args = ap.parse_args(argv)
    utils.check_positive({"--seeds": args.seeds, "--num-synth": args.num_synth, "--reg-iters": args.reg_iters,
                          "--jobs": args.jobs})
    preset = args.preset
    p = PRESETS[preset]
    seeds = p["seeds"] if args.seeds is None else args.seeds
    out = args.out or os.path.join("results", preset)
    os.makedirs(out, exist_ok=True)
    run = Stages(out, args.force)
    data, val = args.data, args.val
    if data is None:
        if preset != "demo":
            raise utils.DataError("--data is required for the cpu and paper presets")
        data = os.path.join(out, "phantoms_train")
        val = os.path.join(out, "phantoms_val")
        run("phantoms_train", [data], make_phantoms.main, [data, p["n_train"], "--seed", 0])
        run("phantoms_val", [val], make_phantoms.main, [val, p["n_val"], "--seed", 1000])
    if val is None and utils.dataset_json(data):
        val = data  # its registration_val pairs
    if val is None:
        raise utils.DataError("--val is required with a --data folder")
    lms = args.landmarks or (None if utils.dataset_json(val) else os.path.join(val, "landmarks"))
    frame_args = ["--frame", args.frame] if args.frame else []
    frame = utils.data_frame(data, args.frame)
    train_ids = [p.id for p in utils.find_pairs(data)]  # every input checked before the first stage runs
    for pair in utils.find_pairs(val, utils.val_split(val)):
        utils.pair_landmarks(pair, frame, lms)
    warn_overlap(shared_pairs(data, val), data)

    def path(name):
        return os.path.join(out, name)

    n = synthesise.PRESETS[preset]["num_pairs"] if args.num_synth is None else args.num_synth
    real = f"real-{len(train_ids)}"
    if args.generator_tokens:
        grids = utils.read_tokens(args.generator_tokens)
        # the reference's grids are named by their Lung250M-4B case ids: names are all there is to compare
        val_ids = {p.id for p in utils.find_pairs(val, utils.val_split(val))}
        warn_overlap(sorted(set(grids["case_ids"]) & val_ids), args.generator_tokens)
        synth, decoded = generator(run, path, preset, data, val, n, "_tok", args.generator_tokens, frame_args)
        folders = {"decoded": decoded, "synth_tok": synth, "mix_tok": mix_folder(data, synth, path("mix_tok"), frame)}
        k = len(grids["tokens"])
        labels = {"decoded": f"decoded-{k} (token grids decoded)", "synth_tok": f"synth-{n}, generator on {k} token grids",
                  "mix_tok": f"{real} + synth-{n} ({k}-grid generator)"}
    else:  # the paper's: the generator trains on the real pairs
        k = len(train_ids)
        synth = generator(run, path, preset, data, val, n, frame_args=frame_args)[0]
        folders = {"synth": synth, "mix": mix_folder(data, synth, path("mix"), frame)}
        labels = {"synth": f"synth-{n}, generator on {k} pairs", "mix": f"{real} + synth-{n} ({k}-pair generator)"}
    folders = {"real": data, **folders}
    labels = {"real": real, **labels}
    # a mix stage reads the pairs behind mix/'s links
    reads = {r: [data, folders["synth" + r[3:]]] if r.startswith("mix") else [f] for r, f in folders.items()}
    iters = ["--iters", args.reg_iters] if args.reg_iters else []
    ev = ["--data", val, *(["--landmarks", lms] if lms else []), "--overwrite", *frame_args]
    # seed-major: a run stopped part-way has the same seeds of every row, which the per-case tests pair
    chains = [reg_chain(out, f"{r}_s{s}", folders[r], reads[r], preset, s, p["tta"], val, lms, iters,
                        frame_args if r == "real" else [])
              for s in range(seeds) for r in ROWS if r in folders]
    # the short TTA-only baseline last: with --jobs the long chains start first
    chains.append([dict(name="eval_none", outputs=[path("eval_none.json")], fn=evaluate_registration.main,
                        argv=[p["tta"], "none", "--preset", preset, "--out", path("eval_none"), *ev], preset=preset,
                        inputs=[val, *([lms] if lms else [])])])
    run_chains(run, chains, args.jobs)
    report(out, seeds, run.times, preset, data, synth, labels, frame)


if __name__ == "__main__":
    utils.run_main(main)
