"""Train a small decoder-only MoE transformer as a byte-level language model.

The corpus is the `.py` files of Python's own standard library (present on every machine), split
by file into train / held-out. Every device JAX sees is one expert-parallel rank of the mesh axis
"ep" (data parallel = expert parallel): all local GPUs, or 8 virtual CPU devices when there is no
accelerator. Each block's feed-forward is a jax_ep.nn.MoE layer (dispatch -> SwiGLU experts with
ragged_dot -> combine).

    python examples/train_moe.py                      # defaults: a few minutes on 2 CPU cores
    python examples/train_moe.py --steps 2000 --d-model 256 --experts 16 --backend auto

Writes <out>/history.json (per-step metrics, config, summary) and <out>/loss.png (loss, dropped
rows per step, router balance; out defaults to runs/); with --save PATH also the trained
parameters (.npz), which examples/decode_moe.py decodes from.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
import sysconfig
import time
from typing import Any, NamedTuple, Optional

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # jax_ep never uses NVLink multicast

import jax  # noqa: E402


def setup_devices(num_cpu_devices: int = 8) -> None:
    """Asks for `num_cpu_devices` virtual CPU devices. Only the CPU backend reads this flag, so it
    is harmless on GPU hosts (jax.devices() is then the GPUs); it must run before any JAX
    computation, so it is skipped when a backend already exists (e.g. under pytest)."""
    try:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    except (RuntimeError, AttributeError, ValueError):  # backends already initialised (or
        pass  # an older/newer JAX without the flag): keep what the host process chose


import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

try:
    import jax_ep
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax_ep
from jax_ep.nn import MoE  # noqa: E402

VOCAB = 256  # bytes


# ------------------------------------------------------------------------------ data


def load_corpus(val_every: int = 10, stdlib: Optional[str] = None):
    """(train, val) uint8 arrays: the stdlib's top-level .py files, every `val_every`-th file
    (sorted by name) held out."""
    root = stdlib or sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if len(files) < 2 * val_every:
        raise RuntimeError(f"found only {len(files)} .py files under {root}")
    train, val = [], []
    for i, path in enumerate(files):
        with open(path, "rb") as fh:
            data = fh.read() + b"\n\n"
        (val if i % val_every == val_every - 1 else train).append(data)
    return (np.frombuffer(b"".join(train), np.uint8), np.frombuffer(b"".join(val), np.uint8))


def sample_batch(data: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int):
    """[batch, seq_len + 1] int32 random windows (inputs = [:, :-1], targets = [:, 1:])."""
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    return np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)


# ------------------------------------------------------------------------------ model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 128
    d_ff: int = 256  # per expert
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 0
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    score_bias: bool = False  # aux-loss-free balancing bias
    capacity_factor: Optional[float] = 2.0  # None = never drop
    expert_alignment: int = 8
    dtype: Any = "float32"  # compute dtype; params are float32


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.n_heads, self.dtype = cfg.n_heads, jnp.dtype(cfg.dtype)
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, dtype=self.dtype, rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, dtype=self.dtype, rngs=rngs)

    def __call__(self, x):
        b, s, d = x.shape
        h = self.n_heads
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3, h, d // h), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [b, s, h, dh]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(d // h)
        causal = jnp.tril(jnp.ones((s, s), bool))
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1).astype(self.dtype)
        att = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
        return self.out(att)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, buffer: jax_ep.Buffer, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.norm2 = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.moe = MoE(buffer, cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k,
                       scoring=cfg.scoring, n_group=cfg.n_group, topk_group=cfg.topk_group,
                       score_bias=cfg.score_bias, num_shared_experts=cfg.num_shared_experts,
                       capacity_factor=cfg.capacity_factor,
                       expert_alignment=cfg.expert_alignment, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        out = self.moe(self.norm2(x), return_aux=True)
        return x + out.output, out


class MoETransformer(nnx.Module):
    """Byte embeddings + learned positions -> n_layers x (attention, MoE) -> RMSNorm -> logits."""

    def __init__(self, cfg: ModelConfig, buffer: jax_ep.Buffer, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(VOCAB, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, buffer, rngs) for _ in range(cfg.n_layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, VOCAB, use_bias=False,
                               kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, tokens):
        """tokens [B, S] int32 -> (logits [B, S, VOCAB] float32, [MoEOutput per layer])."""
        s = tokens.shape[1]
        x = (self.embed(tokens) + self.pos[...][:s]).astype(self.cfg.dtype)
        stats = []
        for block in self.blocks:
            x, st = block(x)
            stats.append(st)
        logits = self.head(self.norm(x).astype(jnp.float32))
        return logits, stats

    def moe_layers(self):
        return [block.moe for block in self.blocks]


# ------------------------------------------------------------------------------ training


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of everything else (router biases)
    opt_state: Any


def make_optimizer(lr: float, steps: int, warmup: int, weight_decay: float = 0.1):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1),
                                               end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=weight_decay))


def _place(state, mesh: Mesh):
    """Replicates every array over the mesh except those already sharded on it (the experts)."""
    replicated = NamedSharding(mesh, P())

    def put(a):
        if isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding) \
                and a.sharding.mesh == mesh:
            return a
        return jax.device_put(a, replicated)

    return jax.tree.map(put, state)


def create_train_state(cfg: ModelConfig, buffer: jax_ep.Buffer, tx, seed: int = 0):
    """-> (graphdef, TrainState). Expert weights are sharded over the EP axis, the rest replicated."""
    model = MoETransformer(cfg, buffer, nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = _place(params, buffer.mesh), _place(rest, buffer.mesh)
    opt_state = tx.init(params)  # eager: the moments keep their parameters' sharding
    return graphdef, TrainState(params, rest, _place(opt_state, buffer.mesh))


def _loss(graphdef, params, rest, tokens, aux_coef):
    model = nnx.merge(graphdef, params, rest)
    logits, stats = model(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    aux = sum(st.aux_loss for st in stats) / len(stats)
    metrics = dict(loss=ce, aux_loss=aux, dropped=sum(st.num_dropped for st in stats),
                   counts=jnp.stack([st.expert_counts for st in stats]))
    return ce + aux_coef * aux, metrics


def make_train_step(graphdef, tx, *, aux_coef: float = 0.01, bias_rate: float = 0.0):
    """-> jitted step(TrainState, tokens [B, S+1]) -> (TrainState, metrics dict).

    metrics: loss (cross-entropy), aux_loss (mean over layers), dropped (rows over capacity,
    summed over layers), counts [layers, E]. With bias_rate > 0 the routers' score-correction
    biases (ModelConfig.score_bias) take an aux-loss-free balancing step after each update.
    """

    @jax.jit
    def step(state: TrainState, tokens):
        grad_fn = jax.grad(lambda p: _loss(graphdef, p, state.rest, tokens, aux_coef),
                           has_aux=True)
        grads, metrics = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rest = state.rest
        if bias_rate > 0:
            model = nnx.merge(graphdef, params, rest)
            for layer, moe in enumerate(model.moe_layers()):
                if moe.router.bias is not None:
                    moe.update_bias(metrics["counts"][layer], bias_rate)
            _, _, rest = nnx.split(model, nnx.Param, ...)
        return TrainState(params, rest, opt_state), metrics

    return step


def make_eval_step(graphdef):
    """-> jitted eval(TrainState, tokens [B, S+1]) -> mean cross-entropy."""

    @jax.jit
    def evaluate(state: TrainState, tokens):
        return _loss(graphdef, state.params, state.rest, tokens, 0.0)[1]["loss"]

    return evaluate


def make_mesh(devices=None, axis_name: str = "ep") -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), (axis_name,))


# ------------------------------------------------------------------------------ checkpoints


def save_params(path: str, cfg: ModelConfig, graphdef, state: TrainState) -> None:
    """Writes the trained model to `path` (numpy .npz): one array per variable (parameters and
    router biases, keyed by their path in the model) and the ModelConfig as JSON. No optimizer
    state: it is for inference (examples/decode_moe.py)."""
    model = nnx.merge(graphdef, state.params, state.rest)
    arrays = {"/".join(map(str, key)): np.asarray(var[...])
              for key, var in nnx.to_flat_state(nnx.state(model))}
    config = json.dumps(dataclasses.asdict(cfg) | {"dtype": jnp.dtype(cfg.dtype).name})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as fh:  # a file object: np.savez would append .npz to the name
        np.savez(fh, __config__=np.array(config), **arrays)


def load_params(path: str, buffer: jax_ep.Buffer, **overrides):
    """-> (ModelConfig, MoETransformer) from save_params, built over `buffer` (expert weights
    sharded over its EP axis, the rest replicated over its mesh). `overrides` replace ModelConfig fields
    (e.g. dtype)."""
    with np.load(path) as saved:
        cfg = ModelConfig(**(json.loads(str(saved["__config__"])) | overrides))
        model = MoETransformer(cfg, buffer, nnx.Rngs(0))
        for key, var in nnx.to_flat_state(nnx.state(model)):
            name, current = "/".join(map(str, key)), var[...]
            if name not in saved or saved[name].shape != current.shape:
                raise ValueError(f"{path}: no parameter {name} of shape {current.shape} (saved "
                                 f"for another configuration?)")
            on_mesh = (isinstance(current.sharding, NamedSharding)
                       and current.sharding.mesh == buffer.mesh)
            sharding = current.sharding if on_mesh else NamedSharding(buffer.mesh, P())
            var[...] = jax.device_put(saved[name].astype(current.dtype), sharding)
    return cfg, model


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=256, help="SwiGLU width per expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument("--scoring", choices=("softmax", "sigmoid"), default="softmax")
    p.add_argument("--n-group", type=int, default=1)
    p.add_argument("--topk-group", type=int, default=1)
    p.add_argument("--capacity-factor", type=float, default=2.0,
                   help="receive rows per rank = factor * tokens * top_k (<= 0: never drop)")
    p.add_argument("--expert-alignment", type=int, default=8)
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balance loss weight")
    p.add_argument("--bias-rate", type=float, default=0.0,
                   help="aux-loss-free balancing bias step (0 = off)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--backend", choices=("auto", "xla", "cuda"), default="auto")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--cpu-devices", type=int, default=8,
                   help="virtual CPU devices when there is no accelerator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs")
    p.add_argument("--save", default=None, metavar="PATH",
                   help="also write the trained parameters here (.npz; for decode_moe.py)")
    return p.parse_args(argv)


def write_outputs(out_dir: str, history: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "history.json"), "w") as fh:
        json.dump(history, fh, indent=1)
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    steps = history["step"]
    ax[0].plot(steps, history["loss"], lw=0.8, label="train")
    if history["eval_step"]:
        ax[0].plot(history["eval_step"], history["eval_loss"], "o-", label="held-out")
    ax[0].set(xlabel="step", ylabel="cross-entropy (nats / byte)", title="byte-level LM loss")
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    # Rows over the receive capacity (--capacity-factor) per step, summed over layers and ranks:
    # they contribute 0 to their token's output (0 = nothing lost).
    ax[1].plot(steps, history["dropped"], lw=0.8, color="C3")
    ax[1].set(xlabel="step", ylabel="(token, expert) rows dropped per step",
              title=f"capacity overflow: {int(np.sum(history['dropped'])):,} rows in total")
    ax[1].set_ylim(bottom=0)
    ax[1].grid(alpha=0.3)
    ax[2].plot(steps, history["aux_loss"], lw=0.8, color="C2")
    ax[2].set(xlabel="step", ylabel="load-balance loss (1 = balanced)", title="router balance")
    ax[2].grid(alpha=0.3)
    fig.suptitle(history["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    setup_devices(args.cpu_devices)
    from tqdm import tqdm  # noqa: PLC0415

    devices = jax.devices()
    platform = devices[0].platform
    num_ranks = len(devices)
    if args.batch % num_ranks:
        raise SystemExit(f"--batch ({args.batch}) must be a multiple of the {num_ranks} devices")
    if args.experts % num_ranks:
        raise SystemExit(f"--experts ({args.experts}) must be a multiple of the {num_ranks} "
                         "devices")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if platform == "gpu"
                                                       else "float32")
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      seq_len=args.seq_len, d_ff=args.d_ff, num_experts=args.experts,
                      top_k=args.top_k, num_shared_experts=args.shared_experts,
                      scoring=args.scoring, n_group=args.n_group, topk_group=args.topk_group,
                      score_bias=args.bias_rate > 0,
                      capacity_factor=args.capacity_factor if args.capacity_factor > 0 else None,
                      expert_alignment=args.expert_alignment, dtype=dtype)
    mesh = make_mesh(devices)
    buffer = jax_ep.Buffer(mesh, "ep", backend=args.backend,
                           max_tokens_per_rank=args.batch * args.seq_len // num_ranks,
                           hidden=args.d_model, num_topk=args.top_k)
    train, val = load_corpus()
    print(f"devices: {num_ranks} x {platform} ({devices[0].device_kind}); backend "
          f"{buffer.backend}; corpus {len(train) / 1e6:.2f} MB train / {len(val) / 1e6:.2f} MB "
          f"held-out; compute {dtype}")

    tx = make_optimizer(args.lr, args.steps, args.warmup)
    graphdef, state = create_train_state(cfg, buffer, tx, args.seed)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    print(f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.num_experts} experts "
          f"(top-{cfg.top_k}, d_ff {cfg.d_ff}), {n_params / 1e6:.2f} M params")
    step_fn = make_train_step(graphdef, tx, aux_coef=args.aux_coef, bias_rate=args.bias_rate)
    eval_fn = make_eval_step(graphdef)

    data_sharding = NamedSharding(mesh, P("ep"))
    rng = np.random.default_rng(args.seed)
    val_rng = np.random.default_rng(args.seed + 1)
    val_batches = [jax.device_put(sample_batch(val, val_rng, args.batch, args.seq_len),
                                  data_sharding) for _ in range(args.eval_batches)]

    def evaluate(st):
        return float(np.mean([float(eval_fn(st, b)) for b in val_batches]))

    history = dict(step=[], loss=[], aux_loss=[], dropped=[], tokens_per_s=[], eval_step=[],
                   eval_loss=[], config=dataclasses.asdict(cfg) | {"dtype": str(dtype)},
                   args=vars(args), devices=f"{num_ranks} x {platform}",
                   backend=buffer.backend)
    history["eval_step"].append(0)
    history["eval_loss"].append(evaluate(state))
    tokens_per_step = args.batch * args.seq_len
    timed_tokens, timed_s = 0, 0.0
    bar = tqdm(range(1, args.steps + 1), desc="train", dynamic_ncols=True, mininterval=1.0)
    batch = jax.device_put(sample_batch(train, rng, args.batch, args.seq_len), data_sharding)
    for step in bar:
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        # Next batch is prepared while the device works.
        batch = jax.device_put(sample_batch(train, rng, args.batch, args.seq_len), data_sharding)
        m = jax.device_get({k: v for k, v in metrics.items() if k != "counts"})
        dt = time.perf_counter() - t0
        if step > 1:  # the first step includes compilation
            timed_tokens += tokens_per_step
            timed_s += dt
        tps = timed_tokens / timed_s if timed_s else float("nan")
        history["step"].append(step)
        history["loss"].append(float(m["loss"]))
        history["aux_loss"].append(float(m["aux_loss"]))
        history["dropped"].append(int(m["dropped"]))
        history["tokens_per_s"].append(tps)
        bar.set_postfix(loss=f"{float(m['loss']):.3f}", aux=f"{float(m['aux_loss']):.3f}",
                        dropped=int(m["dropped"]), tok_s=f"{tps:,.0f}", refresh=False)
        if step % args.eval_every == 0 or step == args.steps:
            history["eval_step"].append(step)
            history["eval_loss"].append(evaluate(state))
            bar.write(f"step {step}: train {float(m['loss']):.4f}  held-out "
                      f"{history['eval_loss'][-1]:.4f}  aux {float(m['aux_loss']):.4f}  "
                      f"dropped {int(m['dropped'])}  {tps:,.0f} tok/s")
    bar.close()
    wall = time.perf_counter() - t_start
    tail = history["loss"][-10:]
    summary = dict(start_loss=history["loss"][0], end_loss=float(np.mean(tail)),
                   start_eval_loss=history["eval_loss"][0], end_eval_loss=history["eval_loss"][-1],
                   tokens_per_s=timed_tokens / timed_s if timed_s else float("nan"),
                   wall_s=wall, total_dropped=int(np.sum(history["dropped"])),
                   routed_rows=len(history["step"]) * tokens_per_step * cfg.top_k * cfg.n_layers)
    history["summary"] = summary
    history["title"] = (f"jax_ep MoE byte LM: {num_ranks} x {platform}, {cfg.num_experts} experts "
                        f"top-{cfg.top_k}, d_model {cfg.d_model}, {cfg.n_layers} layers")
    write_outputs(args.out, history)
    if args.save:
        save_params(args.save, cfg, graphdef, state)
    print(f"start loss {summary['start_loss']:.4f} (held-out {summary['start_eval_loss']:.4f})"
          f" -> end loss {summary['end_loss']:.4f} (held-out {summary['end_eval_loss']:.4f}, "
          f"train = mean of last {len(tail)} steps)")
    dropped, routed = summary["total_dropped"], summary["routed_rows"]
    last = max((s for s, d in zip(history["step"], history["dropped"]) if d), default=None)
    print(f"dropped rows: {dropped:,} in total over {len(history['step'])} steps and "
          f"{cfg.n_layers} layer{'s' * (cfg.n_layers != 1)} ({100 * dropped / max(routed, 1):.2f}% of {routed:,} routed "
          f"(token, expert) rows; capacity overflow, --capacity-factor "
          f"{args.capacity_factor}; 0 = none lost"
          + ("" if last is None else f"; the last at step {last}") + "; per step in loss.png)")
    print(f"tokens/s {summary['tokens_per_s']:,.0f} (after compilation); "
          f"wall time {wall:.1f} s; wrote {args.out}/history.json, "
          f"{args.out}/loss.png" + (f", {args.save}" if args.save else ""))
    return summary


if __name__ == "__main__":
    main()
