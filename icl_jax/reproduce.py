"""icl-jax reproduce: train the paper's small-model family, analyse it, and check the claims.

A profile is the built-in sweep of its name (icl_jax/configs/sweeps/<profile>.py): the
family (1l, 2l, 3l, 1l-smear, 2l-smear, 2l-mlp) on one base config. The sweep runner trains each member in
<workdir>/<name> (finished members are skipped, unfinished ones resume; sweep.json keeps
each one's training time); then all are analysed together (one shared PCA), the claims
checked (claims.py), and <workdir>/results.md, claims.json, family.png and report.html
say, from the numbers, whether each of the paper's four claims holds in this run.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax

from icl_jax import analysis, claims, config as config_lib, head_llc, report, sweep, train
from icl_jax import workdir as workdir_lib
from icl_jax.config import ConfigError
from icl_jax.configs.sweeps import PROFILES


def sweep_file(profile: str) -> str:
    """The profile's built-in sweep, by name; ConfigError for an unknown profile."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile


def _overrides(seed: int, overrides: dict | None) -> dict:
    return {**{k: str(v) for k, v in (overrides or {}).items()}, "seed": str(seed)}


def member_configs(profile: str, seed: int = 0, overrides: dict | None = None) -> dict:
    """{member name: validated config} of a profile; raises ConfigError on a bad override."""
    members = sweep.resolve(sweep_file(profile), "", _overrides(seed, overrides))
    return {m.name: m.config for m in members}


# ----------------------------------------------------------------------------- the command

CPU_TOKENS = 5e8  # above this many training tokens in all, a CPU takes days: say so first


def scale_warning(configs: dict, platform: str) -> str | None:
    """A warning when the members' configs ask a CPU for accelerator-sized training (the
    text and paper profiles: billions of tokens), with the tokens each member sees."""
    tokens = {n: c.train.steps * c.train.batch_size * c.model.context for n, c in configs.items()}
    if platform != "cpu" or sum(tokens.values()) < CPU_TOKENS:
        return None
    each = max(tokens.values())
    return (f"warning: this profile trains {len(tokens)} members of up to {each / 1e9:.2f}B "
            f"tokens each ({sum(tokens.values()) / 1e9:.1f}B in all), sized for an accelerator; "
            "on this CPU that is days (a 2-core machine trains ~30k tokens/s). Shorten it with "
            "--config.train.steps=N, or run it where jax sees a GPU or TPU")


def parse_seeds(text: str) -> list[int]:
    """'0-9', '0,3,5' or '0-4,7' -> sorted seeds; ConfigError for anything else."""
    seeds = set()
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            a = b = -1
        if a < 0 or b < a or b >= 2 ** 32:
            raise ConfigError(f"--seeds {text!r}: give seeds as 0-9, 0,3,5 or 0-4,7 "
                              "(non-negative, each range low-high)")
        seeds.update(range(a, b + 1))
    if not seeds:
        raise ConfigError(f"--seeds {text!r} names no seed")
    return sorted(seeds)


def seed_workdir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"s{seed}")


def train_seed_ensembles(profile: str, workdir: str, seeds, overrides=None,
                         progress: bool = True):
    """Each member's unfinished seeds trained together as one vmapped ensemble
    (train.train_ensemble) into seed_workdir(workdir, seed)/<member>: on an accelerator
    several small models fill the device better than one."""
    spec = sweep_file(profile)
    by_seed = {s: sweep.resolve(spec, seed_workdir(workdir, s), _overrides(s, overrides))
               for s in seeds}
    for i, name in enumerate(m.name for m in by_seed[seeds[0]]):
        group = [m for s in seeds for m in by_seed[s] if m.name == name
                 and not sweep.finished(m)]
        if group:
            if progress:
                print(f"[{name}] seeds {', '.join(str(s) for s in seeds)} as one ensemble "
                      f"(member {i + 1} of {len(by_seed[seeds[0]])})", file=sys.stderr,
                      flush=True)
            train.train_ensemble([m.config for m in group], [m.workdir for m in group],
                                 progress=progress)


