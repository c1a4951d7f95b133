"""Data-parallel runs on Ray: `attentropy run ... --ray [ADDRESS] --workers N [--gpus-per-worker G]`.

The driver (the `attentropy run` process) holds the run directory's writer lock, checks or writes config.json from
its first worker's model, and hands the unfinished questions out in chunks to N Ray actors. Each actor loads the
model once (over its G GPUs with `--device-map auto` where the model needs several) and commits its batches into
the same run directory, a shared file system across machines, as `part-w<k>-NNNNN` with the crash-safe protocol of
a single process (`store.append_batch`: samples part last). A worker that dies loses the batches it had in flight:
its chunk, less what it had committed, goes back to the queue for the others; a run whose workers all died, or a
killed driver, is resumed by the same command (the questions already committed are not done again).

Needs the `ray` extra (`pip install "attentropy[ray]"`) and attentropy installed on every node of the cluster.
"""

from __future__ import annotations

import math
import os
from collections import deque
from pathlib import Path

from .data import Question


class WorkerError(RuntimeError):
    """Every worker of a data-parallel run died before its questions were done."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError('data-parallel runs need Ray: pip install "attentropy[ray]"') from None
    return ray


class Worker:
    """One Ray actor: the model loaded once, then chunks of questions generated and committed as `part-<name>-N`."""

    def __init__(self, name: str, model: str, dtype: str, device: str, device_map: str | None, threads: int):
        import torch

        from .model import load_model

        torch.set_num_threads(max(1, threads))
        self.name = name
        self.model, self.tokenizer, self.info = load_model(model, dtype=dtype, device=device, device_map=device_map)

    def describe(self, **described) -> dict:
        from .worker import model_config

        return model_config(self.model, self.info, **described)

    def generate(self, out: str, questions: list[Question], settings, config: dict) -> tuple[int, int]:
        """(answers, tokens) committed for `questions`."""
        from .worker import generate_into

        return len(questions), generate_into(Path(out), self.model, self.tokenizer, questions, settings, config,
                                             writer=self.name)


def actor_name(out: Path, index: int) -> str:
    """The start of the Ray name of a run's worker (`ray.util.list_named_actors`), to watch or stop it; a random
    suffix follows, so that a resumed run's workers never wait for the names of the previous ones."""
    return f"attentropy:{Path(out).resolve()}:w{index:02d}:"


class WorkerPool:
    """The actors of one data-parallel run (`run_benchmark(..., ray=...)`)."""

    def __init__(self, out: Path, model: str, *, address: str | None, workers: int, gpus_per_worker: float,
                 cpus_per_worker: float, dtype: str, device: str, device_map: str | None):
        ray = _ray()
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        if gpus_per_worker > 1 and device_map is None:
            device_map = "auto"  # a model spread over the worker's GPUs
        self.out = Path(out)
        self.ray, self.actors = ray, {}
        for k in range(workers):
            actor = ray.remote(Worker).options(name=actor_name(out, k) + os.urandom(4).hex(), num_cpus=cpus_per_worker,
                                               num_gpus=gpus_per_worker, max_restarts=0)
            self.actors[f"w{k:02d}"] = actor.remote(f"w{k:02d}", model, dtype, device, device_map,
                                                    math.ceil(cpus_per_worker))

    def describe(self, **described) -> dict:
        config = self.ray.get(next(iter(self.actors.values())).describe.remote(**described))
        config["runtime"]["ray"] = {"workers": len(self.actors)}
        return config

    def run(self, todo: list[Question], settings, config: dict, advance=None) -> None:
        """Generate `todo` over the workers: chunks of about a quarter of a worker's share (at least two batches),
        handed to whichever worker is free; a dead worker's unfinished questions go back to the queue."""
        from .store import done_question_ids

        ray = self.ray
        size = max(2 * settings.batch_size, math.ceil(len(todo) / (4 * len(self.actors))))
        queue = deque(todo[i:i + size] for i in range(0, len(todo), size))
        idle, running = list(self.actors), {}
        while queue or running:
            while idle and queue:
                name, chunk = idle.pop(0), queue.popleft()
                running[self.actors[name].generate.remote(str(self.out), chunk, settings, config)] = (name, chunk)
            [ref], _ = ray.wait(list(running), num_returns=1)
            name, chunk = running.pop(ref)
            try:
                n_answers, n_tokens = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                done = done_question_ids(self.out)
                lost = [q for q in chunk if q.id not in done]
                del self.actors[name]
                print(f"[ray] worker {name} died ({type(e).__name__}); {len(chunk) - len(lost)} of its chunk's "
                      f"{len(chunk)} questions were committed, {len(lost)} go back to the queue; "
                      f"{len(self.actors)} workers left", flush=True)
                if lost:
                    queue.append(lost)
                if not self.actors:
                    raise WorkerError(f"every worker died; {sum(map(len, queue))} questions are not done. Rerun the "
                                      "same command to resume") from None
                continue
            idle.append(name)
            if advance is not None:
                advance(n_answers, n_tokens)

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors = {}
