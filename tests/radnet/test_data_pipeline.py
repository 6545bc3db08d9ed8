"""The Grain pipelines over a real (tiny) TensorStore dataset: sharding, shuffling,
padding, pickling into worker processes and Orbax checkpoints of the iterator."""

import pickle

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from radnet import labels
from radnet.data import pipeline, schema
from radnet.data import source as source_lib

VOLUME_SHAPE = (2, 3, 4)
TRAIN, VAL = labels.split_index("train"), labels.split_index("val")


def _make_dataset(path, splits):
    """Volume i is filled with i, labels are functions of i, so every read is checkable."""
    n = len(splits)
    arrays = schema.create(str(path), n, volume_shape=VOLUME_SHAPE, label_chunk=8)
    rows = np.arange(n)
    arrays["volume"].write(np.broadcast_to(rows[:, None, None, None].astype(np.uint8),
                                           (n, *VOLUME_SHAPE))).result()
    arrays["sequence"].write((rows % 5).astype(np.int8)).result()
    arrays["view"].write((rows % 3).astype(np.int8)).result()
    arrays["contrast"].write((rows % 2).astype(np.int8)).result()
    coverage = (rows[:, None] + np.arange(9)) % 2
    coverage[rows % 4 == 0] = -1  # some rows with unknown coverage
    arrays["coverage"].write(coverage.astype(np.int8)).result()
    arrays["effective_spacing_mm"].write((1.0 + rows).astype(np.float32)).result()
    arrays["split"].write(np.asarray(splits, np.int8)).result()
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 17 rows: 13 train, 2 val, 2 unusable (-1); the unusable ones sit inside the range.
    splits = [TRAIN] * 17
    splits[3] = splits[11] = -1
    splits[6] = splits[14] = VAL
    path = _make_dataset(tmp_path_factory.mktemp("ds") / "dataset", splits)
    return path, np.flatnonzero(np.asarray(splits) == TRAIN), np.flatnonzero(np.asarray(splits) == VAL)


def _check_batch(batch, b):
    assert batch["volume"].dtype == np.uint8 and batch["volume"].shape == (b, *VOLUME_SHAPE)
    for name in ("sequence", "view", "contrast", "index"):
        assert batch[name].dtype == np.int32 and batch[name].shape == (b,), name
    assert batch["coverage"].dtype == np.int32 and batch["coverage"].shape == (b, 9)
    assert batch["effective_spacing_mm"].dtype == np.float32
    rows = batch["index"]
    valid = rows >= 0
    # Each sample's volume and labels belong to the row it names.
    np.testing.assert_array_equal(batch["volume"][valid, 0, 0, 0], rows[valid])
    np.testing.assert_array_equal(batch["sequence"][valid], rows[valid] % 5)
    np.testing.assert_array_equal(batch["view"][valid], rows[valid] % 3)
    np.testing.assert_array_equal(batch["effective_spacing_mm"][valid], 1.0 + rows[valid])


def _global_stream(dataset_path, *, processes, batch_size, steps, seed=0, **kw):
    """Per-process batches interleaved back into the global stream (element g → process g % P)."""
    per_process = []
    for p in range(processes):
        it = pipeline.train_iterator(dataset_path, batch_size=batch_size, seed=seed,
                                     process_index=p, process_count=processes, **kw)
        batches = [next(it) for _ in range(steps)] if steps else list(it)
        for b in batches:
            _check_batch(b, batch_size)
        per_process.append(np.concatenate([b["index"] for b in batches]) if batches
                           else np.zeros(0, np.int32))
    counts = {len(x) for x in per_process}
    assert len(counts) == 1, f"processes yielded different numbers of samples: {counts}"
    return np.stack(per_process, axis=1).reshape(-1)  # [step*b, P] → interleaved


def test_every_epoch_is_a_permutation_split_across_processes(dataset):
    path, train_rows, _ = dataset
    n = len(train_rows)
    # 2 processes × batch 3 × 9 steps = 54 samples: 4 whole epochs of 13 and a bit.
    stream = _global_stream(path, processes=2, batch_size=3, steps=9)
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    for e, epoch in enumerate(epochs):
        np.testing.assert_array_equal(np.sort(epoch), train_rows, err_msg=f"epoch {e}")
    # Shuffled, and each epoch in its own order.
    assert not np.array_equal(epochs[0], train_rows)
    assert len({tuple(e) for e in epochs}) == 4
    # The one-process stream is the same global order: sharding does not change the data.
    single = _global_stream(path, processes=1, batch_size=6, steps=9)
    np.testing.assert_array_equal(single, stream)


def test_finite_epochs_drop_only_the_last_partial_global_batch(dataset):
    path, train_rows, _ = dataset
    n = len(train_rows)
    stream = _global_stream(path, processes=2, batch_size=3, steps=None, num_epochs=2)
    assert len(stream) == (2 * n) // 6 * 6  # 24 of 26: two samples left over
    np.testing.assert_array_equal(np.sort(stream[:n]), train_rows)
    assert len(set(stream[n:])) == len(stream[n:])  # no sample twice in the cut epoch


