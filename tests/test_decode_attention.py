"""Our decode-attention kernel against a float32 softmax reference, under Triton's CPU interpreter (or on a GPU).

The tolerance: the kernel sums the scores and weighted values in float32 and rounds the softmax weights to the
values' dtype before the second dot, as flash attention does; the output is then within bf16's eps times
(sum of weight * |v|) + |output| of the float32 reference (its softmax weights unrounded): see ``_reference``.
tests/conftest.py turns the interpreter on where no GPU is present.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is a test extra: pip install -e '.[test]'")

from medqa_core.engine.kernels.decode_attention import BLOCK_L, decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(q, k, v, mask, scaling):
    """float32 softmax(q k^T * scaling + mask) v, each query head against its group's KV head, and the bound on
    |out - reference|: the softmax weights rounded to bf16 (half an eps each, relative) summed against |v|, and
    the output's own rounding (half an eps of it), with as much again for float32's sums."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scaling  # [B, Hq, 1, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    weights = torch.softmax(scores, dim=-1)
    ref = weights @ v
    return ref, torch.finfo(torch.bfloat16).eps * (weights @ v.abs() + ref.abs())


def _close(out, reference) -> bool:
    ref, bound = reference
    return bool(((out.float() - ref).abs() <= bound).all())


def _inputs(batch, q_heads, kv_heads, length, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, 1, head_dim, generator=gen).bfloat16().to(DEVICE)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen).bfloat16().to(DEVICE)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen).bfloat16().to(DEVICE)
    return q, k, v


def _valid_positions(batch, length, valid):
    """transformers' decode mask of a static cache: [B, 1, 1, L], True at the positions written so far."""
    return (torch.arange(length, device=DEVICE) < valid).expand(batch, 1, 1, length)


@pytest.mark.parametrize(("batch", "q_heads", "kv_heads", "length", "valid", "splits"), [
    (1, 4, 1, 50, 50, 1),  # one block, shorter than BLOCK_L, no mask needed
    (2, 8, 2, 200, 137, 3),  # GQA 4: splits over 64-key blocks, the last split partly masked
    (1, 2, 2, 300, 65, 4),  # no GQA; splits 3 and 4 see no valid key at all (they must add nothing, no NaN)
    (3, 12, 4, 130, 130, 2),  # GQA 3 (not a power of two), three sequences
])
def test_decode_attention_matches_a_float32_softmax(batch, q_heads, kv_heads, length, valid, splits) -> None:
    q, k, v = _inputs(batch, q_heads, kv_heads, length, 32)
    mask = _valid_positions(batch, length, valid)
    out = decode_attention(q, k, v, mask, scaling=0.3, splits=splits)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert _close(out, _reference(q, k, v, mask, 0.3))
    # masked keys really are out: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[:, :, valid:] = 100.0
    v2[:, :, valid:] = -100.0
    assert torch.equal(out, decode_attention(q, k2, v2, mask, scaling=0.3, splits=splits))


def test_splits_are_combined_in_a_fixed_order_and_leave_their_counters_at_zero() -> None:
    from medqa_core.engine.kernels import common

    q, k, v = _inputs(2, 8, 2, 4 * BLOCK_L, 64, seed=1)
    mask = _valid_positions(2, 4 * BLOCK_L, 3 * BLOCK_L + 5)
    first = decode_attention(q, k, v, mask, splits=4)
    assert common.ARRIVAL_COUNTERS[(q.device, "attention")].abs().sum().item() == 0
    assert torch.equal(first, decode_attention(q, k, v, mask, splits=4))  # the same bits on the next call
    one = decode_attention(q, k, v, mask, splits=1)
    assert _close(first, _reference(q, k, v, mask, 64**-0.5))
    assert _close(one, _reference(q, k, v, mask, 64**-0.5))


def test_an_additive_float_mask_and_no_mask() -> None:
    q, k, v = _inputs(2, 4, 2, 96, 16, seed=2)
    additive = torch.zeros(2, 1, 1, 96, device=DEVICE)
    additive[0, ..., 40:] = torch.finfo(torch.float32).min  # transformers' float masks use the dtype's min
    additive[1, ..., :10] = -1.5  # any additive bias, not only 0 / min
    out = decode_attention(q, k, v, additive, scaling=0.25, splits=2)
    assert _close(out, _reference(q, k, v, additive, 0.25))
    assert _close(decode_attention(q, k, v, None), _reference(q, k, v, None, 16**-0.5))


@pytest.mark.parametrize(("q_shape", "k_shape", "mask_keys", "match"), [
    ((1, 4, 2, 16), (1, 4, 8, 16), None, "one query token"),  # two query tokens
    ((1, 6, 1, 16), (1, 4, 8, 16), None, "up to 16 query heads"),  # 6 query heads over 4 KV heads
    ((1, 4, 1, 8), (1, 4, 8, 8), None, "head size of 16 or more"),  # below a tl.dot's K
    ((1, 4, 1, 16), (1, 4, 8, 16), 6, "the mask covers 6 keys, the cache holds 8"),
])
def test_what_it_cannot_compute_is_refused(q_shape, k_shape, mask_keys, match) -> None:
    q = torch.zeros(q_shape, dtype=torch.bfloat16, device=DEVICE)
    k = torch.zeros(k_shape, dtype=torch.bfloat16, device=DEVICE)
    mask = None if mask_keys is None else torch.ones(1, 1, 1, mask_keys, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, k, mask)


