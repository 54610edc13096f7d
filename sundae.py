"""
Stage 2 of megapixel SUNDAE: train a step-unrolled denoising autoencoder on VQ token grids.

McKinney & Willcocks §2.4, §3.4; SUNDAE is Savinov et al. 2022. The network is hourglass.py's
2D-aware hourglass transformer. Training corrupts clean token grids with uniform noise, lets the
model denoise them for T unrolled steps (feeding it its own detached samples), and averages the T
cross-entropies. The sampler (paper §3.5) lives here too: training ends by choosing the sampling
temperature on held-out grids.

    python sundae.py --data latents.npy                    # CPU demo (tiny preset), a few minutes
    python sundae.py --data latents.npy --preset ffhq1024 --vqgan vqgan.pt --compile          # one GPU
    torchrun --standalone --nproc_per_node=8 sundae.py --data latents.npy --preset ffhq1024   # many GPUs
    python sundae.py --benchmark --preset ffhq1024 --batch_size 16                            # no data
    python sundae.py --data latents.npy --labels latents_labels.npy --out sundae_cond.pt      # class-conditional

Any (N, h, w) integer array works as data; the vocabulary is max id + 1 unless --vocab_size or
--vqgan says otherwise. Imports hourglass.py, and vqgan.py for its plumbing and, with --vqgan, to
decode progress pictures.
"""
import copy
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import vqgan
import hourglass
from hourglass import HourglassTransformer, count_flops
from vqgan import BadInput, add_flags, flag, lr_at, overrides, pick_device, split_indices  # one copy of the plumbing

# --------------------------------------------------------------------------------------------------
# config

ModelConfig = hourglass.HourglassConfig  # the network's shape: one dataclass, owned by hourglass.py
PAPER_TEMPERATURE = (1.0, 0.7)  # sampling temperature, annealed from start to end (paper §3.5)
MAX_GUIDANCE = 100.0  # classifier-free guidance weights in use are 0 to about 10

@dataclass
class TrainConfig:
    data: str = flag("latents.npy", "(N, h, w) integer array of token ids")
    vqgan: str = flag("", "VQ-GAN checkpoint: sets V and decodes progress samples into images")
    labels: str = flag("", "(N,) integer class labels beside the latents (vqgan.py --encode writes *_labels.npy); '' = none")
    label_drop: float = flag(0.1, "share of labels replaced by 'no class' in training (classifier-free guidance)")
    box_share: float = flag(0.0, "share of training grids whose noise is one random box of tokens (for inpainting)")
    unroll_steps: int = flag(2, "T, denoising steps unrolled in training (paper: 3 gives more diverse samples)")
    batch_size: int = flag(32, "sequences per optimizer step, summed over processes and micro-batches")
    grad_accum: int = flag(1, "micro-batches per optimizer step in each process")
    lr: float = flag(2e-3, "peak learning rate (AdamW)")
    min_lr: float = flag(2e-4, "cosine decay reaches this at max_steps")
    weight_decay: float = flag(0.01, "AdamW decoupled weight decay (matrices only)")
    warmup: int = flag(100, "linear warm-up steps (the authors had none)")
    grad_clip: float = flag(1.0, "clip the gradient norm; 0 = off (the authors had none)")
    temperature: tuple = flag(PAPER_TEMPERATURE, "start,end sampling temperature stored for sample.py and inpaint.py")
    calibrate: bool = flag(True, "end by storing the sampling schedule that fits held-out grids best (--temperature wins)")
    ema: float = flag(0.999, "decay of a moving average of the weights, used to validate, sample and save; 0 = off")
    max_steps: int = flag(1800, "optimizer steps")
    val_fraction: float = flag(0.05, "share of the latents held out for validation")
    val_every: int = flag(200, "steps between validation passes")
    val_batches: int = flag(8, "validation batches per pass")
    log_every: int = flag(50, "steps between log lines")
    sample_every: int = flag(500, "steps between progress sample grids")
    ckpt_every: int = flag(500, "steps between checkpoints")
    out: str = flag("sundae.pt", "checkpoint path")
    resume: bool = flag(False, "continue from --out")
    overwrite: bool = flag(False, "replace an existing --out (a checkpoint of another run) instead of refusing")
    device: str = flag("auto", "'auto', 'cpu' or 'cuda'")
    compile: bool = flag(False, "torch.compile the model")
    grad_ckpt: bool = flag(False, "activation checkpointing per block")
    dtype: str = flag("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32', on any device")
    seed: int = flag(0, "random seed; data order and noise follow (seed, step), so runs and resumes repeat exactly")

PRESETS = {
    # CPU demo on 8x8 toy-face tokens: 1.4M params, minutes on 2 cores.
    # Its temperature is the one its progress pictures use; the stored one is calibrated at the end.
    # With labels, the unconditional half of the model learns only from the dropped ones,
    # so a small model needs a larger share of them (docs/RESULTS.md)
    "tiny": (hourglass.PRESETS["tiny"], TrainConfig(temperature=(0.7, 0.3), label_drop=0.3)),
    # 64-px images (vqgan.py --preset 64px): 16x16 tokens, the tiny network (its valley at 8x8), 600 steps,
    # about 7 minutes on 2 idle CPU cores (estimated).
    # docs/RESULTS.md has the hourglass against the 1D one and a flat transformer at equal CPU time
    "64px": (hourglass.PRESETS["tiny"],
             TrainConfig(temperature=(0.7, 0.3), max_steps=600, val_every=100, sample_every=200, ckpt_every=200)),
    # FFHQ-256 (16x16 tokens, V = 1024); the authors: AdamW, constant lr 3e-5, batch 64, no warm-up or clipping.
    # A constant learning rate does no averaging of its own: the EMA's long memory (0.9999) does it
    "ffhq256": (hourglass.PRESETS["ffhq256"],
                TrainConfig(batch_size=64, lr=3e-5, min_lr=3e-5, warmup=2000,
                            max_steps=1_000_000, ema=0.9999,
                            val_every=5000, log_every=100, sample_every=5000, ckpt_every=5000)),
    # FFHQ-1024 (32x32 tokens, V = 8192); the authors used batch 8-16 and lr 3e-5 (5e-6 for one config)
    "ffhq1024": (hourglass.PRESETS["ffhq1024"],
                 TrainConfig(batch_size=16, lr=3e-5, min_lr=3e-5, warmup=2000,
                             max_steps=1_000_000, ema=0.9999,
                             val_every=5000, log_every=100, sample_every=5000, ckpt_every=5000)),
}

# --------------------------------------------------------------------------------------------------
# the SUNDAE objective (paper §2.4)

def corrupt(tokens, vocab_size, generator=None):
    """SUNDAE's corruption (Savinov et al. §3; paper §2.4): uniform noise at a random rate per sequence.

    tokens: int64 (B, ...) ids in [0, vocab_size), one sequence per row -> int64, the same shape and device.
    For each sequence draw a rate alpha ~ U(0, 1);
    replace each of its tokens independently with probability alpha by an id drawn uniformly from [0, vocab_size),
    which may be the token's own (so the expected changed fraction is 1/2 (1 - 1/V)).
    Every random draw uses `generator` (None: torch's global one), on tokens.device."""
    B = tokens.shape[0]
    alpha = torch.rand(B, *[1] * (tokens.dim() - 1), generator=generator, device=tokens.device)  # (B, 1, 1)
    replace = torch.rand(tokens.shape, generator=generator, device=tokens.device) < alpha  # (B, h, w)
    noise = torch.randint(vocab_size, tokens.shape, generator=generator, device=tokens.device)
    return torch.where(replace, noise, tokens)

