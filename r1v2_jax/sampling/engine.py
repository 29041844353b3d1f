"""The rollout engine: paged KV cache, continuous batching over a fixed number of decode slots.

``PagedEngine(model, EngineConfig(...))(input_ids, sp=..., num_samples=G, seed=...)`` returns
the same :class:`~r1v2_jax.sampling.sampler.SampleOutput` as :class:`Sampler`, row ``b*G+g``
for sample g of prompt b. How it runs:

* **Queue and admission.** The (prompt, sample) pairs wait in a queue, prompt-major. Every K
  decode steps (``steps_per_sync``) the host looks at which slots finished, returns their pages
  and gives each free slot, in ascending slot order, the next pair of the queue, as long as
  the pool can reserve that sample's worst case (so no running sample ever waits for a page).
  The rule reads only the samples' done flags, which every host computes identically.
* **Shared prompt pages.** A prompt is prefilled once, when its first sample is admitted
  (prompts arriving together are prefilled in one batch), into pages of its own. Its samples'
  tables point at its full pages; the page where the prompt ends and the samples diverge is
  copied into a private page for each sample (copy on write; no copy when the prompt fills its
  pages). The prompt's pages go back when its last sample finishes.
* **Decode.** One compiled program runs K steps for all slots: sample, store the token's K/V
  in the slot's page, attend over the slot's pages (:mod:`r1v2_jax.sampling.paged`: only the
  first n table columns, n a power-of-two bucket of the longest live sequence; on TPU the
  ragged paged attention kernel, which reads each slot's valid length only), next logits.
  Layers run unrolled over per-layer weights (:mod:`r1v2_jax.sampling.unrolled`).
* **Keys.** Sample g of prompt b draws token j with key(seed) -> fold_in(b) -> fold_in(g) ->
  fold_in(j), exactly as :class:`Sampler`: the tokens do not depend on the slot count, the
  arrival order or which slot a sample lands in, and equal the static sampler's.

KV pages are stored in ``kv_dtype`` (default: the model's compute dtype). With float32 pages
the model log-probs equal the learner's recomputation to float32 rounding (tests: 1e-5);
bfloat16 pages halve the pool, and change the model log-probs by up to ~1e-2 on the test
model (tests/test_engine.py states the bound it checks).

On a mesh (``model.mesh``, its parameters laid out on it): the decode slots split over the
batch axes (``data`` x ``fsdp``) in contiguous blocks, each block with a page pool of its own
(``num_pages`` pages per shard, page ids local to it; a prompt is prefilled into the pool of
every shard that runs one of its samples); KV heads split over ``tensor``; the model runs
under the mesh's sharding rules, and every pool operation, the kernel included, per shard in
``shard_map`` (:class:`~r1v2_jax.sampling.paged.PoolLayout`). Admission, pages and keys are
decided on the host as without a mesh, so the tokens are the same. Over several processes
every host gathers every host's prompts, runs the same host loop (the same admissions, pages
and tables, from the same done flags) and returns its own prompts' rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.multihost_utils import process_allgather

from r1v2_jax.model.qwen2 import init_cache
from r1v2_jax.model.vlm import R1V2, R1V2Model
from r1v2_jax.parallel import multihost as dist
from r1v2_jax.parallel.sharding import use_mesh_rules
from r1v2_jax.sampling import unrolled
from r1v2_jax.sampling.paged import (
    IMPLS,
    PagedKV,
    PagePool,
    PoolLayout,
    copy_pages,
    init_pools,
    interleave,
    page_bucket,
    pages_for,
    write_prompts,
)
from r1v2_jax.sampling.sampler import SampleOutput, SamplingParams, _left_pad, sample_step


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the paged engine runs (none of it changes what is sampled).

    slots: decode slots (rows of the compiled step); steps_per_sync: K, decode steps between
    two host interventions; page_size: tokens per KV page; num_pages: the pool (page 0 is
    reserved), None: enough for every slot's worst case plus as many resident prompts, so
    admission never waits for pages; kv_dtype: KV page dtype (None: the model's compute dtype);
    bucket: prompt lengths are padded to a multiple of it (fewer prefill compiles);
    attention: decode attention over the pages (:mod:`r1v2_jax.sampling.paged`): ``xla``,
    ``ragged`` (the TPU kernel, with ``pages_per_block`` / ``queries_per_block``), ``auto``
    (``ragged`` on a TPU backend, ``xla`` elsewhere).
    """

    slots: int = 32
    steps_per_sync: int = 8
    page_size: int = 16
    num_pages: int | None = None
    kv_dtype: str | None = None
    bucket: int = 32
    attention: str = "auto"
    pages_per_block: int = 16
    queries_per_block: int = 32

    def __post_init__(self):
        if self.attention not in ("auto",) + IMPLS:
            raise ValueError(f"EngineConfig.attention: expected auto, xla or ragged, got {self.attention!r}")
        for name in ("slots", "steps_per_sync", "page_size", "bucket", "pages_per_block", "queries_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.kv_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"EngineConfig.kv_dtype: expected None, 'float32' or 'bfloat16', got {self.kv_dtype!r}")


@dataclasses.dataclass
class _Sample:
    prompt: int
    g: int
    tokens: list = dataclasses.field(default_factory=list)
    lp: list = dataclasses.field(default_factory=list)
    ref: list = dataclasses.field(default_factory=list)
    pages: list = dataclasses.field(default_factory=list)  # its table: shared prompt pages, then its own
    own: list = dataclasses.field(default_factory=list)  # the pages it holds a reference to
    reserve: int = 0  # pages still to allocate in its worst case
    done: bool = False
    eos: bool = False


class PagedEngine:
    """Compiled prefill and K-step decode programs for one model, and the host loop."""

    def __init__(self, model: R1V2Model, config: EngineConfig = EngineConfig()):
        self.model, self.cfg = model, config
        t = model.config.text
        self.layout = PoolLayout.for_mesh(model.mesh, model.rules, slots=config.slots, kv_heads=t.num_kv_heads)
        self.module = R1V2(model.config)
        self.kv_dtype = jnp.dtype(config.kv_dtype or model.config.dtype)
        impl = config.attention
        if impl == "auto":
            impl = "ragged" if jax.default_backend() == "tpu" else "xla"
        self.attention = (impl, config.pages_per_block, config.queries_per_block)  # PagedKV's static fields
        self._split = jax.jit(functools.partial(unrolled.split_layers, config=model.config))
        self._split_for: tuple = (None, None)
        self._prefill = jax.jit(self._prefill_impl, donate_argnames=("pools", "prompt_logits"))
        self._block = jax.jit(self._block_impl, static_argnames=("sp",), donate_argnames=("pools", "state"))
        self.stats: dict = {}

    # --- compiled programs ------------------------------------------------------------------
    def _prefill_impl(self, params, pools, prompt_logits, ids, mask, pix, pages, shard, rows):
        """Prefill prompts ids i32[A, P] (left-padded, ``mask``) and store their K/V into pages
        i32[A, P / page_size] (page 0: nowhere) of batch shard shard i32[A]; their last logits
        go to prompt_logits[rows]."""
        cfg = self.model.config
        a, p = ids.shape
        cache = init_cache(cfg.text, a, p, jnp.dtype(cfg.dtype))
        logits, (k, v) = self.module.apply({"params": params}, ids, pix, mask, cache, method=R1V2.prefill)
        ps = self.cfg.page_size
        n = pages.shape[1]
        plen = mask.sum(axis=1).astype(jnp.int32)
        # token i of row r sits at dense slot p - plen[r] + i
        idx = jnp.clip(p - plen[:, None] + jnp.arange(n * ps)[None], 0, p - 1)  # [A, n*ps]
        new = []
        for layer, kvp in enumerate(pools):

            def paged(x, layer=layer):
                x = jnp.take_along_axis(x[layer], idx[:, :, None, None], axis=1)  # [A, n*ps, H, d]
                return x.reshape(a, n, ps, *x.shape[2:]).astype(self.kv_dtype)

            new.append(write_prompts(self.layout, kvp, interleave(paged(k), paged(v)), pages, shard))
        prompt_logits = prompt_logits.at[rows].set(logits.astype(jnp.float32), mode="drop")
        return new, prompt_logits

    def _block_impl(self, dparams, pools, state, prompt_logits, admit, table, seed, sp: SamplingParams):
        """Admit new samples, then run K decode steps for every slot.

        state: logits f32[S, V], presence bool[S, V] or None, gen i32[S] (tokens generated),
        ctx i32[S] (tokens in the cache), done bool[S], prompt/g i32[S] (the slot's sample);
        admit: new bool[S], row i32[S] (prompt_logits row), cow_src/cow_dst i32[S] (pages to
        copy; 0 -> 0 for none), prompt_ids i32[S, P] / prompt_mask bool[S, P] (for the
        repetition penalty); table: i32[S, n]. Returns (pools, state, tokens, lp, ref [S, K]).
        """
        cfg = self.model.config
        k_steps, ps = self.cfg.steps_per_sync, self.cfg.page_size
        pools = [copy_pages(self.layout, kvp, admit["cow_src"], admit["cow_dst"]) for kvp in pools]
        new = admit["new"]
        state = dict(state, logits=jnp.where(new[:, None], prompt_logits[admit["row"]], state["logits"]))
        if state["presence"] is not None:
            s_, v_ = state["presence"].shape
            seen = jnp.zeros((s_, v_), bool).at[jnp.arange(s_)[:, None], admit["prompt_ids"]].max(admit["prompt_mask"])
            state["presence"] = jnp.where(new[:, None], seen, state["presence"])
        base = jax.random.key(seed)
        keys = jax.vmap(lambda i, g: jax.random.fold_in(jax.random.fold_in(base, i), g))(state["prompt"], state["g"])
        eos = jnp.asarray(sp.eos_ids if sp.eos_ids else (-1,), jnp.int32)
        s = table.shape[0]

        def body(j, carry):
            pools, st, out = carry
            live = ~st["done"]
            step_keys = jax.vmap(jax.random.fold_in)(keys, st["gen"])
            tok, lp, ref = sample_step(st["logits"], st["presence"], step_keys, sp)
            tok = jnp.where(live, tok, sp.pad_id)
            lp, ref = jnp.where(live, lp, 0.0), jnp.where(live, ref, 0.0)
            gen = st["gen"] + live.astype(jnp.int32)
            done = st["done"] | (live & jnp.isin(tok, eos)) | (gen >= sp.max_new_tokens)
            st = dict(st, gen=gen, done=done)
            if st["presence"] is not None:
                st["presence"] = st["presence"].at[jnp.arange(s), tok].max(live)
            ctx = st["ctx"]
            write_page = jnp.where(live, jnp.take_along_axis(table, (ctx // ps)[:, None], axis=1)[:, 0], 0)
            caches = [PagedKV(kvp, table, write_page, ctx % ps, ctx + 1, *self.attention, self.layout) for kvp in pools]
            x = unrolled.embed(cfg, dparams["top"], tok[:, None])
            x, caches = unrolled.run_layers(cfg, dparams["layers"], x, ctx[:, None], lambda i: (None, caches[i], None))
            st["logits"] = unrolled.head(cfg, dparams["top"], x)[:, -1].astype(jnp.float32)
            st["ctx"] = ctx + live.astype(jnp.int32)
            out = tuple(o.at[:, j].set(x_) for o, x_ in zip(out, (tok, lp, ref)))
            return [c.pages for c in caches], st, out

        out = (
            jnp.full((s, k_steps), sp.pad_id, jnp.int32),
            jnp.zeros((s, k_steps), jnp.float32),
            jnp.zeros((s, k_steps), jnp.float32),
        )
        pools, state, out = jax.lax.fori_loop(0, k_steps, body, (pools, state, out))
        return pools, state, out

    # --- the host loop --------------------------------------------------------------------------
    def decode_params(self):
        params = self.model.params
        if self._split_for[0] is not params:
            self._split_for = (None, None)
            self._split_for = (params, self._split(params))
        return self._split_for[1]

    def set_params(self, params) -> None:
        """Sample with new parameters (same shapes: nothing recompiles)."""
        self.model.params = params

    def __call__(
        self,
        input_ids,
        *,
        pixel_values=None,
        attention_mask=None,
        sp: SamplingParams,
        num_samples: int = 1,
        seed: int = 0,
        order=None,
    ) -> SampleOutput:
        """Sample ``num_samples`` continuations of each prompt (see the module docstring).

        pixel_values: None or per-prompt tiles f[B, K, 3, S, S]. ``order``: the queue order as
        a permutation of the B*G (prompt, sample) rows (default prompt-major); it changes only
        which sample runs when, not what is sampled."""
        # Longer than 60 lines: the host loop (admit arrivals, run K decode steps, retire finished
        # slots, return their pages) shares the page pools, slot table and queue as locals of one
        # scope; each phase is a few lines around a compiled call.

        c, mc, lay = self.cfg, self.model.config, self.layout
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        ids, mask, t = _left_pad(input_ids, attention_mask, c.bucket, sp.pad_id)
        mine = None
        if jax.process_count() > 1:  # every host runs the same loop over every host's prompts
            ids, mask, t, pixel_values, mine = self._all_hosts_prompts(ids, mask, t, pixel_values, sp.pad_id)
        self.model.check_inputs(np.where(mask, ids, 0), pixel_values)
        pix = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        if pix is not None and pix.ndim != 5:
            raise ValueError("pixel_values: the paged engine takes per-prompt tiles [B, K, 3, S, S]")
        b, p = ids.shape
        g_n, n_rows, ps, s_n, k_steps = num_samples, b * num_samples, c.page_size, c.slots, c.steps_per_sync
        per_shard = s_n // lay.shards  # slot sl runs on batch shard sl // per_shard, with that shard's pool
        plen = mask.sum(axis=1)
        max_pages = pages_for(p + sp.max_new_tokens, ps)
        prompt_pages_max = pages_for(p, ps)
        num_pages = c.num_pages or 1 + per_shard * (max_pages + prompt_pages_max)
        pool = [PagePool(num_pages) for _ in range(lay.shards)]
        pools = init_pools(
            mc.text.num_layers, num_pages, ps, mc.text.num_kv_heads, mc.text.resolved_head_dim, self.kv_dtype, lay
        )
        dparams = self.decode_params()
        vocab = mc.text.vocab_size
        prompt_logits = self._put(np.zeros((b, vocab), np.float32))
        penalty = sp.repetition_penalty != 1.0
        state = dict(
            logits=self._put(np.zeros((s_n, vocab), np.float32), "b"),
            presence=self._put(np.zeros((s_n, vocab), bool), "b") if penalty else None,
        )
        st_host = dict(
            gen=np.zeros(s_n, np.int32),
            ctx=np.zeros(s_n, np.int32),
            done=np.ones(s_n, bool),
            prompt=np.zeros(s_n, np.int32),
            g=np.zeros(s_n, np.int32),
        )
        queue = list(range(n_rows)) if order is None else [int(i) for i in order]
        if sorted(queue) != list(range(n_rows)):
            raise ValueError(f"order: must be a permutation of range({n_rows})")
        samples = {i: _Sample(i // g_n, i % g_n) for i in range(n_rows)}
        slot_of: list = [None] * s_n
        prompt_pages: dict[tuple, list] = {}  # resident (prompt, shard) -> its pages in that shard's pool
        pending = np.full(b, g_n)  # samples of each prompt not yet admitted
        running = np.zeros((b, lay.shards), np.int64)  # samples of each prompt running on each shard
        reserved = [0] * lay.shards
        steps = blocks = cow = 0
        prefill_rows = []

        def release_prompt(q: int) -> None:  # a shard's copy of a prompt goes when nothing can use it
            for d in range(lay.shards):
                if (q, d) in prompt_pages and pending[q] == 0 and running[q, d] == 0:
                    pool[d].release(prompt_pages.pop((q, d)))

        while queue or any(x is not None for x in slot_of):
            # 1. admission: free slots in ascending order take the queue's next samples
            admitted = []
            for sl in range(s_n):
                if slot_of[sl] is not None or not queue:
                    continue
                d, smp = sl // per_shard, samples[queue[0]]
                full, partial = divmod(int(plen[smp.prompt]), ps)
                resident = (smp.prompt, d) in prompt_pages
                need = max_pages - full + (0 if resident else pages_for(int(plen[smp.prompt]), ps))
                if pool[d].free - reserved[d] < need:
                    continue  # this shard's pool is full: another shard's free slot may take it
                queue.pop(0)
                slot_of[sl] = smp.prompt * g_n + smp.g
                pending[smp.prompt] -= 1
                running[smp.prompt, d] += 1
                admitted.append(sl)
                reserved[d] += need
                smp.reserve = need
            if not admitted and all(x is None for x in slot_of):
                raise ValueError(
                    f"EngineConfig.num_pages: {num_pages} pages cannot hold one sample's worst case "
                    f"(prompt {p} + {sp.max_new_tokens} new tokens in pages of {ps})"
                )
            new_prompts = sorted(
                {(samples[slot_of[sl]].prompt, sl // per_shard) for sl in admitted} - set(prompt_pages)
            )
            for q, d in new_prompts:  # allocate their pages (charged to the first sample's reservation)
                first = next(
                    samples[slot_of[sl]] for sl in admitted if (samples[slot_of[sl]].prompt, sl // per_shard) == (q, d)
                )
                n_pp = pages_for(int(plen[q]), ps)
                prompt_pages[q, d] = pool[d].alloc(n_pp)
                first.reserve -= n_pp
                reserved[d] -= n_pp
            if new_prompts:
                prefill_rows.append(len(new_prompts))
                a = page_bucket(len(new_prompts), 1 << 30)
                qs = [q for q, _ in new_prompts]
                rows = np.asarray(qs + [b] * (a - len(qs)), np.int32)  # b: dropped
                src = np.minimum(rows, b - 1)
                pg = np.zeros((a, prompt_pages_max), np.int32)
                shard = np.zeros(a, np.int32)
                for r, (q, d) in enumerate(new_prompts):
                    pg[r, : len(prompt_pages[q, d])] = prompt_pages[q, d]
                    shard[r] = d
                with use_mesh_rules(self.model.mesh, self.model.rules):
                    pools, prompt_logits = self._prefill(
                        self.model.params,
                        pools,
                        prompt_logits,
                        *map(self._put, (ids[src], mask[src])),
                        None if pix is None else self._put(pix[src]),
                        *map(self._put, (pg, shard, rows)),
                    )
            admit = dict(
                new=np.zeros(s_n, bool),
                row=np.zeros(s_n, np.int32),
                cow_src=np.zeros(s_n, np.int32),
                cow_dst=np.zeros(s_n, np.int32),
                prompt_ids=np.zeros((s_n, p), np.int32),
                prompt_mask=np.zeros((s_n, p), bool),
            )
            for sl in admitted:
                d, smp = sl // per_shard, samples[slot_of[sl]]
                q = smp.prompt
                full, partial = divmod(int(plen[q]), ps)
                shared = prompt_pages[q, d][:full]
                pool[d].share(shared)
                smp.own = list(shared)
                smp.pages = list(shared)
                if partial:  # copy on write: the divergence page becomes this sample's own
                    (dst,) = pool[d].alloc(1)
                    smp.reserve -= 1
                    reserved[d] -= 1
                    admit["cow_src"][sl], admit["cow_dst"][sl] = prompt_pages[q, d][full], dst
                    cow += 1
                    smp.own.append(dst)
                    smp.pages.append(dst)
                admit["new"][sl], admit["row"][sl] = True, q
                admit["prompt_ids"][sl], admit["prompt_mask"][sl] = ids[q], mask[q]
                st_host["gen"][sl], st_host["ctx"][sl], st_host["done"][sl] = 0, plen[q], False
                st_host["prompt"][sl], st_host["g"][sl] = q, smp.g
            for q in {samples[slot_of[sl]].prompt for sl in admitted}:
                release_prompt(q)  # its last pending sample went to another shard
            for sl in range(s_n):
                if slot_of[sl] is None:
                    st_host["done"][sl] = True
            # 2. pages for the next K tokens of every live sample
            width = 1
            for sl, i in enumerate(slot_of):
                if i is None:
                    continue
                d, smp = sl // per_shard, samples[i]
                upto = min(int(st_host["ctx"][sl]) + k_steps, int(plen[smp.prompt]) + sp.max_new_tokens)
                grow = pages_for(upto, ps) - len(smp.pages)
                if grow > 0:
                    got = pool[d].alloc(grow)
                    smp.pages += got
                    smp.own += got
                    smp.reserve -= grow
                    reserved[d] -= grow
                width = max(width, len(smp.pages))
            n = page_bucket(width, max_pages)
            table = np.zeros((s_n, n), np.int32)
            for sl, i in enumerate(slot_of):
                if i is not None:
                    table[sl, : len(samples[i].pages)] = samples[i].pages
            state = dict(state, **{k: self._put(v, "b") for k, v in st_host.items()})
            admit = {k: self._put(v, "b") for k, v in admit.items()}
            with use_mesh_rules(self.model.mesh, self.model.rules):
                pools, state, (tok, lp, ref) = self._block(
                    dparams, pools, state, prompt_logits, admit, self._put(table, "b"), jnp.uint32(seed), sp=sp
                )
            steps += k_steps
            blocks += 1
            # 3. the host reads back this block's tokens; finished samples give their pages back
            tok, lp, ref, after = dist.gather_to_host((tok, lp, ref, {k: state[k] for k in st_host}), self.model.mesh)
            st_host = {k: np.array(v) for k, v in after.items()}  # writable: the next admission edits it
            gen_after, done_after = st_host["gen"], st_host["done"]
            for sl, i in enumerate(slot_of):
                if i is None:
                    continue
                d, smp = sl // per_shard, samples[i]
                k = int(gen_after[sl]) - len(smp.tokens)
                smp.tokens += tok[sl, :k].tolist()
                smp.lp += lp[sl, :k].tolist()
                smp.ref += ref[sl, :k].tolist()
                smp.done = bool(done_after[sl])
                smp.eos = bool(smp.tokens) and smp.tokens[-1] in sp.eos_ids
                if smp.done:
                    pool[d].release(smp.own)
                    reserved[d] -= smp.reserve
                    smp.own, smp.reserve, slot_of[sl] = [], 0, None
                    running[smp.prompt, d] -= 1
                    release_prompt(smp.prompt)
        self.stats = dict(
            decode_steps=steps,
            blocks=blocks,
            prefill_batches=prefill_rows,
            peak_pages=sum(x.peak for x in pool),
            pages_in_use_at_end=sum(x.in_use for x in pool),
            cow_copies=cow,
            num_pages=num_pages * lay.shards,
            shards=lay.shards,
            page_bytes=self.page_bytes(),
            dense_bytes=self.dense_bytes(n_rows, -(-(p + sp.max_new_tokens) // c.bucket) * c.bucket),
        )
        out = self._output(samples, ids, mask, t, sp, n_rows)
        if mine is not None:  # this host's rows: its own prompts' samples
            out = jax.tree.map(lambda x: x[mine.start * g_n : mine.stop * g_n], out)
        return out

    def _all_hosts_prompts(self, ids, mask, t, pixel_values, pad_id):
        """This host's left-padded prompts (and tiles) -> every host's, in process order, and
        this host's slice of them. Every host must bring the same number of prompts (and of
        tiles per prompt); the prompts' widths may differ (padded on the left to the widest)."""
        if self.model.mesh is None:
            raise ValueError("PagedEngine: several processes need a mesh over their devices (model.mesh)")
        b = ids.shape[0]
        shapes = dist.allgather_json([b, None if pixel_values is None else list(np.shape(pixel_values))])
        if len({str(x) for x in shapes}) > 1:
            raise ValueError("PagedEngine: every host must sample the same number of prompts and tiles per prompt")
        width = dist.agree_max(ids.shape[1])
        pad = width - ids.shape[1]
        ids = np.concatenate([np.full((b, pad), pad_id, ids.dtype), ids], axis=1)
        mask = np.concatenate([np.zeros((b, pad), bool), mask], axis=1)
        ids, mask = (np.asarray(process_allgather(x, tiled=True)) for x in (ids, mask))
        pix = None
        if pixel_values is not None:
            pix = np.asarray(process_allgather(np.asarray(pixel_values, np.float32), tiled=True))
        me = jax.process_index()
        return ids, mask, dist.agree_max(t), pix, slice(me * b, (me + 1) * b)

    def _put(self, x, *dims):
        """Host values -> device arrays on the engine's mesh (leading axis split over the batch
        shards when ``dims`` says "b"; replicated otherwise); as they are without a mesh."""
        if self.model.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, self.layout.sharding(*dims))

    def page_bytes(self) -> int:
        """Bytes of one page over all layers, keys and values."""
        t = self.model.config.text
        return 2 * t.num_layers * self.cfg.page_size * t.num_kv_heads * t.resolved_head_dim * self.kv_dtype.itemsize

    def dense_bytes(self, rows: int, cache_len: int) -> int:
        """Bytes of the static sampler's dense cache for ``rows`` rows of ``cache_len`` slots."""
        t = self.model.config.text
        return (
            2
            * t.num_layers
            * rows
            * cache_len
            * t.num_kv_heads
            * t.resolved_head_dim
            * jnp.dtype(self.model.config.dtype).itemsize
        )

    @staticmethod
    def _output(samples, ids, mask, t, sp, n_rows) -> SampleOutput:
        m, g_n = sp.max_new_tokens, n_rows // ids.shape[0]
        out = np.full((n_rows, m), sp.pad_id, np.int32)
        lp, ref = np.zeros((n_rows, m), np.float32), np.zeros((n_rows, m), np.float32)
        lengths, finished = np.zeros(n_rows, np.int32), np.zeros(n_rows, bool)
        for i, smp in samples.items():
            k = len(smp.tokens)
            out[i, :k], lp[i, :k], ref[i, :k], lengths[i], finished[i] = smp.tokens, smp.lp, smp.ref, k, smp.eos
        rep = np.repeat(ids, g_n, axis=0)
        p = ids.shape[1]
        return SampleOutput(
            tokens=jnp.asarray(np.concatenate([rep[:, p - t :], out], axis=1)),
            logprobs=jnp.asarray(lp),
            ref_logprobs=jnp.asarray(ref),
            lengths=jnp.asarray(lengths),
            finished=jnp.asarray(finished),
            prompt_lengths=jnp.asarray(np.repeat(mask.sum(axis=1), g_n).astype(np.int32)),
        )
