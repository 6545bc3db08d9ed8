"""radnet against PyTorch on the CPU: the same networks, losses and optimizer, timed
interleaved in one process pair (radnet here, PyTorch in a worker this script starts).

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # bench only
    pip install --no-deps monai                                           # optional
    python bench/torch_reference.py                                       # all cases
    python bench/torch_reference.py --cases=resnet50:16x64x64:2 --rounds=3

Networks: radnet's ``RadNet(depth=50)`` (encoder + five heads, 48,203,996 parameters)
against ``radnet.interop.torch_reference.RadNet`` (the same layers, built layer for layer,
same parameter count, asserted); radnet's ``VNet(depth=50)`` against the same PyTorch
encoder under a decoder written here layer for layer as radnet/models/vnet.py (asserted
equal parameter count); with MONAI installed, also MONAI's ``VNet`` (its own, smaller
structure) for the ms-per-GFLOP comparison. Train step: the multitask loss of
radnet.train.losses (masked cross-entropies, sigmoid BCE, spacing RMSE; VNet: voxel
softmax cross-entropy), global-norm clipping at 1, Adam 1e-4. Forward: inference mode.

Fairness: both frameworks use ``--threads`` threads (default: all cores;
``torch.set_num_threads``, XLA's ``intra_op_parallelism_threads`` and, for radnet's oneDNN
convolutions, ``OMP_NUM_THREADS``); every case is
compiled / warmed up first, then rounds alternate radnet and PyTorch step by step so a
change of load hits both alike, each round starting with the next side in turn (whichever
runs first after the wait for a quiet machine starts cold), and each timed step preceded by
``--prime`` untimed steps of the same side (default 1): a timed step is then the second of a
run of steps, as in training, not one that follows the other side or an idle wait (on the
2-core test machine a VNet step that follows a 3 s idle or the other side's step took
0.32–0.9 s against 0.25–0.28 s back to back, measured). Each framework runs in its own process: radnet's with the
start settings of radnet/host_memory.py (malloc tunables, OpenMP threads that sleep
between convolutions), PyTorch's under the user's own environment, so neither runs under
the other's settings or shares its OpenMP runtime and heap (sharing them slowed radnet's
VNet step by 20–40 %, measured); the median of each side counts; ``load_avg_1m`` is read
before every round and the largest is printed (measure with it under 1.5). One JSON line
per case and mode; ``ratio`` = radnet / PyTorch step time (< 1: radnet faster).
GFLOP per step: PyTorch's ``FlopCounterMode`` on the PyTorch twin (the same arithmetic as
radnet's network), so ``ms_per_gflop`` compares like with like.
``--conv=plain`` times radnet with the plain XLA convolutions (RADNET_CONV=plain), the
"before" of radnet/models/conv.py; ``--conv=xla`` with the XLA rewrites but without
oneDNN (RADNET_CONV=xla).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

flags.DEFINE_list("cases", ["resnet50:16x64x64:2", "resnet50:48x96x96:2",
                            "resnet50:48x192x192:1", "vnet:16x64x64:1"],
                  "model:DxHxW:batch; model is resnet50 (RadNet) or vnet.")
flags.DEFINE_list("modes", ["train", "forward"], "train and/or forward.")
flags.DEFINE_integer("rounds", 5, "Timed rounds per case (one step of each side per round).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per side after compilation.")
flags.DEFINE_integer("prime", 1, "Untimed steps of a side right before each of its timed "
                     "steps: every timed step is one of a run of steps, as in training, not "
                     "the first after the other side's step or after the wait for quiet.")
flags.DEFINE_float("max_load", 0.0, "When > 0: before each timed round wait (up to "
                   "--max_wait_s) until the 1-minute load average is under this value, "
                   "so every round starts on a quiet machine (the wait is not timed).")
flags.DEFINE_integer("max_wait_s", 180, "Longest wait for --max_load per round.")
flags.DEFINE_integer("threads", 0, "Threads for both frameworks; 0 = all cores.")
flags.DEFINE_integer("depth", 50, "ResNet depth (50: the paper's).")
flags.DEFINE_enum("conv", "auto", ["auto", "xla", "plain"], "radnet's convolution formulations "
                  "(radnet/models/conv.py): auto (oneDNN where built, else the XLA rewrites), xla "
                  "(the XLA rewrites only) or plain (XLA's own convolutions).")
flags.DEFINE_bool("monai", True, "Also time MONAI's VNet for vnet cases when importable.")
flags.DEFINE_enum("role", "radnet", ["radnet", "torch"], "Internal: torch = the PyTorch "
                  "worker process this benchmark starts itself.")
FLAGS = flags.FLAGS


def _setup_threads(threads: int) -> int:
    threads = threads or os.cpu_count() or 1
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen=true "
                               f"intra_op_parallelism_threads={threads}").strip()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # oneDNN's OpenMP (radnet/native)
    return threads


def _parse_case(text):
    try:
        model, shape, batch = text.split(":")
        dims = tuple(int(s) for s in shape.lower().split("x"))
        if len(dims) != 3 or model not in ("resnet50", "vnet"):
            raise ValueError
        return model, dims, int(batch)
    except ValueError:
        raise app.UsageError(f"--cases: {text!r} is not model:DxHxW:batch with model "
                             f"resnet50 or vnet (e.g. resnet50:48x96x96:2)") from None


# ---------------------------------------------------------------- PyTorch side


def _torch_models(torch):
    from torch import nn  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from radnet.interop import torch_reference  # noqa: PLC0415

    class UpLevel(nn.Module):
        """radnet/models/vnet.py UpLevel: upconv → norm → ReLU, concat skip, conv-norm-ReLU,
        conv-norm, + up, ReLU."""

        def __init__(self, cin, cskip, features, factor):
            super().__init__()
            self.upconv = nn.ConvTranspose3d(cin, features, factor, stride=factor, bias=False)
            self.upnorm = nn.BatchNorm3d(features, eps=1e-5)
            self.conv1 = nn.Conv3d(features + cskip, features, 3, padding=1, bias=False)
            self.norm1 = nn.BatchNorm3d(features, eps=1e-5)
            self.conv2 = nn.Conv3d(features, features, 3, padding=1, bias=False)
            self.norm2 = nn.BatchNorm3d(features, eps=1e-5)

        def forward(self, x, skip):
            up = F.relu(self.upnorm(self.upconv(x)))
            y = F.relu(self.norm1(self.conv1(torch.cat([up, skip], 1))))
            return F.relu(self.norm2(self.conv2(y)) + up)

    class VNet(nn.Module):
        """radnet's VNet (radnet variant, batch norm): the torch_reference encoder + the
        decoder levels of radnet.models.vnet.DECODER_LEVELS."""

        def __init__(self, depth=50, width=64, decoder_width=16, num_classes=2):
            super().__init__()
            self.encoder = torch_reference.ResNet3D(depth, width)
            exp = 4 if torch_reference.DEPTHS[depth][0] == "bottleneck" else 1
            ch = {"stem": width, **{f"block{i + 1}": width * 2 ** i * exp for i in range(4)}}
            self.levels = nn.ModuleList()
            cin = ch["block4"]
            for _, skip, mult, factor in (("up3", "block3", 8, 2), ("up2", "block2", 4, 2),
                                          ("up1", "block1", 2, 2), ("up0", "stem", 1, 2)):
                self.levels.append(UpLevel(cin, ch[skip], decoder_width * mult, factor))
                cin = decoder_width * mult
            self.top = UpLevel(cin, 1, decoder_width, (1, 2, 2))
            self.logits = nn.Conv3d(decoder_width, num_classes, 1)

        def forward(self, x):
            _, feats = self.encoder(x)
            h = feats["block4"]
            for level, skip in zip(self.levels, ("block3", "block2", "block1", "stem")):
                h = level(h, feats[skip])
            return self.logits(self.top(h, x))

    return torch_reference.RadNet, VNet


def _torch_radnet_loss(torch, out, batch, weights):
    import torch.nn.functional as F  # noqa: PLC0415

    from radnet import labels  # noqa: PLC0415
    total = 0.0
    for head in labels.CLASS_HEADS:
        t = batch[head]
        valid = (t >= 0).float()
        ce = F.cross_entropy(out[head], t.clamp(min=0), reduction="none")
        total = total + weights[head] * (ce * valid).sum() / valid.sum().clamp(min=1)
    t = batch["coverage"]
    valid = (t >= 0).float()
    bce = F.binary_cross_entropy_with_logits(out["coverage"], t.clamp(0, 1).float(),
                                             reduction="none")
    total = total + weights["coverage"] * (bce * valid).sum() / valid.sum().clamp(min=1)
    err = out["slice_spacing"] - batch["effective_spacing_mm"]
    total = total + weights["slice_spacing"] * torch.sqrt(torch.clamp((err ** 2).mean(), 1e-12))
    return total


# ---------------------------------------------------------------- the cases


def _batch_np(shape, batch, rng, np, labels):
    out = {"volume": rng.integers(0, 256, (batch, *shape), dtype=np.uint8)}
    for head, names in labels.CLASS_HEADS.items():
        out[head] = rng.integers(0, len(names), batch).astype(np.int32)
    out["coverage"] = rng.integers(0, 2, (batch, len(labels.COVERAGE))).astype(np.int32)
    out["effective_spacing_mm"] = rng.uniform(1, 10, batch).astype(np.float32)
    out["mask"] = rng.integers(0, 2, (batch, *shape)).astype(np.int32)
    return out


def _torch_side(model_name, shape, batch, threads):
    """The PyTorch worker's side of a case: {runner name: one step}, and facts about it."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from radnet import labels  # noqa: PLC0415

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    weights = dict(sequence=1.0, view=1.0, contrast=1.0, coverage=1.0, slice_spacing=0.1)
    data = _batch_np(shape, batch, np.random.default_rng(0), np, labels)
    TorchRadNet, TorchVNet = _torch_models(torch)
    tmodel = TorchRadNet(FLAGS.depth) if model_name == "resnet50" else TorchVNet(FLAGS.depth)
    tbatch = {k: torch.from_numpy(np.asarray(v)) for k, v in data.items()}
    tbatch["mask"] = tbatch["mask"].long()
    for head in labels.CLASS_HEADS:
        tbatch[head] = tbatch[head].long()
    tx = (tbatch["volume"].float() / 255.0).unsqueeze(1)
    topt = torch.optim.Adam(tmodel.parameters(), lr=1e-4, eps=1e-8)

    def torch_loss():
        out = tmodel(tx)
        if model_name == "vnet":
            return torch.nn.functional.cross_entropy(out, tbatch["mask"])
        return _torch_radnet_loss(torch, out, tbatch, weights)

    def torch_train():
        tmodel.train()
        topt.zero_grad(set_to_none=True)
        torch_loss().backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        topt.step()

    def torch_forward():
        tmodel.eval()
        with torch.inference_mode():
            tmodel(tx)

    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    def gflop(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    runners = {"torch_train": torch_train, "torch_forward": torch_forward}
    info = dict(torch_params=sum(p.numel() for p in tmodel.parameters()),
                gflop_train=round(gflop(torch_train), 2),
                gflop_forward=round(gflop(torch_forward), 2),
                torch_version=torch.__version__)
    if model_name == "vnet" and FLAGS.monai:
        try:
            from monai.networks.nets import VNet as MonaiVNet  # noqa: PLC0415
        except ImportError:
            MonaiVNet = None
        if MonaiVNet is not None:
            mnet = MonaiVNet(spatial_dims=3, in_channels=1, out_channels=2)
            mopt = torch.optim.Adam(mnet.parameters(), lr=1e-4, eps=1e-8)

            def monai_train():
                mnet.train()
                mopt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(mnet(tx), tbatch["mask"]).backward()
                torch.nn.utils.clip_grad_norm_(mnet.parameters(), 1.0)
                mopt.step()
            runners["monai_vnet_train"] = monai_train
            info["monai_vnet_gflop"] = round(gflop(monai_train), 2)
    return runners, info


def _torch_worker():
    """``--role=torch``: builds the PyTorch side of each case asked for on stdin and runs
    one step per request, answering with its time (JSON lines; stdout carries nothing else)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library chatter goes to stderr, not into the protocol
    runners = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "build":
            runners, info = _torch_side(msg["model"], tuple(msg["shape"]), msg["batch"],
                                        msg["threads"])
            answer = info
        elif msg["op"] == "run":
            t0 = time.perf_counter()
            runners[msg["name"]]()
            answer = {"s": time.perf_counter() - t0}
        else:
            return
        out.write(json.dumps(answer) + "\n")
        out.flush()


class _TorchProcess:
    """The PyTorch side in its own process (the process pair): its own OpenMP runtime,
    malloc and environment as the user has them — not the settings radnet's restart gives
    radnet's process (radnet/host_memory.py) — so neither framework runs under the
    other's."""

    def __init__(self, threads):
        import subprocess  # noqa: PLC0415

        from radnet import host_memory  # noqa: PLC0415
        env = host_memory.original_environment()
        env["OMP_NUM_THREADS"] = str(threads)
        flags_out = [f"--depth={FLAGS.depth}", f"--monai={str(FLAGS.monai).lower()}"]
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--role=torch", *flags_out],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker ended (exit {self.proc.wait()}); its "
                               f"message is above")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _build(model_name, shape, batch, threads, worker):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from radnet import labels, models  # noqa: PLC0415
    from radnet.train import pretrain, state as state_lib  # noqa: PLC0415

    weights = dict(sequence=1.0, view=1.0, contrast=1.0, coverage=1.0, slice_spacing=0.1)
    data = _batch_np(shape, batch, np.random.default_rng(0), np, labels)
    optimizer = optax.chain(state_lib.clip_by_global_norm(1.0), optax.adam(1e-4))
    depth = FLAGS.depth

    if model_name == "resnet50":
        model = models.RadNet(depth=depth)
        keys = pretrain.TRAIN_KEYS
        train_fn = pretrain.make_train_step(model, optimizer, weights, None)
    else:  # vnet (_parse_case admits only the two)
        model = models.VNet(depth=depth)
        keys = ("volume", "mask")

        def train_fn(state, b, rng):
            del rng

            def loss_fn(params):
                logits, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                          pretrain.model_inputs(b["volume"]), train=True,
                                          mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits, b["mask"]).mean(), upd["batch_stats"]
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"],
                                                                             updates),
                     "batch_stats": stats, "opt_state": opt_state}, {"loss": loss})

    jbatch = {k: jnp.asarray(data[k]) for k in keys}
    x0 = pretrain.model_inputs(jbatch["volume"])
    variables = jax.jit(lambda: model.init(jax.random.key(0), x0, train=False))()
    state = state_lib.state_from_variables(optimizer, variables)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    info = worker.ask(op="build", model=model_name, shape=list(shape), batch=batch,
                      threads=threads)
    if n_params != info["torch_params"]:
        raise SystemExit(f"parameter counts differ: radnet {n_params}, PyTorch "
                         f"{info['torch_params']}")
    step = jax.jit(train_fn, donate_argnums=(0,))
    fwd = jax.jit(lambda v, vol: model.apply(v, pretrain.model_inputs(vol), train=False))
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, jbatch, rng))
    compile_train = time.perf_counter() - t0
    holder = {"state": state}

    def radnet_train():
        holder["state"], m = step(holder["state"], jbatch, rng)
        jax.block_until_ready(m)

    def radnet_forward():
        s = holder["state"]
        jax.block_until_ready(fwd({"params": s["params"], "batch_stats": s["batch_stats"]},
                                  jbatch["volume"]))

    t0 = time.perf_counter()
    radnet_forward()
    compile_forward = time.perf_counter() - t0

    def remote(name):
        return lambda: worker.ask(op="run", name=name)["s"]

    sides = {"train": (radnet_train, remote("torch_train")),
             "forward": (radnet_forward, remote("torch_forward"))}
    extra = {}
    if "monai_vnet_gflop" in info:
        extra["monai_vnet"] = (remote("monai_vnet_train"), info["monai_vnet_gflop"])
    info = dict(params=n_params, compile_train_s=round(compile_train, 2),
                compile_forward_s=round(compile_forward, 2),
                gflop_train=info["gflop_train"], gflop_forward=info["gflop_forward"],
                torch_version=info["torch_version"])
    return sides, extra, info


