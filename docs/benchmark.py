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
trained without flips (a mirrored digit is not a digit); photographs with them. Nothing imports this file.
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

def photographs(n_train=4000, n_val=1600, seed=0):
    """32x32 crops of the colour photographs bundled with scikit-image, scikit-learn and matplotlib, each shrunk to a
    short side of 128 px so that a crop holds a part of a scene. The left 70% of every photograph gives the training
    crops, the right 30% the held-out ones (no pixel in both); the class of a crop is its photograph."""
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

    def crops(n, side):
        out, cls = [], rng.integers(len(small), size=n)
        for c in cls:
            h, w, _ = small[c].shape
            lo, hi = (0, int(0.7 * w) - 32) if side == "train" else (int(0.7 * w), w - 32)
            x, y = rng.integers(lo, hi + 1), rng.integers(0, h - 32 + 1)
            out.append(small[c][y:y + 32, x:x + 32])
        return np.stack(out), cls

    (train, train_cls), (val, val_cls) = crops(n_train, "train"), crops(n_val, "val")
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

def run(*args):
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)

def train_pipeline(train, work, flip, vq_steps, sundae_steps, calibrate=True):
    folder = os.path.join(work, "train")
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(train):
        Image.fromarray(im).save(os.path.join(folder, f"{i:05d}.png"))
    vq, lat, sd = (os.path.join(work, f) for f in ("vqgan.pt", "latents.npy", "sundae.pt"))
    flag = "--flip" if flip else "--no-flip"
    t = time.time()
    run("vqgan.py", "--data", folder, "--size", "32", "--max_steps", str(vq_steps), "--out", vq, flag, "--overwrite",
        "--val_n", str(min(256, len(train) // 4)))
    run("vqgan.py", "--encode", "--ckpt", vq, "--data", folder, "--out", lat, flag, "--overwrite")
    run("sundae.py", "--data", lat, "--vqgan", vq, "--max_steps", str(sundae_steps), "--out", sd, "--overwrite",
        "--calibrate" if calibrate else "--no-calibrate")
    return vqgan.load_vqgan(vq), sundae.load_sundae(sd), (time.time() - t) / 60

def to_images(x):  # (n, 3, H, W) in [-1, 1] -> uint8 (n, H, W, 3)
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()

def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)

def holes(n):
    """The hidden pixels of each inpainting task, bool (n, 32, 32)."""
    out = {name: np.zeros((n, 32, 32), bool) for name in ("bottom half", "left half", "centre box")}
    out["bottom half"][:, 16:] = True
    out["left half"][:, :, :16] = True
    out["centre box"][:, 8:24, 8:24] = True
    return out

@torch.no_grad()
def measure(name, train, val, val_cls, train_cls, work, flip, vq_steps, sundae_steps, n, seed=0, calibrate=True):
    """The table of one source. Half of the held-out images train the judge, the other half are the reference
    that every row is compared with (seen by neither the judge nor the pipeline)."""
    half = len(val) // 2
    judge = Judge(val[half:], val_cls[half:], seed)
    val, val_cls = val[:half], val_cls[:half]
    vq, model, minutes = train_pipeline(train, work, flip, vq_steps, sundae_steps, calibrate)
    gen = torch.Generator().manual_seed(seed)
    ref = val[:n]
    recon = to_images(vq.decode(vq.encode(to_tensor(ref))))
    random_tokens = torch.randint(vq.codebook_size, (n, model.height, model.width), generator=gen)
    tokens, steps = sundae.sample(model, n, generator=gen)
    rows = [("held-out real images", val[n:2 * n]), ("train images", train[:n]), ("reconstructions", recon),
            ("decoded random tokens", to_images(vq.decode(random_tokens))), ("samples", to_images(vq.decode(tokens)))]
    print(f"\n{name}: {len(train)} train / {len(val)} held-out images, flips {'on' if flip else 'off'}, VQ-GAN "
          f"{vq_steps} + SUNDAE {sundae_steps} steps ({minutes:.1f} minutes on {torch.get_num_threads()} threads), "
          f"judge accuracy on the reference images {judge.net.score(judge.inputs(val), val_cls):.2f}; {n} per row")
    print(f"  {'set':24s} {'Frechet':>8s} {'confidence':>11s} {'class entropy':>14s}")
    for label, images in rows:
        fd, conf, ent = judge.summary(images, ref)
        print(f"  {label:24s} {fd:8.3f} {conf:11.3f} {ent:14.3f}")
    print(f"  samples took {steps.float().mean():.1f} steps on average")
    # inpainting: does the filled image keep the class of the image whose part is visible?
    x, truth = to_tensor(ref), val_cls[:n]
    known_tokens = {}
    other = val[(np.arange(n) + 1 + np.random.default_rng(seed).integers(0, n - 1, n)) % n]
    print(f"  {'inpainting: class kept':24s} " + " ".join(f"{h:>12s}" for h in holes(n)))
    results = {"one sample": [], "nearest training image": [], "a random other image": [], "reconstruction": []}
    flat_train = train.reshape(len(train), -1).astype(np.float32)
    for hole_name, hole in holes(n).items():
        known_px = torch.from_numpy(~hole)
        known_tokens[hole_name] = inpaint.pixel_to_token_mask(known_px, vq.downsample_factor)
        filled = inpaint.inpaint(model, vq.encode(x), known_tokens[hole_name], generator=gen)
        paste = lambda fill: np.where(hole[..., None], fill, ref)  # the visible part always the original's
        vis = (~hole).reshape(n, -1, 1).repeat(3, 2).reshape(n, -1)
        dist = np.stack([((flat_train - r.reshape(-1).astype(np.float32)) ** 2 * v).sum(1)
                         for r, v in zip(ref, vis)])  # (n, n_train) over the visible pixels
        candidates = {"one sample": to_images(vq.decode(filled)), "nearest training image": train[dist.argmin(1)],
                      "a random other image": other, "reconstruction": recon}
        for k, fill in candidates.items():
            results[k].append(float((judge.classes(paste(fill)) == truth).mean()))
    for k, shares in results.items():
        print(f"  {k:24s} " + " ".join(f"{s:12.0%}" for s in shares))

def main(argv=None):
    p = argparse.ArgumentParser(description="End-to-end benchmark on real images (digits, photograph crops).")
    p.add_argument("--source", default="all", choices=("all", "digits", "photos"), help="which source to run")
    p.add_argument("--workdir", default="benchmark_runs", help="folder for the images, checkpoints and latents")
    p.add_argument("--vq_steps", type=int, default=2400, help="VQ-GAN training steps (the quick start's)")
    p.add_argument("--sundae_steps", type=int, default=1800, help="SUNDAE training steps (the quick start's)")
    p.add_argument("--n", type=int, default=200, help="images per row of the table")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything, to check that it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.vq_steps, args.sundae_steps, args.n = 3, 3, 16
    if args.source in ("all", "digits"):
        train, val, val_cls, train_cls = digits()
        measure("digits", train, val, val_cls, train_cls, os.path.join(args.workdir, "digits"), False, args.vq_steps,
                args.sundae_steps, args.n, calibrate=not args.smoke)
    if args.source in ("all", "photos"):
        train, val, val_cls, train_cls = photographs(*((64, 64) if args.smoke else ()))
        measure("photographs", train, val, val_cls, train_cls, os.path.join(args.workdir, "photos"), True,
                args.vq_steps, args.sundae_steps, args.n, calibrate=not args.smoke)

if __name__ == "__main__":
    main()
