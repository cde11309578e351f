"""Model runtimes in a worker process: onnxruntime or llama.cpp, one model at a time.

The agent never loads a model in its own process: llama.cpp aborts the process on some
bad input and a runtime can exhaust memory. ``ModelWorker`` starts a spawned child that
loads the model and answers requests over a pipe; a child that dies is reported as an
error (``RuntimeCrashed``) and started again on the next request. Given the box's
memory limit, the child runs in a memory cgroup of that size (``agent.limits``), and a
child the kernel killed for memory is reported as out of memory. This module checks
ONNX inputs against the model (names, dtypes, shapes) so a bad request gets a clear
message; it does not verify files (the installer does, before anything is loaded).
"""

import itertools
import logging
import multiprocessing as mp
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from agent.limits import LimitUnavailable, WorkerLimit
from shared import encoder, smoke

log = logging.getLogger(__name__)
_unenforced = False  # said once: memory_limit_bytes cannot be enforced here


class RuntimeCrashed(Exception):
    """The worker process died while answering; it is restarted on the next request."""


class Replaced(Exception):
    """The worker was stopped (its model replaced) before this call could start: ask the
    model that replaced it."""


class BadRequest(Exception):
    """The request does not fit the model; the message says why."""


def _load(path: str, fmt: str, *, parallel: int = 1) -> Any:
    """``fmt``: "onnx", "gguf" (a model that generates), "gguf-embed" or "onnx-embed" (an
    encoder)."""
    if fmt.startswith("onnx"):
        return _OnnxModel(path, parallel=parallel)
    return _LlamaModel(path, embedding=fmt == "gguf-embed")


def _serve(conns: list[Connection], path: str, fmt: str,
           limit: WorkerLimit | None = None) -> None:
    """The worker process: load the model, then answer requests until the first pipe
    closes, each pipe in a thread of its own; in ``limit``'s memory cgroup, joined
    before anything is loaded."""
    try:
        if limit is not None:
            limit.join()
        model = _load(path, fmt, parallel=len(conns))
    except Exception as exc:  # noqa: BLE001 - report any load failure to the parent
        conns[0].send({"error": f"cannot load the model: {exc}"})
        return
    conns[0].send({"ready": model.describe()})
    for conn in conns[1:]:
        threading.Thread(target=_answer_all, args=(conn, model), daemon=True).start()
    _answer_all(conns[0], model)


