"""
The 2D-aware hourglass transformer: SUNDAE's denoising network (McKinney & Willcocks §3.2; Nawrot et
al. 2021).

A token grid (B, h, w) is embedded, processed by a few full-resolution blocks, shortened by merging
k x k patches, processed by the (deeper) valley at the coarse resolution, lengthened again, added to
the skip, and finished by a few full-resolution blocks. Most layers therefore run on k^2 times fewer
tokens. The paper's changes to the hourglass: resample in 2D (patches, not runs of the flattened
sequence), 2D rotary position embeddings, and no causal masking (SUNDAE is not autoregressive).

    python hourglass.py                                # parameter counts of the presets
    python hourglass.py --benchmark                    # 2D vs 1D hourglass vs flat, 32x32 tokens (CPU or CUDA)
    python hourglass.py --benchmark --preset tiny --height 8 --width 8

Imports nothing from this project; importing it does no work.
"""
import argparse
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

def flag(default, help):
    """A config field and its command-line help (sundae.py makes one --flag per field, with vqgan.add_flags)."""
    return field(default=default, metadata={"help": help})

@dataclass
class HourglassConfig:
    """The network's whole shape: HourglassTransformer(**asdict(config)). Checkpoints store asdict(config)."""
    dim: int = flag(128, "transformer width")
    heads: int = flag(4, "attention heads")
    head_dim: int = flag(0, "width of one head, a multiple of 4 for 2D RoPE; 0 = dim / heads (the heads split the width)")
    depth: tuple = flag((1, 4, 1), "blocks per hourglass level: (pre, valley, post); (2, 2, 8, 2, 2) nests two levels")
    shorten: int = flag(2, "k: each level merges k x k patches")
    resample: str = flag("2d", "'2d': merge k x k patches (the paper's); '1d': merge runs of k^2 raster tokens (Nawrot et al.), to compare")
    vocab_size: int = flag(0, "V; 0 = from the latents' sidecar or --vqgan, else max id in the data + 1")
    height: int = flag(0, "token grid rows; 0 = from the data")
    width: int = flag(0, "token grid columns; 0 = from the data")
    num_classes: int = flag(0, "class-conditional with this many classes (+ a 'no class' entry); 0 = unconditional")

PRESETS = {
    "tiny": HourglassConfig(),  # CPU demo: 1.4M params on 8x8 toy-face tokens
    "ffhq256": HourglassConfig(dim=1024, heads=16, depth=(2, 10, 2), vocab_size=1024,
                               height=16, width=16),
    "ffhq1024": HourglassConfig(dim=1024, heads=16, depth=(2, 12, 2), vocab_size=8192,
                                height=32, width=32),
}

# --------------------------------------------------------------------------------------------------
# 2D rotary position embeddings

