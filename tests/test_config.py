import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from icl_jax import config as config_lib
from icl_jax.model import init_params, make_model
from conftest import SMALL


def test_config_file_argument_picks_the_family():
    cfg = config_lib.validate(config_lib.load(SMALL + ":layers=3,mlp=true,smear=true"))
    assert (cfg.model.n_layers, cfg.model.mlp, cfg.model.smear_keys) == (3, True, True)
    assert cfg.model.positions == "shortformer" and cfg.model.d_head == 16


def test_overrides_convert_to_the_field_type():
    cfg = config_lib.load(SMALL)
    config_lib.override(cfg, {"train.steps": "4000", "train.lr": "3e-4", "model.mlp": "true",
                              "data.name": "pystdlib"})
    assert cfg.train.steps == 4000 and cfg.train.lr == 3e-4 and cfg.model.mlp is True


@pytest.mark.parametrize("overrides, field", [
    ({"train.stepz": "1"}, "train.stepz"),
    ({"trian.steps": "1"}, "trian"),
    ({"train.steps": "many"}, "train.steps"),
    ({"model.mlp": "maybe"}, "model.mlp"),
])
def test_bad_overrides_name_the_field(overrides, field):
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
        config_lib.override(config_lib.load(SMALL), overrides)


@pytest.mark.parametrize("overrides, field", [
    ({"train.steps": "0"}, "train.steps"),
    ({"train.steps": "-5"}, "train.steps"),
    ({"model.n_heads": "3"}, "model.d_model"),
    ({"model.context": "40"}, "model.context"),
    ({"model.vocab_size": "16", "eval.probe_tokens": "15"}, "eval.probe_tokens"),
    ({"data.name": "pystdlib"}, "model.vocab_size"),
    ({"data.name": "webtext"}, "data.name"),
    ({"model.positions": "rotary"}, "model.positions"),
    ({"eval.icl_early_index": "60"}, "eval.icl_early_index"),
    ({"train.schedule": "paper"}, "train.weight_decay_drop_step"),
    ({"checkpoint.every": "0"}, "checkpoint.every"),
    ({"model.n_layers": "0"}, "model.n_layers"),
])
def test_invalid_configs_are_rejected_naming_the_field(overrides, field):
    cfg = config_lib.override(config_lib.load(SMALL), overrides)
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
        config_lib.validate(cfg)


def test_unknown_field_added_in_a_config_file_is_rejected(tmp_path):
    path = tmp_path / "c.py"
    # a user's config built on a built-in one, as the docs show it
    path.write_text("from icl_jax.configs import small\n"
                    "def get_config(arg):\n    c = small.get_config(arg)\n    c.model.rope = True\n    return c\n")
    with pytest.raises(config_lib.ConfigError, match="model.rope"):
        config_lib.validate(config_lib.load(str(path)))


def test_missing_config_file_and_bad_argument():
    with pytest.raises(config_lib.ConfigError, match="nope.py"):
        config_lib.load("nope.py")
    with pytest.raises(config_lib.ConfigError, match="depth"):
        config_lib.load(SMALL + ":depth=2")


FIELDS = {
    "model.n_layers": st.integers(-1, 4), "model.d_model": st.sampled_from([0, 8, 12, 16, 24]),
    "model.n_heads": st.integers(0, 5), "model.d_head": st.integers(-1, 8),
    "model.context": st.integers(0, 70), "model.vocab_size": st.integers(0, 300),
    "model.mlp": st.booleans(), "model.layer_norm": st.booleans(), "model.smear_keys": st.booleans(),
    "model.positions": st.sampled_from(["shortformer", "residual", "alibi"]),
    "model.dtype": st.sampled_from(["float32", "bfloat16", "float8"]),
    "model.attention": st.sampled_from(["auto", "blocked", "dot_product_attention", "flash"]),
    "eval.icl_early_index": st.integers(-1, 30), "eval.icl_late_index": st.integers(0, 70),
    "eval.probe_tokens": st.integers(0, 20), "eval.probe_repeats": st.integers(0, 5),
    "eval.bos_token": st.integers(-1, 300), "train.steps": st.integers(-2, 3),
    "train.lr": st.sampled_from([-1.0, 0.0, 1e-3]), "data.name": st.sampled_from(["synthetic", "pystdlib", "x"]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_every_config_either_runs_or_is_rejected_naming_a_field(values):
    cfg = config_lib.override(config_lib.load(SMALL), {k: str(v) for k, v in values.items()})
    try:
        config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        message = str(e)
        assert "\n" not in message
        named = [f for f in config_lib.SCHEMA_FIELDS if f"'{f}'" in message or f"{f} " in message
                 or f"({f})" in message]
        assert named, f"no field named in: {message}"
        return
    model = make_model(cfg.model)
    params = init_params(model, jax.random.key(0))
    logits, cache = model.apply({"params": params},
                                jnp.zeros((1, cfg.model.context), jnp.int32))
    assert logits.shape == (1, cfg.model.context, cfg.model.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_load_validated_takes_overrides_as_text_or_values_and_validates():
    text = config_lib.load_validated(SMALL + ":layers=2", {"train.steps": "40", "model.mlp":
                                                           "true", "train.lr": "3e-4"})
    values = config_lib.load_validated(SMALL + ":layers=2", {"train.steps": 40, "model.mlp": True,
                                                             "train.lr": 3e-4})
    assert text.to_dict() == values.to_dict()
    assert (values.train.steps, values.model.mlp, values.train.lr) == (40, True, 3e-4)
    assert values.model.d_head == values.model.d_model // values.model.n_heads  # validated
    with pytest.raises(config_lib.ConfigError, match="'train.steps'"):
        config_lib.load_validated(SMALL, {"train.steps": 0})


def test_built_in_configs_and_sweeps_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from icl_jax import sweep
    monkeypatch.chdir(tmp_path)  # no checkout here: names resolve inside the package
    assert config_lib.load("paper:layers=3").model.n_layers == 3
    assert set(config_lib.builtin()) >= {"small", "paper", "text", "text_cpu", "text_hoogland"}
    assert sweep.load_sweep("quick")["base"] == "small"
    # the checkout's old paths name the files that moved into the package
    assert config_lib.load("configs/small.py:layers=1").model.n_layers == 1
    assert list(sweep.load_sweep("configs/sweeps/seeds.py:2")["members"]) == ["seed=0", "seed=1"]
    with pytest.raises(config_lib.ConfigError, match=r"'smal' does not exist; the built-in "
                                                     r"configs are paper, small, text"):
        config_lib.load("smal:layers=2")
    with pytest.raises(config_lib.ConfigError, match="sweep file 'quick.py' does not exist"):
        sweep.load_sweep("quick.py")
    # a file of one's own wins over a built-in name only as a path
    (tmp_path / "small.py").write_text("from icl_jax.configs import small\n"
                                       "def get_config(arg):\n    c = small.get_config(arg)\n"
                                       "    c.model.d_model = 48\n    return c\n")
    assert config_lib.load("small.py").model.d_model == 48
    assert config_lib.load("small").model.d_model == 64


def test_version_and_the_configs_listing(capsys):
    import icl_jax
    from icl_jax import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"icl-jax {icl_jax.__version__}"
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "small " in out and "The quick model family" in out and "paper_small " in out
    assert config_lib.BUILTIN in out
