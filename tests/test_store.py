"""The run directory's guarantees: one writer at a time (a second is refused, a dead one's lock is taken over),
each question read once, damaged parts named, set aside and regenerated."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attentropy import load_run
from attentropy.cli import main
from attentropy.run import run_benchmark
from attentropy.store import RunDirectoryError
from attentropy.writer_lock import LOCK_NAME, STALE_AFTER_S, writer_lock
from synthetic import write_synthetic_run


def run_command(model_dir, out, limit=12):
    return [sys.executable, "-m", "attentropy.cli", "run", "--model", model_dir, "--benchmark", "facts", "--limit",
            str(limit), "--batch-size", "2", "--max-new-tokens", "6", "--out", str(out), "--quiet", "--threads", "1"]


def wait_for(path, proc, seconds=120):
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)


def test_a_second_writer_is_refused_and_each_question_is_stored_once(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "held"
    out.mkdir()
    with writer_lock(out, "attentropy run --benchmark facts"):  # this process writes: a second one is refused
        assert main(["run", "--model", tiny_model_dir, "--benchmark", "facts", "--limit", "4", "--out", str(out),
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "being written by another process" in err and f"pid {os.getpid()}" in err
    # two writers started together: one writes, the other is refused; every question is stored once
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "run"
    procs = [subprocess.Popen(run_command(tiny_model_dir, out, limit=300), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    assert "being written by another process" in next(err for code, err in results if code == 2)
    run = load_run(out)
    assert len(run.samples) == 300 and run.samples.question_id.is_unique
    assert not (out / LOCK_NAME).exists()  # released


def test_a_killed_writers_lock_does_not_block_the_resume(tmp_path, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "run"
    proc = subprocess.Popen(run_command(tiny_model_dir, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(out / "samples" / "part-00000.parquet", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_NAME).exists()  # left behind by the killed writer
    done = subprocess.run(run_command(tiny_model_dir, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = load_run(out)
    assert len(run.samples) == 12 and run.samples.question_id.is_unique


def test_another_hosts_lock_holds_until_its_heartbeat_is_old(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": "node-17", "pid": 4242, "command": "attentropy run --benchmark gsm8k",
                                "since": "2026-12-01T10:00:00+0000"}))
    with pytest.raises(RunDirectoryError, match="host node-17, pid 4242"):
        with writer_lock(tmp_path, "test"):
            pass
    old = time.time() - STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    with writer_lock(tmp_path, "test") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_directory_with_duplicated_answers_loads_each_question_once(tmp_path):
    path = write_synthetic_run(tmp_path / "run", benchmark="facts", n_questions=40, hidden=([0, 3], 8))
    before = load_run(path)
    for kind in ("samples", "tokens", "attn", "hidden"):  # the first batch again, as a later part
        shutil.copy(path / kind / "part-00000.parquet", path / kind / "part-00007.parquet")
    with pytest.warns(UserWarning, match="16 answers are duplicates"):
        run = load_run(path)
    assert run.samples.question_id.tolist() == before.samples.question_id.tolist()
    assert len(run.tokens) == len(before.tokens)
    np.testing.assert_array_equal(run.attn("entropy"), before.attn("entropy"))
    np.testing.assert_array_equal(run.hidden(), before.hidden())
    with pytest.warns(UserWarning, match="duplicates"):
        assert main(["report", str(path), "--n-boot", "20", "--quiet"]) == 0


def test_attn_parts_are_opened_once_up_to_a_bound_and_read_into_a_given_array(tmp_path, monkeypatch):
    """`Run.attn` keeps the first ATTN_FILES_OPEN attn parts open (each footer parsed once), opens the others for
    each read, and fills `out` when given: the same values whichever way."""
    from attentropy import store

    path = write_synthetic_run(tmp_path / "run", n_questions=64)  # 4 parts
    expected = load_run(path).attn("varentropy")
    opened = []
    real = store.pq.ParquetFile
    monkeypatch.setattr(store.pq, "ParquetFile", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(store, "ATTN_FILES_OPEN", 2)
    run = load_run(path)
    opened.clear()  # (load_run counts each part's rows)
    for layers in ([0, 1], [2], [3]):
        out = np.full((len(run.tokens), len(layers), run.n_heads), np.nan, np.float32)
        assert run.attn("varentropy", layers, out=out) is out
        np.testing.assert_array_equal(out, expected[:, layers])
    attn_opens = [Path(p).name for p in opened if Path(p).parent.name == "attn"]
    assert sorted(set(attn_opens)) == [f"part-{i:05d}.parquet" for i in range(4)]
    assert [attn_opens.count(f"part-{i:05d}.parquet") for i in range(4)] == [1, 1, 3, 3]
    assert len(run._attn_files) == 2


def damage(path, how):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["samples", "tokens", "attn", "hidden"])
@pytest.mark.parametrize("how", ["truncated", "zero-byte"])
def test_a_damaged_part_is_named_and_can_be_skipped(tmp_path, kind, how):
    path = write_synthetic_run(tmp_path / "run", benchmark="facts", n_questions=40, hidden=([0, 3], 8))
    batch = load_run(path).samples.question_id[16:32].tolist()  # part-00001
    damage(path / kind / "part-00001.parquet", how)
    with pytest.raises(RunDirectoryError, match=rf"part-00001: .*{kind} part .*rerun `attentropy run`"):
        load_run(path)
    with pytest.warns(UserWarning, match="damaged batch") as warned:
        run = load_run(path, skip_damaged=True)
    assert len(run.samples) == 24 and not set(batch) & set(run.samples.question_id)
    if kind != "samples":  # its questions are known and named
        assert all(q in str(warned[0].message) for q in batch)
    assert run.attn("entropy").shape[0] == len(run.tokens)


def test_inconsistent_parts_config_and_grades_are_named(tmp_path):
    import pyarrow.parquet as pq

    path = write_synthetic_run(tmp_path / "run", benchmark="facts", n_questions=40)
    tokens = pq.read_table(path / "tokens" / "part-00002.parquet")
    pq.write_table(tokens.slice(0, tokens.num_rows - 3), path / "tokens" / "part-00002.parquet")
    with pytest.raises(RunDirectoryError, match="part-00002: tokens part has .* rows, its samples imply"):
        load_run(path)
    shutil.rmtree(path)
    path = write_synthetic_run(tmp_path / "run", benchmark="facts", n_questions=40)
    damage(path / "grades.parquet", "truncated")
    with pytest.raises(RunDirectoryError, match="grades.parquet is damaged.*attentropy grade"):
        load_run(path)
    (path / "config.json").write_text('{"model": {"name": "x"}, "capture": ')
    with pytest.raises(RunDirectoryError, match="config.json is damaged"):
        load_run(path)
    assert main(["report", str(path)]) == 2


def test_a_resumed_run_sets_damaged_batches_aside_and_regenerates_them(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    settings = dict(model=tiny_model_dir, limit=6, batch_size=2, max_new_tokens=6, progress=False)
    run_benchmark("facts", out, **settings)
    before = load_run(out)
    damage(out / "attn" / "part-00001.parquet", "truncated")
    damage(out / "samples" / "part-00002.parquet", "zero-byte")
    run_benchmark("facts", out, **settings)
    printed = capsys.readouterr().out
    assert "part-00001 is damaged" in printed and "part-00002 is damaged" in printed
    aside = sorted((out / "damaged").iterdir())
    assert len(aside) == 2 and (aside[0] / "attn.parquet").exists() and (aside[0] / "reason.txt").exists()
    run = load_run(out)
    assert sorted(run.samples.question_id) == sorted(before.samples.question_id)
    by_id = before.samples.set_index("question_id").completion_ids.map(list)
    assert all(list(r.completion_ids) == by_id[r.question_id] for r in run.samples.itertuples())  # greedy: same


def test_grade_has_one_writer_and_reads_past_damaged_replies(tmp_path):
    from attentropy.grade import grade_run
    from attentropy.llm_client import ReplyCache

    path = write_synthetic_run(tmp_path / "run", benchmark="facts", n_questions=20)
    with writer_lock(path, "attentropy grade", name="grade.lock"):
        with pytest.raises(RunDirectoryError, match="attentropy grade"):
            grade_run(path, progress=False)
    replies = path / "llm_replies.jsonl"
    replies.write_text(json.dumps({"key": "a", "model": "m", "reply": "A", "error": None}) + "\n"
                       + '{"key": "b", "model": "m", "repl' + "\n\x00\x01garbage\n")
    with pytest.warns(UserWarning, match="2 unreadable line"):
        cache = ReplyCache(replies)
    assert set(cache.replies) == {"a"}
    damage(path / "grades.parquet", "zero-byte")
    with pytest.warns(UserWarning, match="unreadable line"):
        grade_run(path, progress=False)  # rebuilds the grades
    assert "label" in load_run(path).samples


def test_a_damaged_instrument_is_named(tmp_path):
    from attentropy import instrument as ins

    run = write_synthetic_run(tmp_path / "run", benchmark="facts", n_questions=40)
    assert main(["fit", str(run), "--out", str(tmp_path / "probe"), "--n-boot", "20", "--quiet"]) == 0
    ins.load_instrument(tmp_path / "probe")
    damage(tmp_path / "probe" / "arrays.npz", "truncated")
    with pytest.raises(ins.InstrumentError, match="arrays.npz is damaged.*--force"):
        ins.load_instrument(tmp_path / "probe")
    (tmp_path / "probe" / "probe.json").write_text("{")
    with pytest.raises(ins.InstrumentError, match="probe.json is damaged"):
        ins.load_instrument(tmp_path / "probe")


def test_a_damaged_confidence_part_is_named(tmp_path):
    from attentropy import instrument as ins

    run = write_synthetic_run(tmp_path / "run", benchmark="facts", n_questions=40)
    assert main(["fit", str(run), "--out", str(tmp_path / "probe"), "--n-boot", "20", "--quiet"]) == 0
    with pytest.warns(UserWarning, match="in-sample"):
        ins.score_run(ins.load_instrument(tmp_path / "probe"), run)
    assert load_run(run).tokens.prefix_confidence.notna().all()  # a factual instrument: no token model
    damage(run / "confidence" / "part-00001.parquet", "truncated")
    with pytest.raises(RunDirectoryError, match="part-00001: confidence part unreadable"):
        load_run(run)
