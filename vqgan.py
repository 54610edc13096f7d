"""
Stage 1 of megapixel SUNDAE: a VQ-GAN that turns an RGB image into a grid of integer tokens and
back.

McKinney & Willcocks, "Megapixel Image Generation with Step-Unrolled Denoising Autoencoders", §3.1,
§3.3; the VQ-GAN itself is Esser et al. 2021 ("Taming Transformers"), the quantizer van den Oord et
al. 2017. An H x W image becomes an (H/f) x (W/f) grid of ids from a codebook of V vectors.

    python vqgan.py                                   # CPU demo: tiny preset on built-in toy faces, minutes
    python vqgan.py --encode                          # vqgan.pt + toy faces -> latents.npy (N, h, w) uint16
    python vqgan.py --benchmark --preset ffhq1024 --batch_size 1 --grad_ckpt --mem_cap_gb 24   # memory and speed
    python vqgan.py --data ~/ffhq --preset ffhq1024 --grad_ckpt   # one GPU, 1024x1024
    torchrun --standalone --nproc_per_node=8 vqgan.py --data ~/ffhq --preset ffhq1024

Read in order: the quantizers, the encoder/decoder, the losses, then data, training, encoding and
taming checkpoints. The last section holds the plumbing the other scripts import (flags, errors,
atomic saves, devices); a reader of the VQ-GAN may skip it. Importing this file does no work.
"""
import argparse
import copy
import json
import hashlib
import math
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch.utils.checkpoint import checkpoint

# the one exception the user sees as a line, not a traceback: defined here because the VQ-GAN's own code raises it
class BadInput(ValueError):
    """Input the user can fix (a file, a flag, a checkpoint).
    Library functions raise it; each script's __main__ (run_main) prints its message as one line and exits 2.
    Any other exception is a bug and keeps its traceback."""

# --------------------------------------------------------------------------------------------------
# quantizers: continuous encoder outputs -> the nearest of V codes, and back

class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient (VQ-VAE, van den Oord et al. 2017)."""

    def __init__(self, codebook_size, dim, beta=0.25, l2_norm=False, code_dim=None, restart_after=0):
        super().__init__()
        self.codebook_size, self.beta, self.l2_norm = codebook_size, beta, l2_norm
        # ViT-VQGAN (Yu et al. 2022): look codes up in a small space; a low-dimensional,
        # normalised lookup uses far more of the codebook than a 256-d Euclidean one
        self.code_dim = code_dim or dim
        self.proj_in = nn.Linear(dim, self.code_dim) if code_dim else nn.Identity()
        self.proj_out = nn.Linear(self.code_dim, dim) if code_dim else nn.Identity()
        init = torch.empty(codebook_size, self.code_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        self.codebook = nn.Parameter(init)
        # dead-code restart: count the optimizer steps since each code was last chosen; re-seed the stale ones.
        # The statistics are gathered by a hook after each forward pass, so forward holds the lookup alone
        self.restart_after = restart_after
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        if restart_after > 0:
            self.register_forward_hook(record_usage)

    def codes(self):
        """The codebook as the lookup sees it: (V, code_dim), unit vectors when l2_norm."""
        return F.normalize(self.codebook, dim=1) if self.l2_norm else self.codebook

    def project(self, z):
        """Encoder output (B, D, h, w) -> the vectors to look up, (B*h*w, code_dim) in raster order:
        projected by proj_in (the identity without code_dim) and normalised when l2_norm."""
        B, D, h, w = z.shape
        ze = self.proj_in(z.permute(0, 2, 3, 1).reshape(B * h * w, D))  # (N, code_dim)
        return F.normalize(ze, dim=1) if self.l2_norm else ze

    def forward(self, z):
        """Quantize z: each vector becomes its nearest code (VQ-VAE §3.1, §3.2).

        z: (B, D, h, w), the encoder output: float32, or bfloat16 when the encoder runs under bf16 autocast (as in
        training with --dtype bf16). Returns (z_q, indices, loss):
        - z_q: float32 (B, D, h, w): proj_out of the nearest code of each vector;
          its gradient is the straight-through estimate, as if quantization were the identity:
          dL/dz = d(proj_out(proj_in z))/dz applied to dL/dz_q (z_q = ze + (e - ze).detach() before proj_out, ze =
          self.project(z)).
        - indices: int64 (B, h, w), the index of the nearest code of self.codes() by squared L2 distance.
        - loss: scalar, mean((e - sg[ze])^2) + beta * mean((ze - sg[e])^2): the codebook term moves the chosen codes,
          the commitment term (weighted by beta) the encoder (sg = detach).
        Under bf16 autocast everything here runs in float32:
        distances to thousands of codes differ in the third significant digit,
        below bf16's resolution (use torch.autocast(..., enabled=False))."""
        B, D, h, w = z.shape
        # distances in fp32 even under bf16 autocast
        with torch.autocast(z.device.type, enabled=False):
            ze = self.project(z.float())  # (N, code_dim), N = B*h*w
            e = self.codes()  # (V, code_dim)
            # (N, V) squared distances ||ze||^2 - 2 ze.e + ||e||^2, not forming (N, V, code_dim)
            dist2 = ze.pow(2).sum(1, keepdim=True) - 2 * ze @ e.t() + e.pow(2).sum(1)[None]
            indices = dist2.argmin(1)  # (N,)
            e_sel = e[indices]  # (N, code_dim)
            # codebook term pulls codes to the (frozen) encoder outputs; the commitment term, weighted by beta,
            # pulls the encoder to its (frozen) code. Taming's "legacy" quantizer put beta on the wrong term
            loss = F.mse_loss(e_sel, ze.detach()) + self.beta * F.mse_loss(ze, e_sel.detach())
            # straight-through estimator: the forward value is the code,
            # the backward pass copies the gradient from z_q to z unchanged,
            # as if quantization were the identity (VQ-VAE §3.2)
            zq = ze + (e_sel - ze).detach()
            zq = self.proj_out(zq)  # (N, D)
        zq = zq.reshape(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return zq, indices.reshape(B, h, w), loss

    @torch.no_grad()
    def restart_dead_codes(self):
        """Once per optimizer step (micro-batches and processes pooled):
        codes unused for `restart_after` steps jump onto random encoder outputs of the last batch.
        A restarted code takes its new value in the weight average too (the training loop copies it there),
        so the shipped model never blends a dead code with its old value."""
        used = self.__dict__.pop("used", None)
        if used is None:  # no forward pass in training mode since the last step
            return torch.zeros(0, dtype=torch.long)
        if dist.is_initialized():  # a code used on any process counts as used
            used = used.long()
            dist.all_reduce(used)
        self.unused_steps.add_(1).masked_fill_(used > 0, 0)
        dead = (self.unused_steps >= self.restart_after).nonzero().squeeze(1)
        if len(dead):
            ze = self.project(self.last_z.float())  # (N, code_dim): where the encoder's outputs are now
            new = ze[torch.randint(len(ze), (len(dead),), device=ze.device)]
            new = new + 0.01 * ze.std() * torch.randn_like(new)  # a little noise: no two identical codes
            # every process must hold the same codebook: take rank 0's choice
            if dist.is_initialized():
                dist.broadcast(new, 0)
            self.codebook.data[dead] = new.to(self.codebook.dtype)
            self.unused_steps[dead] = 0
        return dead

    def lookup(self, indices):
        zq = self.proj_out(self.codes()[indices])  # (B, h, w, D)
        return zq.permute(0, 3, 1, 2)  # (B, D, h, w)

def record_usage(quantizer, inputs, outputs):
    """Forward hook of a VectorQuantizer with dead-code restart, in training:
    the codes chosen since the last optimizer step (bool (V,), pooled over micro-batches) and the last batch's encoder
    outputs, which restart_dead_codes needs."""
    if quantizer.training:
        indices = outputs[1]
        used = torch.bincount(indices.flatten(), minlength=quantizer.codebook_size) > 0  # (V,)
        quantizer.used = used | getattr(quantizer, "used", False)
        quantizer.last_z = inputs[0].detach()

class LookupFreeQuantizer(nn.Module):
    """Lookup-free quantization (MAGVIT-v2, Yu et al. 2023): each channel is one bit, q = sign(z).

    Some write sign(z) = 1[z <= 0] - 1[z > 0], i.e. with the sign flipped; we use the usual sign(z) = +1 for z > 0,
    else -1. Either way the 2**bits codes are the corners of the {-1, +1} cube."""

    def __init__(self, bits, beta=0.25, entropy_weight=0.1, temperature=0.1):
        super().__init__()
        self.bits, self.codebook_size = bits, 2**bits
        self.beta, self.entropy_weight, self.temperature = beta, entropy_weight, temperature
        self.register_buffer("powers", 2 ** torch.arange(bits))  # bit i is worth 2**i

    def codes(self):
        """All 2**bits codes as (V, bits) in {-1, +1}, row v being the code of index v."""
        v = torch.arange(self.codebook_size, device=self.powers.device)
        return ((v[:, None] // self.powers) % 2).float() * 2 - 1

    def forward(self, z):
        """Quantize each channel to one bit (MAGVIT-v2 §3.1).

        z: (B, bits, h, w), the encoder output: float32, or bfloat16 under bf16 autocast. Returns (z_q, indices, loss):
        - z_q: float32 (B, bits, h, w), q = +1 where z > 0, else -1;
          its gradient is straight-through (dL/dz = dL/dz_q exactly).
        - indices: int64 (B, h, w),
          index = sum_i bit_i 2**i with bit_i = 1 where channel i of z is > 0 (self.powers holds the 2**i),
          so that self.codes()[index] is the code.
        - loss: scalar, beta * mean((z - q)^2) + entropy_weight * (H_sample - H_batch):
          with the soft assignment p(v | z) = softmax_v(-||z - c_v||^2 / temperature) over all codes c_v = self.codes(),
          H_sample is the mean over vectors of the entropy of p(. | z) and H_batch the entropy of its mean over all
          B*h*w vectors: natural logs of p + 1e-8, so that a p that underflows to 0 gives no NaN gradient.
        Computed in float32 under bf16 autocast."""
        B, D, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float().permute(0, 2, 3, 1).reshape(-1, D)  # (N, bits)
            q = torch.where(z > 0, 1.0, -1.0)  # (N, bits)
            indices = ((z > 0).long() * self.powers).sum(1)  # (N,) index = sum_i bit_i * 2**i
            commit = F.mse_loss(z, q)  # no codebook term: there is no codebook to learn
            # entropy term: soft assignment p(v | z) ~ exp(-||z - c_v||^2 / T).
            # Low per-sample entropy makes each z confident;
            # high entropy of the batch-mean assignment spreads usage over all codes.
            # Exact over all 2**bits codes: O(N * 2**bits), fine for the bit counts used here (<= 14). (N, V)
            p = torch.softmax(-torch.cdist(z, self.codes()).pow(2) / self.temperature, dim=1)
            per_sample = -(p * torch.log(p + 1e-8)).sum(1).mean()
            p_mean = p.mean(0)
            batch = -(p_mean * torch.log(p_mean + 1e-8)).sum()
            loss = self.beta * commit + self.entropy_weight * (per_sample - batch)
            zq = z + (q - z).detach()  # straight-through: forward q, backward the identity
        return zq.reshape(B, h, w, D).permute(0, 3, 1, 2), indices.reshape(B, h, w), loss

    def lookup(self, indices):
        bits = (indices[..., None] // self.powers) % 2  # (B, h, w, bits)
        return (bits.float() * 2 - 1).permute(0, 3, 1, 2)  # (B, bits, h, w)

def codebook_usage(counts):
    """(fraction of codes used, perplexity) from how often each code was chosen, (V,) counts: measure over many batches,
    not one."""
    p = counts.double() / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return (counts > 0).double().mean().item(), perplexity

# --------------------------------------------------------------------------------------------------
# encoder and decoder (taming-transformers layout)

def flag(default, help):
    """A config field and its command-line help: add_flags (in the plumbing below) makes one --flag per field."""
    return field(default=default, metadata={"help": help})

@dataclass
class ModelConfig:
    size: int = flag(32, "image side in pixels; images are resized and centre-cropped to size x size")
    ch: int = flag(32, "channels at full resolution")
    ch_mult: tuple = flag((1, 2, 4), "channel multiplier per level; f = 2**(levels - 1)")
    num_res_blocks: int = flag(1, "ResNet blocks per level")
    dec_res_blocks: int = flag(0, "ResNet blocks per decoder level; 0 = num_res_blocks (taming's decoder has one more)")
    attn_resolutions: tuple = flag((8,), "feature-map sides (in pixels) that get a self-attention block")
    z_channels: int = flag(64, "channels of the encoder output / decoder input")
    embed_dim: int = flag(0, "channels of the quantized latents (taming's embed_dim); 0 = z_channels")
    quantizer: str = flag("vq", "'vq' (codebook lookup) or 'lfq' (lookup-free, sign per bit)")
    codebook_size: int = flag(256, "V, the number of token ids (a power of two for lfq)")
    # a low-dimensional lookup on the unit sphere keeps every code in use (ViT-VQGAN);
    # 8 dimensions give samples closer to real handwriting than 3 at a lower PSNR (docs/RESULTS.md, the benchmark)
    code_dim: int = flag(8, "look codes up in a projected space of this size (ViT-VQGAN); 0 = off")
    l2_norm: bool = flag(True, "compare unit vectors (cosine similarity), fights codebook collapse")
    beta: float = flag(0.25, "commitment weight on the encoder term")
    restart_after: int = flag(50, "re-seed codes unused for this many optimizer steps; 0 = off")
    entropy_weight: float = flag(0.1, "lfq only: weight of its entropy term (confident bits, spread usage)")
    disc_ch: int = flag(32, "PatchGAN discriminator channels")
    disc_layers: int = flag(2, "PatchGAN stride-2 layers")

def group_norm(c):
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)  # 32 groups, fewer for the narrow test models

class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h

class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of a low-resolution feature map."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2)  # (B, 3, 1 head, HW, C)
        h = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, 1, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))

def run_blocks(blocks, x, grad_ckpt):
    """Apply blocks in order; with grad_ckpt keep only block inputs and recompute the insides in backward."""
    for b in blocks:
        x = checkpoint(b, x, use_reentrant=False) if grad_ckpt and torch.is_grad_enabled() else b(x)
    return x

class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)  # the first level's blocks widen to ch * ch_mult[0]
        self.levels, res, cin = nn.ModuleList(), cfg.size, cfg.ch
        for i, c in enumerate(chs):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks += [ResBlock(cin, c)] + ([AttnBlock(c)] if res in cfg.attn_resolutions else [])
                cin = c
            if i < len(chs) - 1:  # stride-2 conv halves the side (asymmetric pad as in taming)
                blocks += [nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))]
                res //= 2
            self.levels.append(nn.ModuleList(blocks))
        self.mid = nn.ModuleList([ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin)])
        self.out = nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.z_channels, 3, padding=1))
        self.grad_ckpt = False

    def forward(self, x):
        x = self.conv_in(x)  # (B, ch, H, W)
        for blocks in self.levels:
            x = run_blocks(blocks, x, self.grad_ckpt)
        x = run_blocks(self.mid, x, self.grad_ckpt)  # (B, ch*mult[-1], H/f, W/f)
        return self.out(x)  # (B, z_channels, H/f, W/f)

