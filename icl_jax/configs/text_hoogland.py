"""Natural text at Hoogland et al.'s shape (the text profile, for accelerators).

Usage: --config text_hoogland:layers=2  (layers, mlp, smear, ln, steps, batch, lr)
Hoogland et al. (2024, "The developmental landscape of in-context learning") saw a vanilla
2-layer attention-only model form induction heads on natural text at: d_model 256, 8 heads of
32, shortformer positions, LayerNorm, a 5k BPE vocabulary, context 1024, batch 100, AdamW
lr 1e-3 with weight decay 0.05; its ICL score fell between steps ~8,500 and ~17,500 (0.9-1.8B
tokens). This is that shape on the pycode corpus (every .py file the interpreter reaches,
tokenized once; text_pycode.py), for 20,000 steps (2.05B tokens) in bfloat16. The ICL
score is taken at tokens 50 and 500, the paper's indices.
"""
from icl_jax.configs import small, text_pycode

HOOGLAND = dict(vocab=5000, context=1024, d_model=256, heads=8, lr=1e-3, warmup=200,
                batch=100, steps=20_000, ln="true")


def get_config(arg=None):
    args = small.parse_arg(arg)
    c = text_pycode.get_config(",".join(f"{k}={v}" for k, v in {**HOOGLAND, **args}.items()))
    c.model.d_head = 32
    c.model.d_mlp = 4 * c.model.d_model  # the MLP member: the usual 4x width
    c.model.dtype = "bfloat16"
    c.eval.icl_early_index = 50
    c.eval.icl_late_index = 500
    c.eval.n_examples = 512  # an accelerator scores 512 x 1024 tokens in well under a second
    c.train.eval_every = 250
    c.checkpoint.every = 500  # 40 snapshots over the run, plus the log-spaced early ones
    return c
