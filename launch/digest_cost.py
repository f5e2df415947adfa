"""Cost of a snapshot's digest (checkpoints.state_digest) per save, on this CPU."""
import argparse
import time

import jax
import optax

from icl_jax import checkpoints, config as config_lib, model as model_lib

argparse.ArgumentParser(description=__doc__).parse_args()
for name, arg, over in (("quick 2L", "small:layers=2", {}),
                  ("2L at the paper's width (d_model 768, 12 heads, vocab 2^16)",
                   "small:layers=2", {"model.d_model": "768", "model.n_heads": "12", "model.vocab_size": "65536"})):
    cfg = config_lib.load(arg)
    config_lib.override(cfg, over)
    cfg = config_lib.validate(cfg)
    params = model_lib.init_params(model_lib.make_model(cfg.model), jax.random.key(0))
    state = jax.device_get({"params": params, "opt": optax.adamw(1e-3).init(params)})
    n = sum(a.size for a in jax.tree_util.tree_leaves(state))
    checkpoints.state_digest(state)
    t = time.perf_counter()
    for _ in range(3):
        checkpoints.state_digest(state)
    dt = (time.perf_counter() - t) / 3
    print(f"{name}: {n * 4 / 2**20:.0f} MiB of state, digest {dt * 1e3:.0f} ms a save "
          f"({n * 4 / 2**20 / dt:.0f} MiB/s)")
