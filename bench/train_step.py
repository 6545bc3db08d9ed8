"""Training-step throughput: step time, volumes/s, FLOP/s (XLA cost analysis), MFU,
and whether the real input pipeline keeps up with the step.

    python bench/train_step.py --config=configs/pretrain.py:tiny            # CPU, seconds
    python bench/train_step.py --config=configs/pretrain.py:depth=18 \\
        --config.train.batch_size=8 --volume_shape=48,64,64 --steps=10    # CPU, small
    python bench/train_step.py --config=configs/pretrain.py \\
        --config.model.dtype=bfloat16 --peak_tflops=989 --steps=30        # GPU: the paper's net

The same compiled step (radnet.train.pretrain.make_train_step, sharded on the config's
mesh, donated state) runs twice: on one synthetic uint8 batch already on the devices,
and fed by the real Grain loader (radnet.data.pipeline.train_iterator) reading a
TensorStore dataset (--dataset, or a random one written to a temporary folder with the
config's volume shape). One JSON line per mode, then a summary line with
``loader_ratio`` = real step time / synthetic step time (≤ 1.05: the loader hides behind
the step). FLOPs are XLA's count for the compiled step program on one device; MFU =
achieved FLOP/s per device / --peak_tflops. With --predict (default) a ``predict`` line
times the inference forward pass on the same batch (volumes/s, its own MFU).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from radnet import labels  # noqa: E402
from radnet.data import pipeline, schema  # noqa: E402
from radnet.train import loop, pretrain, sharding as sharding_lib, state as state_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py:tiny",
                                          "Pretraining config (with argument).",
                                          lock_config=False)
_DATASET = flags.DEFINE_string("dataset", None, "Dataset for the real-loader run; default: "
                               "a random dataset written to a temporary folder.")
_VOLUME_SHAPE = flags.DEFINE_list("volume_shape", None, "D,H,W; default 48,192,192, or "
                                  "16,32,32 with a tiny config (ignored with --dataset).")
_NUM_VOLUMES = flags.DEFINE_integer("num_volumes", 64, "Volumes in the temporary dataset.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per mode.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per mode (after compilation).")
_PREDICT = flags.DEFINE_bool("predict", True, "Also time the inference forward pass (what "
                             "the predict task and radnet.pretrained run) on the same batch.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device in the "
                                  "step's dtype (H100 SXM dense bf16: 989); 0 = no MFU.")


def _random_dataset(path: str, n: int, shape) -> str:
    rng = np.random.default_rng(0)
    arrays = schema.create(path, n, volume_shape=shape)
    arrays["volume"].write(rng.integers(0, 256, (n, *shape), dtype=np.uint8)).result()
    for head, names in labels.CLASS_HEADS.items():
        arrays[head].write(rng.integers(0, len(names), n).astype(np.int8)).result()
    arrays["coverage"].write(rng.integers(0, 2, (n, len(labels.COVERAGE))).astype(np.int8)).result()
    arrays["effective_spacing_mm"].write(rng.uniform(1, 10, n).astype(np.float32)).result()
    arrays["split"].write(np.zeros(n, np.int8)).result()
    return path


def _time_steps(step_fn, state, batches, n: int):
    """Runs ``n`` steps; returns (state, seconds) with the device work included."""
    start = time.perf_counter()
    metrics = None
    for _ in range(n):
        state, metrics = step_fn(state, next(batches))
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def main(argv):
    del argv
    config = _CONFIG.value
    tmp = None
    if _DATASET.value:
        dataset = _DATASET.value
    else:
        if _VOLUME_SHAPE.value:
            shape = tuple(int(s) for s in _VOLUME_SHAPE.value)
        else:
            shape = (16, 32, 32) if config.train.num_steps <= 10 else schema.VOLUME_SHAPE
        tmp = tempfile.TemporaryDirectory()
        dataset = _random_dataset(tmp.name + "/dataset", _NUM_VOLUMES.value, shape)
    config.dataset = dataset
    config = pretrain.resolve_config(config)
    volume_shape = tuple(config.input.volume_shape)

    placement = loop.Placement.from_config(config)
    mesh, batch_sharding, replicated = (placement.mesh, placement.batch_sharding,
                                        placement.replicated)
    global_bs = int(config.train.batch_size)
    local_bs = placement.local_batch_size

    model = state_lib.build_model(config)
    optimizer = state_lib.build_optimizer(config)
    _, state_shardings = state_lib.abstract_state(config, model, optimizer, volume_shape, mesh)
    state = state_lib.create_sharded_state(model, optimizer, volume_shape, state_shardings,
                                           jax.random.key(config.seed))
    step_fn = jax.jit(
        pretrain.make_train_step(model, optimizer, dict(config.loss_weights),
                                 pretrain._augment_fn(config)),
        in_shardings=(state_shardings, {k: batch_sharding for k in pretrain.TRAIN_KEYS},
                      replicated),
        out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    rng = jax.random.key(1)

    loader = pipeline.train_iterator(dataset, split="train", batch_size=local_bs,
                                     seed=config.seed, worker_count=config.input.worker_count,
                                     prefetch_buffer=config.input.prefetch_buffer)
    first = next(loader)
    example = sharding_lib.global_batch({k: first[k] for k in pretrain.TRAIN_KEYS}, batch_sharding)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, example, rng).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops_per_step = float((cost or {}).get("flops", float("nan")))

    def step(s, b):
        return compiled(s, b, rng)

    common = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                  num_devices=mesh.size, mesh=dict(mesh.shape), global_batch=global_bs,
                  volume_shape=list(volume_shape), model=dict(config.model),
                  augment=bool(config.input.augment.enabled),
                  worker_count=int(config.input.worker_count), steps=_STEPS.value)
    results = {}

    def synthetic():
        while True:
            yield example

    def real():
        while True:
            local = next(loader)
            yield sharding_lib.global_batch({k: local[k] for k in pretrain.TRAIN_KEYS},
                                            batch_sharding)

    for mode, source in (("synthetic", synthetic()), ("real_loader", real())):
        state, _ = _time_steps(step, state, source, _WARMUP.value)
        state, seconds = _time_steps(step, state, source, _STEPS.value)
        step_s = seconds / _STEPS.value
        flops_per_s = flops_per_step / step_s
        line = dict(common, mode=mode, step_time_s=round(step_s, 5),
                    volumes_per_s=round(global_bs / step_s, 3),
                    flops_per_step_per_device=flops_per_step,
                    achieved_tflops_per_device=round(flops_per_s / 1e12, 4),
                    compile_s=round(compile_s, 2))
        if _PEAK_TFLOPS.value > 0:
            line["mfu"] = round(flops_per_s / (_PEAK_TFLOPS.value * 1e12), 4)
        results[mode] = line
        print(json.dumps(line, sort_keys=True), flush=True)
    if _PREDICT.value:
        # Inference: the eval forward pass of the same model and batch (uint8 → [0, 1]).
        forward = jax.jit(lambda v, vol: model.apply(v, pretrain.model_inputs(vol), train=False),
                          in_shardings=(replicated, batch_sharding))
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        t0 = time.perf_counter()
        fwd = forward.lower(variables, example["volume"]).compile()
        fwd_compile_s = time.perf_counter() - t0
        fcost = fwd.cost_analysis()
        if isinstance(fcost, (list, tuple)):
            fcost = fcost[0] if fcost else {}
        fwd_flops = float((fcost or {}).get("flops", float("nan")))
        for _ in range(_WARMUP.value):
            jax.block_until_ready(fwd(variables, example["volume"]))
        t0 = time.perf_counter()
        for _ in range(_STEPS.value):
            out = fwd(variables, example["volume"])
        jax.block_until_ready(out)
        fwd_s = (time.perf_counter() - t0) / _STEPS.value
        line = dict(common, mode="predict", step_time_s=round(fwd_s, 5),
                    volumes_per_s=round(global_bs / fwd_s, 3),
                    flops_per_step_per_device=fwd_flops,
                    achieved_tflops_per_device=round(fwd_flops / fwd_s / 1e12, 4),
                    compile_s=round(fwd_compile_s, 2))
        if _PEAK_TFLOPS.value > 0:
            line["mfu"] = round(fwd_flops / fwd_s / (_PEAK_TFLOPS.value * 1e12), 4)
        print(json.dumps(line, sort_keys=True), flush=True)
    ratio = results["real_loader"]["step_time_s"] / results["synthetic"]["step_time_s"]
    print(json.dumps(dict(common, mode="summary", loader_ratio=round(ratio, 4),
                          loader_keeps_up=ratio <= 1.05), sort_keys=True), flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    app.run(main)