def box_corrupt(tokens, vocab_size, generator=None, share=0.5):
    """corrupt, except that a `share` of the grids (B, h, w) get their noise as one random box of tokens,
    all of them replaced (sides uniform in 1..h and 1..w, placed uniformly where they fit), and are clean outside it.
    Not in the paper (sundae.py --box_share): its noise is spread uniformly,
    so a corrupted token nearly always has clean neighbours, while an inpainting hole is contiguous,
    its middle far from any known token."""
    x = corrupt(tokens, vocab_size, generator)  # first, so that share 0 is corrupt draw for draw
    B, h, w = tokens.shape
    kw = dict(generator=generator, device=tokens.device)
    hw = torch.tensor([h, w], device=tokens.device)
    side = (torch.rand(B, 2, **kw) * hw).long() + 1  # (B, 2): the box's height and width
    top = (torch.rand(B, 2, **kw) * (hw - side + 1)).long()  # (B, 2): its first row and column
    rows, cols = torch.arange(h, device=tokens.device), torch.arange(w, device=tokens.device)
    # (B, h, w)
    inside = ((rows[:, None] >= top[:, :1, None]) & (rows[:, None] < (top + side)[:, :1, None])
              & (cols >= top[:, 1:, None]) & (cols < (top + side)[:, 1:, None]))
    boxed = torch.rand(B, 1, 1, **kw) < share  # (B, 1, 1)
    noise = torch.randint(vocab_size, tokens.shape, **kw)
    return torch.where(boxed, torch.where(inside, noise, tokens), x)

def unrolled_loss(model, tokens, vocab_size, unroll_steps=2, generator=None, corrupt=corrupt):
    """SUNDAE's unrolled denoising loss (Savinov et al. §3; paper §2.4) -> (loss, accuracy).

    model: maps int64 (B, h, w) ids to logits (B, h, w, V), V = vocab_size. tokens: int64 (B, h, w),
    the clean grids x_0. corrupt(tokens, vocab_size, generator) makes x_1 (the parameter defaults to the function
    above). For t = 1..T (T = unroll_steps), call the model once on x_t: logits_t = model(x_t);
    then draw x_{t+1} from softmax(logits_t) at temperature 1, one independent draw per position.
    Step t > 1 thus trains the model on its own mistakes, which is what it meets when sampling from noise.
    - loss: a scalar tensor with gradient, 1/T sum_t CE(logits_t, x_0),
      the cross-entropy averaged over all tokens of the batch.
      Compute it from float32 logits (.float(): under bf16 autocast the softmax over V needs fp32).
    - accuracy: a scalar tensor, 1/T sum_t mean(argmax logits_t == x_0).
    - Every random draw (the corruption and the samples) uses `generator`, on the logits' device.
      A sample is ids: no gradient flows through it (draw it under torch.no_grad())."""
    x = corrupt(tokens, vocab_size, generator)  # (B, h, w)
    losses, accuracy = [], 0.0
    for t in range(unroll_steps):
        logits = model(x).float()  # (B, h, w, V), upcast: the softmax and CE in fp32 under bf16 autocast
        losses.append(F.cross_entropy(logits.reshape(-1, vocab_size), tokens.reshape(-1)))
        accuracy = accuracy + (logits.argmax(-1) == tokens).float().mean() / unroll_steps
        if t < unroll_steps - 1:
            with torch.no_grad():  # the sample is a constant input to the next step
                # Gumbel-max trick: argmax(logits + Gumbel noise) is an exact draw from softmax(logits).
                # Unlike torch.multinomial it does not raise on NaN logits, so a diverging run reaches the NaN check
                u = torch.rand(logits.shape, generator=generator, device=logits.device)
                x = (logits - torch.log(-torch.log(u))).argmax(-1)  # (B, h, w)
    return torch.stack(losses).mean(), accuracy

# --------------------------------------------------------------------------------------------------
# data

# the largest vocabulary accepted (the biggest VQ-GAN codebooks are 2**18 = 262144)
MAX_CLASSES = 2**16  # the most classes accepted (ImageNet-21k has about 21,000)
MAX_VOCAB = 2**20

def check_latents(array, vocab_size=0, name="latents", fix="pass the right --vocab_size or --vqgan"):
    """Validate an (N, h, w) integer token array; returns V (given, or max id + 1); BadInput if not. fix: what a user
    does about ids the vocabulary does not hold."""
    if array.ndim != 3:
        raise BadInput(f"{name} must be an (N, h, w) array of token ids, got shape {tuple(array.shape)}; "
                       "write them with vqgan.py --encode or reshape to (N, h, w)")
    if not np.issubdtype(array.dtype, np.integer):
        raise BadInput(f"{name} have dtype {array.dtype}, not an integer type; save token ids as int64/uint16")
    if len(array) == 0:
        raise BadInput(f"{name} hold no sequences (shape {tuple(array.shape)})")
    lo, hi = int(array.min()), int(array.max())  # one pass over the (memory-mapped) file
    if lo < 0:
        raise BadInput(f"{name} contain negative ids (min {lo}); token ids must be in [0, V)")
    if hi >= MAX_VOCAB:  # an embedding table this large would not fit anywhere: not token ids
        raise BadInput(f"{name} contain id {hi}; token ids must be below {MAX_VOCAB:,} (a codebook, not raw values)")
    if vocab_size and hi >= vocab_size:
        raise BadInput(f"{name} contain id {hi} >= vocabulary size {vocab_size}; {fix}")
    return vocab_size or hi + 1

def load_latents(path, vocab_size=0, flag="--data", fix="pass the right --vocab_size or --vqgan"):
    """Memory-map an .npy of token ids (nothing is read until used) and validate it; messages name `flag`."""
    if not os.path.exists(path):
        raise BadInput(f"latents file {path!r} not found; make one with python vqgan.py --encode, or pass {flag} PATH")
    array = vqgan.load_npy(path, flag)
    return array, check_latents(array, vocab_size, name=f"latents in {path!r}", fix=fix)

def latents_meta(path):
    """What vqgan.py --encode wrote next to the latents (path + ".json"): {"vocab_size", "vqgan_id"}; {} if none."""
    if not os.path.exists(path + ".json"):  # the user's own latents
        return {}
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
        int(meta.get("vocab_size", 0))
        return meta
    except (OSError, ValueError, TypeError, AttributeError):
        raise BadInput(f"{path + '.json'!r}, the sidecar of the latents, is unreadable; "
                       "delete it (and pass --vocab_size) or encode the latents again")

