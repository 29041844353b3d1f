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
  first n table columns, n a power-of-two bucket of the longest live sequence), next logits.
  Layers run unrolled over per-layer weights (:mod:`r1v2_jax.sampling.unrolled`).
* **Keys.** Sample g of prompt b draws token j with key(seed) -> fold_in(b) -> fold_in(g) ->
  fold_in(j), exactly as :class:`Sampler`: the tokens do not depend on the slot count, the
  arrival order or which slot a sample lands in, and equal the static sampler's.

KV pages are stored in ``kv_dtype`` (default: the model's compute dtype). With float32 pages
the model log-probs equal the learner's recomputation to float32 rounding (tests: 1e-5);
bfloat16 pages halve the pool, and change the model log-probs by up to ~1e-2 on the test
model (tests/test_engine.py states the bound it checks).

Single host, no mesh: the engine runs the model's parameters where they are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from r1v2_jax.model.qwen2 import init_cache
from r1v2_jax.model.vlm import R1V2, R1V2Model
from r1v2_jax.sampling import unrolled
from r1v2_jax.sampling.paged import PagedKV, PagePool, init_pools, page_bucket, pages_for
from r1v2_jax.sampling.sampler import SampleOutput, SamplingParams, _left_pad, sample_step


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the paged engine runs (none of it changes what is sampled).

    slots: decode slots (rows of the compiled step); steps_per_sync: K, decode steps between
    two host interventions; page_size: tokens per KV page; num_pages: the pool (page 0 is
    reserved), None: enough for every slot's worst case plus as many resident prompts, so
    admission never waits for pages; kv_dtype: KV page dtype (None: the model's compute dtype);
    bucket: prompt lengths are padded to a multiple of it (fewer prefill compiles).
    """

    slots: int = 32
    steps_per_sync: int = 8
    page_size: int = 16
    num_pages: int | None = None
    kv_dtype: str | None = None
    bucket: int = 32

    def __post_init__(self):
        for name in ("slots", "steps_per_sync", "page_size", "bucket"):
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
        if model.mesh is not None:
            raise ValueError("PagedEngine: runs on one host without a mesh (model.mesh must be None)")
        self.model, self.cfg = model, config
        self.module = R1V2(model.config)
        self.kv_dtype = jnp.dtype(config.kv_dtype or model.config.dtype)
        self._split = jax.jit(functools.partial(unrolled.split_layers, config=model.config))
        self._split_for: tuple = (None, None)
        self._prefill = jax.jit(self._prefill_impl, donate_argnames=("pools", "prompt_logits"))
        self._block = jax.jit(self._block_impl, static_argnames=("sp",), donate_argnames=("pools", "state"))
        self.stats: dict = {}

    # --- compiled programs ------------------------------------------------------------------
    def _prefill_impl(self, params, pools, prompt_logits, ids, mask, pix, pages, rows):
        """Prefill prompts ids i32[A, P] (left-padded, ``mask``) and store their K/V into pages
        i32[A, P / page_size] (page 0: nowhere); their last logits go to prompt_logits[rows]."""
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
        for layer, (kp, vp) in enumerate(pools):

            def paged(x, layer=layer):
                x = jnp.take_along_axis(x[layer], idx[:, :, None, None], axis=1)  # [A, n*ps, H, d]
                return x.reshape(a, n, ps, *x.shape[2:]).astype(self.kv_dtype)

            new.append((kp.at[pages].set(paged(k)), vp.at[pages].set(paged(v))))
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
        pools = [
            (kp.at[admit["cow_dst"]].set(kp[admit["cow_src"]]), vp.at[admit["cow_dst"]].set(vp[admit["cow_src"]]))
            for kp, vp in pools
        ]
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
            caches = [PagedKV(kp, vp, table, write_page, ctx % ps, ctx + 1) for kp, vp in pools]
            x = unrolled.embed(cfg, dparams["top"], tok[:, None])
            x, caches = unrolled.run_layers(cfg, dparams["layers"], x, ctx[:, None], lambda i: (None, caches[i], None))
            st["logits"] = unrolled.head(cfg, dparams["top"], x)[:, -1].astype(jnp.float32)
            st["ctx"] = ctx + live.astype(jnp.int32)
            out = tuple(o.at[:, j].set(x_) for o, x_ in zip(out, (tok, lp, ref)))
            return [(c.k_pages, c.v_pages) for c in caches], st, out

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
        # slots, return their pages) shares the page pool, slot table and queue as locals of one
        # scope; each phase is a few lines around a compiled call.

        c, mc = self.cfg, self.model.config
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        ids, mask, t = _left_pad(input_ids, attention_mask, c.bucket, sp.pad_id)
        self.model.check_inputs(np.where(mask, ids, 0), pixel_values)
        pix = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        if pix is not None and pix.ndim != 5:
            raise ValueError("pixel_values: the paged engine takes per-prompt tiles [B, K, 3, S, S]")
        b, p = ids.shape
        g_n, n_rows, ps, s_n, k_steps = num_samples, b * num_samples, c.page_size, c.slots, c.steps_per_sync
        plen = mask.sum(axis=1)
        max_pages = pages_for(p + sp.max_new_tokens, ps)
        prompt_pages_max = pages_for(p, ps)
        num_pages = c.num_pages or 1 + s_n * (max_pages + prompt_pages_max)
        pool = PagePool(num_pages)
        pools = init_pools(
            mc.text.num_layers, num_pages, ps, mc.text.num_kv_heads, mc.text.resolved_head_dim, self.kv_dtype
        )
        dparams = self.decode_params()
        vocab = mc.text.vocab_size
        prompt_logits = jnp.zeros((b, vocab), jnp.float32)
        penalty = sp.repetition_penalty != 1.0
        state = dict(
            logits=jnp.zeros((s_n, vocab), jnp.float32),
            presence=jnp.zeros((s_n, vocab), bool) if penalty else None,
            gen=jnp.zeros(s_n, jnp.int32),
            ctx=jnp.zeros(s_n, jnp.int32),
            done=jnp.ones(s_n, bool),
            prompt=jnp.zeros(s_n, jnp.int32),
            g=jnp.zeros(s_n, jnp.int32),
        )
        queue = list(range(n_rows)) if order is None else [int(i) for i in order]
        if sorted(queue) != list(range(n_rows)):
            raise ValueError(f"order: must be a permutation of range({n_rows})")
        samples = {i: _Sample(i // g_n, i % g_n) for i in range(n_rows)}
        slot_of: list = [None] * s_n
        prompt_pages: dict[int, list] = {}  # resident prompts -> their pages
        prompt_left = np.full(b, g_n)  # samples of each prompt not yet finished
        reserved = 0
        steps = blocks = cow = 0
        prefill_rows = []
        while queue or any(x is not None for x in slot_of):
            # 1. admission: free slots in ascending order take the queue's next samples
            admitted = []
            for sl in range(s_n):
                if slot_of[sl] is not None or not queue:
                    continue
                smp = samples[queue[0]]
                full, partial = divmod(int(plen[smp.prompt]), ps)
                need = max_pages - full + (0 if smp.prompt in prompt_pages else pages_for(int(plen[smp.prompt]), ps))
                if pool.free - reserved < need:
                    break
                queue.pop(0)
                slot_of[sl] = smp.prompt * g_n + smp.g
                admitted.append(sl)
                reserved += need
                smp.reserve = need
            if not admitted and all(x is None for x in slot_of):
                raise ValueError(
                    f"EngineConfig.num_pages: {num_pages} pages cannot hold one sample's worst case "
                    f"(prompt {p} + {sp.max_new_tokens} new tokens in pages of {ps})"
                )
            new_prompts = sorted({samples[slot_of[sl]].prompt for sl in admitted} - set(prompt_pages))
            for q in new_prompts:  # allocate their pages (charged to the first sample's reservation)
                first = next(samples[slot_of[sl]] for sl in admitted if samples[slot_of[sl]].prompt == q)
                n_pp = pages_for(int(plen[q]), ps)
                prompt_pages[q] = pool.alloc(n_pp)
                first.reserve -= n_pp
                reserved -= n_pp
            if new_prompts:
                prefill_rows.append(len(new_prompts))
                a = page_bucket(len(new_prompts), 1 << 30)
                rows = np.asarray(new_prompts + [b] * (a - len(new_prompts)), np.int32)  # b: dropped
                src = np.minimum(rows, b - 1)
                pg = np.zeros((a, prompt_pages_max), np.int32)
                for r, q in enumerate(new_prompts):
                    pg[r, : len(prompt_pages[q])] = prompt_pages[q]
                pools, prompt_logits = self._prefill(
                    self.model.params,
                    pools,
                    prompt_logits,
                    ids[src],
                    mask[src],
                    None if pix is None else pix[src],
                    pg,
                    rows,
                )
            admit = dict(
                new=np.zeros(s_n, bool),
                row=np.zeros(s_n, np.int32),
                cow_src=np.zeros(s_n, np.int32),
                cow_dst=np.zeros(s_n, np.int32),
                prompt_ids=np.zeros((s_n, p), np.int32),
                prompt_mask=np.zeros((s_n, p), bool),
            )
            st_host = {k: np.array(v) for k, v in state.items() if k in ("gen", "ctx", "done", "prompt", "g")}
            for sl in admitted:
                smp = samples[slot_of[sl]]
                q = smp.prompt
                full, partial = divmod(int(plen[q]), ps)
                shared = prompt_pages[q][:full]
                pool.share(shared)
                smp.own = list(shared)
                smp.pages = list(shared)
                if partial:  # copy on write: the divergence page becomes this sample's own
                    (dst,) = pool.alloc(1)
                    smp.reserve -= 1
                    reserved -= 1
                    admit["cow_src"][sl], admit["cow_dst"][sl] = prompt_pages[q][full], dst
                    cow += 1
                    smp.own.append(dst)
                    smp.pages.append(dst)
                admit["new"][sl], admit["row"][sl] = True, q
                admit["prompt_ids"][sl], admit["prompt_mask"][sl] = ids[q], mask[q]
                st_host["gen"][sl], st_host["ctx"][sl], st_host["done"][sl] = 0, plen[q], False
                st_host["prompt"][sl], st_host["g"][sl] = q, smp.g
            for sl in range(s_n):
                if slot_of[sl] is None:
                    st_host["done"][sl] = True
            # 2. pages for the next K tokens of every live sample
            width = 1
            for sl, i in enumerate(slot_of):
                if i is None:
                    continue
                smp = samples[i]
                upto = min(int(st_host["ctx"][sl]) + k_steps, int(plen[smp.prompt]) + sp.max_new_tokens)
                grow = pages_for(upto, ps) - len(smp.pages)
                if grow > 0:
                    got = pool.alloc(grow)
                    smp.pages += got
                    smp.own += got
                    smp.reserve -= grow
                    reserved -= grow
                width = max(width, len(smp.pages))
            n = page_bucket(width, max_pages)
            table = np.zeros((s_n, n), np.int32)
            for sl, i in enumerate(slot_of):
                if i is not None:
                    table[sl, : len(samples[i].pages)] = samples[i].pages
            state = dict(state, **{k: jnp.asarray(v) for k, v in st_host.items()})
            pools, state, (tok, lp, ref) = self._block(
                dparams, pools, state, prompt_logits, admit, table, jnp.uint32(seed), sp=sp
            )
            steps += k_steps
            blocks += 1
            # 3. the host reads back this block's tokens; finished samples give their pages back
            tok, lp, ref = np.asarray(tok), np.asarray(lp), np.asarray(ref)
            gen_after, done_after = np.asarray(state["gen"]), np.asarray(state["done"])
            for sl, i in enumerate(slot_of):
                if i is None:
                    continue
                smp = samples[i]
                k = int(gen_after[sl]) - len(smp.tokens)
                smp.tokens += tok[sl, :k].tolist()
                smp.lp += lp[sl, :k].tolist()
                smp.ref += ref[sl, :k].tolist()
                smp.done = bool(done_after[sl])
                smp.eos = bool(smp.tokens) and smp.tokens[-1] in sp.eos_ids
                if smp.done:
                    pool.release(smp.own)
                    reserved -= smp.reserve
                    smp.own, smp.reserve, slot_of[sl] = [], 0, None
                    prompt_left[smp.prompt] -= 1
                    if prompt_left[smp.prompt] == 0:  # its last sample: the prompt's pages go back
                        pool.release(prompt_pages.pop(smp.prompt))
        self.stats = dict(
            decode_steps=steps,
            blocks=blocks,
            prefill_batches=prefill_rows,
            peak_pages=pool.peak,
            pages_in_use_at_end=pool.in_use,
            cow_copies=cow,
            num_pages=num_pages,
            page_bytes=self.page_bytes(),
            dense_bytes=self.dense_bytes(n_rows, -(-(p + sp.max_new_tokens) // c.bucket) * c.bucket),
        )
        return self._output(samples, ids, mask, t, sp, n_rows)

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