def _answer_all(conn: Connection, model: Any) -> None:
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request.get("op") == "cancel":
            continue  # for a stream that had already ended
        try:
            if request["args"].get("stream"):
                _stream(conn, getattr(model, request["op"])(**request["args"]))
            elif request["op"] in _CANCELLABLE:
                conn.send({"ok": getattr(model, request["op"])(
                    **request["args"], cancelled=_cancel_seen(conn))})
            else:
                conn.send({"ok": getattr(model, request["op"])(**request["args"])})
        except BadRequest as exc:
            conn.send({"bad_request": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the runtime's own errors
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


#: the calls that stop early, on a cancel from the parent, when not streamed
_CANCELLABLE = ("complete", "chat")


def _cancel_seen(conn: Connection) -> Callable[[], bool]:
    """True once the parent has sent a cancel (its client went away) for the call in
    progress; the only message it can send meanwhile."""
    seen = False

    def cancelled() -> bool:
        nonlocal seen
        seen = seen or (conn.poll() and conn.recv().get("op") == "cancel")
        return seen
    return cancelled


def _stream(conn: Connection, chunks: Iterator[Any]) -> None:
    """Send each chunk as it comes, then ``{"ok": None}``; a cancel from the parent (its
    client went away) stops the generation between two chunks."""
    for chunk in chunks:
        conn.send({"chunk": chunk})
        if conn.poll() and conn.recv().get("op") == "cancel":
            break
    conn.send({"ok": None})


class _OnnxModel:
    def __init__(self, path: str, *, parallel: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if parallel > 1:
            # calls that run at once each get their share of the cores, as an inference
            # server's instances do; onnxruntime's own threads would contend with the
            # other calls (and spin while they wait for work, taking the cores those
            # need): a recurrent model at 4 at once on 2 cores ran 1.1x one at a time
            # with them, 1.55-2.0x with a core each
            options.intra_op_num_threads = max(1, (os.cpu_count() or 1) // parallel)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options,
                                            providers=ort.get_available_providers())
        self._local = threading.local()  # each answering thread's request buffer
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        declared = encoder.parse(self.session.get_modelmeta().custom_metadata_map)
        self.encoder = _Encoder(declared, self.inputs) if declared else None

    def describe(self) -> dict[str, Any]:
        return {"inputs": {n: {"type": i.type, "shape": list(i.shape)}
                           for n, i in self.inputs.items()}, "outputs": self.outputs,
                "providers": self.session.get_providers()}

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            feed = smoke.onnx_feed(self.inputs.values(), inputs)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        values = self.session.run(self.outputs, feed)
        return {name: v.tolist() for name, v in zip(self.outputs, values, strict=True)}

    def embeddings(self, texts: list[str]) -> dict[str, Any]:
        """A sentence encoder's embeddings of ``texts`` (run as one batch), as
        ``_LlamaModel.embeddings`` gives them."""
        if self.encoder is None:
            raise BadRequest("the model is not a sentence encoder")
        feed, mask = self.encoder.feed(texts)
        (out,) = self.session.run(self.outputs[:1], feed)
        vectors = self.encoder.pooled(out, mask)
        return {"vectors": vectors.astype("<f4").tobytes(), "dimension": vectors.shape[1],
                "tokens": int(mask.sum())}

    def infer_raw(self, inputs: dict[str, tuple[str, list[int], Any]]
                  ) -> dict[str, tuple[str, list[int], bytes]]:
        """Tensors as (numpy dtype name, shape, raw little-endian bytes) both ways: what
        the binary API carries, with no conversion to lists. An input's bytes may also be
        ``(shared memory name, offset, length)``: ``ModelWorker`` passes large inputs so."""
        import numpy as np

        given = {}
        for name, (dtype, shape, data) in inputs.items():
            try:
                buffer = self._shared(data) if isinstance(data, tuple) else data
                given[name] = np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<")
                                            ).reshape(shape)
            except (TypeError, ValueError) as exc:
                raise BadRequest(f"{name}: {exc}") from None
        try:
            feed = smoke.onnx_feed(self.inputs.values(), given)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        values = self.session.run(self.outputs, feed)
        del feed, given  # views of the shared memory, which must not outlive this call
        return {name: (v.dtype.name, list(v.shape), np.ascontiguousarray(v).tobytes())
                for name, v in zip(self.outputs, values, strict=True)}

    def _shared(self, where: tuple[str, int, int]) -> memoryview:
        """A view of the parent's request buffer (attached once; again if it grew)."""
        from multiprocessing import shared_memory

        name, offset, length = where
        current = getattr(self._local, "shm", None)
        if current is None or current.name != name:
            if current is not None:
                current.close()
            # the parent owns and unlinks it (a spawned worker shares its resource
            # tracker, so this attach registers nothing new)
            current = shared_memory.SharedMemory(name=name)
            self._local.shm = current
        return current.buf[offset:offset + length]  # type: ignore[index]


class _Encoder:
    """A sentence encoder's tokenizer and pooling, as its file declares them."""

    def __init__(self, declared: encoder.Encoder, inputs: dict[str, Any]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError("the model is a sentence encoder, whose tokenizer needs the "
                               "tokenizers package: pip install 'edgefleet[embed]'") from None
        self.declared = declared
        self.tokenizer = Tokenizer.from_str(declared.tokenizer)
        self.tokenizer.no_truncation()  # a text too long is refused, not cut
        padding = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(pad_id=padding.get("pad_id", 0),
                                      pad_token=padding.get("pad_token", "[PAD]"))
        self.types = {name: "int32" if i.type == "tensor(int32)" else "int64"
                      for name, i in inputs.items()}

    def feed(self, texts: list[str]) -> tuple[dict[str, Any], Any]:
        """The model's inputs for ``texts``, padded to the longest, and its mask."""
        import numpy as np

        encoded = self.tokenizer.encode_batch(texts)
        lengths = [sum(e.attention_mask) for e in encoded]
        if max(lengths) > self.declared.max_tokens:
            longest = lengths.index(max(lengths))
            raise BadRequest(f"input {longest} has {lengths[longest]} tokens, over the "
                             f"model's limit of {self.declared.max_tokens}")
        columns = {"input_ids": [e.ids for e in encoded],
                   "attention_mask": [e.attention_mask for e in encoded],
                   "token_type_ids": [e.type_ids for e in encoded]}
        feed = {name: np.array(columns[name], dtype=dtype) for name, dtype in self.types.items()}
        return feed, np.array(columns["attention_mask"], dtype=np.float32)

    def pooled(self, out: Any, mask: Any) -> Any:
        """``out`` (the first output) as one vector per text."""
        import numpy as np

        pooling = self.declared.pooling
        if pooling == "mean":
            out = (out * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1e-9)[:, None]
        elif pooling == "cls":
            out = out[:, 0]
        elif pooling == "max":
            out = np.where(mask[..., None] > 0, out, -np.inf).max(1)
        if self.declared.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


class _LlamaModel:
    def __init__(self, path: str, *, embedding: bool = False) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=smoke.GGUF_CONTEXT, n_threads=2, seed=0,
                         verbose=False, embedding=embedding)

    def embed(self, text: str) -> list[float]:
        """The pooled embedding of ``text`` (an encoder GGUF)."""
        return [float(v) for v in self.llm.embed(text)]

    def embeddings(self, texts: list[str]) -> dict[str, Any]:
        """The embeddings of ``texts`` (little-endian float32s, a vector of ``dimension``
        after another) and how many tokens they took; a text over the context is the
        request's fault."""
        tokens = [len(self.llm.tokenize(t.encode())) for t in texts]
        if max(tokens) > self.llm.n_ctx():
            raise BadRequest(f"input {tokens.index(max(tokens))} has {max(tokens)} tokens, "
                             f"over the model's context of {self.llm.n_ctx()}")
        vectors = [self.embed(t) for t in texts]
        return {"vectors": struct.pack(f"<{len(vectors) * len(vectors[0])}f",
                                       *itertools.chain.from_iterable(vectors)),
                "dimension": len(vectors[0]), "tokens": sum(tokens)}

    def describe(self) -> dict[str, Any]:
        return {"context": self.llm.n_ctx()}

    def generate(self, prompt: str, max_tokens: int) -> list[int]:
        """Greedy token ids (what smoke tests compare)."""
        return smoke.greedy_tokens(self.llm, prompt, max_tokens)

    def complete(self, prompt: str, *, cancelled: Callable[[], bool] | None = None,
                 **sampling: Any) -> Any:
        """llama.cpp's completion (``sampling``: max_tokens, temperature, top_p, stop,
        seed, stream); with ``stream``, an iterator of its chunks. ``cancelled`` is
        asked after each token: True stops the generation there."""
        return _refused(lambda: self.llm.create_completion(
            prompt, **sampling, **_stopping(cancelled)), stream=bool(sampling.get("stream")))

    def chat(self, messages: list[dict[str, str]], *,
             cancelled: Callable[[], bool] | None = None, **sampling: Any) -> Any:
        """llama.cpp's chat completion, as ``complete``. Its chat takes no stopping
        criteria: once ``cancelled``, the next token can only be the end of the text."""
        return _refused(lambda: self.llm.create_chat_completion(
            messages=messages, **sampling, **self._ending(cancelled)),
            stream=bool(sampling.get("stream")))

    def _ending(self, cancelled: Callable[[], bool] | None) -> dict[str, Any]:
        if cancelled is None:
            return {}
        from llama_cpp import LogitsProcessorList

        eos = self.llm.token_eos()

        def end(_ids: Any, scores: Any) -> Any:
            if cancelled():
                scores[:] = -float("inf")
                scores[eos] = 0.0
            return scores
        return {"logits_processor": LogitsProcessorList([end])}


def _stopping(cancelled: Callable[[], bool] | None) -> dict[str, Any]:
    if cancelled is None:
        return {}
    from llama_cpp import StoppingCriteriaList

    return {"stopping_criteria": StoppingCriteriaList([lambda _ids, _logits: cancelled()])}


#: request tensors larger than this go to the worker through shared memory, not the pipe
#: (a 1.2 MB image: 1 ms through the pipe, 0.05 ms through shared memory)
SHARED_MIN_BYTES = 64 << 10


def _answer(answer: dict[str, Any]) -> Any:
    """The worker's answer, or its refusal or error raised."""
    if "bad_request" in answer:
        raise BadRequest(answer["bad_request"])
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer.get("ok")


def _refused(run: Callable[[], Any], *, stream: bool) -> Any:
    """llama.cpp's answer; its ValueError (a prompt longer than the context) is the
    request's fault, a BadRequest, also when a stream raises it on its first chunk."""
    try:
        out = run()
        if not stream:
            return dict(out)
        first = next(out, None)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return itertools.chain([] if first is None else [first], out)


@dataclass
class _Slot:
    """One pipe to the worker (a thread there answers it) and its request buffer."""

    conn: Connection
    generation: int
    shm: Any = None  # shared memory for large inputs, grown as needed


class ModelWorker:
    """The parent's handle on one model's worker process (thread-safe). An ONNX model
    answers up to ``parallel`` calls at once (None: one per CPU), each over a pipe of its
    own answered by a thread of its own in the worker (onnxruntime sessions are
    thread-safe; one copy of the model); llama.cpp answers one at a time."""

    def __init__(self, path: Path, fmt: str, *, load_timeout: float = 120.0,
                 memory_limit: int | None = None, parallel: int | None = 1) -> None:
        self.path, self.format = path, fmt
        self.parallel = (max(1, parallel or os.cpu_count() or 1) if fmt.startswith("onnx")
                         else 1)
        self._load_timeout = load_timeout
        self.memory_limit = memory_limit
        self.limit: WorkerLimit | None = None
        self._ooms = 0
        self._lock = threading.Lock()  # the process's life: start, crash, stop
        self._changed = threading.Condition(self._lock)  # a pipe came free, or it stopped
        self._free: list[_Slot] = []
        self._slots: list[_Slot] = []
        self._stopped = False
        self._generation = 0
        self._why = ""  # why the last worker died
        self._process: mp.process.BaseProcess | None = None
        self.description: dict[str, Any] = {}
        self.crashes = 0

    def start(self) -> None:
        """Start the worker and wait until the model is loaded; raise if it cannot be."""
        with self._lock:
            self._stopped = False
            self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe() for _ in range(self.parallel)]
        limit = self._cgroup()
        process = ctx.Process(target=_serve, args=([c for _, c in pipes], str(self.path),
                                                   self.format, limit),
                              name="edgefleet-model", daemon=True)
        process.start()
        for _, child in pipes:
            child.close()
        parent = pipes[0][0]
        if not parent.poll(self._load_timeout):
            process.kill()
            raise RuntimeCrashed(f"the model did not load within {self._load_timeout:.0f} s")
        try:
            hello = parent.recv()
        except EOFError:
            process.join(5)
            raise RuntimeCrashed(self._out_of_memory() or "the runtime died loading the model "
                                 f"(exit code {process.exitcode})") from None
        if "error" in hello:
            process.join(5)
            raise RuntimeCrashed(hello["error"])
        self._generation += 1
        self._slots = [_Slot(conn, self._generation) for conn, _ in pipes]
        self._free = list(self._slots)
        self._process, self.description = process, hello["ready"]

    def call(self, op: str, *, client: socket.socket | None = None, **args: Any) -> Any:
        """Run ``op`` in the worker; BadRequest for bad input, RuntimeCrashed if it died
        (reported once; the next call starts a new worker). If ``client``, the socket of
        the request it answers, closes first, a generation is cancelled where it is."""
        slot = self._take()
        try:
            if op == "infer_raw":
                args = {"inputs": self._share(slot, args["inputs"])}
            try:
                slot.conn.send({"op": op, "args": args})
                if client is not None and op in _CANCELLABLE:
                    _watch(slot.conn, client)
                answer = slot.conn.recv()
            except (EOFError, OSError):
                self._crashed(slot)
        finally:
            self._give(slot)
        return _answer(answer)

    def stream(self, op: str, **args: Any) -> Iterator[Any]:
        """Run ``op`` with ``stream=True`` in the worker and yield its chunks as they
        come; the worker is held until the end. Closing the iterator early (the client
        went away) cancels the generation in the worker."""
        slot = self._take()
        conn, done = slot.conn, False
        try:
            conn.send({"op": op, "args": {**args, "stream": True}})
            while True:
                answer = conn.recv()
                if "chunk" not in answer:
                    done = True
                    break
                yield answer["chunk"]
        except (EOFError, OSError):
            done = True
            self._crashed(slot)
        finally:
            if not done:  # abandoned: stop the generation, and read what it sent
                self._cancel(slot)
            self._give(slot)
        _answer(answer)

    def _take(self) -> _Slot:
        """A free pipe to a running worker (waiting for one while all are busy): a dead
        worker is reported (once), a missing one started; Replaced once it was stopped."""
        with self._changed:
            while True:
                if self._stopped:
                    raise Replaced
                if self._process is not None and not self._process.is_alive():
                    self._died()
                    raise RuntimeCrashed(self._why)
                if self._process is None:
                    self._start()
                if self._free:
                    return self._free.pop()
                self._changed.wait()

    def _give(self, slot: _Slot) -> None:
        with self._changed:
            if slot.generation == self._generation and self._process is not None:
                self._free.append(slot)
            else:  # a pipe to a worker that has since died
                slot.conn.close()
                _unlink(slot)
            self._changed.notify_all()

    def _cancel(self, slot: _Slot) -> None:
        try:
            slot.conn.send({"op": "cancel"})
            while "chunk" in slot.conn.recv():
                pass
        except (EOFError, OSError):
            with self._lock:  # it died meanwhile: the next call starts a new one
                if slot.generation == self._generation and self._process is not None:
                    self.crashes += 1
                    self._process = None

    def _crashed(self, slot: _Slot) -> NoReturn:
        """The worker died under this call: reported once for all the calls it held."""
        with self._lock:
            if slot.generation == self._generation and self._process is not None:
                self._died()
        raise RuntimeCrashed(self._why)

    def _died(self) -> None:
        """Record the worker's death (with the lock held) and forget it."""
        self.crashes += 1
        process, self._process = self._process, None
        if process is not None:
            process.join(1)
        code = process.exitcode if process is not None else None
        self._why = self._out_of_memory() or f"the model runtime died (exit code {code})"
        log.warning("%s; it restarts on the next request", self._why)

    def _cgroup(self) -> WorkerLimit | None:
        """This worker's memory cgroup, made on first start (None: no limit, or none can
        be made here, which is said once)."""
        global _unenforced  # noqa: PLW0603 - said once per agent, not per worker
        if self.memory_limit is None or self.limit is not None:
            return self.limit
        try:
            self.limit = WorkerLimit.make(self.memory_limit)
        except LimitUnavailable as exc:
            if not _unenforced:
                log.warning("memory_limit_bytes is reported, not enforced: %s", exc)
            _unenforced = True
            self.memory_limit = None
        return self.limit

    def _out_of_memory(self) -> str | None:
        """What to say if the kernel killed the worker for memory since last asked."""
        if self.limit is None:
            return None
        before, self._ooms = self._ooms, self.limit.oom_kills()
        if self._ooms == before:
            return None
        return (f"the model ran out of memory: it needs more than this box's limit of "
                f"{self.limit.limit / 2**20:.0f} MiB (memory_limit_bytes), and the kernel "
                "stopped it")

    @staticmethod
    def _share(slot: _Slot, inputs: dict[str, tuple[str, list[int], Any]]) -> dict[str, Any]:
        """Large input bytes (any buffer) copied into the slot's shared request buffer,
        passed by reference; small ones as bytes through the pipe."""
        from multiprocessing import shared_memory

        large = {n: t for n, t in inputs.items() if len(t[2]) >= SHARED_MIN_BYTES}
        total = sum(len(t[2]) for t in large.values())
        small = {n: (d, shape, bytes(data)) for n, (d, shape, data) in inputs.items()
                 if n not in large}
        if not large:
            return small
        if slot.shm is None or slot.shm.size < total:
            _unlink(slot)
            slot.shm = shared_memory.SharedMemory(create=True, size=max(total, 1 << 20))
        out: dict[str, Any] = dict(small)
        offset = 0
        for name, (dtype, shape, data) in large.items():
            slot.shm.buf[offset:offset + len(data)] = data
            out[name] = (dtype, shape, (slot.shm.name, offset, len(data)))
            offset += len(data)
        return out

    def stop(self, *, drain_s: float = 30.0) -> None:
        """Let the calls in flight finish (up to ``drain_s``), then stop the worker; calls
        that had not started are told Replaced."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._process is None
                                   or len(self._free) == len(self._slots), drain_s)
            for slot in self._slots:
                slot.conn.close()
                _unlink(slot)
            if self._process is not None:
                self._process.join(5)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join(5)
            self._process = None
            self._generation += 1  # slots still in use are closed when given back
            self._slots, self._free = [], []
            if self.limit is not None:
                self.limit.remove()
                self.limit = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


def _watch(conn: Connection, client: socket.socket) -> None:
    """Wait for the worker's answer on ``conn``; tell it to cancel if ``client`` closes
    first. Stops watching if the client sends more (a pipelined request)."""
    from multiprocessing.connection import wait

    while conn not in wait([conn, client]):
        try:
            more = client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError:
            more = b""  # reset: gone
        if not more:
            conn.send({"op": "cancel"})
        return


def _unlink(slot: _Slot) -> None:
    if slot.shm is not None:
        slot.shm.close()
        slot.shm.unlink()
        slot.shm = None


class InProcessWorker(ModelWorker):
    """The model loaded in the calling process, behind ``ModelWorker``'s interface.

    No isolation: a runtime that aborts takes the process with it. For benchmarks that
    run many simulated devices in one process (``bench/distribute.py``), where a worker
    process per device would measure process start-up, not delivery.
    """

    def _start(self) -> None:
        try:
            self._model = _load(str(self.path), self.format)
        except Exception as exc:  # noqa: BLE001 - as the worker process reports it
            raise RuntimeCrashed(f"cannot load the model: {exc}") from None
        self.description = self._model.describe()

    def call(self, op: str, *, client: socket.socket | None = None, **args: Any) -> Any:
        with self._lock:
            try:
                return getattr(self._model, op)(**args)
            except BadRequest:
                raise
            except Exception as exc:  # noqa: BLE001 - as the worker process reports it
                raise RuntimeError(f"{type(exc).__name__}: {exc}") from None

    def stream(self, op: str, **args: Any) -> Iterator[Any]:
        with self._lock:
            yield from getattr(self._model, op)(**args, stream=True)

    def stop(self, *, drain_s: float = 30.0) -> None:
        with self._lock:
            self._model = None