def get_batch(array, idx, device, labels=None):
    """Rows idx of a (memory-mapped) array -> int64 (B, h, w) on device, and their labels (B,) (or None)."""
    idx = np.sort(idx.numpy())  # sorted: sequential reads from disk
    tokens = torch.from_numpy(np.asarray(array[idx], dtype=np.int64)).to(device, non_blocking=True)
    return tokens, None if labels is None else torch.from_numpy(labels[idx].astype(np.int64)).to(device)

def load_labels(path, n, num_classes=0):
    """An (N,) .npy of integer class labels, one per row of the latents -> (labels, number of classes)."""
    labels = np.asarray(vqgan.load_npy(path, "--labels"))
    if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
        raise BadInput(f"--labels {path!r} must be an (N,) integer array with one label per latent grid (N = {n}), "
                       f"got {labels.dtype} of shape {labels.shape}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= (num_classes or MAX_CLASSES):  # one embedding row per class: not raw values
        raise BadInput(f"--labels {path!r} hold classes in [{lo}, {hi}]; they must be in [0, {num_classes or MAX_CLASSES:,})")
    return labels, num_classes or hi + 1

# --------------------------------------------------------------------------------------------------
# checkpoints

def load_sundae(path, device="cpu"):
    """Rebuild the SUNDAE model from its checkpoint alone, in eval mode."""
    ckpt = vqgan.load_checkpoint(path, "sundae")
    model = HourglassTransformer(**vqgan.tuples(ckpt["model_config"]))
    model.vqgan_id = ckpt.get("vqgan_id")  # the VQ-GAN whose latents trained it, if known
    # those latents' absolute path (older checkpoints: as training was given it, from the checkpoint's folder)
    model.trained_on = ckpt.get("data_path") or os.path.join(os.path.dirname(os.path.abspath(path)),
                                                             ckpt.get("train_config", {}).get("data", ""))
    model.class_names = ckpt.get("class_names") or [str(c) for c in range(model.num_classes)]
    # the sampling temperature its training stored; checkpoints from before the field existed get the paper's
    model.default_temperature = tuple(ckpt.get("train_config", {}).get("temperature", PAPER_TEMPERATURE))
    vqgan.load_weights(model, ckpt.get("ema") or ckpt["model"], path)  # the averaged weights, where training kept them
    return model.to(device).eval()

# --------------------------------------------------------------------------------------------------
# sampling (paper §3.5): sample.py and inpaint.py call it, and training itself (progress pictures, calibration)

def draw(logits, tau, generator=None):
    """One categorical draw per row (paper §3.5): logits float (K, V), tau >= 0 -> ids int64 (K,).

    Row k's id is drawn exactly from softmax(logits[k] / tau); tau = 0 means the argmax (greedy). K may be 0.
    A token of probability 0 (logit -inf) is never drawn.
    Every random draw uses `generator` (None: torch's global one), on the logits' device.
    Here by inverting the CDF: the first token whose cumulative probability exceeds u ~ U(0, total),
    one uniform number per row rather than V (Gumbel-max), and faster on the CPU than torch.multinomial at large V."""
    if tau == 0 or len(logits) == 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.float() / tau, dim=-1).double().cumsum(-1)  # float64: no drift over 8192 terms
    u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    # right: p = 0 never
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)

def default_proportion(steps):
    """The update proportion's (start, end) when none is given.
    Paper §3.5: "for low step scenarios (T < 20) all tokens must be able to be updated",
    so below 20 steps every position takes its new draw; with 20 or more, half of them per step,
    which keeps the chain from oscillating (Savinov et al. §3)."""
    return (1.0, 1.0) if steps < 20 else (0.5, 0.5)

def logits_where(model, x, where, labels=None, guidance=0.0):
    """The model's logits (K, V) at the K positions where the bool mask `where` (B, h, w) is set.
    With class labels and guidance w > 0, classifier-free guidance (Ho & Salimans 2022): cond + w (cond - uncond),
    both from one forward pass of 2B grids (each with its label and with "no class"), still at those positions only."""
    kw = {} if labels is None else {"labels": labels}
    if labels is not None and guidance:
        x, where = torch.cat([x, x]), torch.cat([where, where])  # (2B, h, w): conditional, then unconditional
        kw = {"labels": torch.cat([labels, torch.full_like(labels, model.num_classes)])}
    # our network computes its output head only where asked (any other module: all positions, then select) (K or 2K, V)
    logits = model.logits_at(x, where, **kw) if hasattr(model, "logits_at") else model(x, **kw)[where]
    if labels is not None and guidance:
        cond, uncond = logits.chunk(2)  # rows in raster order: the first K are the conditional grids'
        logits = cond + guidance * (cond - uncond)
    return logits

@torch.no_grad()
def sample(model, n, steps=100, temperature=None, proportion=None, min_steps=10,
           init=None, known=None,
           generator=None, trajectory=None, device=None, bf16=None, labels=None, guidance=0.0):
    """Draw n token grids with `model`; returns (tokens (n, h, w), steps_used (n,)). The loop itself is denoise.

    model: any module with vocab_size, height, width that maps (B, h, w) ids to (B, h, w, V) logits. temperature,
    proportion: (start, end) schedules (see denoise);
    temperature None = the model's default_temperature (load_sundae sets the one its training stored),
    else the paper's (1.0, 0.7); proportion None = default_proportion(steps). init:
    starting tokens (n, h, w) (default uniform random). known: bool or 0/1 (n, h, w);
    those positions always keep their init token (inpainting, paper §3.6). trajectory:
    a list that receives the whole batch's tokens at the start and after every step (for the paper's Figure 2). device:
    where to sample when no init is given (default: the generator's device, else the model's, else the CPU; a
    parameter-free model works). bf16: run the network under bf16 autocast (default: on CUDA only);
    the logits stay fp32. labels: a class per sample (n,) for a class-conditional model (None: unconditional); guidance:
    the classifier-free guidance weight w (0 = the conditional model as it is). Bad arguments raise BadInput."""
    temperature = getattr(model, "default_temperature", PAPER_TEMPERATURE) if temperature is None else temperature
    proportion = default_proportion(steps) if proportion is None else proportion
    check_sample_inputs(model, n, steps, tuple(temperature), tuple(proportion), init, known, labels, guidance)
    if device is None:
        device = init.device if init is not None else generator.device if generator is not None else \
            next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    x = torch.randint(model.vocab_size, (n, model.height, model.width), generator=generator,
                      device=device) \
        if init is None else init.to(device).long().clone()
    known = None if known is None else known.to(device).bool()  # a 0/1 integer mask works too
    labels = None if labels is None else torch.as_tensor(labels, device=device).long().reshape(-1)

    # the samples still active, the positions redrawn, their rows of x
    def logits_at(xa, where, active):
        with vqgan.bf16_autocast(device, bf16):  # the head stays fp32 inside, as in training
            return logits_where(model, xa, where, None if labels is None else labels[active], guidance)

    return denoise(logits_at, x, steps, tuple(temperature), tuple(proportion), min_steps, known, generator, trajectory)