def rope_2d(x, h, w, stride=1, base=10000.0):
    """Rotate queries or keys by their 2D grid position (RoFormer, Su et al.; 2D as in Biderman et al.; paper §3.2).

    x: (B, heads, h*w, head_dim) in raster order (position n is row n // w, column n % w), already split into heads,
    so every head gets positions (the authors' code rotated before the head split, so only head 0 did).
    x is float32, or bfloat16 under bf16 autocast (the attention's projections hand it over in that dtype).
    Returns the same shape and dtype as x, computed in float32. The conventions (the tests check each one):
    - head_dim D divides by 4. Channels pair up as neighbours, (x[2i], x[2i+1]) for i = 0 .. D/2 - 1.
      The first D/4 pairs (channels 0 .. D/2 - 1) are the row half, the last D/4 pairs the column half.
    - Pair j of a half (j = 0 .. n_pairs - 1, n_pairs = D/4) turns by the angle pos * base**(-j / n_pairs),
      pos being the token's row (row half) or column (column half).
    - Counter-clockwise: (a, b) -> (a cos t - b sin t, a sin t + b cos t).
    - stride: at a coarse level a token stands for a stride x stride patch of the finest grid;
      it sits at the patch centre in fine-grid units, pos = (i + 0.5) * stride - 0.5 for coarse row or column i,
      so a position means the same thing at every level (stride 1: pos = i).
    Then <rope(q, p), rope(k, p')> depends on p' - p only, and norms are preserved."""
    B, H, N, D = x.shape
    assert N == h * w, f"sequence length {N} is not h*w = {h}*{w}"
    assert D % 4 == 0, f"head_dim {D} must divide by 4 (two halves of channel pairs)"
    pos = (torch.arange(max(h, w), device=x.device, dtype=torch.float32) + 0.5) * stride - 0.5  # patch centres
    rows = pos[:h, None].expand(h, w).reshape(N)  # (N,) row of each raster position
    cols = pos[None, :w].expand(h, w).reshape(N)  # (N,) column
    n_pairs = D // 4  # channel pairs per half
    j = torch.arange(n_pairs, device=x.device, dtype=torch.float32)  # (D/4,) pair index
    freqs = base ** (-j / n_pairs)  # (D/4,)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (N, D/2): row pairs, column pairs
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().reshape(B, H, N, D // 2, 2).unbind(-1)  # (B, H, N, D/2) each: the two members of a pair
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # rotate each pair
    return out.reshape(B, H, N, D).type_as(x)

# --------------------------------------------------------------------------------------------------
# transformer block

class Attention(nn.Module):
    """Multi-head self-attention over the whole grid;
    heads x head_dim is its inner width (usually dim; the authors' FFHQ-1024 model used 8 heads of 64 at dim 1024, half
    the width)."""

    def __init__(self, dim, heads, head_dim=0):
        super().__init__()
        assert head_dim or dim % heads == 0, f"dim {dim} must divide by heads {heads}"
        self.heads, self.head_dim = heads, head_dim or dim // heads
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim)
        self.proj = nn.Linear(heads * self.head_dim, dim)

    def forward(self, x, h, w, stride):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, N, hd) each
        q, k = rope_2d(q, h, w, stride), rope_2d(k, h, w, stride)  # positions after the head split: every head
        y = F.scaled_dot_product_attention(q, k, v)  # non-causal: SUNDAE sees the whole grid (paper §3.2)
        return self.proj(y.transpose(1, 2).reshape(B, N, -1))  # (B, N, D)

class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, dim, heads, head_dim=0):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, head_dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, h, w, stride):
        x = x + self.attn(self.ln1(x), h, w, stride)
        return x + self.mlp(self.ln2(x))

# --------------------------------------------------------------------------------------------------
# 2D resampling

