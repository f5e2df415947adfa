"""Loading configs (`file.py:arg` plus `--config.a.b=value` overrides) and validating them.

Every user mistake becomes a ConfigError whose one-line message names the field
and what would be valid; validate() runs before any data is read or anything is
compiled.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re

import ml_collections


class ConfigError(ValueError):
    """A user's config mistake; the message names the field."""


# The built-in configs and sweeps ship inside the package, so that an installed icl_jax
# finds them by name from any folder; nothing is looked up in a checkout.
BUILTIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def builtin(kind: str = "config") -> dict:
    """{name: path} of the built-in config files (kind "config": small, paper, text, ...)
    or sweep files (kind "sweep": quick, text, text-cpu, paper, paper_small, seeds, lrs)."""
    folder = os.path.join(BUILTIN, "sweeps") if kind == "sweep" else BUILTIN
    return {f[:-3]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(".py") and not f.startswith("_")}


def summary(path: str) -> str:
    """The first line of a config or sweep file's docstring, read without running it."""
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    first = " ".join(doc.split("\n\n", 1)[0].split()).replace("`", "")
    return first if len(first) <= 100 else first[:97].rsplit(" ", 1)[0] + " ..."


def find_file(path: str, kind: str = "config") -> str:
    """The file a spec's path part names: a built-in config or sweep by name ('small',
    'quick'), else the path itself, a user's own file. 'configs/small.py' and
    'configs/sweeps/quick.py', where the checkout kept them before 0.2, name the built-in
    files when no such file exists (so do such paths into an old checkout)."""
    names = builtin(kind)
    if path in names:
        return names[path]
    old = re.fullmatch(r"(?:.*/)?configs/(sweeps/)?([\w-]+)\.py", path)
    if old and not os.path.exists(path) and bool(old[1]) == (kind == "sweep") \
            and old[2] in names:
        return names[old[2]]
    return path


def load_file(path: str, kind: str = "config"):
    """The Python file `path` as a module, executed: a config or sweep file is code, so
    load only files you trust. Every failure is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{kind} file {path!r} does not exist; the built-in {kind}s are "
                          f"{', '.join(builtin(kind))}")
    mod_spec = importlib.util.spec_from_file_location(f"_icl_jax_{kind}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # a broken file is still the user's mistake
        raise ConfigError(f"{kind} file {path!r} failed to load: {e}") from None
    return module


def call_file_function(path: str, function: str, arg, kind: str = "config"):
    """Runs `function(arg)` from the Python file `path`; every failure is a ConfigError."""
    module = load_file(path, kind)
    if not hasattr(module, function):
        raise ConfigError(f"{kind} file {path!r} has no {function}(arg) function")
    try:
        return getattr(module, function)(arg or None)
    except ValueError as e:
        raise ConfigError(f"{kind} file {path!r}: {e}") from None


def load(spec: str) -> ml_collections.ConfigDict:
    """'small:layers=2' (a built-in config) or 'my_config.py:layers=2' (a file) -> the
    ConfigDict that file's get_config('layers=2') returns."""
    path, _, arg = spec.partition(":")
    return call_file_function(find_file(path), "get_config", arg)