class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult][::-1]
        res = cfg.size // 2 ** (len(chs) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[0], 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(chs[0], chs[0]), AttnBlock(chs[0]), ResBlock(chs[0], chs[0])])
        self.levels, cin = nn.ModuleList(), chs[0]
        for i, c in enumerate(chs):
            blocks = []
            for _ in range(cfg.dec_res_blocks or cfg.num_res_blocks):
                blocks += [ResBlock(cin, c)] + ([AttnBlock(c)] if res in cfg.attn_resolutions else [])
                cin = c
            # nearest-neighbour upsampling then a conv (no checkerboard artefacts)
            if i < len(chs) - 1:
                blocks += [nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))]
                res *= 2
            self.levels.append(nn.ModuleList(blocks))
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 3, 3, padding=1)
        self.grad_ckpt = False

    def forward(self, z):
        x = self.conv_in(z)  # (B, ch*mult[-1], h, w)
        x = run_blocks(self.mid, x, self.grad_ckpt)
        for blocks in self.levels:
            x = run_blocks(blocks, x, self.grad_ckpt)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 3, H, W)

class VQGAN(nn.Module):
    """Encoder -> quantizer -> decoder. encode: images -> ids (B, h, w); decode: ids -> images."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config if isinstance(config, ModelConfig) else ModelConfig(**config)
        self.downsample_factor = f = 2 ** (len(cfg.ch_mult) - 1)
        if cfg.size % f:
            raise BadInput(f"size {cfg.size} is not divisible by the downsample factor f={f}; use a multiple of {f}")
        sides = [cfg.size >> i for i in range(len(cfg.ch_mult))]
        if set(cfg.attn_resolutions) - set(sides):  # a typo would silently mean no attention at all
            raise BadInput(f"--attn_resolutions {','.join(map(str, cfg.attn_resolutions))}: "
                           f"this model's feature maps are {','.join(map(str, sides))} pixels wide; pick among those"
                           + (" (or --preset 64px for 64-px images)" if cfg.size == 64 else ""))
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        if cfg.quantizer == "lfq":
            bits = int(math.log2(cfg.codebook_size))
            if 2**bits != cfg.codebook_size:
                raise BadInput(f"lfq needs a power-of-two codebook_size, got {cfg.codebook_size}")
            self.quantize, qdim = LookupFreeQuantizer(bits, beta=cfg.beta, entropy_weight=cfg.entropy_weight), bits
        else:
            qdim = cfg.embed_dim or cfg.z_channels
            self.quantize = VectorQuantizer(cfg.codebook_size, qdim, cfg.beta, cfg.l2_norm,
                                            cfg.code_dim or None, cfg.restart_after)
        self.quant_conv = nn.Conv2d(cfg.z_channels, qdim, 1)  # 1x1 convs into and out of the quantizer
        self.post_quant_conv = nn.Conv2d(qdim, cfg.z_channels, 1)
        self.codebook_size = cfg.codebook_size

    def set_grad_ckpt(self, on):
        self.encoder.grad_ckpt = self.decoder.grad_ckpt = on

    def features(self, x):
        """Pre-quantisation latents (B, qdim, h, w): also the feature space of sample.py --eval."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        return self.quantize(self.features(x))[1]  # (B, h, w)

    def decode(self, indices):
        return self.decoder(self.post_quant_conv(self.quantize.lookup(indices)))  # (B, 3, H, W)

    def last_layer(self):
        return self.decoder.conv_out.weight  # W in the adaptive GAN weight (taming §3.1)

    def forward(self, x):
        zq, indices, q_loss = self.quantize(self.features(x))
        return self.decoder(self.post_quant_conv(zq)), indices, q_loss

def load_vqgan(path, device="cpu"):
    """Rebuild the VQ-GAN from its checkpoint alone (the config travels inside), in eval mode.
    A taming-transformers checkpoint is turned into one first with python vqgan.py --convert."""
    ckpt = load_checkpoint(path, "vqgan")
    model = VQGAN(ModelConfig(**tuples(ckpt["model_config"])))
    load_weights(model, shipped_weights(ckpt), path)
    model.converted = "converted_from" in ckpt  # a taming model: its image size was chosen at --convert
    return model.to(device).eval()

def shipped_weights(ckpt):
    """The weights a checkpoint ships: the moving average where training kept one (--ema), else the trained ones."""
    return ckpt.get("ema") or ckpt["model"]

# --------------------------------------------------------------------------------------------------
# losses: PatchGAN hinge loss, adaptive weight, LPIPS

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch.

    GroupNorm instead of taming's BatchNorm: BatchNorm statistics are meaningless at batch 1, the 1024x1024 setting."""

    def __init__(self, ch=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for i in range(1, n_layers + 1):
            cout = ch * min(2**i, 8)
            layers += [nn.Conv2d(c, cout, 4, 2 if i < n_layers else 1, 1, bias=False),
                       group_norm(cout), nn.LeakyReLU(0.2)]
            c = cout
        layers += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)  # (B, 1, ~H/2**n, ~W/2**n)

def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss (taming §3.1): 1/2 [mean relu(1 - D(x)) + mean relu(1 + D(x_hat))].

    logits_real, logits_fake: D's logits for real and for reconstructed images,
    any shapes (each averaged over all its elements, so the two may differ in size).
    Returns a scalar tensor; 0 once D scores every real logit >= 1 and every fake one <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())

def adaptive_weight(rec_loss, g_loss, last_layer):
    """The GAN term's adaptive weight (taming eq. 7): lambda = ||grad_W L_rec|| / (||grad_W L_gan|| + 1e-4).

    rec_loss, g_loss: scalar tensors whose graphs reach last_layer, W, the decoder's last weight (a Parameter).
    Returns a scalar tensor: lambda in float32,
    clamped to [0, 1e4] and detached (a constant factor: no gradient flows through it).
    The norms are the plain L2 norms of the gradient tensors (torch.autograd.grad, with retain_graph=True: the caller
    backpropagates both losses afterwards)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.float().norm() / (g_gan.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()

class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) on VGG16 features, written in plain torch.

    The VGG layers keep torchvision's vgg16().features indices (features.N);
    the LPIPS linear layers are lins.0..4. vqgan.py --convert writes taming's (net.sliceK.N, lin0.model.1) as lpips.pt.
    Nothing is downloaded."""

    def __init__(self):
        super().__init__()
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        layers, c = [], 3
        for v in cfg:
            layers += [nn.MaxPool2d(2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v if v != "M" else c
        self.features = nn.Sequential(*layers)
        self.taps = [3, 8, 15, 22, 29]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512)])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False)

    def forward(self, x, y):
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)  # both images through VGG in one pass
        dist, k = 0.0, 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                a, b = F.normalize(h, dim=1).chunk(2)  # unit-normalise channels, then weighted squared diff
                dist = dist + self.lins[k]((a - b) ** 2).mean((1, 2, 3))
                k += 1
                if k == len(self.taps):
                    break
        return dist  # (B,)

# --------------------------------------------------------------------------------------------------
# training configuration and presets

@dataclass
class TrainConfig:
    data: str = flag("toy", "image folder (searched recursively), or 'toy' for the built-in faces")
    toy_n: int = flag(8192, "number of toy faces to train on (and to encode)")
    batch_size: int = flag(8, "images per optimizer step, summed over processes and micro-batches")
    grad_accum: int = flag(1, "micro-batches per optimizer step in each process")
    lr: float = flag(2e-3, "peak learning rate (Adam), also for the discriminator")
    min_lr: float = flag(2e-4, "cosine decay reaches this at max_steps (set it to lr for a constant rate)")
    beta1: float = flag(0.9, "Adam beta1; taming uses 0.5 for its long GAN phase")
    beta2: float = flag(0.99, "Adam beta2 (taming: 0.9)")
    warmup: int = flag(100, "linear learning-rate warm-up steps")
    grad_clip: float = flag(1.0, "clip the gradient norm to this; 0 = off")
    ema: float = flag(0.99, "decay of a moving average of the weights, measured and shipped as the model; 0 = off")
    max_steps: int = flag(2400, "optimizer steps in total")
    disc_start: int = flag(1800, "step at which the GAN losses switch on")
    disc_weight: float = flag(0.1, "scale of the adaptive GAN weight")
    perceptual_weight: float = flag(0.0, "weight of the LPIPS loss; needs --lpips")
    # held-out PSNR measures squared error, and small features (pupils) are a few pixels:
    # the demo adds a squared term to L1; the ffhq presets keep taming's L1 (+ LPIPS)
    l2_weight: float = flag(5.0, "weight of a squared-error term added to the L1 reconstruction loss")
    lpips: str = flag("", "path of LPIPS weights (vqgan.py --convert writes lpips.pt); '' = no perceptual loss")
    flip: bool = flag(True, "random horizontal flips in training, flipped copies when encoding: a mirrored face is a face; "
                            "mirrored text, digits or maps are not (--no-flip)")
    val_n: int = flag(256, "held-out images for PSNR and codebook usage")
    log_every: int = flag(50, "steps between log lines")
    sample_every: int = flag(600, "steps between real|reconstruction grids")
    ckpt_every: int = flag(600, "steps between checkpoints")
    out: str = flag("vqgan.pt", "checkpoint path (training) / latents path (--encode: latents.npy)")
    resume: bool = flag(False, "continue from --out")
    overwrite: bool = flag(False, "replace an existing --out (a checkpoint, or latents with --encode) instead of refusing")
    device: str = flag("auto", "'auto', 'cpu' or 'cuda'")
    compile: bool = flag(False, "torch.compile the model")
    grad_ckpt: bool = flag(False, "activation checkpointing per block (less memory, ~30% slower)")
    dtype: str = flag("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32', on any device")
    seed: int = flag(0, "random seed (each process adds its rank)")
    workers: int = flag(8, "threads decoding image files")

