"""The jitted rollout sampler: prefill once per prompt, decode under one ``lax.while_loop``.

``generate(model, input_ids, ...)`` is the public call. Under the hood a :class:`Sampler`
holds two compiled programs per shape bucket:

* ``prefill`` (batch B): encodes the images once, runs the left-padded prompts into an empty
  KV cache, returns the last position's logits;
* ``decode`` (batch B·G): repeats the prefix cache G times (a copy, not a recomputation),
  then samples up to ``max_new_tokens`` tokens inside one ``lax.while_loop``, the cache
  donated and updated in place.

The KV cache crosses from prefill to decode in the layout the decode loop wants. Left to
the default, XLA:TPU keeps the cache arguments in the default layout and copies each of K
and V into the loop's preferred layout before the loop and back after it: two temporaries
the size of the whole cache (2 x 24 GiB per chip for configs/grpo_38b.py on v5p-32, 16 chips,
read from XLA's buffer assignment: what kept adapter-only GRPO off that slice). So decode is compiled first with
``Layout.AUTO`` for the cache (in and out, donated: the compiler picks one layout and aliases
the buffers), and prefill is compiled to return the cache in exactly that layout (as
MaxText's inference engine does with its decode state). Both programs are compiled ahead of
time, once per call signature (shapes, shardings, settings); on CPU every layout is the
default one and nothing changes.

Prompt lengths are left-padded up to a multiple of ``bucket`` so recompiles are rare; the
sampler counts them (``num_compiles``). Each sample has its own PRNG key, derived from
``seed``, its prompt's index in the batch and its sample index: the same call gives the same
samples, whatever the mesh.

Sampling follows transformers' order: repetition penalty, temperature, top-k, top-p, then
a categorical draw (``temperature == 0``: greedy argmax after the penalty). For every sampled
token two log-probabilities come back: under the sampling distribution (after penalty,
temperature and truncation; 0 for greedy) and under the unmodified model (plain
``log_softmax`` of the logits), the one the learner's importance ratios need.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, SingleDeviceSharding

from r1v2_jax.model.qwen2 import CACHE_AXES, init_cache
from r1v2_jax.model.vlm import R1V2, R1V2Model
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.parallel.multihost import global_rows
from r1v2_jax.parallel.sharding import constrain, logical_to_pspec, use_mesh_rules
from r1v2_jax.sampling import unrolled
from r1v2_jax.sampling.processing import NEG, SampleOutput, SamplingParams, process_logits, sample_step

__all__ = ["NEG", "SampleOutput", "Sampler", "SamplingParams", "generate", "process_logits", "sample_step"]


def _left_pad(input_ids, attention_mask, bucket: int, pad_id: int):
    """Ragged or padded prompts -> (ids i32[B, P], mask bool[B, P], given length T), P a multiple of bucket."""
    if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
        rows = [np.asarray(r, np.int64).reshape(-1) for r in input_ids]
        t = max(len(r) for r in rows)
        ids = np.full((len(rows), t), pad_id, np.int64)
        mask = np.zeros((len(rows), t), bool)
        for i, r in enumerate(rows):
            ids[i, t - len(r) :], mask[i, t - len(r) :] = r, True
    else:
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids: expected [B, T] or a list of sequences, got shape {list(ids.shape)}")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: expected shape {list(ids.shape)}, got {list(mask.shape)}")
        if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
            raise ValueError("attention_mask: prompts must be left-padded (no real token after padding)")
        t = ids.shape[1]
    if not mask.any(axis=1).all():
        raise ValueError("input_ids: every prompt needs at least one real token")
    p = -(-t // bucket) * bucket
    if p > t:
        ids = np.concatenate([np.full((ids.shape[0], p - t), pad_id, ids.dtype), ids], axis=1)
        mask = np.concatenate([np.zeros((mask.shape[0], p - t), bool), mask], axis=1)
    return ids.astype(np.int32), mask, t


LAYER_LOOPS = ("unrolled", "scan")


class Sampler:
    """Compiled prefill + decode for one model. Reuse it across calls to reuse compilations.

    ``layer_loop`` is how a decode step runs the layers: ``"unrolled"`` (default) over
    per-layer weights split once per parameter object and per-layer KV buffers (see
    :mod:`r1v2_jax.sampling.unrolled`: the scanned stack copies every layer's weights at every
    step on XLA:CPU); ``"scan"``: the model's layer scan over the stacked weights and cache
    (what ``r1v2 plan`` compiles for TPU, where the slice fuses into the dot). The unrolled
    loop holds a second copy of the decoder weights while this sampler holds the parameters.
    """

    def __init__(self, model: R1V2Model, bucket: int = 32, layer_loop: str = "unrolled"):
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop: expected one of {LAYER_LOOPS}, got {layer_loop!r}")
        self.model = model
        self.module = R1V2(model.config)
        self.bucket = bucket
        self.layer_loop = layer_loop
        self._split = jax.jit(functools.partial(unrolled.split_layers, config=model.config))
        self._split_for: tuple = (None, None)  # (parameter object, its decode layout)
        self.prefill_batches: list[int] = []  # batch size of every prefill run, in order
        self._compiled: dict = {}  # call signature -> (prefill, decode) compiled programs

    @property
    def num_compiles(self) -> int:
        """Programs compiled so far: a prefill and a decode executable per call signature (one
        of each per prompt bucket and settings; a second call of the same shapes compiles nothing)."""
        return 2 * len(self._compiled)

    def set_params(self, params) -> None:
        """Sample with new parameters (same shapes and shardings: nothing recompiles)."""
        self.model.params = params

    # --- the compiled programs (also for ahead-of-time use: r1v2 plan) -------------------------

    def decode_inputs(self, params, ids, kv_valid_prompt, pixel_values, *, cache_len: int, num_samples: int):
        """(logits, cache, kv_valid, ids) that prefill returns and decode takes, as
        ShapeDtypeStructs with the shardings both programs use: rows over the batch axes
        (``act_batch``), the cache by ``CACHE_AXES`` under the model's rules; one device's
        (the parameters') without a mesh."""
        shapes = jax.eval_shape(
            lambda *a: self._prefill_impl(*a, cache_len=cache_len, num_samples=num_samples),
            params,
            ids,
            kv_valid_prompt,
            pixel_values,
        )
        mesh = self.model.mesh
        if mesh is None:
            one = SingleDeviceSharding(_device_of(params))
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), shapes)

        def placed(names, a):
            spec = logical_to_pspec(names, self.model.rules, a.shape, mesh)
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

        logits, cache, kv_valid, rep = shapes
        rows = [placed(("act_batch",) + (None,) * (a.ndim - 1), a) for a in (logits, kv_valid, rep)]
        return rows[0], jax.tree.map(lambda c: placed(CACHE_AXES, c), cache), rows[1], rows[2]

    def lower_prefill(
        self,
        params,
        ids,
        kv_valid_prompt,
        pixel_values,
        outputs,
        *,
        cache_len: int,
        num_samples: int,
        cache_formats=None,
    ):
        """The prefill program lowered for these (abstract or concrete) arguments, its outputs
        placed as ``outputs`` says (what :meth:`decode_inputs` gives for these arguments) and the
        cache in ``cache_formats`` (a tree of :class:`Format` like the cache, from
        :meth:`cache_formats` of the compiled decode; None: the default layout)."""
        logits, cache, kv_valid, rep = outputs
        cache = cache_formats if cache_formats is not None else jax.tree.map(lambda c: c.sharding, cache)
        fn = jax.jit(
            functools.partial(self._prefill_impl, cache_len=cache_len, num_samples=num_samples),
            out_shardings=(logits.sharding, cache, kv_valid.sharding, rep.sharding),
        )
        return fn.lower(params, ids, kv_valid_prompt, pixel_values)

    def lower_decode(
        self,
        params,
        logits,
        cache,
        kv_valid,
        ids,
        seed,
        prompt_index,
        *,
        num_samples: int,
        sp: SamplingParams,
        loops: int = 1,
    ):
        """The decode program (the whole token loop) lowered for these abstract arguments
        (ShapeDtypeStructs with shardings, as :meth:`decode_inputs` gives them), the cache's
        layout left to the compiler (``Layout.AUTO`` in and out, donated). ``loops`` > 1 runs
        the loop that many times over the same cache in one program (for costing one trip of
        its body: the difference from ``loops=1``); it returns (a list of each loop's outputs,
        cache) instead of (outputs..., cache)."""

        def run(params, logits, cache, kv_valid, ids, seed, prompt_index):
            outs = []
            for _ in range(loops):
                *out, cache = self._decode_impl(
                    params, logits, cache, kv_valid, ids, seed, prompt_index, num_samples, sp
                )
                outs.append(tuple(out))
            return (*outs[0], cache) if loops == 1 else (outs, cache)

        auto = jax.tree.map(lambda c: Format(Layout.AUTO, c.sharding), cache)
        args = (params, logits, cache, kv_valid, ids, seed, prompt_index)
        placed = tuple(jax.tree.map(lambda a: getattr(a, "sharding", None), a) for a in args)
        fn = jax.jit(
            run,
            in_shardings=(*placed[:2], auto, *placed[3:]),
            out_shardings=(*(None,) * 6, auto) if loops == 1 else (None, auto),
            donate_argnums=(2,),
        )
        return fn.lower(*args)

    @staticmethod
    def cache_formats(decode):
        """The cache's formats (layouts and shardings) a compiled decode program takes: what
        prefill must return (see :meth:`lower_prefill`)."""
        return decode.input_formats[0][2]

    def _programs(self, params, dparams, ids, mask, pix, index, *, cache_len: int, num_samples: int, sp):
        """(prefill, decode) compiled for this call signature; decode first, then prefill
        returning the cache in the layout decode chose."""
        key = (
            _signature((params, dparams, ids, mask, pix, index)),
            cache_len,
            num_samples,
            sp,
        )
        if key not in self._compiled:
            kw = dict(cache_len=cache_len, num_samples=num_samples)
            outputs = self.decode_inputs(params, ids, mask, pix, **kw)
            logits, cache, kv_valid, rep = outputs
            seed = jax.ShapeDtypeStruct((), jnp.uint32)
            index = _abstract(index)
            decode = self.lower_decode(
                _abstract(dparams), logits, cache, kv_valid, rep, seed, index, num_samples=num_samples, sp=sp
            ).compile()
            prefill = self.lower_prefill(
                params, ids, mask, pix, outputs, **kw, cache_formats=self.cache_formats(decode)
            )
            self._compiled[key] = (prefill.compile(), decode)
        return self._compiled[key]

    def decode_params(self):
        """The parameters the decode program takes: the model's (``scan``), or their decode
        layout (``unrolled``), split once per parameter object and kept until it changes."""
        params = self.model.params
        if self.layer_loop == "scan":
            return params
        if self._split_for[0] is not params:
            self._split_for = (None, None)  # drop the old copy before making the new one
            self._split_for = (params, self._split(params))
        return self._split_for[1]

    def _prefill_impl(self, params, ids, kv_valid_prompt, pixel_values, cache_len: int, num_samples: int):
        """Prefill B prompts once, then share the prefix: each prompt's cache, logits and masks
        are copied to its G samples (rows b*G .. b*G+G-1)."""
        cfg = self.model.config
        with use_mesh_rules(self.model.mesh, self.model.rules):
            b, p = ids.shape
            kv_valid = jnp.zeros((b, cache_len), bool).at[:, :p].set(kv_valid_prompt)
            cache = init_cache(cfg.text, b, cache_len, jnp.dtype(cfg.dtype))
            logits, cache = self.module.apply(
                {"params": params}, ids, pixel_values, kv_valid, cache, method=R1V2.prefill
            )
            rep = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
            cache = jax.tree.map(lambda c: constrain(jnp.repeat(c, num_samples, axis=1), CACHE_AXES), cache)
            if self.layer_loop == "unrolled":
                cache = unrolled.split_cache(cache)
            return rep(logits.astype(jnp.float32)), cache, rep(kv_valid), rep(ids)

    def _decode_impl(self, params, logits, cache, kv_valid, ids, seed, prompt_index, num_samples, sp: SamplingParams):
        with use_mesh_rules(self.model.mesh, self.model.rules):
            # sample g of prompt i (global index) draws from key(seed) -> fold_in(i) -> fold_in(g)
            base = jax.random.key(seed)
            rows = jnp.arange(ids.shape[0])
            keys = jax.vmap(lambda i, g: jax.random.fold_in(jax.random.fold_in(base, i), g))(
                jnp.repeat(prompt_index, num_samples), rows % num_samples
            )
            return self._decode_loop(params, logits, cache, kv_valid, ids, keys, sp)

    def _decode_loop(self, params, logits, cache, kv_valid, ids, keys, sp):
        cfg = self.model.config
        n, p = ids.shape
        prompt_len = kv_valid[:, :p].sum(axis=1).astype(jnp.int32)
        presence = None
        if sp.repetition_penalty != 1.0:
            presence = jnp.zeros((n, cfg.text.vocab_size), bool)
            presence = presence.at[jnp.arange(n)[:, None], ids].max(kv_valid[:, :p])
        eos = jnp.asarray(sp.eos_ids if sp.eos_ids else (-1,), jnp.int32)
        m = sp.max_new_tokens
        state = dict(
            step=jnp.int32(0),
            logits=logits,
            cache=cache,
            kv_valid=kv_valid,
            presence=presence,
            out=jnp.full((n, m), sp.pad_id, jnp.int32),
            lp=jnp.zeros((n, m), jnp.float32),
            ref=jnp.zeros((n, m), jnp.float32),
            finished=jnp.zeros((n,), bool),
            lengths=jnp.zeros((n,), jnp.int32),
        )

        def cond(s):
            return (s["step"] < m) & ~jnp.all(s["finished"])

        def body(s):
            step = s["step"]
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
            tok, lp, ref = sample_step(s["logits"], s["presence"], step_keys, sp)
            live = ~s["finished"]
            tok = jnp.where(live, tok, sp.pad_id)
            lp, ref = jnp.where(live, lp, 0.0), jnp.where(live, ref, 0.0)
            finished = s["finished"] | (live & jnp.isin(tok, eos))
            slot = p + step
            kv_valid = s["kv_valid"].at[:, slot].set(live)
            new = dict(
                s,
                step=step + 1,
                finished=finished,
                lengths=s["lengths"] + live.astype(jnp.int32),
                out=s["out"].at[:, step].set(tok),
                lp=s["lp"].at[:, step].set(lp),
                ref=s["ref"].at[:, step].set(ref),
                kv_valid=kv_valid,
            )
            if s["presence"] is not None:
                new["presence"] = s["presence"].at[jnp.arange(n), tok].max(live)
            positions = (prompt_len + step)[:, None]
            if self.layer_loop == "unrolled":
                logits, cache = unrolled.decode_step(cfg, params, tok[:, None], positions, kv_valid, s["cache"], slot)
            else:
                logits, cache = self.module.apply(
                    {"params": params}, tok[:, None], positions, kv_valid, s["cache"], slot, method=R1V2.decode_step
                )
            new["logits"], new["cache"] = logits.astype(jnp.float32), cache
            return new

        s = jax.lax.while_loop(cond, body, state)
        # The final cache is returned only so the donated input buffer can alias it: the loop
        # then updates one cache in place instead of holding two.
        return s["out"], s["lp"], s["ref"], s["lengths"], s["finished"], prompt_len, s["cache"]

    def __call__(
        self,
        input_ids,
        *,
        pixel_values=None,
        attention_mask=None,
        sp: SamplingParams,
        num_samples: int = 1,
        seed: int = 0,
    ) -> SampleOutput:
        """Sample ``num_samples`` continuations of each prompt.

        With a mesh on the model, the prompts (and per-row ``pixel_values`` [B, K, 3, S, S]) are
        this host's rows: every host calls with its own prompts, the programs run over the
        global batch (hosts' rows in process order), and ``SampleOutput.host_local()`` gives
        this host's results back."""
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        ids, mask, t = _left_pad(input_ids, attention_mask, self.bucket, sp.pad_id)
        self.model.check_inputs(np.where(mask, ids, 0), pixel_values)
        b_local = ids.shape[0]
        pix = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        mesh = self.model.mesh
        host_rows = None
        first = 0  # global index of this host's first prompt
        flat_tiles = pix is not None and pix.ndim != 5
        if flat_tiles and mesh is not None and jax.process_count() > 1:
            raise ValueError(
                "pixel_values: with several hosts, give per-prompt tiles [B, K, 3, S, S] (rows are "
                "sharded over hosts), not one flat list of tiles"
            )
        if mesh is not None and not flat_tiles:  # rows sharded over the mesh (flat tiles: replicated inputs)
            counts = dist.allgather_json([int(b_local), int(ids.shape[1]), int(t)])
            first = sum(c[0] for c in counts[: jax.process_index()])
            p_all, t = max(c[1] for c in counts), max(c[2] for c in counts)
            shards = dist.local_row_shards(mesh)
            rows = -(-max(c[0] for c in counts) // shards) * shards  # same block size on every host
            ids, mask, pix = _pad_rows(ids, mask, pix, rows, p_all, sp.pad_id)
            host_rows = b_local * num_samples
        b, p = ids.shape
        cache_len = -(-(p + sp.max_new_tokens) // self.bucket) * self.bucket
        self.prefill_batches.append(b)
        index = np.arange(first, first + b, dtype=np.int32)
        if host_rows is None:
            put = jnp.asarray
        else:
            put = functools.partial(global_rows, mesh=mesh)
        ids_d, mask_d, index_d = put(ids), put(mask), put(index)
        pix_d = None if pix is None else put(pix)
        params, dparams = self.model.params, self.decode_params()
        prefill, decode = self._programs(
            params, dparams, ids_d, mask_d, pix_d, index_d, cache_len=cache_len, num_samples=num_samples, sp=sp
        )
        logits, cache, kv_valid, rep_ids = prefill(params, ids_d, mask_d, pix_d)
        out, lp, ref, lengths, finished, prompt_len, _ = decode(
            dparams, logits, cache, kv_valid, rep_ids, np.uint32(seed), index_d
        )
        result = SampleOutput(
            tokens=jnp.concatenate([rep_ids[:, p - t :], out], axis=1),
            logprobs=lp,
            ref_logprobs=ref,
            lengths=lengths,
            finished=finished,
            prompt_lengths=prompt_len,
            host_rows=host_rows,
        )
        if host_rows is not None and jax.process_count() == 1:  # one host: drop the padding rows here
            result = jax.tree.map(lambda x: x[:host_rows], result).replace(host_rows=None)
        return result


def _abstract(tree):
    """Arrays -> ShapeDtypeStructs with their shardings (an uncommitted array's: none, jit
    places it as it would the array; ShapeDtypeStructs and None pass through)."""

    def one(a):
        sharding = getattr(a, "sharding", None) if getattr(a, "committed", True) else None
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _signature(tree) -> tuple:
    """What a compiled program is specialised on: the tree's structure and each leaf's shape,
    dtype and sharding."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (a.shape, jnp.dtype(a.dtype), getattr(a, "sharding", None), getattr(a, "committed", True)) for a in leaves
    )


def _device_of(params):
    """The device the (single-device) parameters live on; the default device otherwise."""
    for a in jax.tree.leaves(params):
        sharding = getattr(a, "sharding", None)
        if sharding is not None and len(sharding.device_set) == 1:
            return next(iter(sharding.device_set))
    return jax.devices()[0]


def _pad_rows(ids, mask, pix, rows: int, length: int, pad_id: int):
    """Left-pad prompts to ``length`` and add rows (copies of the first prompt) up to ``rows``."""
    b, p = ids.shape
    if p < length:
        ids = np.concatenate([np.full((b, length - p), pad_id, ids.dtype), ids], axis=1)
        mask = np.concatenate([np.zeros((b, length - p), bool), mask], axis=1)
    if b < rows:
        extra = np.zeros(rows - b, np.int64)
        ids, mask = np.concatenate([ids, ids[extra]]), np.concatenate([mask, mask[extra]])
        pix = None if pix is None else np.concatenate([pix, pix[extra]])
    return ids, mask, pix


def generate(
    model: R1V2Model,
    input_ids,
    *,
    pixel_values=None,
    attention_mask=None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    num_samples: int = 1,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    seed: int = 0,
) -> SampleOutput:
    """Sample continuations of ``input_ids`` ([B, T] left-padded with ``attention_mask``, or a
    list of token lists). ``pixel_values``: f[n_tiles, 3, H, W] for the ``<IMG_CONTEXT>``
    slots, tiles in prompt order. See :class:`SampleOutput` for what comes back. The compiled
    programs are cached per model object."""
    eos = tuple(int(e) for e in (eos_ids or ()))
    sp = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
        eos_ids=eos,
        pad_id=int(pad_id if pad_id is not None else (eos[0] if eos else 0)),
    )
    # the model keeps its own sampler (and so its compiled programs): they go when the model
    # goes; a module-level cache would keep every model ever passed here alive
    sampler = getattr(model, "_sampler", None)
    if sampler is None or sampler.model is not model:
        sampler = model._sampler = Sampler(model)
    return sampler(
        input_ids, pixel_values=pixel_values, attention_mask=attention_mask, sp=sp, num_samples=num_samples, seed=seed
    )
