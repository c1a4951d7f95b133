"""The generation process of `attentropy serve`: the model, the instrument, the serving batch
(`serving_batch.BatchDriver`) and the recorder of traffic (`served_runs`) run in a process of their own, so that
decode steps never wait for the HTTP server's interpreter lock, nor it for theirs. The server sends requests and
cancellations down one pipe; the process sends back, once per turn of the batch, every event of that turn and the
batch's load. A process that dies ends its requests with an error and is started again."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from dataclasses import dataclass

log = logging.getLogger("attentropy.serve")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Settings:
    """What the process loads and how its batch is bounded."""

    model: str
    probe: str | None
    rows: int
    max_tokens: int
    max_batch_tokens: int
    record: str | None = None  # a run directory the served answers are appended to
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's choice)


@dataclass
class Ready:
    """What the process reports once it is ready to take requests."""

    tokenizer: object
    context: int  # the model's context in tokens
    name: str  # the model's name (`ModelInfo.name`)


def _load(settings: Settings):
    """(model, tokenizer, instrument, recorder or None); the instrument refused if fitted on another model."""
    from .attention import recorded_layers
    from .instrument import load_instrument
    from .model import load_model

    instrument = load_instrument(settings.probe) if settings.probe else None  # a damaged probe fails first
    model, tokenizer, info = load_model(settings.model, dtype=settings.dtype, device=settings.device)
    if instrument is not None:
        instrument.check({"name": info.name, "revision": info.revision, "layers": recorded_layers(model),
                          "n_heads": model.config.get_text_config().num_attention_heads},
                         f"the model {settings.model!r}")
    recorder = None
    if settings.record:
        from .served_runs import ServedRun

        recorder = ServedRun(settings.record, model, tokenizer, info, instrument, rows=settings.rows)
    return model, tokenizer, info, instrument, recorder


def _main(settings: Settings, commands, events) -> None:
    """The process: load, report `Ready` (or the exception that stopped it), then serve commands until told to stop
    or the server goes away: ("submit", Request) and ("cancel", request id), read by this thread while the batch's
    thread decodes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops this process
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    try:
        model, tokenizer, info, instrument, recorder = _load(settings)
    except Exception as e:
        events.send(("failed", e))
        return
    from .serving_batch import BatchDriver

    live = {}  # request id -> Request, from its submission to its end (or cancellation)
    outbox = []  # (request id, event) of the turn under way, written by the batch's thread only

    def emit_for(rid: str):
        def emit(event: dict) -> None:
            if event["type"] != "token":
                live.pop(rid, None)
                event = {k: v for k, v in event.items() if k != "generation"}  # its capture stays here
            outbox.append((rid, event))
        return emit

    sent_load = None

    def after_turn() -> None:  # one message per turn: the turn's events and, when it changed, the load
        nonlocal sent_load
        load = driver.load()
        if outbox or load != sent_load:
            turn = outbox[:]
            del outbox[:len(turn)]
            events.send(("events", turn, load))
            sent_load = load

    driver = BatchDriver(model, tokenizer, instrument, rows=settings.rows, max_tokens=settings.max_tokens,
                         max_batch_tokens=settings.max_batch_tokens,
                         on_answer=recorder.add if recorder is not None else None, after_turn=after_turn)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
    events.send(("ready", Ready(tokenizer, context, info.name)))
    driver.start()
    try:
        while True:
            try:
                command, arg = commands.recv()
            except EOFError:  # the server went away
                break
            if command == "submit":
                arg.emit = emit_for(arg.question.id)
                live[arg.question.id] = arg
                driver.submit(arg)
            elif command == "cancel" and (request := live.pop(arg, None)) is not None:
                request.cancelled = True  # its row is freed at the next step
            elif command == "stop":
                break
    finally:
        driver.stop()
        if recorder is not None:
            recorder.close()


class GenerationProcess:
    """The server's side of the generation process: `start` (blocks until the model is loaded), then, on the
    server's event loop, `attach`, `submit` (its events arrive in the inbox given), `cancel`, `load` and `stop`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.inboxes: dict[str, object] = {}  # request id -> the asyncio.Queue its events go to
        self.load = {"rows": settings.rows, "busy": 0, "waiting": 0, "steps": 0}
        self.alive = False
        self.loop = None
        self.process = None

    def start(self) -> Ready:
        """Start the process and wait until it has loaded the model; the exception that stopped it is raised here."""
        context = multiprocessing.get_context("spawn")  # (a fork of a process that ran torch may hang)
        commands_out, commands_in = context.Pipe(duplex=False)
        events_out, events_in = context.Pipe(duplex=False)
        self.process = context.Process(target=_main, args=(self.settings, commands_out, events_in),
                                       name="attentropy-generation", daemon=True)
        self.process.start()
        commands_out.close()
        events_in.close()
        self.commands, self.events = commands_in, events_out
        try:
            kind, value = self.events.recv()
        except EOFError:
            raise RuntimeError("the generation process exited while loading the model (see the log above)") from None
        if kind == "failed":
            self.process.join()
            raise value
        return value

    def attach(self, loop) -> None:
        """Receive the process's events on this event loop; requests are taken from now on."""
        self.loop = loop
        loop.add_reader(self.events.fileno(), self._receive)
        self.alive = True

    def submit(self, request, inbox) -> None:
        self.inboxes[request.question.id] = inbox
        try:
            self.commands.send(("submit", request))
        except OSError:  # it has just died (its end is read from the other pipe)
            self.inboxes.pop(request.question.id)
            inbox.put_nowait({"type": "error", "message": "the generation process died; retry the request"})

    def cancel(self, rid: str) -> None:
        """A request whose client went away: its row is freed at the next step (nothing if it has ended)."""
        if self.inboxes.pop(rid, None) is not None and self.alive:
            self.commands.send(("cancel", rid))

    def waiting(self) -> int:
        """Requests sent that have no row yet."""
        return max(0, len(self.inboxes) - self.load["busy"])

    def stop(self) -> None:
        if self.alive:
            self.loop.remove_reader(self.events.fileno())
        self.alive = False
        try:
            self.commands.send(("stop", None))
        except OSError:
            pass
        self.process.join(60)
        if self.process.is_alive():
            self.process.terminate()

    def _receive(self) -> None:
        """The process's messages that have arrived (called by the event loop when its pipe is readable)."""
        try:
            while self.events.poll():
                _, turn, self.load = self.events.recv()
                for rid, event in turn:
                    inbox = self.inboxes.get(rid) if event["type"] == "token" else self.inboxes.pop(rid, None)
                    if inbox is not None:
                        inbox.put_nowait(event)
        except (EOFError, OSError):
            self._died()

    def _died(self) -> None:
        """The process is gone: its requests end with an error and it is started again."""
        self.loop.remove_reader(self.events.fileno())
        self.alive = False
        self.process.join(1)
        log.error("the generation process died (exit code %s); its %d requests end with an error; starting it again",
                  self.process.exitcode, len(self.inboxes))
        for inbox in self.inboxes.values():
            inbox.put_nowait({"type": "error", "message": "the generation process died; retry the request"})
        self.inboxes.clear()
        self.load = {**self.load, "busy": 0, "waiting": 0}
        threading.Thread(target=self._restart, name="attentropy-restart", daemon=True).start()

    def _restart(self) -> None:
        try:
            self.start()
        except Exception:
            log.exception("the generation process could not be started again; the server answers 503")
            return
        self.loop.call_soon_threadsafe(self.attach, self.loop)
        log.info("the generation process is running again")
