"""Every test process sees 4 CPU devices, so data-parallel code runs as on a real mesh."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
if os.environ.get("PYTEST_XDIST_WORKER") and "multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
    # one worker per core already: XLA's own threads in each would only contend (the
    # tiny programs gain nothing from them; a subset of the suite ran 181 s -> 165 s)
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "ICL_JAX_CACHE" not in os.environ:  # the text data's and jax's caches: not the user's
    import atexit
    import shutil
    import tempfile
    os.environ["ICL_JAX_CACHE"] = tempfile.mkdtemp(prefix="icl_jax_test_cache_")
    # the process that made it removes it (xdist's workers inherit the variable)
    atexit.register(shutil.rmtree, os.environ["ICL_JAX_CACHE"], ignore_errors=True)
# Every test process (this one, `icl-jax` subprocesses, sweep members) shares one persistent
# compilation cache: the same tiny programs, compiled by dozens of tests, are compiled once
# and loaded after (a loaded program is the compiled one: results are unchanged). Set
# before jax is imported (icl_jax.sweep does not import it).
from icl_jax.sweep import cache_env  # noqa: E402
for _name, _value in cache_env(os.path.join(os.environ["ICL_JAX_CACHE"], "jax")).items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
SMALL = "small"  # the built-in config every test starts from (icl_jax/configs/small.py)


# the small config shrunk so that a run takes a second or two
TINY = {"model.d_model": "32", "model.n_heads": "2", "model.context": "32",
        "model.vocab_size": "32", "train.steps": "12", "train.batch_size": "8",
        "train.log_every": "2", "train.eval_every": "4", "eval.n_examples": "8",
        "eval.icl_early_index": "2", "eval.icl_late_index": "20",
        "eval.probe_tokens": "7", "eval.probe_sequences": "2",
        "data.segment_len_min": "3", "data.segment_len_max": "8",
        "checkpoint.every": "4", "checkpoint.log_spaced": "2"}


def tiny_config(arg="layers=2", **overrides):
    """The small config shrunk so that a run takes a second or two."""
    from icl_jax import config as config_lib
    cfg = config_lib.load(f"{SMALL}:{arg}")
    defaults = dict(TINY)
    defaults.update({k: str(v) for k, v in overrides.items()})
    config_lib.override(cfg, defaults)
    return config_lib.validate(cfg)


def tiny_args(arg="layers=2", **overrides):
    """tiny_config as `icl-jax train` arguments: --config and its --config.x=y overrides."""
    values = {**TINY, **{k: str(v) for k, v in overrides.items()}}
    return (["--config", f"{SMALL}:{arg}"]
            + [f"--config.{k}={v}" for k, v in values.items()])


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="session")
def trained_2l(tmp_path_factory):
    """(root, root/runs/2l): a 2-layer model trained 20 steps, 6 snapshots; shared by the
    analysis and export tests (and the notebook example in docs/getting-started.md, which reads runs/2l)."""
    from icl_jax import config as config_lib, train
    root = tmp_path_factory.mktemp("trained")
    config = config_lib.load(f"{SMALL}:layers=2")
    config.train.steps = 20
    config.model.d_model = 32
    config.eval.n_examples = 16
    config.checkpoint.every = 10
    config.checkpoint.log_spaced = 3
    config.train.eval_every = 10
    config_lib.validate(config)
    workdir = root / "runs" / "2l"
    train.train_and_evaluate(config, str(workdir), progress=False)
    return root, workdir
