"""Attending through the weights (a few queries, e.g. NarrowBERT's [CLS]) equals projecting keys and values for
every context position: outputs and every gradient, with padding, in fp32."""

from __future__ import annotations

import torch

from megatron_narrow.config import ModelConfig
from megatron_narrow.model.attention import BertSelfAttention, few_queries
from megatron_narrow.parallel import ProcessGroups


def test_attention_through_weights_equals_projected_keys_and_values():
    config = ModelConfig(vocab_size=100, hidden_size=256, num_layers=2, num_heads=4, attention_dropout=0.0)
    attention = BertSelfAttention(config, ProcessGroups.single(), torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-zero biases, so the softmax-invariance of the key bias is exercised
        attention.key.bias.normal_(0, 1.0)
        attention.value.bias.normal_(0, 1.0)
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 2, 256, generator=g, requires_grad=True)
    context = torch.randn(3, 40, 256, generator=g, requires_grad=True)
    key_mask = torch.ones(3, 40, dtype=torch.bool)
    key_mask[1, 25:] = False
    assert few_queries(2, config.head_dim) and not few_queries(80, config.head_dim)

    fast = attention(queries, key_mask, context=context, through_weights=True)  # two queries: through the weights
    inputs = [queries, context, *attention.parameters()]
    grads_fast = torch.autograd.grad(fast.square().sum(), inputs, allow_unused=True)
    slow = attention(queries, key_mask, kv=attention.project_kv(context))
    grads_slow = torch.autograd.grad(slow.square().sum(), inputs)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        # the key bias shifts every score of a query equally: through the softmax its gradient is zero,
        # which the fast path knows (None) and the projected path computes (~1e-7). 1e-4: the weight gradients
        # are sums of products that cancel ((q W_k) x against q (W_k x)); measured 2.9e-5 on the key weight
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, atol=1e-4, rtol=1e-4)
