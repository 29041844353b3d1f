"""The planner's analytic FLOPs, against hand-computed values (fast: no compilation)."""

import dataclasses

import pytest

from r1v2_jax.model.config import TextConfig, model_config
from r1v2_jax.plan.flops import forward_flops, llm_trains, needed_train_flops, train_step_flops


def _mc():
    text = TextConfig(vocab_size=300, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=16)
    return dataclasses.replace(model_config("tiny"), text=text)


def test_forward_and_train_flops_by_hand():
    mc = _mc()
    # per layer: q,k,v 8 x (2 + 2) x 4 = 128, o 2 x 4 x 8 = 64, MLP 3 x 8 x 16 = 384 -> 576; x 2 layers
    # + lm_head 8 x 300 = 3552 matmul parameters; attention 4 x seq 5 x heads 2 x head_dim 4 per token and layer
    assert forward_flops(mc, 10, 5) == 2 * 3552 * 10 + 2 * 10 * 4 * 5 * 2 * 4 == 74240
    assert train_step_flops(mc, 10, 5) == 3 * 74240
    assert train_step_flops(mc, 10, 5, forwards=3) == 5 * 74240


@pytest.mark.parametrize("trainable", ["adapter", "adapter+vit", "adapter+llm", "llm", "all"])
def test_a_frozen_llm_computes_no_weight_gradients(trainable):
    mc, flops = _mc(), train_step_flops(_mc(), 10, 5)
    frozen = trainable in ("adapter", "adapter+vit")
    assert llm_trains(trainable) is not frozen
    # frozen: forward + activation gradients (2 x the matmuls) + attention's backward (2 x its forward)
    want = 2 * 2 * 3552 * 10 + 3 * 2 * 10 * 4 * 5 * 2 * 4 if frozen else flops
    assert needed_train_flops(mc, flops, 10, trainable) == want