PRESETS = {
    # CPU demo: 32x32 toy faces -> 8x8 tokens (f = 4), minutes on 2 cores;
    # at 64x64 the same CPU time reconstructs far worse (docs/RESULTS.md)
    "tiny": (ModelConfig(), TrainConfig()),
    # 64-px images -> 16x16 tokens (f = 4): the tiny model with attention at 16 px, 1500 steps (GAN from 1125);
    # about 12 minutes on 2 idle CPU cores, estimated from its step time (docs/RESULTS.md).
    # For 128-px images add --size 128 --attn_resolutions 32
    "64px": (ModelConfig(size=64, attn_resolutions=(16,)), TrainConfig(max_steps=1500, disc_start=1125)),
    # FFHQ-256: f = 16, V = 1024, 16x16 tokens (the paper's FFHQ-256 setting).
    # Both FFHQ presets keep taming's recipe (Adam (0.5, 0.9), L1 + LPIPS, no averaging):
    # the tiny preset's changes are unmeasured at 256 px and up
    "ffhq256": (
        ModelConfig(size=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                    attn_resolutions=(16,),
                    z_channels=256, codebook_size=1024, code_dim=32, l2_norm=True,
                    restart_after=1000, disc_ch=64, disc_layers=3),
        TrainConfig(batch_size=16, lr=1e-4, min_lr=1e-4, beta1=0.5, beta2=0.9, warmup=1000,
                    max_steps=300_000, disc_start=30_000, disc_weight=0.8,
                    l2_weight=0.0, ema=0.0, log_every=100, sample_every=2000, ckpt_every=2000),
    ),
    # FFHQ-1024, the paper's own: f = 32, V = 8192, 32x32 tokens; authors: batch 1, lr 5e-6, Adam (0.5, 0.9)
    "ffhq1024": (
        ModelConfig(size=1024, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1,
                    attn_resolutions=(64,),
                    z_channels=256, codebook_size=8192, code_dim=32, l2_norm=True,
                    restart_after=1000, disc_ch=64, disc_layers=3),
        TrainConfig(batch_size=1, lr=5e-6, min_lr=5e-6, beta1=0.5, beta2=0.9, warmup=0,
                    max_steps=500_000, disc_start=15_000, disc_weight=0.5,
                    l2_weight=0.0, ema=0.0, log_every=100, sample_every=2000, ckpt_every=2000,
                    grad_ckpt=True),
    ),
}

# --------------------------------------------------------------------------------------------------
# data: the built-in toy faces and an image-folder loader

# colours come from small palettes with a little jitter: varied faces,
# but few enough colours that a 256-code tokenizer and a CPU-sized prior can learn them in minutes (continuous colours
# made every flat region unique)
TOY_PALETTES = {
    "skin": np.array([[255, 224, 196], [241, 194, 160], [224, 172, 125], [198, 134, 86],
                      [141, 85, 54], [94, 60, 40]]),
    "hair": np.array([[20, 20, 20], [90, 55, 25], [150, 95, 45], [230, 195, 110], [180, 60, 30],
                      [170, 170, 175]]),
    "background": np.array([[200, 225, 240], [240, 220, 200], [210, 240, 210], [235, 210, 235],
                            [245, 240, 200], [190, 200, 230], [230, 200, 200], [200, 230, 230]]),
    "shirt": np.array([[200, 40, 40], [40, 90, 180], [40, 140, 70], [230, 180, 40], [120, 60, 150],
                       [240, 240, 240], [50, 50, 60], [230, 110, 160]]),
}
TOY_CLASSES = ("red", "blue", "green", "yellow", "purple", "white", "black", "pink")  # the shirt colours' names

def toy_faces(n, size, seed=0, labels=False):
    """Procedural cartoon faces, np.uint8 (n, size, size, 3); image i depends only on (seed, i). labels:
    also return each face's shirt colour, an index into TOY_CLASSES (n,), as class labels for conditional models;
    labels="all": its palette index of every attribute,
    (n, 4) in TOY_PALETTES' order (the truth inpainting is judged by)."""
    assert 16 <= size <= 1024, "toy_faces draws sizes from 16 to 1024"
    ss = 4 if size <= 256 else 2  # draw at ss x the size, then shrink: antialiased edges
    S = size * ss
    skins, hairs, backs, shirts = TOY_PALETTES.values()
    out, attrs = np.empty((n, size, size, 3), np.uint8), np.empty((n, 4), np.int64)
    for i in range(n):
        r = np.random.default_rng([seed, i])  # one stream per image: toy_faces(k) is a prefix of toy_faces(n)
        u = lambda lo, hi: float(r.uniform(lo, hi))
        col = lambda base, jit: tuple(int(c) for c in np.clip(base + r.integers(-jit, jit + 1, 3), 0, 255))
        attrs[i, 2] = r.integers(8)
        img = Image.new("RGB", (S, S), col(backs[attrs[i, 2]], 6))
        d = ImageDraw.Draw(img)
        s = u(0.85, 1.1) * S  # overall scale
        cx, cy = S * (0.5 + u(-0.06, 0.06)), S * (0.5 + u(-0.05, 0.06))
        rx, ry = 0.3 * s, 0.3 * s * u(1.08, 1.3)  # head radii
        attrs[i, 0] = r.integers(6)
        skin = col(skins[attrs[i, 0]], 6)
        attrs[i, 1] = r.integers(6)
        hair = col(hairs[attrs[i, 1]], 6)
        # shoulders in a random shirt colour, below the head
        attrs[i, 3] = r.integers(8)
        d.ellipse([cx - 1.5 * rx, cy + 0.8 * ry, cx + 1.5 * rx, cy + 2.6 * ry], fill=col(shirts[attrs[i, 3]], 6))
        style = r.integers(4)  # 0 bald, 1 short cap, 2 long hair behind the head, 3 bun
        if style == 2:
            d.rounded_rectangle([cx - 1.2 * rx, cy - 1.15 * ry, cx + 1.2 * rx, cy + 0.9 * ry], rx * 0.6, fill=hair)
        if style == 3:
            d.ellipse([cx - 0.45 * rx, cy - 1.5 * ry, cx + 0.45 * rx, cy - 0.7 * ry], fill=hair)
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
        if style in (1, 2, 3):  # hair cap: the top of a slightly larger ellipse
            d.chord([cx - 1.06 * rx, cy - 1.08 * ry, cx + 1.06 * rx, cy + 0.5 * ry * u(0.2, 0.8)], 180, 360, fill=hair)
        # eyes: white, iris, pupil; shared gaze direction
        ey, ex, er = cy - ry * u(0.05, 0.2), rx * u(0.32, 0.45), rx * u(0.13, 0.19)
        gx, gy = u(-0.35, 0.35) * er, u(-0.25, 0.25) * er
        iris = col(r.choice([[60, 40, 20], [40, 90, 160], [50, 120, 60], [30, 30, 30]]), 10)
        for sx in (-1, 1):
            x = cx + sx * ex
            d.ellipse([x - er, ey - er * 0.8, x + er, ey + er * 0.8], fill=(250, 250, 250))
            d.ellipse([x + gx - er * 0.55, ey + gy - er * 0.55, x + gx + er * 0.55, ey + gy + er * 0.55], fill=iris)
            d.ellipse([x + gx - er / 4, ey + gy - er / 4, x + gx + er / 4, ey + gy + er / 4], fill=(0, 0, 0))
            # brow: a thick line whose tilt expresses mood
            by, tilt = ey - er * u(1.3, 1.9), sx * u(-0.4, 0.5) * er
            brow = tuple(int(c * 0.6) for c in hair)
            d.line([x - er, by + tilt, x + er, by - tilt], fill=brow, width=max(1, int(er * 0.35)))
        # nose: a darker triangle
        ny, nw = cy + ry * u(0.08, 0.2), rx * u(0.08, 0.15)
        nose = tuple(int(c * 0.8) for c in skin)
        d.polygon([(cx, ny - ry * 0.18), (cx - nw, ny + nw * 0.6), (cx + nw, ny + nw * 0.6)], fill=nose)
        # mouth: a smile/frown arc or an open ellipse
        my, mw, lips = cy + ry * u(0.45, 0.6), rx * u(0.25, 0.5), col([180, 50, 60], 25)
        if r.random() < 0.7:
            curve = u(-0.5, 1.0) * mw  # > 0 smiles
            box = [cx - mw, my - abs(curve), cx + mw, my + abs(curve) + 1]
            d.arc(box, 0 if curve > 0 else 180, 180 if curve > 0 else 360, fill=lips, width=max(1, int(rx * 0.07)))
        else:
            d.ellipse([cx - mw * 0.6, my - mw * 0.3, cx + mw * 0.6, my + mw * 0.45], fill=lips)
        out[i] = np.asarray(img.resize((size, size), Image.LANCZOS))
    return (out, attrs if labels == "all" else attrs[:, 3]) if labels else out

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")

def list_images(folder, size):
    """Sorted image paths under folder (recursive) that open and are at least size on their short side."""
    if not os.path.isdir(folder):
        kind = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise BadInput(f"--data {folder!r} {kind}; pass --data DIR with images (searched recursively), or --data toy")
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise BadInput(f"no images ({', '.join(IMAGE_EXTS)}) under {folder!r}; point --data at a folder of images")
    good, unreadable, small = [], 0, 0
    for p in paths:
        try:
            with Image.open(p) as im:  # reads the header only: cheap even for 70k files
                w, h = im.size
        # PIL raises many types for broken files (and decompression bombs); all mean "skip it"
        except Exception:
            unreadable += 1
            continue
        small += min(w, h) < size
        if min(w, h) >= size:
            good.append(p)
    if unreadable or small:
        print(f"warning: skipped {unreadable} unreadable images and {small} smaller than {size}px in {folder!r}",
              file=sys.stderr)
    if not good:
        raise BadInput(f"none of the {len(paths)} images in {folder!r} is readable and at least {size}px; "
                       f"use --size {size // 2} or other images")
    return good

def resize_and_crop(im, size, resample=Image.BICUBIC):
    """Short side resized to size, then the centre size x size crop (images and masks alike)."""
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))

