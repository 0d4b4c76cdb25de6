"""Our Triton NF4 kernels against bitsandbytes and a plain PyTorch reference, under Triton's CPU interpreter.

The tolerance: the kernel dequantizes each weight exactly as bitsandbytes does (float32 ``code * absmax``, rounded
to the compute dtype) and accumulates in float32, so it differs from ``x.float() @ W_bnb.float().T`` only in the
order of float32 sums: every output is within one unit in the last place (ulp) of the output dtype of that
reference. float16 keeps three more bits than bfloat16, so where a row's sum cancels, that order term can pass a
float16 ulp: its tests add float32's bound for K sums in any order (K * 2**-24 * sum|x*w|). tests/conftest.py turns the
interpreter on where no GPU is present; on a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

pytest.importorskip("triton", reason="triton is a test extra: pip install -e '.[test]'")

import bitsandbytes as bnb  # noqa: E402
from bitsandbytes.functional import dequantize_4bit, quantize_4bit  # noqa: E402

from medqa_core.engine.kernels.common import interpreting  # noqa: E402
from medqa_core.engine.kernels.nf4_matmul import nf4_matmul  # noqa: E402
from medqa_core.engine.kernels.nf4_tiles import TileConfig  # noqa: E402
from medqa_core.engine.kernels.nf4_weight import nf4_weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _quantized(n: int, k: int, blocksize: int, double_quant: bool, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    packed, state = quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    param = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
    return param, state


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # the inputs drawn with torch.randn are the same in any test order


def _within_float32_sums(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """|out - ref| within one ulp of out's dtype plus float32's bound for the K-term sums in another order."""
    ulp = torch.where(ref.abs() > 0, torch.exp2(torch.floor(torch.log2(ref.abs()))), torch.ones_like(ref))
    bound = ulp * torch.finfo(out.dtype).eps + x.shape[-1] * 2.0**-24 * (x.float().abs() @ w.float().abs().T)
    return bool(((out.float() - ref).abs() <= bound).all())


def _plain_dequantize(param, state) -> torch.Tensor:
    """bitsandbytes' NF4 format decoded with nothing but PyTorch (no bitsandbytes call)."""
    n, k = state.shape
    byte = param.data.view(torch.uint8).reshape(-1).long()
    codes = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1)[: n * k]  # element 2i: high nibble
    absmax = state.absmax.float()
    if state.nested:
        inner = state.state2
        idx = torch.arange(absmax.numel(), device=absmax.device) // inner.blocksize
        absmax = inner.code.float()[state.absmax.long()] * inner.absmax.float()[idx] + state.offset
    block = torch.arange(n * k, device=absmax.device) // state.blocksize
    return (state.code.float()[codes] * absmax[block]).reshape(n, k).to(state.dtype)


def _ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| in units of the last place of ``out``'s dtype at each reference value."""
    ref = ref.float()
    eps = torch.finfo(out.dtype).eps
    ulp = torch.where(ref.abs() > 0, torch.exp2(torch.floor(torch.log2(ref.abs()))) * eps, torch.full_like(ref, eps))
    return ((out.float() - ref).abs() / ulp).max().item()


SHAPES = [  # (N, K, blocksize): aligned, a block larger than a tile's, blocks straddling rows, odd K and N
    (64, 128, 64), (48, 256, 128), (32, 512, 256), (40, 96, 64), (33, 70, 64), (7, 9, 32)]


@pytest.mark.parametrize(("n", "k", "blocksize"), SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 17])
def test_nf4_matmul_matches_bitsandbytes_dequantize_and_matmul(n, k, blocksize, double_quant, rows) -> None:
    param, state = _quantized(n, k, blocksize, double_quant)
    weight = _plain_dequantize(param, state)  # [N, K]
    if k % blocksize == 0 or DEVICE == "cuda":
        # bitsandbytes 0.50.2's CPU dequantize blocks each row on its own where K is even but not a multiple of
        # the block, while its quantize blocks the flat weight (as CUDA does both): there it does not give back
        # the weights it quantized, so the plain decoder, which does, is the reference.
        torch.testing.assert_close(weight, dequantize_4bit(param.data, state), rtol=0, atol=0)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).bfloat16().to(DEVICE)
    ref = x.float() @ weight.float().T
    out = nf4_matmul(x, nf4_weight(param))
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    assert _ulps(out, ref) <= 1.0


MODE_CONFIGS = [  # every inner loop with and without prefetch and the shared code table, split_k 1-3 (3 over
    # 4-5 iterations: uneven ranges), tiles wider than N
    TileConfig(8, 16, 64, 1, 1, 1, "mma"), TileConfig(8, 32, 64, 2, 1, 3, "mma", prefetch=True),
    TileConfig(8, 64, 64, 2, 1, 2, "mma", prefetch=True),  # two 16-row tiles a warp (v9)
    TileConfig(1, 16, 64, 1, 1, 1, "gemv"),
    TileConfig(1, 32, 512, 1, 1, 3, "gemv", prefetch=True),  # 64 words an iteration: two a lane where it fits
    TileConfig(1, 16, 128, 1, 1, 3, "fma", prefetch=True, shared_table=True),
    TileConfig(4, 16, 64, 1, 1, 3, "fma", shared_table=True), TileConfig(8, 8, 128, 1, 1, 2, "fma", prefetch=True),
    TileConfig(16, 16, 64, 1, 1, 1, "dot"), TileConfig(16, 32, 128, 1, 1, 3, "dot", prefetch=True),
    TileConfig(16, 64, 64, 1, 1, 2, "dot_swap", shared_table=True),
    TileConfig(16, 16, 128, 1, 1, 3, "dot_swap", prefetch=True),
    # 3 stages with the shared table: Triton pipelines the loop on a GPU (the interpreter runs it as written)
    TileConfig(1, 16, 128, 1, 3, 2, "fma", shared_table=True),
    TileConfig(16, 32, 64, 1, 3, 3, "dot", shared_table=True)]
# (N, K, blocksize): 5 blocks a row (no split divides them), a block wider than block_k, not aligned; the fast subset
# keeps the first (~1 min less)
SPLIT_SHAPES = [(24, 320, 64), (20, 512, 256), (40, 96, 64), (33, 70, 64)]


QUANT_LORA = [(False, True), (True, False)]  # (double quantization, LoRA): each alone


def _mode_cases():
    """Every config on every shape, each with double quantization and with LoRA. Under the interpreter, which is
    slow: the pipelined configs on the first shape only (it runs a loop as written, whatever its stages, so they
    are their unpipelined twins' code there), and on the other shapes one of the two variants, in turn."""
    for config in MODE_CONFIGS:
        name = (f"{config.kernel_mode}-m{config.block_m}-n{config.block_n}-k{config.block_k}-s{config.split_k}"
                f"-st{config.num_stages}{'-prefetch' if config.prefetch else ''}"
                f"{'-shared' if config.shared_table else ''}")
        for i, shape in enumerate(SPLIT_SHAPES):
            if i and config.num_stages >= 3 and DEVICE == "cpu":
                continue
            if config.kernel_mode == "mma" and shape[1] % config.block_k:
                continue  # refused (test_the_mma_mode_refuses_what_it_cannot_run)
            variants = QUANT_LORA if i == 0 or DEVICE != "cpu" else [QUANT_LORA[i % 2]]
            for double_quant, lora in variants:
                yield pytest.param(config, *shape, double_quant, lora, marks=[pytest.mark.slow] if i else [],
                                   id=f"{name}-{'-'.join(map(str, shape))}-{'dq' if double_quant else 'lora'}")


