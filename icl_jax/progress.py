"""Training progress on stderr: step k of N, tokens/s, ETA, loss, MFU, and which member of a
sweep (or of `icl-jax reproduce`'s family) is training.

On a terminal the line is tqdm's bar, redrawn in place; anywhere else (a log file, CI, a
sweep's train.log) it is a plain line every `every_s` seconds and at every evaluation, so a
log holds no carriage returns. A sweep says which member is training with `member(...)`
(members trained in this process) or `member_env(...)` (a member's own process).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm import tqdm

MEMBER_ENV = "ICL_JAX_MEMBER"  # "k/N name", for a member trained in a process of its own
_member: str | None = None


@contextlib.contextmanager
def member(names, positions, total: int):
    """Within it, every bar says "member k of N (name)": names, the member(s) training now
    (several: one ensemble), positions their places (1-based) among `total`."""
    global _member
    names = [names] if isinstance(names, str) else list(names)
    positions = [positions] if isinstance(positions, int) else list(positions)
    old, _member = _member, _label(names, positions, total)
    try:
        yield
    finally:
        _member = old


def member_env(name: str, position: int, total: int) -> dict:
    """The environment variable that tells a member's own process which member it is."""
    return {MEMBER_ENV: f"{position}/{total} {name}"}


def _label(names, positions, total) -> str:
    if len(names) == 1:
        return f"member {positions[0]} of {total} ({names[0]})"
    return (f"members {', '.join(map(str, positions))} of {total} "
            f"({', '.join(names)}: one ensemble)")


def current_member() -> str | None:
    """"member k of N (name)" where a sweep set it, else None."""
    if _member is not None:
        return _member
    text = os.environ.get(MEMBER_ENV, "")
    where, _, name = text.partition(" ")
    k, _, n = where.partition("/")
    return _label([name], [int(k)], int(n)) if k.isdigit() and n.isdigit() and name else None


class BoundedPeak:
    """A device's peak FLOP/s (flops.Peak) that no measured training rate exceeds.

    A peak measured at start-up on a busy machine runs low (the trainer once printed "MFU
    115.7%"); when training outruns it, the peak is raised to the rate achieved and the
    label says so, so that MFU stays at most 100% and says what it is a fraction of.
    """

    def __init__(self, peak):
        self.flops_per_s, self.base_label, self.raised = peak.flops_per_s, peak.label, False

    @property
    def label(self) -> str:
        if not self.raised:
            return self.base_label
        return (f"{_si(self.flops_per_s)}FLOP/s, the best rate seen (the start-up "
                f"measurement, {self.base_label}, ran low)")

    def mfu(self, flops_per_token: float, tokens_per_s: float) -> float:
        achieved = flops_per_token * tokens_per_s
        if achieved > self.flops_per_s:
            self.flops_per_s, self.raised = achieved, True
        return achieved / self.flops_per_s


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


class Bar:
    """The training loop's progress. update(step, record) with a metrics record (train_loss,
    and where measured tokens_per_s, mfu, icl_score, prefix_matching_max); close() at the end.

    peak: what MFU is a fraction of (its label is shown); start: the step training resumes
    at (the ETA counts only the steps this process trains); member: "member k of N (name)",
    by default what a sweep set (current_member).
    """

    def __init__(self, total: int, enabled: bool = True, peak=None, start: int = 0,
                 stream=None, every_s: float = 30.0, member: str | None = None):
        self.total, self.enabled, self.peak, self.start = total, enabled, peak, start
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.last_print = every_s, 0.0
        self.member = member if member is not None else current_member()
        self.tty = _isatty(self.stream)
        self.t0, self.step0 = None, start
        self._bar = None
        if self.enabled and self.tty:
            self._bar = tqdm(total=total, initial=start, file=self.stream, unit="step",
                             desc=self.member or "training", dynamic_ncols=True, leave=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                        "[{elapsed}<{remaining}]{postfix}")

    def fields(self, step: int, record: dict) -> list[str]:
        """The record's numbers as "name value" strings, in the order shown."""
        parts = []
        if record.get("train_loss") is not None:
            parts.append(f"loss {record['train_loss']:.3f}")
        if record.get("tokens_per_s"):
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"MFU {record['mfu']:.1%}"
                         + (f" of {self.peak.label}" if self.peak is not None else ""))
        if record.get("icl_score") is not None:
            parts.append(f"icl {record['icl_score']:+.3f}")
        if record.get("prefix_matching_max") is not None:
            parts.append(f"prefix-match {record['prefix_matching_max']:.2f}")
        return parts

    def eta_s(self, step: int, now: float | None = None) -> float | None:
        """Seconds left at the rate of the steps trained since the first update (compilation,
        before it, is not counted); None until two updates have been seen."""
        now = time.perf_counter() if now is None else now
        if self.t0 is None or step <= self.step0 or now <= self.t0:
            return None
        return (self.total - step) * (now - self.t0) / (step - self.step0)

    def update(self, step: int, record: dict):
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.step0 = now, step
        parts = self.fields(step, record)
        if self._bar is not None:
            self._bar.set_postfix_str("  ".join(parts), refresh=False)
            self._bar.update(step - self._bar.n)  # redraws, with tqdm's ETA
            return
        if ("icl_score" in record or now - self.last_print >= self.every_s
                or step == self.total):
            self.last_print = now
            eta = self.eta_s(step, now)
            line = "  ".join(
                ([self.member] if self.member else [])
                + [f"step {step:,}/{self.total:,} ({step / max(self.total, 1):.0%})",
                   f"ETA {tqdm.format_interval(eta)}" if eta is not None else "ETA -"]
                + parts)
            print(line, file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
