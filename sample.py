"""
Sampling megapixel SUNDAE: uniform random tokens -> tens of parallel denoising steps -> VQ-GAN
decoder.

McKinney & Willcocks §3.5 (Figure 2). Every step redraws all tokens in parallel from the model at an
annealed temperature, keeps a random proportion of the new draws, and freezes a sample once a step
that redrew some of its positions changed none of them.

    python sample.py                                   # sundae.pt + vqgan.pt -> samples.png (16 samples)
    python sample.py --n 1000 --outdir fid_samples     # one PNG per sample, for torch-fidelity / clean-fid
    python sample.py --trajectory trajectory.png       # images decoded along one sampling run
    python sample.py --eval 256                        # Frechet distance to held-out images (no download)
    python sample.py --calibrate --data latents.npy    # choose and store the sampling temperature (training does too)
    python sample.py --benchmark                       # images/s at random weights (ffhq1024 on CUDA, tiny on CPU)
    python sample.py --vqgan '' --tokens samples.npy   # no VQ-GAN: token grids (n, h, w) and a token picture
    python sample.py --sundae sundae_cond.pt --class all --n 8 --guidance 1   # a row per class (sundae.py --labels)

Imports sundae.py and vqgan.py; importing it does no work.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F

import sundae
import vqgan
from sundae import check_schedule, frechet_distance, sample  # beside training, which samples and calibrates
from vqgan import BadInput

# --------------------------------------------------------------------------------------------------
# decoding and the evaluation

@torch.no_grad()
def decode(vq, tokens, batch=16, bf16=None):
    """Token grids -> images (n, 3, H, W) in [-1, 1], in batches (a 1024x1024 decode holds GBs of activations)."""
    out = []
    bf16 = tokens.device.type == "cuda" if bf16 is None else bf16
    for i in range(0, len(tokens), batch):
        with vqgan.bf16_autocast(tokens.device, bf16):
            out.append(vq.decode(tokens[i:i + batch]).float().clamp(-1, 1))
    return torch.cat(out)

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()

def load_pair(sundae_path, vqgan_path, device):
    """Load both checkpoints and check that they belong together; vqgan_path "" = no decoder (vq is None)."""
    model = sundae.load_sundae(sundae_path, device)
    if not vqgan_path:
        return model, None
    vq = vqgan.load_vqgan(vqgan_path, device)
    if model.vocab_size != vq.codebook_size:
        raise BadInput(f"{sundae_path!r} models V={model.vocab_size} tokens but {vqgan_path!r} has {vq.codebook_size} codes; "
                       "pass the VQ-GAN whose latents trained this model")
    if getattr(model, "vqgan_id", None) and model.vqgan_id != vqgan.fingerprint(vq.state_dict()):
        raise BadInput(f"{sundae_path!r} was trained on latents of another VQ-GAN than {vqgan_path!r} (same V, "
                       "other codes); pass the VQ-GAN whose latents trained this model")
    g = vq.config.size // vq.downsample_factor
    if (model.height, model.width) != (g, g):
        fix = f"convert it again with --size {model.height * vq.downsample_factor}" if vq.converted else \
            "pass the VQ-GAN whose latents trained this model"
        raise BadInput(f"{sundae_path!r} models {model.height}x{model.width} token grids but {vqgan_path!r} makes {g}x{g} "
                       f"at {vq.config.size}px; {fix}")
    return model, vq

def token_dtype(vocab_size):
    """The smallest dtype that holds every id: uint16 up to 65536 codes (what vqgan.py --encode writes)."""
    return np.uint16 if vocab_size <= 65536 else np.int64

# --------------------------------------------------------------------------------------------------
# evaluation: Frechet distance in the VQ-GAN encoder's feature space

@torch.no_grad()
def eval_features(vq, images, batch=64):
    """Images -> (n, D) features: the encoder's pre-quantisation latents, average-pooled to 2x2 and flattened.

    Needs no download and sees colour, layout and shape; it is not Inception FID,
    so compare numbers only within this project (the random-token and reconstruction rows give the scale)."""
    out = []
    for i in range(0, len(images), batch):
        z = vq.features(images[i:i + batch].to(next(vq.parameters()).device))  # (b, qdim, h, w)
        out.append(F.adaptive_avg_pool2d(z.float(), 2).flatten(1).cpu())
    return torch.cat(out).numpy()

def evaluate(model, vq, vqgan_path, n, seed, batch, feature_vq=None, **sample_kwargs):
    """Frechet distances of samples, decoded random tokens and reconstructions to n held-out images,
    in the encoder features of feature_vq (default vq itself).
    One fixed feature_vq puts pipelines whose tokenizers differ on one scale;
    each VQ-GAN's own feature space has its own."""
    feature_vq = feature_vq or vq
    tcfg = vqgan.TrainConfig(**vqgan.tuples(vqgan.load_checkpoint(vqgan_path, "vqgan")["train_config"]))  # the data
    # never seen in training: toy faces from another seed (any number), or the VQ-GAN's own held-out files
    held = vqgan.ImageData(tcfg.data, vq.config.size, "val", tcfg.toy_n,
                           n if tcfg.data == "toy" else tcfg.val_n, tcfg.workers)
    if n > len(held):
        print(f"warning: only {len(held)} held-out images; comparing {len(held)} samples", file=sys.stderr)
    n = min(n, len(held))
    real = held.batch(list(range(n)))
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    toks = []
    for i in range(0, n, batch):
        toks.append(sample(model, min(batch, n - i), generator=gen, **sample_kwargs)[0])
        print(f"sampled {min(n, i + batch)}/{n} for the evaluation", flush=True)
    toks = torch.cat(toks)
    # two reference points put the samples' number on a scale:
    # decoded uniform-random tokens (what the prior starts from, the "no model" distance) and reconstructions of the
    # held-out images (the VQ-GAN's floor)
    rand = torch.randint(vq.codebook_size, toks.shape, generator=gen, device=device)
    with torch.no_grad():
        recon = torch.cat([vq(real[i:i + batch].to(device))[0].float().clamp(-1, 1).cpu() for i in range(0, n, batch)])
    f_real = eval_features(feature_vq, real)
    rows = [("SUNDAE samples", decode(vq, toks)), ("uniform random tokens", decode(vq, rand)),
            ("reconstructions", recon)]
    print(f"Frechet distance to {n} held-out images in VQ-GAN encoder feature space (lower is better):")
    for name, imgs in rows:
        print(f"  {name:22s} {frechet_distance(eval_features(feature_vq, imgs.cpu()), f_real):10.3f}")