@pytest.mark.parametrize(("config", "n", "k", "blocksize", "double_quant", "lora"), list(_mode_cases()))
def test_every_mode_and_split_matches_the_references(config, n, k, blocksize, double_quant, lora) -> None:
    param, state = _quantized(n, k, blocksize, double_quant)
    weight = _plain_dequantize(param, state).float()  # [N, K]
    if k % blocksize == 0:
        torch.testing.assert_close(weight, dequantize_4bit(param.data, state).float(), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(4)
    rank, scaling = 4, 2.0
    a = (torch.randn(rank, k, generator=gen) * 0.1).bfloat16().to(DEVICE)
    b = (torch.randn(n, rank, generator=gen) * 0.1).bfloat16().to(DEVICE)
    bias = torch.randn(n, generator=gen).bfloat16().to(DEVICE)
    for rows in (1, 17):  # one row; and 17, a partial last tile for every block_m (4, 8, 16)
        x = torch.randn(rows, k, generator=gen).bfloat16().to(DEVICE)
        ref = x.float() @ weight.T
        if lora:
            out = nf4_matmul(x, nf4_weight(param), bias=bias, lora_a=a, lora_b=b, scaling=scaling, config=config)
            ref = ref + bias.float() + (scaling * (x.float() @ a.float().T)).bfloat16().float() @ b.float().T
        else:
            out = nf4_matmul(x, nf4_weight(param), config=config)
        assert out.shape == (rows, n)
        assert _ulps(out, ref) <= 1.0, f"rows {rows}"


SIBLING_CONFIGS = [  # split-K where K (128) has iterations to split, and tiles that end inside a segment (rows
    # 40, 24, 16)
    TileConfig(8, 16, 64, 1, 1, 2, "mma", prefetch=True), TileConfig(8, 32, 64, 1, 1, 2, "mma"),
    TileConfig(1, 8, 64, 2, 1, 2, "gemv", prefetch=True), TileConfig(4, 16, 64, 1, 1, 2, "fma"),
    TileConfig(16, 16, 128, 1, 1, 2, "dot", shared_table=True)]


@pytest.mark.parametrize(("config", "double_quant"), [(c, i % 2 == 1) for i, c in enumerate(SIBLING_CONFIGS)],
                         ids=[f"{c.kernel_mode}-n{c.block_n}-s{c.split_k}" for c in SIBLING_CONFIGS])
def test_siblings_in_one_launch_give_each_launch_alones_bits(config, double_quant) -> None:
    # q/k/v-like siblings (40, 24 and 16 rows of one K) in one launch, each with its own LoRA scaling: every output
    # is bitwise what the weight's own launch with the same tile writes, LoRA and bias included.
    k, rank, scalings = 128, 4, (2.0, 0.5, 1.0)
    params = [_quantized(n, k, 64, double_quant, seed=i)[0] for i, n in enumerate((40, 24, 16))]
    weights = [nf4_weight(p) for p in params]
    gen = torch.Generator().manual_seed(6)
    a = [(torch.randn(rank, k, generator=gen) * 0.1).bfloat16().to(DEVICE) for _ in weights]
    b = [(torch.randn(w.out_features, rank, generator=gen) * 0.1).bfloat16().to(DEVICE) for w in weights]
    bias = [torch.randn(w.out_features, generator=gen).bfloat16().to(DEVICE) for w in weights]
    for rows in (9,) if config.block_n == 32 else (1,) if config.kernel_mode in ("mma", "gemv") else (3,):
        x = torch.randn(rows, k, generator=gen).bfloat16().to(DEVICE)
        alone = torch.cat([nf4_matmul(x, w, bias=c, lora_a=a_, lora_b=b_, scaling=s, config=config)
                           for w, c, a_, b_, s in zip(weights, bias, a, b, scalings, strict=True)], dim=1)
        together = nf4_matmul(x, weights, bias=torch.cat(bias), lora_a=torch.cat(a), lora_b=torch.cat(b),
                              scaling=scalings, config=config)
        assert torch.equal(together, alone), f"rows {rows}"
        two = nf4_matmul(x, weights[:2], config=config)  # two siblings, no LoRA: gate/up
        assert torch.equal(two, torch.cat([nf4_matmul(x, w, config=config) for w in weights[:2]], dim=1))


def test_siblings_one_launch_cannot_take_are_refused_by_name() -> None:
    x = torch.randn(1, 256).bfloat16().to(DEVICE)
    w256, w128 = nf4_weight(_quantized(16, 256, 64, False)[0]), nf4_weight(_quantized(16, 128, 64, False)[0])
    with pytest.raises(ValueError, match="their K, block sizes or double quantization differ"):
        nf4_matmul(x, [w256, w128])
    with pytest.raises(ValueError, match="4 weights: one launch takes 1 to 3"):
        nf4_matmul(x, [w256] * 4)
    with pytest.raises(ValueError, match="2 weights need 2 LoRA scalings, got 3"):
        nf4_matmul(x, [w256] * 2, scaling=(1.0, 1.0, 1.0))


@pytest.mark.parametrize(("tile", "double_quant", "lookup"), [
    (TileConfig(8, 16, 128, 1, 1, 2, "mma", prefetch=True), True, "split"),  # one 16-row tile a warp, split K
    (TileConfig(8, 64, 64, 2, 1, 1, "mma"), False, "prmt")],  # two tiles a warp, 2 warps, no prefetch
    ids=["one-tile-dq-split", "two-tiles-prmt"])
def test_byte_permute_lookups_decode_every_weight_to_the_same_bits(tile, double_quant, lookup) -> None:
    # v11 ("split"): rows g + 8 from byte permutes on each block's table of rounded weights, rows g by shfl; v12
    # ("prmt"): every row by permutes. The weights are bitsandbytes' either way, and so is every output bit (48
    # rows: a partial tile; 256 columns: 4 blocks a row).
    param, state = _quantized(48, 256, 64, double_quant)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(7)).bfloat16().to(DEVICE)
    permuted = TileConfig(**{**tile.__dict__, "lookup": lookup})
    out = nf4_matmul(x, nf4_weight(param), config=permuted)
    assert torch.equal(out, nf4_matmul(x, nf4_weight(param), config=tile))
    assert _ulps(out, x.float() @ _plain_dequantize(param, state).float().T) <= 1.0


@pytest.mark.parametrize(("tile", "n", "k", "blocksize", "double_quant", "rows"), [
    # 128 columns an iteration (a group of 4 blocks is 2 iterations), split K: 3 groups in 2 ranges
    (TileConfig(8, 16, 128, 1, 1, 2, "mma", prefetch=True), 24, 768, 64, True, 3),
    # two tiles a warp, permutes, no prefetch: 5 blocks a row, so the second group is 1 block and 3 clamped
    (TileConfig(8, 64, 64, 2, 1, 1, "mma", lookup="prmt"), 40, 320, 64, False, 2),
    # block scale over two blocks an iteration: two scales a row an iteration, each from its own lane
    (TileConfig(8, 16, 128, 1, 1, 2, "mma", prefetch=True, lookup="prmt", block_scale=True), 16, 512, 64, True, 1),
    # blocksize 128 at 64 columns an iteration: 8 iterations a group, the row shorter than one
    (TileConfig(8, 32, 64, 1, 1, 1, "mma", prefetch=True), 24, 384, 128, True, 5)],
    ids=["k128-split-dq", "two-tiles-prmt-partial-group", "block-scale-two-blocks", "blocksize128"])
def test_scales_a_group_ahead_give_the_same_bits(tile, n, k, blocksize, double_quant, rows) -> None:
    # v13: a row's four lanes load 4 blocks' scales once, one each, and every iteration takes its block's by a
    # shuffle. The same float32 scales reach the same instructions: every output bit is the v12 tile's.
    param, _ = _quantized(n, k, blocksize, double_quant)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(7)).bfloat16().to(DEVICE)
    ahead = TileConfig(**{**tile.__dict__, "scales_ahead": True})
    assert torch.equal(nf4_matmul(x, nf4_weight(param), config=ahead), nf4_matmul(x, nf4_weight(param), config=tile))


