"""
Inpainting with arbitrary masks: keep the tokens of the known part of an image, sample the rest.

McKinney & Willcocks §3.6. A non-autoregressive model sees the whole grid, so any mask works: a
token is known iff all f x f pixels of its cell are known; the unknown tokens are denoised by
sundae.py:sample while the known ones are held fixed and give the model its context. Not in the paper:
the unknown tokens start from the training grids closest to the known ones in the tokenizer's code space
(nearest_starts; the paper starts from uniform noise, --start random), and each image is filled CANDIDATES
times and best_fit keeps the fill that best agrees with the known pixels.

    python inpaint.py                                            # held-out toy faces, centre box -> inpaint.png
    python inpaint.py --image face.png --box 8,16,24,28          # box in pixels of the model-sized image (32 px)
    python inpaint.py --image face.png --mask mask.png           # white = fill in, black = keep
    python inpaint.py --random_boxes 3 --samples 6
    python inpaint.py --tokens grid.npy --known known.npy --out filled.npy --samples 4   # token grids, no VQ-GAN
    python inpaint.py --sundae sundae_cond.pt --class red --guidance 1   # a class-conditional model: fill as a class
    python inpaint.py --eval 256                                 # do fills agree with their context? (toy faces)

Imports sample.py, sundae.py and vqgan.py; importing it does no work.
"""
import os

import numpy as np
import torch
from PIL import Image

import sundae
import vqgan
from sample import add_sampling_flags, decode, load_pair, parse_classes, sample, token_dtype
from vqgan import BadInput

MAX_FILLS = 1024  # fills per image (--samples x --candidates) sampled in one batch
# best_fit's default number of fills per inpainting.
# Where one code serves several colours (the toy faces' skin tones) the best of 4 by the known pixels keeps the hidden
# colour in 82% of fills against 47% for one; on the real-image benchmark (docs/RESULTS.md),
# with fills started from the nearest grids, 4 adds 1 to 3 points for 4x the time and 16 little more:
# 4 is the knee of agreement per second
CANDIDATES = 4