# --------------------------------------------------------------------------------------------------
# figures

def save_trajectory(vq, trajectory, path, cols=8):
    """Images decoded at several steps of one sampling run: rows are samples, columns are steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    S = len(trajectory) - 1  # trajectory[0] is the random start, trajectory[s] the tokens after step s
    picks = [0] + np.unique(np.geomspace(1, S, cols - 1).round().astype(int)).tolist()  # early steps change most
    imgs = [decode(vq, trajectory[s]).cpu() for s in picks]  # list over steps of (n, 3, H, W)
    n = len(imgs[0])
    fig, axes = plt.subplots(n, len(picks), figsize=(1.4 * len(picks), 1.45 * n), squeeze=False)
    for j, s in enumerate(picks):
        axes[0, j].set_title(f"step {s}", fontsize=8)
        for i in range(n):
            axes[i, j].imshow(((imgs[j][i].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            axes[i, j].axis("off")
    fig.tight_layout()
    vqgan.save_figure(fig, path)

# --------------------------------------------------------------------------------------------------
# benchmark

def benchmark(preset, batches, steps, device, bf16):
    """Seconds per image and images/s at random weights, latent sampling and decoding timed apart."""
    mc = sundae.PRESETS[preset][0]
    vcfg = vqgan.PRESETS[preset][0]
    h = vcfg.size // 2 ** (len(vcfg.ch_mult) - 1)
    mc = replace(mc, vocab_size=vcfg.codebook_size, height=h, width=h)
    model = sundae.HourglassTransformer(**asdict(mc)).to(device).eval()
    vq = vqgan.VQGAN(vcfg).to(device).eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name} | preset {preset}: {vcfg.size}px, {h}x{h} tokens, V={vcfg.codebook_size} | {steps} steps, "
          f"no early stopping | {'bf16' if bf16 else 'fp32'}")
    one = torch.randint(vcfg.codebook_size, (1, h, h), device=device)
    # FLOPs of one network call and one decode, counted by PyTorch:
    # with the device's peak they give the floor no implementation can beat,
    # so the measured time says how far from the hardware we are
    f_step, f_dec = sundae.count_flops(lambda: model(one)), sundae.count_flops(lambda: vq.decode(one))
    print(f"FLOPs per image: sampling {steps} x {f_step / 1e9:.2f} G = {steps * f_step / 1e9:.1f} G | decoding {f_dec / 1e9:.2f} G")
    peak = next((v for k, v in sundae.PEAK_BF16_FLOPS.items() if k in name), None)
    for b in batches:
        gen = torch.Generator(device).manual_seed(0)
        sample(model, b, 2, min_steps=2, generator=gen, bf16=bf16)  # warm-up
        decode(vq, one.repeat(b, 1, 1), batch=b, bf16=bf16)
        sync(device)
        t = time.perf_counter()
        toks, used = sample(model, b, steps, min_steps=steps, generator=gen, bf16=bf16)  # no early exit
        sync(device)
        t_s = time.perf_counter() - t
        t = time.perf_counter()
        decode(vq, toks, batch=b, bf16=bf16)
        sync(device)
        t_d = time.perf_counter() - t
        t = time.perf_counter()  # the network body alone, as many times: the rest of sampling is head + draw
        with torch.no_grad(), vqgan.bf16_autocast(device, bf16):
            for _ in range(steps):
                model.features(toks)
        sync(device)
        t_b = time.perf_counter() - t
        floor = f" | FLOP floor at peak {(steps * f_step + f_dec) * b / peak * 1e3:.1f} ms" if peak else ""
        print(f"batch {b:3d}: sampling {t_s:.3f} s ({t_s / steps * 1e3:.1f} ms/step: network body {t_b / steps * 1e3:.1f}, "
              f"head + draw + bookkeeping {(t_s - t_b) / steps * 1e3:.1f}) + decoding {t_d:.3f} s = "
              f"{(t_s + t_d) / b:.4f} s/image | {b / (t_s + t_d):.2f} images/s{floor} | peak memory {vqgan.peak_memory(device)}")

# --------------------------------------------------------------------------------------------------
# command line

def pair(s):
    """'1.0,0.7' -> (1.0, 0.7), for the start,end schedule flags."""
    try:
        a, b = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers start,end, got {s!r}")
    return a, b

def add_sampling_flags(p):
    """The sampler's flags, shared with inpaint.py."""
    p.add_argument("--steps", type=int, default=100, help="maximum denoising steps")
    p.add_argument("--temperature", type=pair, default=None,
                   help="start,end temperature, 0 = greedy "
                        "(default: the schedule the checkpoint stores, calibrated by training or set by its --temperature)")
    p.add_argument("--proportion", type=pair, default=None,
                   help="start,end share of positions that take their new draw per step (default 1,1 below 20 steps, "
                        "as paper §3.5 asks, else 0.5,0.5)")
    p.add_argument("--class", dest="classes", default="",
                   help="class-conditional models: a class (index or name), a comma list, or 'all' (sample.py: "
                        "--n samples of each, a row per class)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight w >= 0 (with --class): logits = cond + w (cond - uncond); "
                        "0 = the conditional model as it is")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32")