@pytest.mark.parametrize(("tile", "n", "k", "double_quant", "lora", "rows"), [
    # one tile a warp, prefetch, the scales a group ahead (a group is one iteration here), 3 iterations in 2 ranges
    (TileConfig(8, 16, 256, 1, 1, 2, "mma", prefetch=True, scales_ahead=True), 24, 768, True, True, 3),
    # two tiles a warp, two blocks of 8 x rows a program (v18), the scales loaded with the words, rows past N
    (TileConfig(16, 32, 256, 1, 1, 1, "mma"), 40, 512, False, False, 13)],
    ids=["prefetch-ahead-split-dq-lora", "two-tiles-x-blocks"])
def test_256_columns_an_iteration_give_bitsandbytes_within_its_tolerance(tile, n, k, double_quant, lora,
                                                                          rows) -> None:
    # v21: a lane reads one whole quantization block (64 columns, 8 words) of each of its rows an iteration, and
    # the 8 x words of those columns (until v21 a lane took at most 4 x words: wider tiles summed the wrong x).
    param, state = _quantized(n, k, 64, double_quant)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(rows, k, generator=gen).bfloat16().to(DEVICE)
    ref = x.float() @ _plain_dequantize(param, state).float().T
    if lora:
        a = (torch.randn(4, k, generator=gen) * 0.1).bfloat16().to(DEVICE)
        b = (torch.randn(n, 4, generator=gen) * 0.1).bfloat16().to(DEVICE)
        out = nf4_matmul(x, nf4_weight(param), lora_a=a, lora_b=b, scaling=2.0, config=tile)
        ref = ref + (2.0 * (x.float() @ a.float().T)).bfloat16().float() @ b.float().T
    else:
        out = nf4_matmul(x, nf4_weight(param), config=tile)
    assert _ulps(out, ref) <= 1.0


@pytest.mark.parametrize(("tile", "n", "k", "double_quant", "lora", "rows"), [
    # prefetch, scales a group ahead, split K over 3 groups, LoRA, rows past the last 16-row tile
    (TileConfig(8, 16, 128, 1, 1, 2, "mma", prefetch=True, scales_ahead=True), 40, 1536, True, True, 3),
    # block scale over two blocks an iteration (a lane's words in both), two tiles a warp, scales with the words
    (TileConfig(8, 64, 128, 2, 1, 1, "mma", lookup="prmt", block_scale=True), 72, 512, False, False, 5),
    # 256 columns (8 words a row, two loads a row), two blocks of 8 x rows (two warps: one warp of two 16-row
    # tiles at 256 columns took ptxas minutes, and two tiles a warp is the case above); 32 columns (one word a row)
    (TileConfig(16, 32, 256, 2, 1, 1, "mma", prefetch=True), 32, 512, True, False, 11),
    (TileConfig(8, 16, 32, 1, 1, 3, "mma", scales_ahead=True), 24, 256, True, True, 2),
    # two tiles a warp, the second wholly past N (48): its lanes' rows clamp to row 47, of the h half, and read
    # words of the last tile (one base a lane: row g + 8's words after row g's)
    (TileConfig(8, 32, 128, 1, 1, 1, "mma"), 48, 512, True, False, 2)],
    ids=["k128-ahead-split-dq-lora", "block-scale-two-tiles", "k256-x-blocks", "k32-one-word", "tile-past-n"])
