"""One process of the two-process paged-engine test (tests/test_multihost.py): joins the job,
lays a tiny model's parameters (the same seed on every host) on a mesh over both processes'
devices, samples this host's prompts with the engine and writes its rows to ``out``."""

import sys

import numpy as np

from r1v2_jax.parallel import multihost as dist


def engine_case(cfg):
    """Four image prompts, a ragged sampled workload, 8 slots: what both sides of the test run."""
    from r1v2_jax.sampling.sampler import SamplingParams

    rng = np.random.default_rng(5)
    ids = rng.integers(0, cfg.image_token_id - 1, (4, 14))
    ids[:, 2 : 2 + cfg.tokens_per_tile()] = cfg.image_token_id
    pix = rng.standard_normal((4, 1, 3, cfg.tile_size, cfg.tile_size)).astype(np.float32)
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, eos_ids=(5, 9, 40, 77, 120))
    return ids, pix, sp, dict(slots=8, steps_per_sync=4, page_size=8)


def main(coordinator: str, process_id: int, out: str) -> None:
    dist.initialize(coordinator, 2, process_id)
    import jax

    from r1v2_jax.model.config import model_config
    from r1v2_jax.model.vlm import R1V2Model, init_params, param_shardings
    from r1v2_jax.parallel.sharding import make_mesh
    from r1v2_jax.sampling.engine import EngineConfig, PagedEngine

    cfg = model_config("tiny")
    mesh = make_mesh(4, 1, 2)
    params = jax.device_put(init_params(cfg, jax.random.key(0)), param_shardings(cfg, mesh))
    ids, pix, sp, ec = engine_case(cfg)
    mine = slice(2 * process_id, 2 * process_id + 2)  # host i brings prompts 2i, 2i + 1
    res = PagedEngine(R1V2Model(cfg, params, mesh), EngineConfig(**ec))(
        ids[mine], pixel_values=pix[mine], sp=sp, num_samples=4, seed=3
    )
    np.savez(out, **{f: np.asarray(getattr(res, f)) for f in ("tokens", "lengths", "ref_logprobs")})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
