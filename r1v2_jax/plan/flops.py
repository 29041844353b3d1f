"""Analytic FLOPs of the planned programs (XLA's cost analysis counts a scanned layer body
once and leaves Pallas kernels out)."""

from __future__ import annotations

from r1v2_jax.model.attention import attention_flops
from r1v2_jax.train.state import TRAINABLE


def _matmul_params(mc) -> int:
    """Weights the LLM multiplies by per token (decoder layers + lm_head)."""
    t = mc.text
    hd = t.resolved_head_dim
    per_layer = (
        t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd
        + t.num_heads * hd * t.hidden_size
        + 3 * t.hidden_size * t.intermediate_size
    )
    return t.num_layers * per_layer + t.hidden_size * t.vocab_size


def forward_flops(mc, tokens: int, seq: int) -> float:
    """Analytic forward FLOPs of the LLM over ``tokens`` tokens of sequences of length ``seq``:
    2 x matmul parameters per token + attention (4 x seq x heads x head_dim per token and
    layer). The vision tower is not counted (text FLOPs dominate long reasoning)."""
    t = mc.text
    return 2.0 * _matmul_params(mc) * tokens + t.num_layers * tokens * 4.0 * seq * t.num_heads * t.resolved_head_dim


def train_step_flops(mc, tokens: int, seq: int, forwards: int = 1) -> float:
    """Forward + backward (3x forward) over ``tokens``, plus ``forwards - 1`` extra
    forward-only passes (e.g. MPO's frozen reference)."""
    f = forward_flops(mc, tokens, seq)
    return 3.0 * f + (forwards - 1) * f


def llm_trains(trainable: str) -> bool:
    """Whether ``trainable`` (``grpo.optim.trainable`` / ``mpo.optim.trainable``) trains the LLM."""
    return "language_model" in TRAINABLE[trainable]


def needed_train_flops(mc, flops: float, tokens: int, trainable: str) -> float:
    """The train step's FLOPs (``train_step_flops`` over ``tokens`` trained tokens) less what
    a frozen LLM does not compute: its weight gradients (2 x matmul parameters per token). The
    backward still computes every activation gradient (attention's too) down to the adapter, so
    adapter-only training does about 2x forward where ``train_step_flops`` counts 3x."""
    return flops if llm_trains(trainable) else flops - 2.0 * _matmul_params(mc) * tokens


def kernel_flops(job, mc, rows: int, seq: int) -> float:
    """Analytic FLOPs of the Pallas attention kernels in one train step (XLA's cost analysis
    omits them): every decoder layer's causal attention over ``rows`` sequences of ``seq`` tokens
    (forward, its recompute under remat, and the backward: 3.5x the forward with the separate dq /
    dkv kernels) and the ViT's bidirectional attention over ``job.tiles`` tiles per row (forward
    only unless the ViT trains); MPO runs chosen and rejected through the policy and, forward
    only, through the frozen reference."""

    t, v = mc.text, mc.vision
    trains_vit = getattr(job.cfg, job.algo).optim.trainable in ("adapter+vit", "all")
    recompute = 0.0 if mc.remat_policy == "none" else 1.0
    n_tok = 1 + (mc.tile_size // v.patch_size) ** 2
    seqs, ref_seqs = (rows, 0) if job.algo == "grpo" else (2 * rows, 2 * rows)

    def passes(train: bool, n: int, n_ref: int) -> float:
        return n * ((1 + recompute + 3.5) if train else 1.0) + n_ref

    text = t.num_layers * attention_flops(1, seq, t.num_heads, t.resolved_head_dim, True, False)
    vit = v.num_layers * attention_flops(1, n_tok, v.num_heads, v.head_dim, False, False)
    return text * passes(True, seqs, ref_seqs) + vit * job.tiles * passes(trains_vit, seqs, ref_seqs)