class Downsample2D(nn.Module):
    """Merge each k x k patch of the grid into one token: concatenate the k^2 vectors, Linear(k^2 D -> D).

    The paper's fix (§3.2): a fine token influences only the coarse token of its own 2D patch.
    The authors' attention resampling grouped k^2 consecutive raster tokens, a row strip, instead."""

    def __init__(self, dim, k):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(k * k * dim, dim)

    def forward(self, x, h, w):
        """x:
        (B, h*w, D) in raster order over the fine h x w grid (h, w divisible by k) -> (B, (h/k)*(w/k), D) in raster
        order over the coarse grid: coarse token (i, j) is self.proj of the k*k vectors of fine rows i*k .. i*k+k-1,
        columns j*k .. j*k+k-1, concatenated (in any fixed order: the Linear learns it)."""
        B, N, D = x.shape
        k = self.k
        x = x.reshape(B, h // k, k, w // k, k, D)  # (B, h/k, k, w/k, k, D): split rows and columns into patches
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h/k, w/k, k, k, D): the k x k patch next to each other
        x = x.reshape(B, (h // k) * (w // k), k * k * D)  # (B, hw/k^2, k^2 D)
        return self.proj(x)  # (B, hw/k^2, D)

class Upsample2D(nn.Module):
    """Split each coarse token into its k x k patch: Linear(D -> k^2 D), then put the pieces back in the grid.

    h, w are the fine grid; a coarse token only reaches the k x k fine tokens it summarised."""

    def __init__(self, dim, k):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(dim, k * k * dim)

    def forward(self, x, h, w):
        """x: (B, (h/k)*(w/k), D) in raster order over the coarse grid; h,
        w are the fine grid -> (B, h*w, D) in raster order:
        self.proj turns coarse token (i, j) into k*k vectors of D (in any fixed order),
        which become the fine tokens of rows i*k .. i*k+k-1, columns j*k .. j*k+k-1."""
        B, M, D = x.shape
        k = self.k
        x = self.proj(x).reshape(B, h // k, w // k, k, k, D)  # (B, h/k, w/k, k, k, D)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h/k, k, w/k, k, D)
        return x.reshape(B, h * w, D)  # (B, hw, D) in raster order

class Downsample1D(nn.Module):
    """The 1D hourglass's shortening (Nawrot et al. 2021), kept to measure what 2D resampling buys (--resample 1d):
    merge each run of k^2 consecutive tokens of the flattened sequence, a strip of one row, Linear(k^2 D -> D)."""

    def __init__(self, dim, k):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(k * k * dim, dim)

    def forward(self, x, h, w):  # (B, h*w, D) -> (B, h*w/k^2, D): the coarse grid has h rows of w/k^2 runs
        B, N, D = x.shape
        return self.proj(x.reshape(B, N // self.k ** 2, self.k ** 2 * D))

class Upsample1D(nn.Module):
    """Split each coarse token back into its run of k^2 consecutive tokens: Linear(D -> k^2 D)."""

    def __init__(self, dim, k):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(dim, k * k * dim)

    def forward(self, x, h, w):  # (B, h*w/k^2, D) -> (B, h*w, D)
        B, M, D = x.shape
        return self.proj(x).reshape(B, h * w, D)

# --------------------------------------------------------------------------------------------------
# the hourglass

class Level(nn.Module):
    """One level of the hourglass; depth (pre, *inner, post) nests: (2, 2, 8, 2, 2) is two levels."""

    def __init__(self, dim, heads, depth, shorten, head_dim=0, resample="2d"):
        super().__init__()
        self.pre = nn.ModuleList([Block(dim, heads, head_dim) for _ in range(depth[0])])
        self.inner = None
        # (pre, ..., post): shorten, recurse on the middle of the tuple, lengthen
        if len(depth) > 1:
            self.post = nn.ModuleList([Block(dim, heads, head_dim) for _ in range(depth[-1])])
            if resample == "2d":
                self.down, self.up = Downsample2D(dim, shorten), Upsample2D(dim, shorten)
            else:
                self.down, self.up = Downsample1D(dim, shorten), Upsample1D(dim, shorten)
            self.inner = Level(dim, heads, depth[1:-1], shorten, head_dim, resample)
        self.k, self.grad_ckpt, self.resample = shorten, False, resample

    def run(self, blocks, x, h, w, stride):
        for b in blocks:
            # keep block inputs only; recompute in backward
            if self.grad_ckpt and torch.is_grad_enabled():
                x = checkpoint(b, x, h, w, stride, use_reentrant=False)
            else:
                x = b(x, h, w, stride)
        return x

    def forward(self, x, h, w, stride=1):
        """x: (B, h*w, D) on an h x w grid whose tokens stand for stride x stride patches of the finest grid -> (B, h*w,
        D). Run self.pre; if this level has an inner level (self.inner is not None): keep the result as the skip,
        shorten with self.down, run self.inner on the (h/k) x (w/k) grid at stride * k, lengthen with self.up,
        add the skip, run self.post (Nawrot et al. §3; paper §3.2).
        Blocks run through self.run(blocks, x, h, w, stride), which passes h,
        w and stride on to each block's rotary embeddings."""
        x = self.run(self.pre, x, h, w, stride)  # (B, h*w, D)
        if self.inner is None:
            return x
        skip = x
        x = self.down(x, h, w)  # (B, (h/k)*(w/k), D)
        # the coarse grid: (h/k) x (w/k) patches; for the 1D hourglass h rows of w/k^2 runs, positions in run units
        ch, cw = (h // self.k, w // self.k) if self.resample == "2d" else (h, w // self.k ** 2)
        x = self.inner(x, ch, cw, stride * self.k)
        x = self.up(x, h, w) + skip  # (B, h*w, D): residual around the shortened part (Nawrot et al. §3)
        return self.run(self.post, x, h, w, stride)

class HourglassTransformer(nn.Module):
    """Tokens (B, h, w) -> logits (B, h, w, vocab_size); bidirectional, 2D-aware."""

    def __init__(self, vocab_size, height, width, dim, heads, depth=(2, 10, 2), shorten=2,
                 head_dim=0, num_classes=0, resample="2d", grad_ckpt=False):
        super().__init__()
        depth = tuple(depth)
        if len(depth) % 2 == 0:
            raise ValueError(f"depth {depth} must have odd length: (pre, ..., valley, ..., post)")
        if resample not in ("2d", "1d"):
            raise ValueError(f"resample {resample!r}: choose '2d' (k x k patches) or '1d' (runs of k^2 tokens)")
        gh, gw = height, width
        # every shortened level must split into whole k x k patches (1D: each row into whole runs of k^2)
        ky, kx = (shorten, shorten) if resample == "2d" else (1, shorten ** 2)
        for level in range(len(depth) // 2):
            if gh % ky or gw % kx:
                raise ValueError(f"a {height}x{width} token grid is {gh}x{gw} at level {level}, "
                                 f"which does not divide by {ky}x{kx} (shorten={shorten}, resample {resample}); "
                                 f"use another grid or fewer levels")
            gh, gw = gh // ky, gw // kx
        self.vocab_size, self.height, self.width = vocab_size, height, width
        self.config = dict(vocab_size=vocab_size, height=height, width=width, dim=dim, heads=heads,
                           depth=depth, shorten=shorten, head_dim=head_dim, num_classes=num_classes,
                           resample=resample)
        self.embed = nn.Embedding(vocab_size, dim)  # no absolute positions: rotary embeddings carry them
        # class-conditional (as the authors' MNIST model): a learned class vector added to every token's embedding;
        # entry num_classes means "no class", so one network is conditional and unconditional (Ho & Salimans 2022)
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.body = Level(dim, heads, depth, shorten, head_dim, resample)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)  # untied from the embedding
        self.n_blocks = sum(depth)
        self.init_weights()
        self.set_grad_ckpt(grad_ckpt)

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)  # GPT-2 init
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        # residual branches end in these projections;
        # scaling them by 1/sqrt(2 * blocks) keeps the residual stream's variance from growing with depth (GPT-2 §2.3)
        for b in self.modules():
            if isinstance(b, Block):
                for proj in (b.attn.proj, b.mlp[2]):
                    nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * self.n_blocks))

    def set_grad_ckpt(self, on):
        for m in self.modules():
            if isinstance(m, Level):
                m.grad_ckpt = on

    def features(self, tokens, labels=None):
        """Tokens (B, h, w) (and class labels (B,), None = no class) -> the last hidden states (B, h*w, D),
        before the final LayerNorm and the head."""
        B, h, w = tokens.shape
        if (h, w) != (self.height, self.width):
            raise ValueError(f"token grid {h}x{w} does not match the model's {self.height}x{self.width}")
        x = self.embed(tokens.reshape(B, h * w))  # (B, h*w, D) in raster order
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full((B,), self.num_classes, device=tokens.device)  # "no class"
            x = x + self.class_embed(labels)[:, None]  # (B, h*w, D): the class reaches every position
        return self.body(x, h, w)  # (B, h*w, D)

    def project(self, x):
        """Hidden states (..., D) -> logits (..., V).
        The final LayerNorm and the head run in fp32 even under bf16 autocast:
        the softmax over V (8192 at 1024²) is where bf16's 8-bit mantissa hurts (near |logit| = 27 it rounds to
        multiples of 0.125)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.head(self.ln_f(x.float()))

    def forward(self, tokens, labels=None):
        B, h, w = tokens.shape
        # (B, h, w, V), fp32
        return self.project(self.features(tokens, labels)).reshape(B, h, w, self.vocab_size)

    def logits_at(self, tokens, where, labels=None):
        """Logits (K, V) at the K positions where the bool mask `where` (B, h, w) is set, in row-major order.
        A sampling step redraws only some positions,
        and the head is a D x V matmul per position (as costly as a transformer block at V = 8192),
        so the sampler asks for those positions only."""
        x = self.features(tokens, labels)  # (B, h*w, D)
        return self.project(x[where.reshape(len(tokens), -1)])  # (K, V)

# --------------------------------------------------------------------------------------------------
# benchmark: hourglass vs a flat transformer of the same width and total depth

def count_flops(fn):
    """FLOPs of fn() (forward and, if fn calls it, backward), counted by PyTorch's FlopCounterMode: matmuls,
    convolutions and attention.
    PyTorch knows the FLOPs of the GPU's fused attention kernels but not of the CPU's, and counts those as 0;
    we give the CPU kernel the same formula,
    so a count does not depend on the device (without it the 1024² prior's forward was undercounted by 9% on the CPU)."""
    from torch.utils import flop_counter
    raw = lambda f: getattr(f, "__wrapped__", f)  # the GPU kernels' formulas, taking shapes (FlopCounterMode wraps)
    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: raw(flop_counter.sdpa_flop),
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: raw(flop_counter.sdpa_backward_flop)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()

def forward_time(model, tokens, reps, device):
    """Median seconds of one forward pass (no grad) after warm-up."""
    times = []
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(reps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # the first passes pay for allocation and kernel selection
                times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]

def main(argv=None):
    parser = argparse.ArgumentParser(description="Hourglass transformer: parameter counts and a speed benchmark.")
    parser.add_argument("--benchmark", action="store_true", help="time hourglass vs flat transformer forward passes")
    parser.add_argument("--preset", default="ffhq1024", choices=list(PRESETS), help="model size for the benchmark")
    parser.add_argument("--height", type=int, default=32, help="token grid rows")
    parser.add_argument("--width", type=int, default=32, help="token grid columns")
    parser.add_argument("--vocab_size", type=int, default=8192, help="vocabulary size V")
    parser.add_argument("--batch", type=int, default=1, help="batch size for the benchmark")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args(argv)
    if not args.benchmark:
        for name, p in PRESETS.items():
            p = replace(p, vocab_size=args.vocab_size, height=args.height, width=args.width)
            params = sum(q.numel() for q in HourglassTransformer(**asdict(p)).parameters())
            print(f"{name:9s} dim {p.dim:4d} heads {p.heads:2d} depth {p.depth}: {params / 1e6:.1f}M params "
                  f"(V={args.vocab_size}, {args.height}x{args.width})")

        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = replace(PRESETS[args.preset], vocab_size=args.vocab_size, height=args.height, width=args.width)
    hourglass = HourglassTransformer(**asdict(p)).to(device).eval()
    hourglass_1d = HourglassTransformer(**asdict(replace(p, resample="1d"))).to(device).eval()  # Nawrot et al.'s
    flat = HourglassTransformer(**asdict(replace(p, depth=(sum(p.depth),)))).to(device).eval()  # same blocks, no levels
    tokens = torch.randint(args.vocab_size, (args.batch, args.height, args.width), device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name} ({torch.get_num_threads()} threads) | {'bf16' if device.type == 'cuda' else 'fp32'} | "
          f"batch {args.batch} | {args.height}x{args.width} tokens | preset {args.preset}")
    res = {}
    for name, m in (("hourglass", hourglass), ("1d", hourglass_1d), ("flat", flat)):
        t = forward_time(torch.compile(m) if args.compile else m, tokens, args.reps, device)
        res[name] = t
        print(f"{name:9s} depth {str(m.config['depth']):14s} {sum(q.numel() for q in m.parameters()) / 1e6:7.1f}M params "
              f"| forward {t * 1e3:8.1f} ms | {args.batch * args.height * args.width / t / 1e3:8.1f}k tok/s")
    print(f"hourglass / flat time ratio: {res['hourglass'] / res['flat']:.3f} (the project's target: <= 0.55)")

if __name__ == "__main__":
    main()
