"""The whole experiment in one resumable command: VQ-AE -> tokens -> diffusion -> synthetic pairs ->
registration nets trained on real / synthetic / real+synthetic pairs -> Dice/TRE table.

    python pipeline.py --preset demo|cpu|paper [--data DATA] [--val DATA] [--landmarks FOLDER]
                       [--generator-tokens TOKENS] [--out results/PRESET] [--seeds N] [--num-synth N]
                       [--reg-iters N] [--frame derived|lung250m4b] [--classes L] [--force STAGE ...] [--jobs 1]

DATA: a folder of ID_1 / ID_2 pairs (then --val is required, with landmark CSVs in --landmarks,
default VAL/landmarks) or a Learn2Reg dataset JSON (--val defaults to its registration_val pairs and
their keypoints; an inter-subject JSON trains on pairs drawn from its images, utils.inter_subject_pairs,
and without keypoints every table, test and figure scores Dice instead of TRE). --frame: see utils.data_frame (default: derived for a JSON or 2D images, lung250m4b for a
folder of 3D pairs).

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
Everything runs in this one process, except that --jobs N runs N stage chains at once in worker
processes (CPU throughput): the generator's chain beside the registration rows that do not need its
pairs (with --curve: every N's generator first); for several GPUs run the printed stage commands
under torchrun (README, "More than one GPU").
"""
import argparse
import concurrent.futures as cf
import functools
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
import deform_pairs
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
# registration rows in report order: the real pairs (plain and augmented on the fly), the decoded
# token grids, each generator's synthetic pairs and their mix with the real pairs (plain: the
# generator trained on --data; _tok: on --generator-tokens), the real pairs mixed with the free
# baselines' pairs (deform_pairs.py). The free rows are tested against the real pairs and against
# the generator's mix.
ROWS = ("real", "augmented", "decoded", "synth", "mix", "warped", "deformed", "synth_tok", "mix_tok")
FREE = ("augmented", "warped", "deformed")
CURVE_ROWS = tuple(r for r in ROWS if r != "synth")  # --curve drops the synthetic-only row


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

    def __init__(self, out, force, label=""):
        self.out, self.force, self.label = out, force, label  # label: a run's name in a log of several runs
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
            print(f"[pipeline] {name}{self.label}: done, skipped")
            return None
        if resume is not None and not forced and same and not previous["complete"]:
            argv = argv + resume  # killed midway: continue from its last checkpoint
        else:
            if previous and not forced and not same:  # say why a stage's outputs go
                more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
                print(f"[pipeline] {name}{self.label}: changed since its last run ({', '.join(changed[:3])}{more}): "
                      "redone from the start")
            for o in outputs:  # stale or forced: start clean
                if os.path.isdir(o):
                    shutil.rmtree(o)
                elif os.path.exists(o):
                    os.remove(o)
        print(f"[pipeline] {name}{self.label}: {fn.__module__}.py {' '.join(argv)}", flush=True)
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
    list of run() keyword arguments, plus optionally `stages`: the Stages that records it (default
    `run`), `after`: (out, name) of stages of these chains that must be done or skipped first, and
    `prepare`: a call made in this process just before it is planned, such as linking a mix folder).
    jobs > 1: up to `jobs` chains at once, the first ready one in the list first, each stage in a worker
    process with 1/jobs of torch's threads - on a CPU, two 1-thread stages finish more work per second
    than one 2-thread one (RESULTS.md). With the same threads per process a stage computes bit for bit
    what it computes alone; its time in times.json overlaps the other workers'. The records stay with
    this process: a stage is planned when it is its chain's turn, so an evaluation reads the checkpoint
    its training has just written. A failing stage stops new ones from starting; the running ones
    finish and are recorded, then its error is raised."""
    settled = set()  # (out, name) of the stages done or skipped in this call: what `after` waits for

    def ready(chain):
        return all(key in settled for key in chain[0].get("after", ()))

    def plan(stage):
        """The stage as a job for its Stages, or None (done: skipped)."""
        stage = dict(stage)
        stages = stage.pop("stages", run)
        stage.pop("after", None)
        prepare = stage.pop("prepare", None)
        if prepare:
            prepare()
        job = stages.plan(**stage)
        if job is None:
            settled.add((stages.out, stage["name"]))
            return None
        return {**job, "stages": stages}

    def finish(job, seconds):
        job["stages"].finish(job, seconds)
        settled.add((job["stages"].out, job["name"]))

    if jobs == 1:
        for chain in chains:
            for i, stage in enumerate(chain):
                if not ready(chain[i:]):
                    raise RuntimeError(f"stage {stage['name']} is listed before the stages it needs")
                job = plan(stage)
                if job:
                    t = time.time()
                    job["fn"](job["argv"])
                    finish(job, time.time() - t)
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
            while not errors and len(running) < jobs:
                chain = next((c for c in queue if ready(c)), None)
                if chain is None:
                    break
                queue.remove(chain)
                while chain:
                    try:
                        job = plan(chain.pop(0))
                    except Exception as e:  # a mix folder refused: the running stages still finish
                        errors.append(e)
                        break
                    if job:
                        running[pool.submit(job["fn"], job["argv"])] = (chain, job, time.time())
                        break
                    if chain and not ready(chain):
                        queue.insert(0, chain)  # its next stage waits for another chain's
                        break
            if not running:
                if queue and not errors:
                    raise RuntimeError(f"stage {queue[0][0]['name']} waits for stages no chain runs")
                continue
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in done:
                chain, job, t = running.pop(f)
                if f.exception() is not None:
                    errors.append(f.exception())  # the others finish and are recorded; nothing new starts
                    continue
                finish(job, time.time() - t)
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


def link_folder(sources, out, frame=None, description="", name=None, split="train"):
    """A folder of symbolic links to the pairs of `sources` [(prefix, folder, ids or None = all)] of
    `split` (names PREFIX_ID_1.nii.gz, or ID_1.nii.gz without a prefix: they never collide) and, with
    a frame, OUT/NAME_dataset.json recording it (every source is placed as on its own; NAME: the
    folder's), rebuilt on every run so it always mirrors its sources."""
    name = name or os.path.basename(os.path.normpath(out))
    js = os.path.join(out, name + "_dataset.json")
    if os.path.isdir(out):
        for f in os.listdir(out):
            path = os.path.join(out, f)
            if not os.path.islink(path) and path != js:
                raise utils.DataError(f"{out}: holds {f}, which is not a link this pipeline made")
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    listed = []
    for prefix, source, ids in sources:
        for p in utils.find_pairs(source, split):
            if ids is not None and p.id not in ids:
                continue
            names = {k: f"{prefix + '_' if prefix else ''}{p.id}_{i}.nii.gz" for i, k in ((1, "fixed"), (2, "moving"))}
            for k, name in names.items():
                os.symlink(os.path.abspath(getattr(p, k)), os.path.join(out, name))
            listed.append(names)
    if frame:
        utils.write_dataset_json(js, name, listed, frame=frame, description=description)
    return out


def mix_folder(real, synth, out, frame):
    """real + synthetic (or baseline) pairs in one folder of links (link_folder)."""
    if (utils.recorded_frame(synth) or utils.LUNG250M4B) != frame:
        raise utils.DataError(f"{synth}: its pairs were made in another frame than {real}'s; they cannot be mixed")
    return link_folder([("real", real, None), ("synth", synth, None)], out, frame, "real and generated pairs (links)",
                       name="mix")


def sign_flip_p(d, rounds=20000, seed=0):
    """Two-sided paired permutation (sign-flip) test of mean(d) = 0."""
    d = np.asarray(d)
    flips = np.random.default_rng(seed).choice([-1, 1], size=(rounds, len(d)))
    return float((np.abs((flips * d).mean(1)) >= abs(d.mean()) - 1e-12).mean())


def figures(out, evals, real, synth, factor, frame, n=4):
    """results_tre.png: per-landmark TRE box plots per row (net, tta; seeds pooled);
    results_pairs.png: MIPs of real training pairs next to synthetic ones (fixed blue, moving orange)."""
    import matplotlib.pyplot as plt

    tre = metric(out) == "tre"
    fig, ax = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for i, k in enumerate(("net", "tta")):
        data = [np.concatenate([np.genfromtxt(f[:-5] + ".csv", delimiter=",", names=True, dtype=None, encoding=None,
                                              ndmin=1)[k] for f in files]) for files in evals.values()]
        ax[i].boxplot(data, showfliers=False)
        ax[i].set_xticks(range(1, len(data) + 1), [r.replace(" / ", "/\n").replace(" + ", " +\n") for r in evals],
                         fontsize=7)
        ax[i].set_title(f"{'TRE' if tre else 'Dice per pair'} after the {'net alone' if k == 'net' else 'net + TTA'}"
                        f"{' (mm)' if tre else ''}")
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


def metric(out, prefix="eval"):
    """What a run's evaluations score: "tre" (landmarks, mm, lower is better) or "dice" (pairs without
    keypoints, higher is better), from its TTA-only evaluation."""
    path = os.path.join(out, f"{prefix}_none.json")
    return json.load(open(path)).get("metric", "tre") if os.path.exists(path) else "tre"


def score(j, k):
    """A row's summary score after `k` (net, tta): mean TRE, or mean Dice (over labels with classes)."""
    return j[f"tre_{k}_mean"] if j.get("metric", "tre") == "tre" else j.get(f"dice_mean_labels_{k}", j[f"dice_{k}"])


def eval_csv(out, row, seed, prefix="eval"):
    return os.path.join(out, f"{prefix}_{row}_s{seed}.csv")


def per_case_means(out, row, seeds, prefix="eval"):
    """{net, tta: arrays of a row's per-case TRE (or Dice), averaged over the given seeds}; None if none ran."""
    rows = [np.genfromtxt(c, delimiter=",", names=True, dtype=None, encoding=None, ndmin=1)
            for c in (eval_csv(out, row, s, prefix) for s in seeds) if os.path.exists(c)]
    if not rows:
        return None
    cases = sorted(set(rows[0]["case"]))
    return {k: np.array([np.mean([x[k][x["case"] == c].mean() for x in rows]) for c in cases]) for k in ("net", "tta")}


def per_case_tests(out, seeds, names, base_row, rows, prefix="eval"):
    """results.md lines: each row's per-case TRE difference to base_row's, over the seeds both have (a
    partial run may lack some), with a paired sign-flip test; none if base_row has not run."""
    paired = {r: [s for s in range(seeds) if all(os.path.exists(eval_csv(out, x, s, prefix)) for x in (base_row, r))]
              for r in rows}
    compared = [(r, ss, per_case_means(out, base_row, ss, prefix), per_case_means(out, r, ss, prefix))
                for r, ss in paired.items() if ss]
    if not compared:
        return []
    n = len(compared[0][2]["net"])
    tre = metric(out, prefix) == "tre"
    lines = ["", f"Per case against {names[base_row]} ({n} cases, {'TRE' if tre else 'Dice'} averaged over the seeds "
             f"both rows have; {'negative' if tre else 'positive'} = better than {names[base_row]}; paired sign-flip "
             "permutation test):", ""]
    for r, ss, base, m in compared:
        cells = []
        for k in ("net", "tta"):
            d = m[k] - base[k]
            better = (d < 0) if tre else (d > 0)
            cells.append(f"{k} {d.mean():+.2f} mm" if tre else f"{k} Dice {d.mean():+.3f}")
            cells[-1] += f", better in {better.sum()}/{len(d)}, p = {sign_flip_p(d):.3f}"
        some = f" (seeds {', '.join(map(str, ss))})" if len(ss) < seeds else ""
        lines.append(f"- {names[r]}{some}: " + "; ".join(cells))
    return lines


def compare_rows(out, seeds, names, prefix="eval"):
    """Per-case tests of every row against the real pairs and of each free baseline against the
    generator's mix (real + synthetic; the paper's generator's where both ran)."""
    mix = "mix" if "mix" in names else "mix_tok"
    lines = []
    for base_row, rows in (("real", ROWS[1:]), (mix, FREE)):
        lines += per_case_tests(out, seeds, names, base_row, [r for r in rows if r in names and r != base_row], prefix)
    return lines


def tre_table(out, names, seeds, prefix):
    """The markdown table of every row's PREFIX_ROW_sS.json evaluations run so far -> {row name: [files]}
    of the rows run, with "lines": the table."""
    evals = {"initial / TTA only": [os.path.join(out, f"{prefix}_none.json")]}
    evals.update({names.get(r, r): [os.path.join(out, f"{prefix}_{r}_s{s}.json") for s in range(seeds)]
                  for r in ROWS if r in names})
    evals = {k: [f for f in v if os.path.exists(f)] for k, v in evals.items()}  # a partial run: rows so far
    first = json.load(open(evals["initial / TTA only"][0]))
    tre = first.get("metric", "tre") == "tre"
    cols = [f"tre_{k}_{q}" for k in ("net", "tta") for q in ("mean", "p25", "p50", "p75") if tre]
    cols += ["dice_tta", "folding_pct"] if tre else ["dice_net", "dice_tta", "folding_pct"]
    for v in first.get("classes") or []:  # label maps: Dice and HD95 (mm) of each label after TTA
        cols += [f"dice_label{v}_tta", f"hd95_label{v}_tta"]
    if first.get("classes"):
        cols += ["dice_mean_labels_tta", "hd95_tta", "std_logjac"]
    lines = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append("| initial | " + (f"{first['tre_initial_mean']:.2f} " if tre else "") + f"(Dice {first['dice_initial']:.3f})"
                 + " |" * len(cols))
    for name, files in evals.items():
        if not files:
            lines.append(f"| {name} | not run yet |" + " |" * (len(cols) - 1))
            continue
        js = [json.load(open(f)) for f in files]
        d = 2 if tre else 3  # Dice differences are in the third decimal
        cells = [f"{np.mean([j[c] for j in js]):.{d}f} ± {np.std([j[c] for j in js]):.{d}f}" if len(js) > 1
                 else f"{js[0][c]:.{d}f}" for c in cols]
        partial = f" ({len(js)} of {seeds} seeds)" if name != "initial / TTA only" and len(js) < seeds else ""
        lines.append(f"| {name} | " + " | ".join(cells) + partial + " |")
    return {**evals, "lines": lines}


def report(out, seeds, times, preset, real=None, synth=None, labels=None, frame=None):
    """results.md: the paper-style table (mean +- sd over seeds) of every row run so far in `out`,
    named by labels (kept in rows.json across runs), each row's per-case difference to the real
    pairs with a paired test, stage times, figures."""
    labels_path = os.path.join(out, "rows.json")
    names = utils.read_json(labels_path) if os.path.exists(labels_path) else {}
    names.update(labels or {})
    utils.write_json(labels_path, names)
    evals = tre_table(out, names, seeds, "eval")
    what = ("TRE in mm (mean over landmarks; mean ± sd over seeds)" if metric(out) == "tre" else
            "No keypoints: Dice (mean over pairs, and per label; mean ± sd over seeds)")
    lines = [f"# Results ({preset} preset)", "", f"{what}; `net` = registration net alone, `tta` = after test-time "
             "adaptation. Rows are named by what the nets trained on.", ""] + evals.pop("lines")
    lines += compare_rows(out, seeds, names)
    if os.path.exists(os.path.join(out, "eval_extra_none.json")):  # a second evaluation set, apart
        lines += ["", "Extra evaluation set (pseudo ground truth, e.g. corrField keypoints of held-out training "
                  "pairs; reported apart from the validation pairs):", ""] + tre_table(out, names, seeds, "eval_extra")["lines"]
        lines += compare_rows(out, seeds, names, "eval_extra")
    total = sum(times.values())
    lines += ["", f"Time per stage (summed over resumed runs; stages run by --jobs overlap): total {total / 60:.1f} min", ""]
    lines += [f"- {k}: {v / 60:.1f} min ({100 * v / max(total, 1e-9):.0f} %)" for k, v in times.items()]
    for f, what in (("realism", "real training pairs, VQ-AE reconstructions, synthetic pairs"),
                    ("realism_tok", "real training pairs, decoded token grids, synthetic pairs of the token generator"),
                    ("realism_free", "real training pairs, synthetic pairs, the free baselines' warped and deformed pairs"),
                    ("realism_free_tok", "the same with the token generator's synthetic pairs")):
        if os.path.exists(os.path.join(out, f + ".md")):
            lines += ["", f"Realism (frame pooled by 4; {what}):", "", open(os.path.join(out, f + ".md")).read().strip()]
    if real and synth:
        figures(out, {k: v for k, v in evals.items() if v}, real, synth, utils.preset_factor(train_registration.PRESETS[preset], frame), frame)
    lines += ["", f"Figures: `results_tre.png` ({'TRE' if metric(out) == 'tre' else 'per-pair Dice'} box plots per row), "
              "`results_pairs.png` (real vs synthetic pairs); "
              "how much deformation the VQ-AE (or the token decoder) and the diffusion model keep: "
              "`realism.csv` / `.png` (`realism_tok.*`).", ""]
    md = "\n".join(lines) + "\n"
    with utils.atomic_path(os.path.join(out, "results.md")) as tmp:
        open(tmp, "w").write(md)
    print(md)


def generator(stage, path, preset, data, val, n, tag="", tokens=None, frame_args=(), class_args=(), merge_args=()):
    """A generator and its n synthetic pairs (stages and files named with `tag`), as one stage chain
    (`stage`: makes a stage of this run). Without `tokens` the paper's: VQ-AE on the pairs in `data`
    (`val`: held-out pairs for its and the diffusion model's validation), tokens, diffusion. With a
    token file `tokens`: decode_tokens.py fits a decoder on the `data` pairs that have a grid there
    (`decoded/`), the diffusion model trains on the grids. Then synthesis and a realism report.
    Returns (the chain, synthetic folder, decoded folder or None)."""
    p = PRESETS[preset]
    diffusion, synth, batch = path(f"diffusion{tag}.pth"), path(f"synth{tag}"), train_diffusion.PRESETS[preset]["batch"]
    chain = []
    if tokens is None:
        vqae = path(f"vqae{tag}.pth")
        chain.append(stage(f"vqae{tag}", utils.log_paths(vqae), train_vqae.main,
                           [train_vqae.PRESETS[preset]["batch"], "--preset", preset, "--data", data, "--val", val,
                            "--out", vqae, *frame_args, *class_args],
                           [data, val], resume=["--resume"]))
        tokens, val_tokens = path(f"tokens{tag}.pth"), path(f"tokens_val{tag}.pth")
        chain.append(stage(f"tokens{tag}", utils.log_paths(tokens), infer_vqae.main,
                           [vqae, "--data", data, "--out", tokens, "--augment", p["augment"]], [vqae, data]))
        # validation pairs' tokens: held-out reconstruction Dice and the diffusion model's validation loss
        chain.append(stage(f"tokens_val{tag}", utils.log_paths(val_tokens), infer_vqae.main,
                           [vqae, "--data", val, *(["--split", "val"] if utils.dataset_json(val) else []),
                            "--out", val_tokens],
                           [vqae, val]))
        decoder, inputs, decoded = ["--vqae", vqae], [tokens, val_tokens, vqae], None
        train_args = ["--val", val_tokens]
        # the deformation each generator stage keeps: real vs VQ-AE reconstructions vs synthetic pairs
        groups, realism = [synth], ["--vqae", vqae]
    else:
        decoded = path("decoded")
        chain.append(stage("decode", [decoded], decode_tokens.main,
                           [tokens, "--data", data, "--out", decoded, "--preset", preset, "--folds", p["decode_folds"]],
                           [tokens, data], resume=[]))  # decode_tokens.py keeps finished fits
        model = os.path.join(decoded, "decoder.pth")
        decoder, inputs, train_args = ["--decoder", model], [tokens, model], []
        groups, realism = [decoded, synth], []
    chain.append(stage(f"diffusion{tag}", utils.log_paths(diffusion), train_diffusion.main,
                       [batch, tokens, *train_args, *decoder, "--preset", preset, "--out", diffusion], inputs,
                       resume=["--resume"]))
    chain.append(stage(f"synth{tag}", [synth], synthesise.main,
                       [n, "--preset", preset, "--diffusion", diffusion, *decoder, "--out", synth],
                       [diffusion, inputs[-1]], resume=[]))  # synthesise.py keeps complete pairs
    report = path(f"realism{tag}")
    chain.append(stage(f"realism{tag}", log_prefix_paths(report), realism_report.main,
                       [*groups, "--reference", data, "--val", val, *realism, "--out", report, "--overwrite",
                        *frame_args, *merge_args],
                       [data, val, *groups, *realism[1:]]))
    return chain, synth, decoded


def reg_chain(stage, out, tag, data, reads, preset, seed, tta, val, landmarks, iters=(), frame_args=(), train_args=(),
              extra=None, **first):
    """One registration row and seed as a stage chain: reg_TAG trains on `data` (the files it reads:
    `reads`; train_args: more of train_registration.py's options; first: `after` / `prepare` of its
    training stage, run_chains), then eval_TAG evaluates its net on `val` with `tta` test-time-adaptation
    iterations; extra: (pairs, landmarks) of a second evaluation set, eval_extra_TAG."""
    ck = os.path.join(out, f"reg_{tag}.pth")
    chain = [stage(f"reg_{tag}", [ck], train_registration.main,
                   [train_registration.PRESETS[preset]["batch"], data, "--preset", preset, "--seed", seed,
                    "--out", ck, *iters, *frame_args, *train_args],
                   reads, resume=["--resume"], **first)]
    for name, pairs, lms in (("eval", val, landmarks), *([("eval_extra", *extra)] if extra else [])):
        ev = ["--data", pairs, *(["--landmarks", lms] if lms else []), "--overwrite"]
        chain.append(stage(f"{name}_{tag}", [os.path.join(out, f"{name}_{tag}.json")], evaluate_registration.main,
                           [tta, ck, "--out", os.path.join(out, f"{name}_{tag}"), *ev], [ck, pairs, *([lms] if lms else [])]))
    return chain


def warn_overlap(both, source):
    """Validation cases that the nets or the generator saw make rows that are not held out: say so."""
    if both:
        print(f"[pipeline] warning: {source} holds validation cases ({', '.join(both[:3])}"
              f"{' ...' if len(both) > 3 else ''}): the rows are not held out", file=sys.stderr)


def shared_pairs(train, val, split=None):
    """(validation pair ids, training pair ids) of the pairs whose fixed volumes are byte for byte the
    same (whatever the names). split: the validation pairs' split (default utils.val_split)."""
    seen = {digest(p.fixed)[1]: p.id for p in utils.find_pairs(train)}
    both = [(p.id, seen[digest(p.fixed)[1]]) for p in utils.find_pairs(val, split or utils.val_split(val))
            if digest(p.fixed)[1] in seen]
    return [v for v, _ in both], [t for _, t in both]


def plan_experiment(out, preset, data, val, lms, seeds, n, reg_iters=None, frame_name=None, force=(),
                    generator_tokens=None, rows=ROWS, extra=None, classes=None, label=""):
    """One run in `out` on the training pairs of `data`: the generator, the free baselines, every
    registration row of `rows` x seed trained and evaluated on `val` (landmarks `lms`; extra: (pairs,
    landmarks) evaluated too, reported apart). classes: label values kept apart by every stage (label
    maps). label: the run's name in the stages' log lines. Every input is checked here, before the first stage. Returns (its stage chains for
    run_chains, the generator's first; a call that writes results.md once they have run)."""
    p = PRESETS[preset]
    run = Stages(out, force, label)
    if extra:  # (data, pair ids, landmark folder) -> (a folder of links to those pairs, landmark folder)
        extra = (link_folder([("", extra[0], extra[1])], os.path.join(out, "extra_val"), split=utils.val_split(extra[0])),
                 extra[2])
    frame_args = ["--frame", frame_name] if frame_name else []
    class_args = ["--classes", ",".join(map(str, classes))] if classes else []
    merge_args = ["--labels", ",".join(map(str, classes))] if classes else []  # the realism reports: the classes' union
    frame = utils.data_frame(data, frame_name)
    train_ids = [p.id for p in utils.find_pairs(data)]  # every input checked before the first stage runs
    utils.evaluation_landmarks(utils.find_pairs(val, utils.val_split(val)), frame, lms)
    warn_overlap(shared_pairs(data, val)[0], data)

    def path(name):
        return os.path.join(out, name)

    def stage(name, outputs, fn, argv, inputs=(), **more):
        return dict(name=name, outputs=outputs, fn=fn, argv=argv, preset=preset, inputs=inputs, stages=run, **more)

    real = f"real-{len(train_ids)}"
    if generator_tokens:
        grids = utils.read_tokens(generator_tokens)
        # the reference's grids are named by their Lung250M-4B case ids: names are all there is to compare
        val_ids = {p.id for p in utils.find_pairs(val, utils.val_split(val))}
        warn_overlap(sorted(set(grids["case_ids"]) & val_ids), generator_tokens)
        tag = "_tok"
        gen, synth, decoded = generator(stage, path, preset, data, val, n, tag, generator_tokens, frame_args)
        mixes = {"mix_tok": synth}
        folders = {"decoded": decoded, "synth_tok": synth}
        made_by = {decoded: "decode"}
        k = len(grids["tokens"])
        labels = {"decoded": f"decoded-{k} (token grids decoded)", "synth_tok": f"synth-{n}, generator on {k} token grids",
                  "mix_tok": f"{real} + synth-{n} ({k}-grid generator)"}
    else:  # the paper's: the generator trains on the real pairs
        tag = ""
        k = len(train_ids)
        gen, synth, _ = generator(stage, path, preset, data, val, n, frame_args=frame_args, class_args=class_args,
                                  merge_args=merge_args)
        mixes = {"mix": synth}
        folders = {"synth": synth}
        made_by = {}
        labels = {"synth": f"synth-{n}, generator on {k} pairs", "mix": f"{real} + synth-{n} ({k}-pair generator)"}
    made_by[synth] = f"synth{tag}"
    chains = [gen]
    # the free baselines: pairs made from the real ones by random fields, and on-the-fly augmentation
    free = {kind: path(kind) for kind in ("warped", "deformed") if kind in rows}
    for kind, folder in free.items():
        chains.append([stage(kind, [folder], deform_pairs.main,
                             [kind, data, n, "--preset", preset, "--out", folder, *frame_args, *class_args],
                             [data], resume=[])])  # deform_pairs.py keeps complete pairs
        made_by[folder] = kind
    if free:  # beside the synthetic pairs of this generator
        report_path = path(f"realism_free{tag}")
        groups = [synth, *free.values()]
        chains.append([stage(f"realism_free{tag}", log_prefix_paths(report_path), realism_report.main,
                             [*groups, "--reference", data, "--val", val, "--out", report_path, "--overwrite",
                              *frame_args, *merge_args],
                             [data, val, *groups], after=[(out, made_by[g]) for g in groups])])
    mixes.update(free)
    labels.update(augmented=f"{real} augmented (random affine + field per batch)",
                  warped=f"{real} + warped-{n} (real maps, random motion)",
                  deformed=f"{real} + deformed-{n} (real pairs, random anatomy)")
    # a mix folder links the pairs of its source once they are made, before its first training is planned
    mix_dirs = {r: path(r if r.startswith("mix") else "mix_" + r) for r in mixes}
    prepare = {r: functools.cache(functools.partial(mix_folder, data, source, mix_dirs[r], frame))
               for r, source in mixes.items()}
    folders.update(mix_dirs)
    folders.update(real=data, augmented=data)
    labels["real"] = real
    reads = {r: [data, mixes[r]] if r in mixes else [f] for r, f in folders.items()}  # a mix reads the pairs behind its links
    source_of = {r: mixes.get(r, f) for r, f in folders.items()}
    iters = ["--iters", reg_iters] if reg_iters else []
    # seed-major: a run stopped part-way has the same seeds of every row, which the per-case tests pair
    chains += [reg_chain(stage, out, f"{r}_s{s}", folders[r], reads[r], preset, s, p["tta"], val, lms, iters,
                         frame_args if r in ("real", "augmented") else [],
                         [*(["--augment"] if r == "augmented" else []), *class_args], extra,
                         after=[(out, made_by[source_of[r]])] if source_of[r] in made_by else [],
                         **({"prepare": prepare[r]} if r in prepare else {}))
               for s in range(seeds) for r in ROWS if r in folders and r in rows]
    # the short TTA-only baselines last: with --jobs the long chains start first
    for name, pairs, marks in (("eval_none", val, lms), *([("eval_extra_none", *extra)] if extra else [])):
        ev = ["--data", pairs, *(["--landmarks", marks] if marks else []), "--overwrite", *frame_args, *class_args]
        chains.append([stage(name, [path(name + ".json")], evaluate_registration.main,
                             [p["tta"], "none", "--preset", preset, "--out", path(name), *ev],
                             [pairs, *([marks] if marks else [])])])
    return chains, functools.partial(report, out, seeds, run.times, preset, data, synth,
                                     {r: v for r, v in labels.items() if r in rows}, frame)


def experiment(out, preset, data, val, lms, seeds, n, jobs=1, **kw):
    """plan_experiment's run: its stages (--jobs: the generator's chain beside the others), then results.md."""
    chains, finish = plan_experiment(out, preset, data, val, lms, seeds, n, **kw)
    run_chains(None, chains, jobs)
    finish()


def curve_sizes(text, available):
    """--curve N,N,...: distinct pair counts from 2 to the `available` training pairs, in increasing order."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise utils.DataError(f"--curve {text}: expected pair counts such as 2,5,10")
    if min(sizes) < 2 or len(set(sizes)) != len(sizes):
        raise utils.DataError(f"--curve {text}: every N must be at least 2 and listed once")
    if max(sizes) > available:
        raise utils.DataError(f"--curve {text}: the data hold {available} training pairs, fewer than N = {max(sizes)}")
    return sorted(sizes)


def nested_subsets(ids, sizes, held=()):
    """{N: the first N training pair ids}: sorted by id, the pairs of the extra evaluation set (`held`)
    last, so N = 2 is inside N = 5 is inside N = 10 and small N leave the extra set held out."""
    order = sorted(ids, key=lambda i: (i in held, i))
    return {n: order[:n] for n in sizes}


CURVE_NAMES = {"real": "real-N", "augmented": "real-N augmented", "mix": "real-N + synth (N-pair generator)",
               "warped": "real-N + warped", "deformed": "real-N + deformed"}


def curve_report(out, sizes, seeds, n_synth):
    """curve.md (TRE, or Dice without keypoints, net and +TTA per N and row, mean ± sd over seeds, the per-case tests of each run)
    and curve.png (TRE against N, one line per row; the extra evaluation set in a second row of panels)."""
    import matplotlib.pyplot as plt

    prefixes = [("eval", "validation pairs")]
    if any(os.path.exists(os.path.join(out, f"n{n}", "eval_extra_none.json")) for n in sizes):
        prefixes.append(("eval_extra", "extra evaluation pairs (pseudo ground truth)"))
    lines = ["# Low-data curve", "", f"Registration nets trained on N real pairs, alone, augmented on the fly, or mixed with "
             f"{n_synth} pairs of the N-pair generator or of a free baseline. TRE in mm (mean over landmarks; Dice where the pairs have no keypoints; mean ± sd "
             "over seeds; `net` = the net alone, `tta` = after test-time adaptation). Subsets are nested (`subsets.json`); "
             "each N is one run (`nN/results.md`: every table, per-case test and stage time).", ""]
    fig, ax = plt.subplots(len(prefixes), 2, figsize=(11, 4 * len(prefixes)), squeeze=False, layout="constrained")
    for row_ax, (prefix, title) in zip(ax, prefixes):
        lines += [f"## {title}", "", "| N | row | net | tta | seeds |", "|---|---|---|---|---|"]
        points = {r: [] for r in CURVE_NAMES}
        tests = []
        for n in sizes:
            sub = os.path.join(out, f"n{n}")
            names = utils.read_json(os.path.join(sub, "rows.json")) if os.path.exists(os.path.join(sub, "rows.json")) else {}
            for r in CURVE_NAMES:
                js = [json.load(open(f)) for f in (os.path.join(sub, f"{prefix}_{r}_s{s}.json") for s in range(seeds))
                      if os.path.exists(f)]
                if not js:
                    continue
                m = {k: (np.mean([score(j, k) for j in js]), np.std([score(j, k) for j in js])) for k in ("net", "tta")}
                points[r].append((n, m))
                d = 2 if js[0].get("metric", "tre") == "tre" else 3
                lines.append(f"| {n} | {names.get(r, r)} | {m['net'][0]:.{d}f} ± {m['net'][1]:.{d}f} | "
                             f"{m['tta'][0]:.{d}f} ± {m['tta'][1]:.{d}f} | {len(js)} |")
            for base_row, rows in (("real", [r for r in CURVE_NAMES if r != "real"]), ("mix", FREE)):
                found = per_case_tests(sub, seeds, names, base_row, [r for r in rows if r in names], prefix)
                if found:
                    tests += [f"N = {n}: {found[1].strip()}", *found[3:]]
        lines += ["", "Per-case tests within each run:", "", *tests, ""]
        for i, k in enumerate(("net", "tta")):
            for r, pts in points.items():
                if pts:
                    row_ax[i].errorbar([q[0] for q in pts], [q[1][k][0] for q in pts], yerr=[q[1][k][1] for q in pts],
                                       marker="o", capsize=3, label=CURVE_NAMES[r])
            row_ax[i].set_xlabel("N real pairs")
            row_ax[i].set_ylabel("TRE (mm)" if metric(os.path.join(out, f"n{sizes[0]}"), prefix) == "tre" else "Dice")
            row_ax[i].set_xticks(sizes)
            row_ax[i].set_title(f"{title}: {'net alone' if k == 'net' else 'net + TTA'}", fontsize=9)
        row_ax[0].legend(fontsize=7)
    utils.save_figure(fig, os.path.join(out, "curve.png"))
    md = "\n".join(lines + ["Figure: `curve.png`.", ""])
    with utils.atomic_path(os.path.join(out, "curve.md")) as tmp:
        open(tmp, "w").write(md)
    print(md)


def extra_pairs(extra_val, extra_landmarks):
    """The pairs of --extra-val that have a landmark file in --extra-landmarks."""
    pairs = [p for p in utils.find_pairs(extra_val, utils.val_split(extra_val))
             if os.path.exists(os.path.join(extra_landmarks, p.id + ".csv"))]
    if not pairs:
        raise utils.DataError(f"{extra_landmarks}: holds no landmark file ID.csv of a pair of {extra_val}")
    return pairs


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
    ap.add_argument("--classes", type=utils.label_list, metavar="L",
                    help="label values kept apart by every stage, e.g. 1,2,3,4 (label maps; default: one mask)")
    ap.add_argument("--curve", metavar="N,N,...",
                    help="the low-data curve: the whole experiment (without the synthetic-only row) on nested subsets "
                         "of N training pairs, each in OUT/nN, then OUT/curve.md and curve.png")
    ap.add_argument("--extra-val", metavar="DATA", help="a second evaluation set, reported apart: the pairs of DATA "
                    "with a landmark file in --extra-landmarks (held out of every subset that may hold them)")
    ap.add_argument("--extra-landmarks", metavar="FOLDER", help="landmark files ID.csv of --extra-val's pairs")
    ap.add_argument("--force", nargs="*", default=[], metavar="STAGE")
    ap.add_argument("--jobs", type=int, default=1,
                    help="stage chains (the generator's, each registration row's) run this many at a time, each "
                         "stage in its own process with 1/JOBS of the threads (for a CPU; on a 2-core CPU: 2; RESULTS.md)")
    args = ap.parse_args(argv)
    utils.check_positive({"--seeds": args.seeds, "--num-synth": args.num_synth, "--reg-iters": args.reg_iters,
                          "--jobs": args.jobs})
    if bool(args.extra_val) != bool(args.extra_landmarks):
        raise utils.DataError("--extra-val and --extra-landmarks go together")
    utils.check_label_options(None, args.classes)
    if args.classes and args.generator_tokens:
        raise utils.DataError("--generator-tokens decodes one mask per map (decode_tokens.py); --classes is not for it")
    if args.curve and args.generator_tokens:
        raise utils.DataError("--curve trains the paper's generator on each subset; --generator-tokens is not for it")
    if args.curve:
        curve_sizes(args.curve, float("inf"))  # its form, before the demo's phantoms are made
    preset = args.preset
    p = PRESETS[preset]
    seeds = p["seeds"] if args.seeds is None else args.seeds
    out = args.out or os.path.join("results", preset)
    data, val = args.data, args.val
    if data is None and preset != "demo":
        raise utils.DataError("--data is required for the cpu and paper presets")
    if data is not None and val is None and utils.dataset_json(data):
        val = data  # its registration_val pairs
    if data is not None and val is None:
        raise utils.DataError("--val is required with a --data folder")
    n = synthesise.PRESETS[preset]["num_pairs"] if args.num_synth is None else args.num_synth
    os.makedirs(out, exist_ok=True)
    if data is None:  # the demo's phantoms
        run = Stages(out, args.force)
        data = os.path.join(out, "phantoms_train")
        val = os.path.join(out, "phantoms_val")
        run("phantoms_train", [data], make_phantoms.main, [data, p["n_train"], "--seed", 0])
        run("phantoms_val", [val], make_phantoms.main, [val, p["n_val"], "--seed", 1000])
    lms = args.landmarks or utils.default_landmarks(val)
    frame = utils.data_frame(data, args.frame)
    ids = utils.pair_ids(data)
    sizes = curve_sizes(args.curve, len(ids)) if args.curve else None
    extra, held = None, []
    if args.extra_val:
        listed = extra_pairs(args.extra_val, args.extra_landmarks)
        for pair in listed:
            utils.pair_landmarks(pair, frame, args.extra_landmarks)
        fixed = {digest(p.fixed)[1] for p in listed}
        held = [p.id for p in utils.find_pairs(data) if digest(p.fixed)[1] in fixed]  # training pairs among them
        if held and not args.curve:
            raise utils.DataError(f"{args.extra_val}: its pairs {', '.join(held[:3])} are training pairs of {data}: "
                                  "not an evaluation set")
    if args.curve:  # every subset checked before the first stage of any
        in_val = set(shared_pairs(data, val)[1])
        subsets = nested_subsets(ids, sizes, held)
        for size, subset in subsets.items():
            if in_val & set(subset):
                raise utils.DataError(f"{val}: holds training pair {sorted(in_val & set(subset))[0]} of the N = {size} "
                                      "subset: it is not held out")
    if args.extra_val:  # each run links the pairs into its own folder (extra_val/), ids kept for the landmark files
        extra = (args.extra_val, [p.id for p in listed], args.extra_landmarks)
    common = dict(reg_iters=args.reg_iters, force=args.force, classes=args.classes)
    if not args.curve:
        experiment(out, preset, data, val, lms, seeds, n, args.jobs, frame_name=args.frame,
                   generator_tokens=args.generator_tokens, extra=extra, **common)
        return
    utils.write_json(os.path.join(out, "subsets.json"), {f"n{k}": v for k, v in subsets.items()})
    plans = []
    for size, subset in subsets.items():
        sub = data if size == len(ids) else link_folder([("", data, subset)], os.path.join(out, "subsets", f"n{size}"), frame,
                                                        f"{size} training pairs of {os.path.abspath(data)} (links)")
        evaluated = extra if extra and not set(held) & set(subset) else None
        if extra and not evaluated:
            print(f"[pipeline] N = {size}: the subset holds extra evaluation pairs; they are not evaluated at this N")
        plans.append(plan_experiment(os.path.join(out, f"n{size}"), preset, sub, val, lms, seeds, n, frame_name=args.frame,
                                     rows=CURVE_ROWS, extra=evaluated, label=f" (N = {size})", **common))
    if args.jobs == 1:  # one N after the other, each N's results.md as soon as it is complete
        for chains, finish in plans:
            run_chains(None, chains, 1)
            finish()
    else:  # every generator first, beside the rows of the N whose generator is done (or not needed yet)
        run_chains(None, [c[0] for c, _ in plans] + [x for c, _ in plans for x in c[1:]], args.jobs)
        for _, finish in plans:
            finish()
    curve_report(out, sizes, seeds, n)


if __name__ == "__main__":
    utils.run_main(main)
