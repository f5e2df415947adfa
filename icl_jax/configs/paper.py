"""The paper's small-model shapes, for accelerators (the paper profile).

Usage: --config paper:layers=2 (the same arguments as small).
d_model 768, 12 heads of 64, shortformer positions, ~10,000 steps with the paper's
schedule (warm-up, weight decay lowered at step 4750) and 200 snapshots (every 50
steps). The paper trained at context 8192 on ~1M tokens a step with a 2^16 vocabulary;
here the context is 2048 and the data the standard library through a locally trained
BPE (8192 tokens), so a single accelerator finishes a model in hours; raise
model.context, train.batch_size and data.bpe_vocab_size where memory allows.
"""
from icl_jax.configs import small


def get_config(arg=None):
    c = small.get_config(arg)
    c.model.d_model = 768
    c.model.n_heads = 12
    c.model.d_head = 64
    c.model.d_mlp = 3072
    c.model.context = 2048
    c.model.vocab_size = 8192
    c.model.layer_norm = True
    c.model.dtype = "bfloat16"
    c.data.name = "pystdlib"
    c.data.tokenizer = "bpe"
    c.data.bpe_vocab_size = 8192
    c.train.steps = 10_000
    c.train.batch_size = 64
    c.train.lr = 5e-4
    c.train.schedule = "paper"
    c.train.warmup_steps = 1500
    c.train.weight_decay = 0.1
    c.train.weight_decay_drop_step = 4750
    c.train.weight_decay_after = 0.01
    c.train.log_every = 10
    c.train.eval_every = 50
    c.eval.n_examples = 1000
    c.eval.icl_early_index = 50
    c.eval.icl_late_index = 500
    c.eval.probe_tokens = 25
    c.eval.probe_repeats = 4
    c.eval.probe_sequences = 10
    c.eval.bos_token = 0
    c.checkpoint.every = 50
    c.checkpoint.log_spaced = 8
    c.llc.chains, c.llc.draws = 8, 200  # Hoogland et al.'s chains and draws; accelerators afford them
    return c
