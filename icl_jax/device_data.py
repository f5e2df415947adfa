"""Synthetic training batches made on the device, inside the compiled training step.

On an accelerator the quick profile's step consumes tokens 50 to 100 times faster than on a
CPU, faster than the numpy pipeline (data.py) makes them. Here the same distribution as
data.SyntheticSource with placement "uniform" is drawn with jax.random inside the step:
no host work and no host-to-device copy per step. The tokens differ from numpy's, the
distribution does not (tests/test_device_data.py compares them).

Every row is a pure function of (seed, step, global row index): a device makes only its
own rows, the global batch does not depend on the device count, and a resumed run draws
exactly the batches an uninterrupted one would. The markov/lag2 successor table is the
numpy source's (same seed, same table), so the held-out set, still made by numpy on the
host, shares the training data's background.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax import data as data_lib
from icl_jax.sources import need

DATA_KEY = 0x64617461  # folded into the seed's key, so the data never shares parameter init's
# the background's parallel fill holds [seq_len, vocab] successor maps per row; past this
# many entries a sequential scan over positions is cheaper in memory
PARALLEL_FILL_MAX = 1 << 18


def use_device(data_config, platform: str) -> bool:
    """Whether batches are made on the device: "device", or "auto" on an accelerator for
    data it can make (synthetic, placement "uniform"); the CPU keeps numpy's pipeline."""
    mode = data_config.get("generate", "auto")
    if mode == "device":
        return True
    return (mode == "auto" and platform != "cpu" and data_config.name == "synthetic"
            and data_config.placement == "uniform" and data_config.background != "mixed")


def _below(words, n):
    """Random words (uint32) as ints uniform on [0, n): the remainder's bias, under
    n / 2**32, is far below what any statistic of the data could see."""
    return (words % jnp.asarray(n, jnp.uint32)).astype(jnp.int32)