def test_seed_and_shuffle_control_the_order(dataset):
    path, train_rows, _ = dataset
    a = _global_stream(path, processes=1, batch_size=4, steps=3, seed=7)
    b = _global_stream(path, processes=1, batch_size=4, steps=3, seed=7)
    c = _global_stream(path, processes=1, batch_size=4, steps=3, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ordered = _global_stream(path, processes=1, batch_size=4, steps=3, shuffle=False)
    np.testing.assert_array_equal(ordered[:12], train_rows[:12])


def test_worker_processes_give_the_same_batches(dataset):
    path, _, _ = dataset
    # mp_prefetch pickles the source into spawned workers: it must not carry open handles.
    expected = _global_stream(path, processes=1, batch_size=2, steps=5)
    it = pipeline.train_iterator(path, batch_size=2, seed=0, worker_count=2,
                                 process_index=0, process_count=1)
    got = np.concatenate([next(it)["index"] for _ in range(5)])
    it.close()
    np.testing.assert_array_equal(got, expected)


def test_source_pickles_without_open_handles(dataset):
    path, train_rows, _ = dataset
    src = source_lib.ZarrVolumeSource(path, "train", data_copy_concurrency=1, file_io_concurrency=2)
    first = src[0]
    assert src._volume is not None  # opened by the read
    clone = pickle.loads(pickle.dumps(src))
    assert clone._volume is None  # reopened lazily in the new process
    np.testing.assert_array_equal(clone[0]["volume"], first["volume"])
    assert [int(x["index"]) for x in clone._getitems([2, 0])] == [train_rows[2], train_rows[0]]
    with pytest.raises(IndexError):
        src.read(np.asarray([len(src)]))


def test_bad_split_and_empty_split_are_named(dataset, tmp_path):
    path, _, _ = dataset
    with pytest.raises(ValueError, match="unknown split"):
        pipeline.train_iterator(path, split="training", batch_size=2, seed=0,
                                process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no rows in split 'test'"):
        pipeline.train_iterator(path, split="test", batch_size=2, seed=0,
                                process_index=0, process_count=1)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        pipeline.train_iterator(path, split="val", batch_size=2, seed=0, num_epochs=1,
                                process_index=0, process_count=2)
    with pytest.raises(FileNotFoundError):
        pipeline.train_iterator(str(tmp_path / "nothing"), batch_size=2, seed=0,
                                process_index=0, process_count=1)


@pytest.mark.parametrize("processes,batch_size", [(1, 4), (3, 2), (2, 8)])
def test_eval_batches_cover_each_sample_once(dataset, processes, batch_size):
    path, train_rows, _ = dataset
    per_process = [list(pipeline.eval_batches(path, split="train", batch_size=batch_size,
                                              process_index=p, process_count=processes))
                   for p in range(processes)]
    expected_count = pipeline.num_eval_batches(len(train_rows), batch_size, processes)
    assert [len(x) for x in per_process] == [expected_count] * processes
    seen = []
    for batches in per_process:
        for b in batches:
            _check_batch(b, batch_size)
            assert b["mask"].dtype == bool
            seen.extend(b["index"][b["mask"]])
            pad = ~b["mask"]
            assert (b["index"][pad] == -1).all() and (b["sequence"][pad] == -1).all()
            assert (b["coverage"][pad] == -1).all() and (b["volume"][pad] == 0).all()
            assert np.isnan(b["effective_spacing_mm"][pad]).all()
    np.testing.assert_array_equal(np.sort(seen), train_rows)


def _save_and_restore(path, ckpt_dir, worker_count):
    def fresh():
        return pipeline.train_iterator(path, batch_size=3, seed=3, worker_count=worker_count,
                                       process_index=0, process_count=1)

    it = fresh()
    for _ in range(3):  # mid-epoch: 9 of 13 samples
        next(it)
    state = {"step": np.asarray(3)}
    with ocp.CheckpointManager(ckpt_dir) as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it)["index"] for _ in range(4)]  # crosses into the next epoch
    it.close()

    restored_it = fresh()
    with ocp.CheckpointManager(ckpt_dir) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state),
            data=grain.checkpoint.CheckpointRestore(restored_it)))
    assert int(restored.state["step"]) == 3
    got = [next(restored.data)["index"] for _ in range(4)]
    restored.data.close()
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_iterator_state_checkpoints_with_orbax(dataset, tmp_path):
    path, _, _ = dataset
    _save_and_restore(path, tmp_path / "ckpt0", worker_count=0)


def test_iterator_state_checkpoints_with_workers(dataset, tmp_path):
    path, _, _ = dataset
    _save_and_restore(path, tmp_path / "ckpt1", worker_count=1)


def test_concurrency_limits_share_the_cores():
    cores = source_lib.available_cores()
    one_copy, one_io = source_lib.concurrency_limits(1)
    assert one_copy == cores and one_io >= one_copy
    many_copy, _ = source_lib.concurrency_limits(4 * cores)
    assert many_copy == 1  # never zero threads
    for w in (1, 2, 3, 8):
        assert w * source_lib.concurrency_limits(w)[0] <= max(cores, w)
