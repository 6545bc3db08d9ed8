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
from typing import Callable, Iterable, Sequence

import numpy as np

from radnet import labels

LIVER = labels.COVERAGE.index("liver")

# uint8 [B, D, H, W] windows → liver probability [B]
ScoreFn = Callable[[np.ndarray], np.ndarray]


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


def propose_case(case_id: str, image_store, score_fn: ScoreFn, window_slices: int = 48,
                 stride: int = 8, threshold: float = 0.9, batch_size: int = 4) -> list[Window]:
    """Scores every window of one case (``image_store``: TensorStore/array ``[n, H, W]``)."""
    from radnet.data import lits  # noqa: PLC0415

    starts = window_starts(int(image_store.shape[0]), window_slices, stride)
    scores: list[float] = []
    for i in range(0, len(starts), batch_size):
        batch = np.stack([lits.read_window(image_store, s, window_slices)
                          for s in starts[i:i + batch_size]])
        out = np.asarray(score_fn(batch), np.float64).reshape(-1)
        if out.shape[0] != batch.shape[0]:
            raise ValueError(f"score_fn returned {out.shape[0]} scores for {batch.shape[0]} windows")
        scores.extend(out.tolist())
    keep = set(select(scores, threshold))
    return [Window(case_id, s, window_slices, float(sc), i in keep)
            for i, (s, sc) in enumerate(zip(starts, scores))]


def propose(dataset: str, case_ids: Iterable[str], score_fn: ScoreFn, window_slices: int = 48,
            stride: int = 8, threshold: float = 0.9, batch_size: int = 4,
            progress: bool = False) -> dict[str, list[Window]]:
    """All windows (scored, with the selection) of the given cases of a LiTS dataset."""
    from tqdm import tqdm  # noqa: PLC0415

    from radnet.data import lits  # noqa: PLC0415

    out = {}
    for case_id in tqdm(list(case_ids), desc="proposal", unit="case", disable=not progress):
        image, _ = lits.open_case(dataset, case_id)
        out[case_id] = propose_case(case_id, image, score_fn, window_slices, stride,
                                    threshold, batch_size)
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


def radnet_liver_scorer(model, variables) -> ScoreFn:
    """Liver coverage probability from a 3D-RADNet classifier (``model.apply``)."""
    import jax  # noqa: PLC0415

    from radnet.data import augment  # noqa: PLC0415

    @jax.jit
    def score(variables, windows_u8):
        # uint8 crosses to the device (a quarter of float32); the weights are an argument,
        # not constants baked into the program.
        logits = model.apply(variables, augment.to_unit_float(windows_u8), train=False)
        return jax.nn.sigmoid(logits["coverage"][:, LIVER].astype(jax.numpy.float32))

    def scorer(windows):
        windows = np.asarray(windows)
        n = len(windows)
        # Pad to a power of two so a case's short last batch does not compile a new program.
        padded = 1 << max(n - 1, 0).bit_length()
        if padded != n:
            windows = np.concatenate(
                [windows, np.zeros((padded - n, *windows.shape[1:]), windows.dtype)])
        return np.asarray(score(variables, windows))[:n]

    return scorer


def main(argv):
    """``python -m radnet.proposal --config=configs/liver.py:dataset=..,pretrained=.. --out=CSV``"""
    import json  # noqa: PLC0415

    from absl import flags  # noqa: PLC0415

    from radnet.data import lits  # noqa: PLC0415
    from radnet.train import transfer  # noqa: PLC0415

    del argv
    config = flags.FLAGS.config
    p = config.proposal
    step = None if config.pretrained_step < 0 else config.pretrained_step
    model, variables, step = transfer.load_classifier(config.pretrained_workdir, step)
    windows = propose(config.dataset, lits.cases(config.dataset), radnet_liver_scorer(model, variables),
                      p.window_slices, p.stride, p.threshold, p.batch_size, progress=True)
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
    app.run(main)