class DeviceSynthetic:
    """data.SyntheticSource (placement "uniform", any background) as a jittable generator.

    inputs() holds what varies between runs (seed, successor table) as arrays, so that
    ensemble members of one shape share one compiled step; the shape is static.
    """

    def __init__(self, source: data_lib.SyntheticSource, parallel_fill: bool | None = None):
        need(source.placement == "uniform", "data.generate='device' needs "
             f"data.placement='uniform', got {source.placement!r}")
        need(source.lag >= 1, "data.generate='device' does not make the 'mixed' "
             "background yet (a lag per row); use data.generate='host'")
        self.vocab, self.seq_len, self.lag, self.seed = (source.vocab_size, source.seq_len,
                                                         source.lag, source.seed)
        self.smin, self.smax, self.lmin, self.lmax = source.segments
        self.table = source.table  # None: the uniform background
        self.copy_prob = float(source.copy_prob)
        # both fills make the same tokens from the same draws: the parallel one suits an
        # accelerator (a loop of seq_len tiny steps would be launch-bound), the scan a CPU.
        # copy2 reads two tokens back, a map of pairs the parallel fill does not compose:
        # it takes the scan everywhere
        if parallel_fill is None:
            parallel_fill = jax.default_backend() != "cpu"
        self.parallel_fill = (parallel_fill and self.seq_len * self.vocab <= PARALLEL_FILL_MAX
                              and not self.copy_prob)
        self.shape = (self.vocab, self.seq_len, self.lag, self.copy_prob, *source.segments,
                      None if self.table is None else self.table.shape)

    def inputs(self) -> dict:
        """The run's arrays: the seed (uint32) and the successor table (int32 [vocab,
        branching]; [1, 1] and unused for the uniform background)."""
        table = np.zeros((1, 1), np.int32) if self.table is None else self.table
        return {"seed": np.uint32(self.seed % 2**32), "table": np.asarray(table, np.int32)}

    def rows(self, inputs, step, row_ids):
        """int32 [len(row_ids), seq_len]: rows `row_ids` of step `step`'s global batch."""
        return self.rows_and_pasted(inputs, step, row_ids)[0]

    def rows_and_pasted(self, inputs, step, row_ids):
        """(rows, bool mask of their pasted positions), as data.uniform_segments returns."""
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(inputs["seed"]), DATA_KEY),
                                 step)
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
        return jax.vmap(self._row, in_axes=(0, None))(keys, inputs["table"])

    def batch(self, inputs, step, batch_size: int):
        """int32 [batch_size, seq_len]: the whole global batch of step `step`."""
        return self.rows(inputs, step, jnp.arange(batch_size))

    # ------------------------------------------------------------------ one row

    def _row(self, key, table):
        # one draw of random words per row, cut into every choice below: each jax.random call
        # is a separate threefry in the program, and XLA's compile time grows with their number
        T, V, lag, n, lmax = self.seq_len, self.vocab, self.lag, data_lib.ATTEMPTS, self.lmax
        # copy2's extra words only for copy2: the other backgrounds' draws stay as they were
        sizes = [1] + [n, n, n, lmax] * self.smax + [T, lag] + [T] * bool(self.copy_prob)
        words = jnp.split(jax.random.bits(key, (sum(sizes),), jnp.uint32),
                          np.cumsum(sizes)[:-1])
        x, pasted = self._segments(words[0][0], words[1:1 + 4 * self.smax])
        bg, first, *copy = words[1 + 4 * self.smax:]
        if self.table is None:
            return jnp.where(pasted, x, _below(bg, V)), pasted
        choice, first = _below(bg, table.shape[1]), _below(first, V)
        if self.parallel_fill:  # never for copy2 (__init__)
            return self._fill_parallel(x, pasted, table, choice, first), pasted
        # copy2: which tokens repeat the token two back
        copy = (copy[0] < jnp.uint32(min(round(self.copy_prob * 2**32), 2**32 - 1))
                if self.copy_prob else None)
        return self._fill_scan(x, pasted, table, choice, first, copy), pasted

    def _segments(self, count_word, words):
        """(tokens, pasted mask): as data.uniform_segments, for one row. Each segment tries
        ATTEMPTS placements at once and keeps the first that overlaps neither itself nor an
        earlier segment."""
        T, V, lmin, lmax = self.seq_len, self.vocab, self.lmin, self.lmax
        count = self.smin + _below(count_word, self.smax - self.smin + 1)
        pos = jnp.arange(T)
        x, pasted = jnp.zeros(T, jnp.int32), jnp.zeros(T, bool)
        for k in range(self.smax):  # smax is small (3): unrolled
            w_length, w_a, w_b, w_new = words[4 * k:4 * k + 4]
            length = lmin + _below(w_length, lmax - lmin + 1)
            # starts uniform on [-(length - 1), T - 1]: T + length - 1 values
            a, b = (_below(w, T + length - 1) - (length - 1) for w in (w_a, w_b))
            src, dst = jnp.minimum(a, b), jnp.maximum(a, b)
            new = _below(w_new, V)
            cs = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(pasted, dtype=jnp.int32)])
            free = lambda s: cs[jnp.clip(s + length, 0, T)] == cs[jnp.clip(s, 0, T)]  # noqa: E731
            ok = (dst - src >= length) & free(src) & free(dst)
            i = jnp.argmax(ok)
            take = ok[i] & (k < count)
            for start in (src[i], dst[i]):
                j = pos - start
                hit = take & (j >= 0) & (j < length[i])
                x = jnp.where(hit, new[jnp.clip(j, 0, lmax - 1)], x)
                pasted = pasted | hit
        return x, pasted

    def _fill_parallel(self, x, pasted, table, choice, first):
        """The background around the pasted tokens without a loop over positions.

        Position t maps the token `lag` places before it to its own: v -> table[v,
        choice[t]], or a constant where t is pasted or among the first `lag`. Composing
        these maps along each chain of positions t = r, r + lag, ... (an associative scan,
        log2(seq_len) levels) gives a constant map at every position: its token."""
        T, V, lag = self.seq_len, self.vocab, self.lag
        pos = jnp.arange(T)
        maps = table.T[choice]  # [T, V]: maps[t, v] = table[v, choice[t]]
        const = jnp.where(pasted, x, first[jnp.minimum(pos, lag - 1)])
        maps = jnp.where((pasted | (pos < lag))[:, None], const[:, None], maps)
        pad = -T % lag  # identity maps at the end, so that the chains have equal length
        maps = jnp.concatenate([maps, jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32),
                                                       (pad, V))]).reshape(-1, lag, V)
        then = lambda a, b: jnp.take_along_axis(b, a, axis=-1)  # noqa: E731  (b after a)
        composed = jax.lax.associative_scan(then, maps, axis=0)
        return composed[..., 0].reshape(-1)[:T]

    def _fill_scan(self, x, pasted, table, choice, first, copy=None):
        """The same fill, one position after another (large vocabulary x context; copy2,
        whose token t repeats token t-2 where `copy` is set, from position 2 on)."""
        lag = self.lag
        back = 2 if copy is not None else lag  # tokens the carry keeps

        def body(prev, t):  # prev[-k]: the token k places back
            bg = jnp.where(t < lag, first[jnp.minimum(t, lag - 1)], table[prev[-lag], choice[t]])
            if copy is not None:
                bg = jnp.where(copy[t] & (t >= 2), prev[-2], bg)
            v = jnp.where(pasted[t], x[t], bg)
            return jnp.concatenate([prev[1:], v[None]]), v

        # the carry starts from `first` (unread: t < lag takes first itself, and a copy needs
        # t >= 2) so that it varies over the devices as the tokens do, which shard_map's scan
        # requires
        start = jnp.resize(first, back)
        return jax.lax.scan(body, start, jnp.arange(self.seq_len))[1]


def device_generator(sources, data_configs, platform: str):
    """(the DeviceSynthetic every member shares, [each member's inputs()]), or None
    when batches come from the host; DataError when data.generate cannot be honoured."""
    modes = {d.get("generate", "auto") for d in data_configs}
    wanted = [use_device(d, platform) for d in data_configs]
    if not any(wanted):
        return None
    need(all(wanted), f"ensemble members disagree on data.generate ({sorted(modes)}) "
         "on this platform; give every member the same")
    for d, s in zip(data_configs, sources):
        need(isinstance(s, data_lib.SyntheticSource), "data.generate='device' makes "
             f"only synthetic data, not data.name={d.name!r}; use 'auto' or 'host'")
    gens = [DeviceSynthetic(s, parallel_fill=platform != "cpu") for s in sources]
    need(len({g.shape for g in gens}) == 1, "ensemble members made on the device "
         "must share their data fields (only the seed may differ); set "
         "data.generate='host' to train members with different data")
    return gens[0], [g.inputs() for g in gens]


def step_generator(gen: DeviceSynthetic, rows_per_device: int):
    """generate(inputs, step) -> this device's rows, for use inside shard_map over 'data'."""

    def generate(inputs, step):
        first = jax.lax.axis_index("data") * rows_per_device
        return gen.rows(inputs, step, first + jnp.arange(rows_per_device))

    return generate