def check_sample_inputs(model, n, steps, temperature, proportion, init, known, labels, guidance):
    """sample's arguments, checked before any work: BadInput naming the problem."""
    if not 0 <= guidance <= MAX_GUIDANCE:  # cond + w (cond - uncond) overflows float32 long before 1e308
        raise BadInput(f"guidance must be in [0, {MAX_GUIDANCE:g}], got {guidance}")
    check_schedule("temperature", temperature, 0.0, math.inf)
    check_schedule("proportion", proportion, 0.0, 1.0)
    if steps < 1 or n < 1:
        raise BadInput(f"need at least one sample and one step, got n={n}, steps={steps}")
    shape = (n, model.height, model.width)
    if init is None and known is not None:
        raise BadInput("known positions need init tokens to keep")
    if init is not None and tuple(init.shape) != shape:
        raise BadInput(f"init tokens have shape {tuple(init.shape)}, expected (n, h, w) = {shape}")
    if known is not None and tuple(known.shape) != shape:
        raise BadInput(f"known mask has shape {tuple(known.shape)}, the tokens {shape}")
    classes = getattr(model, "num_classes", 0)
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        if len(labels) != n or not 0 <= int(labels.min()) <= int(labels.max()) < classes:
            raise BadInput(f"labels must be n = {n} classes in [0, {classes}) of a class-conditional model")

def denoise(logits_at, x, steps, temperature, proportion, min_steps=10, known=None, generator=None, trajectory=None):
    """SUNDAE's sampler (paper §3.5, §3.6): parallel denoising steps with annealed schedules and per-sample freezing.
    Returns (tokens int64 (n, h, w), steps_used int64 (n,)).

    logits_at(xa, where, active) -> float logits (K, V):
    the network's logits for the grids xa (b, h, w) at the K positions where the bool mask `where` (b, h, w) is set,
    in row-major order; `active` (b,) int64 are the rows of x that xa holds. x: int64 (n, h, w),
    the starting tokens (not modified). known: bool (n, h, w) or None. For each step s = 0 .. steps-1:
    - temperature and proportion are (start, end) pairs, interpolated linearly: the start at s = 0,
      the end at s = steps - 1 (the start alone when steps == 1).
    - Only active samples take part (at first all n).
      Each of their positions is redrawn with probability p_s (one uniform draw per position), never a known one;
      the redrawn positions take draw(logits_at(...), tau_s, generator), all of them from one call.
    - A sample has settled when this step redrew at least one of its positions and none of them changed,
      or at once if it has no unknown position.
      After a step with s + 1 >= min_steps, settled samples are frozen: they leave the active batch,
      so logits_at never sees them again. Stop when none is left.
    - steps_used counts the steps each sample took part in. trajectory, if a list,
      receives a copy of all n grids before the first step and after every step.
    Every random draw uses `generator` (None: torch's global one), on x's device."""
    x = x.clone()
    n, device = len(x), x.device
    free = torch.ones(n, dtype=torch.bool, device=device) if known is None else (~known).flatten(1).any(1)
    if trajectory is not None:
        trajectory.append(x.clone())
    active = torch.arange(n, device=device)  # samples still being denoised
    steps_used = torch.zeros(n, dtype=torch.long, device=device)
    for s in range(steps):
        frac = s / (steps - 1) if steps > 1 else 0.0
        tau = temperature[0] + (temperature[1] - temperature[0]) * frac  # annealed temperature (paper §3.5)
        p = proportion[0] + (proportion[1] - proportion[0]) * frac  # share of positions that take their new draw
        xa = x[active]  # (b, h, w)
        update = torch.rand(xa.shape, generator=generator, device=device) < p  # random subset (Savinov et al.)
        if known is not None:
            # known tokens never change; the mask is indexed by `active` as the batch shrinks, which the authors' code forgot
            update &= ~known[active]
        new = xa.clone()
        new[update] = draw(logits_at(xa, update, active), tau, generator)  # one parallel draw where redrawn
        # settled:
        # this step redrew at least one of its positions and none changed (a step that happened to redraw nothing proves
        # nothing, frequent with a small inpainting hole and p < 1)
        redrawn, changed = update.flatten(1).any(1), (new != xa).flatten(1).any(1)  # (b,) each
        settled = (redrawn & ~changed) | ~free[active]
        x[active] = new
        steps_used[active] += 1
        if trajectory is not None:
            trajectory.append(x.clone())
        if s + 1 >= min_steps:
            active = active[~settled]  # a settled sample is frozen and leaves the batch
        if len(active) == 0:
            break
    return x, steps_used

def frechet_distance(a, b):
    """The Frechet distance between Gaussians fitted to the rows of a and b (Heusel et al. 2017, FID).

    a, b: arrays (n_a, d) and (n_b, d) of feature rows (anything np.asarray takes) -> a Python float,
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
    with mu the row means and S the unbiased sample covariances (np.cov of the rows: divided by n - 1),
    in float64. tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b,
    real and >= 0 for covariance matrices (clip rounding below 0), which in general is not tr(S_a^(1/2) S_b^(1/2)).
    Here via S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues and is symmetric PSD:
    eigh suffices and no complex parts appear (unlike scipy.linalg.sqrtm in the FID reference code)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    ev, U = np.linalg.eigh(cov_a)
    sqrt_a = (U * np.sqrt(np.clip(ev, 0, None))) @ U.T  # S_a^(1/2)
    m = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)

# The stored temperature schedule is chosen per model, on its own held-out grids: the best one depends on the data,
# the model size and how long it trained (the paper and the authors set 0.7 to 1.0 by hand per dataset).
# Ordered hot to cold; the hot ones cost the most steps
CALIBRATION_SCHEDULES = ((1.2, 1.0), (1.0, 1.0), (1.0, 0.7), (1.0, 0.3), (0.85, 0.5), (0.7, 0.7), (0.7, 0.3))

@torch.no_grad()
def pixel_features(decoder, grids, size=8, batch=16):
    """Token grids (n, h, w) -> (n, 3 size^2):
    the decoded images averaged over a size x size grid of blocks (their layout and colour, not their texture).
    The criterion calibrate uses when a VQ-GAN is at hand:
    on the real-image benchmark it ranks the schedules as a judge trained on real images does (docs/RESULTS.md)."""
    device = next(decoder.parameters()).device
    out = [F.adaptive_avg_pool2d(decoder.decode(grids[i:i + batch].to(device)).float(), size).flatten(1).cpu()
           for i in range(0, len(grids), batch)]
    return torch.cat(out).numpy()

def token_features(grids, vocab_size, dim=16, seed=0):
    """Token grids (n, h, w) -> (n, 6 dim), from the ids alone: what calibrate uses without a VQ-GAN.
    Each id gets two fixed random vectors a[id], b[id] (seeded: the same for samples and held-out grids). The features:
    the mean of a over each quarter of the grid (a random projection of the quarters' id histograms: which ids, where),
    and the mean of a[left] * b[right] over horizontal neighbours and of a[upper] * b[lower] over vertical ones (a random
    projection of the neighbour-pair histograms, since E[(a[i] * b[j]) . (a[k] * b[l])] = dim [i = k][j = l]: which ids
    sit next to which). The network's hidden states separate the schedules too, but rank them unlike a judge of the
    images (docs/RESULTS.md)."""
    a, b = torch.randn(2, vocab_size, dim, generator=torch.Generator().manual_seed(seed))
    g = grids.long().cpu()
    quarters = F.adaptive_avg_pool2d(a[g].permute(0, 3, 1, 2), 2).flatten(1)  # (n, 4 dim)
    across = (a[g[:, :, :-1]] * b[g[:, :, 1:]]).mean((1, 2))  # (n, dim): horizontal neighbour pairs
    down = (a[g[:, :-1]] * b[g[:, 1:]]).mean((1, 2))  # (n, dim): vertical neighbour pairs
    return torch.cat([quarters, across, down], 1).numpy()

def kernel_distance(a, b):
    """The kernel distance between the rows of a (m, d) and b (n, d) (Binkowski et al. 2018, KID):
    the unbiased estimate of the squared maximum mean discrepancy with the kernel k(x, y) = (x.y / d + 1)^3,
    mean k(a_i, a_j) over i != j + mean k(b_i, b_j) over i != j - 2 mean k(a_i, b_j), in float64.
    Its expectation is 0 when both sets come from one distribution, at any set size;
    the Frechet distance's bias at a few hundred samples grows with the sets' spread,
    as large as the differences between schedules here."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    k = lambda x, y: (x @ y.T / a.shape[1] + 1) ** 3
    k_aa, k_bb = k(a, a), k(b, b)
    m, n = len(a), len(b)
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2 * k(a, b).mean())

