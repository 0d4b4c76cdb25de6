"""Attention for one new token over a static KV cache, in Triton: split over the keys, grouped-query aware.

A decode step's query is one token a sequence; the keys and values are the whole static cache ([B, Hkv, L, D],
its unwritten positions masked). transformers' SDPA path then copies K and V once per query head of a group
(``repeat_kv``, since SDPA takes no mask with GQA on CUDA) and runs one program per head: at batch 1 about 16 us
a layer on an H100, about 0.5 ms of a 5 ms step (docs/decode.md). Here:

- each program takes one KV head of one sequence, all its query heads at once (the group, padded to the 16 rows a
  ``tl.dot`` needs), and one of ``splits`` near-equal ranges of the keys, so K and V are read once, in place, and
  the grid fills the GPU at batch 1;
- the keys' range is walked ``BLOCK_L`` at a time with the online softmax (running max and sum, float32), the
  scores and the weighted values by ``tl.dot`` with float32 sums, the weights rounded to the values' dtype for
  the second dot, as flash attention does;
- on Hopper, launched as a programmatic dependent (common.programmatic_launch): it waits for the kernels
  before it, then lets the next one (o_proj's) start loading its weights;
- the split ranges' partial results meet in a float32 buffer; the last of a group's programs to arrive (an
  acq_rel counter) combines them in split order 0, 1, ..., so the result does not depend on which finished last,
  and sets the counter back (one launch, no reduce kernel, no float32 atomics).

The mask is transformers': boolean (True attends) or additive float, [B, 1, 1 or q, L] with any strides.
Nothing assumes a warp width (the tiles are Python-chosen sizes), so the same source runs on ROCm's Triton; it has
not run on an AMD GPU here. Under Triton's interpreter (tests) the dots run in float32 on values rounded as on a
GPU, so the interpreter computes the GPU's numbers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from medqa_core.engine.kernels.common import (
    arrival_counters,
    dot_nt,
    interpreting,
    let_dependents_launch,
    programmatic_launch,
    round_to_dtype,
    wait_for_inputs,
)

BLOCK_L = 64  # keys an iteration
GROUP_ROWS = 16  # a group's query heads padded to a tl.dot's least M


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, partial_ptr, stats_ptr, counter_ptr,
                             kv_heads, length, chunk, scale_log2,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                             stride_mb, stride_ml, stride_ob, stride_oh,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                             SPLITS: tl.constexpr, MASK: tl.constexpr, PDL: tl.constexpr, EMULATE: tl.constexpr):
    # Program (b * kv_heads + h) * SPLITS + split: query heads h * GROUP .. of sequence b against keys
    # [split * chunk, (split + 1) * chunk) of KV head h. MASK: 0 none, 1 boolean (True attends), 2 additive.
    # PDL: everything it reads was written by the kernels before it (the cache this step), so it waits first; and
    # lets the next kernel launch at once (o_proj's NF4 kernel: its programs load their first weights meanwhile).
    wait_for_inputs(PDL)
    let_dependents_launch(PDL)
    pid = tl.program_id(0)
    split = pid % SPLITS
    bh = pid // SPLITS
    b = bh // kv_heads
    h = bh % kv_heads
    dtype = out_ptr.dtype.element_ty
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_g = tl.arange(0, 16)
    g_mask = offs_g < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)  # [16, D]
    m_i = tl.full((16,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((16,), dtype=tl.float32)
    acc = tl.zeros((16, HEAD_DIM), dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(length, lo + chunk)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for l0 in range(lo, hi, BLOCK):
        offs_l = l0 + tl.arange(0, BLOCK)
        l_mask = offs_l < hi
        k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=l_mask[:, None], other=0.0)
        s = dot_nt(q, k, tl.zeros((16, BLOCK), dtype=tl.float32), dtype, EMULATE) * scale_log2  # [16, L], log2
        valid = l_mask
        if MASK == 1:
            valid = valid & (tl.load(mask_ptr + b * stride_mb + offs_l * stride_ml, mask=l_mask, other=0) != 0)
        elif MASK == 2:
            # Clamped so that the dtype's min (transformers' "masked") stays finite in log2 units: a row with every
            # key masked then weighs them alike, as SDPA does with the same mask.
            bias = tl.load(mask_ptr + b * stride_mb + offs_l * stride_ml, mask=l_mask, other=0.0).to(tl.float32)
            s += tl.maximum(bias, -1.0e30)[None, :] * LOG2E
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp2(-inf - 0) = 0, never NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=l_mask[:, None], other=0.0)
        acc = dot_nt(round_to_dtype(p, dtype, EMULATE), tl.trans(v), acc * alpha[:, None], dtype, EMULATE)
        m_i = m_new
    out_rows = out_ptr + b * stride_ob + (h * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
    if SPLITS == 1:
        tl.store(out_rows, round_to_dtype(acc / l_i[:, None], dtype, EMULATE).to(dtype), mask=g_mask[:, None])
    else:
        # This split's unnormalized sum and its (max, sum) per query head, then the group's last program combines
        part = (bh * SPLITS + split) * 16 + offs_g  # [16]: rows of partial [groups * SPLITS * 16, D]
        tl.store(partial_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc)
        tl.store(stats_ptr + part * 2, m_i)
        tl.store(stats_ptr + part * 2 + 1, l_i)
        tl.debug_barrier()  # every lane's partial stored before the release below
        arrived = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            m_all = tl.full((16,), float("-inf"), dtype=tl.float32)
            for s_i in tl.static_range(SPLITS):
                m_all = tl.maximum(m_all, tl.load(stats_ptr + ((bh * SPLITS + s_i) * 16 + offs_g) * 2,
                                                  cache_modifier=".cg"))
            m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
            total = tl.zeros((16, HEAD_DIM), dtype=tl.float32)
            total_l = tl.zeros((16,), dtype=tl.float32)
            for s_i in tl.static_range(SPLITS):
                rows = (bh * SPLITS + s_i) * 16 + offs_g
                weight = tl.exp2(tl.load(stats_ptr + rows * 2, cache_modifier=".cg") - m_all_safe)
                total_l += weight * tl.load(stats_ptr + rows * 2 + 1, cache_modifier=".cg")
                total += weight[:, None] * tl.load(partial_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
                                                   cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + bh, 0, sem="relaxed", scope="gpu")
            tl.store(out_rows, round_to_dtype(total / total_l[:, None], dtype, EMULATE).to(dtype),
                     mask=g_mask[:, None])


def _splits(groups: int, length: int, device: torch.device) -> int:
    """Key ranges per group: enough programs for two per SM/CU where the keys allow (a range keeps at least
    ``BLOCK_L`` keys), at most 16."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, triton.cdiv(length, BLOCK_L), triton.cdiv(2 * sms, groups)))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None = None, splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v for one query token a sequence, grouped-query aware.

    Args:
        query: [B, Hq, 1, D] (bf16, fp16 or fp32); D a power of two, at least 16 (a tl.dot's least K).
        key, value: [B, Hkv, L, D], Hq a multiple of Hkv (up to 16 query heads a KV head), last dim contiguous.
        mask: None, or transformers' mask [B or 1, 1, 1, L]: boolean (True attends) or additive float.
        scaling: the scores' scale (None: 1 / sqrt(D)).
        splits: key ranges per group (None: enough to fill the GPU).

    Returns:
        [B, Hq, 1, D] in the query's dtype. A row whose keys are all masked gives NaN, as SDPA does.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if (q_len != 1 or q_heads % kv_heads or q_heads // kv_heads > GROUP_ROWS or head_dim < 16
            or head_dim & (head_dim - 1)):
        raise ValueError(f"decode_attention: one query token and up to {GROUP_ROWS} query heads a KV head with a "
                         f"power-of-two head size of 16 or more, got query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("decode_attention: key and value need a contiguous last dimension")
    if mask is not None and mask.shape[-1] != length:
        raise ValueError(f"decode_attention: the mask covers {mask.shape[-1]} keys, the cache holds {length}")
    q = query[:, :, 0]  # [B, Hq, D]
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(batch, q_heads, head_dim, device=query.device, dtype=query.dtype)
    groups = batch * kv_heads
    splits = splits or _splits(groups, length, query.device)
    splits = max(1, min(splits, triton.cdiv(length, BLOCK_L)))
    chunk = triton.cdiv(triton.cdiv(length, splits), BLOCK_L) * BLOCK_L  # whole key blocks a range
    splits = triton.cdiv(length, chunk)
    partial = torch.empty(groups * splits * GROUP_ROWS, head_dim, device=query.device, dtype=torch.float32) \
        if splits > 1 else out
    stats = torch.empty(groups * splits * GROUP_ROWS * 2, device=query.device, dtype=torch.float32) \
        if splits > 1 else out
    counters = arrival_counters(query.device, "attention", groups) if splits > 1 else out
    if mask is None:
        mask_kind, mask_arg, stride_mb, stride_ml = 0, out, 0, 0
    else:
        m = mask[:, 0, -1]  # [B or 1, L]: the last query row (the only one)
        mask_kind = 1 if m.dtype == torch.bool else 2
        mask_arg = m.view(torch.uint8) if m.dtype == torch.bool else m
        stride_mb = m.stride(0) if m.shape[0] > 1 else 0
        stride_ml = m.stride(1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    pdl = programmatic_launch(query.device)
    _decode_attention_kernel[(groups * splits,)](
        q, key, value, mask_arg, out, partial, stats, counters, kv_heads, length, chunk, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1),
        value.stride(2), stride_mb, stride_ml, out.stride(0), out.stride(1),
        GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, BLOCK=BLOCK_L, SPLITS=splits, MASK=mask_kind, PDL=pdl,
        EMULATE=interpreting(), num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return out.unsqueeze(2)