def parse_classes(spec, model, guidance=0.0):
    """--class: 'all',
    a comma list of indices or names (the class names the model's training data carried) -> list of class indices,
    or None when not given."""
    C, names = getattr(model, "num_classes", 0), getattr(model, "class_names", [])
    if not 0 <= guidance <= sundae.MAX_GUIDANCE:
        raise BadInput(f"--guidance must be in [0, {sundae.MAX_GUIDANCE:g}] (useful weights are 0 to about 10), got {guidance}")
    if not spec:
        if guidance:
            raise BadInput("--guidance needs --class: guidance pushes samples towards a class")
        return None
    if not C:
        raise BadInput("--class needs a class-conditional model (sundae.py --labels); this one is unconditional")
    if spec == "all":
        return list(range(C))
    out = []
    for c in spec.split(","):
        if c in names or (c.isascii() and c.isdigit() and int(c) < C):
            out.append(names.index(c) if c in names else int(c))
        else:
            raise BadInput(f"--class {c!r} is not a class of this model: 0..{C - 1} or {', '.join(names)}")
    return out

def calibrate_checkpoint(args, device, bf16):
    """sample.py --calibrate --data latents.npy: the calibration that ends training, for an existing checkpoint:
    on the validation split of its latents (the rows its training held out), and the choice stored back into it.
    The checkpoint is read and written under its training lock, so a training run cannot write it meanwhile."""
    if not (args.calibrate and args.data):
        raise BadInput("--calibrate and --data go together: sample.py --calibrate --data LATENTS --sundae CKPT")
    ignored = [flag for flag, given in (("--temperature", args.temperature is not None), ("--class", args.classes),
                                        ("--out", args.out != "samples.png"), ("--tokens", args.tokens),
                                        ("--outdir", args.outdir), ("--trajectory", args.trajectory),
                                        ("--eval", args.eval)) if given]
    if ignored:
        raise BadInput(f"--calibrate chooses and stores the temperature schedule; {', '.join(ignored)} do(es) not apply "
                       "(sample afterwards with the stored schedule)")
    vqgan.check_outputs({"--sundae": args.sundae}, overwrite=True)  # writable, before minutes of calibration
    lock = vqgan.hold_lock(args.sundae)
    try:
        ckpt = vqgan.load_checkpoint(args.sundae, "sundae")
        model, vq = load_pair(args.sundae, args.vqgan, device)  # vq decodes the samples the criterion compares
        array, _ = sundae.load_latents(args.data, model.vocab_size)
        latents_id = sundae.latents_meta(args.data).get("vqgan_id")
        own = os.path.realpath(args.data) == os.path.realpath(model.trained_on)  # a sidecar may be missing there
        if model.vqgan_id and latents_id != model.vqgan_id and (latents_id or not own):
            what = "was encoded by another VQ-GAN than" if latents_id else "has no .json sidecar to show it comes from"
            raise BadInput(f"--data {args.data!r} {what} the VQ-GAN whose latents trained {args.sundae!r}; "
                           "pass the latents it was trained on")
        if array.shape[1:] != (model.height, model.width):
            raise BadInput(f"--data {args.data!r} holds {array.shape[1]}x{array.shape[2]} grids, "
                           f"the model {model.height}x{model.width}; pass the latents it was trained on")
        _, val_idx = vqgan.split_indices(len(array), ckpt["train_config"].get("val_fraction", 0.05))
        if len(val_idx) < 32:
            raise BadInput(f"--data {args.data!r} has {len(val_idx)} held-out grids; calibration needs at least 32")
        t = time.time()
        heldout = torch.from_numpy(np.asarray(array[val_idx], dtype=np.int64))
        best, table = sundae.calibrate(model, heldout, vq, progress=True, bf16=bf16)
        space = "decoded pixels" if vq else "token statistics"
        sundae.print_calibration(table, best, f"{len(val_idx)} held-out grids, {space}, {time.time() - t:.0f} s")
        ckpt["train_config"]["temperature"] = best  # what load_sundae gives sample.py and inpaint.py
        vqgan.save_checkpoint(ckpt, args.sundae)
    finally:
        vqgan.release_lock(lock)
    print(f"stored temperature {best[0]} -> {best[1]} in {args.sundae}")