def calibrate(model, heldout, decoder=None, n=128, schedules=CALIBRATION_SCHEDULES, seed=0, progress=False,
              **sample_kwargs):
    """The temperature schedule whose samples lie closest to held-out grids (n, h, w):
    kernel_distance between n samples per schedule and the held-out grids, in pixel_features of `decoder` (a VQ-GAN) or,
    with none, in token_features;
    each feature scaled by the held-out grids' spread -> (choice (start, end), [(schedule, distance, noise, mean
    steps)]). noise: how far apart the distances of the two halves of the samples lie, a measure of seed-to-seed noise.
    The choice is made by choose: the fewest steps among the schedules as close as the closest within the noise.
    progress: a line per schedule as it is done (minutes on a CPU)."""
    if decoder is not None:
        features = lambda g: pixel_features(decoder, g)
    else:
        features = lambda g: token_features(g, model.vocab_size)
    reference = features(heldout)
    mean, std = reference.mean(0), reference.std(0) + 1e-6
    reference = (reference - mean) / std
    table = []
    for schedule in schedules:
        gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)  # the same noise for every schedule
        grids, steps = sample(model, n, temperature=schedule, generator=gen, **sample_kwargs)
        f = (features(grids) - mean) / std
        halves = [kernel_distance(half, reference) for half in (f[: n // 2], f[n // 2:])]
        table.append((schedule, kernel_distance(f, reference), abs(halves[0] - halves[1]), steps.float().mean().item()))
        if progress:
            print(f"calibration: schedule {len(table)}/{len(schedules)} ({schedule[0]} -> {schedule[1]}) done", flush=True)
    return choose(table)[0], table

def choose(table):
    """What calibrate stores from its table [(schedule, distance, noise, mean steps)] -> (schedule, how many tied).
    The schedules within the mean noise of the closest one are those the criterion cannot tell apart from it;
    of them, the one whose samples froze after the fewest steps on average (fast sampling is the paper's point)."""
    closest, noise = min(row[1] for row in table), np.mean([row[2] for row in table])
    tied = [row for row in table if row[1] <= closest + noise]
    return min(tied, key=lambda row: row[3])[0], len(tied)

def print_calibration(table, choice, what):
    print(f"calibration ({what}): kernel distance of 128 samples per schedule to the held-out grids (+- noise)")
    for schedule, distance, noise, steps in table:
        print(f"  temperature {schedule[0]:.2f} -> {schedule[1]:.2f}: {distance:8.4f} +- {noise:7.4f} | {steps:5.1f} steps"
              + ("  <- stored" if schedule == choice else ""))
    tied = choose(table)[1]
    if tied > 1:
        print(f"  {tied} schedules lie within the noise of the closest: stored the one that needs the fewest steps")

def save_token_picture(tokens, vocab_size, path, ncol=8):
    """Token grids (n, h, w) as coloured tiles, ncol per row, for when no VQ-GAN is at hand."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(tokens)
    rows, cols = math.ceil(n / ncol), min(n, ncol)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, t in zip(axes.flat, tokens.cpu()):
        ax.imshow(t.numpy(), cmap="viridis", vmin=0, vmax=vocab_size - 1, interpolation="nearest")
    vqgan.save_figure(fig, path)

# --------------------------------------------------------------------------------------------------
# command line (the generic plumbing: flags from dataclass fields, errors, devices, lr schedule, lives in vqgan.py)

def check_schedule(name, start_end, lo, hi):
    """A (start, end) schedule with both ends finite and in [lo, hi]; BadInput naming the flag otherwise."""
    if len(start_end) != 2:
        raise BadInput(f"--{name} {','.join(map(str, start_end))}: needs two numbers, start,end (e.g. 1.0,0.7)")
    if not all(math.isfinite(v) and lo <= v <= hi for v in start_end):
        rule = ">= 0" if hi == math.inf else f"in [{lo}, {hi}]"
        raise BadInput(f"--{name} {','.join(map(str, start_end))}: both ends must be finite and {rule}")

def check_config(mcfg, tcfg):
    """Nonsense flag values stop here, before any work, with one line naming the flag."""
    vqgan.check_config(mcfg, positive=("dim", "heads", "shorten"),
                       nonneg=("vocab_size", "height", "width", "head_dim", "num_classes"))
    vqgan.check_train_config(tcfg, positive=("unroll_steps", "val_every", "val_batches",
                                             "sample_every"),
                             nonneg=("weight_decay", "label_drop", "box_share"),
                             fractions=("val_fraction",))
    if tcfg.label_drop >= 1 or tcfg.box_share > 1:
        raise BadInput("--label_drop must be below 1 and --box_share at most 1 (shares of the training grids), "
                       f"got {tcfg.label_drop} and {tcfg.box_share}")
    check_schedule("temperature", tcfg.temperature, 0.0, math.inf)  # the sampler's own check, at training time
    if mcfg.head_dim % 4:
        raise BadInput(f"--head_dim {mcfg.head_dim} must divide by 4 (2D RoPE rotates channel pairs for rows and for columns)")
    if not mcfg.head_dim and (mcfg.dim % mcfg.heads or (mcfg.dim // mcfg.heads) % 4):
        raise BadInput(f"--dim {mcfg.dim} / --heads {mcfg.heads} must give a whole head size divisible by 4 "
                       "(2D RoPE rotates channel pairs for rows and for columns); "
                       f"e.g. --dim {mcfg.heads * 32}, or set --head_dim")
    if len(mcfg.depth) % 2 == 0 or min(mcfg.depth) < 0 or (len(mcfg.depth) > 1 and mcfg.shorten < 2):
        raise BadInput(f"--depth {','.join(map(str, mcfg.depth))} must have odd length (pre, ..., valley, ..., "
                       "post) with counts >= 0, and --shorten >= 2 when it has levels")

def make_optimizer(model, tcfg):
    """AdamW; weight decay on matrices only (not on biases, LayerNorms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.99), fused=torch.cuda.is_available())

def noise_seed(seed, step, micro):
    """Seed of the noise for one micro-batch: N processes x 1 micro-batch draw what 1 process x N draws."""
    return (seed * 1_000_003 + step) * 1009 + micro

# --------------------------------------------------------------------------------------------------
# training

def activation_bytes(mcfg, micro, unroll_steps, grad_ckpt=False):
    """A lower estimate of what one micro-batch's backward pass keeps, in bytes (fp32): per unrolled step, about 16
    numbers of width dim per token and block (attention and the 4x MLP), and the logits, their softmax and gradient,
    3 x V per token. With activation checkpointing the blocks recompute theirs: the logits remain."""
    tokens, blocks, depth = mcfg.height * mcfg.width, 0, list(mcfg.depth)
    while depth:  # the outer levels' pre and post blocks at full size, each level inside at 1/k^2 of the tokens
        pre, post = (depth.pop(0), depth.pop()) if len(depth) > 1 else (depth.pop(), 0)
        blocks += (pre + post) * tokens
        tokens //= mcfg.shorten ** 2
    per_step = (0 if grad_ckpt else 16 * mcfg.dim * blocks) + 3 * mcfg.vocab_size * mcfg.height * mcfg.width
    return 4 * micro * unroll_steps * per_step

def forward_flops(mcfg):
    """FLOPs of one grid's forward pass (a multiply-add is 2), level by level: per token and block the attention's
    projections (4 x dim x inner, inner = heads x head_dim) and the 4x MLP (8 dim^2), each x 2, and the attention itself
    (4 x tokens x inner); per shortening the merge and the split (2 x k^2 dim^2 per coarse token each); the head (2 dim V
    per token). A training step is 3 unroll_steps forward passes (the backward costs two). This is what sets time at
    scale: docs/benchmark.py --predict fits it to the CPU and predicts the presets on GPUs."""
    inner = mcfg.heads * mcfg.head_dim or mcfg.dim
    tokens, depth, flops = mcfg.height * mcfg.width, list(mcfg.depth), 0
    while depth:
        pre, post = (depth.pop(0), depth.pop()) if len(depth) > 1 else (depth.pop(), 0)
        flops += (pre + post) * tokens * (2 * (4 * mcfg.dim * inner + 8 * mcfg.dim ** 2) + 4 * tokens * inner)
        if depth:  # a shorter level inside: merge and split
            flops += 2 * 2 * mcfg.dim ** 2 * tokens
        tokens //= mcfg.shorten ** 2
    return flops + 2 * mcfg.dim * mcfg.vocab_size * mcfg.height * mcfg.width

def available_bytes(device):
    """Memory a run may fill: the GPU's, or the CPU's currently available RAM (Linux); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None

def prepare_data(mcfg, tcfg, resume_ckpt=None):
    """The latents (and labels),
    checked against everything they must agree with -> (mcfg with V, the grid and the classes filled in, data):
    data.array (memory-mapped), data.labels (or None), data.train and data.val (row indices),
    data.vqgan_id (the tokenizer's identity, or None) and data.class_names.
    """
    meta = latents_meta(tcfg.data)  # V and the VQ-GAN's id, when vqgan.py --encode wrote the latents
    array, V = load_latents(tcfg.data, mcfg.vocab_size or meta.get("vocab_size", 0))
    N, h, w = array.shape
    vqgan_id = meta.get("vqgan_id")
    if tcfg.vqgan:
        vq_id = vqgan.fingerprint(vqgan.shipped_weights(vqgan.load_checkpoint(tcfg.vqgan, "vqgan")))
        if vqgan_id and vq_id != vqgan_id:
            raise BadInput(f"latents {tcfg.data!r} were encoded by another VQ-GAN than --vqgan {tcfg.vqgan!r}; "
                           "pass the VQ-GAN that wrote them")
        vqgan_id = vq_id
    if resume_ckpt and vqgan_id and resume_ckpt.get("vqgan_id") not in (None, vqgan_id):
        raise BadInput(f"--resume: {tcfg.out!r} was trained on latents of another VQ-GAN than {tcfg.data!r}; "
                       "pass the latents it was trained on (--data)")
    if resume_ckpt and tcfg.labels and not mcfg.num_classes:
        raise BadInput(f"--resume: {tcfg.out!r} is an unconditional model (no class embedding); --labels needs a new run (another --out)")
    if (mcfg.height or h, mcfg.width or w) != (h, w):
        asked = "--resume: the checkpoint models" if resume_ckpt else "--height/--width ask for"
        raise BadInput(f"{asked} {mcfg.height}x{mcfg.width} grids but {tcfg.data!r} holds {h}x{w}; "
                       "pass the matching latents (the grid size is read from them)")
    train_idx, val_idx = split_indices(N, tcfg.val_fraction)  # the labels are indexed by the same rows
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise BadInput(f"latents {tcfg.data!r} hold {N} sequences; the train/validation split needs at least 3")
    labels, C, names = None, mcfg.num_classes, None
    if tcfg.labels:
        labels, C = load_labels(tcfg.labels, N, mcfg.num_classes)
        names = meta.get("class_names") if len(meta.get("class_names") or []) == C else [str(c) for c in range(C)]
    elif C:
        raise BadInput(f"--num_classes {C} needs --labels, one class per latent grid")
    mcfg = replace(mcfg, vocab_size=V, height=h, width=w, num_classes=C)
    return mcfg, SimpleNamespace(array=array, labels=labels, train=train_idx, val=val_idx,
                                 vqgan_id=vqgan_id, class_names=names)

@torch.no_grad()
def validate(model, array, val_idx, micro, tcfg, amp, labels=None):
    """Unrolled loss and accuracy on the held-out rows (with their labels), with the same noise every time."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(1234)
    n = min(len(val_idx), tcfg.val_batches * micro)
    loss_sum = acc_sum = 0.0
    for i in range(0, n, micro):
        tokens, lab = get_batch(array, val_idx[i:i + micro], device, labels)
        with amp():
            loss, acc = unrolled_loss(partial(model, labels=lab), tokens, model.vocab_size, tcfg.unroll_steps, gen)
        loss_sum, acc_sum = loss_sum + loss.item() * len(tokens), acc_sum + acc.item() * len(tokens)
    model.train()
    return loss_sum / n, acc_sum / n

@torch.no_grad()
def progress_samples(model, n, steps, generator, temperature=PAPER_TEMPERATURE):
    """The core of sample (uniform start, 32 parallel steps, half the positions each step),
    enough to watch training and independent of the sampler a course student may be writing."""
    V, h, w = model.vocab_size, model.height, model.width
    device = next(model.parameters()).device
    x = torch.randint(V, (n, h, w), generator=generator, device=device)
    for s in range(steps):
        tau = temperature[0] + (temperature[1] - temperature[0]) * s / max(1, steps - 1)  # annealed (paper §3.5)
        new = draw(model(x).reshape(-1, V), tau, generator).reshape(n, h, w)
        x = torch.where(torch.rand(n, h, w, generator=generator, device=device) < 0.5, new, x)
    return x

def save_progress_picture(model, decoder, step, path, amp, temperature):
    """8 samples from the model so far: decoded images with a VQ-GAN, else token pictures."""
    model.eval()
    with amp():
        gen = torch.Generator(next(model.parameters()).device).manual_seed(step)
        toks = progress_samples(model, 8, 32, gen, temperature)  # at the temperature sample.py will use
        if decoder is not None:
            vqgan.save_png(decoder.decode(toks).float(), path, nrow=8)
        else:
            save_token_picture(toks, model.vocab_size, path)
    model.train()

def train(mcfg, tcfg, resume_ckpt=None):
    run = vqgan.setup_processes(tcfg)  # one process, or one of several under torchrun (DDP)
    device, micro = run.device, run.micro
    mcfg, data = prepare_data(mcfg, tcfg, resume_ckpt)
    V, labels, tokens_per_step = mcfg.vocab_size, data.labels, tcfg.batch_size * mcfg.height * mcfg.width
    need, have = activation_bytes(mcfg, micro, tcfg.unroll_steps, tcfg.grad_ckpt), available_bytes(device)
    if have is not None and need > have:  # refused now, not by the allocator minutes later
        raise BadInput(f"--batch_size {tcfg.batch_size}: a micro-batch of {micro} needs {need / 2**30:.1f} GiB or more, "
                       f"{device} has {have / 2**30:.1f} GiB; raise --grad_accum or lower --batch_size")

    try:
        raw_model = HourglassTransformer(**asdict(mcfg), grad_ckpt=tcfg.grad_ckpt).to(device)
    except ValueError as e:  # a grid the hourglass cannot shorten: the user's data or flags
        raise BadInput(str(e))
    opt = make_optimizer(raw_model, tcfg)
    ema = copy.deepcopy(raw_model).requires_grad_(False) if tcfg.ema > 0 else None  # the averaged weights
    step, history = 0, {"train_loss": [], "val_loss": [], "val_acc": []}
    window = vqgan.new_window("loss", "acc")  # running sums over the steps since the last log line
    # the open log window continues: a resumed run logs what an uninterrupted one does
    if resume_ckpt is not None:
        step, history, window = vqgan.restore(resume_ckpt, window, model=raw_model, ema=ema, opt=opt)
    eval_model = ema if ema is not None else raw_model  # what validation, progress samples and sampling use
    model = torch.compile(raw_model) if tcfg.compile else raw_model  # checkpoints come from raw_model, never a wrapper
    if run.ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bf16 = vqgan.use_bf16(tcfg.dtype, device)  # --dtype: bf16 autocast on CUDA by default, fp32 on the CPU
    amp = partial(vqgan.bf16_autocast, device, bf16)  # the head, softmax and cross-entropy stay fp32 inside
    noise = partial(box_corrupt, share=tcfg.box_share) if tcfg.box_share else corrupt  # the paper's, by default
    decoder = vqgan.load_vqgan(tcfg.vqgan, device) if run.master and tcfg.vqgan else None  # for progress pictures

    def save():  # everything a resume needs; atomic, and the checkpoint it replaces stays as OUT.prev
        if run.master:
            vqgan.save_checkpoint({"kind": "sundae", "model_config": asdict(mcfg), "train_config": asdict(tcfg),
                                   "model": raw_model.state_dict(), "ema": None if ema is None else ema.state_dict(),
                                   "opt": opt.state_dict(), "step": step, "history": history,
                                   "rng": torch.get_rng_state(),
                                   "log_window": {k: v if k == "steps" else float(v) for k, v in window.items()},
                                   "vqgan_id": data.vqgan_id, "class_names": data.class_names,
                                   "data_path": os.path.abspath(tcfg.data)}, tcfg.out)

    stop = vqgan.stop_on_signals()  # Ctrl-C or SIGTERM: finish the step, save, exit
    if run.master:
        params = sum(p.numel() for p in raw_model.parameters())
        classes = "" if labels is None else f" | {mcfg.num_classes} classes, label drop {tcfg.label_drop}"
        print(f"sundae: {params / 1e6:.2f}M params | {mcfg.height}x{mcfg.width} tokens, V={V} | "
              f"{len(data.train)} train / {len(data.val)} val sequences | "
              f"batch {tcfg.batch_size} = {run.world} x {tcfg.grad_accum} x {micro} | T={tcfg.unroll_steps} | "
              f"{tokens_per_step} tokens/step on {device}{classes}", flush=True)

    # training loop
    t0 = t_log = time.time()
    start_step = step_log = step
    while step < tcfg.max_steps and not stop:
        lr = lr_at(step, tcfg)  # warm-up, then cosine decay
        for g in opt.param_groups:
            g["lr"] = lr
        # the global batch and its noise are functions of (seed, step, micro-batch):
        # the same computation whatever the number of processes,
        # and a resumed run repeats exactly what it would have done
        gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step)
        idx = torch.randint(len(data.train), (tcfg.batch_size,), generator=gen)
        for m in range(tcfg.grad_accum):
            g = run.rank * tcfg.grad_accum + m  # the micro-batch's number among all processes'
            tokens, lab = get_batch(data.array, data.train[idx[g * micro:(g + 1) * micro]], device, labels)
            gen = torch.Generator(device).manual_seed(noise_seed(tcfg.seed, step, g))
            # label dropout: one network learns p(x | class) and p(x) (classifier-free guidance)
            if lab is not None:
                drop = torch.rand(len(lab), generator=gen, device=device) < tcfg.label_drop
                lab = torch.where(drop, mcfg.num_classes, lab)
            # all-reduce at the end
            with model.no_sync() if run.ddp and m < tcfg.grad_accum - 1 else nullcontext():
                with amp():  # the SUNDAE objective
                    loss, acc = unrolled_loss(partial(model, labels=lab), tokens, V, tcfg.unroll_steps, gen, noise)
                (loss / tcfg.grad_accum).backward()
            # statistics stay on the device: reading them (.item()) would wait for the GPU every step
            window["loss"] += loss.detach() / tcfg.grad_accum
            window["acc"] += acc.detach() / tcfg.grad_accum
        if tcfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            vqgan.ema_update(ema, raw_model, tcfg.ema, step)  # the weights we validate, sample and ship
        step += 1
        window["steps"] += 1

        log = step % tcfg.log_every == 0 or step == tcfg.max_steps
        # before saving
        if (log or step % tcfg.ckpt_every == 0) and not math.isfinite(float(window["loss"])):
            raise BadInput(f"loss is {float(window['loss'])} at step {step}; "
                           f"stopping ({vqgan.checkpoints_left(tcfg.out)}); lower --lr or check the data")
        # one line per window: the mean over its steps (fewer than log_every at the end or after a resume)
        if log:
            means = vqgan.window_means(window, ("loss", "acc"), device, run.ddp)  # averaged over processes too
            history["train_loss"].append((step, means["loss"]))
            dt = (time.time() - t_log) / (step - step_log)  # timed only since this process started
            eta = (time.time() - t0) / (step - start_step) * (tcfg.max_steps - step)
            if run.master:
                print(f"step {step}/{tcfg.max_steps} | loss {means['loss']:.3f} | acc {means['acc']:.3f} | "
                      f"lr {lr:.1e} | {dt * 1e3:.0f} ms | {tokens_per_step / dt / 1e3:.1f}k tok/s | eta {eta / 60:.1f}m", flush=True)
            t_log, step_log, window = time.time(), step, vqgan.new_window("loss", "acc")
        # the held-out loss to watch
        if run.master and (step % tcfg.val_every == 0 or step == tcfg.max_steps):
            vl, va = validate(eval_model, data.array, data.val, micro, tcfg, amp, labels)
            history["val_loss"].append((step, vl))
            history["val_acc"].append((step, va))
            print(f"step {step}/{tcfg.max_steps} | val loss {vl:.3f} | val acc {va:.3f}", flush=True)
        # what the samples look like
        if run.master and (step % tcfg.sample_every == 0 or step == tcfg.max_steps):
            save_progress_picture(eval_model, decoder, step, os.path.splitext(tcfg.out)[0] + "_samples.png", amp,
                                  tcfg.temperature)
        if step % tcfg.ckpt_every == 0 and step < tcfg.max_steps:
            save()

    save()  # the trained weights are safe on disk before calibrating
    if run.master and not stop and tcfg.calibrate:  # the sampling schedule that fits this model and this data
        # a signal now ends the run at once: nothing more is lost
        vqgan.stop_at_once(f"the trained weights are saved in {tcfg.out!r}; python sample.py --calibrate calibrates them")
        if len(data.val) < 32:
            print(f"calibration skipped: {len(data.val)} held-out grids, fewer than 32; keeping the temperature {tcfg.temperature}",
                  flush=True)
        else:
            t_cal = time.time()
            heldout = torch.from_numpy(np.asarray(data.array[data.val], dtype=np.int64))
            best, table = calibrate(eval_model, heldout, decoder, progress=True, bf16=bf16)
            space = "decoded pixels" if decoder else "token statistics"
            print_calibration(table, best, f"{len(data.val)} held-out grids, {space}, {time.time() - t_cal:.0f} s")

            tcfg = replace(tcfg, temperature=best)  # what save() stores and sample.py and inpaint.py use
            save()
    if run.master and not stop:
        vqgan.plot_curves({k: history[k] for k in ("train_loss", "val_loss")},
                          os.path.splitext(tcfg.out)[0] + "_loss.png",
                          "SUNDAE training: unrolled cross-entropy (nats)")
        print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min | val loss {history['val_loss'][-1][1]:.3f} | "
              f"val acc {history['val_acc'][-1][1]:.3f} | peak memory {vqgan.peak_memory(device)}", flush=True)
    vqgan.finish_processes(run, stop, tcfg.out, step)

# --------------------------------------------------------------------------------------------------
# benchmark: throughput, memory and MFU without data

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks (SXM)

def benchmark(mcfg, tcfg, steps=10):
    device = pick_device(tcfg.device)
    V, h, w = mcfg.vocab_size or 8192, mcfg.height or 32, mcfg.width or 32
    mcfg = replace(mcfg, vocab_size=V, height=h, width=w)
    model = HourglassTransformer(**asdict(mcfg), grad_ckpt=tcfg.grad_ckpt).to(device)
    opt = make_optimizer(model, tcfg)
    fwd = torch.compile(model) if tcfg.compile else model
    bf16 = vqgan.use_bf16(tcfg.dtype, device)  # --dtype: bf16 autocast on CUDA by default, fp32 on the CPU
    amp = partial(vqgan.bf16_autocast, device, bf16)
    tokens = torch.randint(V, (tcfg.batch_size, h, w), device=device)

    def one_step():
        with amp():
            loss, _ = unrolled_loss(fwd, tokens, V, tcfg.unroll_steps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def count_step():  # the FLOPs of one step, counted on the eager model
        with amp():
            loss, _ = unrolled_loss(model, tokens, V, tcfg.unroll_steps)
        loss.backward()

    flops = count_flops(count_step)
    opt.zero_grad(set_to_none=True)
    dt = vqgan.seconds_per_step(one_step, steps, device, warmup=3 if device.type == "cuda" else 1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    mfu = f"{flops / dt / peak * 100:.1f}%" if peak else "n/a (no known peak for this device)"
    mem = vqgan.peak_memory(device)
    print(f"device {name} | {'bf16' if bf16 else 'fp32'} | compile {tcfg.compile} | grad_ckpt {tcfg.grad_ckpt}")
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, depth {mcfg.depth}, {h}x{w} tokens, "
          f"V={V}, batch {tcfg.batch_size}, T={tcfg.unroll_steps}")
    print(f"{dt * 1e3:.1f} ms/step | {tcfg.batch_size * h * w / dt / 1e3:.1f}k tok/s | {flops / 1e12:.2f} TFLOP/step "
          f"| {flops / dt / 1e12:.2f} TFLOP/s | MFU {mfu} | peak memory {mem}")

def main(argv=None):
    parser = vqgan.Parser(description="Train SUNDAE (hourglass transformer) on VQ token grids.")
    parser.add_argument("--preset", default=None, choices=list(PRESETS), help="model and training preset (default tiny)")
    parser.add_argument("--benchmark", action="store_true", help="time training steps on random tokens, no data")
    parser.add_argument("--bench_steps", type=int, default=10, help="--benchmark: timed steps after the warm-up")
    add_flags(parser, ModelConfig)
    add_flags(parser, TrainConfig)
    args = parser.parse_args(argv)
    mcfg_p, tcfg_p = PRESETS[args.preset or "tiny"]
    mcfg = replace(mcfg_p, **overrides(args, ModelConfig))
    tcfg = replace(tcfg_p, **overrides(args, TrainConfig))
    if args.benchmark:
        if args.preset in (None, "tiny"):
            mcfg = replace(mcfg, height=mcfg.height or 8, width=mcfg.width or 8, vocab_size=mcfg.vocab_size or 256)
        if args.bench_steps < 1:
            raise BadInput(f"--bench_steps must be at least 1, got {args.bench_steps}")
        return benchmark(mcfg, tcfg, args.bench_steps)
    resume_ckpt = None
    if tcfg.resume:
        resume_ckpt = vqgan.load_checkpoint(tcfg.out, "sundae")
        mcfg, tcfg = vqgan.resumed_configs(resume_ckpt, ModelConfig, TrainConfig, args)
    if args.temperature is not None:  # a schedule the user chose wins over calibration
        tcfg = replace(tcfg, calibrate=False)
    if tcfg.vqgan and not mcfg.vocab_size:
        mcfg = replace(mcfg, vocab_size=vqgan.load_checkpoint(tcfg.vqgan, "vqgan")["model_config"]["codebook_size"])
    check_config(mcfg, tcfg)
    vqgan.run_guarded(train, mcfg, tcfg, resume_ckpt, inputs=[tcfg.data, tcfg.vqgan])  # what is on disk is safe

if __name__ == "__main__":
    vqgan.run_main(main)
