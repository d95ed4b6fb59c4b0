"""What the sampler models of the repository share: the models of this server as runtime
Backends called through BLS (Business Logic Scripting), the runs in flight in one sampler
process and the merging of their rows, reading a request's optional inputs, and the
one-line error responses.

A sampler process runs up to `runs` requests at once, each in a thread of its own (the
runtime's sampling loop is synchronous), and answers each through its response sender
when it is done, so a short run never waits for a long one. With row merging on, the
model calls of those runs are merged before they leave the process: once every run in
flight is waiting for a model, the calls to each model (with the same row shape) go as
one BLS request, so the process pays one round trip per step for all its runs. Triton's
dynamic batchers then merge the calls of the different sampler processes.

Copied beside the sampler's model.py; it imports only numpy, Triton's
triton_python_backend_utils and the runtime copied beside it.
"""
import collections
import json
import logging
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.backends.base import Backend
from runtime.errors import CfgExportError

log = logging.getLogger("cfg_export.serving.bls")


class Cancelled(Exception):
    """The client of the request has gone away."""


class TritonModel(Backend):
    """A model of this Triton server as a runtime Backend: _infer sends the rows through
    BLS (or through the process's RowMerger, which may send them with other runs' rows)
    and waits for the outputs."""

    name = "triton"

    def __init__(self, manifest, model_name, merger=None):
        super().__init__(manifest)
        self.model_name = model_name
        self.output_names = [spec.name for spec in manifest.outputs]
        self.merger = merger

    def activate(self):
        pass

    def deactivate(self):
        pass

    def _infer(self, feeds):
        return self.merger.call(self, feeds) if self.merger is not None else self.send(feeds)

    def send(self, feeds):
        """One BLS request of these rows; returns the outputs by name."""
        # a [rows] input is declared [1] per row (the config's reshape): send [rows, 1]
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(value.reshape(len(value), -1) if value.ndim == 1
                                                             else value)) for name, value in feeds.items()]
        request = pb_utils.InferenceRequest(model_name=self.model_name, requested_output_names=self.output_names,
                                            inputs=inputs)
        response = request.exec()
        if response.has_error():
            raise CfgExportError(f"the {self.model_name} model failed: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.output_names}


class _Call:
    """One run's call of a model, waiting to be sent."""

    def __init__(self, model, feeds):
        self.model, self.feeds = model, feeds
        self.rows = len(next(iter(feeds.values())))
        self.key = (model.model_name, tuple((name, v.shape[1:], v.dtype.str) for name, v in feeds.items()))
        self.done = threading.Event()
        self.thread = threading.get_ident()  # the run's thread
        self.outputs = self.error = None


class RowMerger:
    """Merges the model calls of the runs in flight in this process (see the module
    docstring). merge False: every call goes alone. max_rows: the largest batch, in rows,
    each model takes (its max_batch_size); a merged call never exceeds it.

    With merging, the runs whose outputs came back go on one at a time: the first is
    woken with the baton, and each passes it to the next when it makes its next call or
    ends. Their Python work between two model calls is serial under the GIL anyway; woken
    all at once they fought for it (README, serving)."""

    def __init__(self, merge, max_rows):
        self.merge = merge
        self.max_rows = max_rows
        self.lock = threading.Lock()
        self.active = 0  # runs in flight
        self.waiting = []  # their calls not sent yet
        self.ready = collections.deque()  # calls answered, their runs not woken yet
        self.holder = None  # the thread of the woken run at work (until its next call or its end)

    def start_run(self):
        with self.lock:
            self.active += 1

    def end_run(self):
        with self.lock:
            self.active -= 1
            ready = self._take()
            self._release()
        self._send(ready)

    def _take(self):
        """The calls to send now (under the lock): all of them once every run waits."""
        if self.waiting and len(self.waiting) >= self.active:
            ready, self.waiting = self.waiting, []
            return ready
        return []

    def _release(self):
        """The calling run stops working: if it held the baton, the next answered run wakes
        (under the lock)."""
        if self.holder == threading.get_ident():
            self.holder = None
            self._wake()

    def _wake(self):
        """Wakes the next answered run, if any, with the baton (under the lock; none held)."""
        if self.ready:
            call = self.ready.popleft()
            self.holder = call.thread
            call.done.set()

    def call(self, model, feeds):
        """Returns this run's outputs of one model call, sent with other runs' calls when merging."""
        if not self.merge:
            return model.send(feeds)
        call = _Call(model, feeds)
        with self.lock:
            self.waiting.append(call)
            ready = self._take()
            self._release()
        self._send(ready)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.outputs

    def _answered(self, batch):
        """The calls of a batch are answered: their runs wake in turn."""
        with self.lock:
            self.ready.extend(batch)
            if self.holder is None:
                self._wake()

    def _send(self, calls):
        """Sends the calls: one BLS request per model and row shape (split at the model's
        max rows), the first here, the others from threads of their own."""
        groups = {}
        for call in calls:
            groups.setdefault(call.key, []).append(call)
        batches = []
        for group in groups.values():
            limit = self.max_rows.get(group[0].model.model_name, 0)
            batch, rows = [], 0
            for call in group:
                if batch and limit and rows + call.rows > limit:
                    batches.append(batch)
                    batch, rows = [], 0
                batch.append(call)
                rows += call.rows
            batches.append(batch)
        for batch in batches[1:]:
            threading.Thread(target=self._send_batch, args=(batch,), daemon=True).start()
        if batches:
            self._send_batch(batches[0])

    def _send_batch(self, batch):
        try:
            if len(batch) == 1:
                parts = [batch[0].model.send(batch[0].feeds)]
            else:
                feeds = {name: np.concatenate([c.feeds[name] for c in batch]) for name in batch[0].feeds}
                outputs = batch[0].model.send(feeds)
                bounds = np.cumsum([0, *(c.rows for c in batch)])
                parts = [{name: value[lo:hi] for name, value in outputs.items()}
                         for lo, hi in zip(bounds[:-1], bounds[1:])]
            for call, part in zip(batch, parts):
                call.outputs = part
        except Exception as exc:  # every run of the batch sees the failure
            for call in batch:
                call.error = exc
        self._answered(batch)


class RunPool:
    """Runs each request of a sampler instance in a thread of its own, at most `runs` at
    once (execute blocks for a free slot, so further requests wait in Triton's queue), and
    answers it through its response sender when its run is done."""

    def __init__(self, runs, merger):
        self.slots = threading.Semaphore(runs)
        self.merger = merger

    def submit(self, requests, run, what):
        """Starts the runs of `requests` (run(request) -> output tensors); returns None, as
        execute does when its responses are sent by the response senders."""
        for request in requests:
            self.slots.acquire()
            self.merger.start_run()
            threading.Thread(target=self._serve, args=(request, run, what), daemon=True).start()
        return None

    def _serve(self, request, run, what):
        try:
            sender = request.get_response_sender()  # taken first: nothing may fail before the run's slot is freed
            response = respond(request, run, what)
        finally:
            self.merger.end_run()
            self.slots.release()
        try:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:
            log.exception("%s: the response could not be sent", what)


def run_pool(params):
    """The RunPool and RowMerger of a sampler instance, from its config parameters."""
    merger = RowMerger(params.get("merge", "1") == "1", {k: int(v) for k, v in json.loads(params["model_rows"]).items()})
    return RunPool(int(params.get("runs", "1")), merger), merger


def parameters(args) -> dict:
    """The string parameters of the model's config, by key."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def read_input(request, name):
    """The input `name` of the request as a numpy array, or None when it was not sent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def read_scalar(request, name, kind):
    """Returns the single value of an optional [1] input as `kind`, or None."""
    value = read_input(request, name)
    if value is None:
        return None
    if value.size != 1:
        raise CfgExportError(f"{name}: got {value.size} values, expected one")
    value = value.reshape(-1)[0]
    if kind is str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return kind(value)


def read_texts(request, name):
    """Returns the strings of an optional BYTES input [K] as a list, or None."""
    value = read_input(request, name)
    if value is None:
        return None
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]


