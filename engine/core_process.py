"""The engine core's process: an LLMEngine stepping in a loop of its own, fed over a socket.

`python -m engine.core_process FD` is started by `EngineCoreClient` with one end of a socket
pair as FD. Messages are pickled tuples (multiprocessing.connection framing):

    client -> core   ("config", EngineConfig)           once, first
                     ("add", Sequence)                  a validated request
                     ("abort", request_id)
                     ("shutdown",)
    core -> client   ("ready", info dict)  or  ("failed", message)    once, after start-up
                     ("outputs", [RequestOutput, ...], stats dict)     one per engine step

The loop never waits on the client while it has work: between steps it takes whatever
messages arrived, steps, and sends that step's outputs as one message. The process ends when
the client says so, when its end of the socket closes, or when the replica's process is gone
(a watchdog thread: a SIGKILLed replica must not leave a core holding the GPU's memory, and a
step in progress or a socket end that another process inherited would delay the EOF).
"""
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from engine.errors import EngineError
from engine.heap import freeze_startup_heap
from engine.outputs import RequestOutput

log = logging.getLogger("engine.core")
IDLE_POLL_S = 0.05  # longest the loop sleeps in poll() when it has nothing to run
STATS_PERIOD_S = 0.2  # stats ride on output messages at most this often (and on idle ticks)
PARENT_CHECK_S = 0.5  # how often the watchdog asks whether the replica's process still exists


def serve(conn: Connection) -> None:
    kind, config = conn.recv()
    if kind != "config":
        raise EngineError(f"engine core: expected the config first, got {kind!r}")
    try:
        from engine.llm_engine import LLMEngine
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - told to the client, which raises it at start-up
        conn.send(("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    info = ready_info(engine)
    info["gc_frozen_objects"] = freeze_startup_heap()
    conn.send(("ready", info))
    try:
        run_loop(engine, conn)
    finally:
        engine.shutdown()


def ready_info(engine) -> dict:
    runner = engine.runner
    return {"num_lora_slots": runner.num_lora_slots, "vocab_size": engine.spec.vocab_size,
            "eos_token_ids": tuple(engine.spec.eos_token_ids),
            "memory": engine.memory_summary(),
            "startup_seconds": dict(runner.startup_seconds), "stats": engine.stats()}


def run_loop(engine, conn: Connection) -> None:
    from engine.async_engine import step_or_fail

    last_stats = 0.0
    while True:
        busy = engine.has_unfinished_requests()
        arrived = conn.poll(0 if busy else IDLE_POLL_S)
        engine.turns.begin()  # after the idle wait: a turn is the work between two waits
        if arrived:
            if not take_messages(engine, conn):
                return
            busy = engine.has_unfinished_requests()
        engine.turns.stepping()
        outputs = step_or_fail(engine) if busy else []
        now = time.monotonic()
        if outputs or now - last_stats >= STATS_PERIOD_S:
            stats = None
            if now - last_stats >= STATS_PERIOD_S:
                stats, last_stats = engine.stats(), now
            conn.send(("outputs", sendable(outputs), stats))
        engine.turns.end(busy)


def take_messages(engine, conn: Connection) -> bool:
    """Apply every message that has arrived; False when the client is gone or said shutdown."""
    replies: list[RequestOutput] = []
    while conn.poll(0):
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return False
        kind = message[0]
        if kind == "shutdown":
            return False
        if kind == "add":
            seq = message[1]
            try:
                engine.add_sequence(seq)
            except Exception as exc:  # noqa: BLE001 - the request fails, the core goes on
                replies.append(RequestOutput(seq.request_id, finished=True, finish_reason="abort", error=exc))
        elif kind == "abort":
            out = engine.abort(message[1])
            if out is not None:
                replies.append(out)
        else:
            log.warning("engine core: unknown message %r", kind)
    if replies:
        conn.send(("outputs", sendable(replies), None))
    return True


def sendable(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """Outputs whose errors survive pickling (an exception with odd constructor arguments
    would fail the whole message on the client's side)."""
    for out in outputs:
        if out.error is not None:
            try:
                pickle.loads(pickle.dumps(out.error))
            except Exception:  # noqa: BLE001
                out.error = EngineError(f"{type(out.error).__name__}: {out.error}")
    return outputs


def watch_parent(parent_pid: int, period_s: float = PARENT_CHECK_S) -> threading.Thread:
    """Exit the process at once when `parent_pid` is no longer its parent (it died: the
    process was handed to init or a subreaper). os._exit: the loop may be inside a step, and
    the driver frees the GPU memory of a process that ends however it ends."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(period_s)
        log.error("engine core: the replica's process %d is gone; exiting", parent_pid)
        logging.shutdown()
        os._exit(1)

    thread = threading.Thread(target=watch, name="moeplex-core-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(message)s")
    conn = Connection(int(argv[1]))
    if len(argv) > 2:
        watch_parent(int(argv[2]))
    try:
        serve(conn)
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the client went away: nothing left to serve
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
