"""Why an untrained model's ICL score is negative: measured on the quick profile's models.

    python launch/untrained_icl.py            # a markdown table, seeds 0-2 of each member

At initialisation, for each member and seed, on the quick profile's evaluation set: the ICL
score (loss at index 50 minus loss at 5), each index's mean variance of the logits over the
vocabulary, what random Gaussian logits of those variances would give ((var_50 - var_5) / 2:
the cross-entropy of logits with variance v is about ln V + v / 2), how many positions layer
0's heads attend to (exp of the pattern's entropy) at each index, and the score with every
W_O set to zero (attention writes nothing) and with W_U scaled by 0.1 (near-uniform
predictions), and against random targets instead of the data's. docs/measurements.md has
the table and what it shows.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from icl_jax import config as config_lib, data as data_lib, scores  # noqa: E402
from icl_jax.model import cross_entropy, init_params, make_model  # noqa: E402


def _scaled(params, name, factor):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * factor if name in jax.tree_util.keystr(path) else x, params)


def measure(arg: str, seed: int) -> dict:
    cfg = config_lib.load_validated("small:" + arg,
                                    {"seed": str(seed)})
    tokens = scores.evaluation_inputs(cfg, data_lib.make_source(cfg))["eval_BT1"]
    model = make_model(cfg.model)
    params = init_params(model, jax.random.key(seed))  # the trainer's initialisation
    e, late = cfg.eval.icl_early_index, cfg.eval.icl_late_index

    def icl(p, targets=tokens[:, 1:]):
        logits, cache = model.apply({"params": p}, tokens[:, :-1])
        loss = np.asarray(cross_entropy(logits, jnp.asarray(targets)))
        return float(loss[:, late].mean() - loss[:, e].mean()), logits, cache

    score, logits, cache = icl(params)
    var = np.asarray(jnp.var(logits, axis=-1))
    att = np.asarray(cache["attention"])[:, 0]  # [B, H, T, S], layer 0
    spread = np.exp(-(att * np.log(np.maximum(att, 1e-30))).sum(-1))  # [B, H, T]
    rng = np.random.default_rng(seed)
    random_targets = rng.integers(0, cfg.model.vocab_size, tokens[:, 1:].shape)
    return {"icl": score, "var_early": float(var[:, e].mean()), "var_late": float(var[:, late].mean()),
            "gaussian": float((var[:, late].mean() - var[:, e].mean()) / 2),
            "attended_early": float(spread[:, :, e].mean()),
            "attended_late": float(spread[:, :, late].mean()),
            "no_W_O": icl(_scaled(params, "W_O", 0.0))[0],
            "W_U_tenth": icl(_scaled(params, "W_U", 0.1))[0],
            "random_targets": icl(params, random_targets)[0]}


MEMBERS = {"1l": "layers=1", "2l": "layers=2", "3l": "layers=3", "2l-smear": "layers=2,smear=true",
           "2l-mlp": "layers=2,mlp=true"}


def main():
    cols = ("icl", "gaussian", "var_early", "var_late", "attended_early", "attended_late",
            "no_W_O", "W_U_tenth", "random_targets")
    print("| member | seed | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for name, arg in MEMBERS.items():
        for seed in range(3):
            m = measure(arg, seed)
            print(f"| {name} | {seed} | " + " | ".join(f"{m[c]:+.2f}" if c in ("icl", "gaussian",
                  "no_W_O", "W_U_tenth", "random_targets") else f"{m[c]:.2f}" for c in cols)
                  + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
