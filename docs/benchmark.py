"""
The end-to-end benchmark on real images nobody tuned for: scikit-learn's handwritten digits, upsampled to 32 px and
run through the whole pipeline as images, and 32x32 crops of the photographs that ship inside scikit-image,
scikit-learn and matplotlib (natural-image statistics, no download). Each source has its own judge, a small
classifier trained on held-out real images of that source only (never on anything the pipeline produced): the
digit for digits, the photograph a crop came from for photos. Its hidden layer is the feature space of the Frechet
distances; its predictions give the confidence and the class entropy (diversity) of a set of images, and whether an
inpainting agrees with the visible part of its image.

    pip install scikit-learn scikit-image          # what this script needs beyond the project's requirements
    python docs/benchmark.py                       # both sources at the quick start's budget, then the table
    python docs/benchmark.py --source digits --vq_steps 1200 --sundae_steps 900
    python docs/benchmark.py --smoke               # a few steps of everything (the slow test tier runs it)

The pipeline runs as a user runs it (vqgan.py --data FOLDER, --encode, sundae.py --data), in --workdir. Digits are
trained without flips (a mirrored digit is not a digit); photographs with them (--flip changes that). Nothing
imports this file.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import inpaint  # noqa: E402  (the project's modules, from the repository root)
import sundae  # noqa: E402
import vqgan  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# the two sources: (train images, held-out images, held-out classes), uint8 (n, 32, 32, 3)

def digits(seed=0):
    """scikit-learn's 1797 handwritten digits (8x8, 17 grey levels) as 32x32 RGB images; half held out."""
    from sklearn.datasets import load_digits
    d = load_digits()
    big = [np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC))
           for im in d.images]
    images = np.repeat(np.stack(big)[..., None], 3, axis=3)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = len(images) // 2
    return images[order[:cut]], images[order[cut:]], d.target[order[cut:]], d.target[order[:cut]]

def photographs(n_train=4000, n_val=1600, seed=0, block=64):
    """32x32 crops of the colour photographs bundled with scikit-image, scikit-learn and matplotlib, each shrunk to a
    short side of 128 px so that a crop holds a part of a scene. Every photograph is cut into 64-px blocks coloured
    like a chessboard: crops inside the white blocks train, crops inside the black ones are held out, so both sets
    cover every part of every scene and no pixel is in both. The class of a crop is its photograph."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images
    photos = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket",
                                                         "immunohistochemistry", "hubble_deep_field", "retina")]
    photos += list(load_sample_images().images)
    photos.append(np.asarray(Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))))
    rng = np.random.default_rng(seed)
    small = []
    for p in photos:
        im = Image.fromarray(p[..., :3])
        s = 128 / min(im.size)
        small.append(np.asarray(im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BICUBIC)))

    def crops(n, parity):
        out, cls = [], rng.integers(len(small), size=n)
        for c in cls:
            h, w, _ = small[c].shape
            blocks = [(i, j) for i in range(h // block) for j in range(w // block) if (i + j) % 2 == parity]
            i, j = blocks[rng.integers(len(blocks))]
            y, x = i * block + rng.integers(block - 32 + 1), j * block + rng.integers(block - 32 + 1)
            out.append(small[c][y:y + 32, x:x + 32])
        return np.stack(out), cls

    (train, train_cls), (val, val_cls) = crops(n_train, 0), crops(n_val, 1)
    return train, val, val_cls, train_cls

# --------------------------------------------------------------------------------------------------------------
# the judge: a classifier of one source, trained on its held-out images

class Judge:
    def __init__(self, images, classes, seed=0):
        from sklearn.neural_network import MLPClassifier
        self.net = MLPClassifier((64,), max_iter=300, early_stopping=True, random_state=seed)
        self.net.fit(self.inputs(images), classes)

    @staticmethod
    def inputs(images):  # (n, 32, 32, 3) uint8 -> (n, 768): 16x16 RGB in [0, 1]
        x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2) / 255
        return torch.nn.functional.avg_pool2d(x, 2).flatten(1).numpy()

    def features(self, images):  # the hidden layer: the space of the Frechet distances
        return np.maximum(self.inputs(images) @ self.net.coefs_[0] + self.net.intercepts_[0], 0)

    def classes(self, images):
        return self.net.predict(self.inputs(images))

    def summary(self, images, reference):
        """(Frechet distance to the reference set, mean confidence, entropy of the mean class distribution)."""
        p = self.net.predict_proba(self.inputs(images))
        q = p.mean(0)
        entropy = float(-(q[q > 0] * np.log(q[q > 0])).sum())
        return sundae.frechet_distance(self.features(images), self.features(reference)), float(p.max(1).mean()), entropy

# --------------------------------------------------------------------------------------------------------------
# the pipeline, as a user runs it

def fail(message):
    """Bad input, as the scripts report it: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def run(*args):
    """A script of the project, run as a user runs it; its own one-line error, if it fails, is this script's too."""
    res = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if res.returncode:
        lines = res.stderr.strip().splitlines() or [f"exit status {res.returncode}"]
        fail(f"{' '.join(args[:2])} failed: {lines[-1].removeprefix('error: ')}")

