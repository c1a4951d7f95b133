"""Data-parallel runs on a local Ray cluster of 2 CPU workers: the same content as one process, a worker killed
mid-run, a killed driver resumed."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from attentropy import load_run
from attentropy.schema import ATTN_STATS
from attentropy.parallel import actor_name
from attentropy.run import run_benchmark

ray = pytest.importorskip("ray")  # the `ray` extra; ./test.sh installs it, so this never skips in CI

RUN = dict(benchmark="facts", batch_size=2, max_new_tokens=6, progress=False)


@pytest.fixture(scope="module")
def cluster():
    """A local cluster for the tests in this process (after the one whose driver starts its own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def assert_same_content(run_dir, reference_dir):
    """The same questions, each once, with the same tokens (greedy) and statistics (float32 rounding)."""
    run, ref = load_run(run_dir), load_run(reference_dir)
    assert run.samples.question_id.is_unique and set(run.samples.question_id) == set(ref.samples.question_id)
    order = run.tokens.sort_values(["question_id", "pos"]).index.to_numpy()
    ref_order = ref.tokens.sort_values(["question_id", "pos"]).index.to_numpy()
    tokens, ref_tokens = run.tokens.loc[order].reset_index(drop=True), ref.tokens.loc[ref_order].reset_index(drop=True)
    assert tokens.question_id.tolist() == ref_tokens.question_id.tolist()
    assert tokens.token_id.tolist() == ref_tokens.token_id.tolist()
    for column in ("logprob", "logit_entropy", "logit_varentropy"):
        np.testing.assert_allclose(tokens[column], ref_tokens[column], atol=1e-4)
    for stat in ATTN_STATS:
        np.testing.assert_allclose(run.attn(stat)[order], ref.attn(stat)[ref_order], atol=1e-4)
    return run


def test_a_killed_driver_is_resumed_by_the_same_command(tmp_path, tiny_model_dir):
    """The whole local cluster goes with its driver (SIGKILL); the same command then finishes the run."""
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "attentropy.cli", "run", "--benchmark", "facts", "--out", str(out), "--model",
           str(tiny_model_dir), "--limit", "40", "--batch-size", "2", "--max-new-tokens", "24", "--quiet", "--ray",
           "--workers", "2"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while len(list((out / "samples").glob("part-*.parquet"))) < 2 and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started
    proc.wait()
    partial = len(load_run(out).samples)
    assert 1 <= partial < 40
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run_benchmark(out=tmp_path / "single", model=tiny_model_dir, limit=40, **{**RUN, "max_new_tokens": 24})
    assert_same_content(out, tmp_path / "single")


def test_two_workers_write_what_one_process_writes(tmp_path, tiny_model_dir, cluster):
    run_benchmark(out=tmp_path / "single", model=tiny_model_dir, limit=12, **RUN)
    summary = run_benchmark(out=tmp_path / "ray", model=tiny_model_dir, limit=12, ray="", workers=2, **RUN)
    assert summary["questions"] == 12
    run = assert_same_content(tmp_path / "ray", tmp_path / "single")
    writers = {p.split("-")[1] for p in run.parts}
    assert writers == {"w00", "w01"}  # both workers committed batches, each its own parts
    assert run.config["runtime"]["ray"] == {"workers": 2}
    assert not (tmp_path / "ray" / "writer.lock").exists()
    # a resumed data-parallel run generates only what is missing
    more = run_benchmark(out=tmp_path / "ray", model=tiny_model_dir, limit=16, ray="", workers=2, **RUN)
    run_benchmark(out=tmp_path / "single", model=tiny_model_dir, limit=16, **RUN)
    assert more["questions"] == 16 and more["new_tokens"] == 4 * 6
    assert_same_content(tmp_path / "ray", tmp_path / "single")


def test_a_worker_killed_mid_run_loses_only_its_batch_in_flight(tmp_path, tiny_model_dir, cluster, capfd):
    out = tmp_path / "ray"
    result = {}

    # enough work (8 chunks of 10 questions of 48 tokens) that the worker killed after its first batch still has its
    # chunk to finish even if it loaded its model last (with 40 x 6 tokens the other worker had done the rest)
    settings = {**RUN, "max_new_tokens": 48, "limit": 80}

    def driver():
        try:
            result["summary"] = run_benchmark(out=out, model=tiny_model_dir, ray="", workers=2, **settings)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    thread = threading.Thread(target=driver)
    thread.start()
    deadline = time.time() + 180
    while not list((out / "samples").glob("part-w01-*.parquet")):  # worker w01 has committed a batch
        assert time.time() < deadline and thread.is_alive(), result
        time.sleep(0.01)
    [name] = [n for n in ray.util.list_named_actors() if n.startswith(actor_name(out, 1))]
    ray.kill(ray.get_actor(name))
    thread.join(300)
    assert "error" not in result, result.get("error")
    assert result["summary"]["questions"] == 80
    assert "worker w01 died" in capfd.readouterr().out
    run_benchmark(out=tmp_path / "single", model=tiny_model_dir, **settings)
    assert_same_content(out, tmp_path / "single")


def test_the_analysis_on_ray_gives_the_tables_of_one_process(tmp_path, cluster):
    """`analyze_run(..., ray=...)` (`attentropy report --ray`): groups of layers reduced as Ray tasks, each reading
    its group from the run directory, give the same tables as one process."""
    import pandas as pd

    from attentropy.contrasts import analyze_run
    from synthetic import write_synthetic_run

    run = load_run(write_synthetic_run(tmp_path / "run", n_layers=5, planted=(3, 1), wrong_moment_shift=1.0))
    here = analyze_run(run, workers=1, read_bytes=1, stats=("entropy", "entropy_norm", "logprob"))
    spread = analyze_run(run, ray="", read_bytes=1, stats=("entropy", "entropy_norm", "logprob"))
    pd.testing.assert_frame_equal(here.comparisons, spread.comparisons)
    pd.testing.assert_frame_equal(here.profiles, spread.profiles)
    assert set(here.comparisons.control) >= {"none", "correct_baseline", "position_adjusted"}
