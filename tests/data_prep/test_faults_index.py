"""Faults and bad input at the index (issue 16, points 2, 6, 7, 9): special files are rows,
never opened; a large file of zeros costs seconds, not minutes; any file name round-trips
through files.csv and the volume build; unreadable folders are rows; the header cache holds
no free text and no absolute paths.

The index runs as the command (a subprocess with a timeout) where the failure was a hang.
"""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from configs import build_volumes as build_config
from configs import index as index_config
from data_prep import index
from data_prep.index import outputs, reading
from data_prep.volumes import builder
from tests.data_prep.test_index import write_series

ROOT = Path(__file__).resolve().parents[2]
SALT = "faults-test-salt-0123456789abcdef\n"


def index_command(dicom: Path, out: Path, salt: Path, *extra, timeout=180):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.index", "--noprogress", "--workers=0",
         f"--dicom_root={dicom}", f"--out={out}", f"--salt_file={salt}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def files_csv(out: Path) -> dict[str, dict]:
    with outputs.open_csv(str(out / "files.csv")) as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_fifo_and_large_zero_files_finish_in_seconds(tmp_path):
    dicom = tmp_path / "dicom"
    write_series(dicom / "a", 16)
    os.mkfifo(dicom / "pipe")                        # open() would block forever
    with open(dicom / "zeros.bin", "wb") as f:       # 64 MiB of zeros (sparse)
        f.truncate(64 << 20)
    with open(dicom / "dicm_zeros", "wb") as f:      # a DICOM preamble, then 64 MiB of zeros
        f.write(b"\0" * 128 + b"DICM")
        f.truncate(64 << 20)
    salt = tmp_path / "salt"
    salt.write_text(SALT)
    proc, seconds = index_command(dicom, tmp_path / "out", salt, "--config.header_max_s=2")
    # The header that ran out of time is worth another try: exit 1, the tables complete.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "run the same command again" in proc.stderr
    files = files_csv(tmp_path / "out")
    assert files["pipe"]["reason"] == "unreadable"
    assert files["zeros.bin"]["reason"] == "unreadable"
    assert files["dicm_zeros"]["reason"] == "timeout"
    assert sum(r["status"] == "included" for r in files.values()) == 16
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["files"]["to_retry"] == 1
    assert seconds < 60, seconds       # was: forever (the FIFO), 31 s for 64 MiB of zeros


def test_any_file_name_round_trips_through_index_and_build(tmp_path):
    dicom, salt = tmp_path / "dicom", tmp_path / "salt"
    salt.write_text(SALT)
    # A name that is not UTF-8 (byte 0xff, as os.fsdecode gives it) and names with a
    # carriage return, in a folder whose name has both; a junk file with "\r\n".
    folder = dicom / "s\udcff\rx"
    paths = write_series(folder, 8, prefix="lat\udcffin1-") + \
        write_series(folder, 8, prefix="cr\r", uid=None)
    (dicom / "junk\r\n.txt").write_bytes(b"not dicom")
    expected = sorted(reading.walk(str(dicom)))
    assert len(expected) == 17 and "junk\r\n.txt" in expected
    cfg = index_config.get_config()
    cfg.min_slices = 8
    index.run_index(str(dicom), str(tmp_path / "index"), cfg, workers=0,
                    salt_file=str(salt), progress=False)
    files = files_csv(tmp_path / "index")
    assert sorted(files) == expected
    assert all(os.path.exists(os.path.join(dicom, p)) for p in files)
    # The raw bytes of the odd name are in the file, as the file system has them.
    assert b"lat\xffin1-" in (tmp_path / "index" / "files.csv").read_bytes()
    assert sum(r["status"] == "included" for r in files.values()) == 16, files
    config = build_config.get_config("tiny")
    summary = builder.build(str(tmp_path / "index"), str(dicom), str(tmp_path / "ds"), config,
                            workers=0, progress=False)
    assert summary["finalized"] and summary["dataset"]["built"] == 2, summary
    assert len(paths) == 16


