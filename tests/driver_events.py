"""The end of each request given to a `serving_batch.BatchDriver` in a test, collected from its `emit`."""

import threading


class Ends:
    """`emit_for(i)`: request i's emit; `wait(n)`: until n requests ended; `events[i]`: request i's end (or error)."""

    def __init__(self):
        self.events, self.done = {}, threading.Semaphore(0)

    def emit_for(self, i):
        def emit(event):
            if event["type"] in ("end", "error"):
                self.events[i] = event
                self.done.release()
        return emit

    def wait(self, n: int, timeout: float = 300) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=timeout)
