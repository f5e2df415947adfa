"""Natural text: the Python standard library's source, as bytes (the text profile).

Usage: --config configs/text.py:layers=2  (same arguments as configs/small.py)
Positions, widths and the training recipe follow configs/small.py; what changes is
the data and the scale it needs: a 256-byte vocabulary, a 256-byte context, and
the ICL score at indices 20 and 200 (the paper's 1:10 ratio).
"""
import importlib.util
import os


def _small():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small.py")
    spec = importlib.util.spec_from_file_location("_small_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    c = _small().get_config(arg)
    c.data.name = "pystdlib"
    c.data.tokenizer = "bytes"
    c.model.vocab_size = 256
    c.model.context = 256
    c.model.d_model = 128
    c.model.n_heads = 4
    c.train.steps = 20_000
    c.train.batch_size = 32
    c.train.lr = 1e-3
    c.train.warmup_steps = 500
    c.train.eval_every = 500
    c.eval.icl_early_index = 20
    c.eval.icl_late_index = 200
    c.eval.probe_tokens = 25  # the paper's probe: 25 tokens, 4 repeats
    c.eval.probe_repeats = 4
    c.eval.bos_token = 0  # files are joined by NUL in the byte stream
    c.checkpoint.every = 500
    return c