def test_tiled_copies_give_bitsandbytes_orders_bits(tile, n, k, double_quant, lora, rows) -> None:
    # v22: the words and absmax copied into the tile's read order are a permutation of bitsandbytes' (nothing
    # decoded), and a launch that reads them gives every bit the launch over bitsandbytes' order gives. With
    # bitsandbytes' copy zeroed the output stays: the launch read the tiled one.
    import dataclasses

    from medqa_core.engine.kernels.nf4_weight import tile_nf4

    param, _ = _quantized(n, k, 64, double_quant)
    weight = nf4_weight(param)
    tiled = tile_nf4(weight, tile)
    assert tiled.tiled is not None and (tiled.tiled.block_k, tiled.tiled.parts) == (
        tile.block_k, 2 if tile.block_scale and tile.block_k > 64 else 1)
    # where each word and absmax lies, by the kernel's formula (nf4_mma._tiled_word, _scale_of)
    wl, parts = tile.block_k // 32, tiled.tiled.parts
    wp = wl // parts
    row, word = torch.meshgrid(torch.arange(n), torch.arange(k // 8), indexing="ij")
    it, u = word // (4 * wl), word % (4 * wl)  # u: the word within its iteration = (part, lane column, j)
    lane_col, i = (u % (4 * wp)) // wp, (u // (4 * wp)) * wp + u % wp
    at = (((row // 16) * (k // tile.block_k) + it) * 32 + (row % 8) * 4 + lane_col) * (2 * wl) + (row // 8) % 2 * wl + i
    words = tiled.tiled.packed.view(torch.int32).cpu()
    assert torch.equal(words[at.reshape(-1)], weight.packed.view(torch.int32).cpu())
    assert words.numel() == 16 * -(-n // 16) * k // 8  # rows padded to whole 16-row tiles
    row, block = torch.meshgrid(torch.arange(n), torch.arange(k // 64), indexing="ij")
    at = (row // 16) * (k // 64 * 16) + block * 16 + row % 16
    assert torch.equal(tiled.tiled.absmax.cpu()[at.reshape(-1)], weight.absmax.cpu())
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(rows, k, generator=gen).bfloat16().to(DEVICE)
    kwargs = {}
    if lora:
        kwargs = dict(lora_a=(torch.randn(4, k, generator=gen) * 0.1).bfloat16().to(DEVICE),
                      lora_b=(torch.randn(n, 4, generator=gen) * 0.1).bfloat16().to(DEVICE), scaling=2.0)
    expected = nf4_matmul(x, weight, config=tile, **kwargs)
    blanked = dataclasses.replace(tiled, packed=torch.zeros_like(weight.packed), absmax=torch.zeros_like(weight.absmax))
    assert torch.equal(nf4_matmul(x, blanked, config=tile, **kwargs), expected)
    # a tile of another order reads bitsandbytes' copy: the zeroed one here
    other = TileConfig(**{**tile.__dict__, "block_k": 64})
    zeroed = dataclasses.replace(blanked, tiled=None)
    assert torch.equal(nf4_matmul(x, blanked, config=other), nf4_matmul(x, zeroed, config=other))


@pytest.mark.parametrize(("tile", "double_quant", "dtype"), [
    # 128 columns an iteration: two blocks, each one's MMAs scaled; 32: part of one block
    (TileConfig(8, 16, 128, 1, 1, 2, "mma", prefetch=True, lookup="prmt", block_scale=True), True, torch.bfloat16),
    (TileConfig(8, 64, 32, 2, 1, 1, "mma", block_scale=True), False, torch.float16)],
    ids=["prmt-two-blocks-dq-bf16", "shfl-two-tiles-fp16"])
def test_block_scale_is_bitsandbytes_within_one_rounding_of_each_weight(tile, double_quant, dtype) -> None:
    # v12's block_scale: the MMAs take each level rounded to the dtype and scale a block's sums after them, where
    # bitsandbytes rounds level * absmax. Each weight then differs from bitsandbytes' by at most its two roundings
    # (eps relative), so the tolerance: half an ulp of the output (its own rounding) + eps * (|x| @ |W|^T). Measured
    # here (interpreter): at most 0.07 eps * (|x| @ |W|^T) past the half ulp, in both dtypes, double quant on and off.
    param, state = _quantized(48, 256, 64, double_quant, dtype=dtype)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    weight = _plain_dequantize(param, state).float()
    ref = x.float() @ weight.T
    out = nf4_matmul(x, nf4_weight(param), config=tile)
    eps = torch.finfo(dtype).eps
    half_ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30)))) * eps / 2
    assert ((out.float() - ref).abs() <= half_ulp + eps * (x.float().abs() @ weight.abs().T)).all()
    assert not torch.equal(out, nf4_matmul(x, nf4_weight(param), config=TileConfig(8, 16, 64, 1, 1, 2, "mma")))


def test_block_scale_over_more_than_two_blocks_an_iteration_is_refused_by_name() -> None:
    param, _ = _quantized(16, 256, 32, False)
    x = torch.randn(1, 256).bfloat16().to(DEVICE)
    with pytest.raises(ValueError, match="not block_k 128 of blocksize 32"):
        nf4_matmul(x, nf4_weight(param), config=TileConfig(8, 16, 128, 1, 1, 1, "mma", block_scale=True))


def test_split_k_reduces_in_a_fixed_order_and_leaves_its_counters_at_zero() -> None:
    from medqa_core.engine.kernels import common

    param, _ = _quantized(40, 512, 64, True)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(5)).bfloat16().to(DEVICE)
    config = TileConfig(4, 16, 64, 1, 1, 3, "fma")  # 3 tiles of N, 8 iterations in ranges of 2, 3, 3
    first = nf4_matmul(x, nf4_weight(param), config=config)
    counters = common.ARRIVAL_COUNTERS[(x.device, "split_k")]  # keyed by the tensor's device: cuda:0, not "cuda"
    assert counters.abs().sum().item() == 0  # each tile's last program reset its counter for the next call
    assert torch.equal(first, nf4_matmul(x, nf4_weight(param), config=config))
    # More splits than iterations: clamped, each program keeps at least one iteration.
    many = nf4_matmul(x, nf4_weight(param), config=TileConfig(4, 16, 64, 1, 1, 64, "fma"))
    assert _ulps(many, x.float() @ _plain_dequantize(param, _).float().T) <= 1.0


@pytest.mark.parametrize(("fields", "match"), [
    (dict(block_m=8, mode="dot"), "needs block_m and block_n >= 16"),
    (dict(block_m=16, block_n=8, mode="dot_swap"), "needs block_m and block_n >= 16"),
    (dict(block_k=96), "block_k=96: must be a power of two"),
    (dict(split_k=0), "split_k=0: must be at least 1"),
    (dict(mode="wmma"), "choose one of"),
    (dict(block_m=4, mode="gemv"), "one row of x a tile"),
    (dict(block_m=1, block_n=2, mode="gemv"), r"block_n \(2\) must be at least num_warps \(4\)"),
    # a lane reads up to 8 words of a row an iteration (v21; 4 until then, when a wider block_k summed wrong x)
    (dict(block_m=8, block_n=64, block_k=512, mode="mma"), "over block_k 32 to 256 columns, got 8 x 64 x 512"),
    (dict(mode="dot", lookup="prmt"), "are the mma mode's"),
    (dict(mode="fma", block_scale=True), "are the mma mode's"),
    (dict(mode="gemv", block_m=1, scales_ahead=True), "are the mma mode's"),
    (dict(block_m=8, block_n=16, num_warps=1, mode="mma", lookup="lut"), "lookup='lut': choose one of")])
def test_a_tile_that_cannot_run_is_refused(fields, match) -> None:
    base = dict(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match=match):
        TileConfig(**{**base, **fields})


def test_a_tile_without_a_mode_runs_what_it_ran_before_modes() -> None:
    # v2's tile tables carry neither split_k nor mode: one row (and any block_m under 16) was fma, 16 rows a dot.
    assert TileConfig(1, 8, 512, 2, 2).kernel_mode == "fma"
    assert TileConfig(16, 32, 256, 4, 2).kernel_mode == "dot"
    assert TileConfig(16, 32, 256, 4, 2).split_k == 1
    # what a decode record names: the mode, and how its lanes decode where not the default
    assert TileConfig(16, 32, 256, 4, 2).inner_loop == "dot"
    assert TileConfig(8, 16, 128, 1, 1, 1, "mma", lookup="prmt", block_scale=True).inner_loop == "mma prmt block-scale"
    assert TileConfig(8, 16, 128, 1, 1, 1, "mma", scales_ahead=True).inner_loop == "mma scales-ahead"
    assert TileConfig(32, 16, 64, 1, 1, 1, "mma", block_scale=True).inner_loop == "mma m32 block-scale"


@pytest.mark.parametrize("config", [TileConfig(1, 16, 64, 1, 1), TileConfig(1, 32, 64, 1, 1),
                                    TileConfig(16, 16, 64, 1, 1), TileConfig(16, 64, 32, 1, 1),
                                    TileConfig(1, 16, 64, 1, 1, 2, "fma"), TileConfig(8, 16, 64, 1, 1, 2, "fma"),
                                    TileConfig(16, 64, 64, 1, 1, 2, "dot_swap")])
def test_every_tile_shape_writes_every_output(config) -> None:
    # Odd N and rows that do not fill a tile: masked edges. torch.empty's garbage fails any unwritten output.
    n, k = 37, 192
    param, state = _quantized(n, k, 64, True)
    rows = 1 if config.block_m == 1 else 19
    x = torch.randn(rows, k).bfloat16().to(DEVICE)
    if config.block_m == 1:
        x = x[:1]
    out = nf4_matmul(x, nf4_weight(param), config=config)
    assert _ulps(out, x.float() @ _plain_dequantize(param, state).float().T) <= 1.0


@pytest.mark.parametrize("config", [None, TileConfig(4, 16, 64, 1, 1, 2, "fma"), TileConfig(16, 16, 64, 1, 1, 2, "dot"),
                                    TileConfig(16, 16, 128, 1, 1, 1, "dot_swap"),
                                    TileConfig(8, 16, 128, 1, 1, 2, "mma", prefetch=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_compute_dtypes(dtype, config) -> None:
    if config is not None and config.kernel_mode == "mma" and dtype == torch.float32:
        pytest.skip("the MMAs take bf16 or fp16: test_the_mma_mode_refuses_what_it_cannot_run")
    param, state = _quantized(48, 256, 64, True, dtype=dtype)
    x = torch.randn(3, 256).to(dtype).to(DEVICE)
    out = nf4_matmul(x, nf4_weight(param), config=config)
    w = dequantize_4bit(param.data, state).float()
    ref = x.float() @ w.T
    assert out.dtype == dtype
    if dtype == torch.float32:  # only the order of the sums differs: torch's float32 tolerance
        torch.testing.assert_close(out, ref)
    else:
        assert _within_float32_sums(out, ref, x, w)


def test_lora_programs_take_the_launchs_rows_and_at_most_four_loads_each() -> None:
    from medqa_core.engine.kernels.nf4_matmul import _lora_constexprs

    # one row on a 4-warp MMA tile (8 rows): one row a LoRA load of 1024 columns, chunks of 1024, one load each
    one = _lora_constexprs(16, 4096, 1, 8, 4)
    assert (one["LORA_BLOCK_M"], one["LORA_BLOCK_K"], one["LORA_SPLIT"]) == (1, 1024, 4)
    # 8 rows on a 1-warp tile: 64 columns a load, so chunks of 256 (4 loads), not 1024 (16)
    eight = _lora_constexprs(16, 4096, 8, 8, 1)
    assert (eight["LORA_BLOCK_M"], eight["LORA_BLOCK_K"], eight["LORA_SPLIT"]) == (8, 64, 16)


@pytest.mark.parametrize(("rows", "k", "rank", "config"), [
    (1, 128, 8, None), (6, 128, 8, None), (20, 128, 8, None),
    (1, 1408, 8, None), (6, 1408, 8, None), (20, 1408, 8, None),
    # the MMA tiles' LoRA is one more MMA a 16 ranks: 24 ranks are two, the second half padding; 9 rows, two row
    # tiles
    (1, 640, 24, TileConfig(8, 16, 128, 1, 1, 2, "mma", prefetch=True)),
    (9, 640, 24, TileConfig(8, 32, 128, 1, 1, 1, "mma"))], ids=str)
def test_lora_is_fused_into_the_same_output(rows, k, rank, config, monkeypatch) -> None:
    from medqa_core.engine.kernels import common
    from medqa_core.engine.kernels import nf4_matmul as kernels

    # LoRA's down-projection in one chunk of K; in 2; in 5, the last one shorter (chunks of 256 columns at least,
    # as profile_nf4_kernel.py --lora-min-chunk sets them: the default's 1024 would need K of 2048 and more, slow
    # under the interpreter)
    monkeypatch.setattr(kernels, "LORA_MIN_CHUNK", 256)
    assert kernels._lora_split(k, 1024) == {128: (1, 128), 640: (2, 320), 1408: (5, 282)}[k]
    n, scaling = 40, 2.0
    param, state = _quantized(n, k, 64, True)
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(rank, k, generator=gen) * 0.1).bfloat16().to(DEVICE)
    b = (torch.randn(n, rank, generator=gen) * 0.1).bfloat16().to(DEVICE)
    bias = torch.randn(n, generator=gen).bfloat16().to(DEVICE)
    x = torch.randn(rows, k, generator=gen).bfloat16().to(DEVICE)
    out = nf4_matmul(x, nf4_weight(param), bias=bias, lora_a=a, lora_b=b, scaling=scaling, config=config)
    # peft under autocast: the down-projection rounded to bf16, then up, scaled and added.
    t = (scaling * (x.float() @ a.float().T)).bfloat16().float()
    ref = x.float() @ dequantize_4bit(param.data, state).float().T + bias.float() + t @ b.float().T
    assert _ulps(out, ref) <= 1.0
    base_only = nf4_matmul(x, nf4_weight(param), bias=bias, config=config)
    assert (out.float() - base_only.float()).abs().max() > 0.01  # the adapter really contributed
    # One launch: its first rank x chunks programs computed t's partials, each rank's last summed them in chunk
    # order; its tiles waited for every rank and counted themselves; the last set the counters back (ranks done,
    # tiles finished, each rank's chunks), so the next call (a graph replay) starts from zero, with the same bits.
    assert common.ARRIVAL_COUNTERS[(x.device, "lora")][:2 + rank].tolist() == [0] * (2 + rank)
    assert torch.equal(out, nf4_matmul(x, nf4_weight(param), bias=bias, lora_a=a, lora_b=b, scaling=scaling,
                                       config=config))


@pytest.mark.parametrize(("n", "k", "blocksize", "dtype", "block_k", "match"), [
    (32, 256, 64, torch.float32, 64, "bf16 or fp16, not torch.float32"),
    (32, 192, 64, torch.bfloat16, 128, "K 192 is not a multiple of block_k 128"),
    (33, 70, 64, torch.bfloat16, 32, "not whole quantization blocks")])
def test_the_mma_mode_refuses_what_it_cannot_run(n, k, blocksize, dtype, block_k, match) -> None:
    param, state = _quantized(n, k, blocksize, False, dtype=dtype)
    x = torch.randn(1, k).to(dtype).to(DEVICE)
    with pytest.raises(ValueError, match=match):
        nf4_matmul(x, nf4_weight(param), config=TileConfig(8, 16, block_k, 1, 1, 1, "mma"))
    # without a config the call runs: on a GPU the default's MMA tile falls back to the portable modes there,
    # under the interpreter the defaults are those modes; exact either way
    ref = x.float() @ _plain_dequantize(param, state).float().T
    assert _within_float32_sums(nf4_matmul(x, nf4_weight(param)), ref, x, _plain_dequantize(param, state))


@pytest.mark.parametrize("config", [TileConfig(8, 16, 128, 1, 1, 1, "mma", prefetch=True),
                                    TileConfig(8, 32, 128, 1, 1, 1, "mma")], ids=str)  # one tile a warp, two
def test_the_mma_mode_is_exact_at_every_row_count(config) -> None:
    # x's rows are the MMA's 8 columns: 1 to 8 rows decode the weights once; 13 rows take two row tiles
    param, state = _quantized(40, 256, 64, True)
    weight = _plain_dequantize(param, state).float()
    x = torch.randn(13, 256).bfloat16().to(DEVICE)
    full = nf4_matmul(x, nf4_weight(param), config=config)
    assert _ulps(full, x.float() @ weight.T) <= 1.0
    for rows in (1, 3, 8):
        assert _ulps(nf4_matmul(x[:rows], nf4_weight(param), config=config), x[:rows].float() @ weight.T) <= 1.0


@pytest.mark.parametrize(("tile", "rows", "rank"), [
    (TileConfig(16, 16, 128, 1, 1, 2, "mma", prefetch=True, scales_ahead=True), 13, 4),  # split K, LoRA
    (TileConfig(32, 64, 64, 2, 1, 1, "mma", block_scale=True), 37, 0),  # two tiles a warp, block scale
    (TileConfig(64, 32, 64, 1, 1, 2, "mma", prefetch=True, block_scale=True, scales_ahead=True), 21, 16)],
    ids=["m16-split-lora", "m32-two-tiles-block-scale", "m64-block-scale-ahead-lora"])
def test_x_blocks_of_one_program_give_the_8_row_tiles_bits(tile, rows, rank) -> None:
    # v18: a program of 16 to 64 x rows decodes each weight once for its blocks of 8; each block's MMAs are those
    # of an 8-row program, in the same order, so every output bit is the 8-row tile's (LoRA, split K, rows that
    # end inside a block and past the last).
    import dataclasses

    param, state = _quantized(40, 256, 64, True)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(rows, 256, generator=gen).bfloat16().to(DEVICE)
    lora = {}
    if rank:
        lora = dict(lora_a=(torch.randn(rank, 256, generator=gen) * 0.1).bfloat16().to(DEVICE),
                    lora_b=(torch.randn(40, rank, generator=gen) * 0.1).bfloat16().to(DEVICE), scaling=2.0)
    out = nf4_matmul(x, nf4_weight(param), config=tile, **lora)
    eight = nf4_matmul(x, nf4_weight(param), config=dataclasses.replace(tile, block_m=8), **lora)
    assert torch.equal(out, eight)
    if not rank and not tile.block_scale:
        assert _ulps(out, x.float() @ _plain_dequantize(param, state).float().T) <= 1.0


@pytest.mark.parametrize("tile", [TileConfig(8, 64, 128, 2, 1, 4, "mma", prefetch=True, block_scale=True,
                                             scales_ahead=True),
                                  TileConfig(1, 16, 256, 1, 1, 2, "gemv", prefetch=True)], ids=["mma", "gemv"])
def test_a_register_cap_gives_the_same_bits_and_is_the_compiled_kernels(tile) -> None:
    # v19: max_registers is ptxas' maxnreg (more warps an SM, the rest spilled): the same instructions in the same
    # order, so the same bits (LoRA, split K). On an NVIDIA GPU the launch's compiled kernel holds the cap.
    import dataclasses

    param, _ = _quantized(128, 256, 64, True)
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(tile.block_m, 256, generator=gen).bfloat16().to(DEVICE)
    lora = dict(lora_a=(torch.randn(16, 256, generator=gen) * 0.1).bfloat16().to(DEVICE),
                lora_b=(torch.randn(128, 16, generator=gen) * 0.1).bfloat16().to(DEVICE), scaling=2.0)
    if tile.kernel_mode == "mma" and DEVICE == "cpu":
        pytest.skip("the MMA mode's inline PTX runs on NVIDIA GPUs only")
    capped = dataclasses.replace(tile, max_registers=40)
    assert torch.equal(nf4_matmul(x, nf4_weight(param), config=capped, **lora),
                       nf4_matmul(x, nf4_weight(param), config=tile, **lora))
    if DEVICE == "cuda" and not torch.version.hip:
        from medqa_core.engine.kernels.nf4_matmul import _nf4_matmul_kernel

        compiled = [k for cache in _nf4_matmul_kernel.device_caches.values() for k in cache[0].values()]
        caps = [k for k in compiled if getattr(k.metadata, "maxnreg", None) == 40]
        assert caps and all(0 < k.n_regs <= 40 for k in caps)


def test_a_register_cap_is_named_and_must_be_one_ptxas_takes() -> None:
    tile = TileConfig(8, 64, 128, 2, 1, 4, "mma", block_scale=True, scales_ahead=True, max_registers=96)
    assert tile.inner_loop == "mma block-scale scales-ahead maxnreg96"
    for cap in (16, 256):
        with pytest.raises(ValueError, match=f"max_registers={cap}: ptxas takes 24 to 255"):
            TileConfig(8, 64, 128, 2, 1, 4, "mma", max_registers=cap)


@pytest.mark.parametrize("tile", [TileConfig(1, 16, 256, 1, 1, 2, "gemv", prefetch=True),
                                  TileConfig(4, 16, 64, 2, 1, 2, "fma"),
                                  TileConfig(8, 32, 128, 1, 1, 2, "mma", prefetch=True, scales_ahead=True)],
                         ids=["gemv", "fma", "mma"])
def test_block_scales_decoded_at_load_are_bitsandbytes_own_and_give_the_nested_paths_bits(tile) -> None:
    # v20's A/B (MEDQA_NF4_SCALES=float32): the double-quantized absmax decoded once into float32, as bitsandbytes
    # decodes it (a multiply, then an add); the launch then reads one scale a block. The same multiply and add as
    # the loop's, so the same bits (under the interpreter; a GPU's compiler may fuse the loop's into one FMA).
    from bitsandbytes.functional import dequantize_blockwise

    from medqa_core.engine.kernels.nf4_weight import float32_scales

    if tile.kernel_mode == "mma" and DEVICE == "cpu":
        pytest.skip("the MMA mode's inline PTX runs on NVIDIA GPUs only")
    param, state = _quantized(48, 512, 64, True)
    nested = nf4_weight(param)
    decoded = float32_scales(nested)
    assert not decoded.double_quant and decoded.absmax.dtype == torch.float32
    assert torch.equal(decoded.absmax, dequantize_blockwise(state.absmax, state.state2) + state.offset)
    assert float32_scales(decoded) is decoded  # nothing left to decode
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(tile.block_m, 512, generator=gen).bfloat16().to(DEVICE)
    lora = dict(lora_a=(torch.randn(8, 512, generator=gen) * 0.1).bfloat16().to(DEVICE),
                lora_b=(torch.randn(48, 8, generator=gen) * 0.1).bfloat16().to(DEVICE), scaling=2.0)
    ours = nf4_matmul(x, decoded, config=tile, **lora)
    if DEVICE == "cpu":
        assert torch.equal(ours, nf4_matmul(x, nested, config=tile, **lora))
    plain = nf4_matmul(x, decoded, config=tile)
    assert _ulps(plain, x.float() @ _plain_dequantize(param, state).float().T) <= 1.0


def test_the_scale_layout_switch_takes_two_values_and_names_a_third(monkeypatch) -> None:
    from medqa_core.engine.decoding import nf4_scales_line
    from medqa_core.engine.kernels.nf4_weight import scale_layout

    monkeypatch.delenv("MEDQA_NF4_SCALES", raising=False)
    assert scale_layout() == "nested" and nf4_scales_line().startswith("nested: ")
    monkeypatch.setenv("MEDQA_NF4_SCALES", "float32")
    assert scale_layout() == "float32" and nf4_scales_line().startswith("float32: ")
    monkeypatch.setenv("MEDQA_NF4_SCALES", "fp8")
    with pytest.raises(ValueError, match="MEDQA_NF4_SCALES='fp8': choose one of nested, float32"):
        scale_layout()


def test_the_mma_mode_takes_x_in_blocks_of_8_up_to_64_rows_a_program() -> None:
    with pytest.raises(ValueError, match=r"8 to 64 rows of x \(block_m \(8, 16, 32, 64\)\)"):
        TileConfig(128, 16, 128, 1, 1, 1, "mma")


def test_packed_bytes_at_an_address_the_gemv_cannot_read_as_words_take_the_any_shape_path() -> None:
    import dataclasses

    param, state = _quantized(32, 256, 64, True)
    weight = nf4_weight(param)
    assert weight.aligned
    shifted = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:]  # one byte off 4
    shifted.copy_(weight.packed)
    odd = dataclasses.replace(weight, packed=shifted)
    assert not odd.aligned  # int32 words would be misaligned there
    x = torch.randn(1, 256).bfloat16().to(DEVICE)
    ref = x.float() @ _plain_dequantize(param, state).float().T
    gemv = TileConfig(1, 16, 256, 1, 1, 2, "gemv", prefetch=True)
    assert _ulps(nf4_matmul(x, odd, config=gemv), ref) <= 1.0
    assert torch.equal(nf4_matmul(x, odd, config=gemv), nf4_matmul(x, odd, config=gemv))


def test_a_non_nf4_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="not an NF4"):
        nf4_weight(torch.nn.Parameter(torch.zeros(4, 4)))


# ---- the decode path --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapted_4bit_model(tiny_model_dir):
    """The tiny Mistral in NF4 with a LoRA adapter whose B is not zero (peft starts B at 0: no contribution)."""
    from medqa_core.engine.config import LoraSettings, ModelConfig
    from medqa_core.engine.model import add_lora, load_base_model

    base = load_base_model(tiny_model_dir, ModelConfig(path=str(tiny_model_dir)), torch.device(DEVICE), "sdpa",
                           torch.bfloat16)
    torch.manual_seed(0)
    model = add_lora(base, LoraSettings(rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def _decode(model, kernel: str, ids: torch.Tensor, new: int):
    from medqa_core.engine.decoding import StaticDecoder

    torch._dynamo.reset()
    decoder = StaticDecoder(model, batch=ids.shape[0], max_len=ids.shape[1] + new, use_graph=DEVICE == "cuda",
                            nf4_kernel=kernel)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        tokens = decoder.generate(ids, new)
    return tokens, decoder.setup


# batch 1 (mode gemv under the interpreter, mma on a GPU) on a GPU only: on CPU batch 3 runs the same decoder, swap
# and sibling launches through the interpreter, and with batch 1 the pair took 81 s of CI's 15 minutes (batch 3
# alone: 25 s; pytest --durations on this 2-core AMD EPYC)
@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="batch 3 covers it under the interpreter; batch 1 runs on a GPU")), 3])
def test_static_decoder_with_our_kernel_gives_bitsandbytes_tokens(adapted_4bit_model, batch) -> None:
    model = adapted_4bit_model
    ids = torch.randint(3, 32000, (batch, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    modules_before = dict(model.named_modules())
    ours, setup = _decode(model, "triton", ids, 6)
    theirs, bnb_setup = _decode(model, "bitsandbytes", ids, 6)
    assert setup.nf4_kernel.startswith("triton-nf4") and bnb_setup.nf4_kernel.startswith("bitsandbytes")
    layers = TINY["num_hidden_layers"] * 7  # q, k, v, o, gate, up, down
    assert (setup.nf4_fused_layers, setup.nf4_fused_lora_layers) == (layers, layers)
    launches = TINY["num_hidden_layers"] * 4  # q/k/v as one, o, gate/up as one, down
    assert setup.nf4_launches == launches
    # the MMA GEMV up to 8 rows on an NVIDIA GPU; the interpreter's defaults are the portable modes (one a batch)
    assert setup.nf4_modes == (f"mma x{launches}" if DEVICE == "cuda"
                               else f"{'gemv' if batch == 1 else 'dot'} x{launches}")
    assert bnb_setup.nf4_modes == ""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert dict(model.named_modules()) == modules_before  # the originals are back in place


def test_the_decoder_with_scales_decoded_at_load_gives_bitsandbytes_tokens(adapted_4bit_model, monkeypatch) -> None:
    # v20's A/B switch through StaticDecoder: every swapped layer reads float32 scales, the setup says so (what
    # makes a bench case an A/B arm, never a table's row), and greedy tokens are bitsandbytes'.
    monkeypatch.setenv("MEDQA_NF4_SCALES", "float32")
    ids = torch.randint(3, 32000, (3, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ours, setup = _decode(adapted_4bit_model, "triton", ids, 3)
    theirs, bnb_setup = _decode(adapted_4bit_model, "bitsandbytes", ids, 3)
    assert setup.nf4_scales.startswith("float32: ") and bnb_setup.nf4_scales == ""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_decoder_with_tiled_weights_gives_bitsandbytes_tokens(adapted_4bit_model, monkeypatch) -> None:
    # v22's A/B switch through StaticDecoder: every launch reads copies in its tile's order (the tiled arguments
    # through the custom op), the setup says so, and greedy tokens are bitsandbytes'.
    monkeypatch.setenv("MEDQA_NF4_LAYOUT", "tiled")
    if DEVICE == "cpu":  # the interpreter's tiles are the portable modes', which read bitsandbytes' order: an MMA one
        from medqa_core.engine.kernels import nf4_matmul as kernels

        monkeypatch.setattr(kernels, "tile_config", lambda *args, **kwargs: TileConfig(8, 16, 64, 1, 1, 1, "mma"))
    ids = torch.randint(3, 32000, (3, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ours, setup = _decode(adapted_4bit_model, "triton", ids, 3)
    theirs, bnb_setup = _decode(adapted_4bit_model, "bitsandbytes", ids, 3)
    launches = TINY["num_hidden_layers"] * 4
    assert setup.nf4_layout.startswith(f"tiled: {launches} of {launches} launches") and bnb_setup.nf4_layout == ""
    assert " GiB beside bitsandbytes' copy; MEDQA_NF4_LAYOUT=tiled)" in setup.nf4_layout
    # what the copies hold: every 4-bit weight's packed words and absmax codes once more, rows padded to 16-row tiles
    import bitsandbytes as bnb

    from medqa_core.engine.kernels.nf4_layers import NF4Swap

    bases = [m for m in adapted_4bit_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    state = bases[0].weight.quant_state
    want = sum(-(-m.out_features // 16) * 16 * m.in_features * (1 / 2 + state.absmax.element_size() / state.blocksize)
               for m in bases)
    assert NF4Swap(adapted_4bit_model, max_rows=3).info.tiled_bytes == want > 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_weight_layout_switch_takes_two_values_and_names_a_third(monkeypatch) -> None:
    from medqa_core.engine.decoding import nf4_layout_line
    from medqa_core.engine.kernels.nf4_weight import weight_layout

    monkeypatch.delenv("MEDQA_NF4_LAYOUT", raising=False)
    assert weight_layout() == "bitsandbytes" and nf4_layout_line(0, 4).startswith("bitsandbytes: ")
    monkeypatch.setenv("MEDQA_NF4_LAYOUT", "tiled")
    assert weight_layout() == "tiled" and nf4_layout_line(3, 4).startswith("tiled: 3 of 4 launches ")
    assert "(1.50 GiB beside bitsandbytes' copy; " in nf4_layout_line(3, 4, 3 * 2**29)
    monkeypatch.setenv("MEDQA_NF4_LAYOUT", "marlin")
    with pytest.raises(ValueError, match="MEDQA_NF4_LAYOUT='marlin': choose one of bitsandbytes, tiled"):
        weight_layout()


@pytest.mark.skipif(DEVICE == "cpu", reason="tile tables are read on a GPU; the interpreter runs the defaults")
def test_block_scale_tiles_decode_bitsandbytes_tokens(adapted_4bit_model, tmp_path, monkeypatch) -> None:
    # v12's block scale is not bitwise bitsandbytes' (a weight rounds its level, not level * absmax): greedy decoding
    # must still give bitsandbytes' tokens where a tile table picks it for every launch (the tiny model's q+k+v,
    # o, gate+up and down at one row).
    import json

    from medqa_core.engine.kernels.nf4_tiles import _device_name

    hidden, inter = TINY["hidden_size"], TINY["intermediate_size"]
    kv = hidden // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    tile = dict(TileConfig(8, 16, 64, 1, 1, 2, "mma", prefetch=True, lookup="prmt", block_scale=True).__dict__)
    shapes = [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    table = tmp_path / "tiles.json"
    table.write_text(json.dumps({_device_name(torch.device(DEVICE)): [dict(rows=1, n=n, k=k, config=tile)
                                                                      for n, k in shapes]}))
    monkeypatch.setenv("MEDQA_NF4_TILES", str(table))
    ids = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ours, setup = _decode(adapted_4bit_model, "triton", ids, 6)
    theirs, _ = _decode(adapted_4bit_model, "bitsandbytes", ids, 6)
    assert setup.nf4_modes == f"mma prmt block-scale x{TINY['num_hidden_layers'] * 4}"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


class _Attention(torch.nn.Module):
    """q/k/v siblings, each fed the input ``feed`` says: the same tensor for all three, or another for v."""

    def __init__(self, k: int) -> None:
        super().__init__()
        for i, (name, n) in enumerate((("q_proj", 32), ("k_proj", 16), ("v_proj", 16))):
            layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            layer.weight = _quantized(n, k, 64, True, seed=10 + i)[0]
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x if other is None else other)], dim=-1)


def test_siblings_share_one_launch_and_never_mistake_another_input() -> None:
    from medqa_core.engine.kernels.nf4_layers import NF4Swap

    model = _Attention(128).to(DEVICE)
    x, other = torch.randn(2, 128).bfloat16().to(DEVICE), torch.randn(2, 128).bfloat16().to(DEVICE)
    swap = NF4Swap(model, max_rows=8)
    assert (swap.info.layers, swap.info.launches) == (3, 1)
    alone = NF4Swap(model, max_rows=8, siblings=False)
    assert alone.info.launches == 3
    with alone:
        expected, expected_other = model(x), model(x, other)
    with swap:
        pending = model.q_proj._pending
        assert torch.equal(model(x), expected)
        assert pending.input is None and not pending.outputs  # every sibling took its output: nothing held
        # v fed another tensor: it runs the launch for that input instead of taking the output computed for x
        assert torch.equal(model(x, other), expected_other)
        rows = 16  # a prefill: the layers themselves
        assert torch.equal(model.q_proj(torch.ones(rows, 128).bfloat16().to(DEVICE)),
                           swap._slots[0][2](torch.ones(rows, 128).bfloat16().to(DEVICE)))


class _DecoderLayer(torch.nn.Module):
    """A decoder layer's 4-bit layers, attention's registered first, as a decoder calls them."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.self_attn, self.mlp = torch.nn.Module(), torch.nn.Module()
        for parent, names in ((self.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (self.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for i, name in enumerate(names):
                layer = bnb.nn.Linear4bit(k, k, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
                layer.weight = _quantized(k, k, 64, True, seed=20 + i)[0]
                setattr(parent, name, layer)


def test_the_swap_lists_its_launches_in_the_order_a_decoder_calls_them() -> None:
    from medqa_core.engine.kernels.nf4_layers import NF4Swap

    model = torch.nn.Sequential(_DecoderLayer(128), _DecoderLayer(128)).to(DEVICE)
    swap = NF4Swap(model, max_rows=8)
    assert [name for name, _ in swap.launches] == ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj",
                                                   "down_proj"] * 2
    o_proj = model[0].self_attn.o_proj.weight
    state = o_proj.quant_state  # 128 x 128 codes, a scale code per 64, their scales per 256, one offset
    assert dict(swap.launches)["o_proj"] == o_proj.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() \
        + 4 == 128 * 128 // 2 + 256 + 4 + 4
    assert dict(swap.launches)["q_proj+k_proj+v_proj"] == 3 * dict(swap.launches)["o_proj"]


def test_a_mistral_model_calls_its_launches_in_the_order_the_swap_lists_them(adapted_4bit_model) -> None:
    # What lines a decode step's kernels up with their layers (trace.time_by_launch): a real decoder's forward
    # calls the swap's launches in its list's order, layer after layer
    from medqa_core.engine.kernels.nf4_layers import NF4Swap

    model = adapted_4bit_model.get_base_model()
    swap = NF4Swap(model, max_rows=8)
    called: list[str] = []
    for group in swap._groups:
        name = "+".join(_qualified(model, layer).rsplit(".", 1)[-1] for layer in group.originals)
        group.register_forward_pre_hook(lambda _module, _args, name=name: called.append(name))
    ids = torch.randint(3, 32000, (1, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with swap, torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(ids[:, :1])  # one row: every layer runs our kernel
    assert called == [name for name, _ in swap.launches]
    assert called[:4] == ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]


def test_the_swaps_distinct_launches_compile_ahead_in_other_processes(adapted_4bit_model, tmp_path,
                                                                     monkeypatch) -> None:
    # A decoder's first step loads its tiles from Triton's cache where spawned processes compiled them
    # (nf4_compile): one job for each distinct launch, each launchable as the step launches it (here the interpreter
    # runs them); on a GPU the step's own launches then compile nothing more.
    from medqa_core.engine.kernels.nf4_compile import compile_ahead
    from medqa_core.engine.kernels.nf4_layers import NF4Swap
    from medqa_core.engine.kernels.nf4_matmul import _nf4_matmul_kernel

    model = adapted_4bit_model.get_base_model()
    swap = NF4Swap(model, max_rows=3)
    jobs = swap.compile_jobs(3)
    h, i = TINY["hidden_size"], TINY["intermediate_size"]
    kv = h // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    assert {(j.sizes, j.k) for j in jobs} == {((h, kv, kv), h), ((h,), h), ((i, i), h), ((h,), i)} and len(jobs) == 4
    assert {(j.rows, j.rank, j.blocksize, j.double_quant, j.dtype, j.bias) for j in jobs} == {
        (3, 4, 64, True, "bfloat16", False)}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert compile_ahead(jobs, torch.device(DEVICE), workers=2) == [None] * 4
    if DEVICE == "cuda":
        compiled = set(tmp_path.iterdir())
        assert len(compiled) >= 4
        _nf4_matmul_kernel.device_caches.clear()  # this process's launches look in the on-disk cache again
        ids = torch.randint(3, 32000, (3, 1), generator=torch.Generator().manual_seed(3)).to(DEVICE)
        with swap, torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            model(ids)
        assert set(tmp_path.iterdir()) == compiled


def _qualified(model: torch.nn.Module, layer: torch.nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is layer)


def test_the_kernel_choice_is_visible_and_checked(adapted_4bit_model, monkeypatch) -> None:
    from medqa_core.engine.decoding import nf4_kernel_choice

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="choose one of auto, triton, bitsandbytes"):
        nf4_kernel_choice(adapted_4bit_model, cpu, "cutlass")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
    kernel, why = nf4_kernel_choice(adapted_4bit_model, cpu, "auto")
    assert kernel == "bitsandbytes" and "need a GPU" in why  # CPU behaviour unchanged
    with pytest.raises(ValueError, match="cannot run here: Triton kernels need a GPU"):
        nf4_kernel_choice(adapted_4bit_model, cpu, "triton")
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert nf4_kernel_choice(plain, cpu, "auto") == ("none", "no 4-bit layers")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert nf4_kernel_choice(adapted_4bit_model, cpu, "auto")[0] == "bitsandbytes"  # not the interpreter either


@pytest.mark.parametrize(("gpu", "hip", "rows", "expected"), [
    ("NVIDIA H100 80GB HBM3", None, 1, "triton"), ("NVIDIA H100 80GB HBM3", None, 64, "triton"),
    ("NVIDIA H100 80GB HBM3", None, 65, "bitsandbytes"), ("NVIDIA H200", None, 8, "triton"),
    ("NVIDIA H200", None, 9, "bitsandbytes"), ("NVIDIA H100 PCIe", None, 1, "bitsandbytes"),
    ("AMD Instinct MI300X", "6.4.0", 1, "bitsandbytes")])
def test_auto_takes_ours_where_it_was_measured_ahead(adapted_4bit_model, monkeypatch, gpu, hip, rows,
                                                     expected) -> None:
    """Ours on the GPUs and batches where the bench measured it ahead (an H100 up to batch 64, files 0026-0029;
    an H200 up to batch 8, 0034-0035); bitsandbytes' elsewhere and on ROCm, where ours has not run. The choice
    reads only the device's name and the build (no GPU is touched)."""
    from medqa_core.engine.decoding import nf4_kernel_choice

    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    kernel, why = nf4_kernel_choice(adapted_4bit_model, torch.device("cuda"), "auto", rows)
    assert kernel == expected and why.startswith("auto: ")
    assert ("ROCm" in why) == (hip is not None)


def test_the_swept_tile_table_is_used_for_its_device_and_shape(tmp_path, monkeypatch) -> None:
    import json

    from medqa_core.engine.kernels import nf4_tiles as kernels

    table = tmp_path / "tiles.json"
    best = {"block_m": 1, "block_n": 8, "block_k": 1024, "num_warps": 2, "num_stages": 3}  # v2: no split_k, mode
    eight = {"block_m": 8, "block_n": 16, "block_k": 64, "num_warps": 4, "num_stages": 2, "split_k": 4, "mode": "fma"}
    table.write_text(json.dumps({"cpu": [{"rows": 1, "n": 4096, "k": 4096, "config": best},
                                         {"rows": 8, "n": 4096, "k": 4096, "config": eight}]}))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter always takes the default tile
    monkeypatch.setenv("MEDQA_NF4_TILES", str(table))
    cpu = torch.device("cpu")
    assert kernels.tile_config(1, 4096, 4096, cpu) == TileConfig(**best)
    assert kernels.tile_config(1, 1024, 4096, cpu) != TileConfig(**best)  # another shape: the default
    assert kernels.tile_config(5, 4096, 4096, cpu) == TileConfig(**eight)  # 5 rows: the bucket of 8
    assert kernels.tile_config(16, 4096, 4096, cpu) == kernels._default_tile(16, 4096, 4096, 1)  # no bucket 16
    # a launch with LoRA takes the entry timed with LoRA; without, the other; where one is missing, the one there is
    with_lora = {"block_m": 8, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 1, "split_k": 4,
                 "mode": "mma"}
    both = tmp_path / "both.json"  # (tables are read once a path)
    both.write_text(json.dumps({"cpu": [{"rows": 1, "n": 4096, "k": 4096, "config": best},
                                        {"rows": 1, "n": 4096, "k": 4096, "config": with_lora, "lora": True},
                                        {"rows": 8, "n": 4096, "k": 4096, "config": eight, "lora": True}]}))
    monkeypatch.setenv("MEDQA_NF4_TILES", str(both))
    assert kernels.tile_config(1, 4096, 4096, cpu, lora=True) == TileConfig(**with_lora)
    assert kernels.tile_config(1, 4096, 4096, cpu) == TileConfig(**best)
    assert kernels.tile_config(8, 4096, 4096, cpu) == TileConfig(**eight)
    table2 = tmp_path / "broken.json"
    table2.write_text('{"cpu": [{"rows": 1}]}')
    monkeypatch.setenv("MEDQA_NF4_TILES", str(table2))
    with pytest.raises(ValueError, match="broken.json: not a tile table"):
        kernels.tile_config(1, 4096, 4096, cpu)