def read_json(request, name):
    """Returns the dict of an optional JSON input (one string), or None."""
    text = read_scalar(request, name, str)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CfgExportError(f"{name}: got {text[:80]!r}, expected a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise CfgExportError(f"{name}: got {text[:80]!r}, expected a JSON object of scheduler config fields")
    return value


CANCEL_CHECK_S = 0.1  # how often a run asks the server whether its client has gone away


def cancel_check(request, every=CANCEL_CHECK_S):
    """A progress(done, total) callback that stops the run once the client has gone away.
    It asks the server at most every `every` seconds (is_cancelled() is a round trip to
    Triton's core; a run's steps take milliseconds)."""
    last = time.monotonic()

    def check(done, total):
        nonlocal last
        now = time.monotonic()
        if now - last < every:
            return
        last = now
        if request.is_cancelled():
            raise Cancelled()
    return check


def respond(request, run, what):
    """Returns the response of one request: run(request) -> output tensors, or one error
    line (a CfgExportError's message, a cancelled client, or an internal fault named)."""
    try:
        tensors = run(request)
    except Cancelled:
        code = getattr(pb_utils.TritonError, "CANCELLED", None)  # older Python backends have no error codes
        error = pb_utils.TritonError("cancelled: the client went away", *([code] if code is not None else []))
        return pb_utils.InferenceResponse(error=error)
    except CfgExportError as exc:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc).splitlines()[0]))
    except Exception as exc:  # a fault here must not take the instance down with it
        log.exception("%s: request failed", what)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(
            f"internal error in the {what} model ({type(exc).__name__}: {first})"))
    return pb_utils.InferenceResponse(output_tensors=tensors)
