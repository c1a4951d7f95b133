"""The run directory: end to end on a tiny local model, resume after a crash or SIGKILL, load_run's contract."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attentropy import load_run
from attentropy import store as store_module
from attentropy.schema import ATTN_STATS
from attentropy.run import run_benchmark

RUN = dict(benchmark="facts", limit=5, batch_size=2, max_new_tokens=6, progress=False)


def check_run(path, n_questions):
    run = load_run(path)
    assert len(run.samples) == n_questions and run.samples["question_id"].is_unique
    lengths = run.samples.set_index("question_id")["completion_ids"].map(len)
    assert len(run.tokens) == lengths.sum()
    assert (run.tokens.groupby("question_id", sort=False).size() == lengths[run.tokens["question_id"].unique()]).all()
    for stat in ATTN_STATS:
        values = run.attn(stat)
        assert values.shape == (len(run.tokens), len(run.layers), run.n_heads) and values.dtype == np.float32
        assert np.isfinite(values).all()
    return run


def test_run_writes_the_documented_layout(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    summary = run_benchmark(out=out, model=tiny_model_dir, **RUN)
    run = check_run(out, 5)
    assert summary["questions"] == 5 and summary["tokens"] == len(run.tokens)
    assert list(run.samples.columns[:7]) == ["question_id", "benchmark", "question", "target", "reference",
                                             "aliases", "metadata"]
    for column in ("prompt_ids", "completion_ids", "completion"):
        assert column in run.samples
    assert list(run.tokens.columns) == ["question_id", "pos", "token_id", "token", "logprob", "logit_entropy",
                                        "logit_varentropy", "n_keys"]
    assert run.layers == [0, 1, 2] and run.n_heads == 4
    # token rows are the completion ids, in order, with the row convention's key count
    first = run.samples.iloc[0]
    rows = run.tokens[run.tokens.question_id == first.question_id]
    assert rows.token_id.tolist() == list(first.completion_ids)
    assert rows.n_keys.tolist() == list(range(len(first.prompt_ids), len(first.prompt_ids) + len(rows)))
    config = run.config
    for key in ("model", "benchmark", "protocol", "capture", "packages", "git_commit", "attentropy_version"):
        assert key in config
    assert config["model"]["source"] == tiny_model_dir and config["capture"]["units"] == "nats"
    # DuckDB and pandas read the parts directly
    n = duckdb.sql(f"select count(*) from '{out}/tokens/*.parquet'").fetchall()[0][0]
    assert n == len(run.tokens)
    layer = run.layers[-1]
    entropy = duckdb.sql(f"select entropy_layer{layer} from '{out}/attn/*.parquet'").fetchnumpy()
    assert np.array_equal(np.stack(entropy[f"entropy_layer{layer}"]), run.attn("entropy")[:, -1])


def test_float16_storage_holds_the_float32_statistics_rounded(tmp_path, tiny_model_dir):
    run_benchmark(out=tmp_path / "f32", model=tiny_model_dir, **RUN)
    run_benchmark(out=tmp_path / "f16", model=tiny_model_dir, attn_dtype="float16", **RUN)
    full, half = check_run(tmp_path / "f32", 5), check_run(tmp_path / "f16", 5)
    assert pq.read_schema(tmp_path / "f16" / "attn" / "part-00000.parquet").field("entropy_layer0").type \
        .value_type == "halffloat"
    for stat in ATTN_STATS:
        assert np.array_equal(half.attn(stat), full.attn(stat).astype(np.float16).astype(np.float32))


def test_attn_reads_only_the_requested_columns(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "run"
    run_benchmark(out=out, model=tiny_model_dir, **RUN)
    run = load_run(out)
    everything = run.attn("varentropy")
    asked = []
    real = pq.ParquetFile.read
    monkeypatch.setattr(store_module.pq.ParquetFile, "read",
                        lambda self, *a, **k: asked.append(k.get("columns")) or real(self, *a, **k))
    some = run.attn("varentropy", layers=[run.layers[-1], run.layers[0]])
    assert asked and all(columns == [f"varentropy_layer{run.layers[-1]}", f"varentropy_layer{run.layers[0]}"]
                         for columns in asked)
    assert len(run.layers) > 1 and np.array_equal(some, everything[:, [-1, 0]])
    with pytest.raises(KeyError, match="unknown attention statistic"):
        run.attn("entropy_bits")
    with pytest.raises(KeyError, match=r"layers \[99\] were not recorded"):
        run.attn("entropy", layers=[99])


def test_runs_of_the_earlier_attn_layout_are_read(tmp_path, tiny_model_dir):
    """Before 0.2 an attn part held one column per statistic, each row a (layer x head) vector."""
    out = tmp_path / "run"
    run_benchmark(out=out, model=tiny_model_dir, **RUN)
    run = load_run(out)
    expected = {stat: run.attn(stat) for stat in ATTN_STATS}
    for path in (out / "attn").glob("part-*.parquet"):
        table = pq.read_table(path)
        old = {stat: np.stack([np.stack(table[f"{stat}_layer{layer}"].to_pylist()) for layer in run.layers], 1)
               for stat in ATTN_STATS}
        pq.write_table(pa.table({stat: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v[0].size)
                                 for stat, v in old.items()}), path)
    run = load_run(out)
    for stat in ATTN_STATS:
        assert np.array_equal(run.attn(stat), expected[stat])
    assert np.array_equal(run.attn("entropy", [run.layers[-1]]), expected["entropy"][:, [-1]])


def test_rerun_skips_finished_questions_and_extends(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run_benchmark(out=out, model=tiny_model_dir, **{**RUN, "limit": 3})
    before = load_run(out).samples.completion.tolist()
    summary = run_benchmark(out=out, model=tiny_model_dir, **RUN)
    assert summary["new_tokens"] == 2 * 6  # only questions 4 and 5 were generated (random model: no early stop)
    run = check_run(out, 5)
    assert run.samples.completion.tolist()[:3] == before
    assert run_benchmark(out=out, model=tiny_model_dir, **RUN)["new_tokens"] == 0


def test_a_sampled_run_holds_the_same_answers_resumed_or_not(tmp_path, tiny_model_dir):
    """Sampling seeds each question's own generator: a run resumed after 2 questions holds the answers of one that
    was not (seeded per batch offset, the resumed half would have drawn from other seeds)."""
    sampled = {**RUN, "do_sample": True, "temperature": 1.5, "seed": 7}
    run_benchmark(out=tmp_path / "resumed", model=tiny_model_dir, **{**sampled, "limit": 2})
    run_benchmark(out=tmp_path / "resumed", model=tiny_model_dir, **sampled)
    run_benchmark(out=tmp_path / "whole", model=tiny_model_dir, **sampled)
    resumed, whole = (check_run(tmp_path / name, 5).samples.set_index("question_id").completion_ids
                      for name in ("resumed", "whole"))
    assert resumed.map(list).to_dict() == whole.map(list).to_dict()
    greedy = check_run(run_benchmark(out=tmp_path / "greedy", model=tiny_model_dir, **RUN)["run"], 5)
    assert greedy.samples.set_index("question_id").completion_ids.map(list).to_dict() != whole.map(list).to_dict()
    with pytest.raises(ValueError, match="different 'protocol'"):  # static batches seed per batch: another run
        run_benchmark(out=tmp_path / "whole", model=tiny_model_dir, **{**sampled, "batching": "static",
                                                                        "limit": 6})
    with pytest.raises(ValueError, match="--save-attention with --sample needs --batching static"):
        run_benchmark(out=tmp_path / "maps", model=tiny_model_dir, **sampled, save_attention=("facts-00001",))


def test_rerun_with_other_settings_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run_benchmark(out=out, model=tiny_model_dir, **{**RUN, "limit": 2})
    with pytest.raises(ValueError, match="different 'protocol'"):
        run_benchmark(out=out, model=tiny_model_dir, **{**RUN, "max_new_tokens": 9})


def test_crash_while_committing_a_batch_loses_only_that_batch(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "run"
    real = store_module._write_parquet
    writes = []

    def crash_on_second_samples_part(table, path, **options):
        writes.append(path)
        if path.parent.name == "samples" and path.name == "part-00001.parquet":
            raise KeyboardInterrupt("simulated interruption")
        real(table, path, **options)

    monkeypatch.setattr(store_module, "_write_parquet", crash_on_second_samples_part)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(out=out, model=tiny_model_dir, **RUN)
    assert (out / "tokens" / "part-00001.parquet").exists()  # written, but not committed
    check_run(out, 2)
    monkeypatch.setattr(store_module, "_write_parquet", real)
    run_benchmark(out=out, model=tiny_model_dir, **RUN)
    check_run(out, 5)


def test_sigkill_at_any_moment_leaves_a_loadable_run_that_resumes(tmp_path, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for attempt, delay in enumerate((0.0, 0.05, 0.3)):
        out = tmp_path / f"run{attempt}"
        cmd = [sys.executable, "-m", "attentropy.cli", "run", "--model", tiny_model_dir, "--benchmark", "facts",
               "--limit", "12", "--batch-size", "2", "--max-new-tokens", "6", "--out", str(out), "--quiet",
               "--threads", "1"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (out / "samples" / "part-00000.parquet").exists() and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = check_run(out, len(load_run(out).samples))
        assert 1 <= len(partial.samples) <= 12
        assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
        check_run(out, 12)


def test_save_attention_stores_full_maps_of_chosen_questions(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run_benchmark(out=out, model=tiny_model_dir, save_attention=("facts-00003",), **RUN)
    run = load_run(out)
    maps = run.attention_map("facts-00003")
    sample = run.samples.set_index("question_id").loc["facts-00003"]
    n, k = len(sample.completion_ids), len(sample.prompt_ids) + len(sample.completion_ids) - 1
    assert sorted(maps) == run.layers and maps[0].shape == (run.n_heads, n, k)
    np.testing.assert_allclose(maps[0].astype(np.float32).sum(-1), 1.0, atol=3e-3)
    entropy = run.attn("entropy")[(run.tokens.question_id == "facts-00003").to_numpy()]
    p = maps[2].astype(np.float32)
    recomputed = -(p * np.log(np.where(p > 0, p, 1))).sum(-1).T  # [n, H]
    np.testing.assert_allclose(recomputed, entropy[:, 2], atol=2e-2)
    with pytest.raises(KeyError, match="--save-attention"):
        run.attention_map("facts-00000")


def test_arith_runs_each_kind_with_its_own_exemplars(tmp_path, tiny_model_dir):
    """--difficulty 1-2: each kind's (and number of steps') questions share their exemplars' prompt prefix and run
    together; the run holds every question once, with the same answers as static batches (which batch the
    questions in order)."""
    settings = {**RUN, "benchmark": "arith", "difficulty": "1-2", "limit": 14}  # 11 kinds of 1 or 2 steps
    run_benchmark(out=tmp_path / "continuous", model=tiny_model_dir, **settings)
    run_benchmark(out=tmp_path / "static", model=tiny_model_dir, **{**settings, "batching": "static"})
    continuous, static = load_run(tmp_path / "continuous"), load_run(tmp_path / "static")
    assert sorted(continuous.samples.question_id) == [f"arith-{i:05d}" for i in range(14)]
    kinds = Counter((s["kind"], s["steps"]) for s in continuous.samples.metadata)
    assert len(kinds) == 11 and {s for _, s in kinds} == {1, 2} and sorted(kinds.values()) == [1] * 8 + [2] * 3
    by_id = continuous.samples.set_index("question_id").completion
    assert static.samples.set_index("question_id").completion.loc[by_id.index].tolist() == by_id.tolist()
