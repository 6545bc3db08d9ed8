"""Liver region proposal with the pretrained 3D-RADNet (paper, section 2.3).

A window of ``window_slices`` (48) slides over each case with ``stride`` (8) slices; the
pretrained network scores each window with its liver coverage probability (sigmoid of the
``coverage`` logit of ``liver``). Windows scoring ≥ ``threshold`` (0.9) are kept; when
none does, the best-scoring window is kept, so every case yields at least one window.

Window placement: starts ``0, stride, 2·stride, …`` while the window fits, plus one window
ending at the last slice when the stride does not land there (so the inferior and superior
ends are both seen). A case shorter than a window gives one window centred on the case,
padded with blank slices — as the pretraining volumes are padded.
"""

from __future__ import annotations

import csv
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from radnet import labels

LIVER = labels.COVERAGE.index("liver")

# uint8 [B, D, H, W] windows → liver probability [B]
ScoreFn = Callable[[np.ndarray], np.ndarray]
# padded batches ("image", "mask", "position") → (positions, scores) of their real rows
BatchScorer = Callable[[Iterable[dict]], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Window:
    case_id: str
    start: int          # first slice; negative when padded before the case
    num_slices: int
    score: float        # liver coverage probability
    selected: bool


def window_starts(n_slices: int, window_slices: int = 48, stride: int = 8) -> list[int]:
    """First slice of every window over a case of ``n_slices`` (see module docstring)."""
    if n_slices < 1:
        raise ValueError(f"a case needs at least one slice, got {n_slices}")
    if window_slices < 1 or stride < 1:
        raise ValueError(f"window ({window_slices}) and stride ({stride}) must be positive")
    if n_slices <= window_slices:
        return [-((window_slices - n_slices) // 2)]
    starts = list(range(0, n_slices - window_slices + 1, stride))
    if starts[-1] != n_slices - window_slices:
        starts.append(n_slices - window_slices)
    return starts


def select(scores: Sequence[float], threshold: float = 0.9) -> list[int]:
    """Indices kept: every score ≥ threshold, else the (first) best one."""
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        raise ValueError("no windows to select from")
    if np.isnan(scores).any():
        raise ValueError("window scores contain NaN")
    keep = np.flatnonzero(scores >= threshold)
    return keep.tolist() if keep.size else [int(np.argmax(scores))]


class WindowReader:
    """(case_id, start) → {"image": uint8 [D,H,W](, "mask": uint8 [D,H,W])} of a segmentation
    dataset; TensorStore handles stay open per case (and are reopened after pickling, in a
    Grain worker)."""

    def __init__(self, dataset: str, num_slices: int, with_mask: bool = False):
        self.dataset = dataset
        self.num_slices = num_slices
        self.with_mask = with_mask
        self._open: dict[str, Any] = {}

    def __call__(self, item) -> dict[str, np.ndarray]:
        from radnet.data import nifti as lits  # noqa: PLC0415

        case_id, start = item
        if case_id not in self._open:
            self._open[case_id] = lits.open_case(self.dataset, case_id)
        image, mask = self._open[case_id]
        out = {"image": lits.read_window(image, start, self.num_slices)}
        if self.with_mask:
            out["mask"] = lits.read_window(mask, start, self.num_slices)
        return out

    def __getstate__(self):
        return {"dataset": self.dataset, "num_slices": self.num_slices,
                "with_mask": self.with_mask}

    def __setstate__(self, state):
        self.__init__(**state)


def numpy_scorer(score_fn: ScoreFn) -> BatchScorer:
    """A plain function of uint8 windows ``[B, D, H, W]`` → scores ``[B]`` as a BatchScorer
    (one process; the network's scorer is ``radnet_liver_scorer``)."""
    def score(batches):
        for batch in batches:
            keep = np.asarray(batch["mask"], bool)
            out = np.asarray(score_fn(batch["image"][keep]), np.float64).reshape(-1)
            if out.shape[0] != keep.sum():
                raise ValueError(f"score_fn returned {out.shape[0]} scores for {keep.sum()} "
                                 "windows")
            yield batch["position"][keep], out
    return score


def propose(dataset: str, case_ids: Iterable[str], score: BatchScorer, window_slices: int = 48,
            stride: int = 8, threshold: float = 0.9, batch_size: int = 4,
            progress: bool = False) -> dict[str, list[Window]]:
    """All windows (scored, with the selection) of the given cases of a segmentation dataset.

    Every window of every case goes through ``score`` in padded batches of ``batch_size``
    (global: shared by the processes; radnet.evaluators.predict), so each process ends with
    every score.
    """
    import jax  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from radnet.data import nifti as lits  # noqa: PLC0415
    from radnet.evaluators import predict as predict_lib  # noqa: PLC0415

    starts = {}
    for case_id in case_ids:
        image, _ = lits.open_case(dataset, case_id)
        starts[case_id] = window_starts(int(image.shape[0]), window_slices, stride)
    items = [(c, s) for c, ss in starts.items() for s in ss]
    local = predict_lib.local_batch_size(batch_size, jax.process_count(),
                                         jax.local_device_count())
    batches = predict_lib.padded_batches(items, WindowReader(dataset, window_slices), local,
                                         jax.process_index(), jax.process_count())
    scores = np.full(len(items), np.nan)
    bar = tqdm(total=len(items), desc="proposal", unit="window", disable=not progress)
    for positions, values in score(batches):
        scores[np.asarray(positions)] = values
        bar.update(len(positions))
    bar.close()
    if np.isnan(scores).any():
        raise RuntimeError(f"{int(np.isnan(scores).sum())} of {len(items)} windows came back "
                           "without a score")
    out, i = {}, 0
    for case_id, case_starts in starts.items():
        case_scores = scores[i:i + len(case_starts)].tolist()
        i += len(case_starts)
        keep = set(select(case_scores, threshold))
        out[case_id] = [Window(case_id, s, window_slices, float(sc), k in keep)
                        for k, (s, sc) in enumerate(zip(case_starts, case_scores))]
    return out


FIELDS = ("case_id", "start", "num_slices", "score", "selected")


def write_csv(path: str, proposals: dict[str, list[Window]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for windows in proposals.values():
            for win in windows:
                w.writerow([win.case_id, win.start, win.num_slices, f"{win.score:.6f}",
                            int(win.selected)])


def read_csv(path: str) -> dict[str, list[Window]]:
    out: dict[str, list[Window]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["case_id"], []).append(Window(
                r["case_id"], int(r["start"]), int(r["num_slices"]), float(r["score"]),
                r["selected"] == "1"))
    return out


def radnet_liver_scorer(model, variables) -> BatchScorer:
    """Liver coverage probability of a 3D-RADNet classifier, on every device of the run
    (radnet.evaluators.predict: sharded batches, gathered scores)."""
    import jax  # noqa: PLC0415

    from radnet.data import augment  # noqa: PLC0415
    from radnet.evaluators import predict as predict_lib  # noqa: PLC0415

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    batch_sharding = jax.NamedSharding(mesh, jax.P("data"))
    replicated = jax.NamedSharding(mesh, jax.P())
    # Through the host: loaded variables may sit on this process's devices only.
    variables = jax.device_put(jax.device_get(variables), replicated)

    def step(variables, batch):
        # uint8 crosses to the device (a quarter of float32).
        logits = model.apply(variables, augment.to_unit_float(batch["image"]), train=False)
        return {"score": jax.nn.sigmoid(logits["coverage"][:, LIVER].astype(jax.numpy.float32))}, {}

    step = jax.jit(step, out_shardings=(batch_sharding, replicated))

    def score(batches):
        for outputs, gathered, _ in predict_lib.predict(
                step, variables, batches, batch_sharding, device_keys=("image",),
                gather_keys=(predict_lib.POSITION,)):
            yield gathered[predict_lib.POSITION], outputs["score"]

    return score


def main(argv):
    """``python -m radnet.proposal --config=configs/liver.py:dataset=..,pretrained=.. --out=CSV``"""
    import json  # noqa: PLC0415

    import jax  # noqa: PLC0415
    from absl import flags  # noqa: PLC0415

    from radnet.data import nifti as lits  # noqa: PLC0415
    from radnet.train import checkpoint as ckpt_lib  # noqa: PLC0415
    from radnet.train import state as state_lib  # noqa: PLC0415

    del argv
    config = flags.FLAGS.config
    p = config.proposal
    step = None if config.pretrained.step < 0 else config.pretrained.step
    pre_config, variables, step = ckpt_lib.load_variables(config.pretrained.workdir, step)
    windows = propose(config.dataset, lits.cases(config.dataset),
                      radnet_liver_scorer(state_lib.build_model(pre_config), variables),
                      p.window_slices, p.stride, p.threshold, p.batch_size,
                      progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        write_csv(flags.FLAGS.out, windows)
    selected = sum(w.selected for ws in windows.values() for w in ws)
    print(json.dumps({"cases": len(windows), "windows": sum(map(len, windows.values())),
                      "selected": selected, "pretrained_step": step, "out": flags.FLAGS.out}))
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/liver.py[:args]", lock_config=True)
    flags.DEFINE_string("out", None, "proposals.csv to write", required=True)
    from radnet import cli  # one-line errors, quiet libraries

    cli.run(main)