def _wait_for_quiet(max_load: float, max_wait_s: int) -> None:
    """Sleeps until the 1-minute load average is under ``max_load`` (this benchmark's own
    threads raise it while they run; it decays with a 60 s time constant)."""
    if max_load <= 0:
        return
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(2.0)


def main(argv):
    del argv
    if FLAGS.role == "torch":
        return _torch_worker()
    os.environ["RADNET_CONV"] = FLAGS.conv
    threads = _setup_threads(FLAGS.threads)
    import jax  # noqa: PLC0415  (after XLA_FLAGS)
    jax.config.update("jax_platforms", "cpu")
    cases = [_parse_case(text) for text in FLAGS.cases]  # every mistake before any work
    worker = _TorchProcess(threads)
    try:
        _run_cases(cases, threads, worker, jax)
    finally:
        worker.close()


def _timed(fn):
    """Seconds of one step: the worker's own timing for the PyTorch side (no pipe time)."""
    t0 = time.perf_counter()
    reported = fn()
    return reported if isinstance(reported, float) else time.perf_counter() - t0


def _run_cases(cases, threads, worker, jax):
    for model_name, shape, batch in cases:
        sides, extra, info = _build(model_name, shape, batch, threads, worker)
        for mode in FLAGS.modes:
            ours, theirs = sides[mode]
            runners = {"radnet": ours, "torch": theirs}
            if mode == "train":
                runners.update({k: fn for k, (fn, _) in extra.items()})
            for fn in runners.values():
                for _ in range(FLAGS.warmup):
                    fn()
            times = {k: [] for k in runners}
            loads = []
            names = list(runners)
            for r in range(FLAGS.rounds):
                _wait_for_quiet(FLAGS.max_load, FLAGS.max_wait_s)
                loads.append(os.getloadavg()[0])
                # The side that runs first after the wait for a quiet machine is measurably
                # slower (an idle CPU wakes up cold: a VNet step 0.32–0.47 s after a 3 s
                # sleep against 0.25–0.28 s back to back): each round starts with the next
                # side in turn, so no side always takes that slot.
                for name in names[r % len(names):] + names[:r % len(names)]:
                    for _ in range(FLAGS.prime):
                        runners[name]()
                    times[name].append(_timed(runners[name]))
            med = {k: statistics.median(v) for k, v in times.items()}
            gflop = info[f"gflop_{mode}"]
            line = dict(bench="torch_reference", model=model_name, mode=mode,
                        volume_shape=list(shape), batch=batch, threads=threads,
                        conv=FLAGS.conv, rounds=FLAGS.rounds,
                        radnet_s=round(med["radnet"], 4), torch_s=round(med["torch"], 4),
                        ratio=round(med["radnet"] / med["torch"], 3),
                        ratio_range=[round(min(a / b for a, b in zip(times["radnet"],
                                                                        times["torch"])), 3),
                                     round(max(a / b for a, b in zip(times["radnet"],
                                                                        times["torch"])), 3)],
                        gflop=gflop,
                        radnet_ms_per_gflop=round(1e3 * med["radnet"] / gflop, 2),
                        torch_ms_per_gflop=round(1e3 * med["torch"] / gflop, 2),
                        load_avg_1m_max=round(max(loads), 2), prime=FLAGS.prime,
                        round_times_s={k: [round(x, 4) for x in v] for k, v in times.items()},
                        jax_version=jax.__version__, **info)
            for name, (_, g) in extra.items():
                if name in med:
                    line[f"{name}_s"] = round(med[name], 4)
                    line[f"{name}_gflop"] = round(g, 2)
                    line[f"{name}_ms_per_gflop"] = round(1e3 * med[name] / g, 2)
            print(json.dumps(line, sort_keys=True), flush=True)


if __name__ == "__main__":
    from radnet import cli  # noqa: PLC0415

    # One line and exit 2 for a wrong flag (radnet's own command lines do the same). The
    # PyTorch worker keeps the user's process settings (no restart: _TorchProcess).
    cli.run(main, user_errors=(ValueError,),  # e.g. a volume too small for the encoder
            keep_host_memory="--role=torch" not in sys.argv)