def load_validated(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """load(spec), then override({'train.steps': 4000, ...}) (values as text or as values),
    then validate: the one way every command turns a config file into a config."""
    return with_overrides(load(spec), overrides)


def with_overrides(config, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """override(config, ...) with values as text or as values, then validate: what
    load_validated does to a config file's, and `train --workdir` to a saved run's."""
    override(config, {k: v if isinstance(v, str) else _fmt_value(v)
                      for k, v in (overrides or {}).items()})
    return validate(config)


def _fmt_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, (list, tuple)) \
        else str(v)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Fields in which ensemble members may differ ("data." is a prefix); all else must match.
# "llc." shapes only the analysis, so neither an ensemble nor a resumed run need agree on it.
ENSEMBLE_FREE = ("seed", "train.lr", "train.weight_decay", "train.weight_decay_after", "data.",
                 "llc.")


# Sections that say how a run is measured, not which run it is: nothing in them reaches the
# parameters (the trainer's evaluations only log), so a finished or resumed run may be
# measured with other values, and `analyze` may override them (--config.eval.n_examples=...).
MEASUREMENT = ("eval", "llc")


def run_identity(d: dict) -> dict:
    """A config dict without its MEASUREMENT sections: what decides a run's parameters."""
    return {k: v for k, v in d.items() if k not in MEASUREMENT}


def measurement_overrides(overrides: dict | None) -> dict:
    """`overrides` if each names a MEASUREMENT field; ConfigError naming the first that does
    not (it would change the run itself, which analysing cannot)."""
    for key in overrides or {}:
        if key.split(".")[0] not in MEASUREMENT:
            raise ConfigError(f"--config.{key}: analysing a run can change only how it is "
                              f"measured ({', '.join(s + '.*' for s in MEASUREMENT)}); "
                              f"{key} would make it another run: train one")
    return dict(overrides or {})


def ensemble_free(field: str) -> bool:
    return field in ENSEMBLE_FREE or field.startswith(
        tuple(f for f in ENSEMBLE_FREE if f.endswith(".")))


def from_json(text: str) -> ml_collections.ConfigDict:
    return from_dict(json.loads(text))


def from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A saved config (as a dict) as a ConfigDict, upgraded to today's fields."""
    return ml_collections.ConfigDict(upgrade(saved))


def from_saved(saved: dict, source: str) -> ml_collections.ConfigDict:
    """A saved config (config.json, a snapshot's copy) upgraded and validated; a ConfigError
    names `source` (a hand-edited or damaged file is the user's to mend)."""
    try:
        if not isinstance(saved, dict):
            raise ConfigError("is not a config (a JSON object of sections)")
        return validate(from_dict(saved))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e.args[0]}") from None


# Fields added after runs were saved without them, with the value that reproduces those
# runs (or a function of the saved config giving it), so that a saved config still resumes
# and compares equal.
# data.generate "auto" makes the same batches as before on a CPU (numpy's); a run saved on an
# accelerator resumes with batches made on the device: the same distribution, other draws
ADDED_FIELDS = {("model", "attention"): "auto", ("data", "roots"): "", ("data", "generate"): "auto",
                ("model", "mlp_out_init"): 1.0,
                # synthetic runs saved before data.placement existed pasted every copy after
                # its source; other sources never read it, so they get today's default
                ("data", "placement"):
                    lambda saved: "after" if saved["data"].get("name", "synthetic") == "synthetic" else "uniform"}

# The `llc` section (llc.py: the local learning coefficient of every snapshot). It only
# shapes analysis, so a config without it (a run saved before it, a user's own file) gets
# these values.
LLC_DEFAULTS = dict(
    sampler="sgld",  # sgld | rmsprop_sgld (devinterp's two)
    eps=3e-3,  # SGLD step size
    gamma=300.0,  # localisation: pull toward the snapshot's weights
    n_beta=0.0,  # inverse temperature; 0: batch_size / ln(batch_size), as devinterp
    chains=4,
    burn_in=0,  # steps before draws are kept
    draws=100,
    batch_size=32,
    examples=1024,  # held-out sequences the minibatches come from
    rms_alpha=0.99,  # rmsprop_sgld: decay of the squared-gradient average
    rms_eps=0.1,  # rmsprop_sgld: added to its square root
)


def upgrade(saved: dict) -> dict:
    """A saved config (a dict, as a workdir holds it) with the fields added since filled in."""
    for (section, field), value in ADDED_FIELDS.items():
        if isinstance(saved.get(section), dict) and field not in saved[section]:
            saved[section][field] = value(saved) if callable(value) else value
    if "llc" not in saved:
        saved["llc"] = dict(LLC_DEFAULTS)
    return saved


def _parse_value(text: str, old):
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(old, int):
        return int(float(text)) if float(text).is_integer() else int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    return ast.literal_eval(text)