def check_flags(flags, script, *configs):
    """Refuse, before any work, a flag that `script` does not have (its flags are its configs' fields)."""
    import dataclasses
    known = {f"--{pre}{f.name}" for c in configs for f in dataclasses.fields(c) for pre in ("", "no-")}
    unknown = [f for f in flags if f.startswith("--") and f.split("=")[0] not in known]
    if unknown:
        fail(f"{', '.join(unknown)}: {script} has no such flag (see python {script} --help)")

def train_pipeline(train, work, flip, vq_steps, sundae_steps, vq_flags=(), sundae_flags=(), reuse=False):
    """vqgan.py --data, --encode and sundae.py --data in `work` -> (VQ-GAN, SUNDAE, tokenizer minutes, prior
    minutes). reuse: keep the tokenizer and latents already in `work` (to compare priors on one tokenizer)."""
    folder = os.path.join(work, "train")
    vq, lat, sd = (os.path.join(work, f) for f in ("vqgan.pt", "latents.npy", "sundae.pt"))
    flag = "--flip" if flip else "--no-flip"
    t = time.time()
    if not (reuse and os.path.exists(lat)):
        os.makedirs(folder, exist_ok=True)
        for i, im in enumerate(train):
            Image.fromarray(im).save(os.path.join(folder, f"{i:05d}.png"))
        run("vqgan.py", "--data", folder, "--size", "32", "--max_steps", str(vq_steps), "--out", vq, flag,
            "--overwrite", "--val_n", str(min(256, len(train) // 4)), *vq_flags)
        run("vqgan.py", "--encode", "--ckpt", vq, "--data", folder, "--out", lat, flag, "--overwrite")
    t_vq = time.time()
    if reuse != "all" or not os.path.exists(sd):
        run("sundae.py", "--data", lat, "--vqgan", vq, "--max_steps", str(sundae_steps), "--out", sd,
            "--overwrite", *sundae_flags)
    return vqgan.load_vqgan(vq), sundae.load_sundae(sd), (t_vq - t) / 60, (time.time() - t_vq) / 60

def to_images(x):  # (n, 3, H, W) in [-1, 1] -> uint8 (n, H, W, 3)
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()

def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)

DRAWS = 3  # draws of n samples whose distances the samples' row averages

def holes(n):
    """The hidden pixels of each inpainting task, bool (n, 32, 32)."""
    out = {name: np.zeros((n, 32, 32), bool) for name in ("bottom half", "left half", "centre box")}
    out["bottom half"][:, 16:] = True
    out["left half"][:, :, :16] = True
    out["centre box"][:, 8:24, 8:24] = True
    return out

def fills(model, vq, ref, hole, gen, candidates=1, reference=None):
    """Inpaint the images ref (n, 32, 32, 3) where `hole` (n, 32, 32) is set, best_fit of `candidates` fillings each,
    started from the nearest grids of `reference` (None: uniform random, the paper's); the visible part pasted back
    -> uint8 (n, 32, 32, 3)."""
    x, known_px = to_tensor(ref), torch.from_numpy(~hole)
    known, tokens = inpaint.pixel_to_token_mask(known_px, vq.downsample_factor), vq.encode(x)
    rep = lambda t: t.repeat_interleave(candidates, 0)
    start = None if reference is None else inpaint.nearest_starts(vq.quantize.codes(), tokens, known, reference,
                                                                  candidates)
    filled = inpaint.inpaint(model, rep(tokens), rep(known), start, generator=gen)
    if candidates > 1:
        filled = inpaint.best_fit(vq, x, known_px, filled)
    return np.where(hole[..., None], to_images(vq.decode(filled)), ref)

def spearman(a, b):
    rank = lambda v: np.argsort(np.argsort(v))
    return float(np.corrcoef(rank(np.asarray(a)), rank(np.asarray(b)))[0, 1])

@torch.no_grad()
def calibration_study(model, vq, judge, ref, heldout, seeds=6, n=128):
    """Each calibration schedule, `seeds` times with sundae.calibrate's draws (n samples, seed 0, 1, ...): sundae.
    calibrate's criterion with the VQ-GAN (decoded pixels) and without it (hidden states), on the prior's own
    held-out grids, per seed, against the judge's distance of all the seeds' samples pooled (one draw of 128 is too
    few for the judge to rank the schedules), and what sundae.calibrate stores on each seed."""
    criteria = {"pixels": lambda g: sundae.pixel_features(vq, g), "hidden": lambda g: sundae.hidden_features(model, g)}
    scale = {}
    for k, f in criteria.items():  # as sundae.calibrate: each feature scaled by the held-out grids' spread
        r = f(heldout)
        scale[k] = (r.mean(0), r.std(0) + 1e-6, (r - r.mean(0)) / (r.std(0) + 1e-6))
    rows, judged, tables = [], [], {k: [[] for _ in range(seeds)] for k in criteria}
    for schedule in sundae.CALIBRATION_SCHEDULES:
        per_seed, images = [], []
        for seed in range(seeds):
            grids, steps = sundae.sample(model, n, temperature=schedule, generator=torch.Generator().manual_seed(seed))
            images.append(to_images(vq.decode(grids)))
            row = []
            for k, f in criteria.items():
                mean, std, reference = scale[k]
                x = (f(grids) - mean) / std
                halves = [sundae.kernel_distance(h, reference) for h in (x[:n // 2], x[n // 2:])]
                row.append(sundae.kernel_distance(x, reference))
                tables[k][seed].append((schedule, row[-1], abs(halves[0] - halves[1]), 0.0))
            per_seed.append(row)
        rows.append((schedule, np.array(per_seed)))  # (seeds, criteria)
        judged.append(judge.summary(np.concatenate(images), ref)[0])
    judge_mean, best_judge = np.array(judged), min(judged)
    print(f"  calibration study: {n} samples per schedule and seed, {seeds} seeds (criteria: mean +- sd over seeds; "
          f"the judge: all {seeds * n} samples against {len(ref)} reference images)")
    print(f"  {'schedule':12s} {'judge':>10s} " + " ".join(f"{k:>18s}" for k in criteria))
    for (schedule, d), j in zip(rows, judged):
        print(f"  {schedule[0]:.2f} -> {schedule[1]:.2f}  {j:10.4f} "
              + " ".join(f"{m:10.4f} +-{sd:6.4f}" for m, sd in zip(d.mean(0), d.std(0, ddof=1))))
    for j, k in enumerate(criteria):
        per = np.array([d[:, j] for _, d in rows])  # (schedules, seeds)
        corr = [spearman(per[:, s], judge_mean) for s in range(seeds)]
        print(f"  {k:8s} spread {np.ptp(per.mean(1)):8.4f}  seed noise {per.std(1, ddof=1).mean():8.4f}  rank corr of "
              f"each seed's with the judge: {' '.join(f'{c:5.2f}' for c in corr)} (mean {np.mean(corr):.2f})")
    for k in criteria:
        for seed, table in enumerate(tables[k]):
            best = min(table, key=lambda row: row[1])[0]
            choice = best if sundae.resolves(table) else sundae.PAPER_TEMPERATURE  # as sundae.calibrate
            print(f"  {k}, seed {seed}: sundae.calibrate stores {choice} "
                  f"({'resolved' if sundae.resolves(table) else 'fallback'}), {judge_mean[sundae.CALIBRATION_SCHEDULES.index(choice)] / best_judge - 1:+.0%} "
                  "from the judge's best")

@torch.no_grad()
def measure(name, train, val, val_cls, train_cls, work, flip, vq_steps, sundae_steps, n, seed=0, vq_flags=(),
            sundae_flags=(), reuse=False, studies=()):
    """The table of one source. Half of the held-out images train the judge, the other half are the reference
    that every row is compared with (seen by neither the judge nor the pipeline)."""
    half = len(val) // 2
    judge = Judge(val[half:], val_cls[half:], seed)
    val, val_cls = val[:half], val_cls[:half]
    vq, model, vq_min, prior_min = train_pipeline(train, work, flip, vq_steps, sundae_steps, vq_flags, sundae_flags,
                                                  reuse)
    gen = torch.Generator().manual_seed(seed)
    ref = val[:n]
    recon = to_images(vq.decode(vq.encode(to_tensor(ref))))
    random_tokens = torch.randint(vq.codebook_size, (n, model.height, model.width), generator=gen)
    # the samples' row is the mean over draws: at n = 200 one draw's distance varies by a third of its value or more
    t = time.time()
    draws = [sundae.sample(model, n, generator=gen) for _ in range(DRAWS)]
    sample_s = (time.time() - t) / len(draws)
    rows = [("held-out real images", val[n:2 * n]), ("train images", train[:n]), ("reconstructions", recon),
            ("decoded random tokens", to_images(vq.decode(random_tokens)))]
    print(f"\n{name}: {len(train)} train / {len(val)} held-out images, flips {'on' if flip else 'off'}, "
          f"VQ-GAN {vq_steps} steps {' '.join(vq_flags)} "
          f"({vq_min:.1f} min) + SUNDAE {sundae_steps} steps {' '.join(sundae_flags)} "
          f"({prior_min:.1f} min) on {torch.get_num_threads()} threads; temperature {model.default_temperature}; "
          f"judge accuracy on the reference images {judge.net.score(judge.inputs(val), val_cls):.2f}; {n} per row")
    print(f"  {'set':24s} {'Frechet':>8s} {'confidence':>11s} {'class entropy':>14s}")
    for label, images in rows:
        fd, conf, ent = judge.summary(images, ref)
        print(f"  {label:24s} {fd:8.3f} {conf:11.3f} {ent:14.3f}")
    per_draw = np.array([judge.summary(to_images(vq.decode(tokens)), ref) for tokens, _ in draws])
    sd = per_draw.std(0, ddof=1)
    print(f"  {f'samples ({len(draws)} draws)':24s} " + " ".join(f"{m:{w}.3f}" for m, w in zip(per_draw.mean(0),
                                                                                           (8, 11, 14)))
          + "   sd over draws " + " / ".join(f"{v:.3f}" for v in sd))
    mse = ((recon.astype(np.float64) - ref) ** 2).mean()
    steps = torch.cat([used for _, used in draws]).float().mean()
    print(f"  reconstruction PSNR {10 * np.log10(255 ** 2 / mse):.2f} dB; "
          f"samples took {steps:.1f} steps on average, {sample_s / n:.2f} s per sample")
    # inpainting: does the filled image keep the class of the image whose part is visible?
    truth = val_cls[:n]
    other = val[(np.arange(n) + 1 + np.random.default_rng(seed).integers(0, n - 1, n)) % n]
    flat_train = train.reshape(len(train), -1).astype(np.float32)
    candidates = ((1, 4, 16) if n > 16 else (1, 4)) if "inpainting" in studies else (1,)  # n = 16: --smoke
    # fills start from the nearest of the latents the prior trained on, as inpaint.py's default;
    # the paper's random start beside them
    reference = torch.from_numpy(np.load(os.path.join(work, "latents.npy")).astype(np.int64))
    name = lambda k: f"best of {k}" if k > 1 else "one sample"
    results = {**{name(k): [] for k in candidates}, "one sample, random start": [],
               "nearest training image": [], "a random other image": [], "reconstruction": []}
    seconds = {k: 0.0 for k in candidates}
    for hole in holes(n).values():
        vis = (~hole).reshape(n, -1, 1).repeat(3, 2).reshape(n, -1)
        dist = np.stack([((flat_train - r.reshape(-1).astype(np.float32)) ** 2 * v).sum(1)
                         for r, v in zip(ref, vis)])  # (n, n_train) over the visible pixels
        paste = lambda fill: np.where(hole[..., None], fill, ref)  # the visible part always the original's
        filled = {}
        for k in candidates:
            t = time.time()
            filled[name(k)] = fills(model, vq, ref, hole, gen, k, reference)
            seconds[k] += time.time() - t
        filled["one sample, random start"] = fills(model, vq, ref, hole, gen)
        filled.update({"nearest training image": paste(train[dist.argmin(1)]), "a random other image": paste(other),
                       "reconstruction": paste(recon)})
        for k, images in filled.items():
            results[k].append(float((judge.classes(images) == truth).mean()))
    print(f"  {'inpainting: class kept':24s} " + " ".join(f"{h:>12s}" for h in holes(n)))
    for k, shares in results.items():
        print(f"  {k:24s} " + " ".join(f"{s:12.0%}" for s in shares))
    print("  seconds per filled image: " + ", ".join(f"K = {k}: {s / (3 * n):.2f}" for k, s in seconds.items()))
    if "calibration" in studies:
        lat = torch.from_numpy(np.load(os.path.join(work, "latents.npy")).astype(np.int64))
        held = lat[vqgan.split_indices(len(lat), 0.05)[1]]  # the grids sundae.py held out and calibrated on
        calibration_study(model, vq, judge, val, held, seeds=6 if n > 16 else 2, n=128 if n > 16 else 16)

def main(argv=None):
    p = argparse.ArgumentParser(description="End-to-end benchmark on real images (digits, photograph crops).")
    p.add_argument("--source", default="all", choices=("all", "digits", "photos"), help="which source to run")
    p.add_argument("--workdir", default="benchmark_runs", help="folder for the images, checkpoints and latents")
    p.add_argument("--vq_steps", type=int, default=2400, help="VQ-GAN training steps (the quick start's)")
    p.add_argument("--sundae_steps", type=int, default=1800, help="SUNDAE training steps (the quick start's)")
    p.add_argument("--vq_flags", default="", help="more flags for vqgan.py, e.g. '--l2_weight 1'")
    p.add_argument("--sundae_flags", default="", help="more flags for sundae.py, e.g. '--box_share 0.5'")
    p.add_argument("--reuse", default="", choices=("", "tokenizer", "all"),
                   help="keep the tokenizer and latents (and with 'all' the prior) already in --workdir")
    p.add_argument("--study", default="", help="comma-separated extras: calibration (each schedule over seeds, "
                                               "judge against criteria), inpainting (best_fit of 4 and 16)")
    p.add_argument("--flip", default="by source", choices=("by source", "on", "off"),
                   help="mirror images in training and encoding: by source = off for digits, on for photographs")
    p.add_argument("--n", type=int, default=200, help="images per row of the table")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything, to check that it runs")
    args = p.parse_args(argv)
    check_flags(args.vq_flags.split(), "vqgan.py", vqgan.ModelConfig, vqgan.TrainConfig)
    check_flags(args.sundae_flags.split(), "sundae.py", sundae.ModelConfig, sundae.TrainConfig)
    args.workdir = os.path.abspath(args.workdir)  # the scripts run in the repository root, whatever the caller's folder
    if os.path.lexists(args.workdir) and not os.path.isdir(args.workdir):
        fail(f"--workdir {args.workdir!r} is a file; choose a folder")
    try:
        os.makedirs(args.workdir, exist_ok=True)
    except OSError as e:
        fail(f"--workdir {args.workdir!r} cannot be a folder ({e.strerror}); choose another path")
    if not os.access(args.workdir, os.W_OK):
        fail(f"--workdir {args.workdir!r} is not writable; choose another path")
    for source, sub in (("digits", "digits"), ("photos", "photos")):
        have = all(os.path.exists(os.path.join(args.workdir, sub, f)) for f in ("vqgan.pt", "latents.npy"))
        if args.reuse and args.source in ("all", source) and not have:
            fail(f"--reuse {args.reuse}: {os.path.join(args.workdir, sub)!r} holds no tokenizer and latents to reuse; "
                 "run once without --reuse")
    kw = dict(vq_flags=args.vq_flags.split(), sundae_flags=args.sundae_flags.split(), reuse=args.reuse,
              studies=args.study.split(","))
    if args.smoke:
        args.vq_steps, args.sundae_steps, args.n = 3, 3, 16
        kw["sundae_flags"] = kw["sundae_flags"] + ["--no-calibrate"]
    if args.source in ("all", "digits"):
        measure("digits", *digits(), os.path.join(args.workdir, "digits"), args.flip == "on", args.vq_steps,
                args.sundae_steps, args.n, **kw)
    if args.source in ("all", "photos"):
        measure("photographs", *photographs(*((64, 64) if args.smoke else ())), os.path.join(args.workdir, "photos"),
                args.flip != "off", args.vq_steps, args.sundae_steps, args.n, **kw)

if __name__ == "__main__":
    main()