def reproduce_seeds(profile: str = "quick", workdir: str = "runs/seeds", seeds=(0, 1),
                    overrides: dict | None = None, progress: bool = True, llc: bool = False,
                    ensemble: bool | None = None, jobs: int | None = None) -> dict:
    """reproduce() for each seed, in seed_workdir(workdir, seed), then the claims' robustness
    over the seeds (claims.robustness) into <workdir>/results.md, claims.json and report.html.
    A seed that fails to train is recorded as not run, with its error. ensemble: each
    member's seeds train as one vmapped ensemble first (default: on an accelerator; a CPU
    trains them one after another)."""
    seeds = list(seeds)
    for s in seeds:  # config errors first, before anything trains
        sweep.resolve(sweep_file(profile), seed_workdir(workdir, s), _overrides(s, overrides))
    if ensemble is None:
        ensemble = jax.devices()[0].platform != "cpu"
    if ensemble and len(seeds) > 1:
        train_seed_ensembles(profile, workdir, seeds, overrides, progress)
    per_seed, t0 = {}, time.time()
    for k, seed in enumerate(seeds):
        if progress:
            print(f"== seed {seed} ({k + 1} of {len(seeds)})", file=sys.stderr, flush=True)
        try:
            per_seed[seed] = reproduce(profile, seed_workdir(workdir, seed), seed, overrides,
                                       progress=progress, llc=llc, jobs=jobs)["claims"]
        except train.TrainingError as e:
            per_seed[seed] = e.args[0] if e.args else str(e)
    rob = claims.robustness(per_seed)
    text = "\n".join([
        f"# Robustness: profile `{profile}`, seeds {', '.join(map(str, seeds))}", "",
        f"Each seed is one `icl-jax reproduce --seed S` in `{seed_workdir(workdir, 'S')}` "
        f"({(time.time() - t0) / 60:.1f} minutes in all). Per claim, the seeds on which it "
        "is supported, not supported and inconclusive; per seed, each claim's verdict and "
        "the checks that decided a verdict short of supported (each seed's results.md has "
        "every check).", ""] + claims.robustness_markdown(rob)) + "\n"
    workdir_lib.write_text(workdir_lib.path(workdir) / "results.md", text)
    workdir_lib.write_text(workdir_lib.path(workdir) / "claims.json",
                           json.dumps({"paper": claims.PAPER, "robustness": rob}, indent=1))
    report.write_robustness(workdir, text, {s: f"s{s}/report.html" for s in seeds
                                            if not isinstance(per_seed[s], str)})
    if progress:
        print(text)
    return {"robustness": rob, "claims": per_seed}


def training_jobs(platform: str, members: int) -> int:
    """Members trained at once: on a CPU one per core (each in its own process, its XLA
    single-threaded: a small model's step uses one core about as well as two, so two
    members on two cores take the time of one), at most `members`; on an accelerator one,
    in this process (its whole device for each)."""
    if platform != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, members))


def reproduce(profile: str = "quick", workdir: str = "runs/reproduce", seed: int = 0,
              overrides: dict | None = None, progress: bool = True, llc: bool = False,
              jobs: int | None = None) -> dict:
    """Trains the profile's family (finished members skipped, unfinished resumed), analyses
    it, checks the claims and writes results.md, claims.json and report.html in `workdir`.
    llc: also the local learning coefficient of every snapshot of the 1l and 2l members, and
    every head's wrLLC of the 2l and 3l members (head_llc.REPRODUCE_VIEW: 12 snapshots, 2
    chains a head). jobs: members trained at once (default training_jobs: one per core on a
    CPU, longest first, each in its own process; 1: one after another in this process).
    Every member's training is the same bit for bit whichever way it runs."""
    spec, texts = sweep_file(profile), _overrides(seed, overrides)
    members = sweep.resolve(spec, workdir, texts)  # config errors first
    names = [m.name for m in members]
    # measured as the profile says now: finished members keep the eval and llc values they
    # were trained with in their folders (config.MEASUREMENT), which may be older
    measure = [config_lib.flatten({k: m.config[k].to_dict() for k in config_lib.MEASUREMENT})
               for m in members]
    measure = measure[0] if all(x == measure[0] for x in measure) else None
    warning = scale_warning({m.name: m.config for m in members}, jax.devices()[0].platform)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if jobs is None:
        jobs = training_jobs(jax.devices()[0].platform, len(members))
    # jobs 1: one member after another in this process (no process and jax start per
    # member); more: that many processes at once, the costliest members first
    index = sweep.run_sweep(spec, workdir, jobs=jobs, overrides=texts, progress=progress,
                            in_process=jobs == 1)
    members = index["members"]
    unfinished = {n: members[n] for n in names if members[n].get("status") != "done"}
    if unfinished:
        raise train.TrainingError("not every member finished training: " + "; ".join(
            f"{n} {m.get('status')}" + (f" ({m['error']})" if m.get("error") else "")
            for n, m in unfinished.items()) + "; run reproduce again to resume")
    train_seconds = sum(members[n].get("wall_s") or 0.0 for n in names)

    t_analysis = time.time()
    result = analysis.analyze([os.path.join(workdir, n) for n in names], out=workdir,
                              progress=progress,
                              llc={"1l", "2l"} if llc else False, measure=measure,
                              llc_heads={n: head_llc.REPRODUCE_VIEW for n in ("2l", "3l")}
                              if llc else None)
    rows, found = claims.check_claims(result)
    device = f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    text = claims.results_markdown(rows, found, profile, train_seconds,
                                   time.time() - t_analysis, device=device)
    claims.write_results(workdir, rows, found, text)
    report.write_report(result, preamble=text, progress=progress)
    if progress:
        print(text)
    return {"rows": rows, "claims": found, "analysis": result}
