"""The base_custom_op lever: bitsandbytes' 4-bit matmul as a torch.library custom op gives bitsandbytes' loss and
gradients bit for bit, switches every 4-bit layer and back, and its compiled graphs are ones AOTAutograd's cache
accepts (where bitsandbytes' autograd.Function makes every graph bypass it)."""

from __future__ import annotations

import torch

from medqa_core.engine.nf4_base_op import set_custom_op_base


def _loss_and_grads(model, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same LoRA dropout masks each call
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_the_custom_op_gives_bitsandbytes_loss_and_gradients_bit_for_bit(tiny_session) -> None:
    model = tiny_session.model
    x = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    try:
        loss, grads = _loss_and_grads(model, x)
        assert set_custom_op_base(model, True) == 14  # 2 layers x 7 projections
        op_loss, op_grads = _loss_and_grads(model, x)
        assert set_custom_op_base(model, False) == 14
        again, _ = _loss_and_grads(model, x)
    finally:
        set_custom_op_base(model, False)
        model.eval()
    assert grads and grads.keys() == op_grads.keys()  # the LoRA factors, nothing of the frozen base
    assert torch.equal(loss, op_loss) and torch.equal(loss, again)
    for name, grad in grads.items():
        assert torch.equal(grad, op_grads[name]), name


def test_its_compiled_graph_is_one_the_autograd_cache_accepts(tiny_session) -> None:
    """One 4-bit layer compiled with each path: bitsandbytes' bypasses AOTAutograd's cache, the custom op's is
    looked up (a miss here: the cache is fresh)."""
    import bitsandbytes as bnb
    from torch._dynamo.utils import counters

    layer = next(m for m in tiny_session.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(4, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    outcomes = {}
    for on in (False, True):
        set_custom_op_base(layer, on)
        torch._dynamo.reset()
        counters["aot_autograd"].clear()
        try:
            torch.compile(layer, backend="inductor")(x).float().sum().backward()
        finally:
            set_custom_op_base(layer, False)
        outcomes[on] = dict(counters["aot_autograd"])
    torch._dynamo.reset()
    assert outcomes[False].get("autograd_cache_bypass", 0) > 0
    assert outcomes[True].get("autograd_cache_bypass", 0) == 0
    assert outcomes[True].get("autograd_cache_miss", 0) + outcomes[True].get("autograd_cache_hit", 0) > 0