def deep_folder(parent: Path, levels: int = 18) -> str:
    """A folder nested so deep that its path exceeds PATH_MAX (4096): made level by level
    relative to an open folder, listable by no one (ENAMETOOLONG), not even by root, for
    whom a chmod 000 folder is no obstacle. Returns its path relative to ``parent``."""
    fd = os.open(parent, os.O_RDONLY)
    name = "d" * 250
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("lost.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"DICM")
    finally:
        os.close(fd)
    return "/".join([name] * levels)


def test_unreadable_folders_and_files_are_rows(tmp_path):
    dicom, salt = tmp_path / "dicom", tmp_path / "salt"
    salt.write_text(SALT)
    write_series(dicom / "ok", 16)
    deep = deep_folder(dicom)
    os.symlink(dicom / "nowhere", dicom / "ok" / "dangling")
    os.symlink(dicom / "ok", dicom / "loop")                   # a link to a folder: not followed
    if os.geteuid() != 0:                                      # root reads through chmod 000
        (dicom / "locked").mkdir()
        (dicom / "locked" / "f.dcm").write_bytes(b"x")
        (dicom / "locked").chmod(0)
    try:
        proc, _ = index_command(dicom, tmp_path / "index", salt)
    finally:
        if (dicom / "locked").exists():
            (dicom / "locked").chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = files_csv(tmp_path / "index")
    unlisted = [p for p in files if p.endswith("/") and p.startswith(deep[:1000])]
    assert len(unlisted) == 1 and deep.startswith(unlisted[0].rstrip("/")), unlisted
    assert files[unlisted[0]]["reason"] == "unreadable"
    assert files["ok/dangling"]["reason"] == "unreadable"
    assert files["loop/"]["reason"] == "unreadable"
    if os.geteuid() != 0:
        assert files["locked/"]["reason"] == "unreadable"
    assert sum(r["status"] == "included" for r in files.values()) == 16


def test_the_header_cache_holds_no_free_text_and_no_absolute_path(tmp_path):
    dicom, salt = tmp_path / "dicom", tmp_path / "salt"
    salt.write_text(SALT)
    write_series(dicom / "a", 16, desc="Quuxley^Anna AX T2 post gad", modality="MR", tr=4000,
                 te=100, study_desc="Dr Florp brain MRI", agent="Quuxovist 20 ml")
    write_series(dicom / "b", 16, desc="CT CHEST Zorblat", study_desc="")
    cfg = index_config.get_config()
    summary = index.run_index(str(dicom), str(tmp_path / "index"), cfg, workers=0,
                              salt_file=str(salt), progress=False)
    cache = (tmp_path / "index" / "cache" / "headers.jsonl").read_text()
    for word in ("Quuxley", "QUUXLEY", "Florp", "FLORP", "Quuxovist", "QUUXOVIST", "Zorblat",
                 "ZORBLAT", str(tmp_path), "ANNA"):
        assert word not in cache, word
    # Error details name no path either (a path can carry a patient's name).
    from radnet.dicom import headers
    for where in (tmp_path / "Quuxley_gone.dcm", tmp_path):
        record = headers.read_header(str(where), b"k" * 32)
        assert record["status"] == "unreadable" and "Quuxley" not in json.dumps(record)
        assert str(tmp_path) not in json.dumps(record)
    # What the rules need is kept: the same labels as from the full descriptions.
    with outputs.open_csv(str(tmp_path / "index" / "series.csv")) as f:
        series = {r["modality"]: r for r in csv.DictReader(f)}
    assert (series["MR"]["sequence"], series["MR"]["contrast"], series["MR"]["status"]) == \
        ("T2-SE", "contrast", "included")
    assert series["CT"]["coverage"] == "" and "CHEST" in series["CT"]["provenance"]
    # A second run from the cache gives the same tables.
    first = {n: (tmp_path / "index" / n).read_bytes() for n in ("files.csv", "series.csv",
                                                               "review.csv")}
    again = index.run_index(str(dicom), str(tmp_path / "index"), cfg, workers=0,
                            salt_file=str(salt), progress=False)
    assert again["headers_parsed"] == 0 and summary["files"] == again["files"]
    for name, data in first.items():
        assert (tmp_path / "index" / name).read_bytes() == data, name


def test_rule_words_keep_every_label_and_reason():
    """The reduced description gives every rule table the same words as the original, so
    labels, reasons and provenance do not change; random descriptions made of rule words,
    names, numbers and separators."""
    import random
    from radnet import rules
    rng = random.Random(16)
    words = list(rules._DESCRIPTION_WORDS)
    junk = ["Quuxley", "JOHN", "3.0", "B31f", "5mm", "AX", "fs", "x2", "iso", "W", "O", "A", "P"]
    seps = [" ", "_", "-", "/", " & ", ", ", "*", "+", "  ", "("]
    tables = [rules._COVERAGE_TABLE, rules._CONTRAST_TABLE, *rules.EXCLUDED_PURPOSE_WORDS.values(),
              {w: True for w in rules.GRADIENT_ECHO_WORDS}]
    cfg = index_config.get_config()
    for _ in range(1000):
        parts = [rng.choice(words if rng.random() < 0.6 else junk) for _ in range(rng.randint(1, 6))]
        text = "".join(p + rng.choice(seps) for p in parts)
        reduced = rules.rule_words(text)
        assert "QUUXLEY" not in reduced and "JOHN" not in reduced
        for table in tables:
            assert rules.find_words(text, table) == rules.find_words(reduced, table), (text, reduced)
        facts = {"modality": "MR", "series_description": text, "ss": [], "image_type": []}
        small = dict(facts, series_description=reduced)
        assert rules.sequence_rule(facts, cfg) == rules.sequence_rule(small, cfg), (text, reduced)
        assert rules.contrast_rule(facts) == rules.contrast_rule(small), (text, reduced)