def pixel_to_token_mask(known_pixels, f):
    """Which tokens inpainting may keep (paper §3.6): known_pixels bool (B, H, W),
    H and W multiples of f -> bool (B, H/f, W/f).
    Token (i, j) stands for the f x f pixel cell of rows i*f .. i*f+f-1 and columns j*f .. j*f+f-1;
    it is known iff all f*f pixels of its cell are known (a logical AND over the cell),
    so no unknown pixel is ever covered by a kept token."""
    B, H, W = known_pixels.shape
    cells = known_pixels.reshape(B, H // f, f, W // f, f)  # (B, h, f, w, f): each token's cell
    return cells.all(dim=4).all(dim=2)  # (B, h, w)

def inpaint(model, tokens, known, start=None, **sample_kwargs):
    """tokens (B, h, w), known bool (B, h, w) -> tokens with the unknown positions sampled,
    known ones unchanged. start (B, h, w): the tokens the unknown positions start from (nearest_starts);
    None = uniform random, as unconditional sampling and the paper."""
    if known.shape != tokens.shape or (start is not None and start.shape != tokens.shape):
        start_shape = None if start is None else tuple(start.shape)
        raise BadInput(f"mask has shape {tuple(known.shape)} and the start {start_shape} but the tokens {tuple(tokens.shape)}; "
                       "they must match")
    if start is None:
        start = torch.randint(model.vocab_size, tokens.shape, generator=sample_kwargs.get("generator"),
                              device=tokens.device)
    init = torch.where(known, tokens, start.to(tokens.device))
    out, _ = sample(model, len(tokens), init=init, known=known, **sample_kwargs)
    return out

@torch.no_grad()
def nearest_starts(codes, tokens, known, reference, k=1):
    """Where fills start: for each grid of tokens (B, h, w) with known bool (B, h, w),
    the k grids of `reference` (N, h, w) (the latents the prior trained on) whose tokens lie closest at the known
    positions -> (B * k, h, w), grid b's in rows b * k .. b * k + k - 1, closest first (cycling when k > N).
    A grid's distance is the sum over the known positions of the squared distance between the two tokens' codes (V, d),
    vq.quantize.codes(); with codes None, the number of ids that differ.
    Why: a small prior learns token ids, not which ids look alike; the codes know.
    Started from uniform noise (the paper), one fill of half a handwritten digit keeps its class 60 to 76% of the time;
    started here, 88%,
    as often as pasting the hidden half of the training image nearest by its pixels (docs/RESULTS.md)."""
    starts = []
    for grid, keep in zip(tokens, known):
        ids, ref = grid[keep], reference[:, keep]  # (P,), (N, P): the tokens at the known positions
        if codes is None:
            d = (ref != ids).sum(1)
        else:
            d = torch.cdist(codes[ids], codes).square()[torch.arange(len(ids), device=ids.device), ref].sum(1)
        order = d.topk(min(k, len(d)), largest=False).indices
        starts.append(reference[order[torch.arange(k, device=order.device) % len(order)]])
    return torch.cat(starts)

def best_fit(vq, images, known_pixels, fills, colour_weight=1.0):
    """fills (B * K, h, w): K fillings of each of the B images (B, 3, H, W) in [-1, 1] -> (B, h, w),
    for each image the fill that best agrees with its known pixels (bool (B, H, W)).
    Why this helps: the context's tokens carry colour coarsely (one code serves several skin tones),
    so the prior often picks the wrong one; the known pixels carry it exactly.
    A fill's score, both terms squared colour distances per pixel (lower is better):
    - the decoded image's error over the known pixels (the decoder's receptive field crosses the hole's border), plus
    - colour_weight x the median over the hole's pixels of the distance to the nearest known pixel's colour:
      the fill is painted in its context's colours.
      The median lets a minority of new colours through (the eyes and mouth a box hides), not a face in another tone.
      Large images take part at about 32 x 32 pixels.
    Not in the paper: a deviation that costs K samples per fill."""
    B, K = len(images), len(fills) // len(images)
    decoded = decode(vq, fills).reshape(B, K, *images.shape[1:])  # (B, K, 3, H, W)
    s = max(1, images.shape[-1] // 32)  # pixel stride for the colour term
    score = torch.zeros(B, K, device=fills.device)
    for b, (image, known, painted) in enumerate(zip(images, known_pixels, decoded)):
        err = (painted - image).pow(2).sum(1)  # (K, H, W)
        score[b] = (err * known).sum((1, 2)) / known.sum().clamp(min=1)
        palette = image[:, ::s, ::s].permute(1, 2, 0)[known[::s, ::s]]  # (P, 3): the known pixels' colours
        hole = painted[:, :, ::s, ::s].permute(0, 2, 3, 1)[:, ~known[::s, ::s]]  # (K, Q, 3): the fills' colours
        if colour_weight and len(palette) and hole.shape[1]:
            score[b] += colour_weight * torch.cdist(hole, palette[None]).amin(2).pow(2).median(1).values
    return fills.reshape(B, K, *fills.shape[1:])[torch.arange(B), score.argmin(1)]

# --------------------------------------------------------------------------------------------------
# does the fill agree with its context? (toy faces, whose true colours are known)

def hole_masks(n, size, rng=None, sides=None, boxes=1):
    """Pixels to fill in (n, size, size): the default centred box over eyes, nose and mouth,
    or (with rng) `boxes` random boxes per image whose sides are drawn from range(*sides) pixels."""
    unknown = np.zeros((n, size, size), bool)
    if rng is None:
        unknown[:, size * 3 // 8: size * 7 // 8, size // 4: size * 3 // 4] = True
        return unknown
    for b in range(n):
        for _ in range(boxes):
            bw, bh = rng.integers(*sides, 2)
            x0, y0 = rng.integers(0, size - bw + 1), rng.integers(0, size - bh + 1)  # the last row and column too
            unknown[b, y0:y0 + bh, x0:x0 + bw] = True
    return unknown

def palette_agreement(guess, images, attrs, hole):
    """For each toy-face attribute (skin, hair, background, shirt): the share of images whose guess (n, H, W, 3) has,
    over the hole's pixels of that attribute's colour in the original images (n, H, W, 3),
    a median colour nearest to the original's palette entry (attrs (n, 4), toy_faces(labels="all")) -> {name: (share,
    images counted)}.
    An image counts when the hole (n, H, W) hides at least 4 such pixels and the known pixels show at least 4."""
    out = {}
    for a, (name, palette) in enumerate(vqgan.TOY_PALETTES.items()):
        hits = []
        for i in range(len(images)):
            has = np.abs(images[i].astype(int) - palette[attrs[i, a]]).max(-1) <= 8  # its colour, +- the jitter
            if (has & hole[i]).sum() >= 4 and (has & ~hole[i]).sum() >= 4:
                c = np.median(guess[i][has & hole[i]], 0)
                hits.append(((palette - c) ** 2).sum(1).argmin() == attrs[i, a])
        out[name] = (float(np.mean(hits)) if hits else float("nan"), len(hits))
    return out

def context_agreement(model, vq, n, seed=0, candidates=1, reference=None, **sample_kwargs):
    """Inpaint n held-out toy faces (best_fit of `candidates` fillings, each started from its nearest_starts in the
    grids `reference`,
    or uniform random if None) in the default box and in random boxes of three sizes; judge each fill by the generator's
    truth -> {hole:
    {"inpaint": palette_agreement, "random face": the same for the pixels of a random other face (chance), "error": mean
    absolute pixel error (0-255) over the filled cells, "random error"}}."""
    size, f = vq.config.size, vq.downsample_factor
    images, attrs = vqgan.toy_faces(n, size, seed=1, labels="all")  # held-out: vqgan.py trains on seed 0
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (n, 3, H, W) in [-1, 1]
    x = x.to(next(vq.parameters()).device)
    with torch.no_grad():
        tokens = vq.encode(x)  # (n, h, w)
    rng, gen = np.random.default_rng(seed), torch.Generator(x.device).manual_seed(seed)
    repeat = lambda t: t.repeat_interleave(candidates, 0)
    other = images[(np.arange(n) + rng.integers(1, n, n)) % n].astype(float)  # a random other face for each
    results = {}
    for sides in (None, (4, 11), (10, 17), (16, 25)):
        unknown = hole_masks(n, size) if sides is None else hole_masks(n, size, rng, sides)
        known = pixel_to_token_mask(torch.from_numpy(~unknown), f).to(x.device)
        hole = ~known.repeat_interleave(f, 1).repeat_interleave(f, 2).cpu().numpy()  # (n, H, W): filled cells
        start = None if reference is None else nearest_starts(vq.quantize.codes(), tokens, known,
                                                                reference.to(x.device), candidates)
        fills = inpaint(model, repeat(tokens), repeat(known), start, generator=gen, **sample_kwargs)
        fill = decode(vq, best_fit(vq, x, torch.from_numpy(~unknown).to(x.device), fills))
        fill = fill.clamp(-1, 1).add(1).mul(127.5).round().permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
        results["default box" if sides is None else f"boxes {sides[0]}-{sides[1] - 1} px"] = {
            "inpaint": palette_agreement(fill, images, attrs, hole),
            "error": np.abs(fill - images)[hole].mean(),
            "random face": palette_agreement(other, images, attrs, hole),
            "random error": np.abs(other - images)[hole].mean()}
    return results

# --------------------------------------------------------------------------------------------------
# command line

def load_rgb(path, size, what):
    """An image file -> (uint8 (size, size, 3), its (w, h)),
    resized on the short side and centre-cropped like training data."""
    try:
        with Image.open(path) as im:
            w, h = im.size
        if min(w, h) < size:
            raise BadInput(f"{what} {path!r} is {w}x{h}, smaller than the model's {size}x{size}; use a larger image")
        return vqgan.load_image(path, size), (w, h)
    # missing, truncated, not an image, too large
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"cannot read {what} {path!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass a PNG or JPEG file")

def load_reference(args, model, vq=None):
    """--start nearest:
    the grids fills start from (N, h, w) int64 (--reference, default the latents the SUNDAE checkpoint trained on),
    checked against the model and the VQ-GAN; None for --start random."""
    if args.start == "random":
        return None
    path = args.reference or model.trained_on
    if not os.path.exists(path):
        raise BadInput(f"--start nearest starts each fill from the closest grid of the latents {path!r}, "
                       "which are not there; pass --reference LATENTS.npy, or --start random")
    grids, _ = sundae.load_latents(path, model.vocab_size, "--reference", fix="pass the latents the model trained on")
    made_by = sundae.latents_meta(path).get("vqgan_id")
    # a start from another tokenizer's ids is noise that looks like a start: the model's tokenizer, or --vqgan's
    for what, expected in (("the model was trained on", model.vqgan_id),
                           (f"--vqgan {args.vqgan!r}", vq and vqgan.fingerprint(vq.state_dict()))):
        if expected and made_by != expected and (made_by or os.path.realpath(path) != os.path.realpath(model.trained_on)):
            why = "its .json sidecar names another" if made_by else "no .json sidecar names its VQ-GAN"
            raise BadInput(f"--reference {path!r} holds tokens of another VQ-GAN than {what} ({why}); "
                           "pass the latents the model trained on, or --start random")
    if grids.shape[1:] != (model.height, model.width):
        raise BadInput(f"--reference {path!r} holds {grids.shape[1]}x{grids.shape[2]} grids; "
                       f"the model makes {model.height}x{model.width}")
    print(f"fills start from the nearest of the {len(grids)} grids in {os.path.abspath(path)!r}")
    return torch.from_numpy(np.array(grids, np.int64))

def class_kwargs(args, model, n):
    """--class K --guidance W -> the sampler's labels (K for all n fillings) and guidance; {} without --class."""
    classes = parse_classes(args.classes, model, args.guidance)
    if classes is None:
        return {}
    if len(classes) != 1:
        raise BadInput(f"inpaint.py --class takes one class, got {args.classes!r}")
    return {"labels": torch.full((n,), classes[0]), "guidance": args.guidance}

def inpaint_tokens(args, device):
    """inpaint.py --tokens grid.npy --known known.npy --out filled.npy: the SUNDAE model alone fills in token grids.
    The output holds `samples` fillings of each grid: rows b * samples + k, shape (B * samples, h, w)."""
    if not (args.tokens and args.known and args.out):
        raise BadInput("token inpainting needs --tokens grid.npy, --known known.npy and --out filled.npy")
    if args.image or args.mask or args.box or args.random_boxes or args.candidates is not None:
        raise BadInput("--tokens inpaints token grids: --image, --mask, --box, --random_boxes and --candidates "
                       "(which compares decoded pixels) do not apply; use --known to say which tokens to keep")
    vqgan.check_outputs({"--out": args.out}, [args.sundae, args.tokens, args.known], args.overwrite)
    model = sundae.load_sundae(args.sundae, device)
    tokens = vqgan.check_tokens(vqgan.load_npy(args.tokens, "--tokens"), model.vocab_size,
                                model.height, model.width, f"--tokens {args.tokens!r}")
    known = np.asarray(vqgan.load_npy(args.known, "--known"))
    known = known[None] if known.ndim == 2 else known
    if known.shape != tuple(tokens.shape):
        raise BadInput(f"--known has shape {known.shape} but --tokens {tuple(tokens.shape)}; they must match")
    if known.dtype != bool and not (np.issubdtype(known.dtype, np.integer) and np.isin(known, (0, 1)).all()):
        raise BadInput(f"--known must be bool or 0/1 integers (1 = keep), got dtype {known.dtype} with other values")
    known = torch.from_numpy(known.astype(bool))
    repeat = lambda t: t.repeat_interleave(args.samples, 0).to(device)
    gen = torch.Generator(device).manual_seed(args.seed)
    reference = load_reference(args, model)
    start = None if reference is None else nearest_starts(None, tokens, known, reference, args.samples)
    filled = inpaint(model, repeat(tokens), repeat(known), start, steps=args.steps,
                     temperature=args.temperature,
                     proportion=args.proportion, generator=gen, bf16=args.bf16,
                     **class_kwargs(args, model, len(tokens) * args.samples))
    assert torch.equal(filled[repeat(known)], repeat(tokens)[repeat(known)]), "known tokens changed"
    ids = filled.cpu().numpy().astype(token_dtype(model.vocab_size))
    vqgan.write_atomic(args.out, lambda f: np.save(f, ids))
    print(f"wrote {args.out}: {tuple(filled.shape)} = {len(tokens)} grid(s) x {args.samples} fillings "
          f"| {(~known).float().mean():.0%} of tokens filled in")

def print_agreement(args, device):
    """inpaint.py --eval N: context_agreement's table, a row per kind of hole."""
    if args.eval < 2 or args.image or args.mask or args.box or args.random_boxes or args.tokens:
        raise BadInput(f"--eval N inpaints N >= 2 held-out toy faces in its own holes, got --eval {args.eval}; "
                       "--image, --mask, --box, --random_boxes and --tokens do not apply")
    if vqgan.load_checkpoint(args.vqgan, "vqgan").get("train_config", {}).get("data") != "toy":
        raise BadInput("--eval judges fills of toy faces, whose true colours are known; "
                       f"--vqgan {args.vqgan!r} was not trained on them (vqgan.py --data toy)")
    model, vq = load_pair(args.sundae, args.vqgan, device)
    rows = context_agreement(model, vq, args.eval, args.seed, args.candidates, load_reference(args, model, vq),
                             steps=args.steps,
                             temperature=args.temperature, proportion=args.proportion,
                             bf16=args.bf16,
                             **class_kwargs(args, model, args.eval * args.candidates))
    print(f"fills that agree with the context ({args.eval} held-out toy faces; inpainted / a random face's pixels)")
    print(f"{'hole':18s}" + "".join(f"{a:>16s}" for a in vqgan.TOY_PALETTES) + f"{'pixel error':>16s}")
    for hole, r in rows.items():
        cells = [f"{r['inpaint'][a][0]:.0%} / {r['random face'][a][0]:.0%}" for a in vqgan.TOY_PALETTES]
        print(f"{hole:18s}" + "".join(f"{c:>16s}" for c in cells) + f"{r['error']:>9.1f} / {r['random error']:.1f}")

def main(argv=None):
    p = vqgan.Parser(description="Inpaint images with a trained SUNDAE + VQ-GAN.")
    p.add_argument("--sundae", default="sundae.pt", help="SUNDAE checkpoint")
    p.add_argument("--vqgan", default="vqgan.pt", help="VQ-GAN checkpoint")
    p.add_argument("--image", default="", help="image to inpaint (default: 4 held-out toy faces)")
    p.add_argument("--mask", default="",
                   help="mask image with --image's aspect ratio (any size, e.g. drawn on an enlarged copy): white = fill in")
    p.add_argument("--box", default="", help="x0,y0,x1,y1: fill in this box (pixels of the model-sized image)")
    p.add_argument("--random_boxes", type=int, default=0, help="fill in N random boxes per image instead")
    p.add_argument("--samples", type=int, default=4, help="inpaintings per image")
    p.add_argument("--candidates", type=int,
                   help="sample each inpainting this many times and keep the one that best agrees with the known pixels "
                        "(default CANDIDATES = 4; 1 = the paper's single sample)")
    p.add_argument("--start", default="nearest", choices=("nearest", "random"),
                   help="where the unknown tokens start: nearest = the --reference grids closest to the known tokens "
                        "(by their codes; with --tokens, by the ids that differ), random = uniform (the paper's)")
    p.add_argument("--reference", default="",
                   help="latents (N, h, w) .npy that fills start from (default: the latents the SUNDAE checkpoint trained on)")
    add_sampling_flags(p)
    p.add_argument("--tokens", default="", help="inpaint token grids instead: an (B, h, w) .npy of ids (no VQ-GAN)")
    p.add_argument("--known", default="", help="with --tokens: (B, h, w) .npy, bool or 0/1, 1 = keep this token")
    p.add_argument("--out", default="",
                   help="figure: original | masked | inpaintings, a row per image (default inpaint.png); "
                        "with --tokens the filled grids as (B * samples, h, w) .npy")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that the scripts did not write, or a read-only one")
    p.add_argument("--eval", type=int, default=0,
                   help="judge fills of N held-out toy faces by their true colours: "
                        "how often each agrees with the context, and the pixel error")
    args = p.parse_args(argv)
    device = vqgan.pick_device(args.device)
    args.bf16 = vqgan.use_bf16(args.dtype, device)
    if args.samples < 1 or (args.candidates is not None and args.candidates < 1):
        raise BadInput(f"--samples and --candidates must be at least 1, got {args.samples} and {args.candidates}")
    if args.samples * (args.candidates or CANDIDATES) > MAX_FILLS:  # one batch holds them all
        raise BadInput(f"--samples x --candidates is {args.samples * (args.candidates or CANDIDATES)}; "
                       f"at most {MAX_FILLS} fills per image are sampled in one batch: lower --samples or --candidates")
    if args.tokens or args.known:
        return inpaint_tokens(args, device)
    args.candidates = CANDIDATES if args.candidates is None else args.candidates
    if args.eval:
        return print_agreement(args, device)
    args.out = args.out or "inpaint.png"
    if sum(map(bool, (args.mask, args.box, args.random_boxes))) > 1:
        raise BadInput("--mask, --box and --random_boxes each choose the region to fill in; pass only one of them")
    if args.random_boxes < 0 or args.steps < 1:
        raise BadInput(f"--random_boxes must be >= 0 and --steps >= 1, got {args.random_boxes} and {args.steps}")
    vqgan.check_outputs({"--out": args.out}, [args.sundae, args.vqgan, args.image, args.mask], args.overwrite)
    model, vq = load_pair(args.sundae, args.vqgan, device)
    reference = load_reference(args, model, vq)
    size, f = vq.config.size, vq.downsample_factor

    if args.image:
        img, orig_size = load_rgb(args.image, size, "image")
        images = img[None]
    else:
        images = vqgan.toy_faces(4, size, seed=1)  # held-out faces: vqgan.py trains on seed 0
    B = len(images)
    unknown = np.zeros((B, size, size), bool)  # pixels to fill in
    if args.mask:
        if not args.image:
            raise BadInput("--mask needs --image (the mask must match an image's size)")
        try:
            with Image.open(args.mask) as m:
                (mw, mh), (w, h) = m.size, orig_size
            # resized and cropped like the image, a mask of the same shape covers the same pixels
            if mw * h != mh * w:
                raise BadInput(f"mask {args.mask!r} is {mw}x{mh} but the image is {w}x{h}; "
                               "draw the mask on the image (or on a copy enlarged by any factor), white where to fill in")
            unknown[:] = vqgan.load_mask(args.mask, size)  # same resize and crop as the image; no hole vanishes
        # missing, truncated, not an image
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, BadInput):
                raise
            raise BadInput(f"cannot read mask {args.mask!r} ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                           "pass a PNG, white where to fill in")

    elif args.box:
        try:
            x0, y0, x1, y1 = (int(v) for v in args.box.split(","))
        except ValueError:
            raise BadInput(f"--box must be four integers x0,y0,x1,y1, got {args.box!r}")
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            raise BadInput(f"--box {args.box} must satisfy 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}")
        unknown[:, y0:y1, x0:x1] = True
    elif args.random_boxes:
        unknown = hole_masks(B, size, np.random.default_rng(args.seed), (size // 8, size // 2), args.random_boxes)
    else:  # default: a centred box over the eyes, nose and mouth
        unknown = hole_masks(B, size)

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)  # (B, 3, H, W)
    known = pixel_to_token_mask(torch.from_numpy(~unknown), f).to(device)  # (B, h, w)
    with torch.no_grad():
        tokens = vq.encode(x)  # (B, h, w)
    # every image repeated K = samples x candidates times: one batch, and each filling freezes independently
    K, gen = args.samples * args.candidates, torch.Generator(device).manual_seed(args.seed)
    start = None if reference is None else nearest_starts(vq.quantize.codes(), tokens, known, reference.to(device), K)
    fills = inpaint(model, tokens.repeat_interleave(K, 0), known.repeat_interleave(K, 0), start, steps=args.steps,
                    temperature=args.temperature, proportion=args.proportion, generator=gen, bf16=args.bf16,
                    **class_kwargs(args, model, B * K))
    # best_fit keeps, for each of the samples, the best of its candidates: one row per image and sample from here on
    per_sample = lambda t: t.repeat_interleave(args.samples, 0)
    filled = best_fit(vq, per_sample(x), per_sample(torch.from_numpy(~unknown).to(device)), fills)
    assert torch.equal(filled[per_sample(known)], per_sample(tokens)[per_sample(known)]), "known tokens changed"
    outs = decode(vq, filled, bf16=args.bf16).reshape(B, args.samples, 3, size, size)
    # what the model was given: known token cells in colour, the rest grey
    keep = known.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, None]  # (B, 1, H, W)
    masked = torch.where(keep, x, torch.zeros_like(x))
    rows = torch.cat([x[:, None], masked[:, None], outs], 1)  # (B, 2 + samples, 3, H, W)
    vqgan.save_png(rows.flatten(0, 1), args.out, nrow=2 + args.samples)
    print(f"wrote {args.out}: {B} image(s) x {args.samples} inpaintings | {(~known).float().mean():.0%} of tokens filled in | "
          "columns: original, masked, inpaintings")


if __name__ == "__main__":
    vqgan.run_main(main)