def open_upright(im):
    """Apply the EXIF orientation (phone photos are stored sideways) and bring 16-bit images to 8 bits by scaling (PIL's
    convert("RGB") would clip every value above 255 to white)."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max() > 255):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return im

def load_image(path, size):
    """One image file -> uint8 (size, size, 3): upright, RGB, short side resized to size, centre crop."""
    with Image.open(path) as im:
        return np.array(resize_and_crop(open_upright(im).convert("RGB"), size))  # a writable copy

def load_mask(path, size):
    """A mask file (white = fill in) -> bool (size, size), resized and cropped like its image.
    A pixel is unknown if any unknown source pixel falls in it (box-filtered coverage > 0),
    so a small hole never vanishes."""
    with Image.open(path) as im:
        unknown = np.asarray(open_upright(im).convert("L")) > 127
    coverage = resize_and_crop(Image.fromarray(unknown.astype(np.float32), mode="F"), size, Image.BOX)
    return np.asarray(coverage) > 0

def split_indices(n, val_fraction=0.05, seed=0):
    """Deterministic train/val split of n items that keeps rows (2i, 2i+1) on the same side.

    vqgan.py --encode writes an image and its flipped copy next to each other,
    so a split over pairs never puts an image in training and its mirror image in validation (a defect of the authors'
    code)."""
    pairs = (n + 1) // 2
    perm = torch.randperm(pairs, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(pairs * val_fraction)) if pairs > 1 else 0
    val_pairs = torch.zeros(pairs, dtype=torch.bool)
    val_pairs[perm[:n_val]] = True
    is_val = val_pairs.repeat_interleave(2)[:n]
    idx = torch.arange(n)
    return idx[~is_val], idx[is_val]

class ImageData:
    """Indexable image set: the toy faces in memory, or files decoded on demand (FFHQ does not fit in RAM). split:
    "train", "val" (held out: toy faces of another seed, or a deterministic share of the files) or "all"."""

    def __init__(self, data, size, split="train", toy_n=8192, val_n=256, workers=8):
        if data == "toy":  # held-out faces: another seed
            val = split == "val"
            self.images, self.labels = toy_faces(val_n if val else toy_n, size, int(val), labels=True)
            self.paths, self.class_names = None, TOY_CLASSES
        else:
            paths = list_images(data, size)
            if split != "all" and len(paths) < 2:
                raise BadInput(f"{data!r} holds one usable image; training needs at least 2 (one is held out)")
            train, val = split_indices(len(paths), val_fraction=min(0.5, val_n / len(paths)))
            keep = {"train": train.tolist(), "val": val.tolist(), "all": range(len(paths))}[split]
            self.paths, self.images = [paths[i] for i in keep], None
            # one sub-folder per class (root/class_name/*.png, the usual layout): labels in sorted folder order
            top = [os.path.relpath(p,
                                   data).split(os.sep)[0] if os.sep in os.path.relpath(p, data) else None
                   for p in self.paths]
            self.class_names = sorted(set(top)) if None not in top and len(set(top)) > 1 else None
            self.labels = np.array([self.class_names.index(t) for t in top]) if self.class_names else None
        self.size, self.pool, self.broken = size, ThreadPoolExecutor(workers), set()

    def __len__(self):
        return len(self.images) if self.paths is None else len(self.paths)

    def load(self, i):
        """Image i, or None if its file no longer decodes (a truncated file passes the header-only scan): it is counted,
        reported once and skipped from then on, instead of killing a long run."""
        if i in self.broken:
            return None
        try:
            return load_image(self.paths[i], self.size)
        except Exception as e:  # PIL raises many types for damaged files
            self.broken.add(i)
            print(f"warning: skipping {self.paths[i]!r}, which does not decode ({type(e).__name__}); "
                  f"{len(self.broken)} such file(s) so far", file=sys.stderr)
            return None

    def batch(self, idx, flip=None, drop_broken=False):
        """Indices -> float (B, 3, size, size) in [-1, 1]; flip: optional bool (B,) tensor.
        A file that does not decode is replaced by another image of the batch (training),
        or left out (drop_broken: encoding)."""
        if self.paths is None:
            x = self.images[np.asarray(idx)]
        else:
            x = list(self.pool.map(self.load, idx))
            good = [im for im in x if im is not None]
            if not good and not drop_broken:
                raise BadInput(f"none of the images of a batch could be decoded (e.g. {self.paths[idx[0]]!r})")
            x = np.stack(good if drop_broken else [im if im is not None else good[0] for im in x]) if good else \
                np.zeros((0, self.size, self.size, 3), np.uint8)
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

# --------------------------------------------------------------------------------------------------
# training

def generator_loss(model, disc, last_layer, x, gan_on, disc_weight, lpips=None,
                   perceptual_weight=0.0, amp=nullcontext, l2_weight=0.0):
    """The autoencoder's loss for one batch:
    L1 (+ l2_weight * squared error) (+ LPIPS) + quantizer loss (+ lambda * GAN generator loss).

    Returns (loss, stats, x_rec, indices). D's parameters are frozen while its logits are computed,
    so the generator's backward pass leaves no gradient on D (its own step follows, on x_rec.detach()).
    Pass the plain discriminator, not its DDP wrapper: no gradient of D is produced here,
    so there is nothing to all-reduce."""
    with amp():  # the bf16 autocast context, or none
        x_rec, indices, q_loss = model(x)
    err = x - x_rec.float()
    rec = err.abs().mean()  # L1 reconstruction: sharp edges, robust to outlier pixels
    if l2_weight:
        rec = rec + l2_weight * err.pow(2).mean()  # squared error: what PSNR measures
    if lpips is not None:
        rec = rec + perceptual_weight * lpips(x, x_rec.float()).mean()
    loss, stats = rec + q_loss, {"rec": rec.item(), "q": q_loss.item()}
    if gan_on:
        disc.requires_grad_(False)
        with amp():
            g_loss = -disc(x_rec).float().mean()  # the generator wants D(x_hat) large
        lam = adaptive_weight(rec, g_loss, last_layer) * disc_weight
        disc.requires_grad_(True)
        loss = loss + lam * g_loss
        stats.update(g=g_loss.item(), lam=lam.item())
    return loss, stats, x_rec, indices

@torch.no_grad()
def evaluate(model, data, device, batch=64, bf16=False):
    """Reconstruction PSNR (dB, images in [0, 1]) and codebook usage over the whole held-out set."""
    model.eval()
    mse, counts = [], torch.zeros(model.codebook_size)
    for i in range(0, len(data), batch):
        x = data.batch(list(range(i, min(len(data), i + batch)))).to(device)
        with bf16_autocast(device, bf16):
            x_rec, idx, _ = model(x)
        mse.append(((x_rec.float().clamp(-1, 1) - x) / 2).pow(2).mean((1, 2, 3)).cpu())
        counts += torch.bincount(idx.flatten().cpu(), minlength=model.codebook_size)
    model.train()
    psnr = (-10 * torch.log10(torch.cat(mse))).mean().item()
    usage, ppl = codebook_usage(counts)
    return psnr, usage, ppl

def compile_for_adaptive_weight():
    """The adaptive GAN weight differentiates the loss twice through the same graph (retain_graph=True),
    which a compiled backward that donates (frees) its buffers refuses; keep them. Found by the slow-tier compile test."""
    torch._functorch.config.donated_buffer = False

def load_lpips(tcfg, device):
    """The LPIPS network for --perceptual_weight (from --lpips), or None without a perceptual loss."""
    if tcfg.perceptual_weight <= 0:
        return None
    if not os.path.isfile(tcfg.lpips):
        raise BadInput(f"--perceptual_weight needs --lpips PATH to LPIPS weights; {tcfg.lpips!r} is not a file "
                       "(python vqgan.py --convert writes lpips.pt from a taming checkpoint)")
    lpips = LPIPS().to(device)
    lpips.load_state_dict(torch.load(tcfg.lpips, map_location=device, weights_only=True))
    return lpips

def train(mcfg, tcfg, resume_ckpt=None):
    run = setup_processes(tcfg)  # one process, or one of several under torchrun (DDP)
    device, micro = run.device, run.micro
    train_data = ImageData(tcfg.data, mcfg.size, "train", tcfg.toy_n, tcfg.val_n, tcfg.workers)
    val_data = ImageData(tcfg.data, mcfg.size, "val", tcfg.toy_n, tcfg.val_n, tcfg.workers)

    # the autoencoder and its discriminator; channels_last is the faster convolution layout on CPUs and GPUs
    raw_model = VQGAN(mcfg).to(device, memory_format=torch.channels_last)
    raw_model.set_grad_ckpt(tcfg.grad_ckpt)
    raw_disc = PatchDiscriminator(mcfg.disc_ch, mcfg.disc_layers).to(device, memory_format=torch.channels_last)
    lpips = load_lpips(tcfg, device)
    opt_g = torch.optim.Adam(raw_model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    opt_d = torch.optim.Adam(raw_disc.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    ema = copy.deepcopy(raw_model).requires_grad_(False) if tcfg.ema > 0 else None  # the averaged weights
    step, history = 0, {"rec": [], "q": [], "g": [], "d": [], "val_psnr": []}
    window = new_window("rec", "q", "g", "d", "lam", codes=torch.zeros(mcfg.codebook_size))
    # the open log window continues: a resumed run logs what an uninterrupted one does
    if resume_ckpt is not None:
        step, history, window = restore(resume_ckpt, window, model=raw_model, ema=ema,
                                        disc=raw_disc, opt_g=opt_g, opt_d=opt_d)
    model, disc = raw_model, raw_disc  # checkpoints are saved from the plain modules, never a wrapper
    if tcfg.compile:
        compile_for_adaptive_weight()
        model, disc = torch.compile(model), torch.compile(disc)
    if run.ddp:
        ids = [device.index] if device.type == "cuda" else None
        model, disc = (nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in (model, disc))
    bf16 = use_bf16(tcfg.dtype, device)  # --dtype: bf16 autocast on CUDA by default, fp32 on the CPU
    amp = partial(bf16_autocast, device, bf16)  # the bf16 autocast context, or none

    def save():  # everything a resume needs; atomic, and the checkpoint it replaces stays as OUT.prev
        if run.master:
            save_checkpoint({"kind": "vqgan", "model_config": asdict(mcfg), "train_config": asdict(tcfg),
                             "model": raw_model.state_dict(), "ema": None if ema is None else ema.state_dict(),
                             "disc": raw_disc.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                             "step": step, "history": history, "rng": torch.get_rng_state(), "log_window": window},
                            tcfg.out)

    stop = stop_on_signals()  # Ctrl-C or SIGTERM: finish the step, save, exit
    restart = isinstance(raw_model.quantize, VectorQuantizer) and mcfg.restart_after > 0
    if run.master:
        h = mcfg.size // raw_model.downsample_factor
        params = sum(p.numel() for p in raw_model.parameters())
        mirrored = ", mirrored at random (--no-flip if mirror images are not your data)" if tcfg.flip else ""
        print(f"vqgan: {params / 1e6:.2f}M params, {mcfg.size}px -> {h}x{h} tokens, V={mcfg.codebook_size}, "
              f"{len(train_data)} train / {len(val_data)} val images, batch {tcfg.batch_size} on {run.world} x {device}{mirrored}")

    # training loop
    t0 = t_log = time.time()
    start_step = step_log = step
    while step < tcfg.max_steps and not stop:
        lr = lr_at(step, tcfg)
        for g in opt_g.param_groups + opt_d.param_groups:
            g["lr"] = lr
        gan_on = step >= tcfg.disc_start
        # the same global batch whatever the number of processes: indices from (seed, step), sliced by rank
        gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step)
        idx = torch.randint(len(train_data), (tcfg.batch_size,), generator=gen)
        flips = (torch.rand(tcfg.batch_size, generator=gen) < 0.5) if tcfg.flip else None
        pairs = []  # (images, reconstructions) of each micro-batch, for the discriminator's step
        # generator step: reconstruction + quantizer + adaptive GAN loss
        for m in range(tcfg.grad_accum):
            rows = slice((run.rank * tcfg.grad_accum + m) * micro, (run.rank * tcfg.grad_accum + m + 1) * micro)
            x = train_data.batch(idx[rows].tolist(), None if flips is None else flips[rows])
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            sync = m == tcfg.grad_accum - 1  # DDP all-reduces gradients on the last micro-batch only
            with (model.no_sync() if run.ddp and not sync else nullcontext()):
                loss, stats, x_rec, indices = generator_loss(model, raw_disc, raw_model.last_layer(), x, gan_on,
                                                             tcfg.disc_weight, lpips, tcfg.perceptual_weight, amp,
                                                             tcfg.l2_weight)
                # stop before the update: the last checkpoints stay good
                if not torch.isfinite(loss):
                    raise BadInput(f"loss is {loss.item()} at step {step}; stopping ({checkpoints_left(tcfg.out)}); "
                                   "lower --lr or check the data")

                (loss / tcfg.grad_accum).backward()
            for k in stats:
                window[k] += stats[k] / tcfg.grad_accum
            window["codes"] += torch.bincount(indices.flatten().cpu(), minlength=mcfg.codebook_size)
            pairs.append((x, x_rec.detach()))
        if tcfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if restart:  # once per optimizer step, over all its micro-batches and processes
            dead = raw_model.quantize.restart_dead_codes()
            if ema is not None:  # a restarted code is a new code: the average takes it as it is
                ema.quantize.codebook.data[dead] = raw_model.quantize.codebook.data[dead]
        if ema is not None:
            ema_update(ema, raw_model, tcfg.ema, step)  # the weights we measure and ship
        if gan_on:  # discriminator step on detached reconstructions
            for m, (x, x_rec) in enumerate(pairs):
                with (disc.no_sync() if run.ddp and m < len(pairs) - 1 else nullcontext()):
                    with amp():
                        d_loss = hinge_d_loss(disc(x).float(), disc(x_rec).float())
                    (d_loss / tcfg.grad_accum).backward()
                window["d"] += d_loss.item() / tcfg.grad_accum
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        step += 1
        window["steps"] += 1

        # one line per window: means over its steps
        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            means = window_means(window, ("rec", "q", "g", "d", "lam"), device, run.ddp)
            for k in ("rec", "q", "g", "d"):
                history[k].append((step, means[k]))
            usage, ppl = codebook_usage(window["codes"])  # over the whole window
            dt = time.time() - t_log  # timed only since this process started
            eta = (time.time() - t0) / (step - start_step) * (tcfg.max_steps - step)
            if run.master:
                print(f"step {step}/{tcfg.max_steps} | rec {means['rec']:.4f} | q {means['q']:.4f} | g {means['g']:.3f} "
                      f"| d {means['d']:.3f} | lam {means['lam']:.3f} | usage {usage:.2f} ppl {ppl:.0f} "
                      f"| {(step - step_log) * tcfg.batch_size / dt:.1f} img/s | eta {eta / 60:.1f}m", flush=True)
            t_log, step_log = time.time(), step
            window = new_window("rec", "q", "g", "d", "lam", codes=torch.zeros(mcfg.codebook_size))
        # real | reconstruction
        if run.master and (step % tcfg.sample_every == 0 or step == tcfg.max_steps):
            x, x_rec = pairs[0]
            k = min(8, len(x))
            save_png(torch.cat([x[:k], x_rec[:k].float()]), os.path.splitext(tcfg.out)[0] + "_recon.png", nrow=k)
        if step % tcfg.ckpt_every == 0 and step < tcfg.max_steps:
            save()

    save()
    if run.master and not stop:
        psnr, usage, ppl = evaluate(raw_model if ema is None else ema, val_data, device, bf16=bf16)
        history["val_psnr"].append((step, psnr))
        save()
        plot_curves({k: history[k] for k in ("rec", "q", "d")},
                    os.path.splitext(tcfg.out)[0] + "_loss.png", "VQ-GAN training")
        print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min | held-out PSNR {psnr:.2f} dB | "
              f"codebook usage {usage:.3f} ({usage * mcfg.codebook_size:.0f}/{mcfg.codebook_size}), "
              f"perplexity {ppl:.1f} | peak memory {peak_memory(device)}")
    finish_processes(run, stop, tcfg.out, step)

# --------------------------------------------------------------------------------------------------
# encoding a dataset into latents, and token grids back into images

@torch.no_grad()
def encode_dataset(model, data, device, flip=True, batch=64, bf16=False):
    """All images -> (N or 2N, h, w) ids, and their labels (or None);
    with flip each image is followed by its mirror image, with the same label.
    A file that does not decode is left out (with a warning), never replaced by a copy of another image."""
    out, kept = [], []
    t0 = time.time()
    for i in range(0, len(data), batch):
        x = data.batch(list(range(i, min(len(data), i + batch))), drop_broken=True).to(device)
        kept += [j for j in range(i, min(len(data), i + batch)) if j not in data.broken]
        with bf16_autocast(device, bf16):
            ids = model.encode(x)
            if flip:  # interleave (image, flipped image): split_indices keeps each pair together
                ids = torch.stack([ids, model.encode(x.flip(3))], 1).flatten(0, 1)
        out.append(ids.cpu())
        done = min(len(data), i + batch)
        if done == len(data) or (i // batch) % 32 == 0:  # a progress line every 32 batches
            print(f"encoded {done}/{len(data)} images | {done / (time.time() - t0):.1f} img/s", flush=True)
    ids = torch.cat(out).numpy()
    if len(ids) == 0:
        raise BadInput("none of the images could be decoded; nothing to encode")
    labels = None if data.labels is None else np.repeat(data.labels[kept], 2 if flip else 1)
    return ids.astype(np.uint16 if model.codebook_size <= 65536 else np.int32), labels

def fingerprint(state_dict):
    """A short identity of a VQ-GAN's token meaning: a hash of its quantizer and post-quantizer weights.
    Latents and SUNDAE checkpoints carry it,
    so a prior is never paired with a VQ-GAN of the same V whose ids mean other things."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        if k.startswith(("quantize.", "post_quant_conv.")) and state_dict[k].is_floating_point():
            h.update(k.encode() + state_dict[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

def encode_main(args):
    """vqgan.py --encode: every image of --data (or the toy faces) -> --out latents (N, h, w) uint16,
    and a sidecar --out.json with V and the VQ-GAN's identity, which sundae.py reads."""
    ckpt = load_checkpoint(args.ckpt, "vqgan")
    model = load_vqgan(args.ckpt)
    tcfg = TrainConfig(**tuples(ckpt["train_config"]))
    if args.size and args.size != model.config.size:
        raise BadInput(f"--size {args.size}: this VQ-GAN works on {model.config.size}px images; drop --size (images are resized to it)")
    data, out, flip = args.data or tcfg.data, args.out or "latents.npy", tcfg.flip if args.flip is None else args.flip
    labels_out = os.path.splitext(out)[0] + "_labels.npy"
    check_outputs({"--out": out, "--out .json": out + ".json", "labels": labels_out}, [args.ckpt], bool(args.overwrite), keep=True)
    device = pick_device(args.device or "auto")
    images = ImageData(data, model.config.size, "all", args.toy_n or tcfg.toy_n, workers=tcfg.workers)
    ids, labels = encode_dataset(model.to(device), images, device, flip, bf16=use_bf16(args.dtype or "auto", device))
    meta = {"vocab_size": model.codebook_size, "vqgan_id": fingerprint(model.state_dict())}
    files = {out: lambda f: np.save(f, ids)}
    if labels is not None:  # class sub-folders, or the toy faces' shirt colours: sundae.py --labels takes them
        files[labels_out] = lambda f: np.save(f, labels)
        meta.update(labels=os.path.basename(labels_out), class_names=list(images.class_names))
    files[out + ".json"] = lambda f: f.write(json.dumps(meta).encode())
    write_all(files)  # the latents, their sidecar and labels replace the old ones together, or not at all
    if labels is None and os.path.exists(labels_out):  # the replaced latents' labels would now be wrong
        os.remove(labels_out)
    flipped = ", with flipped copies: --no-flip if mirror images are not your data" if flip else ""
    classes = "" if labels is None else f"; {labels_out}: {len(images.class_names)} classes ({', '.join(images.class_names)})"
    print(f"wrote {out} (+ {out}.json: V and the VQ-GAN's id): {ids.shape} {ids.dtype} (V={model.codebook_size}{flipped}){classes}")

def check_tokens(array, vocab_size, h, w, name):
    """A token array (n, h, w) (or one (h, w) grid) of integer ids in [0, V) -> int64 tensor; BadInput otherwise."""
    if not np.issubdtype(array.dtype, np.integer):
        raise BadInput(f"{name} has dtype {array.dtype}, not integer token ids; save them as uint16 or int64")
    array = array[None] if array.ndim == 2 else array
    if array.ndim != 3 or array.shape[1:] != (h, w) or len(array) == 0:
        raise BadInput(f"{name} has shape {tuple(array.shape)}, but this model's grids are (n, {h}, {w})")
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= vocab_size:
        raise BadInput(f"{name} holds ids in [{lo}, {hi}], outside this model's vocabulary [0, {vocab_size})")
    return torch.from_numpy(array.astype(np.int64))

def load_npy(path, flag):
    """An .npy array, memory-mapped (nothing is read until used); BadInput naming the flag if it is not one."""
    if not os.path.isfile(path):
        raise BadInput(f"{flag} {path!r} {'is a directory' if os.path.isdir(path) else 'not found'}; pass an .npy file")
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy raises several types for files that are not .npy
        raise BadInput(f"{flag} {path!r} is not a readable .npy array ({type(e).__name__}); save it with np.save")
    if not isinstance(array, np.ndarray):  # an .npz archive of several arrays
        raise BadInput(f"{flag} {path!r} is an .npz archive of several arrays; save the one array alone with np.save")
    return array

@torch.no_grad()
def decode_tokens(path, ckpt, outdir, grid_png, device, batch=16):
    """vqgan.py --decode: any token array -> one PNG per grid in outdir (and a grid PNG), in batches."""
    array = load_npy(path, "--decode")
    model = load_vqgan(ckpt, device)
    h = model.config.size // model.downsample_factor
    tokens = check_tokens(array, model.codebook_size, h, h, f"token array {path!r}")
    images, t0 = [], time.time()
    for i in range(0, len(tokens), batch):
        with bf16_autocast(device, device.type == "cuda"):
            x = model.decode(tokens[i:i + batch].to(device)).float().clamp(-1, 1).cpu()
        for j, img in enumerate(x):
            save_png(img[None], os.path.join(outdir, f"{i + j:06d}.png"), nrow=1, pad=0, scale=1)
        if grid_png:
            images.append(x)
        done = min(len(tokens), i + batch)
        print(f"decoded {done}/{len(tokens)} grids | {done / (time.time() - t0):.1f} grids/s", flush=True)
    if grid_png:
        save_png(torch.cat(images), grid_png, nrow=min(8, len(tokens)))
    print(f"wrote {len(tokens)} PNGs ({model.config.size}x{model.config.size}) to {outdir}/" +
          (f" and {grid_png}" if grid_png else ""))

# --------------------------------------------------------------------------------------------------
# pretrained taming-transformers VQ-GANs (paper §3.1: "where such models are available, we use pretrained VQ-GANs"),
# as nanoGPT's from_pretrained.
# Their layout differs from ours only in names, fused q/k/v and the decoder's extra ResNet block per level;
# the architecture is read from the weight shapes.

class _Lenient(pickle.Unpickler):
    """Unpickles a trusted Lightning file on a machine without pytorch_lightning or omegaconf:
    the classes it names but this machine lacks become an empty placeholder (the weights are plain tensors)."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (), {"__init__": lambda self, *a, **k: None, "__setstate__": lambda self, state: None})

def read_foreign(path, trust=False):
    """torch.load a checkpoint from elsewhere: tensors and plain types only,
    unless the user trusts its source (unpickling arbitrary objects can run arbitrary code, so we never do it silently)."""
    if not os.path.isfile(path):
        raise BadInput(f"--convert {path!r} {'is a directory' if os.path.isdir(path) else 'not found'}")
    try:
        return quiet_torch_load(path, weights_only=True)
    except Exception as e:  # torch raises several types for foreign or damaged files
        # not a refused class: damaged
        if not (isinstance(e, pickle.UnpicklingError) and "global" in str(e)):
            raise BadInput(f"{path!r} is not a readable checkpoint ({type(e).__name__}); pass a .ckpt or .pt file")
        if not trust:
            raise BadInput(f"{path!r} pickles Python objects beyond tensors (Lightning checkpoints do), "
                           "and loading them can run code; if you trust its source, pass --trust_checkpoint")
    lenient = type(sys)("lenient_pickle")  # a pickle module whose Unpickler is _Lenient
    lenient.__dict__.update(vars(pickle), Unpickler=_Lenient)
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=lenient)

def taming_state_dict(ckpt):
    """The VQModel weights in a taming checkpoint: a Lightning state_dict,
    or its first_stage_model.* part (a Net2NetTransformer checkpoint, the authors' --legacy-cfg case);
    None if there are none."""
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    for prefix in ("", "first_stage_model."):
        if isinstance(sd, dict) and any(k.startswith(prefix + "quantize.") for k in sd) and \
                prefix + "encoder.conv_in.weight" in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return None

def taming_codebook(sd):
    """taming's quantizer -> (our codebook (V, embed_dim), V). Its layouts:
    VectorQuantizer(2) and EMAVectorQuantizer keep the codes in quantize.embedding.weight (the EMA one also its running
    sums, which inference does not use); VectorQuantizer2 with remap keeps a `used` list, and its ids index that list,
    so our codebook is those codes in that order (an input whose nearest code is outside the list gets taming's
    'unknown' id there, the nearest listed code here). Gumbel quantizers are refused."""
    if "quantize.embed.weight" in sd:
        raise BadInput("this taming VQModel uses a GumbelQuantize quantizer (quantize.embed, quantize.proj), "
                       "which samples codes; only nearest-neighbour quantizers convert")
    codes = sd["quantize.embedding.weight"]
    if "quantize.used" in sd:
        codes = codes[sd["quantize.used"].long()]
    return codes, len(codes)

def taming_config(sd, size):
    """Our ModelConfig for a taming VQModel,
    inferred from its weight shapes (which levels have attention, the widths) and the image side,
    which taming keeps in its YAML file, not in the weights."""
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    ch, levels = sd["encoder.conv_in.weight"].shape[0], count("encoder.down.")
    embed_dim, z_channels = sd["quant_conv.weight"].shape[:2]
    if sd["encoder.conv_out.weight"].shape[0] != z_channels:
        raise BadInput("this taming model's encoder has double_z (mean and variance: a KL autoencoder, not a VQModel)")
    if size % 2 ** (levels - 1):
        raise BadInput(f"--size {size} is not divisible by this model's downsample factor {2 ** (levels - 1)}")
    return ModelConfig(
        size=size, ch=ch,
        ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
        num_res_blocks=count("encoder.down.0.block."), dec_res_blocks=count("decoder.up.0.block."),
        attn_resolutions=tuple(size >> i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd),
        z_channels=z_channels, embed_dim=embed_dim, quantizer="vq",
        codebook_size=taming_codebook(sd)[1],
        code_dim=0, l2_norm=False, restart_after=0)  # taming: plain Euclidean lookup, no projection, no restarts

def from_taming(sd, cfg):
    """Rename taming's weights into this file's layout (and fuse its separate q, k, v 1x1 convs into our qkv).

    taming: encoder.down.{i}.block.{j} / .attn.{j} / .downsample.conv; decoder.up.{t} counts levels from the finest,
    ours from the coarsest. Within a level our ModuleList holds block, [attn], block, [attn], ..., resample."""
    L, out = len(cfg.ch_mult), {}
    renames = {"nin_shortcut": "skip", "proj_out": "proj", "block_1": "0", "attn_1": "1", "block_2": "2"}
    for key, v in sd.items():
        p = key.split(".")
        if p[0] not in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
            continue  # the quantizer (below), the loss (discriminator, LPIPS) and anything else
        if p[1] in ("down", "up"):
            t = int(p[2])  # taming's level, counted from the finest resolution
            i = t if p[0] == "encoder" else L - 1 - t
            per = 1 + ((cfg.size >> t) in cfg.attn_resolutions)  # modules per ResNet block: itself and its attention
            n = cfg.num_res_blocks if p[0] == "encoder" else (cfg.dec_res_blocks or cfg.num_res_blocks)
            if p[3] in ("downsample", "upsample"):  # ours: Sequential(pad or upsample, conv)
                p = [p[0], "levels", str(i), str(n * per), "1"] + p[5:]
            else:
                p = [p[0], "levels", str(i), str(int(p[4]) * per + (p[3] == "attn"))] + p[5:]
        elif p[0] == "encoder" and p[1] in ("norm_out", "conv_out"):
            p = ["encoder", "out", "0" if p[1] == "norm_out" else "2"] + p[2:]
        out[".".join(renames.get(x, x) for x in p)] = v
    # fuse q, k, v along the output channels
    for key in [k for k in out if k.endswith((".q.weight", ".q.bias"))]:
        stem, kind = key.rsplit(".q.", 1)
        out[f"{stem}.qkv.{kind}"] = torch.cat([out.pop(f"{stem}.{c}.{kind}") for c in "qkv"])
    out["quantize.codebook"] = taming_codebook(sd)[0]
    out["quantize.unused_steps"] = torch.zeros(cfg.codebook_size, dtype=torch.long)
    return out

def taming_lpips(sd):
    """taming's LPIPS weights (loss.perceptual_loss.*) in our LPIPS layout, or None:
    VGG slices keep the torchvision feature indices (net.slice2.5 -> features.5), lin{k}.model.1 -> lins.{k}."""
    pre, out = "loss.perceptual_loss.", {}
    for k, v in sd.items():
        if not k.startswith(pre):
            continue
        p = k[len(pre):].split(".")
        if p[0] == "net":
            out[f"features.{p[2]}.{p[3]}"] = v
        elif p[0].startswith("lin"):
            out[f"lins.{p[0][3:]}.{p[-1]}"] = v
        elif p[0] == "scaling_layer":
            out[p[1]] = v
    return out if len(out) == len(LPIPS().state_dict()) else None

def convert_taming(path, out, size=256, trust=False, overwrite=False):
    """vqgan.py --convert: a taming checkpoint -> a native vqgan.pt (weights_only-loadable, config inside),
    and its LPIPS weights, if it carries them, as lpips.pt next to it."""
    check_outputs({"--out": out}, [path], overwrite, keep=True)
    ckpt = read_foreign(path, trust)
    if isinstance(ckpt, dict) and "kind" in ckpt:
        raise BadInput(f"{path!r} is already a {ckpt['kind']} checkpoint of this project; it needs no conversion")
    sd = taming_state_dict(ckpt)
    if sd is None:
        raise BadInput(f"{path!r} is not a taming-transformers VQModel (no quantize.* and encoder.* weights)")
    cfg = taming_config(sd, size)
    ours = from_taming(sd, cfg)
    mismatch = set(VQGAN(cfg).state_dict()) ^ set(ours)
    if mismatch:
        raise BadInput(f"{path!r}: taming weights do not map onto the inferred layout ({sorted(mismatch)[:3]} ...)")
    lp, lp_path = taming_lpips(ckpt.get("state_dict", ckpt)), os.path.join(os.path.dirname(out) or ".", "lpips.pt")
    if lp is not None:
        check_outputs({"--out": out, "lpips.pt": lp_path}, [path], overwrite, keep=True)
    save_checkpoint({"kind": "vqgan", "model_config": asdict(cfg),
                     "train_config": asdict(TrainConfig(out=out)),
                     "model": ours, "step": 0, "history": {},
                     "converted_from": os.path.abspath(path)}, out)
    f = 2 ** (len(cfg.ch_mult) - 1)
    print(f"wrote {out}: taming VQ-GAN {size}px -> {size // f}x{size // f} tokens, V={cfg.codebook_size}, "
          f"ch {cfg.ch} x {cfg.ch_mult}, {cfg.num_res_blocks}/{cfg.dec_res_blocks} ResNet blocks per encoder/decoder level, "
          f"attention at {cfg.attn_resolutions}, z {cfg.z_channels}, embed {cfg.embed_dim}")

    if lp is not None:
        save_checkpoint(lp, lp_path)
        print(f"wrote {lp_path}: the checkpoint's LPIPS weights (use with --lpips {lp_path} --perceptual_weight 1.0)")

# --------------------------------------------------------------------------------------------------
# benchmark: one full training step (G and D) on random images

def benchmark(mcfg, tcfg, steps=5, mem_cap_gb=0.0):
    """images/s and peak memory of VQ-GAN training steps with the GAN on, without data."""
    device = pick_device(tcfg.device)
    # pretend to be a smaller card: allocations beyond the cap fail
    if device.type == "cuda" and mem_cap_gb > 0:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem_cap_gb * 2**30 / total), device)
    model = VQGAN(mcfg).to(device, memory_format=torch.channels_last)
    disc = PatchDiscriminator(mcfg.disc_ch, mcfg.disc_layers).to(device, memory_format=torch.channels_last)
    model.set_grad_ckpt(tcfg.grad_ckpt)
    opt_g, opt_d = torch.optim.Adam(model.parameters()), torch.optim.Adam(disc.parameters())
    if tcfg.compile:
        compile_for_adaptive_weight()
    fwd = torch.compile(model) if tcfg.compile else model
    bf16 = use_bf16(tcfg.dtype, device)
    amp = partial(bf16_autocast, device, bf16)
    x = torch.rand(tcfg.batch_size, 3, mcfg.size, mcfg.size, device=device).mul(2).sub(1)
    x = x.contiguous(memory_format=torch.channels_last)

    def one_step():
        loss, _, x_rec, _ = generator_loss(fwd, disc, model.last_layer(), x, True, tcfg.disc_weight, amp=amp)
        loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        with amp():
            d_loss = hinge_d_loss(disc(x).float(), disc(x_rec.detach()).float())
        d_loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    dt = seconds_per_step(one_step, steps, device, warmup=1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    mem = peak_memory(device)
    cap = f" (capped at {mem_cap_gb:g} GiB)" if device.type == "cuda" and mem_cap_gb > 0 else ""
    print(f"device {name} | {'bf16' if bf16 else 'fp32'} | {mcfg.size}px, f={model.downsample_factor}, "
          f"V={mcfg.codebook_size} | batch {tcfg.batch_size} | grad_ckpt {tcfg.grad_ckpt} | compile {tcfg.compile}")
    print(f"{dt * 1e3:.0f} ms/step (G + D) | {tcfg.batch_size / dt:.2f} images/s | peak memory {mem}{cap}")

def main(argv=None):
    parser = Parser(description="Train the VQ-GAN tokenizer, or encode images into latents.")
    parser.add_argument("--preset", default=None, choices=list(PRESETS), help="model and training preset (default tiny)")
    parser.add_argument("--encode", action="store_true", help="encode --data with --ckpt into --out (latents.npy)")
    parser.add_argument("--ckpt", default="vqgan.pt", help="the VQ-GAN checkpoint that encodes or decodes")
    parser.add_argument("--benchmark", action="store_true", help="time training steps (G + D) on random images")
    parser.add_argument("--mem_cap_gb", type=float, default=0.0, help="--benchmark on CUDA: cap this process at N GiB")
    parser.add_argument("--bench_steps", type=int, default=5, help="--benchmark: timed steps after one warm-up step")
    parser.add_argument("--convert", default="",
                        help="taming-transformers .ckpt -> a vqgan.pt at --out (image side --size, default 256)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="--convert: allow a checkpoint that pickles Python objects (a Lightning .ckpt) you trust")
    parser.add_argument("--decode", default="",
                        help="(n, h, w) token array .npy -> a PNG per grid in --outdir, with --ckpt (and a grid at --out if given)")
    parser.add_argument("--outdir", default="decoded", help="--decode: folder for the PNGs")
    add_flags(parser, ModelConfig)
    add_flags(parser, TrainConfig)
    args = parser.parse_args(argv)

    if args.convert:
        return convert_taming(args.convert, args.out or "vqgan.pt", args.size or 256,
                              args.trust_checkpoint, bool(args.overwrite))
    if args.decode:
        check_outputs({"--out": args.out}, [args.decode, args.ckpt], bool(args.overwrite), outdir=args.outdir)
        return decode_tokens(args.decode, args.ckpt, args.outdir, args.out, pick_device(args.device or "auto"))
    if args.encode:
        return encode_main(args)

    mcfg_p, tcfg_p = PRESETS[args.preset or "tiny"]
    mcfg = replace(mcfg_p, **overrides(args, ModelConfig))
    tcfg = replace(tcfg_p, **overrides(args, TrainConfig))
    if not tcfg.resume and args.max_steps and args.disc_start is None and tcfg.disc_start >= args.max_steps:
        # a shortened run keeps the preset's share of GAN steps,
        # rather than silently never switching the GAN on (a resumed run keeps the GAN start its checkpoint stored)
        tcfg = replace(tcfg, disc_start=tcfg_p.disc_start * tcfg.max_steps // tcfg_p.max_steps)
        print(f"note: --max_steps {tcfg.max_steps}: the GAN starts at step {tcfg.disc_start} (set --disc_start to choose)",
              file=sys.stderr)
    if args.benchmark:
        if args.bench_steps < 1:
            raise BadInput(f"--bench_steps must be at least 1, got {args.bench_steps}")
        return benchmark(mcfg, tcfg, args.bench_steps, mem_cap_gb=args.mem_cap_gb)
    resume_ckpt = None
    if tcfg.resume:
        resume_ckpt = load_checkpoint(tcfg.out, "vqgan")
        mcfg, tcfg = resumed_configs(resume_ckpt, ModelConfig, TrainConfig, args)
    check_config(mcfg, positive=("size", "ch", "z_channels", "codebook_size", "beta", "disc_ch",
                                 "disc_layers"),
                 nonneg=("num_res_blocks", "dec_res_blocks", "embed_dim", "code_dim",
                         "restart_after", "entropy_weight"),
                 choices={"quantizer": ("vq", "lfq")})
    if not mcfg.ch_mult or min(mcfg.ch_mult) < 1:
        raise BadInput(f"--ch_mult needs at least one multiplier, all >= 1, got {','.join(map(str, mcfg.ch_mult))}")
    check_train_config(tcfg, positive=("toy_n", "val_n", "workers", "sample_every"),
                       nonneg=("disc_start", "disc_weight", "perceptual_weight", "l2_weight"))
    vq_only = {"code_dim", "l2_norm", "restart_after"} & set(overrides(args, ModelConfig))
    if mcfg.quantizer == "lfq" and vq_only:
        ignored = ", ".join("--" + k for k in sorted(vq_only))
        print(f"warning: {ignored} ignored: lfq has no codebook to project, normalise or restart", file=sys.stderr)
    if tcfg.data == "toy" and not 16 <= mcfg.size <= 1024:
        raise BadInput(f"toy faces come in sizes 16..1024, not {mcfg.size}")
    run_guarded(train, mcfg, tcfg, resume_ckpt, inputs=[tcfg.lpips])

# --------------------------------------------------------------------------------------------------
# plumbing shared by every script (sundae.py, sample.py and inpaint.py import it from here): flags from dataclasses,
# one-line errors, devices and bf16, DDP, atomic writes and checkpoints, figures, benchmark timing.
# Nothing here is about the VQ-GAN; a reader of the VQ-GAN may stop above.

def run_main(main):
    """A script's entry point: BadInput -> one line on stderr (from rank 0 only under torchrun), exit status 2."""
    try:
        main()
    except BadInput as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NotImplementedError as e:  # a course handout's blank exercise says which one and how to check it
        if not str(e).startswith("exercise "):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Ctrl-C outside training (which saves and exits itself): outputs are atomic
    except KeyboardInterrupt:
        print("interrupted: no output was half-written", file=sys.stderr)
        sys.exit(130)

class Parser(argparse.ArgumentParser):
    """argparse, except that a bad flag is BadInput (one line, exit 2), not the whole usage text."""

    def error(self, message):
        hint = " (a value starting with '-' is written --flag=VALUE)" if "expected one argument" in message else ""
        raise BadInput(f"{message}{hint} (see --help)")

def add_flags(parser, cls):
    """One --flag per field of the config dataclass cls, with the help its declaration gives (flag(default, help))."""
    for f in fields(cls):
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help; declare it as {f.name}: {f.type.__name__} = flag(default, help)")
        help = f.metadata["help"].replace("%", "%%")  # argparse %-formats help text
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help)
        # the element type follows the default's: ints (channel multipliers) or floats
        elif f.type is tuple:
            conv = type(f.default[0]) if f.default else int
            parser.add_argument(f"--{f.name}", type=lambda s,
                                conv=conv: tuple(conv(v) for v in s.split(",") if v), default=None,
                                help=f"{help} (comma-separated, default {','.join(map(str, f.default))})")
        else:
            parser.add_argument(f"--{f.name}", type=f.type, default=None, help=f"{help} (default {f.default!r})")

def overrides(args, cls):
    """The fields of cls that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}

def tuples(config):
    """A stored config dict with its lists back as tuples (the dataclasses' tuple fields)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}

def resumed_configs(ckpt, model_cls, train_cls, args):
    """--resume: the checkpoint's configs,
    except what this command line sets (e.g. --max_steps). --out stays where the checkpoint was read:
    a run writes back where it read,
    never to a path stored inside (a copy resumed elsewhere must not overwrite its original)."""
    ignored = [f"--{k}" for k in overrides(args, model_cls)] + (["--preset"] if args.preset else [])
    if ignored:
        print(f"warning: {', '.join(ignored)} ignored: a resumed run keeps its checkpoint's model and preset",
              file=sys.stderr)
    out = args.out or train_cls.out
    tcfg = replace(train_cls(**tuples(ckpt["train_config"])), **{**overrides(args, train_cls), "out": out})
    if ckpt["step"] >= tcfg.max_steps:  # nothing to train: the stored results would pass for a new run's
        raise BadInput(f"--resume: {out!r} is already at step {ckpt['step']} of --max_steps {tcfg.max_steps}; "
                       "pass a larger --max_steps to train on")
    print(f"resuming from {out!r} at step {ckpt['step']}")
    return model_cls(**tuples(ckpt["model_config"])), tcfg

def check_config(cfg, positive=(), nonneg=(), fractions=(), choices=None):
    """Refuse nonsense flag values before any work, one line naming the flag, the value and the rule: positive (> 0),
    nonneg (>= 0; NaN fails both), fractions (strictly between 0 and 1), choices {field: allowed values}."""
    for name in positive + nonneg:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and (v > 0 if name in positive else v >= 0) and v < 2**63):
            raise BadInput(f"--{name} must be {'> 0' if name in positive else '>= 0'}, finite and below 2**63, got {v!r}")
    for name in fractions:
        if not 0 < getattr(cfg, name) < 1:
            raise BadInput(f"--{name} must be between 0 and 1 (exclusive), got {getattr(cfg, name)!r}")
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            raise BadInput(f"--{name} must be one of {', '.join(map(str, allowed))}, got {getattr(cfg, name)!r}")

def check_train_config(tcfg, positive=(), nonneg=(), fractions=()):
    """The checks both training scripts share, plus their own."""
    check_config(tcfg, positive=("batch_size", "grad_accum", "lr", "log_every", "ckpt_every",
                                 "max_steps") + positive,
                 nonneg=("min_lr", "warmup", "grad_clip", "seed", "ema") + nonneg,
                 fractions=fractions, choices={"dtype": ("auto", "bf16", "fp32")})
    if tcfg.ema >= 1:
        raise BadInput(f"--ema must be below 1 (a decay; 0 = off), got {tcfg.ema}")
    if tcfg.min_lr > tcfg.lr:
        raise BadInput(f"--min_lr {tcfg.min_lr} is above --lr {tcfg.lr}: the decay would rise; set it to at most --lr")

def pick_device(name):
    """auto/cpu/cuda -> a torch.device.
    On a GPU, fp32 matmuls may use TF32 tensor cores from here on (as DiT): set once, for training and sampling alike."""
    if name not in ("auto", "cpu", "cuda"):
        raise BadInput(f"--device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"  # GPU only: fp32 matmuls on TF32 tensor cores
    return device

def use_bf16(dtype, device):
    """--dtype: "auto" = bf16 autocast on CUDA (tensor cores), fp32 on the CPU;
    "bf16" and "fp32" force it on any device. bf16 autocast runs on the CPU too,
    which is how the GPU's code path is tested without one;
    it is faster there only on CPUs with bf16 instructions and at large sizes, so auto keeps fp32 on the CPU."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise BadInput(f"--dtype must be auto, bf16 or fp32, not {dtype!r}")
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")

def bf16_autocast(device, bf16):
    """The bf16 autocast context (or a no-op).
    What must stay fp32 (quantizer distances, the adaptive GAN weight, the transformer's head, the losses) turns it off
    locally or upcasts."""
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16)

def setup_processes(tcfg):
    """One process, or DDP when torchrun launched several (it sets WORLD_SIZE and RANK).
    Returns the run's place: ddp, rank, world (processes), master (rank 0, which writes files), device, and micro,
    the per-process micro-batch (--batch_size counts all processes and micro-batches)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    ddp, rank = world > 1, int(os.environ.get("RANK", 0)) if world > 1 else 0
    if tcfg.batch_size % (world * tcfg.grad_accum):
        raise BadInput(f"--batch_size {tcfg.batch_size} must divide by processes x --grad_accum = {world * tcfg.grad_accum}")
    device = pick_device(tcfg.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(tcfg.seed + rank)
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, device=device,
                           micro=tcfg.batch_size // (world * tcfg.grad_accum))

def finish_processes(run, stop, out, step):
    """End of a training run: leave DDP together (a rank that tears down early aborts its peers);
    after Ctrl-C or SIGTERM say how to continue and exit 128 + the signal's number."""
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()
    if stop:
        if run.master:
            print(f"interrupted at step {step}: saved {out!r}; continue with --resume", flush=True)
        sys.exit(128 + stop[0])

def restore(ckpt, window, **parts):
    """--resume:
    each named module or optimizer takes its state from the checkpoint (a weight average switched on only now starts
    from the model) and the random state continues -> (step, history, log window).
    """
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(ckpt.get(name) or ckpt["model"])
    torch.set_rng_state(ckpt["rng"])
    saved = ckpt.get("log_window")
    return ckpt["step"], ckpt["history"], saved if isinstance(saved, dict) else window

def new_window(*names, **extra):
    """A log window's running sums, the same shape in both trainers: {name: 0.0, ..., **extra, "steps": 0}."""
    return {**dict.fromkeys(names, 0.0), **extra, "steps": 0}

def window_means(window, names, device, ddp):
    """The means over a log window's steps of its running sums `names`,
    averaged over processes under DDP (every process must call it) -> {name: float}."""
    means = torch.stack([torch.as_tensor(window[k], dtype=torch.float32,
                                         device=device) for k in names]) / window["steps"]
    if ddp:
        dist.all_reduce(means)
        means /= dist.get_world_size()
    return dict(zip(names, means.tolist()))

def lr_at(step, tcfg):
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < tcfg.warmup:
        return tcfg.lr * (step + 1) / tcfg.warmup
    progress = min(1.0, (step - tcfg.warmup) / max(1, tcfg.max_steps - tcfg.warmup))
    return tcfg.min_lr + 0.5 * (tcfg.lr - tcfg.min_lr) * (1 + math.cos(math.pi * progress))

@torch.no_grad()
def ema_update(ema, model, decay, step):
    """ema <- ema + (1 - d) (model - ema), with d = min(decay, (1 + step) / (10 + step)):
    the average starts close to the model (d = 0.1 at step 0) and lengthens its memory up to `decay`,
    so early checkpoints are not the random initialisation's ghost.
    Buffers (the codebook's usage counters) are copied, not averaged."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)

def stop_on_signals():
    """Ctrl-C or SIGTERM (what a cluster scheduler sends before it kills a job): the returned list gets the signal,
    and the training loop finishes its step, saves and exits. A second Ctrl-C stops at once."""
    stop = []

    def handler(sig, frame):
        if stop:  # the second signal, Ctrl-C or SIGTERM: now
            raise KeyboardInterrupt
        stop.append(sig)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop

def stop_at_once(saved):
    """From here on, Ctrl-C or SIGTERM ends the run at once (exit 128 + the signal), saying what is on disk."""
    def handler(sig, frame):
        print(f"interrupted: {saved}", file=sys.stderr, flush=True)
        raise SystemExit(128 + sig)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)

def hold_lock(out):
    """One writer per checkpoint:
    an exclusive kernel lock on out + ".lock" that ends with its process (a killed run leaves an empty, unlocked file,
    which the next run takes) -> the open lock file, for release_lock."""
    import fcntl  # Unix
    try:
        lock = open(out + ".lock", "a")  # "a": an existing lock file is never truncated before it is locked
    except OSError as e:
        raise BadInput(f"cannot lock {out + '.lock'!r} ({e.strerror}); choose another path")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise BadInput(f"another run is writing {out!r} (it holds {out + '.lock'!r}); wait for it to finish, or choose another path")
    record(lock.name, identity(lock.name))  # the empty file a killed run leaves is ours (it never changes)
    return lock

def release_lock(lock):
    os.remove(lock.name)  # while still held: no other run can hold this file meanwhile
    lock.close()

def run_guarded(train_fn, mcfg, tcfg, resume_ckpt, inputs):
    """train_fn(mcfg, tcfg, resume_ckpt) with what is on disk protected, before any heavy work:
    --out is checked (check_outputs; an existing checkpoint is replaced only with --resume or --overwrite),
    one writer per checkpoint (hold_lock), and the caller's signal handlers given back."""
    check_outputs({"--out": tcfg.out}, inputs, overwrite=tcfg.resume or tcfg.overwrite, keep=True)
    lock = hold_lock(tcfg.out) if int(os.environ.get("RANK", 0)) == 0 else None  # only rank 0 writes
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train_fn(mcfg, tcfg, resume_ckpt)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if lock:
            release_lock(lock)

def check_outputs(outputs, inputs=(), overwrite=False, outdir="", keep=False):
    """Before any heavy work, each output {flag: path}: not an input of this run nor another output,
    a file in a writable folder, PNG where it is a picture, and not an existing file that this project did not write
    (ours), unless overwrite. keep: an existing file is replaced only with overwrite, even one this project wrote
    (checkpoints and latents hold minutes to days of work). outdir: a folder, created here."""
    taken = {os.path.realpath(p): "an input" for p in inputs if p}
    for flag, path in ((f, p) for f, p in outputs.items() if p):
        real, ext = os.path.realpath(path), os.path.splitext(path)[1].lower()
        problem = None
        if real in taken:
            problem = f"is also {taken[real]} of this run"
        elif os.path.isdir(path):
            problem = "is a directory"
        elif not os.access(os.path.dirname(real), os.W_OK):
            problem = "is in a folder that does not exist or is not writable"
        elif ext in Image.registered_extensions() and ext != ".png":
            problem = "names another image format, but pictures are written as PNG"
        elif os.path.basename(path) == OWNED:
            problem = "is the list of the files this project wrote in its folder"
        if problem:
            raise BadInput(f"{flag} {path!r} {problem}; choose another path")
        for side in (path + ".tmp", path + ".lock", path + ".prev"):  # the names the project writes beside
            if os.path.lexists(side) and not ours(side):
                raise BadInput(f"{flag} {path!r}: {side!r} exists and this project did not write it "
                               "(it writes that name beside its outputs); move it away, or choose another path")
        read_only = os.path.isfile(path) and not os.stat(path).st_mode & 0o200  # (root may write it anyway)
        if os.path.lexists(path) and not overwrite and (keep or read_only or not ours(path)):
            hint = "continue it with --resume, " if path.endswith(".pt") else ""
            what = "is read-only" if read_only and ours(path) else "already exists"
            raise BadInput(f"{flag} {path!r} {what}; {hint}replace it with --overwrite, or choose another path")
        taken[real] = flag
    try:
        if outdir:
            os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--outdir {outdir!r} cannot be a folder ({e.strerror}); choose another path")

# Which files are the project's own is decided by something a user's file cannot have by accident: each folder the
# scripts write to keeps the list OWNED of the files they wrote there, each with its inode, size and modification time.
# A copy, an edit or another file under the same name differs in one of them; the format of the file plays no part.
OWNED = ".megapixel-sundae"

def identity(path, whole=True):
    """A file's device and inode and, whole, its size and modification time (ns), as one string."""
    st = os.lstat(path)
    return f"{st.st_dev} {st.st_ino}" + (f" {st.st_size} {st.st_mtime_ns}" if whole else "")

def record(path, ident):
    """Add path, with identity ident ("gone" once it is renamed away), to its folder's list of the files this project
    wrote: one appended line, so a run appending beside it loses nothing. The last line for a name is the one that
    counts."""
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), OWNED), "a") as f:
        f.write(f"{os.path.basename(path)}\t{ident}\n")

def ours(path):
    """Whether path is a file this project wrote and nobody changed since: its identity is the last one its folder's
    list gives its name (a temporary file, recorded while it was being written, by its inode alone).
    Never a symbolic link (its identity is the link's own, which the project never wrote): writing there would change
    the file it points to."""
    if not os.path.isfile(path):
        return False
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), OWNED)) as f:
            lines = f.read().splitlines()
    except OSError:  # no list: nothing in this folder was written by the project
        return False
    name = os.path.basename(path) + "\t"
    last = next((line[len(name):] for line in reversed(lines) if line.startswith(name)), None)
    return last in (identity(path), identity(path, whole=False))

