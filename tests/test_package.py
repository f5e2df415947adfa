"""The wheel works anywhere: built from the checkout, installed into a fresh environment
outside it, and run from an empty folder, as a user of `pip install icl_jax` runs it."""
import glob
import os
import subprocess
import sys
import sysconfig
import zipfile

import icl_jax
from conftest import ROOT

TINY = {"model.d_model": 16, "model.n_heads": 2, "model.context": 32, "model.vocab_size": 32,
        "train.steps": 4, "train.batch_size": 8, "train.eval_every": 2, "eval.n_examples": 8,
        "eval.icl_early_index": 2, "eval.icl_late_index": 20, "eval.probe_tokens": 7,
        "eval.probe_sequences": 2, "data.segment_len_min": 3, "data.segment_len_max": 8,
        "checkpoint.every": 2, "checkpoint.log_spaced": 0}


def _run(*cmd, cwd, env=None):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out.stdout


def test_the_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    # build without fetching a build backend (setuptools is in the test extra)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", tmp_path / "dist", ROOT, cwd=tmp_path)
    (wheel,) = glob.glob(str(tmp_path / "dist" / "icl_jax-*.whl"))
    assert os.path.basename(wheel).startswith(f"icl_jax-{icl_jax.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"icl_jax/configs/small.py", "icl_jax/configs/sweeps/quick.py",
            "icl_jax/configs/sweeps/text-cpu.py", "icl_jax/py.typed"} <= names

    # a fresh environment whose dependencies come from this one's site-packages (nothing is
    # downloaded); a path added by a .pth line has its own .pth files left unread, so this
    # environment's editable icl_jax (the checkout) stays out of it
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                cwd=tmp_path).strip()
    with open(os.path.join(site, "icl_jax_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "-q", wheel, cwd=tmp_path)

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    icl = venv / "bin" / "icl-jax"
    where = _run(python, "-c", "import icl_jax; print(icl_jax.__file__)", cwd=empty, env=env)
    assert where.startswith(str(venv)), where  # the wheel's copy, not the checkout
    assert _run(icl, "--version", cwd=empty, env=env).strip() == f"icl-jax {icl_jax.__version__}"
    assert "paper_small" in _run(icl, "configs", cwd=empty, env=env)
    assert "--profile" in _run(icl, "reproduce", "--help", cwd=empty, env=env)
    dry = _run(icl, "sweep", "--config", "quick", "--workdir", "s", "--dry-run", cwd=empty,
               env=env)
    assert "--config small:layers=2,mlp=true" in dry
    out = _run(icl, "train", "--config", "small:layers=1", "--workdir", "run", "--quiet",
               *[f"--config.{k}={v}" for k, v in TINY.items()], cwd=empty, env=env)
    assert (empty / "run" / "snapshots" / "4").is_dir(), out
    assert os.listdir(empty) == ["run"]  # nothing written anywhere else here


def test_the_front_page_is_short_and_its_links_and_commands_hold():
    import re
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.encode()) <= 12 * 1024  # the details live on the docs site
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not link.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, link)), link
    test_command = next(l for l in readme.splitlines() if "pytest -q" in l).strip()
    assert test_command in open(os.path.join(ROOT, ".ci", "run")).read()