def override(config: ml_collections.ConfigDict, assignments: dict[str, str]):
    """Applies {'train.steps': '4000'} in place, converting to each field's type."""
    for dotted, text in assignments.items():
        *parents, leaf = dotted.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config field {'.'.join(parents[:i + 1])!r} "
                                  f"(in --config.{dotted})")
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"unknown config field {dotted!r}; fields here: "
                              f"{', '.join(sorted(node.keys()))}")
        try:
            value = _parse_value(text, node[leaf])
        except (ValueError, SyntaxError):
            raise ConfigError(f"config field {dotted!r}: cannot read {text!r} as "
                              f"{type(node[leaf]).__name__}") from None
        with node.unlocked():
            node[leaf] = value
    return config


ATTENTION = ("auto", "blocked", "dot_product_attention", "cudnn")  # model.attention; see model.py


def cudnn_fits(dtype: str, d_head: int) -> bool:
    """Whether cuDNN's fused (flash) attention takes a model's heads: inputs in a 16-bit
    float and a head dimension that is a multiple of 8 and at most 128 (Hopper takes 256;
    128 holds on every GPU), jax's check_is_flash_attention. The paper's d_head 64 and
    Hoogland's 32 fit in bfloat16."""
    return dtype == "bfloat16" and d_head % 8 == 0 and d_head <= 128


GENERATE = ("auto", "device", "host")  # data.generate; see device_data.py

# field -> (type, allowed values or None); the schema every config must follow.
SCHEMA = {
    "seed": int,
    "model": {"n_layers": int, "d_model": int, "n_heads": int, "d_head": int, "mlp": bool,
              "d_mlp": int, "mlp_out_init": float, "layer_norm": bool, "positions": str, "pos_init_std": float,
              "smear_keys": bool, "smear_init": float, "context": int, "vocab_size": int,
              "dtype": str, "attention": str},
    "data": {"name": str, "background": str, "markov_branching": int, "segments_min": int,
             "segments_max": int, "segment_len_min": int, "segment_len_max": int,
             "fresh_fraction": float, "placement": str, "generate": str,
             "path": str, "bin_dtype": str, "tokenizer": str, "bpe_vocab_size": int,
             "holdout_fraction": float, "roots": str},
    "train": {"steps": int, "batch_size": int, "lr": float, "schedule": str,
              "warmup_steps": int, "weight_decay": float, "weight_decay_drop_step": int,
              "weight_decay_after": float, "grad_clip": float, "b1": float, "b2": float,
              "log_every": int, "eval_every": int, "skip_nonfinite": bool},
    "eval": {"n_examples": int, "icl_early_index": int, "icl_late_index": int,
             "probe_tokens": int, "probe_repeats": int, "probe_sequences": int,
             "probe_exclude_frac": float, "bos_token": int,
             "induction_prefix_threshold": float, "induction_copying_threshold": float},
    "checkpoint": {"every": int, "log_spaced": int, "max_to_keep": int, "async_save": bool},
    "llc": {"sampler": str, "eps": float, "gamma": float, "n_beta": float, "chains": int,
            "burn_in": int, "draws": int, "batch_size": int, "examples": int,
            "rms_alpha": float, "rms_eps": float},
}
OPTIONAL_SECTIONS = {"run"}
SCHEMA_FIELDS = [f"{section}.{field}" for section, fields in SCHEMA.items()
                 if isinstance(fields, dict) for field in fields] + ["seed"]  # free-form: launch and sweep metadata


def _check_schema(node, schema, prefix=""):
    for key in node.keys():
        name = prefix + key
        if key not in schema:
            if not prefix and key in OPTIONAL_SECTIONS:
                continue
            raise ConfigError(f"unknown config field {name!r}; valid fields: "
                              f"{', '.join(sorted(schema))}")
        want = schema[key]
        value = node[key]
        if isinstance(want, dict):
            if not isinstance(value, (dict, ml_collections.ConfigDict)):
                raise ConfigError(f"config field {name!r} must be a section")
            _check_schema(value, want, name + ".")
        elif want is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"config field {name!r} must be {want.__name__}, got {value!r}")
    for key, want in schema.items():
        if key not in node:
            raise ConfigError(f"config field {prefix + key!r} is missing")