def write_atomic(path, write):
    """write(f) into path + ".tmp" (a binary file), then rename: see write_all."""
    write_all({path: write})

def write_all(writes):
    """{path: write(f)}: each file written into path + ".tmp", and renamed over path only once all of them are written,
    so a crash, Ctrl-C or full disk mid-write never leaves a partial file,
    nor a new file beside old ones (latents with another run's sidecar).
    The one fixed temporary name means a killed run leaves at most one stray file per output,
    which the next write replaces."""
    # Ctrl-C and SIGTERM wait until the files are written (handled right after): raised inside torch.save,
    # they would surface as an unrelated error and leave the temporary files. Only the main thread may set handlers
    deferred, main = [], threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, lambda sig, frame: deferred.append(sig)) for s in
                (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        for path, write in writes.items():
            with open(path + ".tmp", "wb") as f:
                record(path + ".tmp", identity(path + ".tmp", whole=False))  # a killed run's leftover is ours
                write(f)
        for path in writes:
            record(path, identity(path + ".tmp"))  # the rename keeps inode, size and time
        for path in writes:
            os.replace(path + ".tmp", path)
            record(path + ".tmp", "gone")  # a user's file under that name later is not ours
    except BaseException as e:
        for path in writes:
            if os.path.isfile(path + ".tmp"):
                os.remove(path + ".tmp")
        if not isinstance(e, (OSError, RuntimeError)):  # a full disk: torch.save raises RuntimeError, others OSError
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        names = ", ".join(map(repr, writes))
        raise BadInput(f"cannot write {names} ({reason}); free space or choose another path (what was there is unchanged)") from e
    finally:
        for s, h in handlers.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
        for s in deferred:
            signal.raise_signal(s)

def save_checkpoint(obj, path):
    """torch.save, atomically; the checkpoint it replaces survives as path + ".prev",
    for a run that diverges while its numbers stay finite.
    Weights an exploding step made inf/NaN are never saved (the loss check stops the run)."""
    weights = [v for part in ("model", "ema") for v in (obj.get(part) or {}).values() if v.is_floating_point()]
    if not all(torch.isfinite(v).all() for v in weights):
        return

    def write(f):
        torch.save(obj, f)
        f.flush()
        if os.path.exists(path):
            record(path + ".prev", identity(path))
            os.replace(path, path + ".prev")

    write_atomic(path, write)

def checkpoints_left(path):
    """What a stopped run leaves on disk, for a message that is true."""
    found = [repr(p) for p in (path, path + ".prev") if os.path.exists(p)]
    return "kept " + " and ".join(found) if found else "no checkpoint was written"

def quiet_torch_load(path, weights_only):
    """torch.load to the CPU without torch's warnings about a foreign file's pickle protocol:
    the caller says in one line what is wrong with the file."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=weights_only)

def load_checkpoint(path, kind):
    """A checkpoint this project wrote, of the expected kind: a dict of plain types and tensors (weights_only)."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "not found"
        raise BadInput(f"checkpoint {path!r} {what}; train one first (python {kind}.py) or pass its path")
    try:
        ckpt = quiet_torch_load(path, weights_only=True)  # plain types and tensors only
    except Exception as e:  # torch raises several types for foreign or damaged files
        hint = ("a taming-transformers checkpoint converts with python vqgan.py --convert" if path.endswith(".ckpt")
                else f"pass a checkpoint that {kind}.py wrote")
        raise BadInput(f"{path!r} is not a checkpoint of this project ({type(e).__name__}); {hint}")
    found = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if found != kind:
        hint = "convert it with python vqgan.py --convert" if taming_state_dict(ckpt) else f"pass the {kind} checkpoint"
        what = f"a {found} checkpoint, not a {kind} one" if found else f"not a {kind} checkpoint"
        raise BadInput(f"{path!r} is {what}; {hint}")
    return ckpt

def load_weights(model, state_dict, path):
    """Weights into a model built from the same checkpoint's config; a damaged file or NaN weights stop here."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise BadInput(f"{path!r} does not match its own config ({str(e).splitlines()[0]}); the file is damaged")
    if not all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point()):
        raise BadInput(f"{path!r} holds NaN or infinite weights; use {path + '.prev'!r} if it exists, or retrain")

def save_png(images, path, nrow, pad=2, scale=0):
    """Save (N, 3, H, W) images in [-1, 1] as one grid PNG with pad-pixel white gaps,
    atomically (pad=0, scale=1 and one image: the image itself, e.g. for FID tools). scale:
    nearest-neighbour enlargement of each image;
    0 = enough that images smaller than 128 pixels are at least that (a 32x32 face is shown 4x: eyes visible)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    scale = scale or max(1, 128 // max(x.shape[2:]))
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # each pixel becomes a scale x scale block
    N, C, H, W = x.shape
    ncol = math.ceil(N / nrow)
    grid = torch.full((C, ncol * (H + pad) + pad, nrow * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = x[i]
    write_atomic(path, lambda f: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, "PNG"))

def save_figure(fig, path):
    """A matplotlib figure -> PNG, atomically."""
    import matplotlib.pyplot as plt
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)

def plot_curves(curves, path, title):
    """curves: {name: [(step, value), ...]} -> a log-scale PNG (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set(xlabel="step", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)

def peak_memory(device):
    """This process's peak memory: the CUDA allocator's peak on a GPU, the resident-set high-water mark on the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA allocator peak)"
    import resource  # Unix only: ru_maxrss is in KiB on Linux, in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 2**30:.2f} GiB (process RSS peak)"

def seconds_per_step(one_step, steps, device, warmup):
    """Mean seconds of one_step() over `steps` calls, after `warmup` calls (allocation, kernel choice, compilation).
    CUDA runs asynchronously: synchronise around the timed calls so they measure the work, not its launch.
    The peak-memory counter is reset after warm-up, so peak_memory reports the steady state.
    """
    for _ in range(warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps

if __name__ == "__main__":
    run_main(main)
