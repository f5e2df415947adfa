"""The quick model family: small transformers on the built-in synthetic data.

Usage: --config small:layers=2,mlp=False,smear=False,positions=shortformer
Every field can be overridden on the command line, e.g. --config.train.steps=4000.
"""
import ml_collections


def parse_arg(arg):
    """'layers=2,mlp=True' -> {'layers': '2', 'mlp': 'True'} (a bare '2' means layers=2)."""
    out = {}
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if not value:
            key, value = "layers", key
        out[key.strip()] = value.strip()
    return out


def _bool(value):
    return str(value).lower() in ("1", "true", "yes", "on")


def get_config(arg=None):
    args = parse_arg(arg)
    unknown = set(args) - {"layers", "mlp", "smear", "positions", "layer_norm"}
    if unknown:
        raise ValueError(f"small.py: unknown argument(s) {sorted(unknown)}; "
                         "valid: layers, mlp, smear, positions, layer_norm")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        n_layers=int(args.get("layers", 2)),
        d_model=64,
        n_heads=4,
        d_head=0,  # 0: d_model / n_heads
        mlp=_bool(args.get("mlp", False)),
        d_mlp=256,
        mlp_out_init=1.0,  # std of the MLP's W_out at init, in units of 1 / sqrt(d_mlp)
        layer_norm=_bool(args.get("layer_norm", False)),
        positions=args.get("positions", "shortformer"),  # or "residual"
        pos_init_std=1.0,  # positions must be on the residual's scale to be usable early
        smear_keys=_bool(args.get("smear", False)),
        smear_init=0.0,  # sigmoid(0) = 0.5: keys start as an even mix of j and j-1
        context=64,
        vocab_size=64,
        dtype="float32",
        # "auto": our blocked causal attention on CPU, cuDNN's fused attention on CUDA
        # where it fits (bfloat16, d_head a multiple of 8), jax.nn.dot_product_attention's
        # XLA path elsewhere; or name one: "blocked", "dot_product_attention", "cudnn"
        attention="auto",
    ))

    c.data = ml_collections.ConfigDict(dict(
        name="synthetic",  # synthetic | pystdlib | pycode | files
        # synthetic: a background process with segments pasted again later
        # copy2: token t repeats token t-2 (probability 1/2) or else follows token t-1 (4
        # successors each), which pays a head that attends to the previous token in layer 0,
        # with MLPs too: the 2L models' induction heads form by ~3,000 steps. lag2 (token t
        # follows token t-2 by a table) pays it as well, but a layer-0 MLP hands that lookup
        # to a layer-1 head and 2L-MLP forms no induction head (docs/claims-notes.md)
        background="copy2",  # uniform | markov | lag2 | mixed | copy2
        markov_branching=4,  # successors per token for the markov, lag2 and copy2 backgrounds
        segments_min=1,
        segments_max=3,
        segment_len_min=6,
        segment_len_max=19,
        fresh_fraction=0.5,  # placement "after": share of segments that are new random strings
        # "uniform": a fresh string written at two uniformly drawn starts, every context index
        # equally likely pasted, so the ICL score starts near 0 and its fall measures in-context
        # learning; "after" (runs saved before this field): a copy pasted after its source, late
        # indices holding five times the copies, the ICL score starting near +1
        placement="uniform",
        # where training batches are made: "auto" on the device inside the step on an
        # accelerator (numpy cannot keep up with it) and by numpy on a CPU; "device" or
        # "host" force one (the device makes only synthetic data with placement "uniform").
        # Both draw the same distribution from (seed, step), not the same tokens
        generate="auto",
        # text (pystdlib, pycode, files)
        path="",  # files: a text file, a glob, a .npy or a .bin of tokens
        bin_dtype="uint16",  # for raw .bin token files
        tokenizer="bytes",  # bytes | bpe
        bpe_vocab_size=512,
        holdout_fraction=0.1,
        roots="",  # pycode: comma-separated folders of .py files; empty: the interpreter's sys.path
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=6_000,  # the 2L model's phase change ends near step 4,800 (uniform placement)
        batch_size=32,
        lr=2e-3,  # 3e-3 fails to form induction heads on the uniform background
        schedule="constant",  # constant | cosine | paper
        warmup_steps=100,
        weight_decay=0.01,
        weight_decay_drop_step=-1,  # paper schedule: step where weight decay drops
        weight_decay_after=0.0,
        grad_clip=1.0,
        b1=0.9,
        b2=0.98,
        log_every=50,
        eval_every=100,  # the held-out loss every 100 steps shows the loss bump
        skip_nonfinite=False,  # True: drop steps with a NaN/Inf loss or gradient, counted
    ))

    c.eval = ml_collections.ConfigDict(dict(
        n_examples=256,
        icl_early_index=5,  # the paper's 50 and 500, scaled to a 64-token context
        icl_late_index=50,
        probe_tokens=15,  # the paper's 25, shrunk so 1 + tokens * repeats fits the context
        probe_repeats=4,
        probe_sequences=10,
        probe_exclude_frac=0.1,  # drop this share of most and of least frequent tokens
        bos_token=0,
        induction_prefix_threshold=0.3,
        induction_copying_threshold=0.0,
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=250,  # dense snapshots; the paper keeps one every 50 steps
        log_spaced=8,  # plus this many log-spaced early steps
        max_to_keep=0,  # 0 keeps every snapshot
        async_save=True,
    ))

    # the local learning coefficient of every snapshot (icl-jax analyze --llc; llc.py)
    c.llc = ml_collections.ConfigDict(dict(
        sampler="sgld",  # sgld | rmsprop_sgld (devinterp's two)
        eps=3e-3,  # step size; Hoogland et al. (2024) used 3e-3 and 300 for 2L models
        gamma=300.0,  # localisation: the pull toward the snapshot's weights
        n_beta=0.0,  # inverse temperature; 0: batch_size / ln(batch_size), as devinterp
        chains=4,
        burn_in=0,  # the chains settle within a few steps at these settings
        draws=100,
        batch_size=32,
        examples=1024,  # held-out sequences the minibatches are drawn from
        rms_alpha=0.99,  # rmsprop_sgld: decay of the squared-gradient average
        rms_eps=0.1,  # rmsprop_sgld: added to its square root
    ))
    return c