def _need(ok, field, message):
    if not ok:
        raise ConfigError(f"config field {field!r} {message}")


def validate(config) -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first bad field; fills model.d_head when it is 0."""
    if "llc" not in config:
        with config.unlocked():
            config.llc = ml_collections.ConfigDict(LLC_DEFAULTS)
    _check_schema(config, SCHEMA)
    m, d, t, e, c = config.model, config.data, config.train, config.eval, config.checkpoint
    _need(m.n_layers >= 1, "model.n_layers", f"must be at least 1, got {m.n_layers}")
    for f in ("d_model", "n_heads", "d_mlp", "context", "vocab_size"):
        _need(m[f] >= 1, f"model.{f}", f"must be positive, got {m[f]}")
    _need(m.positions in ("shortformer", "residual"), "model.positions",
          f"must be 'shortformer' or 'residual', got {m.positions!r}")
    _need(m.dtype in ("float32", "bfloat16"), "model.dtype",
          f"must be 'float32' or 'bfloat16', got {m.dtype!r}")
    _need(m.attention in ATTENTION, "model.attention",
          f"must be one of {', '.join(ATTENTION)}, got {m.attention!r}")
    _need(m.pos_init_std >= 0, "model.pos_init_std", "must be >= 0")
    _need(m.mlp_out_init >= 0, "model.mlp_out_init", f"must be >= 0, got {m.mlp_out_init}")
    _need(m.d_head >= 0, "model.d_head", "must be positive, or 0 for d_model / n_heads")
    if m.d_head == 0:  # the paper's d_head = d_model / n_heads, filled in here
        _need(m.d_model % m.n_heads == 0, "model.d_model",
              f"({m.d_model}) must be a multiple of model.n_heads ({m.n_heads}) "
              "when model.d_head is 0")
        m.d_head = m.d_model // m.n_heads
    _need(m.attention != "cudnn" or cudnn_fits(m.dtype, m.d_head), "model.attention",
          "'cudnn' needs model.dtype bfloat16 and a model.d_head that is a multiple of 8 "
          f"and at most 128, got {m.dtype} and {m.d_head} ('auto' picks it where it fits)")

    _need(d.name in ("synthetic", "pystdlib", "pycode", "files"), "data.name",
          f"must be synthetic, pystdlib, pycode or files, got {d.name!r}")
    _need(d.name != "files" or d.path, "data.path", "must name a file, directory or glob "
          "when data.name is 'files'")
    _need(d.generate in GENERATE, "data.generate",
          f"must be one of {', '.join(GENERATE)}, got {d.generate!r}")
    _need(d.generate != "device" or d.name == "synthetic", "data.generate",
          f"'device' makes only synthetic data, not data.name={d.name!r}; use 'auto' or 'host'")
    _need(d.generate != "device" or d.placement == "uniform", "data.generate",
          f"'device' needs data.placement='uniform', got {d.placement!r}; use 'auto' or 'host'")
    _need(d.tokenizer in ("bytes", "bpe"), "data.tokenizer",
          f"must be 'bytes' or 'bpe', got {d.tokenizer!r}")
    if d.name in ("pystdlib", "pycode") or (d.name == "files" and d.tokenizer == "bytes"
                                 and not d.path.endswith((".npy", ".bin"))):
        if d.tokenizer == "bytes":
            _need(m.vocab_size >= 256, "model.vocab_size",
                  f"must be at least 256 for byte-level text, got {m.vocab_size}")
        else:
            _need(m.vocab_size >= d.bpe_vocab_size, "model.vocab_size",
                  f"({m.vocab_size}) must be at least data.bpe_vocab_size ({d.bpe_vocab_size})")

    # jax.random.key keeps the low 32 bits: seeds 2**32 apart would be one run
    _need(0 <= config.seed < 2**32, "seed", f"must be in [0, 2**32), got {config.seed}")
    _need(t.steps >= 1, "train.steps", f"must be positive, got {t.steps}")
    _need(t.batch_size >= 1, "train.batch_size", f"must be positive, got {t.batch_size}")
    _need(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be positive and finite, got {t.lr}")
    for f in ("b1", "b2"):  # Adam's moment decay rates
        _need(0 <= t[f] < 1, f"train.{f}", f"must be in [0, 1), got {t[f]}")
    for f in ("weight_decay", "weight_decay_after"):
        _need(t[f] >= 0 and math.isfinite(t[f]), f"train.{f}", f"must be >= 0, got {t[f]}")
    _need(t.schedule in ("constant", "cosine", "paper"), "train.schedule",
          f"must be constant, cosine or paper, got {t.schedule!r}")
    _need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _need(t.grad_clip >= 0 and math.isfinite(t.grad_clip), "train.grad_clip",
          "must be >= 0 (0 turns clipping off)")
    _need(t.log_every >= 1, "train.log_every", "must be positive")
    _need(t.eval_every >= 1, "train.eval_every", "must be positive")
    _need(t.schedule != "paper" or 0 < t.weight_decay_drop_step < t.steps,
          "train.weight_decay_drop_step", "must lie inside (0, train.steps) for the paper schedule")

    _need(0 <= e.icl_early_index < e.icl_late_index, "eval.icl_early_index",
          f"({e.icl_early_index}) must be >= 0 and below eval.icl_late_index ({e.icl_late_index})")
    _need(e.icl_late_index < m.context, "model.context",
          f"({m.context}) must be longer than eval.icl_late_index ({e.icl_late_index})")
    probe_len = 1 + e.probe_tokens * e.probe_repeats
    _need(e.probe_repeats >= 2, "eval.probe_repeats", "must be at least 2")
    _need(e.probe_tokens >= 1, "eval.probe_tokens", "must be positive")
    _need(probe_len <= m.context, "eval.probe_tokens",
          f"x eval.probe_repeats + 1 ({probe_len}) must fit in model.context ({m.context})")
    _need(0 <= e.probe_exclude_frac < 0.5, "eval.probe_exclude_frac", "must be in [0, 0.5)")
    usable = m.vocab_size - 2 * int(e.probe_exclude_frac * m.vocab_size) - 1
    _need(e.probe_tokens <= usable, "eval.probe_tokens",
          f"({e.probe_tokens}) needs that many distinct probe tokens; the vocabulary leaves {usable}")
    _need(0 <= e.bos_token < m.vocab_size, "eval.bos_token", "must be a token of the vocabulary")
    _need(e.n_examples >= 1, "eval.n_examples", "must be positive")
    _need(e.probe_sequences >= 1, "eval.probe_sequences", "must be positive")

    _need(c.every >= 1, "checkpoint.every", f"must be positive, got {c.every}")
    _need(c.log_spaced >= 0, "checkpoint.log_spaced", "must be >= 0")
    _need(c.max_to_keep >= 0, "checkpoint.max_to_keep", "must be >= 0 (0 keeps all)")
    validate_llc(config.llc)
    return config


def validate_llc(s):
    """ConfigError naming the first bad field of an `llc` section."""
    _need(s.sampler in ("sgld", "rmsprop_sgld"), "llc.sampler",
          f"must be sgld or rmsprop_sgld, got {s.sampler!r}")
    _need(s.eps > 0, "llc.eps", f"must be positive, got {s.eps}")
    _need(s.gamma >= 0, "llc.gamma", f"must be >= 0, got {s.gamma}")
    _need(s.n_beta >= 0, "llc.n_beta", "must be >= 0 (0: batch_size / ln(batch_size))")
    for f in ("chains", "draws", "batch_size", "examples"):
        _need(s[f] >= 1, f"llc.{f}", f"must be positive, got {s[f]}")
    _need(s.burn_in >= 0, "llc.burn_in", "must be >= 0")
    _need(s.batch_size <= s.examples, "llc.batch_size",
          f"({s.batch_size}) must not exceed llc.examples ({s.examples})")
    _need(0 <= s.rms_alpha < 1, "llc.rms_alpha", "must be in [0, 1)")
    _need(s.rms_eps > 0, "llc.rms_eps", "must be positive")