def main(argv=None):
    p = vqgan.Parser(description="Sample images from a trained SUNDAE + VQ-GAN.")
    p.add_argument("--sundae", default="sundae.pt", help="SUNDAE checkpoint")
    p.add_argument("--vqgan", default="vqgan.pt", help="VQ-GAN checkpoint (decoder); '' = none: write token pictures")
    p.add_argument("--tokens", default="", help="also write the sampled grids here as an (n, h, w) .npy")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    add_sampling_flags(p)
    p.add_argument("--min_steps", type=int, default=10, help="steps before a sample may freeze")
    p.add_argument("--batch", type=int, default=64, help="samples per forward pass")
    p.add_argument("--out", default="samples.png",
                   help="grid PNG of the samples (a file the scripts wrote is replaced unless it is read-only; "
                        "any other existing file needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out or --tokens that the scripts did not write, or a read-only one")
    p.add_argument("--outdir", default="", help="also write one PNG per sample here (for FID tools)")
    p.add_argument("--trajectory", default="", help="write a figure of images decoded along one sampling run")
    p.add_argument("--eval", type=int, default=0, help="Frechet distance of N samples to N held-out images")
    p.add_argument("--eval_vqgan", default="",
                   help="--eval in this VQ-GAN's encoder features (default --vqgan's): "
                        "one fixed file compares pipelines whose tokenizers differ")

    p.add_argument("--calibrate", action="store_true",
                   help="choose the temperature schedule on --data's held-out split (as training does at its end); "
                        "store it in --sundae; in images decoded by --vqgan ('' = none: statistics of the token ids)")
    p.add_argument("--data", default="", help="--calibrate: the latents --sundae was trained on")
    p.add_argument("--benchmark", action="store_true", help="time sampling and decoding at random weights")
    p.add_argument("--preset", default="", help="benchmark preset (default ffhq1024 on CUDA, tiny on CPU)")
    args = p.parse_args(argv)
    device = vqgan.pick_device(args.device)
    bf16 = vqgan.use_bf16(args.dtype, device)
    if args.benchmark:
        preset = args.preset or ("ffhq1024" if device.type == "cuda" else "tiny")
        if preset not in sundae.PRESETS:
            raise BadInput(f"--preset {preset!r} is not a preset; choose one of {', '.join(sundae.PRESETS)}")
        # batches: a GPU's small and large; on the CPU batch 1 at megapixel presets (a 1024² decode holds GBs)
        batches = [1, 32] if device.type == "cuda" else [1, 16] if preset == "tiny" else [1]
        return benchmark(preset, batches, args.steps, device, bf16)
    for flag, value, least in (("--n", args.n, 1), ("--steps", args.steps, 1),
                               ("--batch", args.batch, 1),
                               ("--min_steps", args.min_steps, 0), ("--eval", args.eval, 0),
                               ("--seed", args.seed, 0)):
        if not least <= value < 2**63:
            raise BadInput(f"{flag} must be in [{least}, 2**63), got {value}")
    if args.calibrate or args.data:
        return calibrate_checkpoint(args, device, bf16)
    if args.eval == 1:
        raise BadInput("--eval needs at least 2 samples to fit a covariance (use 256 or more for a stable number)")
    for name, hi in (("temperature", math.inf), ("proportion", 1.0)):
        if getattr(args, name) is not None:
            check_schedule(name, getattr(args, name), 0.0, hi)
    if args.proportion is not None and max(args.proportion) == 0:
        raise BadInput("--proportion 0,0 never takes a new draw: the samples would stay noise; use e.g. 0.5,0.5")
    if not args.vqgan and (args.eval or args.outdir or args.trajectory):
        raise BadInput("--eval, --outdir and --trajectory show decoded images and need --vqgan; with --vqgan '' use --tokens")
    # outputs checked before any work: never an input nor each other, always writable
    if not args.eval:
        vqgan.check_outputs({"--out": args.out, "--tokens": args.tokens,
                             "--trajectory": args.trajectory},
                            [args.sundae, args.vqgan], args.overwrite, outdir=args.outdir)
    model, vq = load_pair(args.sundae, args.vqgan, device)
    classes = parse_classes(args.classes, model, args.guidance)
    if classes is not None and args.eval:
        raise BadInput("--eval compares unconditional samples with held-out images; drop --class")
    if args.eval:
        feature_vq = vqgan.load_vqgan(args.eval_vqgan, device) if args.eval_vqgan else None
        if feature_vq is not None and feature_vq.config.size != vq.config.size:
            raise BadInput(f"--eval_vqgan {args.eval_vqgan!r} takes {feature_vq.config.size}px images, "
                           f"the samples are {vq.config.size}px; pass a VQ-GAN of the same image size")
        return evaluate(model, vq, args.vqgan, args.eval, args.seed, args.batch, feature_vq,
                        steps=args.steps, temperature=args.temperature, proportion=args.proportion,
                        min_steps=args.min_steps, bf16=bf16)

    gen = torch.Generator(device).manual_seed(args.seed)  # one generator for all batches: --seed fixes the whole run
    traj = [] if args.trajectory else None
    sync(device)  # CUDA runs asynchronously: synchronise so the timings below measure the work, not its launch
    t = time.perf_counter()
    toks, used = [], []
    labels = None if classes is None else torch.tensor(classes).repeat_interleave(args.n)  # --n of each class
    n = args.n * (1 if classes is None else len(classes))
    for i in range(0, n, args.batch):
        tk, u = sample(model, min(args.batch, n - i), args.steps, args.temperature, args.proportion,
                       args.min_steps,
                       generator=gen, trajectory=traj if i == 0 else None, bf16=bf16,
                       labels=None if labels is None else labels[i:i + args.batch],
                       guidance=args.guidance)
        toks.append(tk)
        used.append(u)
        if n > args.batch:  # long runs report progress
            done = min(n, i + args.batch)
            print(f"sampled {done}/{n} | {(time.perf_counter() - t) / done * 1e3:.1f} ms/sample", flush=True)
    toks, used = torch.cat(toks), torch.cat(used)
    sync(device)
    t_sample = time.perf_counter() - t
    steps = f"steps used mean {used.float().mean():.1f} (min {used.min()}, max {used.max()})"
    if used.min() == args.steps > args.min_steps:  # said once: otherwise a user waits and wonders
        print(f"note: no sample froze within --steps {args.steps}: at a final temperature above 0 some token keeps changing; "
              "that is expected (the chain keeps sampling), and fewer --steps or a cooler end stop sooner",

              file=sys.stderr)
    if args.tokens:
        vqgan.write_atomic(args.tokens, lambda f: np.save(f, toks.cpu().numpy().astype(token_dtype(model.vocab_size))))
        print(f"wrote {args.tokens}: {tuple(toks.shape)} token grids, V={model.vocab_size}")
    # no decoder: the grids as coloured tiles, as sundae.py draws its progress samples
    if vq is None:
        sundae.save_token_picture(toks, model.vocab_size, args.out, ncol=min(8, n) if classes is None else args.n)
        print(f"wrote {args.out}: {n} token grids | {steps} | sampling {t_sample:.2f} s ({t_sample / n * 1e3:.1f} ms/sample) | {device}")
        return
    t = time.perf_counter()
    images = decode(vq, toks, bf16=bf16)
    sync(device)
    t_decode = time.perf_counter() - t
    vqgan.save_png(images, args.out, nrow=min(8, n) if classes is None else args.n)  # classes: a row each
    rows = "" if classes is None else f" | a row per class: {', '.join(model.class_names[c] for c in classes)}"
    print(f"wrote {args.out}: {n} samples | {steps} | sampling {t_sample:.2f} s ({t_sample / n * 1e3:.1f} ms/image) | "
          f"decoding {t_decode:.2f} s ({t_decode / n * 1e3:.1f} ms/image) | {device}{rows}")
    if args.outdir:
        for i, img in enumerate(images):  # the seed in the name: several runs can share one folder
            vqgan.save_png(img[None], os.path.join(args.outdir, f"{args.seed:04d}_{i:06d}.png"), nrow=1, pad=0, scale=1)
        print(f"wrote {len(images)} PNGs to {args.outdir}/")
    if args.trajectory:
        save_trajectory(vq, [x[:6] for x in traj], args.trajectory)  # the first 6 samples of the first batch
        print(f"wrote {args.trajectory}")

if __name__ == "__main__":
    vqgan.run_main(main)