def test_static_decoder_with_our_attention_gives_the_model_attentions_tokens(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from medqa_core.engine.decoding import StaticDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(DEVICE).eval()
    ids = torch.randint(3, 32000, (2, 10), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    runs = {}
    for attention in ("triton", "model"):
        torch._dynamo.reset()
        decoder = StaticDecoder(model, batch=2, max_len=ids.shape[1] + 5, use_graph=DEVICE == "cuda",
                                attention=attention)
        runs[attention] = decoder.generate(ids, 5), decoder.setup
        assert model.config._attn_implementation == "sdpa"  # the model's own attention is back after generate
        if DEVICE == "cpu":  # (on a GPU the step is a graph replay: the profiler sees kernels, not ops)
            decoder.generate(ids, 2)
            with torch.profiler.profile() as prof:
                decoder.step()
            ran = {e.name for e in prof.events()}
            assert ("medqa_parity::decode_attention" in ran) == (attention == "triton")
    (ours, setup), (theirs, model_setup) = runs["triton"], runs["model"]
    assert setup.decode_attention.startswith("triton-decode") and model_setup.decode_attention == "model: sdpa"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_decoder_refuses_an_unknown_attention(tiny_model_dir) -> None:
    from medqa_core.engine.decoding import decode_attention_choice

    with pytest.raises(ValueError, match="choose one of auto, triton, model"):
        decode_attention_choice(torch.nn.Linear(2, 2), torch.device(DEVICE), "flash")
    # off a GPU "auto" keeps the model's attention (the interpreter is for tests)
    assert decode_attention_choice(torch.nn.Linear(2, 2), torch.device("cpu"), "auto")[0] == "model"


@pytest.mark.parametrize(("gpu", "hip", "rows", "expected"), [
    ("NVIDIA H200", None, 1, "triton"), ("NVIDIA H200", None, 8, "triton"), ("NVIDIA H200", None, 9, "model"),
    ("NVIDIA H100 80GB HBM3", None, 1, "model"), ("NVIDIA H100 80GB HBM3", None, 31, "model"),
    ("NVIDIA H100 80GB HBM3", None, 32, "triton"), ("NVIDIA H100 80GB HBM3", None, 64, "triton"),
    ("NVIDIA H100 80GB HBM3", None, 65, "model"), ("AMD Instinct MI300X", "6.4.0", 1, "model")])
def test_auto_takes_our_attention_where_it_was_measured_ahead(tiny_model_dir, monkeypatch, gpu, hip, rows,
                                                             expected) -> None:
    """Ours on the GPUs and batches where the bench measured it ahead of SDPA (an H200 at batches 1 to 8, file
    0034; an H100 at 32 to 64, 0057 and 0059), the model's elsewhere and on ROCm. The choice reads only the
    device's name and the build (no GPU is touched)."""
    from transformers import AutoModelForCausalLM

    from medqa_core.engine.decoding import decode_attention_choice

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    kind, why = decode_attention_choice(model, torch.device("cuda"), "auto", rows)
    assert kind == expected and why.startswith("auto: ")
    if hip is None:  # the reason names the batches measured on this card
        assert {"NVIDIA H200": "batches 1 to 8", "NVIDIA H100 80GB HBM3": "batches 32 to 64"}[gpu] in why


def test_under_pdl_it_waits_before_its_first_load_and_lets_the_next_kernel_start():
    # Compiled for sm_90a as launched on Hopper (PDL): everything it reads was written this step, so its
    # griddepcontrol.wait comes before any global load; the trigger for the next kernel (o_proj's, which loads its
    # first weights meanwhile) right after it, and every store after both.
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import triton; from triton.backends.compiler import GPUTarget; from triton.compiler import ASTSource; "
        "from medqa_core.engine.kernels.decode_attention import _decode_attention_kernel as k; "
        "names = list(k.arg_names); "
        "ptrs = dict(q_ptr='*bf16', k_ptr='*bf16', v_ptr='*bf16', mask_ptr='*u8', out_ptr='*bf16', "
        "partial_ptr='*fp32', stats_ptr='*fp32', counter_ptr='*i32'); "
        "consts = dict(GROUP=4, HEAD_DIM=128, BLOCK=64, SPLITS=4, MASK=1, PDL=True, EMULATE=False); "
        "sig = {n: ptrs.get(n, 'constexpr' if n in consts else 'fp32' if n == 'scale_log2' else 'i32') "
        "for n in names}; "
        "src = ASTSource(k, sig, {(names.index(c),): v for c, v in consts.items()}); "
        "ptx = triton.compile(src, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4)).asm['ptx']; "
        "lines = ptx.splitlines(); "
        "first = lambda pat: min(i for i, line in enumerate(lines) if pat in line); "
        "print(first('griddepcontrol.wait'), first('griddepcontrol.launch_dependents'), first('ld.global'), "
        "first('st.global'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wait, trigger, load, store = map(int, done.stdout.split()[-4:])
    assert wait < trigger < load < store
