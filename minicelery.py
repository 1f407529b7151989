"""minicelery: Celery's core in one readable file.

Write tasks as you would for Celery, send them from any process, and run them in
a pool of worker processes::

    from minicelery import Celery
    app = Celery('tasks', broker='redis://localhost:6379/0',
                 backend='redis://localhost:6379/1')

    @app.task
    def add(x, y):
        return x + y

    # in a shell:   python -m minicelery -A tasks worker -l info
    # anywhere:     add.delay(4, 4).get(timeout=10) == 8

The messages and results are byte-compatible with Celery 5 on Redis, so a real
Celery worker runs tasks sent from here and a minicelery worker runs tasks sent
by real Celery.

How a task travels (the README's "How it works" names each function on the way)::

    producer ──apply_async()──► Broker (a Redis list per queue, or a SQLite table)
                                   │ reserve(): into `unacked`, under the worker's claim
                                   ▼
                     worker's main process: Consumer (holds it: ETAs, rate limits,
                                   │                  revokes; acks it if acks_late)
                                   │ a Job, over a socket
                                   ▼
                     pool process: run_job(): acks it (early ack), run_task()
                                   │ store_result()
                                   ▼
    AsyncResult.get() ◄──pub/sub──── ResultBackend (celery-task-meta-<id>)

Chapters (``grep -n '^# [0-9]*[.] ' minicelery.py`` lists them):

    1. Errors and states         7. Tasks, requests and run_task()
    2. Helpers                   8. Canvas: signatures, chains, groups, chords
    3. Serialization             9. App and configuration
    4. Messages                 10. Worker: consumer, pools and pool processes
    5. Brokers (Redis, SQLite)  11. Beat: periodic tasks
    6. Result backends          12. Command line

Left out on purpose: AMQP and every broker but Redis and SQLite (memory:// is
SQLite in memory), mingle and gossip, protocol 1 messages, autoscaling, and the
eventlet/gevent pools. Explain mode (MINICELERY_EXPLAIN=1) logs what each
broker and backend operation sends, and why.
"""

import base64
import bz2
import collections
import contextlib
import dataclasses
import datetime as dt
import decimal
import difflib
import fnmatch
import functools
import heapq
import importlib.util
import inspect
import itertools
import math
import json
import logging
import os
import pickle
import re
import resource
import select
import string
import signal
import socket
import struct
import sys
import textwrap
import threading
import time
import traceback
import types
import typing
import uuid as _uuid
import weakref
import zlib
from collections import deque, namedtuple

__version__ = "0.1.0"

if __name__ == "__main__":
    # `python -m minicelery`: run the importable module (main(), at the end), not the
    # rest of this __main__ copy, so that the user's `from minicelery import Celery` and
    # the command line share one set of classes, and the file is executed once.
    sys.exit(importlib.import_module("minicelery").main())

__all__ = [
    "Celery", "Task", "AsyncResult", "EagerResult", "GroupResult", "shared_task",
    "Signature", "signature", "subtask", "chain", "group", "chord", "ChordError",
    "crontab", "schedule", "Beat",
    "MiniCeleryError", "ImproperlyConfigured", "NotRegistered", "EncodeError",
    "DecodeError", "ContentDisallowed", "OperationalError", "ResultTimeout", "TaskRevokedError",
    "WorkerLostError", "TimeLimitExceeded", "SoftTimeLimitExceeded",
    "MaxRetriesExceededError", "Retry", "Reject", "Ignore",
    "PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REVOKED",
]


# =============================================================================
# 1. Errors and states
# =============================================================================
# Every error minicelery raises on its own account derives from MiniCeleryError.
# Where Celery has the same error, we keep its name, and the result backend
# writes Celery's module name for it (`celery_module`), so a real Celery client
# reading our result rebuilds its own class, and we rebuild ours from theirs.
#
#   MiniCeleryError
#    ├── ImproperlyConfigured        bad setting, unknown URL scheme, missing redis
#    ├── NotRegistered (KeyError)    no task by that name
#    ├── EncodeError / DecodeError   a value that can't cross the wire
#    │    └── ContentDisallowed      a content type not in accept_content
#    ├── OperationalError            the broker stayed unreachable while sending
#    ├── ResultTimeout (TimeoutError) get() waited too long
#    ├── TaskRevokedError            the task was revoked or expired
#    ├── WorkerLostError             the child running the task died
#    ├── TimeLimitExceeded           the hard time limit killed the task
#    └── MaxRetriesExceededError     self.retry() once too often
#   SoftTimeLimitExceeded            raised inside a task; not a MiniCeleryError
#   TaskPredicate: Retry, Reject, Ignore   not errors: ways for a task to end

class MiniCeleryError(Exception):
    """Base of every error minicelery raises itself."""
    celery_module = "celery.exceptions"


class ImproperlyConfigured(MiniCeleryError):
    """Raised when a setting, URL or missing dependency makes the app unusable."""


class NotRegistered(MiniCeleryError, KeyError):
    """Raised (and stored as FAILURE by the worker) for an unknown task name."""

    def __str__(self):
        return Exception.__str__(self)


class EncodeError(MiniCeleryError):
    """Raised at the call site when arguments or a result can't be serialized."""
    celery_module = "kombu.exceptions"


class DecodeError(MiniCeleryError):
    """Raised by the worker when a message body can't be decoded."""
    celery_module = "kombu.exceptions"
    task_id = None  # the message's task id, when it was read before the error


class ContentDisallowed(DecodeError):
    """Raised when a message's content type is not in accept_content."""


class OperationalError(MiniCeleryError):
    """Raised by delay()/apply_async() when the broker stayed unreachable: nothing was sent."""
    celery_module = "kombu.exceptions"


class ResultTimeout(MiniCeleryError, TimeoutError):
    """Raised by AsyncResult.get() when the timeout passes first.

    Celery calls this celery.exceptions.TimeoutError; ours also derives from the
    builtin TimeoutError so `except TimeoutError` works without shadowing it.
    """


class TaskRevokedError(MiniCeleryError):
    """Stored (and raised by get()) for a task that was revoked or expired."""


class WorkerLostError(MiniCeleryError):
    """Stored when the child process running a task died mid-task."""
    celery_module = "billiard.exceptions"


class TimeLimitExceeded(MiniCeleryError):
    """Stored when a task ran past its hard time limit and was killed."""
    celery_module = "billiard.exceptions"


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task at its soft time limit, so it can clean up."""
    celery_module = "billiard.exceptions"


class WorkerTerminate(SystemExit):
    """Raised in the worker's own thread by a cold shutdown, to stop a solo-pool task."""


class MaxRetriesExceededError(MiniCeleryError):
    """Raised by Task.retry() when the task has no retries left."""


class TaskPredicate(MiniCeleryError):
    """Base of the exceptions a task raises to end itself in a special way."""


class Retry(TaskPredicate):
    """Raised by Task.retry(): the task was sent again and ends as RETRY."""

    def __init__(self, message=None, exc=None, when=None):
        self.exc, self.when = exc, when
        if message is None:
            message = f"Retry in {when}s" if isinstance(when, (int, float)) else "Retry"
            if exc is not None:
                message = f"{message}: {exc!r}"
        super().__init__(message)


class Reject(TaskPredicate):
    """Raise to reject the message; with requeue=True it goes back to the queue."""

    def __init__(self, reason=None, requeue=False):
        self.reason, self.requeue = reason, requeue
        super().__init__(reason, requeue)


class Ignore(TaskPredicate):
    """Raise to end the task without storing any state."""


PENDING = "PENDING"    #: unknown to the backend: not yet run, or forgotten
RECEIVED = "RECEIVED"  #: a worker has the message
STARTED = "STARTED"    #: running (stored only with task_track_started)
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
RETRY = "RETRY"        #: failed and was sent again
REVOKED = "REVOKED"    #: revoked or expired before it ran
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
EXCEPTION_STATES = frozenset({FAILURE, RETRY, REVOKED})


# =============================================================================
# 2. Helpers
# =============================================================================
# The clock is read in one place, utcnow(), and everything time-based takes a
# `now` so tests can drive it.

logger = logging.getLogger("minicelery")
worker_logger = logging.getLogger("minicelery.worker")
task_logger = logging.getLogger("minicelery.task")
beat_logger = logging.getLogger("minicelery.beat")

#: Celery's log line: `[2026-11-21 20:45:57,811: INFO/MainProcess] message`.
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

#: The name logs show for this process; the pool sets `ForkPoolWorker-N` in children.
_process_name = "MainProcess"


def utcnow() -> dt.datetime:
    """The current time, timezone-aware in UTC."""
    return dt.datetime.now(dt.timezone.utc)


def uuid() -> str:
    return str(_uuid.uuid4())


def to_datetime(value, tz=dt.timezone.utc):
    """An ISO-8601 string or datetime as an aware datetime; naive ones are in `tz`."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    return value


@functools.lru_cache(maxsize=None)
def _say_which_default(path):
    """Once per process and file: a second app with no broker (a tasks module's own
    Celery('proj'), say) would otherwise queue quietly into a file no worker reads."""
    logger.warning("no broker configured: the zero-setup default, sqlite:///%s; a worker or client started in "
                   "another directory uses another file (set broker_url, or $MINICELERY_BROKER_URL)", path)


def import_string(path: str):
    """`pkg.module`, `pkg.module:attr` or `pkg.module.attr` as an object."""
    module_name, colon, attr = path.partition(":")
    if not colon:
        try:
            return importlib.import_module(path)
        except ImportError:
            if "." not in path:
                raise
            module_name, attr = path.rsplit(".", 1)  # (a module's attribute: no colon needed)
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def signal_number(value) -> int:
    """A signal as its number, from 15, 'TERM', 'SIGTERM' or 'sigterm'; ValueError otherwise."""
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else f"SIG{value.upper()}"
        if name in signal.Signals.__members__:
            return int(signal.Signals[name])
    elif isinstance(value, int) and not isinstance(value, bool) and value in signal.valid_signals():
        return value
    raise ValueError(f"unknown signal {_short_repr(value, 80)}; use a name like 'SIGTERM' or a number")


#: the read end of the pipe a worker's signals write to (signal.set_wakeup_fd), or None
_signal_pipe = None


def watch_signals():
    """Have signals written to a pipe that every wait of the worker watches: a wait
    in select() then ends at once on SIGTERM or Ctrl-C instead of running out its
    timeout (Python runs the handler, then would resume the wait)."""
    global _signal_pipe
    if _signal_pipe is None:
        _signal_pipe, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # (both ends)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)


def _stop_watching_signals():
    global _signal_pipe
    if _signal_pipe is not None:
        os.close(signal.set_wakeup_fd(-1))
        os.close(_signal_pipe)
        _signal_pipe = None


def signal_came() -> bool:
    """Whether a signal came since the last look (the pipe is emptied)."""
    try:
        return bool(_signal_pipe is not None and os.read(_signal_pipe, 4096))
    except BlockingIOError:
        return False


def wait_readable(handles, timeout, writable=()) -> list:
    """The handles (file objects or descriptors) readable (or closed) within `timeout`
    seconds, and those of `writable` that can be written; [] at once when a signal comes
    (watch_signals). poll(), not select(): a worker with many queues has descriptors past
    select()'s 1024."""
    wanted = [(handle, select.POLLIN) for handle in handles] + [(handle, select.POLLOUT) for handle in writable]
    if _signal_pipe is not None:
        wanted.append((_signal_pipe, select.POLLIN))
    events, by_number = collections.defaultdict(int), {}
    for handle, event in wanted:
        fd = handle if isinstance(handle, int) else handle.fileno()
        by_number.setdefault(fd, handle)
        events[fd] |= event
    poller = select.poll()
    for fd, mask in events.items():
        poller.register(fd, mask)
    ready = [by_number[fd] for fd, _ in poller.poll(max(timeout, 0) * 1000)]
    if _signal_pipe is not None and _signal_pipe in ready:
        signal_came()
        return []
    return ready


def _expand_hostname(name):
    host = os.uname().nodename
    return name.replace("%h", host).replace("%n", host.split(".")[0]).replace("%d", host.partition(".")[2])


def _safe_url(url):
    """The URL with its secrets masked, for banners, logs and errors.

    Everything between the scheme and the last '@' before the query (user and
    password, which may hold '@', '?' or '/') becomes `user:**`, and so does
    the value of any query parameter whose name (percent-decoded) holds "password".
    """
    import urllib.parse
    url = str(url or "")
    scheme, colon, rest = url.partition(":")
    location, question, query = rest.partition("?")
    if "=" not in query:  # not a query: a '?' in the password
        location, question, query = rest, "", ""
    if "@" in location:
        slashes = location[:len(location) - len(location.lstrip("/"))]
        userinfo, _, host = location[len(slashes):].rpartition("@")
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        location = f"{slashes}{user}:**@{host}"

    def hide(match):
        secret = "password" in urllib.parse.unquote_plus(match.group(1)).lower()
        return f"{match.group(1)}=**" if secret else match.group(0)
    return scheme + colon + location + question + re.sub(r"([^&;=]+)=([^&;#]*)", hide, query)


class _ProcessNameFilter(logging.Filter):
    """Stamps log records with Celery's process names (MainProcess, ForkPoolWorker-1)."""

    def filter(self, record):
        record.processName = _process_name
        return True


def configure_logging(loglevel="INFO", stream=None, logfile=None):
    """Send minicelery's and the tasks' logs to stderr in Celery's format, unless a
    receiver of the setup_logging signal does it (as in Celery); then tell
    after_setup_logger and after_setup_task_logger."""
    level = loglevel.upper() if isinstance(loglevel, str) else loglevel
    options = {"loglevel": level, "logfile": logfile, "format": LOG_FORMAT, "colorize": False}
    if not setup_logging.send(sender=None, **options):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(_ProcessNameFilter())
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(level)
    after_setup_logger.send(sender=None, logger=logging.getLogger(), **options)
    after_setup_task_logger.send(sender=None, logger=task_logger, **options)


class Signal:
    """Celery's signals: `@task_failure.connect` (or `.connect(fun, sender=...)`), and
    each `send(sender, **arguments)` calls the receivers connected for that sender or for
    any, with signal= and sender=. A receiver's error is logged, never raised into the
    code that sent. Receivers are held weakly unless weak=False: one whose object is
    gone (a bound method's instance, say) is dropped; `dispatch_uid` names one for good."""

    def __init__(self, name):
        self.name, self.receivers, self.lock = name, [], threading.Lock()

    def connect(self, receiver=None, sender=None, weak=True, dispatch_uid=None):
        if receiver is None:  # (as a decorator with options: @signal.connect(sender=...))
            return lambda fun: self.connect(fun, sender, weak, dispatch_uid)
        key = (dispatch_uid or _receiver_id(receiver), _receiver_id(sender))
        reference = (weakref.WeakMethod if hasattr(receiver, "__func__") else weakref.ref)(receiver) if weak \
            else (lambda: receiver)
        with self.lock:  # (dead ones first: a new receiver may have a dead one's id)
            self.receivers = [(known, ref) for known, ref in self.receivers if ref() is not None]
            if all(known != key for known, _ in self.receivers):
                self.receivers.append((key, reference))
        return receiver

    def disconnect(self, receiver=None, sender=None, dispatch_uid=None) -> bool:
        key = (dispatch_uid or _receiver_id(receiver), _receiver_id(sender))
        with self.lock:
            kept = [(known, reference) for known, reference in self.receivers if known != key]
            found, self.receivers = len(kept) < len(self.receivers), kept
        return found

    def has_listeners(self, sender=None) -> bool:
        return bool(self._live(sender))

    def send(self, sender, **arguments) -> list:
        """[(receiver, what it returned or raised), ...]"""
        responses = []
        for receiver in self._live(sender) if self.receivers else ():  # (none connected: the usual case)
            try:
                responses.append((receiver, receiver(signal=self, sender=sender, **arguments)))
            except Exception as exc:
                logger.exception("Signal handler %r raised: %r", receiver, exc)
                responses.append((receiver, exc))
        return responses

    send_robust = send

    def _live(self, sender) -> list:
        with self.lock:
            self.receivers = [(key, reference) for key, reference in self.receivers if reference() is not None]
            wanted = (_receiver_id(None), _receiver_id(sender))
            return [receiver for (_, for_sender), reference in self.receivers
                    if for_sender in wanted and (receiver := reference()) is not None]

    def __repr__(self):
        return f"<Signal: {self.name}>"


def _receiver_id(target):
    """How a receiver or sender is told apart: a name by itself, a bound method by its
    instance and function (two instances' methods are two receivers), else by identity."""
    if isinstance(target, (str, bytes)):
        return target
    if hasattr(target, "__func__"):
        return id(getattr(target, "__self__", None)), id(target.__func__)
    return id(target)


# Celery's signals (celery.signals), each sent where, and in the process where, Celery's is.
# Celery: signals: those not here (task_unknown, task_rejected, worker_shutting_down, ...)
# fail to import, rather than never being sent.
(before_task_publish, after_task_publish, task_received, task_prerun, task_postrun, task_success,
 task_retry, task_failure, task_revoked) = (
    Signal(name) for name in ("before_task_publish", "after_task_publish", "task_received", "task_prerun",
                              "task_postrun", "task_success", "task_retry", "task_failure", "task_revoked"))
(celeryd_init, celeryd_after_setup, worker_init, worker_before_create_process, worker_process_init,
 worker_process_shutdown, worker_ready, worker_shutdown, beat_init, beat_embedded_init, setup_logging,
 after_setup_logger, after_setup_task_logger) = (
    Signal(name) for name in ("celeryd_init", "celeryd_after_setup", "worker_init", "worker_before_create_process",
                              "worker_process_init", "worker_process_shutdown", "worker_ready",
                              "worker_shutdown", "beat_init", "beat_embedded_init", "setup_logging",
                              "after_setup_logger", "after_setup_task_logger"))


def get_task_logger(name):
    """Celery's logger for a tasks module: `logger = get_task_logger(__name__)`.

    Its records go up through minicelery.task, as Celery's go through celery.task.
    """
    logger = logging.getLogger(name)
    logger.parent = task_logger
    return logger


get_logger = logging.getLogger


def printable(text: str) -> str:
    """The text with its unprintable characters escaped (a newline as \\n, \\x06 as \\x06)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _short_repr(value, limit=1024):
    """repr() for logs and argsrepr, cut at `limit` characters.

    Lists, tuples, dicts and sets are written piece by piece, and the writing stops
    at the limit: a structure whose parts are shared can be small in memory and vast
    written out, and its repr must cost what it shows, not what it names.
    """
    if isinstance(value, BaseException) and not _parts_within(value.args, limit):
        return _cut(type(value).__name__ + _short_repr(value.args, limit), limit)
    if _parts_within(value, limit):
        return _cut(_plain_repr(value), limit)  # (the common case, and the quick one)
    pieces, size = [], 0
    for piece in _repr_pieces(value, depth=0):
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    return _cut("".join(pieces), limit)


#: the containers written piece by piece, with their brackets
_BRACKETS = {list: ("[", "]"), tuple: ("(", ")"), dict: ("{", "}"), set: ("{", "}"), frozenset: ("frozenset({", "})")}
_CONTAINERS = tuple(_BRACKETS)


def _format_exc() -> str:
    """traceback.format_exc(), the exception's own text bounded as _short_repr bounds a
    repr: str() of an exception whose arguments share parts would never end."""
    exc = sys.exc_info()[1]
    if exc is None or _parts_within(exc.args, 1024):
        return traceback.format_exc()
    return "Traceback (most recent call last):\n" + "".join(traceback.format_tb(exc.__traceback__)) + \
        f"{type(exc).__qualname__}: {_short_repr(exc.args)}\n"


def _plain_repr(value) -> str:
    try:
        return repr(value)
    except Exception as exc:  # a user's __repr__ can raise, or recurse too deep
        return f"<{type(value).__name__} object: repr() raised {type(exc).__name__}>"


def _parts_within(value, most) -> bool:
    """Whether `value` has at most `most` parts, counted through its containers (a shared
    part each time it appears): then its repr costs what it holds."""
    waiting, count = [value], 0
    while waiting:
        part = waiting.pop()
        if not isinstance(part, _CONTAINERS):
            continue
        count += len(part)
        if count > most:
            return False
        parts = itertools.chain(part.keys(), part.values()) if isinstance(part, dict) else part
        waiting += [inner for inner in parts if isinstance(inner, _CONTAINERS)]
    return True


def _repr_pieces(value, depth):
    if not isinstance(value, _CONTAINERS):
        yield _plain_repr(value)
        return
    if depth > 100:  # (a list inside itself, say)
        yield "..."
        return
    kind = next(kind for kind in _CONTAINERS if isinstance(value, kind))
    opening, closing = _BRACKETS[kind]
    named = type(value) is not kind  # (a subclass, a namedtuple say, is written as Name([...]))
    yield f"{type(value).__name__}({opening}" if named else opening
    for i, item in enumerate(value.items() if kind is dict else value):
        yield ", " if i else ""
        if kind is dict:
            yield from _repr_pieces(item[0], depth + 1)
            yield ": "
            item = item[1]
        yield from _repr_pieces(item, depth + 1)
    yield "," if kind is tuple and len(value) == 1 else ""
    yield f"{closing})" if named else closing


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# =============================================================================
# 3. Serialization
# =============================================================================
# JSON by default, in kombu's dialect: values JSON has no type for travel as
# {"__type__": "datetime", "__value__": "..."}, so both sides rebuild them.
# Pickle can run code when loaded, so it is accepted only when the app lists it
# in accept_content (serializers are picked by the sender, accepted by the reader).
# Exceptions travel as Celery's {exc_type, exc_message, exc_module} dict.

JSON_TYPE, PICKLE_TYPE = "application/json", "application/x-python-serialize"
MSGPACK_TYPE, YAML_TYPE = "application/x-msgpack", "application/x-yaml"
CONTENT_TYPES = {"json": JSON_TYPE, "pickle": PICKLE_TYPE, "msgpack": MSGPACK_TYPE, "yaml": YAML_TYPE}
#: kombu's names for the compression header.
COMPRESSIONS = {"zlib": "application/x-gzip", "gzip": "application/x-gzip", "bzip2": "application/x-bz2"}
#: header -> (compress, inflate to at most `limit` bytes (None: any size))
_COMPRESSORS = {
    "application/x-gzip": (zlib.compress, lambda data, limit: zlib.decompressobj().decompress(data, limit or 0)),
    "application/x-bz2": (bz2.compress, lambda data, limit: bz2.BZ2Decompressor().decompress(data, limit or -1)),
}


def _json_default(obj):
    for kind in (dt.datetime, dt.date, dt.time):  # datetime first: it is a date too
        if isinstance(obj, kind):
            return {"__type__": kind.__name__, "__value__": obj.isoformat()}
    if isinstance(obj, decimal.Decimal):
        return {"__type__": "decimal", "__value__": str(obj)}
    if isinstance(obj, _uuid.UUID):
        return {"__type__": "uuid", "__value__": {"hex": obj.hex}}
    if isinstance(obj, bytes):
        try:
            return {"__type__": "bytes", "__value__": obj.decode("utf-8")}
        except UnicodeDecodeError:
            return {"__type__": "base64", "__value__": base64.b64encode(obj).decode()}
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


#: how each {"__type__": kind, "__value__": value} that _json_default writes is read back
_JSON_TYPES = {
    "datetime": dt.datetime.fromisoformat, "date": lambda value: dt.date.fromisoformat(value[:10]),
    "time": dt.time.fromisoformat, "decimal": decimal.Decimal, "uuid": lambda value: _uuid.UUID(**value),
    "bytes": lambda value: value.encode("utf-8"), "base64": base64.b64decode,
}


def _json_object_hook(obj):
    kind = obj.get("__type__") if len(obj) == 2 and "__value__" in obj else None
    if isinstance(kind, str) and kind in _JSON_TYPES:
        return _JSON_TYPES[kind](obj["__value__"])
    return obj  # a type we don't know passes through unchanged


def json_dumps(obj) -> str:
    return json.dumps(obj, default=_json_default)


def json_loads(text):
    return json.loads(text, object_hook=_json_object_hook)


#: content type -> (object to bytes, bytes to object); msgpack and yaml are imported on first use
_SERIALIZERS = {
    JSON_TYPE: (lambda obj: json_dumps(obj).encode("utf-8"), lambda data: json_loads(data.decode("utf-8"))),
    PICKLE_TYPE: (lambda obj: pickle.dumps(obj, protocol=4), lambda data: _pickle_load(data)),
    MSGPACK_TYPE: (lambda obj: _optional_library("msgpack").packb(obj, use_bin_type=True),
                   lambda data: _optional_library("msgpack").unpackb(data, raw=False)),
    YAML_TYPE: (lambda obj: _optional_library("yaml").safe_dump(obj).encode("utf-8"), lambda data: _yaml_load(data)),
}


def _yaml_load(data: bytes):
    """YAML's safe_load, refusing a document that names more elements than it has bytes.

    An alias (*a) repeats what its anchor names, and a merge key (<<: *a) copies it,
    so 300 bytes can name billions of elements (a bomb): small in memory, but whatever
    walks it (a repr, a JSON result, an error text) would pay for all of them. The
    document is counted as parsed nodes, before anything is built from them. Each
    element takes at least a byte when written out without aliases, so a document that
    uses them only to save typing passes.
    """
    yaml = _optional_library("yaml")
    loader = yaml.SafeLoader(data)
    try:
        node = loader.get_single_node()
        if node is not None and isinstance(node.value, list) and _expanded_size(node, _yaml_parts, len(data)) > len(data):
            raise DecodeError(f"the YAML document of {len(data)} bytes names more elements than that "
                              f"through its aliases and merge keys (a YAML bomb?)")
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def _pickle_load(data: bytes):
    """pickle.loads, refusing a value that names more elements than the data has bytes.

    Pickle writes a part held twice only once, so 541 bytes can name 2 ** 60 elements:
    whatever writes it out (a JSON result, a log line, an error text) would never end.
    Each element takes an opcode, a byte at least, unless it is such a shared part.
    """
    value = pickle.loads(data)
    if _names_more_than(value, len(data)):
        raise DecodeError(f"the pickle of {len(data)} bytes names more elements than that through parts "
                          f"it holds more than once (a bomb?)")
    return value


def _names_more_than(value, most) -> bool:
    """Whether a Python value, written out, has more than `most` elements (the quick count
    first; the one that remembers shared parts only for a big value)."""
    return not _parts_within(value, most) and _expanded_size(value, _python_parts, most) > most


def _expanded_size(root, parts_of, limit) -> int:
    """How many elements `root` names written out, a shared part counted each time it
    appears; stops counting past `limit`. Each part is walked once (remembered by id),
    so this costs what the value holds, not what it names. `parts_of(part)` gives
    (how many leaves it holds, the parts inside it that hold more)."""
    sizes = {}

    def size(part):
        if id(part) not in sizes:
            sizes[id(part)] = 1  # (a part inside itself, `&a [*a]`, counts once)
            leaves, inner = parts_of(part)
            total = 1 + leaves
            for item in inner:
                if total > limit:
                    break
                total += size(item)
            sizes[id(part)] = total
        return sizes[id(part)]
    return size(root)


def _yaml_parts(node):
    """A YAML node's parts (a mapping's items are (key, value) pairs of nodes)."""
    nodes = [part for item in node.value for part in (item if isinstance(item, tuple) else (item,))]
    inner = [part for part in nodes if isinstance(part.value, list)]
    return len(nodes) - len(inner), inner


def _python_parts(value):
    parts = itertools.chain(value.keys(), value.values()) if isinstance(value, dict) else value
    inner = [part for part in parts if isinstance(part, _CONTAINERS)]
    return len(value) * (2 if isinstance(value, dict) else 1) - len(inner), inner


def content_type_for(serializer: str) -> str:
    try:
        return CONTENT_TYPES[serializer]
    except KeyError:
        raise ImproperlyConfigured(
            f"unknown serializer {serializer!r}; use one of {sorted(CONTENT_TYPES)}") from None


def dumps(obj, serializer="json", compression=None):
    """`obj` as (bytes, content_type, compression header or None).

    Raises EncodeError naming the value that can't be serialized.
    """
    content_type = content_type_for(serializer)
    try:
        data = _SERIALIZERS[content_type][0](obj)
    except ImproperlyConfigured:
        raise
    except Exception as exc:  # each library has its own errors for a value it can't write
        raise EncodeError(f"can't serialize with {serializer}: {_short_repr(exc, 200)}") from None
    header = None
    if compression:
        header = COMPRESSIONS.get(compression, compression)
        if header not in _COMPRESSORS:
            raise ImproperlyConfigured(
                f"unknown compression {compression!r}; use one of {sorted(COMPRESSIONS)}")
        data = _COMPRESSORS[header][0](data)
    return data, content_type, header


def loads(data: bytes, content_type: str, accept, compression=None, max_size=None):
    """Decode bytes of `content_type`, refusing types not in `accept`.

    A compressed body is inflated to at most `max_size` bytes: a few MB of zlib
    can claim gigabytes, so the limit holds for what it inflates to.
    """
    if content_type not in accept:
        raise ContentDisallowed(
            f"refusing to deserialize content of type {content_type!r}: "
            f"accept_content allows {sorted(accept)}")
    if compression and compression not in _COMPRESSORS:
        raise DecodeError(f"unknown compression {_short_repr(compression, 80)}")
    if compression:
        data = _inflate(data, compression, max_size)
    try:
        return _SERIALIZERS[content_type][1](data)
    except DecodeError:
        raise
    except Exception as exc:  # (a serializer's library missing too: this body can't be read)
        raise DecodeError(f"can't decode {content_type} body: {_short_repr(exc, 200)}") from exc


def _inflate(data: bytes, compression: str, max_size=None) -> bytes:
    # One byte more than allowed is enough to know it is too big.
    limit = max_size + 1 if max_size else None
    try:
        out = _COMPRESSORS[compression][1](data, limit)
    except (OSError, ValueError, zlib.error, EOFError) as exc:
        raise DecodeError(f"can't decompress the body ({compression}): {exc}") from None
    if max_size and len(out) > max_size:
        raise DecodeError(f"the body inflates to more than worker_max_message_size ({max_size} bytes)")
    return out


def _optional_library(name):
    """msgpack or yaml, imported on first use: a JSON-only setup needs neither."""
    try:
        return importlib.import_module(name)
    except ImportError:
        package = {"yaml": "pyyaml"}.get(name, name)
        raise ImproperlyConfigured(f"the {name} serializer needs its library: pip install {package}") from None


def accepted_types(accept_content) -> frozenset:
    """accept_content's names (`json`) and MIME types as a set of MIME types."""
    return frozenset(CONTENT_TYPES.get(name, name) for name in accept_content)


def exception_to_dict(exc: BaseException) -> dict:
    """Celery's form of a stored exception; arguments JSON can't carry become their repr."""
    cls = type(exc)
    module = getattr(cls, "celery_module", None) if cls.__module__ == __name__ else None
    args = exc.args if isinstance(getattr(exc, "args", None), tuple) else ()
    return {"exc_type": cls.__qualname__, "exc_message": [_jsonable(a) for a in args],
            "exc_module": module or cls.__module__}


def _jsonable(value):
    try:
        if _names_more_than(value, 2 ** 20):
            return _short_repr(value)  # (parts held many times over: written out, it would never end)
        json_dumps(value)
        return value
    except Exception:  # not JSON (or too deep): its repr, which may itself fail
        return _short_repr(value)


#: Modules whose exception names we map to our own classes when reading results.
_CELERY_MODULES = {"celery.exceptions", "celery.backends.base", "billiard.exceptions",
                   "kombu.exceptions", __name__}


def exception_from_dict(meta) -> BaseException:
    """Rebuild an exception stored by us or by Celery.

    Celery's own exceptions become ours of the same name. Any other class is
    looked up in modules already imported (as Celery does): reading a result
    never imports code, and only exception classes are accepted, so it can't
    make us call an arbitrary function. Other classes are recreated by name,
    deriving from Exception.
    """
    if not isinstance(meta, dict) or not isinstance(meta.get("exc_type"), str) \
            or not isinstance(meta.get("exc_module") or "", str):
        return Exception(meta)
    name, module = meta["exc_type"], meta.get("exc_module") or "builtins"
    args = meta.get("exc_message", [])
    args = args if isinstance(args, (list, tuple)) else [args]
    cls = globals().get(name) if module in _CELERY_MODULES else None
    if not (isinstance(cls, type) and issubclass(cls, Exception)) and module in sys.modules:
        cls = sys.modules[module]
        for part in name.split("."):
            cls = getattr(cls, part, None)
    # Only Exception subclasses: a SystemExit or KeyboardInterrupt raised by get() would
    # end the caller's process or thread past its `except Exception`.
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = type(name.rsplit(".", 1)[-1], (Exception,), {"__module__": module})
    try:
        return cls(*args)
    except Exception:
        return Exception(*args)


# =============================================================================
# 4. Messages
# =============================================================================
# A task message is Celery's protocol 2: headers say what to run (task, id,
# eta, retries...), the body is the JSON list [args, kwargs, embed] where embed
# holds callbacks, errbacks, chain and chord. kombu wraps it in an envelope
# (body base64-encoded, properties with delivery_tag and delivery_info) and the
# Redis transport LPUSHes that envelope as JSON. Celery documents the protocol
# ("Message Protocol" in its internals guide); the README's "Redis keys" lists the rest.

#: Redis priority steps: priority 0-2 use the queue's own list, 3-5 `q\\x06\\x163`, ...
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEPARATOR = "\x06\x16"


#: headers the protocol defines; any others are the sender's own and travel on with retries
PROTOCOL_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps", "compression", "redelivered"})


def build_headers(task_name, task_id, args, kwargs, extra=None, **fields) -> dict:
    """The protocol 2 headers, in the order and with the defaults Celery sends. `fields`
    set headers by their names (group, eta as ISO text...); `extra` are the sender's own."""
    return {
        "lang": "py", "task": task_name, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": _short_repr(tuple(args)), "kwargsrepr": _short_repr(kwargs),
        "origin": f"gen{os.getpid()}@{os.uname().nodename}", "ignore_result": False,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}, **fields, **(extra or {}),
    }


def build_envelope(headers, body: bytes, content_type, queue, *, priority=0, compression=None,
                   expires_in=None, reply_to=None, delivery_tag=None, more_properties=None) -> str:
    """The JSON string kombu's Redis transport LPUSHes for one message."""
    if compression:
        headers = dict(headers, compression=compression)
    properties = {
        "correlation_id": headers["id"], "reply_to": reply_to or "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": priority, "body_encoding": "base64", "delivery_tag": delivery_tag or uuid(),
    }
    if expires_in is not None:
        properties["expiration"] = str(int(max(expires_in, 0) * 1000))
    properties.update(more_properties or {})
    return json.dumps({
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8" if content_type in (JSON_TYPE, YAML_TYPE) else "binary",
        "content-type": content_type, "headers": headers, "properties": properties,
    })


@dataclasses.dataclass
class Message:
    """One task message as a worker received it, already decoded.

    Reading a message can fail in two stages: the envelope and headers (no id
    to report to), then the body (we know the task id and can store FAILURE).
    `decode_message` does the first, `Message.decode_body` the second.
    """
    headers: dict
    properties: dict
    body: str  # as the envelope carries it (base64, usually): decode_body() reads it
    content_type: str
    queue: str = ""
    delivery_tag: str = ""
    raw: str = ""
    args: list = dataclasses.field(default_factory=list)
    kwargs: dict = dataclasses.field(default_factory=dict)
    embed: dict = dataclasses.field(default_factory=dict)
    #: the worker sends task events for it (-E): set by the consumer, read where it runs
    events: bool = False

    id = property(lambda self: self.headers["id"])
    task_name = property(lambda self: self.headers["task"])
    retries = property(lambda self: self.headers.get("retries") or 0)
    eta = property(lambda self: to_datetime(self.headers.get("eta")))
    expires = property(lambda self: to_datetime(self.headers.get("expires")))
    priority = property(lambda self: clamp_priority(self.properties.get("priority")))

    def decode_body(self, accept, max_size=None):
        """Fill args, kwargs and embed; raises DecodeError for a bad body or header."""
        if not self.content_type:
            raise DecodeError("the message has no content-type")
        body = _body_bytes(self.body, self.properties.get("body_encoding"))
        if max_size and len(body) > max_size:
            raise DecodeError(f"the body has {len(body)} bytes, over worker_max_message_size ({max_size})")
        try:
            self.eta, self.expires  # parse them now, where a bad one is just a bad message
        except (ValueError, TypeError, AttributeError) as exc:
            raise DecodeError(f"eta/expires header is not an ISO-8601 date: {exc}") from None
        _check_fields("header", self.headers, _HEADER_TYPES)
        _check_timelimit(self.headers.get("timelimit"))
        body = loads(body, self.content_type, accept, self.headers.get("compression"), max_size)
        if not (isinstance(body, (list, tuple)) and len(body) == 3):
            raise DecodeError(f"body must be the list [args, kwargs, embed], got {_short_repr(body, 80)}")
        args, kwargs, embed = body
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) \
                or not all(isinstance(key, str) for key in kwargs):
            raise DecodeError("body args must be a list and kwargs an object")
        _check_fields("embed", embed or {}, _EMBED_TYPES)
        self.args, self.kwargs, self.embed = list(args), kwargs, embed or {}

    def describe(self):
        """`name[id]` for log lines; what a sender wrote there can't start a line of its own,
        nor make it long."""
        return printable(f"{_cut(self.task_name, 200)}[{_cut(self.id, 200)}]")


#: what each header a worker reads must be, when present and not null; checked on
#: arrival, so a wrong type makes a bad message, never a worker error later on
_HEADER_TYPES = {"retries": int, "group_index": int, "timelimit": (list, tuple),
                 "group": str, "root_id": str, "parent_id": str, "shadow": str,
                 "ignore_result": (bool, int), "compression": str, "replaced_task_nesting": int,
                 "stamped_headers": list, "stamps": dict}
_EMBED_TYPES = {"callbacks": list, "errbacks": list, "chain": list, "chord": dict}


def _check_fields(what, fields, types):
    if not isinstance(fields, dict):
        raise DecodeError(f"the message's {what} part must be an object, not {_short_repr(fields, 80)}")
    for name, allowed in types.items():
        value = fields.get(name)
        if value is not None and (not isinstance(value, allowed) or isinstance(value, bool) and allowed is int):
            raise DecodeError(f"{what} {name!r} has the wrong type: {_short_repr(value, 80)}")
    try:
        for name in _EMBED_TYPES if what == "embed" else ():  # (a chord is one signature, the others lists)
            if not all(_is_signature(sig) for sig in _as_list(fields.get(name))):
                raise DecodeError(f"embed {name!r} must hold signatures only")
    except RecursionError:
        raise DecodeError(f"the message's {what} nests signatures too deep") from None


def _is_signature(sig) -> bool:
    """Whether a signature from a message has the shape the worker relies on when it sends
    it: its parts, and the signatures it holds (a chain's or group's tasks, a chord's header
    and body, its options' link, link_error, chain and chord), at any depth."""
    if not (isinstance(sig, dict) and isinstance(sig.get("task"), str)
            and isinstance(sig.get("args") or (), (list, tuple)) and isinstance(sig.get("kwargs") or {}, dict)
            and isinstance(sig.get("options") or {}, dict)):
        return False
    kind, kwargs, options = sig.get("subtask_type"), sig.get("kwargs") or {}, sig.get("options") or {}
    held = [member for option in ("link", "link_error", "chain", "chord") for member in _as_list(options.get(option))]
    if kind in ("chain", "group"):
        if not isinstance(kwargs.get("tasks"), list):
            return False
        held += kwargs["tasks"]
    elif kind == "chord":
        if kwargs.get("header") is None or kwargs.get("body") is None:
            return False
        held += _as_list(kwargs["header"]) + [kwargs["body"]]
    return all(_is_signature(member) for member in held)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def _check_timelimit(value):
    """[hard, soft]: each a number of seconds >= 0, or null."""
    if value is not None and (len(value) > 2 or not all(
            limit is None or (_is_number(limit) and limit >= 0) for limit in value)):
        raise DecodeError(f"header 'timelimit' must be [hard, soft] seconds, got {_short_repr(value, 80)}")


def _is_number(value) -> bool:
    """An int or a finite float, not a bool: NaN and infinity compare as no number does
    (a NaN visibility timeout restored nothing, and said nothing)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clamp_priority(value) -> int:
    try:
        return min(max(int(value), 0), 9)
    except (TypeError, ValueError, OverflowError):  # (OverflowError: JSON's 1e999 is infinity)
        return 0


def _envelope_limit(max_body_size) -> int:
    """The largest envelope worth parsing for a body of at most `max_body_size` (0: any)."""
    return 2 * max_body_size + 1024 * 1024 if max_body_size else 0


def _body_bytes(body, encoding):
    try:
        return base64.b64decode(body) if encoding == "base64" else body.encode("utf-8") if isinstance(body, str) \
            else body
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"body is not valid base64: {exc}") from exc


def decode_message(raw, queue="", delivery_tag="", max_size=None) -> Message:
    """Parse an envelope into a Message with headers; raises DecodeError.

    With `max_size`, an envelope far too big for a body of that size is refused
    before it is parsed (a body just over it is refused later, with its id known).
    """
    if max_size and len(raw) > _envelope_limit(max_size):
        raise DecodeError(f"the message has {len(raw)} bytes, over worker_max_message_size ({max_size})")
    try:
        envelope = json.loads(raw)
        headers = envelope["headers"]
        task_id, task_name = headers["id"], headers["task"]
    except (ValueError, TypeError, KeyError) as exc:
        # (str(), not repr(): a UnicodeDecodeError's repr holds the whole message)
        raise DecodeError(f"not a protocol 2 task message: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(task_id, str) or not isinstance(task_name, str):
        raise DecodeError("headers 'id' and 'task' must be strings")
    try:
        properties, body = envelope.get("properties") or {}, envelope.get("body", "")
        _check_fields("property", properties, {"delivery_info": dict})
        if not isinstance(body, str):
            raise DecodeError(f"the body must be a string, not {_short_repr(body, 80)}")
    except DecodeError as exc:
        exc.task_id = task_id  # (the id is known: its FAILURE is stored, so no get() waits for ever)
        raise
    return Message(headers=headers, properties=properties, body=body,
                   content_type=envelope.get("content-type"), queue=queue,
                   delivery_tag=delivery_tag or properties.get("delivery_tag", ""), raw=raw)


# =============================================================================
# 5. Brokers
# =============================================================================
# A broker carries messages from producers to workers and must not lose one
# when a worker dies mid-task. The Redis broker keeps kombu's layout byte for
# byte, so real Celery shares the queues:
#
#   key                   type  what
#   <queue>               list  messages, LPUSHed by producers, RPOPed by workers
#   <queue>\x06\x16<N>    list  the same for priority steps 3, 6 and 9
#   unacked               hash  delivery_tag -> [envelope, exchange, routing_key]
#   unacked_index         zset  delivery_tag -> time it was reserved (or last touched)
#   _kombu.binding.<q>    set   routing table entry, written when a worker starts
#   minicelery:dead-letters list  messages no worker could read, with the reason
#   minicelery:eta        zset  delivery_tag -> due time of a parked far-ETA message
#   minicelery:eta-messages hash delivery_tag -> "<length of key>:<queue list key><envelope>"
#   minicelery:revoked    zset  task id -> when its revocation expires (the key expires too)
#   minicelery:sent:<tag> string marks a message published in the last minute, so a
#                               publish retried after a lost reply queues it only once
#   minicelery:lease:beat string the token of the beat that sends periodic tasks (expires)
#   /<db>.celery.pidbox   channel  Celery's broadcast for revoke (and other control)
#
# Taking a message moves it from its list into `unacked` in one Lua script, so
# a message is always somewhere. An acked message leaves `unacked`; one whose
# worker died stays there until its visibility timeout passes, then any worker
# moves it back to its queue (restore_unacked).
# Celery: prompt-restore: kombu scans for these only about every 100 s; we scan
# every few seconds, and a live worker keeps touching the messages it holds, so
# a long task is not handed out twice just because it outlived the visibility
# timeout.
# Celery: parked-eta: Celery holds ETA tasks in worker memory (and unacked)
# until due; we park far-future ones in Redis instead.

#: one message as reserve() returns it: its queue, delivery tag, raw envelope bytes, and the
#: claim it was taken under (the time of the take)
Delivery = namedtuple("Delivery", "queue tag raw claim")

#: explain mode's log (conf.explain): what each broker and backend operation sends, and why
explain_logger = logging.getLogger("minicelery.explain")

#: one note of a store's docstring: "Explain NAME[ (METHOD[, when FIELD])]: SENDS -- WHY"
_EXPLAIN_NOTE = re.compile(r"Explain (\w+)(?: \((\w+)(?:, when ([\w\[\]]+))?\))?: (.+)", re.S)


class _ExplainFormatter(string.Formatter):
    """Formats a note with the call's fields, never a payload: `!n` shows a length, `!t`
    the tags or ids (delivery tags, a {tag: claim}'s keys, the first of each tuple), a
    string escaped (kombu's priority lists end in \\x06\\x16, a queue name may hold a
    newline); a field the call doesn't have shows as `?`."""

    def get_field(self, field_name, args, kwargs):
        try:
            return super().get_field(field_name, args, kwargs)
        except (LookupError, AttributeError, TypeError):
            return "?", field_name

    def convert_field(self, value, conversion):
        if conversion == "n":
            return len(value)
        if conversion == "t":
            return " ".join(self._shown(item) for item in value)
        return self._shown(value) if isinstance(value, (str, bytes)) else super().convert_field(value, conversion)

    @staticmethod
    def _shown(item) -> str:
        while isinstance(item, tuple) and not hasattr(item, "tag"):  # (parked: (Delivery, claim, ...))
            item = item[0]
        item = getattr(item, "tag", item)
        return printable(item.decode(errors="replace") if isinstance(item, bytes) else str(item))


class Explains:
    """Explain mode, for brokers and result backends.

    With conf.explain on ($MINICELERY_EXPLAIN=1, `worker --explain`), each
    operation logs one line: the Redis commands or SQL it sends, and why.
    Watching one delay() travel to get() teaches the protocol. Task arguments
    and results are never shown, only ids, names and sizes.

    The one source is each store's class docstring: a paragraph "Explain take
    (reserve, when result[0]): SENDS -- WHY" says that a call of reserve() logs
    `explain take: ...` when its result[0] is not empty, its {fields} filled
    from the call's arguments, `self` and (logged after the call) its `result`;
    without a method in brackets, the method of the note's name. When explain
    is turned on, explain_operations() wraps those methods of this one store;
    off, nothing is wrapped and no operation tests for it. Left out, because
    they repeat every second or so: takes that find nothing, heartbeats, queue
    declarations, and the periodic reloads and scans that find nothing.
    """

    FORMATTER = _ExplainFormatter()

    @classmethod
    def notes(cls) -> list:
        """(name, method, when, text) of each Explain paragraph of the class's docstrings
        (its own and its base classes')."""
        paragraphs = (" ".join(p.split()) for klass in cls.__mro__
                      for p in inspect.cleandoc(klass.__dict__.get("__doc__") or "").split("\n\n"))
        return [(m[1], m[2] or m[1], m[3], m[4]) for p in paragraphs if (m := _EXPLAIN_NOTE.fullmatch(p))]

    def explain_operations(self, on=True):
        """Wrap (or unwrap) this store's explained methods; see the class docstring."""
        by_method = collections.defaultdict(list)
        for name, method, when, text in self.notes():
            by_method[method].append((name, when, text))
        for method, notes in by_method.items():
            self.__dict__.pop(method, None)
            if on and hasattr(self, method):
                setattr(self, method, self._explained(getattr(self, method), notes))

    def _explained(self, method, notes):
        signature = inspect.signature(method)

        @functools.wraps(method)
        def explained(*args, **kwargs):
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            fields, after = dict(call.arguments, self=self), []
            for note in notes:  # (a note that shows the result is logged once it is known)
                if "{result" in note[2] or (note[1] or "").startswith("result"):
                    after.append(note)
                else:
                    self._log_note(*note, fields)
            fields["result"] = method(*args, **kwargs)
            for note in after:
                self._log_note(*note, fields)
            return fields["result"]
        return explained

    def _log_note(self, name, when, text, fields):
        try:
            if when is None or self.FORMATTER.get_field(when, (), fields)[0]:
                self.explain(name, text, **fields)
        except Exception as exc:  # (explaining must never change what the operation does)
            explain_logger.warning("explain %s: (not shown: %s)", name, type(exc).__name__)

    def explain(self, name, text=None, /, **fields):
        if not explain_logger.hasHandlers():  # a client that set up no logging sees it too
            explain_logger.addHandler(logging.StreamHandler())
        explain_logger.setLevel(logging.INFO)
        text = text or next(note[3] for note in self.notes() if note[0] == name)
        explain_logger.info("explain %s: %s", name, self.FORMATTER.format(text, **{"self": self, **fields}))


class Broker(Explains):
    """What a worker and a producer need from a message store.

    Subclasses implement each method; the consumer and Task.apply_async use
    nothing else. A worker takes messages with reserve(): each stays in the
    broker, held under the worker's claim (the time it took it, or last renewed
    it), until the worker acks it (done: gone), requeues it (back to its queue
    now) or parks it (back at its ETA). Each of these, and a renewal, acts only
    while the claim is still that worker's: a message held past the visibility
    timeout without a renewal counts as abandoned, and restore_unacked() (which
    every worker runs) puts it back in its queue, where any worker may take it
    under a new claim. A claim is passed as a tuple of the scores it may have:
    one, or two after a renewal whose answer never came.
    """

    #: exceptions meaning "the broker can't serve us right now" (unreachable, stalled,
    #: full, locked): the worker logs them, waits and retries; a producer retries, then
    #: raises OperationalError
    connection_errors = ()

    def __init__(self, app, url):
        self.app, self.url = app, url
        options = app.conf.broker_transport_options or {}
        #: seconds a reserved message may go untouched before it counts as abandoned
        self.visibility_timeout = options.get("visibility_timeout", 3600)
        if not _is_number(self.visibility_timeout) or self.visibility_timeout <= 0:
            raise ImproperlyConfigured(f"visibility_timeout must be a number of seconds > 0, "
                                       f"not {self.visibility_timeout!r}")

    def publish(self, queue: str, envelope: str, priority: int = 0, tag=None):
        """Append one message (an envelope JSON string, with delivery tag `tag`) to
        `queue`; sending the same message again must not queue it twice."""

    def reserve(self, queues, limit: int, ack=None, renew=None, now=None) -> tuple:
        """One round trip of a worker's loop: ack the held messages in `ack` and renew the
        claims in `renew` to `now` (each {tag: claim}), then take up to `limit` messages
        of `queues`, highest priority first, under the claim `now`.

        Returns (deliveries, gone, others): the Delivery tuples taken, and the tags of
        `ack` and `renew` that were not held at all (gone) or held under another
        claim (others), and so were neither acked nor renewed.
        """

    def ack(self, claims) -> tuple:
        """Ack held messages ({tag: claim}): done for good; (gone, others) as for reserve()."""
        return self.reserve((), 0, ack=claims)[1:]

    def touch(self, claims, now=None) -> tuple:
        """Renew claims ({tag: claim}) to `now`, so a live worker's messages are not taken
        for abandoned; (gone, others) as for reserve()."""
        return self.reserve((), 0, renew=claims, now=now)[1:]

    def wait(self, queues, timeout, also=(), writable=()) -> list:
        """Wait until one of `queues` may have a message, a handle in `also` is readable or
        one in `writable` writable, a signal comes, or `timeout` passes. Returns the ready
        handles of `also` and `writable`."""

    def requeue(self, claims):
        """Put held messages ({tag: claim}) back at the head of their queues, marked redelivered."""

    def restore_claimed(self, claim, keep=()):
        """Requeue the messages held under `claim`, but those in `keep`: a reserve() whose
        answer never came may have taken them."""

    def restore_unacked(self, now=None) -> int:
        """Requeue messages held longer than the visibility timeout ago without a renewal."""

    def park(self, parked):
        """Hand held messages with a far ETA back to the broker until they are due.

        `parked` is a list of (Delivery, claim, priority, due unix time). Each message
        leaves the held ones and is kept durably; reserve() moves it back to its
        queue shortly before it is due, so no worker holds it meanwhile.
        """

    #: revocations kept at most (the newest; Celery's workers keep 50,000 too)
    REVOKES_MAX = 50000
    #: how many dead letters to keep; the oldest go first
    DEAD_LETTER_LIMIT = 10000
    #: parked messages go back to their queue this many seconds before they are due
    ETA_MOVE_AHEAD = 2.0
    #: the biggest parked message parked() reads (`inspect scheduled`): bigger ones are not shown
    PARKED_READ_MAX = 64 * 1024

    def revoke(self, task_ids, terminate=False, signal="SIGTERM", expires=10800, broadcast=True):
        """Remember revoked ids for `expires` seconds (REVOKES_MAX at most) and, with
        broadcast, tell every worker now.

        Celery: lasting-revokes: Celery's workers keep them in memory only."""

    def revoked(self) -> set:
        """The ids revoked and not yet expired, for workers that start later."""

    def broadcast(self, body: dict):
        """Send a remote-control command (Celery's pidbox body: method, arguments,
        destination, and for one that wants answers reply_to and ticket) to every worker."""

    def control_messages(self) -> list:
        """Commands broadcast since the last call, as ControlCommand tuples; malformed
        ones are logged and left out."""

    def control_handles(self):
        """What turns readable when a command comes (for a worker's wait), or None: look
        every tenth of a second."""
        return None

    def reply(self, reply_to: dict, ticket: str, body: dict):
        """Answer a command that asked for answers (with its reply_to and ticket)."""

    def send_event(self, event: dict):
        """Publish an event (make_event()) to whoever listens: Flower, `events`; none is kept."""

    #: events() returns at most this many at once: under a flood, a reader gets on with them
    EVENTS_AT_ONCE = 1000

    def events(self, timeout: float) -> list:
        """The events sent since the last call (the first call starts listening), waiting
        up to `timeout` seconds for one; at most EVENTS_AT_ONCE, the rest at the next call."""

    def ask(self, body: dict, timeout: float, limit=None) -> list:
        """Broadcast a command that wants answers; the answers ({node name: value}) that
        came within `timeout` seconds, or once `limit` of them came."""

    def lease(self, name, token, ttl) -> bool:
        """Take or renew the lease `name` for `token` for `ttl` seconds; False if another
        holds it. A ttl of 0 gives it up."""

    def purge(self, queue: str) -> int:
        """Drop every waiting message of `queue`; returns how many."""

    def size(self, queue: str) -> int:
        """How many messages of `queue` wait to be reserved."""

    def dead_letter(self, raw, reason: str, queue: str = ""):
        """Keep a message no worker can run, for a human to inspect."""

    def parked(self, queues, limit) -> list:
        """(queue, raw envelope) of parked messages of these queues, soonest due first; at
        most `limit` looked at, and only those of PARKED_READ_MAX bytes or less (a worker's
        main process reads no big message for `inspect scheduled`)."""

    def dead_letters(self) -> list:
        """The kept dead letters, newest first: dicts of id, time, queue, reason and raw."""

    def take_dead_letters(self, ids) -> list:
        """Remove the dead letters with these ids; returns them (to send again, or not)."""

    def close(self):
        """Release connections (also called in a freshly forked child)."""

    def forget_connections(self):
        """After a connection error, drop the connections kept open: each would fail once
        after a restart of the broker, each failure doubling the wait before the next try."""


def _import_redis():
    try:
        import redis
    except ImportError:
        raise ImproperlyConfigured(
            'the "redis://" broker and backend need redis-py: pip install redis') from None
    return redis


def redis_client(url: str, decode_responses=False, socket_timeout=5.0):
    """A redis-py client for any of Celery's and redis-py's URL forms.

    redis://[:password@]host:port/db, rediss:// (TLS), unix:///path?db=N, and
    Celery's redis+socket:///path and socket:///path (with ?virtual_host=N).

    redis-py's own retries are off: after a timeout it can't know whether Redis
    ran the command, and sending an LPUSH again would queue the task twice. We
    retry where it is safe (an idempotent command or script) and nowhere else.
    """
    redis = _import_redis()
    for prefix in ("redis+socket://", "socket://"):
        if url.startswith(prefix):
            url = "unix://" + url[len(prefix):].replace("virtual_host=", "db=")
    url = _cap_url_timeouts(url, socket_timeout)
    for level in ("REQUIRED", "OPTIONAL", "NONE"):  # Celery's CERT_REQUIRED is redis-py's required
        url = url.replace(f"ssl_cert_reqs=CERT_{level}", f"ssl_cert_reqs={level.lower()}")
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    # RESP2, which every Redis speaks: redis-py 8 would open with HELLO, which Redis 5 lacks.
    protocol = {"protocol": 2} if int(redis.__version__.split(".")[0]) >= 5 and "protocol=" not in url else {}
    return redis.Redis.from_url(url, decode_responses=decode_responses, health_check_interval=30,
                                socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                retry=Retry(NoBackoff(), 0), max_connections=2 ** 16, **protocol)


def _cap_url_timeouts(url: str, most: float) -> str:
    """The URL with its socket_timeout and socket_connect_timeout options cut to `most`.

    Celery: url-timeouts: Celery honours any. Here the deadlines of get(), of a
    publish and of the worker's steps hold while Redis stalls because no command
    waits longer than `most` (redis-py's URL options win over its arguments).
    """
    import urllib.parse
    base, _, query = url.partition("?")
    options = urllib.parse.parse_qsl(query, keep_blank_values=True)
    capped = [(name, value) for name, value in options if name in ("socket_timeout", "socket_connect_timeout")
              and not _seconds_within(value, most)]
    if not capped:
        return url
    logger.warning("%s in the Redis URL cut to %gs: minicelery's deadlines hold only if no command waits longer",
                   ", ".join(f"{name}={value}" for name, value in capped), most)
    options = [(name, str(most) if (name, value) in capped else value) for name, value in options]
    return f"{base}?{urllib.parse.urlencode(options)}"


def _seconds_within(text: str, most: float) -> bool:
    """Whether `text` reads (as redis-py reads it, with float()) as a time in (0, most]:
    not 1e3, inf, nan, -1 or 0 (a socket that never waits)."""
    try:
        return 0 < float(text) <= most
    except ValueError:
        return False


class HeldConnection:
    """One redis-py connection kept for a hot path, with its scripts.

    Through the client, each command takes a connection from the pool, wraps
    the call in a retry and gives the connection back: about 50 µs of Python
    per command. Held, it costs a third of that, and several commands go out
    in one write. A lost connection is dropped (its replies would be out of
    step) and the next call connects again. Not for sharing between threads.
    """

    def __init__(self, client):
        self.client, self.connection, self._shas = client, None, {}
        self.lock = threading.Lock()  # one exchange at a time: a client's threads may share it

    def run(self, *commands) -> list:
        """Send the commands in one write; their replies. A command that failed raises its
        ResponseError, once every reply is read."""
        replies = self._exchange(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def script(self, source, keys, args):
        """Run a Lua script by its SHA1; sent whole the first time Redis hasn't seen it."""
        [reply] = self._exchange([("EVALSHA", self._sha(source), len(keys), *keys, *args)])
        if isinstance(reply, _import_redis().exceptions.NoScriptError):
            reply = self.run(("EVAL", source, len(keys), *keys, *args))[0]  # (and Redis keeps it)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _sha(self, source):
        if source not in self._shas:
            import hashlib
            self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        return self._shas[source]

    def _exchange(self, commands) -> list:
        error = _import_redis().exceptions.ResponseError
        with self.lock:
            connection = self._connected()
            try:
                connection.send_packed_command(connection.pack_commands(commands))
                replies = []
                for _ in commands:
                    try:
                        replies.append(connection.read_response())
                    except error as exc:
                        replies.append(exc)
                return replies
            except BaseException:
                self.close()
                raise

    def _connected(self):
        """Our connection, made on first use, and made again in a forked child: the
        parent's socket is the parent's (a web server forking its workers, say)."""
        if self.connection is not None and self.connection.pid != os.getpid():
            self.close()  # (redis-py only closes the descriptor here, it doesn't shut the socket down)
        if self.connection is None:
            # Made directly, not by the pool's make_connection(): the pool counts what that
            # makes and never counts down, so a process whose threads come and go (each with
            # its own connection) would reach max_connections and fail for ever.
            pool = self.client.connection_pool
            self.connection = pool.connection_class(**pool.connection_kwargs)
        return self.connection

    def close(self):
        if self.connection is not None:
            self.connection.disconnect()
            self.connection = None


class HeldPerThread(threading.local):
    """A HeldConnection for each thread (a web server's, say): no thread waits behind
    another's stalled command, so each keeps its own deadline."""

    def __init__(self, client):
        self.connection = HeldConnection(client)


class ListWatcher(HeldConnection):
    """A connection blocked on one list, to learn without polling that a message came.

    Celery: atomic-take: kombu's BRPOP takes the message as it wakes the worker.

    Its command moves the list's last element onto itself (BLMOVE, or on Redis
    before 6.2 BRPOPLPUSH, which puts it at the other end: in order for the one
    message of an empty list). Unlike kombu's BRPOP it takes nothing, so a reply
    lost on the way can't lose a message. It stays armed while the worker does
    other things, and its socket turns readable when the list has something.
    """

    #: seconds Redis holds the command before answering "nothing"; then it is sent again
    BLOCK = 10

    def __init__(self, client, key):
        super().__init__(client)
        self.key, self.armed, self.explained = key, False, False

    def arm(self, blmove=True):
        if not self.armed:
            self._connected()
            command = ("BLMOVE", self.key, self.key, "RIGHT", "RIGHT", self.BLOCK) if blmove \
                else ("BRPOPLPUSH", self.key, self.key, self.BLOCK)
            try:
                self.connection.send_command(*command)
            except BaseException:
                self.close()
                raise
            self.armed = True

    def fileno(self):
        return self.connection._sock.fileno()  # (redis-py keeps its socket private; poll needs it)

    def close(self):
        super().close()
        self.armed = False

    def answer(self):
        """Read the answer that made the socket readable: a message came, or the time ran out."""
        self.armed = False
        try:
            return self.connection.read_response()
        except _import_redis().exceptions.ResponseError as exc:
            return exc
        except BaseException:
            self.close()
            raise


def next_pubsub_message(pubsub, timeout):
    """The next pub/sub message, or None if none starts to arrive within `timeout`.

    One that has started is read whole: redis-py 8 applies the wait to the read
    itself, and gives up on (and drops the connection under) a large message
    only half arrived when the wait is up.
    """
    if pubsub.connection is None:
        return None
    try:
        if not pubsub.connection.can_read(timeout=timeout):
            return None
    except Exception:
        pubsub.connection.disconnect()  # the next call connects again, and resubscribes
        raise
    return pubsub.get_message(timeout=max(timeout, RedisBackend.SOCKET_TIMEOUT))


def _redis_transient_errors() -> tuple:
    """Errors that pass: unreachable, stalled, loading, full (OOM), read-only, fail-over.
    Any other error (a key of the wrong type, say) is not waited out."""
    e = _import_redis().exceptions
    return (e.ConnectionError, e.TimeoutError, e.OutOfMemoryError, e.ReadOnlyError,
            e.TryAgainError, e.MasterDownError)


def _queue_keys(queue):
    """The Redis list keys of a queue, highest priority (lowest number) first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def _queue_key(queue, priority):
    return _queue_keys(queue)[clamp_priority(priority) // 3]  # steps 0-2, 3-5, 6-8 and 9


def _is_own_key(key: str) -> bool:
    """Whether a Redis key is one that minicelery or kombu keeps for itself: no queue's list
    may go there (a list in its place would break every worker)."""
    return key in ("unacked", "unacked_index", "unacked_mutex") or key.startswith(("minicelery:", "_kombu."))


def _claim_args(claims) -> list:
    """{tag: claim} as the scripts take them: tag, first score, last score, for each."""
    return [value for tag, claim in claims.items() for value in (tag, claim[0], claim[-1])]


def _queue_of_key(key: str):
    queue, sep, step = key.rpartition(PRIORITY_SEPARATOR)
    return queue if sep and step.isdigit() else key


class QueueWatch:
    """How an idle worker on Redis waits for a message: a ListWatcher on each list of its
    queues, armed until it answers, and what this Redis allows (BLMOVE; before 6.2,
    BRPOPLPUSH; neither: a look every 0.1 s). A key found holding something else than a
    list is not watched (`not_lists`: the reserve script finds those, and logs them once)."""

    def __init__(self, broker):
        self.broker, self.watchers, self.not_lists, self.blmove = broker, {}, set(), True

    def wait(self, keys, timeout, also=(), writable=()) -> list:
        """Wait until a list of `keys` has a message, a handle of `also` is readable (or of
        `writable` writable), or `timeout` passed: the ready handles. Without keys, the
        watchers stay as they are, unwatched."""
        watchers = []
        if keys:
            keys = [key for key in keys if key not in self.not_lists]
            for key in set(self.watchers) - set(keys):  # a queue no longer consumed (or a broken key)
                self.watchers.pop(key).close()
            watchers = [self.watchers.setdefault(key, ListWatcher(self.broker.client, key)) for key in keys]
        deadline = time.monotonic() + timeout
        while True:
            if self.blmove is None:  # no blocking command allowed here: look again in a tenth of a second
                watchers, deadline = [], min(deadline, time.monotonic() + 0.1)
            for watcher in watchers:
                if self.broker.app.conf.explain and not watcher.armed and self.blmove and not watcher.explained:
                    self.broker.explain("watch", key=watcher.key)  # (once a watcher: not at each re-arm)
                    watcher.explained = True
                watcher.arm(self.blmove)
            answered = wait_readable(watchers + list(also), deadline - time.monotonic(), writable)
            ready = [handle for handle in answered if handle not in watchers]
            if ready or not answered or self._read_answers([w for w in answered if w in watchers]) \
                    or time.monotonic() >= deadline:
                return ready  # (a handle, a message, a signal, or the time is up)

    def _read_answers(self, watchers) -> bool:
        """Whether one of the watchers' answers says a message came. Every answer is read
        (a dead connection is closed, to connect again next time) before an error is raised."""
        came, error = False, None
        for watcher in watchers:
            try:
                answer = watcher.answer()
                if isinstance(answer, Exception) and str(answer).startswith("WRONGTYPE"):
                    self.not_lists.add(watcher.key)  # (the next take says which queue, once)
                    continue
                came = self._came(answer) or came
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return came

    def _came(self, answer) -> bool:
        """Whether a watcher's answer says a message came (else: its time ran out)."""
        if not isinstance(answer, Exception):
            return answer is not None
        text = str(answer).lower()
        if "blmove" in text and ("unknown command" in text or "permission" in text) and self.blmove:
            logger.info("Redis has no BLMOVE (before 6.2, or not allowed): watching queues with BRPOPLPUSH")
            self.blmove = False
        elif "brpoplpush" in text and ("unknown command" in text or "permission" in text):
            logger.error("Redis allows neither BLMOVE nor BRPOPLPUSH (%s): an idle worker looks at its "
                         "queues every 0.1 s instead of waiting for them", answer)
            self.blmove = None
        elif not ("blmove" in text and not self.blmove):  # (a late answer to BLMOVE, already known)
            raise answer
        return False


# Keeps a message given up in the dead letters (KEYS[5], the newest 10,000), saying why:
# Broker.dead_letter's entry, written by the scripts below that give up a message as
# they act (in the same step, so it is always somewhere).
_DEAD_LETTER_LUA = r"""
local function dead_letter(key, raw, reason, time)
  redis.call('LPUSH', KEYS[5], cjson.encode({reason = reason, queue = string.gsub(key, '\6\22%d$', ''),
    time = tonumber(time), raw = raw}))
  redis.call('LTRIM', KEYS[5], 0, 9999)
end
"""

# The guard of every ack and renewal, shared by the scripts below: held(i) says whether
# the message ARGV[i] is still held (KEYS[2], unacked_index) under one of its claim's
# scores (ARGV[i + 1], ARGV[i + 2]); if not, it notes it in `others` (held by another, or
# given back since our claim: `restored_key` says) or in `gone` (acked).
_HELD_LUA = r"""
local function held(i)
  local score = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if score and (tonumber(score) == tonumber(ARGV[i + 1]) or tonumber(score) == tonumber(ARGV[i + 2])) then
    return true
  end
  local restored = tonumber(redis.call('ZSCORE', restored_key, ARGV[i]) or '-1')
  if score or restored >= math.min(tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])) then
    table.insert(others, ARGV[i])
  else
    table.insert(gone, ARGV[i])
  end
  return false
end
"""

# Celery: atomic-take: kombu BRPOPs, then records; here one script takes.
# One round trip of a worker's loop (RedisQueues.reserve). The essential part:
# ack the held messages named (ZREM unacked_index, HDEL unacked), renew the
# claims named (ZADD unacked_index <now>), then take up to `limit` messages:
# RPOP from each queue's lists, HSET unacked and ZADD unacked_index <now>, in
# one step, so a worker dying between "pop" and "remember" can't lose one.
# ARGV: now, limit, the largest message handed out (0: any), how many acks,
# renewals and queues, the time before which parked ones are due, then (tag,
# claim, claim) for each ack and renewal, then the queue names. The guards,
# each named below: held() (above) lets an ack or a renewal act only on a
# message still held under one of our claim's scores (KEYS[6]: the given back);
# due_parked() first moves parked ETA messages due soon back to their lists (to
# the dead letters, should a list's key have come to hold something else);
# bury() keeps a message too big to hand out in the dead letters, cut to 64
# KiB and never parsed, so no worker's memory pays for it; tag_of() makes up a
# tag for a message without one (kombu would lose it), with one that isn't a
# short plain word (it becomes a key, a log word, a marker here), or with one
# already held or parked; a queue key that isn't a list is skipped (pcall) and answered with
# the tag "!". Returns {gone, others, {list key, tag, message, ...}}.
_RESERVE_LUA = r"""
local now, limit, max_size = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local gone, others, taken, restored_key = {}, {}, {}, KEYS[6]
""" + _HELD_LUA + _DEAD_LETTER_LUA + r"""

local function due_parked()  -- back to the consuming end of their lists, due before ARGV[7]
  local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[7], 'LIMIT', 0, 100)
  for n = #due, 1, -1 do  -- (the earliest pushed last: taken first)
    local tag = due[n]
    local entry = redis.call('HGET', KEYS[4], tag) or ''
    local length = string.match(entry, '^(%d+):')
    if length then  -- "<length>:<queue list key><envelope>"
      local start = #length + 2
      local key, raw = string.sub(entry, start, start + length - 1), string.sub(entry, start + length)
      local pushed = redis.pcall('RPUSH', key, raw)
      if type(pushed) == 'table' and pushed.err then  -- (its list's key now holds something else)
        dead_letter(key, string.sub(raw, 1, 65536), "a parked message whose queue's key is not a list any more", now)
      end
    end
    redis.call('HDEL', KEYS[4], tag)
    redis.call('ZREM', KEYS[3], tag)
  end
end

local function bury(key, raw)
  dead_letter(key, string.sub(raw, 1, 65536), 'a message of ' .. #raw ..
    ' bytes, over worker_max_message_size (cut to 64 KiB here)', now)
  table.insert(taken, key); table.insert(taken, ''); table.insert(taken, tostring(#raw))
end

local function tag_of(tag)
  if type(tag) ~= 'string' or #tag > 200 or not string.match(tag, '^[%w%-%.:_@]+$')
      or redis.call('HEXISTS', KEYS[1], tag) == 1 or redis.call('HEXISTS', KEYS[4], tag) == 1 then
    return 'minicelery-' .. redis.call('INCR', 'minicelery:tag-seq')
  end
  return tag
end

local function remember(key, raw)
  local ok, env = pcall(cjson.decode, raw)
  local props = ok and type(env) == 'table' and type(env.properties) == 'table' and env.properties or {}
  local di = type(props.delivery_info) == 'table' and props.delivery_info or {}
  local tag, exchange, rk = tag_of(props.delivery_tag), di.exchange, di.routing_key
  if type(exchange) ~= 'string' then exchange = '' end
  if type(rk) ~= 'string' or rk == '' then rk = string.gsub(key, '\6\22%d$', '') end
  -- kombu's entry is [envelope object, exchange, routing key]; splicing in the
  -- raw text keeps the envelope byte for byte. Non-JSON is kept as a string.
  local entry = ok and '[' .. raw .. ', ' .. cjson.encode(exchange) .. ', ' .. cjson.encode(rk) .. ']'
    or cjson.encode({raw, exchange, rk})
  redis.call('HSET', KEYS[1], tag, entry)
  redis.call('ZADD', KEYS[2], now, tag)
  -- A note of its giving back not older than this claim (a live holder's requeue since
  -- our round trip began) would make this claim look given back too: it goes.
  if tonumber(redis.call('ZSCORE', restored_key, tag) or '-1') >= tonumber(now) then
    redis.call('ZREM', restored_key, tag)
  end
  table.insert(taken, key); table.insert(taken, tag); table.insert(taken, raw)
end

local i = 8
for _ = 1, tonumber(ARGV[4]) do
  if held(i) then redis.call('ZREM', KEYS[2], ARGV[i]); redis.call('HDEL', KEYS[1], ARGV[i]) end
  i = i + 3
end
for _ = 1, tonumber(ARGV[5]) do
  if held(i) then redis.call('ZADD', KEYS[2], now, ARGV[i]) end
  i = i + 3
end
if limit > 0 then due_parked() end
for _, step in ipairs({0, 3, 6, 9}) do  -- kombu's lists: <queue>, then <queue>\x06\x16<step>
  for q = i, i + tonumber(ARGV[6]) - 1 do
    local key = step == 0 and ARGV[q] or ARGV[q] .. '\6\22' .. step
    while limit > 0 do
      local raw = redis.pcall('RPOP', key)
      if type(raw) == 'table' and raw.err then
        table.insert(taken, key); table.insert(taken, '!'); table.insert(taken, raw.err)
        break
      end
      if not raw then break end
      if max_size > 0 and #raw > max_size then bury(key, raw) else remember(key, raw) end
      limit = limit - 1
    end
  end
end
return {gone, others, taken}
"""

# Celery: publish-once: kombu would queue a message sent again twice.
# Queues a message once however often it is sent: the first copy to reach Redis
# sets the marker KEYS[2] (named by its delivery tag), and a copy sent again
# after a lost reply finds it and does nothing. The marker outlives any retry.
_PUBLISH_LUA = r"""
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('LPUSH', KEYS[1], ARGV[1])
end
return 1
"""

# Acks held messages (ARGV: tag, claim, claim, for each), each only while it is held
# under one of its claim's scores (held(); KEYS[3]: the given back); answers {gone,
# others} as the reserve script does.
# (The reserve script acks too; this is the same, alone: a pool process's one round trip
# before an early-ack task starts.)
_ACK_LUA = r"""
local gone, others, restored_key = {}, {}, KEYS[3]
""" + _HELD_LUA + r"""
for i = 1, #ARGV, 3 do
  if held(i) then redis.call('ZREM', KEYS[2], ARGV[i]); redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return {gone, others}
"""

# Parks held messages until their ETA: each (tag, claim, claim, due, entry) in ARGV
# still held under one of our claim's scores moves from unacked to the parked
# ones (KEYS[3] by due time, KEYS[4] its "<length of key>:<list key><envelope>"),
# noted in KEYS[5] as given back (so an ack asked again after a lost answer can't
# take "gone" for "acked").
_PARK_LUA = r"""
for i = 1, #ARGV, 5 do
  local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]) or '-1')
  if score == tonumber(ARGV[i + 1]) or score == tonumber(ARGV[i + 2]) then
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 4])
    redis.call('ZADD', KEYS[3], ARGV[i + 3], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZADD', KEYS[5], score, ARGV[i])  -- given back (to the parked) from this claim
  end
end
redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -100001)
return 1
"""

# Takes lease KEYS[1] for token ARGV[1] (or renews it, if ours) for ARGV[2] ms;
# a time of 0 ms gives it up.
_LEASE_LUA = r"""
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Moves one held message (ARGV[1]) back to list KEYS[3] as ARGV[3], but only if
# its unacked entry is still ARGV[2], and it is held under one of our claim's
# scores (ARGV[4], ARGV[5]; a requeue) or was last renewed before ARGV[6] (a
# restore of an abandoned one): if another worker restored or acked it first, or
# restored it and took it again, nothing happens. (kombu's WATCH/MULTI fails under load.)
# What it gives back it notes in KEYS[4], with the claim it had (see RedisQueues.RESTORED).
# Should KEYS[3] hold something else than a list, or be one of our own keys (ARGV[7]
# is 1), the message goes to the dead letters (KEYS[5], for reason ARGV[8], at time
# ARGV[9]) instead: -1.
_RESTORE_LUA = _DEAD_LETTER_LUA + r"""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
if score ~= tonumber(ARGV[4]) and score ~= tonumber(ARGV[5]) and score > tonumber(ARGV[6]) then return 0 end
local kind = redis.call('TYPE', KEYS[3]).ok
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], score, ARGV[1])  -- given back from the claim `score` (see RESTORED)
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -100001)
if ARGV[7] == '1' or (kind ~= 'list' and kind ~= 'none') then
  dead_letter(KEYS[3], ARGV[3], ARGV[8], ARGV[9])
  return -1
end
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""

# Forgets a held message (ARGV[1]: out of unacked and its index) only if its entry is
# still ARGV[2] ('': none, an index entry left alone). Checked and done in one step: in
# between, another worker may have given it back and taken it again, under a claim
# that must stay.
_FORGET_LUA = r"""
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class RedisQueues(Broker):
    """kombu's Redis transport layout, plus minicelery's dead-letter list: how a task
    travels (publish, take, ack, give back, park). RedisBroker below adds what
    operations need.

    Explain publish: EVALSHA publish script: SET minicelery:sent:{result} NX EX 60, and if
    it was not there LPUSH {queue} <message, delivery tag {result}, {envelope!n} bytes,
    priority {priority}> -- producers push on the left and workers pop on the right, so
    each list is a FIFO queue (kombu's layout); the marker makes a publish sent again
    after a lost reply queue the message once

    Explain watch: BLMOVE {key} {key} RIGHT RIGHT 10, on a connection of its own -- an
    idle worker blocks until the list has a message, and wakes at once; the command puts
    the message back where it was, so a reply lost on the way loses nothing

    Explain ack (reserve, when ack): the reserve script's first part, as the ack script
    below: ZSCORE unacked_index {ack!t} ... -- acks ride with the next take: one round trip

    Explain touch (reserve, when renew): the reserve script's second part: ZSCORE
    unacked_index {renew!t}; where the score is still our claim: ZADD unacked_index <now>
    -- a live worker renews its claims, so a task running past the visibility timeout is
    not given to another worker; a job starts only once this confirmed its claim

    Explain take (reserve, when result[0]): EVALSHA reserve script: RPOP from the lists of
    {queues!t}; HSET unacked {result[0]!t} (delivery tags); ZADD unacked_index <now>
    {result[0]!t} (first, parked messages due soon go back to their lists; one over
    worker_max_message_size goes to the dead letters instead, logged as an error) -- the
    message moves from its list into unacked in one script, so it is always somewhere: if
    this worker dies, any worker gives it back once it has been held
    {self.visibility_timeout} s (the visibility timeout) without a renewal

    Explain ack: EVALSHA ack script: ZSCORE unacked_index {claims!t}; where the score is
    still our claim: ZREM unacked_index, HDEL unacked -- done with for good: acked by the
    pool process just before the task starts (at most once), or by the main process after
    it with task_acks_late (at least once: a worker lost mid-task leaves it to run again);
    only while the claim is ours, so a message that went back to its queue is never acked
    by us

    Explain restore (_restore, when result): HGET unacked {tag}; EVALSHA restore script:
    HDEL unacked {tag}; ZREM unacked_index {tag}; RPUSH <its list> <marked redelivered> --
    back to the consuming end of its list (requeued, or its worker died), but only if no
    other worker restored or took it meanwhile

    Explain park (park, when parked): EVALSHA park script: where the claim is still ours,
    HSET minicelery:eta-messages {parked!t}; ZADD minicelery:eta <due times> {parked!t};
    ZREM unacked_index {parked!t}; HDEL unacked {parked!t} -- their ETA is far: parked in
    Redis instead of held in the worker's memory (Celery holds them), and moved back to
    their lists by a take shortly before they are due

    Explain dead_letter: LPUSH minicelery:dead-letters <the message from {queue}, and
    why>; LTRIM minicelery:dead-letters 0 9999 -- a message no worker can run is kept for
    a human to look at, not dropped
    """

    UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
    DEAD_LETTERS = "minicelery:dead-letters"
    ETA, ETA_MESSAGES = "minicelery:eta", "minicelery:eta-messages"
    REVOKED = "minicelery:revoked"
    #: the newest 100,000 messages given back, scored by the claim they had: whether a message
    #: gone went back to its queue (not ours: an ack asked again learns it) or was acked
    RESTORED = "minicelery:restored"
    #: seconds a publish marker lives: longer than any retried publish takes
    SENT_MARKER_TTL = 60
    def __init__(self, app, url):
        super().__init__(app, url)
        self.connection_errors = _redis_transient_errors()
        self.client = redis_client(url)
        self._producer = HeldPerThread(self.client)
        #: the consumer's loop (reserve, ack) runs its commands on a connection of its own
        self.held = HeldConnection(self.client)
        self._watch = QueueWatch(self)
        self._restore_script = self.client.register_script(_RESTORE_LUA)
        self._park_script = self.client.register_script(_PARK_LUA)
        self._forget_script = self.client.register_script(_FORGET_LUA)
        self._declared, self._rotation = set(), 0

    def publish(self, queue, envelope, priority=0, tag=None):
        key, tag = _queue_key(queue, priority), tag or uuid()
        if _is_own_key(key):
            raise ValueError(f"{_short_repr(queue, 80)} is a key minicelery or kombu keeps for itself, not a queue")
        self._producer.connection.script(_PUBLISH_LUA, [key, f"minicelery:sent:{tag}"],
                                         [envelope, self.SENT_MARKER_TTL])
        return tag

    def _declare(self, queues):
        """Write kombu's binding entries once, so named-exchange producers find our queues."""
        with self.client.pipeline() as pipe:  # (nothing new: no commands, no round trip)
            for queue in set(queues) - self._declared:
                member = f"{queue}{PRIORITY_SEPARATOR}{PRIORITY_SEPARATOR}{queue}"
                pipe.sadd(f"_kombu.binding.{queue}", member)
                pipe.sadd(f"_kombu.binding_permanent.{queue}", member)
            pipe.execute()
        self._declared.update(queues)

    def reserve(self, queues, limit, ack=None, renew=None, now=None):
        now, ack, renew, queues = now or time.time(), ack or {}, renew or {}, list(queues) if limit > 0 else []
        if queues:
            self._declare(queues)
            # Round-robin over queues within each priority step, as kombu does.
            self._rotation = (self._rotation + 1) % len(queues)
            queues = queues[self._rotation:] + queues[:self._rotation]
        gone, others, found = self.held.script(_RESERVE_LUA, *self._reserve_args(now, limit, ack, renew, queues))
        deliveries = self._deliveries(found, now)
        return deliveries, {tag.decode() for tag in gone}, {tag.decode() for tag in others}

    def _reserve_args(self, now, limit, ack, renew, queues) -> tuple:
        """(keys, arguments) of the reserve script."""
        keys = [self.UNACKED, self.UNACKED_INDEX, self.ETA, self.ETA_MESSAGES, self.DEAD_LETTERS, self.RESTORED]
        return keys, [now, limit, _envelope_limit(self.app.conf.worker_max_message_size), len(ack), len(renew),
                      len(queues), now + self.ETA_MOVE_AHEAD, *_claim_args(ack), *_claim_args(renew), *queues]

    def ack(self, claims):
        gone, others = self.held.script(_ACK_LUA, [self.UNACKED, self.UNACKED_INDEX, self.RESTORED], _claim_args(claims))
        return {tag.decode() for tag in gone}, {tag.decode() for tag in others}

    def _deliveries(self, found, now) -> list:
        """The reserve script's takes as Delivery tuples (what it buried, and broken keys: logged)."""
        deliveries, not_lists = [], set()
        for i in range(0, len(found), 3):
            key, tag = found[i].decode(), found[i + 1].decode()
            queue = _queue_of_key(key)
            if tag == "!":  # a queue's key holds something else than a list: said once
                if key not in self._watch.not_lists:
                    logger.error("Queue %r is skipped while its key %r is not a list (%s)",
                                 queue, key, found[i + 2].decode())
                not_lists.add(key)
            elif tag:
                deliveries.append(Delivery(queue, tag, found[i + 2], now))
            else:  # buried by the script: too big to hand out
                logger.error("A message of %s bytes in queue %r is over worker_max_message_size: "
                             "kept (cut) in the dead letters", found[i + 2].decode(), queue)
        # A take that found nothing looked at every list: what it found broken is all there is.
        self._watch.not_lists = not_lists if not deliveries else self._watch.not_lists | not_lists
        return deliveries

    def wait(self, queues, timeout, also=(), writable=()):
        """Watch each list of `queues` (see QueueWatch); without queues, the lists watched stay
        as they are, unwatched."""
        if queues:
            self._declare(queues)
        return self._watch.wait([key for queue in queues for key in _queue_keys(queue)], timeout, also, writable)

    def requeue(self, claims):
        for tag, claim in claims.items():
            self._restore(tag, claim)

    def restore_claimed(self, claim, keep=()):
        for tag in self.client.zrangebyscore(self.UNACKED_INDEX, claim, claim):
            if tag.decode(errors="replace") not in keep:  # (a tag is any bytes kombu or an old version left)
                self._restore(tag, (claim,))

    def restore_unacked(self, now=None):
        deadline = (now or time.time()) - self.visibility_timeout
        stale = self.client.zrangebyscore(self.UNACKED_INDEX, "-inf", deadline, start=0, num=1000)
        return sum(self._restore(tag, stale_before=deadline) for tag in stale)

    def _restore(self, tag, claim=(-1,), stale_before=-1) -> int:
        """Put one held message back at the consuming end of its list, marked redelivered, if
        it is held under `claim` or was last renewed before `stale_before`; 1 if it was."""
        entry = self.client.hget(self.UNACKED, tag)
        if entry is None:  # acked or given back already: an index entry left alone goes
            self._forget_script(keys=[self.UNACKED, self.UNACKED_INDEX], args=[tag, b""])
            return 0
        try:
            raw, exchange, routing_key = json.loads(entry)
        except (ValueError, TypeError):
            # cjson kept bytes that aren't UTF-8: nothing can read this message.
            self.dead_letter(entry, "unreadable entry in unacked")
            self._forget_script(keys=[self.UNACKED, self.UNACKED_INDEX], args=[tag, entry])
            return 0
        queue, priority = routing_key, 0
        # Marked redelivered where we can; a message we can't edit is restored as it was.
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            envelope = raw if isinstance(raw, dict) else json.loads(raw)
            properties = envelope["properties"]
            priority = properties.get("priority", 0)
            properties.setdefault("delivery_info", {})["redelivered"] = True
            envelope["headers"]["redelivered"] = True
            raw = json.dumps(envelope)
        if not isinstance(raw, (str, bytes)):
            raw = json.dumps(raw)
        if exchange:
            queue = self._route_by_binding(exchange, routing_key) or queue
        key = _queue_key(queue, priority)
        ours = _is_own_key(key)  # (its routing key may name any key)
        reason = f"can't go back to its queue: the key {printable(key)} is not a list, or is one of ours"
        restored = self._restore_script(keys=[self.UNACKED, self.UNACKED_INDEX, key, self.RESTORED, self.DEAD_LETTERS],
                                        args=[tag, entry, raw, claim[0], claim[-1], stale_before, int(ours), reason,
                                              time.time()])
        if restored == -1:
            logger.error("A message (%r) %s: kept in the dead letters", tag, reason)
        return max(restored, 0)

    def park(self, parked):
        args = []
        for delivery, claim, priority, due in parked:
            key = _queue_key(delivery.queue, priority).encode()
            raw = delivery.raw if isinstance(delivery.raw, bytes) else delivery.raw.encode()
            # Length-prefixed: a queue name (or an envelope) may hold any byte.
            args += [delivery.tag, claim[0], claim[-1], due, b"%d:%s%s" % (len(key), key, raw)]
        if args:
            self._park_script(keys=[self.UNACKED, self.UNACKED_INDEX, self.ETA, self.ETA_MESSAGES, self.RESTORED],
                              args=args)

    def dead_letter(self, raw, reason, queue=""):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raw = {"base64": base64.b64encode(raw).decode()}
        entry = json.dumps({"reason": reason, "queue": queue, "time": time.time(), "raw": raw})
        with self.client.pipeline() as pipe:
            pipe.lpush(self.DEAD_LETTERS, entry)
            pipe.ltrim(self.DEAD_LETTERS, 0, self.DEAD_LETTER_LIMIT - 1)
            pipe.expire(self.DEAD_LETTERS, self.app.conf.result_expires_seconds or 86400)
            pipe.execute()

    def _route_by_binding(self, exchange, routing_key):
        for member in self.client.smembers(f"_kombu.binding.{exchange}"):
            parts = member.decode("utf-8", "replace").split(PRIORITY_SEPARATOR)
            if len(parts) == 3 and parts[0] == routing_key:  # (anything else in the set is not a binding)
                return parts[2]
        return None


class RedisBroker(RedisQueues):
    """The Redis broker: RedisQueues, plus what operations need and no task's journey
    does: revocations, remote control and events (Celery's pidbox and celeryev on
    pub/sub), the beat's lease, queue sizes, dead letters and parked messages to look at.

    Explain revoke: ZADD minicelery:revoked <expiry> {task_ids!t} -- kept for workers that
    start later; the broadcast (unless broadcast=False) tells those running now

    Explain broadcast: PUBLISH {self.pidbox} <{body[method]}> -- Celery's remote control:
    every worker listens on this channel

    Explain lease: EVALSHA lease script: SET minicelery:lease:{name} <token> PX <{ttl} s>,
    if free or ours -- one beat sends the periodic tasks; a standby takes over once the
    lease expires
    """

    def __init__(self, app, url):
        super().__init__(app, url)
        self._lease_script = self.client.register_script(_LEASE_LUA)
        self._pubsub = self._events = None
        db = self.client.connection_pool.connection_kwargs.get("db", 0)
        #: Celery's broadcast channel for remote control, per database
        self.pidbox = f"/{db}.celery.pidbox"

    def revoke(self, task_ids, terminate=False, signal="SIGTERM", expires=10800, broadcast=True):
        now = time.time()
        with self.client.pipeline() as pipe:
            pipe.zadd(self.REVOKED, {task_id: now + expires for task_id in task_ids})
            pipe.zremrangebyscore(self.REVOKED, "-inf", now)
            pipe.zremrangebyrank(self.REVOKED, 0, -self.REVOKES_MAX - 1)  # a flood keeps the newest
            pipe.expire(self.REVOKED, int(expires) + 1)  # the newest entry expires last
            pipe.execute()
        if broadcast:
            for body in _revoke_bodies(task_ids, terminate, signal):
                self.broadcast(body)

    def broadcast(self, body):
        self.client.publish(self.pidbox, control_envelope(body, {"clock": 1, "expires": time.time() + 1.0},
                                                          "celery.pidbox"))

    def send_event(self, event):
        routing_key, envelope = event_envelope(event)
        self.client.publish(f"{self.pidbox.split('.')[0]}.celeryev/{routing_key}", envelope)

    def events(self, timeout):
        if self._events is None:
            self._events = self._subscribed(pattern=f"{self.pidbox.split('.')[0]}.celeryev/*")
        found, deadline = [], time.monotonic() + timeout
        try:
            while len(found) < self.EVENTS_AT_ONCE and (message := next_pubsub_message(
                    self._events, max(deadline - time.monotonic(), 0))) is not None:
                found += _parse_events(message["data"])
                deadline = 0  # then only what is there already
        except self.connection_errors:
            self._events.close()
            self._events = None  # the next call listens again
            if not found:
                raise
        return found

    def _subscribed(self, channel=None, pattern=None):
        """A pub/sub connection that listens: one whose subscription failed is closed, not
        kept (it would be read as a quiet channel for ever)."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.psubscribe(pattern) if pattern else pubsub.subscribe(channel)
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    def reply(self, reply_to, ticket, body):
        # Straight to the list kombu's clients wait on, `<oid>.reply.celery.pidbox`: the binding
        # they add says the same, and a set other clients fill (and leak) need not be read.
        oid = reply_to["routing_key"]
        queue = f"{oid}.{REPLY_EXCHANGE}"
        with self.client.pipeline() as pipe:
            pipe.lpush(queue, control_envelope(body, {"ticket": ticket, "clock": 1}, REPLY_EXCHANGE, oid, 1))
            pipe.expire(queue, 60)  # a client that died waiting leaves nothing behind for long
            pipe.execute()

    def ask(self, body, timeout, limit=None):
        oid, ticket = uuid(), uuid()
        queue, binding = f"{oid}.{REPLY_EXCHANGE}", f"_kombu.binding.{REPLY_EXCHANGE}"
        member = PRIORITY_SEPARATOR.join([oid, "", queue])
        self.client.sadd(binding, member)  # before asking: a worker routes its answer by this binding
        try:
            self.broadcast(dict(body, ticket=ticket, reply_to={"exchange": REPLY_EXCHANGE, "routing_key": oid}))
            answers, deadline = [], time.monotonic() + timeout
            while (limit is None or len(answers) < limit) and (left := deadline - time.monotonic()) > 0:
                popped = self.client.brpop([queue], timeout=min(max(left, 0.01), 1.0))
                answer = _parse_reply(popped[1], ticket) if popped else None
                answers += [answer] if answer else []
            return answers
        finally:
            with self.client.pipeline() as pipe:
                pipe.srem(binding, member)
                pipe.delete(queue)
                pipe.execute()

    def revoked(self):
        now = time.time()
        with self.client.pipeline() as pipe:
            pipe.zremrangebyscore(self.REVOKED, "-inf", now)
            pipe.zrangebyscore(self.REVOKED, now, "+inf")
            return {i.decode(errors="replace") for i in pipe.execute()[1] if len(i) <= MAX_TASK_ID}

    def control_messages(self):
        if self._pubsub is None:
            self._pubsub = self._subscribed(channel=self.pidbox)
        commands = []
        while (message := next_pubsub_message(self._pubsub, 0)) is not None:
            commands.append(_parse_control(message["data"]))
        return [command for command in commands if command is not None]  # None: not a revoke, or malformed

    def control_handles(self):
        connection = self._pubsub.connection if self._pubsub is not None else None
        return [connection._sock] if connection is not None and connection._sock is not None else []

    def lease(self, name, token, ttl):
        return bool(self._lease_script(keys=[f"minicelery:lease:{name}"], args=[token, int(ttl * 1000)]))

    def purge(self, queue):
        keys = _queue_keys(queue)
        with self.client.pipeline() as pipe:
            for key in keys:
                pipe.llen(key)
            pipe.delete(*keys)
            return sum(pipe.execute()[:-1])

    def size(self, queue):
        with self.client.pipeline(transaction=False) as pipe:
            for key in _queue_keys(queue):
                pipe.llen(key)
            return sum(pipe.execute())

    def parked(self, queues, limit):
        tags = self.client.zrange(self.ETA, 0, limit - 1)
        with self.client.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.hstrlen(self.ETA_MESSAGES, tag)
            small = [tag for tag, size in zip(tags, pipe.execute()) if size <= self.PARKED_READ_MAX]
        entries = [entry for entry in (self.client.hmget(self.ETA_MESSAGES, small) if small else []) if entry]
        found = []
        for entry in entries:  # "<length of key>:<queue list key><envelope>", as park() wrote it
            length, _, rest = entry.partition(b":")
            if length.isdigit():
                queue = _queue_of_key(rest[:int(length)].decode("utf-8", "replace"))
                found += [(queue, rest[int(length):])] if queue in queues else []
        return found

    def dead_letters(self):
        # A list entry has no id of its own: its digest names it, and LREM takes it by content.
        return [_dead_letter_from(entry, _digest(entry)) for entry in self.client.lrange(self.DEAD_LETTERS, 0, -1)]

    def take_dead_letters(self, ids):
        return [_dead_letter_from(entry, _digest(entry)) for entry in self.client.lrange(self.DEAD_LETTERS, 0, -1)
                if _digest(entry) in ids and self.client.lrem(self.DEAD_LETTERS, 1, entry)]

    def close(self):
        if self._pubsub is not None:
            self._pubsub.close()
        for watcher in [self.held, self._producer.connection, *self._watch.watchers.values()]:
            watcher.close()
        self.client.close()

    def forget_connections(self):
        for watcher in [self.held, self._producer.connection, *self._watch.watchers.values()]:
            watcher.close()  # (each connects again when next used)
        self.client.connection_pool.disconnect(inuse_connections=False)
        if self._pubsub is not None and self._pubsub.connection is not None:
            self._pubsub.connection.disconnect()  # (it connects again, and subscribes, when next read)


#: a control broadcast larger than this is not read: revoke needs a few ids
CONTROL_MESSAGE_LIMIT = 1024 * 1024
#: a reply larger than this is not read (`inspect revoked` of 50,000 uuids takes 3 MB): its
#: worker answers an error instead, so that a live worker never looks dead
CONTROL_REPLY_LIMIT = 16 * 1024 * 1024


#: a remote-control command as Celery's pidbox carries it (`celery inspect`, app.control)
ControlCommand = namedtuple("ControlCommand", "method arguments destination reply_to ticket")
#: where Celery's clients wait for replies: a list per client, bound in this exchange
REPLY_EXCHANGE = "reply.celery.pidbox"


def control_envelope(body: dict, headers: dict, exchange: str, routing_key="", delivery_mode=2) -> str:
    """The envelope kombu sends for a pidbox broadcast (to every worker) or a reply (to one client)."""
    return json.dumps({
        "body": base64.b64encode(json.dumps(body, default=_json_default).encode()).decode(),
        "content-encoding": "utf-8", "content-type": JSON_TYPE, "headers": headers,
        "properties": {"delivery_mode": delivery_mode, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": exchange, "routing_key": routing_key}, "delivery_tag": uuid()}})


def make_event(kind, hostname, **fields) -> dict:
    """An event in Celery's form, as Flower and `celery events` read it."""
    offset = (time.altzone if time.daylight else time.timezone) / 3600  # Celery's: hours west of UTC
    return {"hostname": hostname, "utcoffset": offset, "pid": os.getpid(), "clock": 0,
            "timestamp": time.time(), "type": kind, **fields}


def event_envelope(event: dict) -> tuple:
    """(routing key, envelope) of an event: task events go as a list on task.multi, as Celery's do."""
    task_event = event["type"].startswith("task-")
    routing_key = "task.multi" if task_event else event["type"].replace("-", ".")
    body = [event] if task_event else event
    return routing_key, control_envelope(body, {"hostname": event["hostname"]}, "celeryev", routing_key, 1)


def _control_body(raw, limit=CONTROL_MESSAGE_LIMIT) -> tuple:
    """(body, headers) of a pidbox envelope; its size is bounded before it is parsed."""
    if len(raw) > limit:
        raise ValueError(f"{len(raw)} bytes, over {limit}")
    envelope = json.loads(raw)
    body = json.loads(base64.b64decode(envelope["body"]))
    if not isinstance(body, dict) or not isinstance(envelope.get("headers") or {}, dict):
        raise TypeError("the body and headers must be objects")
    return body, envelope.get("headers") or {}


def _parse_events(raw) -> list:
    """The events in an event envelope (task.multi carries a list); a malformed one is logged."""
    try:
        if len(raw) > CONTROL_MESSAGE_LIMIT:
            raise ValueError(f"{len(raw)} bytes, over {CONTROL_MESSAGE_LIMIT}")
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        events = body if isinstance(body, list) else [body]
        return [event for event in events if isinstance(event, dict) and isinstance(event.get("type"), str)
                and isinstance(event.get("hostname"), str) and _is_number(event.get("timestamp"))]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        logger.error("Event error: %s", _short_repr(exc, 200))
        return []


def _dead_letter_from(entry: bytes, letter_id) -> dict:
    """A stored dead letter as {id, time, queue, reason, raw}, whatever the entry holds."""
    try:
        letter = json.loads(entry.decode("utf-8", "replace"))
    except ValueError:
        letter = None
    if not isinstance(letter, dict):
        letter = {"reason": "(an entry that is not a dead letter)", "raw": entry.decode("utf-8", "replace")}
    raw = letter.get("raw")
    return {"id": letter_id, "time": letter["time"] if _is_number(letter.get("time")) else 0.0,
            "queue": letter["queue"] if isinstance(letter.get("queue"), str) else "",
            "reason": str(letter.get("reason")), "raw": raw if isinstance(raw, str) else json.dumps(raw)}


def _digest(data: bytes) -> str:
    import hashlib
    return hashlib.sha1(data).hexdigest()[:12]


def _parse_control(raw):
    """A Celery pidbox broadcast as a ControlCommand, or None for a malformed one,
    logged as Celery does: "Control command error"."""
    # Celery's broadcasts expire after a second; we may read one later than that
    # (blocked in BRPOP), and a late revoke is still right, so expiry is ignored.
    try:
        body, _ = _control_body(raw)
        _check_fields("control", body, {"method": str, "arguments": dict, "destination": (list, tuple),
                                        "reply_to": dict, "ticket": str})
        destination, reply_to = body.get("destination"), body.get("reply_to")
        if not isinstance(body.get("method"), str) or not all(isinstance(d, str) for d in destination or ()):
            raise TypeError("a command needs a method name; its destination is a list of node names")
        if reply_to is not None and not isinstance(reply_to.get("routing_key"), str):
            raise TypeError("reply_to needs a routing_key")
        return ControlCommand(body["method"], body.get("arguments") or {}, destination, reply_to, body.get("ticket"))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, DecodeError) as exc:
        logger.error("Control command error: %s in %s", _short_repr(exc, 200), _short_repr(raw, 200))
        return None


def _parse_reply(raw, ticket):
    """A reply's body ({node name: answer}) if it answers `ticket`, else None."""
    try:
        body, headers = _control_body(raw, CONTROL_REPLY_LIMIT)
        return body if headers.get("ticket") == ticket else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, DecodeError) as exc:
        logger.error("Control reply error: %s", _short_repr(exc, 200))
        return None


#: the longest task id a revocation may name (a uuid has 36 characters): every worker keeps them
MAX_TASK_ID = 255


def _revoke_body(task_ids, terminate, signal, destination=None):
    return {"method": "revoke", "arguments": {"task_id": task_ids[0] if len(task_ids) == 1 else task_ids,
                                              "terminate": terminate, "signal": signal},
            "destination": destination, "pattern": None, "matcher": None}


#: the most a broadcast's body may take: base64 makes 4 bytes of 3, and the envelope adds the rest
CONTROL_BODY_LIMIT = (CONTROL_MESSAGE_LIMIT - 4096) * 3 // 4


def _revoke_bodies(task_ids, terminate, signal):
    """The revoke broadcasts for `task_ids`: as many as it takes for each to stay within
    the size every worker reads (20,000 ids need two)."""
    batch, size = [], 0
    for task_id in task_ids:
        cost = len(json.dumps(task_id)) + 2
        if batch and size + cost > CONTROL_BODY_LIMIT - 1024:
            yield _revoke_body(batch, terminate, signal)
            batch, size = [], 0
        batch.append(task_id)
        size += cost
    if batch:
        yield _revoke_body(batch, terminate, signal)


def revoke_command(task_ids, terminate=False, signum=None, destination=None):
    """(task ids, terminate, signal number, destination) from a revoke's arguments,
    checked: a ValueError or TypeError names what is wrong."""
    ids = [task_ids] if isinstance(task_ids, str) else task_ids
    if not isinstance(ids, (list, tuple, set, frozenset)) or not all(isinstance(i, str) for i in ids):
        raise TypeError(f"task_id must be an id or a list of ids, not {_short_repr(task_ids, 80)}")
    if any(len(task_id) > MAX_TASK_ID for task_id in ids):
        raise ValueError(f"a task id is at most {MAX_TASK_ID} characters, not {max(map(len, ids))}")
    if destination is not None and not (isinstance(destination, (list, tuple))
                                        and all(isinstance(d, str) for d in destination)):
        raise TypeError(f"destination must be a list of node names, not {_short_repr(destination, 80)}")
    return list(ids), bool(terminate), signal_number(signum or "SIGTERM"), destination


# -- SQLite and memory ----------------------------------------------------------
# The same broker (and, in §6, backend) on one SQLite database: a file shared by
# several processes (WAL mode, a busy timeout, write transactions that take the
# lock up front), or `memory://`, one in-memory database per process for tests
# and notebooks. A message is a row; reserving it stamps `reserved_at`, acking
# deletes it, and a row reserved longer ago than the visibility timeout is
# visible again. A parked ETA row just gets a later `due`.

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, step INTEGER NOT NULL,
    seq REAL NOT NULL, due REAL NOT NULL DEFAULT 0, reserved_at REAL, raw BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS messages_waiting ON messages (queue, reserved_at, step, seq);
CREATE INDEX IF NOT EXISTS messages_reserved ON messages (reserved_at);
CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, meta BLOB NOT NULL, expires REAL);
CREATE TABLE IF NOT EXISTS revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, expires REAL NOT NULL,
    terminate INTEGER NOT NULL, signal TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL, queue TEXT, reason TEXT, raw BLOB);
CREATE TABLE IF NOT EXISTS chords (group_id TEXT PRIMARY KEY, size INTEGER, done INTEGER);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, token TEXT, expires REAL);
CREATE TABLE IF NOT EXISTS broadcasts (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL, raw TEXT);
CREATE INDEX IF NOT EXISTS broadcasts_time ON broadcasts (time);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL, raw TEXT);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS replies (id INTEGER PRIMARY KEY AUTOINCREMENT, ticket TEXT, time REAL, raw TEXT);
CREATE INDEX IF NOT EXISTS replies_ticket ON replies (ticket);
CREATE INDEX IF NOT EXISTS replies_time ON replies (time);
CREATE TABLE IF NOT EXISTS chord_parts (
    group_id TEXT, task_id TEXT, idx REAL, part TEXT, PRIMARY KEY (group_id, task_id));
"""


def sqlite_path(url) -> str:
    """The file a sqlite:// URL names: sqlite:///relative.db, sqlite:////absolute.db."""
    rest = url.split("://", 1)[1]
    if (rest and not rest.startswith("/")) or "?" in rest:  # (sqlite://tasks.db used the file asks.db)
        raise ImproperlyConfigured(f"{_safe_url(url)}: a SQLite URL names a file, and nothing else: "
                                   f"sqlite:///relative.db or sqlite:////absolute.db")
    return rest[1:] or "minicelery.db"


class SQLiteStore:
    """One SQLite database, shared by the threads of a process and by processes.

    Writes go through one connection under a lock; reads use a second one (WAL
    lets reads go on beside a write), so a write waiting for another process's
    lock never holds up a get(). Writers wake waiting readers of this process
    at once; other processes' writes are noticed by polling the cheap `PRAGMA
    data_version` every POLL seconds. Before each use we check (one stat) that
    the file is still the one at our path: one deleted or replaced under us is
    opened again by its name, as the producers that made the new one did.
    """

    #: seconds between checks for other processes' writes while waiting
    POLL = 0.01
    #: seconds a write waits for another process's lock before giving up (OperationalError)
    LOCK_TIMEOUT = 30.0
    _open = {}  # (pid, url) -> store: one per database per process

    @classmethod
    def for_url(cls, url):
        key = (os.getpid(), url)
        if key not in cls._open:
            cls._open[key] = cls(url)
        return cls._open[key]

    def __init__(self, url):
        self.memory = url.startswith("memory://")
        self.path = ":memory:" if self.memory else sqlite_path(url)
        self.lock = threading.RLock()  # the writing connection's
        # memory:// is one database per connection, so it reads through the writer.
        self.read_lock = self.lock if self.memory else threading.Lock()
        self._changed = threading.Condition()  # notified after every write here
        self._writes = 0
        self._connect()

    def _connect(self):
        import sqlite3
        self.errors = sqlite3.OperationalError

        def connect(timeout=1.0):
            return sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        # Several processes may open a new file at once: setting it up waits for the lock.
        self.conn = connect(self.LOCK_TIMEOUT)
        if not self.memory:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SQLITE_SCHEMA)  # IF NOT EXISTS: safe from every process
        self.conn.execute("PRAGMA busy_timeout = 1000")  # from now on _begin() waits, lock free
        self.generation = getattr(self, "generation", 0) + 1  # which file we opened, 1 first
        self.reader = self.conn if self.memory else connect()
        self._file = self._identity()

    def _identity(self):
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            return info.st_dev, info.st_ino
        return None  # deleted

    def _check_file(self):
        """Reopen the database if its file was deleted or replaced since we opened it."""
        if not self.memory and self._identity() != self._file:
            with self.lock, self.read_lock:
                logger.warning("the database file %s was deleted or replaced; opening it again", self.path)
                self.conn.close()
                self.reader.close()
                self._connect()

    @contextlib.contextmanager
    def transaction(self):
        """A write transaction holding the database lock; waits up to LOCK_TIMEOUT for it."""
        self._check_file()
        with self.lock:
            self._begin()
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # a COMMIT that failed (disk full) rolled back already
                    with contextlib.suppress(self.errors):
                        self.conn.execute("ROLLBACK")
                raise
        with self._changed:
            self._writes += 1
            self._changed.notify_all()

    def _begin(self):
        deadline, pause = time.monotonic() + self.LOCK_TIMEOUT, 0.01
        while True:
            try:
                return self.conn.execute("BEGIN IMMEDIATE")
            except self.errors as exc:  # locked past the busy timeout: keep trying, until the deadline
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def read(self, sql, params=()):
        self._check_file()
        with self.read_lock:
            return self.reader.execute(sql, params).fetchall()

    def wait_for_change(self, timeout, also=(), writable=(), until=None) -> list:
        """Sleep until the database may have changed (and `until()`, if given, is true), or
        `timeout` seconds pass, or a handle of `also` turns readable (of `writable`,
        writable); returns the ready handles. Other processes' writes are noticed within
        POLL seconds; this process's wake the wait at once."""
        deadline = time.monotonic() + timeout
        writes, version = self._writes, self._data_version()
        while (left := deadline - time.monotonic()) > 0:
            if also or writable:
                ready = wait_readable(also, min(self.POLL, left), writable)
                if ready:
                    return ready
            elif signal_came():
                return []
            else:
                with self._changed:
                    self._changed.wait(min(self.POLL, left))
            if self._writes != writes or self._data_version() != version:
                if until is None or until():
                    return []
                writes, version = self._writes, self._data_version()
        return []

    def _data_version(self):
        return None if self.memory else self.read("PRAGMA data_version")[0][0]


class SQLiteBroker(Broker):
    """The broker on SQLite: `sqlite:///relative.db`, `sqlite:////absolute.db`, `memory://`.

    Explain publish: INSERT INTO messages (queue, step, seq, raw) VALUES ('{queue}', <the
    step of priority {priority}>, <now>, <{envelope!n} bytes>); COMMIT -- a row per
    message, taken by priority step, then oldest first; committed before delay()
    returns, so it outlives any process

    Explain ack (reserve, when ack): DELETE FROM messages WHERE id = <each of {ack!t}>,
    each only while reserved_at is still our claim -- done with for good: acked before
    the task runs (at most once), or after it with task_acks_late (at least once: a
    worker lost mid-task leaves it to run again)

    Explain touch (reserve, when renew): UPDATE messages SET reserved_at = <now> WHERE id
    = <each of {renew!t}> AND reserved_at = <the claim this worker wrote> -- a live worker
    renews its claims, so a task running past the visibility timeout is not given to
    another worker

    Explain take (reserve, when result[0]): BEGIN IMMEDIATE; SELECT id, queue, raw FROM
    messages WHERE queue IN (...) AND reserved_at IS NULL AND due <= <now> ORDER BY step,
    seq LIMIT {limit}; UPDATE messages SET reserved_at = <now> WHERE id = <each of
    {result[0]!t}>; COMMIT (a message over worker_max_message_size goes to the dead
    letters instead, logged as an error) -- the row stays, marked as held, so the message
    is always somewhere: if this worker dies, any worker frees it once it has been held
    {self.visibility_timeout} s (the visibility timeout) without a touch

    Explain requeue (requeue, when claims): UPDATE messages SET reserved_at = NULL, seq =
    (SELECT MIN(seq) FROM messages) - 1 WHERE id = <each of {claims!t}> AND reserved_at =
    <our claim> -- back to its queue, first in line

    Explain restore (restore_unacked, when result): UPDATE messages SET reserved_at = NULL
    WHERE reserved_at < <now - {self.visibility_timeout} s>: {result} message(s) -- held
    past the visibility timeout: their worker died

    Explain park (park, when parked): UPDATE messages SET reserved_at = NULL, due = <ETA -
    2 s> WHERE id = <each of {parked!t}> AND reserved_at = <our claim> -- their ETA is
    far: left in the table instead of held in the worker's memory (Celery holds them); a
    take picks them up when due

    Explain revoke: INSERT INTO revocations (task_id, expires, ...) VALUES <{task_ids!t}>
    -- kept for workers that start later; the broadcast (unless broadcast=False) tells
    those running now

    Explain broadcast: INSERT INTO broadcasts (time, raw) VALUES (<now>,
    <{body[method]}>) -- Celery's remote control: each worker reads the rows added since
    it last looked

    Explain dead_letter: INSERT INTO dead_letters (time, queue, reason, raw) VALUES
    (<now>, '{queue}', <why>, <the message>) -- a message no worker can run is kept for a
    human, not dropped

    Explain lease: INSERT INTO leases ... ON CONFLICT(name) DO UPDATE ... WHERE ours or
    expired: {name} for {ttl} s -- one beat sends the periodic tasks; a standby takes
    over once the lease expires
    """

    def __init__(self, app, url):
        super().__init__(app, url)
        import sqlite3
        # A locked, full, vanished or unreadable database: log, wait and retry.
        self.connection_errors = (sqlite3.DatabaseError,)
        self.store = SQLiteStore.for_url(url)
        self._last_control = self._last_event = None

    def publish(self, queue, envelope, priority=0, tag=None):
        step = clamp_priority(priority) // 3  # 0-2, 3-5, 6-8 and 9: Redis's lists, in order
        with self.store.transaction() as db:
            db.execute("INSERT INTO messages (queue, step, seq, raw) VALUES (?, ?, ?, ?)",
                       (queue, step, time.time(), envelope.encode() if isinstance(envelope, str) else envelope))

    def reserve(self, queues, limit, ack=None, renew=None, now=None):
        now, ack, renew = now or time.time(), ack or {}, renew or {}
        with self.store.transaction() as db:
            gone, others = self._not_ours(db, {**ack, **renew})
            db.executemany("DELETE FROM messages WHERE id = ?",
                           [(self._row(tag),) for tag in ack if tag not in gone | others])
            db.executemany("UPDATE messages SET reserved_at = ? WHERE id = ?",
                           [(now, self._row(tag)) for tag in renew if tag not in gone | others])
            rows, buried = self._take(db, queues, limit, now) if limit > 0 else ([], [])
        for size, queue in buried:  # logged once it is true: committed
            logger.error("A message of %s bytes in queue %r is over worker_max_message_size: "
                         "kept (cut) in the dead letters", size, queue)
        return [Delivery(queue, self._tag(row_id), raw, now) for row_id, queue, _, raw in rows], gone, others

    def _not_ours(self, db, claims) -> tuple:
        """(gone, others): the tags of `claims` ({tag: claim}) whose row is deleted, and those
        whose row is not held under one of the claim's scores (back in its queue, held by
        another worker, or an unrelated row of a file since replaced)."""
        gone, others = set(), set()
        for tag, claim in claims.items():
            row = db.execute("SELECT reserved_at FROM messages WHERE id = ?", (self._row(tag),)).fetchone()
            if row is None:
                gone.add(tag)
            elif row[0] not in claim:
                others.add(tag)
        return gone, others

    def _take(self, db, queues, limit, now) -> tuple:
        """(rows taken, (size, queue) of those too big to hand out, buried instead)."""
        too_big = _envelope_limit(self.app.conf.worker_max_message_size) or -1
        # A row too big to hand out is not even read whole: it goes to the dead letters, cut.
        rows = db.execute(
            "SELECT id, queue, CASE WHEN ? > 0 AND length(raw) > ? THEN length(raw) END, "
            f"CASE WHEN ? > 0 AND length(raw) > ? THEN NULL ELSE raw END "
            f"FROM messages WHERE queue IN ({','.join('?' * len(queues))}) "
            "AND reserved_at IS NULL AND due <= ? ORDER BY step, seq LIMIT ?",
            (too_big, too_big, too_big, too_big, *queues, now, limit)).fetchall()
        buried = [(size, queue) for _, queue, size, _ in rows if size is not None]
        for row_id, queue, size, _ in (row for row in rows if row[2] is not None):
            with db.blobopen("messages", "raw", row_id, readonly=True) as blob:
                head = blob.read(65536)  # without loading the rest
            self._bury(db, head, f"a message of {size} bytes, over "
                       "worker_max_message_size (cut to 64 KiB here)", queue)
            db.execute("DELETE FROM messages WHERE id = ?", (row_id,))  # (an UPDATE would load it)
        rows = [row for row in rows if row[2] is None]
        db.executemany("UPDATE messages SET reserved_at = ? WHERE id = ?", [(now, r[0]) for r in rows])
        return rows, buried

    def wait(self, queues, timeout, also=(), writable=()):
        if not queues:
            return wait_readable(also, timeout, writable)
        waiting = (f"SELECT 1 FROM messages WHERE queue IN ({','.join('?' * len(queues))}) "
                   "AND reserved_at IS NULL AND due <= ? LIMIT 1")
        return self.store.wait_for_change(timeout, also, writable,
                                          lambda: self.store.read(waiting, (*queues, time.time())))

    def _tag(self, row_id) -> str:
        # Row ids start again in a new file: tags carry which file we had open.
        generation = self.store.generation
        return str(row_id) if generation == 1 else f"{generation}.{row_id}"

    @staticmethod
    def _row(tag) -> int:
        return int(tag.rpartition(".")[2])

    def _update_held(self, sql, params, claims) -> int:
        """Run `sql` (its WHERE names the row id and two claim scores last) on each held row
        of `params` ({tag: the row's own parameters}) still held under its claim."""
        with self.store.transaction() as db:
            return sum(db.execute(sql, (*params[tag], self._row(tag), claims[tag][0], claims[tag][-1])).rowcount
                       for tag in params)

    def requeue(self, claims):
        # Next out: before every waiting message of its priority.
        self._update_held("UPDATE messages SET reserved_at = NULL, seq = (SELECT MIN(seq) FROM messages) - 1 "
                          "WHERE id = ? AND reserved_at IN (?, ?)", dict.fromkeys(claims, ()), claims)

    def restore_claimed(self, claim, keep=()):
        rows = [row_id for (row_id,) in self.store.read("SELECT id FROM messages WHERE reserved_at = ?", (claim,))
                if self._tag(row_id) not in keep]
        with self.store.transaction() as db:
            db.executemany("UPDATE messages SET reserved_at = NULL WHERE id = ? AND reserved_at = ?",
                           [(row_id, claim) for row_id in rows])

    def restore_unacked(self, now=None):
        with self.store.transaction() as db:
            count = db.execute("UPDATE messages SET reserved_at = NULL WHERE reserved_at < ?",
                               ((now or time.time()) - self.visibility_timeout,)).rowcount
        return count

    def park(self, parked):
        self._update_held("UPDATE messages SET reserved_at = NULL, due = ? WHERE id = ? AND reserved_at IN (?, ?)",
                          {delivery.tag: (due - self.ETA_MOVE_AHEAD,) for delivery, _, _, due in parked},
                          {delivery.tag: claim for delivery, claim, _, _ in parked})

    def revoke(self, task_ids, terminate=False, signal="SIGTERM", expires=10800, broadcast=True):
        now = time.time()
        with self.store.transaction() as db:  # (a revoke stored again replaces its row)
            db.execute("DELETE FROM revocations WHERE expires < ? OR id <= "
                       "(SELECT MAX(id) FROM revocations) - ?", (now, self.REVOKES_MAX))
            db.executemany("DELETE FROM revocations WHERE task_id = ?", [(i,) for i in task_ids])
            db.executemany("INSERT INTO revocations (task_id, expires, terminate, signal) VALUES (?, ?, ?, ?)",
                           [(i, now + expires, int(terminate), signal) for i in task_ids])
        if broadcast:
            for body in _revoke_bodies(task_ids, terminate, signal):
                self.broadcast(body)

    def broadcast(self, body):
        # A row per broadcast: each process reads those added since it last looked.
        now = time.time()
        with self.store.transaction() as db:
            db.execute("DELETE FROM broadcasts WHERE time < ?", (now - 60,))
            db.execute("INSERT INTO broadcasts (time, raw) VALUES (?, ?)",
                       (now, control_envelope(body, {"clock": 1, "expires": now + 1.0}, "celery.pidbox")))

    def send_event(self, event):
        now = time.time()
        with self.store.transaction() as db:  # kept a minute, for `events` readers
            db.execute("DELETE FROM events WHERE time < ?", (now - 60,))
            db.execute("INSERT INTO events (time, raw) VALUES (?, ?)", (now, event_envelope(event)[1]))

    def events(self, timeout):
        if self._last_event is None:
            self._last_event = self.store.read("SELECT COALESCE(MAX(id), 0) FROM events")[0][0]
        query = f"SELECT id, raw FROM events WHERE id > ? ORDER BY id LIMIT {self.EVENTS_AT_ONCE}"
        rows = self.store.read(query, (self._last_event,))
        if not rows:
            self.store.wait_for_change(timeout)
            rows = self.store.read(query, (self._last_event,))
        self._last_event = rows[-1][0] if rows else self._last_event
        return [event for _, raw in rows for event in _parse_events(raw)]

    def reply(self, reply_to, ticket, body):
        raw = control_envelope(body, {"ticket": ticket, "clock": 1}, REPLY_EXCHANGE, reply_to["routing_key"], 1)
        with self.store.transaction() as db:
            db.execute("INSERT INTO replies (ticket, time, raw) VALUES (?, ?, ?)", (ticket, time.time(), raw))

    def ask(self, body, timeout, limit=None):
        ticket = uuid()
        self.broadcast(dict(body, ticket=ticket, reply_to={"exchange": REPLY_EXCHANGE, "routing_key": ticket}))
        answers, deadline = [], time.monotonic() + timeout
        try:
            while (limit is None or len(answers) < limit) and (left := deadline - time.monotonic()) > 0:
                with self.store.transaction() as db:
                    rows = db.execute("SELECT raw FROM replies WHERE ticket = ?", (ticket,)).fetchall()
                    db.execute("DELETE FROM replies WHERE ticket = ?", (ticket,))
                answers += [answer for (raw,) in rows if (answer := _parse_reply(raw, ticket))]
                if not rows:
                    self.store.wait_for_change(min(left, 0.1))
            return answers
        finally:
            with self.store.transaction() as db:  # late answers, and those of clients that died waiting
                db.execute("DELETE FROM replies WHERE ticket = ? OR time < ?", (ticket, time.time() - 60))

    def revoked(self):
        return {row[0] for row in self.store.read(
            "SELECT task_id FROM revocations WHERE expires > ?", (time.time(),))}

    def control_messages(self):
        if self._last_control is None:
            self._last_control = self.store.read("SELECT COALESCE(MAX(id), 0) FROM broadcasts")[0][0]
        rows = self.store.read("SELECT id, raw FROM broadcasts WHERE id > ? ORDER BY id", (self._last_control,))
        if rows:
            self._last_control = rows[-1][0]
        return [command for _, raw in rows if (command := _parse_control(raw)) is not None]

    def lease(self, name, token, ttl):
        now = time.time()
        with self.store.transaction() as db:
            db.execute("INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                       "token = excluded.token, expires = excluded.expires "
                       "WHERE leases.token = excluded.token OR leases.expires < ?",
                       (name, token, now + ttl, now))
            holder = db.execute("SELECT token FROM leases WHERE name = ?", (name,)).fetchone()[0]
            return holder == token and ttl > 0

    def purge(self, queue):
        with self.store.transaction() as db:
            return db.execute("DELETE FROM messages WHERE queue = ? AND reserved_at IS NULL "
                              "AND due <= ?", (queue, time.time())).rowcount

    def size(self, queue):
        return self.store.read("SELECT COUNT(*) FROM messages WHERE queue = ? AND reserved_at IS NULL "
                               "AND due <= ?", (queue, time.time()))[0][0]

    def dead_letter(self, raw, reason, queue=""):
        with self.store.transaction() as db:
            self._bury(db, raw, reason, queue)

    def _bury(self, db, raw, reason, queue):
        now = time.time()
        db.execute("INSERT INTO dead_letters (time, queue, reason, raw) VALUES (?, ?, ?, ?)",
                   (now, queue, reason, raw))
        db.execute("DELETE FROM dead_letters WHERE time < ? OR id <= (SELECT MAX(id) FROM dead_letters) - ?",
                   (now - (self.app.conf.result_expires_seconds or 86400), self.DEAD_LETTER_LIMIT))

    def parked(self, queues, limit):
        queues = list(queues)
        return self.store.read(f"SELECT queue, raw FROM messages WHERE due > ? AND reserved_at IS NULL AND queue IN "
                               f"({', '.join('?' * len(queues))}) AND length(raw) <= ? ORDER BY due LIMIT ?",
                               (time.time(), *queues, self.PARKED_READ_MAX, limit))

    def dead_letters(self):
        """The kept dead letters, newest first, as dicts."""
        rows = self.store.read("SELECT id, reason, queue, time, raw FROM dead_letters ORDER BY id DESC")
        return [{"id": str(row_id), "reason": str(reason), "queue": queue if isinstance(queue, str) else "",
                 "time": at if _is_number(at) else 0.0,
                 "raw": raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)}
                for row_id, reason, queue, at, raw in rows]

    def take_dead_letters(self, ids):
        taken = [letter for letter in self.dead_letters() if letter["id"] in ids]
        with self.store.transaction() as db:
            db.executemany("DELETE FROM dead_letters WHERE id = ?", [(int(letter["id"]),) for letter in taken])
        return taken


#: URL scheme -> broker class; issue-free extension point for other brokers.
BROKERS = {"redis": RedisBroker, "rediss": RedisBroker, "redis+socket": RedisBroker,
           "unix": RedisBroker, "socket": RedisBroker, "sqlite": SQLiteBroker, "memory": SQLiteBroker}


def _connect(registry, app, url, what):
    """The registry's class for the URL's scheme, made with (app, url); a URL the client
    library can't read is a clear configuration error."""
    try:
        store = _pick_by_scheme(registry, url, what)(app, url)
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(f"can't use the {what} URL {_safe_url(url)!r}: {exc}") from None
    _STORES.add(store)
    if app.conf.explain:
        store.explain_operations()
    return store


#: the brokers and backends made (and alive): turning explain on or off wraps their operations or not
_STORES = weakref.WeakSet()


def _pick_by_scheme(registry, url, what):
    scheme = url.split("://", 1)[0] if "://" in url else ""
    try:
        return registry[scheme]
    except KeyError:
        raise ImproperlyConfigured(
            f"unknown {what} URL scheme {scheme!r} in {_safe_url(url)!r}; "
            f"supported: {', '.join(s + '://' for s in registry)}") from None


# =============================================================================
# 6. Result backends
# =============================================================================
# A task's state and return value live under `celery-task-meta-<id>` as the
# JSON Celery writes: {"status", "result", "traceback", "children",
# "date_done", "task_id"}. Every write also PUBLISHes the same JSON on a
# channel of that name, so AsyncResult.get() sleeps on pub/sub instead of
# polling. The base class builds and decodes the metadata; a backend only
# stores, fetches and forgets it.

class ResultBackend(Explains):
    """Stores task states; subclasses implement _set, _get, forget and may wait better."""

    KEY_PREFIX = "celery-task-meta-"
    TASKSET_PREFIX = "celery-taskset-meta-"
    #: exceptions meaning "the backend can't serve us right now", as the broker's
    connection_errors = ()

    def __init__(self, app, url):
        self.app, self.url = app, url
        self.serializer = app.conf.result_serializer
        self.accept = accepted_types(app.conf.result_accept_content or app.conf.accept_content)
        self.expires = app.conf.result_expires_seconds
        self.max_size = app.conf.worker_max_message_size

    def key_for(self, task_id):
        return f"{self.KEY_PREFIX}{task_id}"

    def store_result(self, task_id, result, state, traceback=None, request=None):
        """Write one state of a task, as Celery's worker does."""
        if state in EXCEPTION_STATES and isinstance(result, BaseException):
            result = exception_to_dict(result)
        else:
            result = _stored_value(result)  # (a task may return a result: Celery stores its tuple)
        meta = {"status": state, "result": result, "traceback": traceback,
                "children": [_stored_value(c) for c in getattr(request, "children", None) or []],
                "date_done": utcnow().isoformat() if state in READY_STATES else None}
        meta.update({field: getattr(request, field) for field in ("group_id", "parent_id")
                     if getattr(request, field, None)})
        if self.app.conf.result_extended and request is not None:  # (Celery's fields, for Flower and the like)
            meta.update(name=request.task, args=request.args, kwargs=request.kwargs, worker=request.hostname,
                        retries=request.retries, queue=(request.delivery_info or {}).get("routing_key"))
        meta["task_id"] = task_id
        try:
            data = self.encode(meta)
            if self.max_size and len(data) > self.max_size:
                raise EncodeError(f"a result of {len(data)} bytes is over worker_max_message_size")
        except EncodeError as exc:
            if state == SUCCESS:
                raise  # run_task() turns it into a FAILURE, with hooks and logs
            # A failure must be stored whatever its exception holds, or get() waits for ever.
            meta.update(status=FAILURE, result=exception_to_dict(
                EncodeError(f"can't store the {state} result: {exc}")))
            data = self.encode(meta)
        self._set(self.key_for(task_id), data, ready=meta["status"] in READY_STATES)
        return meta

    def encode(self, meta):
        return dumps(meta, self.serializer)[0]  # (the bytes; not the content type or compression)

    def decode(self, data) -> dict:
        if isinstance(data, str):
            data = data.encode("utf-8")
        # Read as written: JSON and pickle show it in their first byte, else it is ours.
        content_type = JSON_TYPE if data[:1] == b"{" else PICKLE_TYPE if data[:1] == b"\x80" \
            else content_type_for(self.serializer)
        return loads(data, content_type, self.accept)

    def get_meta(self, task_id) -> dict:
        return self.meta_from(self._get(self.key_for(task_id)), task_id)

    def meta_from(self, data, task_id) -> dict:
        """Stored data as metadata; nothing stored means PENDING, as in Celery."""
        if data is None:
            return {"status": PENDING, "result": None, "traceback": None,
                    "children": [], "date_done": None, "task_id": task_id}
        meta = self.decode(data)
        if not (isinstance(meta, dict) and isinstance(meta.get("status"), str)):
            raise DecodeError(f"not a stored task result: {_short_repr(meta, 200)}")
        return {"result": None, "traceback": None, **meta}  # (someone else's may leave them out)

    def wait_for(self, task_id, timeout=None, interval=0.5) -> dict:
        """Block until the task is ready; raises ResultTimeout. Polls by default."""
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        while True:
            meta = self.meta_from(self._get(self.key_for(task_id)), task_id)
            if meta["status"] in READY_STATES:
                return meta
            if time.monotonic() >= deadline:
                raise ResultTimeout(f"task {task_id} not ready after {timeout}s")
            self.pause(min(interval, deadline - time.monotonic()))

    def pause(self, seconds):
        """Sleep between two looks at a result; a backend that can tell when it changed wakes early."""
        time.sleep(max(seconds, 0))

    def _set(self, key, data, ready=True):
        """Store encoded metadata under `key`, unless the state stored there is final for it:
        a SUCCESS always, a FAILURE or REVOKED unless this state is `ready` too."""

    def _get(self, key):
        """The encoded metadata stored under `key`, or None."""

    def forget(self, task_id):
        """Delete a task's stored state."""

    def chord_start(self, group_id, size):
        """Remember that the chord `group_id` waits for `size` header tasks."""

    def chord_part(self, group_id, index, task_id, state, value):
        """Count one finished header task. Returns every part, ordered by index, as
        [1, task_id, state, value] lists, to exactly one caller: the one that
        completed the chord. Everyone else gets None."""

    def chord_done(self, group_id):
        """Forget the chord's counter once its body was sent."""

    def chord_add(self, group_id, count=1):
        """`count` more tasks for the chord to wait for (Task.add_to_chord)."""

    def close(self):
        """Release connections (also called in a freshly forked child)."""


class DisabledBackend(ResultBackend):
    """No result_backend configured: storing a state is a no-op; reading one (or a chord) is an error."""

    def store_result(self, task_id, result, state, traceback=None, request=None):
        """Nothing is stored (and nothing returned)."""

    def _get(self, *args, **kwargs):
        raise ImproperlyConfigured(
            "no result backend is configured: pass backend=... to Celery() "
            "or set result_backend to read results and run chords")

    _set = chord_start = chord_part = chord_done = chord_add = _get


# Writes the state unless the one stored is final for it, then PUBLISHes it, in
# one round trip. A SUCCESS is final (Celery's rule: a late duplicate must not
# overwrite a success); so is a FAILURE or REVOKED against a state that is not
# ready (ARGV[3] is 0).
# Celery: final-states: Celery lets a RETRY stored late (the retried run, in
# another process, finished first) replace a FAILURE, and get() then waits for ever.
_STORE_RESULT_LUA = r"""
local status = string.match(redis.call('GET', KEYS[1]) or '', '^{"status": "(%u+)",')
if status == 'SUCCESS' or (ARGV[3] == '0' and (status == 'FAILURE' or status == 'REVOKED')) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""

# Celery 5.7's chord counter, atomically: skip a chord already done (.c), count
# each part once (.d), ZADD the part at its index (.j), and if that completes
# size (.s) + diff (.t), claim the body (.c, with expiry) and return the parts.
_CHORD_PART_LUA = r"""
if redis.call('GET', KEYS[5]) == 'done' then return false end
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[4], ARGV[1])
end
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
local total = tonumber(redis.call('GET', KEYS[3]) or '-1') + tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('ZCOUNT', KEYS[1], '-inf', '+inf') ~= total then return false end
if not redis.call('SET', KEYS[5], ARGV[5], 'NX', 'EX', 10) then return false end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class _SharedSubscriptions:
    """One pub/sub connection for all the threads of a process waiting in get().

    A waiter that finds the connection free reads it for everyone for up to
    SLICE seconds and files each message under its channel; the others sleep
    until theirs is filed or it is their turn to read. (A connection per waiter
    ran out of connections with a few hundred waiting threads.)
    """

    SLICE = 0.05

    def __init__(self, client, errors):
        self.client, self.errors = client, errors
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)  # connects on first subscribe
        self.reading = threading.Lock()  # held by the thread using the pub/sub connection
        self.filed = threading.Condition()  # guards `messages` and `waiters`; notified on news
        self.messages, self.waiters, self.received = {}, {}, 0

    def subscribe(self, channel):
        with self.reading, self.filed:
            if not self.waiters.get(channel):
                self.pubsub.subscribe(channel)
            self.waiters[channel] = self.waiters.get(channel, 0) + 1

    def unsubscribe(self, channel):
        with self.reading, self.filed:
            self.waiters[channel] -= 1
            if not self.waiters[channel]:
                del self.waiters[channel]
                self.messages.pop(channel, None)
                with contextlib.suppress(*self.errors):  # a reconnect resubscribes only to what is left
                    self.pubsub.unsubscribe(channel)

    def wait(self, channel, deadline, after=0):
        """(number, data) of the latest message on `channel` numbered above `after` (every
        waiter on the channel sees it); None after a second (or at the deadline) without."""
        until = min(deadline, time.monotonic() + 1.0)
        while True:
            with self.filed:
                if self.messages.get(channel, (0,))[0] > after:
                    return self.messages[channel]
            left = until - time.monotonic()
            if left <= 0:
                return None
            if self.reading.acquire(blocking=False):
                try:
                    self._read(min(left, self.SLICE))
                finally:
                    self.reading.release()
            else:
                with self.filed:
                    if self.messages.get(channel, (0,))[0] <= after:
                        self.filed.wait(min(left, self.SLICE))

    def _read(self, timeout):
        try:
            message = next_pubsub_message(self.pubsub, timeout)
        except self.errors:  # Redis went away: redis-py reconnects and resubscribes
            time.sleep(min(timeout, 0.1))
            return
        if message is not None and message.get("type") == "message":
            with self.filed:
                channel = message["channel"].decode()
                if self.waiters.get(channel):
                    self.received += 1
                    self.messages[channel] = (self.received, message["data"])
                self.filed.notify_all()


class RedisBackend(ResultBackend):
    """Celery's Redis result backend: SET + EXPIRE + PUBLISH, waiting on pub/sub.

    Reads and writes ride out a Redis restart: they retry for about half a
    minute (or until a get()'s timeout) before giving up (Celery:
    result_backend_always_retry). Every command has a short socket timeout, so
    a stalled Redis can't hold a get() more than about a second past its timeout.

    Explain store (store_result, when result): EVALSHA store script: GET
    {self.KEY_PREFIX}{task_id}; unless the state there is final for this one: SET
    {self.KEY_PREFIX}{task_id} <{result[status]}, JSON>; EXPIRE after {self.expires} s;
    PUBLISH {self.KEY_PREFIX}{task_id} <the same> -- the key keeps the state for whoever
    asks later (until result_expires: 0 is never); the PUBLISH wakes a get() waiting now,
    without polling

    Explain get (get_meta): GET {self.KEY_PREFIX}{task_id} -- a result is read where
    Celery writes it, so either reads the other's

    Explain wait (wait_for): SUBSCRIBE {self.KEY_PREFIX}{task_id} (on this process's one
    pub/sub connection); GET {self.KEY_PREFIX}{task_id}; then wait for a message on the
    channel -- subscribed before it looks, so a result stored in between can't be missed

    Explain forget: DEL {self.KEY_PREFIX}{task_id} -- the stored state is dropped; the
    task looks PENDING again

    Explain chord_start: MULTI; DEL {self.TASKSET_PREFIX}{group_id}.c; SET
    {self.TASKSET_PREFIX}{group_id}.s {size}; EXEC -- the chord's counter: how many header
    tasks its body waits for

    Explain chord_part: EVALSHA chord script: SADD {self.TASKSET_PREFIX}{group_id}.d and
    ZADD {self.TASKSET_PREFIX}{group_id}.j <the part of {task_id}>, once; ZCOUNT .j
    against GET .s; SET .c NX when all are in -- Celery's chord counter: the header task
    that completes the chord sends its body
    """

    #: seconds one Redis command may take before it counts as failed
    SOCKET_TIMEOUT = 1.0

    def __init__(self, app, url):
        super().__init__(app, url)
        self.connection_errors = _redis_transient_errors()
        self.client = redis_client(url, socket_timeout=self.SOCKET_TIMEOUT)
        self.held = HeldPerThread(self.client)  # for the hot path: storing results
        self._chord_script = self.client.register_script(_CHORD_PART_LUA)
        self._waiters = _SharedSubscriptions(self.client, self.connection_errors)

    def _retrying(self, operation, *args, attempts=20, deadline=None):
        """Call `operation`, retrying through connection errors; ResultTimeout at `deadline`."""
        for attempt in range(attempts):
            try:
                return operation(*args)
            except self.connection_errors as exc:
                pause = min(0.05 * 2 ** attempt, 2.0)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise ResultTimeout(f"the result backend did not answer in time: {exc!r}") from exc
                if attempt == attempts - 1:
                    raise
                time.sleep(pause)

    def _set(self, key, data, ready=True):
        """Store a result. A worker storing one is more patient than a client: the task ran,
        and its result must not be lost to a Redis restart, so it keeps trying (logging
        that it does) for up to the visibility timeout, as it does to send a chain's next step."""
        def store():
            self.held.connection.script(_STORE_RESULT_LUA, [key], [data, self.expires, int(ready)])
        if not _local.__dict__.get("in_worker"):
            return self._retrying(store)
        patient_until = time.monotonic() + self.app.broker.visibility_timeout
        while True:
            try:
                return self._retrying(store, attempts=5)
            except self.connection_errors as exc:
                if time.monotonic() > patient_until:
                    raise
                worker_logger.warning("can't store %s yet (%s: %s); trying again", key, type(exc).__name__, exc)

    def _get(self, key):
        return self._retrying(self.client.get, key)

    def forget(self, task_id):
        self.client.delete(self.key_for(task_id))

    def _chord_keys(self, group_id):
        return [f"{self.TASKSET_PREFIX}{group_id}.{suffix}" for suffix in "jtsdc"]

    def chord_start(self, group_id, size):
        jkey, tkey, skey, dkey, ckey = self._chord_keys(group_id)
        self.client.pipeline().delete(ckey).set(skey, size, ex=self.expires or None).execute()  # (MULTI ... EXEC)

    def chord_part(self, group_id, index, task_id, state, value):
        member = json_dumps([1, task_id, state, value])
        score = "+inf" if index is None else index
        parts = self._chord_script(keys=self._chord_keys(group_id),
                                   args=[f"{task_id}:{index}", score, member, self.expires or 86400, uuid()])
        return [json_loads(part) for part in parts] if parts else None

    def chord_add(self, group_id, count=1):
        self.client.incrby(self._chord_keys(group_id)[1], count)

    def chord_done(self, group_id):
        jkey, tkey, skey, dkey, ckey = self._chord_keys(group_id)
        self.client.pipeline().delete(jkey, tkey, skey, dkey).set(ckey, "done", ex=300).execute()

    def wait_for(self, task_id, timeout=None, interval=0.5):
        key = self.key_for(task_id)
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        # Subscribe before the first GET, so a state written in between is not missed.
        self._retrying(self._waiters.subscribe, key, deadline=deadline, attempts=10 ** 9)
        try:
            meta, seen = self._read_meta(task_id, deadline), 0
            while meta["status"] not in READY_STATES:
                if time.monotonic() >= deadline:
                    raise ResultTimeout(f"task {task_id} not ready after {timeout}s")
                news = self._waiters.wait(key, deadline, seen)
                if news:
                    seen, data = news
                    meta = self.meta_from(data, task_id)
                else:  # a silent second re-reads the key: covers a reconnect that dropped a message
                    meta = self._read_meta(task_id, deadline)
            return meta
        finally:
            self._waiters.unsubscribe(key)

    def _read_meta(self, task_id, deadline):
        data = self._retrying(self.client.get, self.key_for(task_id), deadline=deadline, attempts=10 ** 9)
        return self.meta_from(data, task_id)

    def close(self):
        self.held.connection.close()
        self.client.close()


class SQLiteBackend(ResultBackend):
    """Results in the SQLite database (or memory://) the broker may share.

    Explain store (store_result, when result): INSERT INTO results (key, meta, expires)
    VALUES ('{self.KEY_PREFIX}{task_id}', <{result[status]}, JSON>, <its expiry>) ON
    CONFLICT(key) DO UPDATE ... unless the state there is final -- the row keeps the state
    for whoever asks later (until result_expires: 0 is never); a get() waiting now
    notices the commit by PRAGMA data_version

    Explain get (get_meta): SELECT meta FROM results WHERE key =
    '{self.KEY_PREFIX}{task_id}' AND not expired -- a look at the stored state

    Explain wait (wait_for): SELECT meta FROM results WHERE key =
    '{self.KEY_PREFIX}{task_id}'; again each time PRAGMA data_version changes -- SQLite
    can't notify: the data version changes when another process commits

    Explain forget: DELETE FROM results WHERE key = '{self.KEY_PREFIX}{task_id}' -- the
    stored state is dropped; the task looks PENDING again

    Explain chord_start: INSERT OR REPLACE INTO chords VALUES ('{group_id}', {size}, 0) --
    the chord's counter: how many header tasks its body waits for

    Explain chord_part: INSERT OR IGNORE INTO chord_parts VALUES ('{group_id}',
    '{task_id}', ...); SELECT the count -- the header task that completes the chord sends
    its body
    """

    def __init__(self, app, url):
        super().__init__(app, url)
        import sqlite3
        self.connection_errors = (sqlite3.DatabaseError,)  # locked, full, vanished, unreadable
        self.store = SQLiteStore.for_url(url)

    def _set(self, key, data, ready=True):
        now = time.time()
        with self.store.transaction() as db:
            # Final states stay, as on Redis (_STORE_RESULT_LUA); expired rows go now and then.
            db.execute("INSERT INTO results (key, meta, expires) VALUES (?, ?, ?) ON CONFLICT(key) "
                       "DO UPDATE SET meta = excluded.meta, expires = excluded.expires "
                       "WHERE CAST(results.meta AS TEXT) NOT LIKE '{\"status\": \"SUCCESS\"%' AND (? OR ("
                       "CAST(results.meta AS TEXT) NOT LIKE '{\"status\": \"FAILURE\"%' AND "
                       "CAST(results.meta AS TEXT) NOT LIKE '{\"status\": \"REVOKED\"%'))",
                       (key, data, now + self.expires if self.expires else None, ready))
            if self.store._writes % 1000 == 0:
                db.execute("DELETE FROM results WHERE expires < ?", (now,))

    def _get(self, key):
        rows = self.store.read("SELECT meta FROM results WHERE key = ? AND "
                               "(expires IS NULL OR expires > ?)", (key, time.time()))
        return rows[0][0] if rows else None

    def forget(self, task_id):
        with self.store.transaction() as db:
            db.execute("DELETE FROM results WHERE key = ?", (self.key_for(task_id),))

    def chord_start(self, group_id, size):
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO chords VALUES (?, ?, 0)", (group_id, size))

    def chord_part(self, group_id, index, task_id, state, value):
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO chord_parts VALUES (?, ?, ?, ?)",
                       (group_id, task_id, float("inf") if index is None else index,
                        json_dumps([1, task_id, state, value])))
            row = db.execute("SELECT size, done, (SELECT COUNT(*) FROM chord_parts WHERE group_id = ?) "
                             "FROM chords WHERE group_id = ?", (group_id, group_id)).fetchone()
            if row is None:  # done and forgotten already: a late duplicate leaves nothing behind
                db.execute("DELETE FROM chord_parts WHERE group_id = ?", (group_id,))
                return None
            if row[1] or row[2] != row[0]:
                return None
            db.execute("UPDATE chords SET done = 1 WHERE group_id = ?", (group_id,))
            return [json_loads(p) for (p,) in db.execute(
                "SELECT part FROM chord_parts WHERE group_id = ? ORDER BY idx", (group_id,))]

    def chord_add(self, group_id, count=1):
        with self.store.transaction() as db:
            db.execute("UPDATE chords SET size = size + ? WHERE group_id = ?", (count, group_id))

    def chord_done(self, group_id):
        with self.store.transaction() as db:
            db.execute("DELETE FROM chord_parts WHERE group_id = ?", (group_id,))
            db.execute("DELETE FROM chords WHERE group_id = ?", (group_id,))

    def pause(self, seconds):
        self.store.wait_for_change(max(seconds, 0))


BACKENDS = {"redis": RedisBackend, "rediss": RedisBackend, "redis+socket": RedisBackend,
            "unix": RedisBackend, "socket": RedisBackend, "sqlite": SQLiteBackend, "memory": SQLiteBackend}


class AsyncResult:
    """A handle on a task's result, by id: `add.delay(2, 2).get(timeout=10)`."""

    def __init__(self, id, backend=None, task_name=None, app=None, parent=None, ignored=False):
        self.id, self.ignored = id, ignored  # ignored: sent with ignore_result, nothing will be stored
        self.app = app or current_app()
        self._backend = backend
        self.task_name = task_name
        self.parent = parent
        self._cache = None

    task_id = property(lambda self: self.id)
    backend = property(lambda self: self._backend or self.app.backend)

    def _get_meta(self):
        if self._cache is not None:
            return self._cache
        meta = self.backend.get_meta(self.id)
        if meta["status"] in READY_STATES:
            self._cache = meta
        return meta

    state = status = property(lambda self: self._get_meta()["status"])
    traceback = property(lambda self: self._get_meta().get("traceback"))
    # With result_extended, what the worker stored of the call (None otherwise), as in Celery
    name, args, kwargs, worker, retries, queue = (property(lambda self, field=field: self._get_meta().get(field))
                                                  for field in ("name", "args", "kwargs", "worker", "retries",
                                                                "queue"))

    @property
    def children(self) -> list:
        """The results of the tasks this one sent while it ran (Celery's trail), as stored."""
        stored = self._get_meta().get("children")
        return [child for value in (stored if isinstance(stored, list) else [])
                if (child := result_from_tuple(value, self.app)) is not None]
    date_done = property(lambda self: to_datetime(self._get_meta().get("date_done")))

    @property
    def result(self):
        """The return value, or the exception for a failed task."""
        meta = self._get_meta()
        return exception_from_dict(meta["result"]) if meta["status"] in EXCEPTION_STATES else meta["result"]

    info = result

    def ready(self):
        return self.state in READY_STATES

    def successful(self):
        return self.state == SUCCESS

    def failed(self):
        return self.state == FAILURE

    def get(self, timeout=None, propagate=True, interval=0.5, disable_sync_subtasks=True):
        """Wait for the task and return its value, re-raising its exception."""
        if disable_sync_subtasks:
            _assert_will_not_block()
        if self.ignored:  # Celery returns None too: waiting would never end
            return None
        if self._cache is None:
            self._cache = self.backend.wait_for(self.id, timeout=timeout, interval=interval)
        if propagate and self._cache["status"] in EXCEPTION_STATES:
            raise self.result
        return self.result

    wait = get

    def forget(self):
        self._cache = None
        self.backend.forget(self.id)

    def revoke(self, connection=None, terminate=False, signal="SIGTERM", wait=False, timeout=None):
        """Revoke this task on every worker (see Control.revoke)."""
        self.app.control.revoke(self.id, terminate=terminate, signal=signal)

    def revoke_by_stamped_headers(self, headers, connection=None, terminate=False, signal="SIGTERM", **options):
        self.app.control.revoke_by_stamped_headers(headers, terminate=terminate, signal=signal)

    def as_tuple(self):
        """Celery's nested-list form: [[id, parent], None]."""
        return [[self.id, self.parent.as_tuple() if self.parent else None], None]

    def __eq__(self, other):
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<{type(self).__name__}: {self.id}>"


class EagerResult(AsyncResult):
    """The result of a task run in this process by apply() or task_always_eager."""

    def __init__(self, id, value, state, traceback=None, app=None, task_name=None):
        super().__init__(id, app=app, task_name=task_name)
        self._value, self._state, self._traceback = value, state, traceback

    def _get_meta(self):
        result = exception_to_dict(self._value) if isinstance(self._value, BaseException) else self._value
        return {"status": self._state, "result": result, "traceback": self._traceback,
                "children": [], "date_done": None, "task_id": self.id}

    result = info = property(lambda self: self._value)

    def get(self, timeout=None, propagate=True, interval=0.5, disable_sync_subtasks=True):
        if propagate and isinstance(self._value, BaseException) and self._state in EXCEPTION_STATES:
            raise self._value
        return self._value

    wait = get

    def forget(self):
        """Nothing was stored: nothing to forget."""


# =============================================================================
# 7. Tasks, requests and run_task()
# =============================================================================
# @app.task turns a function into a Task subclass with `run` = the function
# (Celery's way, so `base=MyTask` hooks just work). Calling the task runs it
# here; delay()/apply_async() send a message; apply() runs it eagerly through
# the same run_task() the worker uses. run_task() is the one place that decides
# a task's outcome: success, failure, retry, reject, ignore, expired, and what
# gets stored and logged (in Celery: celery/app/trace.py).

_local = threading.local()


def _request_stack():
    return _local.__dict__.setdefault("requests", [])


class Request:
    """What a running task knows about its own call: `self.request` in a bound task."""

    id = task = root_id = parent_id = group = group_index = eta = expires = None
    hostname = origin = reply_to = correlation_id = shadow = None
    callbacks = errbacks = chain = chord = None
    time_limit = soft_time_limit = None  # (in effect: per call, else the task's, else the app's)
    timelimit = (None, None)
    retries = replaced_task_nesting = 0
    is_eager, called_directly = False, True
    stamped_headers, stamps = (), {}

    def __init__(self, **fields):
        self.args, self.kwargs, self.delivery_info, self.headers = (), {}, {}, {}
        self.children = []
        self.__dict__.update(fields)

    group_id = property(lambda self: self.group)

    #: headers copied as they are into the attribute of the same name
    HEADER_FIELDS = ("eta", "expires", "root_id", "parent_id", "group", "group_index", "origin", "shadow")

    @classmethod
    def from_message(cls, message: Message, hostname=None, is_eager=False):
        headers, properties, embed = message.headers, message.properties, message.embed or {}
        return cls(**{name: headers.get(name) for name in cls.HEADER_FIELDS},
                   **{name: embed.get(name) for name in _EMBED_TYPES},  # callbacks, errbacks, chain, chord
                   id=message.id, task=message.task_name, args=message.args, kwargs=message.kwargs,
                   retries=message.retries, timelimit=headers.get("timelimit") or (None, None),
                   reply_to=properties.get("reply_to"), correlation_id=properties.get("correlation_id"),
                   properties=dict(properties), replaced_task_nesting=headers.get("replaced_task_nesting") or 0,
                   stamped_headers=headers.get("stamped_headers") or [], stamps=headers.get("stamps") or {},
                   delivery_info=dict(properties.get("delivery_info") or {}, priority=message.priority),
                   headers=headers, hostname=hostname, is_eager=is_eager, called_directly=False)


def _stamps_of(request):
    """The stamps a retried or replaced task carries on (those its stamped_headers name)."""
    return {name: value for name, value in request.stamps.items()
            if isinstance(name, str) and name in request.stamped_headers and name not in _SEND_OPTIONS}


def _assert_will_not_block():
    """Celery's guard: a task waiting on another task's result can hold the last
    free pool process while that task waits for one, and the worker deadlocks."""
    task = current_task() if _local.__dict__.get("in_worker") else None
    if task is not None and not task.request.is_eager and not _local.__dict__.get("allow_join"):
        raise RuntimeError("Never call result.get() within a task! (pass disable_sync_subtasks=False "
                           "to do it anyway; better: chain the tasks, or use a chord)")


@contextlib.contextmanager
def allow_join_result():
    """`with allow_join_result(): result.get()`: Celery's way to wait inside a task anyway."""
    previous, _local.allow_join = _local.__dict__.get("allow_join"), True
    try:
        yield
    finally:
        _local.allow_join = previous


def _pydantic_wrapper(fun, pydantic_strict=False, pydantic_context=None, pydantic_dump_kwargs=None):
    """Celery's pydantic=True: an argument annotated with a pydantic model (or Optional[one])
    arrives as a dict and is validated into the model; a model returned is stored as its
    model_dump(mode='json'). (The client sends model arguments as their dumps.)"""
    base_model = _optional_library("pydantic").BaseModel
    signature, dump_options = inspect.signature(fun), {"mode": "json", **(pydantic_dump_kwargs or {})}
    try:
        hints = typing.get_type_hints(fun)
    except Exception:  # (a name that can't be resolved: the annotations as written)
        hints = {}

    def model_for(name, value):
        annotation = hints.get(name, signature.parameters[name].annotation)
        if value is not None and typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
        return annotation if isinstance(annotation, type) and issubclass(annotation, base_model) else None

    @functools.wraps(fun)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if (model := model_for(name, value)) is not None:
                bound.arguments[name] = model.model_validate(value, strict=pydantic_strict,
                                                             context=dict(pydantic_context or {}))
        result = fun(*bound.args, **bound.kwargs)
        return result.model_dump(**dump_options) if isinstance(result, base_model) else result
    return run


def _model_dumped(value):
    """A pydantic model argument as its JSON-ready dict (Celery's client does it too)."""
    return value.model_dump(mode="json") if hasattr(value, "model_dump") and hasattr(value, "model_fields") \
        else value


def current_task():
    """The task running in this thread, or None."""
    stack = _request_stack()
    return stack[-1][0] if stack else None


def _trail(result, add_to_parent=True):
    """Celery's trail: what a running task sends is one of its children (a group counts
    once), stored with its result: `AsyncResult(id).children`."""
    parent = current_task()
    if add_to_parent and parent is not None and not parent.request.called_directly:
        parent.request.children.append(result)
    return result


class Task:
    """A task type. Subclass it for hooks; `@app.task(base=MyTask)` uses yours.

    Options left as None fall back to the app's task_* settings.
    """

    name = app = None
    #: check arguments against the function's signature when sending
    typing = True
    max_retries = 3
    default_retry_delay = 180
    #: None: the app's task_<option> setting applies (see option())
    ignore_result = acks_late = reject_on_worker_lost = track_started = None
    queue = priority = serializer = compression = expires = None
    time_limit = soft_time_limit = None
    #: '10/s', '100/m', '1000/h' or a number per second: per task type, per worker
    rate_limit = None
    #: exception types that retry the task by themselves, with retry_kwargs
    autoretry_for = ()
    retry_kwargs = {}
    #: with autoretry: True (or a factor in seconds) for exponential backoff
    retry_backoff = False
    retry_backoff_max = 600
    retry_jitter = True
    #: bound tasks receive the task as first argument
    _bound = False
    _pydantic = False
    #: options a remote-control command set (rate_limit, time limits): they win over
    #: task_annotations, as in Celery, which writes annotations onto the task at start
    _set_by_control = {}

    def run(self, *args, **kwargs):
        raise NotImplementedError(f"task {self.name!r} defines no run()")

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)

    def __repr__(self):
        return f"<@task: {self.name}>"

    # -- who is running ----------------------------------------------------

    @property
    def request(self):
        for task, request in reversed(_request_stack()):
            if task is self:
                return request
        return Request()

    def push_request(self, request):
        _request_stack().append((self, request))

    def pop_request(self):
        _request_stack().pop()

    backend = property(lambda self: self.app.backend)

    def option(self, name):
        """A task option: as a control command set it, else from task_annotations, else the
        task, else the app's task_<name>."""
        annotations = () if name in self._set_by_control else self.app.conf.task_annotations or ()
        for annotation in [annotations] if isinstance(annotations, dict) else annotations:
            for key in (self.name, "*"):
                if name in annotation.get(key, ()):
                    return annotation[key][name]
        value = self._set_by_control.get(name, getattr(self, name))
        if value is None:  # the app's task_<name> setting (for rate_limit: task_default_rate_limit)
            setting = "task_default_rate_limit" if name == "rate_limit" else f"task_{name}"
            value = getattr(self.app.conf, setting, None)
        return value

    def set_by_control(self, **options):
        self._set_by_control = {**self._set_by_control, **options}

    def backoff_countdown(self, retries):
        """Seconds before autoretry number `retries` + 1: exponential, capped, maybe jittered."""
        factor = 1 if self.retry_backoff is True else int(self.retry_backoff)
        countdown = min(self.retry_backoff_max, factor * 2 ** retries)
        if self.retry_jitter:
            import random
            countdown = random.randrange(countdown + 1)
        return max(0, countdown)

    # -- calling ----------------------------------------------------------

    def delay(self, *args, **kwargs):
        """Send the task with these arguments: `add.delay(2, 2)`."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args=None, kwargs=None, **options):
        """Send the task; returns an AsyncResult.

        Options are Celery's: task_id, countdown, eta, expires, queue, priority,
        ignore_result, headers, serializer, compression, time_limit, soft_time_limit.
        """
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        self.check_arguments(args, kwargs)
        for name in ("queue", "priority", "serializer", "compression", "expires"):
            if options.get(name) is None and getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self._pydantic and (options.get("serializer") or self.app.conf.task_serializer) != "pickle":
            args, kwargs = tuple(map(_model_dumped, args)), {k: _model_dumped(v) for k, v in kwargs.items()}
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, task_id=options.get("task_id"))
        hard, soft = (options.get(name) or self.option(name) for name in ("time_limit", "soft_time_limit"))
        if hard and soft and soft > hard:  # (as Celery: at the call site)
            raise ValueError("soft_time_limit must be less than or equal to time_limit")
        if options.get("ignore_result") is None:
            options["ignore_result"] = self.option("ignore_result")
        return self.app.send_task(self.name, args, kwargs, **options)

    def _run_signature(self):
        """How run() is called (the task itself left out), or None where inspect can't tell."""
        cls = type(self)
        if "_signature" not in cls.__dict__:  # once per task type: it is checked per message too
            try:
                cls._signature = inspect.signature(self.run)
            except (TypeError, ValueError):
                cls._signature = None
        return cls._signature

    def check_arguments(self, args, kwargs):
        """Raise TypeError at the call site when the arguments can't fit the function."""
        signature = self._run_signature() if self.typing else None
        try:
            if signature is not None:
                signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}{signature}: {exc}") from None

    def apply(self, args=None, kwargs=None, task_id=None, throw=None, retries=0, **options):
        """Run the task here and now, through run_task(); returns an EagerResult."""
        task_id = task_id or uuid()
        message = _eager_message(self, tuple(args or ()), dict(kwargs or {}), task_id, retries, options)
        outcome = run_task(self.app, message, eager=True)
        if outcome.state == RETRY and getattr(outcome.retval, "sig", None):
            retry_args, retry_kwargs = outcome.retval.sig
            return self.apply(retry_args, retry_kwargs, task_id, throw, retries + 1, **options)
        throw = self.app.conf.task_eager_propagates if throw is None else throw
        if throw and outcome.state == FAILURE:
            raise outcome.retval
        return EagerResult(task_id, outcome.retval, outcome.state, outcome.traceback,
                           app=self.app, task_name=self.name)

    def AsyncResult(self, task_id):
        return AsyncResult(task_id, app=self.app, task_name=self.name)

    def signature(self, args=None, kwargs=None, **options):
        """A Signature of this task (§8), to call later or to pass around."""
        return Signature(self, args, kwargs, **options)

    subtask = signature

    def s(self, *args, **kwargs):
        """`add.s(2, 2)`: a signature; the result of a previous task is prepended to args."""
        return Signature(self, args, kwargs)

    def si(self, *args, **kwargs):
        """`add.si(2, 2)`: an immutable signature, which ignores a previous task's result."""
        return Signature(self, args, kwargs, immutable=True)

    def map(self, it):
        return xmap(self.s(), it)

    def starmap(self, it):
        return xstarmap(self.s(), it)

    def chunks(self, it, n):
        return chunks(self.s(), it, n)

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None,
              countdown=None, max_retries=None, **options):
        """Send this task again with the same id and retries + 1, then raise Retry.

        Use as `raise self.retry(exc=exc, countdown=5)`. Once max_retries is
        used up, raises `exc` (or MaxRetriesExceededError when none was given).
        """
        request = self.request
        if request.called_directly:
            raise ValueError(f"retry() called outside a running task {self.name}")
        max_retries = self.max_retries if max_retries is None else max_retries
        if max_retries is not None and request.retries >= max_retries:
            raise exc if exc is not None else MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}")
        args, kwargs = self._retry_arguments(request, args, kwargs)
        if countdown is None and eta is None:
            countdown = self.default_retry_delay
        if not request.is_eager:
            custom = {k: v for k, v in request.headers.items() if k not in PROTOCOL_HEADERS}
            # The retried message carries the rest of the workflow: callbacks, chain, chord.
            # Options given to retry() (expires=, queue=, ...) win over the request's.
            options = {"queue": request.delivery_info.get("routing_key"),
                       "priority": request.delivery_info.get("priority"),
                       "link": request.callbacks, "link_error": request.errbacks,
                       "chain": request.chain, "chord": request.chord, "task_id": request.id,
                       "retries": request.retries + 1, "root_id": request.root_id, "parent_id": request.id,
                       "group_id": request.group, "group_index": request.group_index, "expires": request.expires,
                       "timelimit": request.timelimit, "shadow": request.shadow, "headers": custom or None,
                       "ignore_result": request.headers.get("ignore_result"),
                       "replaced_task_nesting": request.replaced_task_nesting,
                       "stamped_headers": request.stamped_headers or None, **_stamps_of(request), **options}
            self.app.send_task(self.name, args, kwargs, countdown=countdown, eta=eta, **options)
        ret = Retry(exc=exc, when=eta or countdown)
        ret.sig = (args, kwargs) if request.is_eager else None
        if throw:
            raise ret
        return ret

    def _retry_arguments(self, request, args, kwargs):
        """A retry's arguments: those given, else the request's. Given only args, or only
        kwargs, the request's others are kept where they name no parameter twice, as in
        Celery: foo(1, 2) retried with kwargs={'foo': 2} runs foo(foo=2, bar=2)."""
        signature = self._run_signature()
        if (args is None) == (kwargs is None) or signature is None:
            return (request.args if args is None else args), (request.kwargs if kwargs is None else kwargs)
        by_position = [p.name for p in signature.parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        if args is not None:  # the request's kwargs that the new args don't cover
            return args, {k: v for k, v in request.kwargs.items() if k not in by_position[:len(args)]}
        try:
            bound = signature.bind_partial(*request.args)
        except TypeError:  # (the worker says what doesn't fit)
            return request.args, kwargs
        rest = {}
        for name, value in kwargs.items():
            if name in bound.arguments and name in by_position:
                bound.arguments[name] = value
            else:
                rest[name] = value
        return bound.args, {**bound.kwargs, **rest}

    def replace(self, sig):
        """End this task by handing its place to `sig` (a signature, chain or group), as
        Celery does: `sig` takes its id, its callbacks and errbacks, the rest of its chain
        and its place in a group or chord; this task stores nothing (Ignore is raised).
        A group is made a chord whose body gathers the group's results as its value."""
        request = self.request
        if "chord" in sig.options:
            raise ImproperlyConfigured("A signature replacing a task must not be part of a chord")
        if isinstance(sig, chain) and not sig.tasks:
            raise ImproperlyConfigured("Cannot replace with an empty chain")
        gather = self.app.tasks["celery.accumulate"].s(index=0)
        if isinstance(sig, group):
            sig = chord(sig, gather, app=self.app)
        elif isinstance(sig, chain) and isinstance(sig.tasks[-1], group):
            sig = chain(*sig.tasks[:-1], chord(sig.tasks[-1], gather, app=self.app), app=self.app)
        for callback in request.callbacks or ():
            sig.link(signature(callback, app=self.app))
        for errback in request.errbacks or ():
            sig.link_error(signature(errback, app=self.app))
        sig.freeze(request.id)
        nesting = request.replaced_task_nesting + 1
        sig.set(chord=request.chord, group_id=request.group, group_index=request.group_index,
                root_id=request.root_id, replaced_task_nesting=nesting)
        for task in sig.tasks if isinstance(sig, chain) else ():
            task.set(replaced_task_nesting=nesting)
        rest = [signature(step, app=self.app).set(replaced_task_nesting=nesting)
                for step in reversed(request.chain or ())]
        sig = chain(sig, *rest, app=self.app) if rest else sig
        if request.is_eager:
            return sig.apply().get()
        sig.delay()
        raise Ignore("Replaced by new task")

    def add_to_chord(self, sig, lazy=False):
        """Add `sig` to the chord this task is part of: the chord waits for it too."""
        request = self.request
        if not request.chord:
            raise ValueError("Current task is not member of any chord")
        sig.set(group_id=request.group, group_index=request.group_index, chord=request.chord,
                root_id=request.root_id)
        sig.freeze()
        self.backend.chord_add(request.group, _parts_counted(sig))  # (a group adds each of its tasks)
        return sig if lazy else sig.delay()

    # -- hooks: override in a base class ------------------------------------

    def on_success(self, retval, task_id, args, kwargs):
        """Called in the worker after the task returned."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        """Called in the worker after the task raised `exc`; einfo is the traceback text."""

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        """Called in the worker after the task asked to be retried."""

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        """Called in the worker after every run, whatever the outcome."""


def _eager_message(task, args, kwargs, task_id, retries, options):
    parent = current_task()
    parent_request = parent.request if parent else Request()  # (a blank one: no root, no parent)
    headers = build_headers(task.name, task_id, args, kwargs, retries=retries,
                            root_id=parent_request.root_id or task_id, parent_id=parent_request.id)
    return Message(headers=headers, properties={"delivery_info": {"is_eager": True}},
                   body=b"", content_type=JSON_TYPE, args=list(args), kwargs=kwargs)


@dataclasses.dataclass
class Outcome:
    """What run_task() decided; the worker acks, requeues or logs from it."""
    state: str
    retval: object = None
    traceback: str = None
    runtime: float = 0.0
    #: Reject(requeue=True): put the message back instead of acking it
    requeue: bool = False


IGNORED, REJECTED = "IGNORED", "REJECTED"


def run_task(app, message: Message, hostname=None, eager=False, now=None, verdict=None) -> Outcome:
    """Run one task message and store its outcome; never raises for a task's error.

    Shared by the solo pool, the prefork pool processes and eager apply(), so
    the rules for states, retries, hooks and logging live only here. With a
    `verdict` (an exception: the worker revoked the task, or lost it with its
    pool process), or once it expired, the task does not run: it ends with that.
    """
    task = app.tasks[message.task_name]
    request = Request.from_message(message, hostname=hostname, is_eager=eager)
    request.time_limit, request.soft_time_limit = time_limits(task, message)
    ignore = message.headers.get("ignore_result") or task.option("ignore_result")
    keep = not ignore and (not eager or app.conf.task_store_eager_result)
    errors_too = ignore and not eager and app.conf.task_store_errors_even_if_ignored

    def store(result, state, traceback=None):
        """Store a state of this task, unless it is one ignore_result leaves out."""
        if keep or (errors_too and state == FAILURE):
            task.backend.store_result(request.id, result, state, traceback=traceback, request=request)
    if verdict is None and message.expires is not None and message.expires <= (now or utcnow()):
        verdict = TaskRevokedError("expired")
    if verdict is not None:
        return _end_unrun(app, message, request, verdict, store, hostname)
    if task.option("track_started") and not eager:
        store({"pid": os.getpid(), "hostname": hostname}, STARTED)
    _task_event(app, message, hostname, "task-started")
    task.push_request(request)
    started, pid = time.perf_counter(), os.getpid()
    try:
        task_prerun.send(sender=task, task_id=message.id, task=task, args=message.args, kwargs=message.kwargs)
        outcome = _call_task(task, request, message, None if eager else request.soft_time_limit)
        if pid != os.getpid() and not eager:
            os._exit(0)  # the task forked, and its child returned: it must not go on as a worker
        outcome.runtime = time.perf_counter() - started
        _store_outcome(task, request, outcome, store)
    finally:
        task.pop_request()
    _outcome_event(app, message, hostname, outcome)
    _call_hook(task.after_return, outcome.state, outcome.retval, message.id,
               message.args, message.kwargs, outcome.traceback)
    task_postrun.send(sender=task, task_id=message.id, task=task, args=message.args, kwargs=message.kwargs,
                      retval=outcome.retval, state=outcome.state)
    return outcome


def _end_unrun(app, message, request, exc, store, hostname) -> Outcome:
    """End a task that won't run: revoked (or expired), or lost with its pool process
    (killed at its hard time limit, terminated, or dead). It is stored as REVOKED or
    FAILURE, and what waits on it hears: its chord counts it, and a failure reaches its
    errbacks and the rest of its chain, as Celery's worker does."""
    state = REVOKED if isinstance(exc, TaskRevokedError) else FAILURE
    why = exc.args[0] if exc.args else ""
    if state == REVOKED:
        if why != "terminated":
            worker_logger.info("Discarding revoked task: %s", message.describe())
        _task_event(app, message, hostname, "task-revoked", terminated=why == "terminated", signum=None,
                    expired=why == "expired")
    store(exc, state)
    if not request.is_eager:
        _after_failure(app, request, exc, None, state)
    return Outcome(state, exc)


def _task_event(app, message, hostname, kind, **fields):
    """A task event from where the task runs, when its worker sends them (-E)."""
    if message.events:
        try:
            app.broker.send_event(make_event(kind, hostname, uuid=message.id, **fields))
        except Exception as exc:  # a lost event must not change the task's outcome
            task_logger.debug("event %s not sent: %r", kind, exc)


def _outcome_event(app, message, hostname, outcome):
    """The events of how a task ended: a rejection that won't be requeued is a failure too."""
    state, retval = outcome.state, _short_repr(outcome.retval)
    if state == SUCCESS:
        _task_event(app, message, hostname, "task-succeeded", result=retval, runtime=outcome.runtime)
    elif state in (FAILURE, RETRY) or (state == REJECTED and not outcome.requeue):
        _task_event(app, message, hostname, "task-retried" if state == RETRY else "task-failed",
                    exception=retval, traceback=outcome.traceback)
    if state == REJECTED:
        _task_event(app, message, hostname, "task-rejected", requeue=outcome.requeue)


def _call_task(task, request, message, soft_time_limit=None) -> Outcome:
    """Call the task function and turn how it ended into an Outcome."""
    try:
        with _soft_time_limit(soft_time_limit, request):
            retval = task(*message.args, **message.kwargs)
    except Retry as exc:
        return Outcome(RETRY, exc, _format_exc())
    except Ignore:
        return Outcome(IGNORED)
    except Reject as exc:
        return Outcome(REJECTED, exc, requeue=exc.requeue)
    except Exception as exc:
        if task.autoretry_for and isinstance(exc, tuple(task.autoretry_for)):
            return _autoretry(task, request, exc, _format_exc())
        return Outcome(FAILURE, exc, _format_exc())
    except (SystemExit, KeyboardInterrupt) as exc:
        if isinstance(exc, WorkerTerminate):
            raise  # our own cold shutdown, interrupting a task in the solo pool
        # sys.exit() in a task ends the task, not the process running it.
        return Outcome(FAILURE, exc, _format_exc())
    return Outcome(SUCCESS, retval)


def _autoretry(task, request, exc, exc_traceback) -> Outcome:
    """autoretry_for: retry with retry_kwargs (and backoff); fail once retries are used up."""
    options = {**task.retry_kwargs, "throw": False}  # (the Retry is returned, to be the outcome)
    if task.retry_backoff and "countdown" not in options:
        options["countdown"] = task.backoff_countdown(request.retries)
    try:
        return Outcome(RETRY, task.retry(exc=exc, **options), exc_traceback)
    except Exception as final:  # retries used up: retry() re-raised exc
        return Outcome(FAILURE, final, exc_traceback)


@contextlib.contextmanager
def _soft_time_limit(seconds, request):
    """Raise SoftTimeLimitExceeded inside the task after `seconds` (SIGALRM; main thread only)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        task_logger.warning("Soft time limit (%ss) exceeded for %s", seconds, printable(f"{request.task}[{request.id}]"))
        raise SoftTimeLimitExceeded(seconds)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def time_limits(task, message):
    """(hard, soft) seconds for a message: per call, else per task, else the app's."""
    hard, soft = (list(message.headers.get("timelimit") or ()) + [None, None])[:2]
    return (hard if hard is not None else task.option("time_limit"),
            soft if soft is not None else task.option("soft_time_limit"))


def parse_rate(rate) -> float:
    """'10/s', '100/m', '1000/h' or a number per second, as tasks per second (0: no limit)."""
    if not rate:
        return 0.0
    if isinstance(rate, (int, float)):
        return float(rate)
    count, _, unit = str(rate).partition("/")
    try:
        return float(count) / {"s": 1, "m": 60, "h": 3600}[unit or "s"]
    except (KeyError, ValueError):
        raise ImproperlyConfigured(f"rate limit {rate!r} is not like '10/s', '100/m' or '1000/h'") from None


def _store_outcome(task, request, outcome, store):
    """Store, hook and log an outcome, as Celery's worker does."""
    name = printable(f"{task.name}[{request.id}]")  # (the id comes from the message: no line of its own)
    if outcome.state == SUCCESS:
        try:
            store(outcome.retval, SUCCESS)
        except EncodeError as exc:
            outcome.state, outcome.retval, outcome.traceback = FAILURE, exc, _format_exc()
        else:
            task_logger.info("Task %s succeeded in %ss: %s", name, outcome.runtime, _short_repr(outcome.retval))
            _call_hook(task.on_success, outcome.retval, request.id, request.args, request.kwargs)
            task_success.send(sender=task, result=outcome.retval)
            if not request.is_eager:
                _after_success(task.app, request, outcome.retval)
            return
    if outcome.state == RETRY:
        retry = outcome.retval
        task_logger.info("Task %s retry: %s", name, retry)
        request.children = [[[request.id, None], None]]  # the retry message, as Celery lists it
        store(retry.exc if retry.exc is not None else retry, RETRY, outcome.traceback)
        request.children = []
        einfo = ExceptionInfo(retry, outcome.traceback)
        _call_hook(task.on_retry, retry.exc or retry, request.id, request.args, request.kwargs, einfo)
        task_retry.send(sender=task, request=request, reason=retry, einfo=einfo)
    elif outcome.state == FAILURE:
        exc = outcome.retval
        task_logger.error("Task %s raised unexpected: %s\n%s", name, _short_repr(exc), outcome.traceback.rstrip())
        store(exc, FAILURE, outcome.traceback)
        einfo = ExceptionInfo(exc, outcome.traceback)
        _call_hook(task.on_failure, exc, request.id, request.args, request.kwargs, einfo)
        task_failure.send(sender=task, task_id=request.id, exception=exc, args=request.args, kwargs=request.kwargs,
                          traceback=exc.__traceback__, einfo=einfo)
        if not request.is_eager:
            _after_failure(task.app, request, exc, outcome.traceback)
    elif outcome.state == REJECTED:
        task_logger.info("Task %s rejected: %s", name, outcome.retval.reason)
        if not outcome.requeue:  # it will never run again: a FAILURE, or it reads PENDING for ever (as Celery)
            store(outcome.retval, FAILURE)
            if not request.is_eager:
                _after_failure(task.app, request, outcome.retval, None)


class ExceptionInfo(str):
    """Celery's `einfo`: the traceback text (a str, as before), with the exception, its
    type and traceback object as attributes."""

    def __new__(cls, exception, text):
        einfo = super().__new__(cls, text or "")
        einfo.exception, einfo.type, einfo.tb, einfo.traceback = exception, type(exception), \
            exception.__traceback__, text or ""
        return einfo


def _call_hook(hook, *args):
    # A broken hook must not change the task's outcome or kill the worker.
    try:
        hook(*args)
    except Exception:
        task_logger.exception("hook %s raised", getattr(hook, "__qualname__", hook))


# =============================================================================
# 8. Canvas: signatures, chains, groups and chords
# =============================================================================
# A signature is a task call to make later, in Celery's dict form, so it can
# travel inside messages. Workflows are built from messages alone: a chain
# rides in the first message's `embed.chain` (the rest, reversed), a callback
# in `embed.callbacks`, and each chord header message carries the body in
# `embed.chord`; the backend counts finished header tasks, and the worker that
# stores the last one sends the body (as Celery does on Redis: no polling unlock task).

def _args_list(args) -> list:
    """A signature's positional arguments as a list; a string or a mapping is refused (its
    characters or keys would become the arguments)."""
    if isinstance(args, (str, bytes, dict)):
        raise TypeError(f"a signature's args must be a list or tuple, not {type(args).__name__}")
    return list(args or ())


class Signature(dict):
    """`add.s(2, 2)`: task name, args, kwargs and options, as Celery's dict."""

    def __init__(self, task=None, args=(), kwargs=None, options=None, subtask_type=None,
                 immutable=False, app=None, **more_options):
        super().__init__(task=getattr(task, "name", task), args=_args_list(args),
                         kwargs=dict(kwargs or {}), options=dict(options or {}, **more_options),
                         subtask_type=subtask_type, immutable=immutable)
        self.app = app or getattr(task, "app", None)

    task = property(lambda self: self["task"])
    args = property(lambda self: self["args"], lambda self, value: self.__setitem__("args", _args_list(value)))
    kwargs = property(lambda self: self["kwargs"], lambda self, value: self.__setitem__("kwargs", dict(value)))
    options = property(lambda self: self["options"], lambda self, value: self.__setitem__("options", dict(value)))
    immutable = property(lambda self: self["immutable"])
    id = property(lambda self: self["options"].get("task_id"))

    @classmethod
    def from_dict(cls, value, app=None):
        return signature(value, app=app)

    def _app(self):
        return self.app or current_app()

    type = property(lambda self: self._app().tasks[self.task])

    def clone(self, args=(), kwargs=None, **options):
        """A copy with `args` prepended (partial arguments) unless immutable."""
        args, kwargs, options = self._merge(args, kwargs, options)
        return signature(dict(self, args=args, kwargs=kwargs, options=options), app=self.app)

    def _merge(self, args, kwargs, options):
        options = dict(self.options, **options)
        if self.immutable:
            return list(self.args), dict(self.kwargs), options
        return list(args or ()) + list(self.args), dict(self.kwargs, **(kwargs or {})), options

    def set(self, immutable=None, **options):
        if immutable is not None:
            self["immutable"] = immutable
        self.options.update(options)
        return self

    def freeze(self, _id=None):
        """Fix the task id now (one it has, else `_id`, else a new one), so the result
        is known before sending."""
        return AsyncResult(self.options.setdefault("task_id", _id or uuid()), app=self._app(), task_name=self.task)

    def stamp(self, visitor=None, append_stamps=False, **headers):
        """Celery's stamping: `headers`, and what `visitor` (a StampingVisitor) returns for
        each signature, go as stamps into the message of every task of this workflow
        (`request.stamps`), its callbacks and errbacks included."""
        for key, hook in (("link", "on_callback"), ("link_error", "on_errback")):
            for i, linked in enumerate(self.options.get(key) or ()):
                linked = self.options[key][i] = signature(linked, app=self.app)
                linked._add_stamps(dict(headers, **_visit(visitor, hook, linked, headers)), append_stamps)
        self._add_stamps(dict(headers, **_visit(visitor, "on_signature", self, headers)), append_stamps)
        return self

    def _add_stamps(self, stamps, append_stamps):
        stamped = self.options.setdefault("stamped_headers", [])
        for name, value in stamps.items():
            if append_stamps and name in stamped and self.options.get(name) not in (None, value):
                old = self.options[name]
                value = (old if isinstance(old, list) else [old]) + [value]
            self.options[name] = value
            if name not in stamped:
                stamped.append(name)

    def link(self, callback):
        # (a new list each time: a clone shares its original's options until it changes one)
        self.options["link"] = _as_list(self.options.get("link")) + [callback]
        return callback

    def link_error(self, errback):
        self.options["link_error"] = _as_list(self.options.get("link_error")) + [errback]
        return errback

    def on_error(self, errback):
        """`chain(...).on_error(errback)`: link_error that returns the signature itself."""
        self.link_error(errback)
        return self

    def apply_async(self, args=(), kwargs=None, **options):
        args, kwargs, options = self._merge(args, kwargs, options)
        app = self._app()
        if self.task in app.tasks:
            return app.tasks[self.task].apply_async(args, kwargs, **options)
        return app.send_task(self.task, args, kwargs, **options)

    def delay(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def apply(self, args=(), kwargs=None, **options):
        args, kwargs, options = self._merge(args, kwargs, options)
        return self.type.apply(args, kwargs, task_id=options.get("task_id"))

    def __call__(self, *args, **kwargs):
        args, kwargs, _ = self._merge(args, kwargs, {})
        return self.type(*args, **kwargs)

    def __or__(self, other):
        if isinstance(self, group) and not isinstance(other, group):
            return chord(self, other, app=self.app)
        return chain(self, other, app=self.app or other.app)

    def __repr__(self):
        args = ", ".join([repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        return f"{self.task}({args}){'!' if self.immutable else ''}"


class StampingVisitor:
    """Celery's stamping visitor: override on_signature (and any other hook) to return
    the stamps, a dict, for each part of a workflow that stamp() walks."""

    def on_signature(self, sig, **headers):
        return {}

    def on_group_start(self, group, **headers):
        return {}

    def on_group_end(self, group, **headers):
        pass

    def on_chain_start(self, chain, **headers):
        return {}

    def on_chain_end(self, chain, **headers):
        pass

    def on_chord_header_start(self, chord, **headers):
        return self.on_group_start(chord.header, **headers)

    def on_chord_header_end(self, chord, **headers):
        self.on_group_end(chord.header, **headers)

    def on_chord_body(self, chord, **headers):
        return {}

    def on_callback(self, callback, **headers):
        return {}

    def on_errback(self, errback, **headers):
        return {}


def _visit(visitor, hook, sig, headers):
    return (getattr(visitor, hook)(sig, **headers) or {}) if visitor is not None else {}


def signature(value, *args, app=None, **kwargs) -> Signature:
    """A Signature from a task name, a Signature, or Celery's dict form of one."""
    if isinstance(value, dict):
        kind = {"chain": chain, "group": group, "chord": chord}.get(value.get("subtask_type"))
        if kind is not None:
            return kind._from_dict(value, app or getattr(value, "app", None))
        return Signature(value["task"], value.get("args"), value.get("kwargs"), value.get("options"),
                         value.get("subtask_type"), value.get("immutable", False),
                         app=app or getattr(value, "app", None))
    return Signature(value, *args, app=app, **kwargs)


subtask = signature


def _tasks_from(tasks):
    if len(tasks) == 1 and not isinstance(tasks[0], dict):
        tasks = tuple(tasks[0])  # chain([a, b]) or group(generator)
    return tasks


class _TaskList(Signature):
    """What a chain and a group share: their tasks, an errback for every task, and stamping
    that walks the tasks (with the visitor's on_chain_* or on_group_* hooks)."""

    @property
    def tasks(self):
        """The member signatures, as objects stored in place, so freeze() sticks."""
        stored = self.kwargs["tasks"]
        stored[:] = [t if isinstance(t, Signature) else signature(t, app=self.app) for t in stored]
        for task in stored:
            task.app = task.app or self.app  # (a member made without an app is sent by the workflow's)
        return stored

    @classmethod
    def _from_dict(cls, value, app):
        return cls(*value["kwargs"]["tasks"], app=app, **value.get("options", {}))

    def link_error(self, errback):
        for task in self.tasks:
            task.link_error(errback)
        return errback

    def stamp(self, visitor=None, append_stamps=False, **headers):
        kind = self["subtask_type"]  # "chain" or "group"
        headers = dict(headers, **_visit(visitor, f"on_{kind}_start", self, headers))
        for task in self.tasks:
            task.stamp(visitor, append_stamps, **headers)
        _visit(visitor, f"on_{kind}_end", self, headers)
        return self


def _flat_tasks(header):
    """A group's tasks, with the tasks of a group in it in its place (as Celery runs them)."""
    return [member for task in header.tasks
            for member in (_flat_tasks(task) if isinstance(task, group) else [task])]


def _parts_counted(sig):
    """How many finished tasks a chord header member adds: one (a chain: its last step,
    whose value is a list if it is a group), or one per task of a group (a chord: its body)."""
    if isinstance(sig, chain):
        return 1 if sig.tasks else 0
    if isinstance(sig, chord):
        sig = sig.body
    return len(_flat_tasks(sig)) if isinstance(sig, group) else 1


def _chain_steps(flat, app):
    """Celery's rules for the steps of a chain, applied from the end: an empty group
    is skipped; a group followed by a step is a chord with that step as its body; a
    chord whose body is a chain led by a task keeps only that task as its body, and
    the rest of the body follows it in the chain (so a chord followed by steps
    hands them to its body at run time, not to each header task).

    Celery: chain-steps: Celery applies these rules when the chain is sent, so its
    `chain.tasks` shows the steps as written; here they are applied when the chain
    is made, and `chain.tasks` shows the chord a group became."""
    steps = []
    for task in reversed(flat):
        if isinstance(task, group) and not task.tasks and (steps or task is not flat[0]):
            continue
        if isinstance(task, group) and steps:
            task = chord(task, steps.pop(0), app=app)
        if isinstance(task, chord) and isinstance(task.body, chain) and task.body.tasks \
                and not isinstance(task.body.tasks[0], group):
            body_steps = task.body.tasks
            steps[:0] = body_steps[1:]
            task = chord(task.header, body_steps[0], app=app, **task.options)
        steps.insert(0, task)
    return steps


class chain(_TaskList):
    """`a.s() | b.s() | c.s()`: each result goes to the next task, unless it is immutable."""

    def __init__(self, *tasks, app=None, **options):
        flat = []
        for task in _tasks_from(tasks):
            task = signature(task, app=app)
            flat.extend(task.tasks if isinstance(task, chain) else [task])
        super().__init__("celery.chain", (), {"tasks": _chain_steps(flat, app)}, options, "chain",
                         app=app or (flat[0].app if flat else None))

    id = property(lambda self: self.tasks[-1].id)

    def freeze(self, _id=None):
        results = [task.freeze() for task in self.tasks[:-1]] + [self.tasks[-1].freeze(_id)]
        for parent, result in zip(results, results[1:]):
            result.parent = parent
        return results[-1]

    def link(self, callback):
        return self.tasks[-1].link(callback)

    def apply_async(self, args=(), kwargs=None, **options):
        if not self.tasks:
            return None  # (as Celery: nothing to send)
        if self._app().conf.task_always_eager:
            return self.apply(args, kwargs)
        options = dict(self.options, **options)
        # (as Celery: a chain's callbacks are its last task's, its errbacks every task's)
        for callback in _as_list(options.pop("link", None)):
            Signature.link(self.tasks[-1], callback)  # (its option, whatever it is: a chord's goes to its body)
        for errback in _as_list(options.pop("link_error", None)):
            for task in self.tasks:
                Signature.link_error(task, errback)
        # Inside a group or chord header, the chain's last task is the member that counts.
        membership = {k: options.pop(k) for k in ("group_id", "group_index", "chord") if k in options}
        # Celery: header-chain-group: our client sends a chain ending with a group in a chord's
        # header as one part, the group's list, which is what Celery's worker makes of it; our
        # worker counts each task of such a group when Celery's client sent it ([3, 4, 10]).
        if membership.get("chord") and isinstance(self.tasks[-1], group):
            self.tasks[-1] = chord(self.tasks[-1], self._app().tasks["celery.accumulate"].s(index=0))
        self.tasks[-1].options.update(membership)
        result = self.freeze(options.pop("task_id", None))  # (a chain's task_id is its last task's)
        first, rest = self.tasks[0], self.tasks[1:]
        # (stored reversed, so a worker pops the next step; what followed an enclosing
        # chord's body, given as `chain`, comes after this chain's own steps)
        rest = (options.pop("chain", None) or []) + list(reversed(rest))
        first.apply_async(args, kwargs, chain=rest or None, **options)
        return result

    def __call__(self, *args, **kwargs):
        return self.apply_async(args, kwargs)

    def apply(self, args=(), kwargs=None, **options):
        result = None
        for task in self.tasks:
            result = task.apply(args if result is None else (result.get(),), kwargs if result is None else None)
        return result


class group(_TaskList):
    """`group(add.s(i, i) for i in range(10))()`: run in parallel; GroupResult in order."""

    def __init__(self, *tasks, app=None, **options):
        members = [signature(t, app=app) for t in _tasks_from(tasks)]
        super().__init__("celery.group", (), {"tasks": members}, options, "group",
                         app=app or (members[0].app if members else None))

    def link(self, callback):
        """(As Celery: the first task's, made immutable; it runs once, whatever the others do.)"""
        return self.tasks[0].link(callback.clone().set(immutable=True)) if self.tasks else callback

    def apply_async(self, args=(), kwargs=None, **options):
        app, options = self._app(), dict(self.options, **options)
        if app.conf.task_always_eager:
            return self.apply(args, kwargs)
        group_id = options.pop("group_id", None) or options.get("task_id") or uuid()
        options.pop("task_id", None)
        options.pop("group_index", None)  # (each member has its own)
        add_to_parent = options.pop("add_to_parent", True)
        results = [task.clone().apply_async(args, kwargs, group_id=group_id, group_index=i, add_to_parent=False,
                                            **options) for i, task in enumerate(_flat_tasks(self))]
        if len(results) == 1 and isinstance(results[0], GroupResult):  # (as Celery: the one group's)
            return _trail(results[0], add_to_parent)
        return _trail(GroupResult(group_id, results, app=app), add_to_parent)

    def __call__(self, *partial_args, **options):
        return self.apply_async(partial_args, **options)

    def apply(self, args=(), kwargs=None, **options):
        return GroupResult(uuid(), [t.apply(args, kwargs) for t in self.tasks], app=self._app())

    def freeze(self, _id=None):
        return GroupResult(self.options.setdefault("task_id", _id or uuid()),
                           [t.freeze() for t in _flat_tasks(self)], app=self._app())


class chord(Signature):
    """`chord(header)(body)`: run the header group, then the body with the list of results."""

    def __init__(self, header, body=None, app=None, **options):
        header = header if isinstance(header, group) else group(header, app=app)
        body = signature(body, app=app) if body is not None else None
        super().__init__("celery.chord", (), {"header": header, "body": body}, options, "chord",
                         app=app or header.app)

    @classmethod
    def _from_dict(cls, value, app):
        header = value["kwargs"]["header"]  # (a group, or a list of signatures)
        return cls(header if isinstance(header, list) else signature(header, app=app), value["kwargs"].get("body"),
                   app=app, **value.get("options", {}))

    @property
    def header(self):
        if not isinstance(self.kwargs["header"], group):  # (kept in place, so freeze() sticks)
            self.kwargs["header"] = signature(self.kwargs["header"], app=self.app)
        return self.kwargs["header"]

    tasks = property(lambda self: self.header.tasks)

    @property
    def body(self):
        if self.kwargs["body"] is not None and not isinstance(self.kwargs["body"], Signature):
            self.kwargs["body"] = signature(self.kwargs["body"], app=self.app)
        return self.kwargs["body"]

    def freeze(self, _id=None):
        return self.body.freeze(_id)

    def link(self, callback):
        return self.body.link(callback)

    def link_error(self, errback):  # (as Celery's default: the body's, not the header's)
        return self.body.link_error(errback)

    def stamp(self, visitor=None, append_stamps=False, **headers):
        headers = dict(headers, **_visit(visitor, "on_chord_header_start", self, headers))
        for task in self.header.tasks:
            task.stamp(visitor, append_stamps, **headers)
        _visit(visitor, "on_chord_header_end", self, headers)
        self.body.stamp(visitor, append_stamps, **dict(headers, **_visit(visitor, "on_chord_body", self, headers)))
        return self

    def __call__(self, body=None, **options):
        if body is not None:
            self.kwargs["body"] = signature(body, app=self.app)
        return self.apply_async((), **options)

    def apply_async(self, args=(), kwargs=None, **options):
        app, header, options = self._app(), self.header, dict(self.options, **options)
        if app.conf.task_always_eager:
            return self.apply(args, kwargs)
        options.pop("add_to_parent", None)
        # In a group or a chord's header, a chord counts through its body; the rest of a
        # chain it is part of goes on after its body. The header tasks get neither.
        outer = {k: options.pop(k) for k in ("group_id", "group_index", "chord", "chain") if k in options}
        group_id, task_id = header.options.get("task_id") or uuid(), options.pop("task_id", None)
        body = self.body.clone(**outer)
        body.options.setdefault("group_id", group_id)
        for callback in _as_list(options.pop("link", None)):  # (a chord's links are its body's)
            Signature.link(body, callback)
        for errback in _as_list(options.pop("link_error", None)):
            Signature.link_error(body, errback)
        result = body.freeze(task_id)
        members = _flat_tasks(header)  # (a group in the header counts as its tasks)
        if not members:
            body.apply_async(([],), **options)
            return result
        # The size must be stored before any header task can finish.
        app.backend.chord_start(group_id, sum(_parts_counted(member) for member in members))
        parts = [task.clone().apply_async(args, kwargs, group_id=group_id, group_index=i, chord=body,
                                          add_to_parent=False, **options) for i, task in enumerate(members)]
        result.parent = GroupResult(group_id, parts, app=app)
        return _trail(result)

    def apply(self, args=(), kwargs=None, **options):
        values = self.header.apply(args, kwargs).get()
        return self.body.apply((values,))


def xmap(task, it, **options):
    """`add.map([1, 2])`: one task that calls `task` for each item, returning the list."""
    return Signature("celery.map", (), {"task": dict(signature(task)), "it": list(it)}, options, "xmap", True,
                     app=getattr(task, "app", None))


def xstarmap(task, it, **options):
    """`add.starmap([(1, 2), (3, 4)])`: one task that calls `task(*item)` for each item."""
    return Signature("celery.starmap", (), {"task": dict(signature(task)), "it": list(it)}, options, "xstarmap", True,
                     app=getattr(task, "app", None))


class chunks(Signature):
    """`add.chunks(pairs, 10)`: the items split into parts of n, a starmap task for each, as a group."""

    def __init__(self, task, it, n, **options):
        super().__init__("celery.chunks", (), {"task": dict(signature(task)), "it": list(it), "n": n}, options,
                         "chunks", True, app=getattr(task, "app", None))

    def group(self):
        task, items, n = self.kwargs["task"], self.kwargs["it"], self.kwargs["n"]
        return group([xstarmap(task, items[i:i + n]) for i in range(0, len(items), n)], app=self.app)

    def apply_async(self, args=(), kwargs=None, **options):
        return self.group().apply_async(args, kwargs, **options)


def _add_builtin_tasks(app):
    """The tasks Celery's canvas names: replace() gathers a group's results with
    celery.accumulate; xmap, xstarmap and chunks run as celery.map, .starmap, .chunks."""
    @app.task(name="celery.accumulate")
    def accumulate(*args, index=None, **kwargs):
        return args[index] if index is not None else args

    @app.task(name="celery.map")
    def map_(task, it):
        task = signature(task, app=app).type  # (as Celery: the task, not its stored arguments)
        return [task(item) for item in it]

    @app.task(name="celery.starmap")
    def starmap(task, it):
        task = signature(task, app=app).type
        return [task(*item) for item in it]

    @app.task(name="celery.chunks")
    def chunks_(task, it, n):
        return chunks(signature(task, app=app), it, n).apply_async()


def result_from_tuple(value, app=None):
    """A result from Celery's nested-list form: [[id, parent], None] for a task's,
    [[id, None], [results...]] for a group's; None for anything else (it was stored
    by someone: a malformed one is left out, not raised)."""
    try:
        (result_id, parent), children = value
        if not isinstance(result_id, str):
            return None
        if isinstance(children, list):
            return GroupResult(result_id, [r for c in children if (r := result_from_tuple(c, app))], app=app)
        return AsyncResult(result_id, app=app, parent=result_from_tuple(parent, app) if parent else None)
    except (TypeError, ValueError, RecursionError):
        return None


class GroupResult:
    """The results of a group, in order: `get()` is the list of their values."""

    def __init__(self, id, results, app=None):
        self.id, self.results, self.app = id, list(results), app or current_app()

    def get(self, timeout=None, propagate=True, interval=0.5, disable_sync_subtasks=True):
        deadline = None if timeout is None else time.monotonic() + timeout
        return [r.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.001),
                      propagate=propagate, interval=interval, disable_sync_subtasks=disable_sync_subtasks)
                for r in self.results]

    join = get

    def ready(self):
        return all(r.ready() for r in self.results)

    def successful(self):
        return all(r.successful() for r in self.results)

    def failed(self):
        return any(r.failed() for r in self.results)

    def completed_count(self):
        return sum(1 for r in self.results if r.successful())

    def revoke(self, terminate=False, signal="SIGTERM"):
        self.app.control.revoke([r.id for r in self.results], terminate=terminate, signal=signal)

    def as_tuple(self):
        return [[self.id, None], [r.as_tuple() for r in self.results]]

    def save(self):
        """Store as `celery-taskset-meta-<id>`, so GroupResult.restore(id) finds it."""
        backend = self.app.backend
        backend._set(f"{backend.TASKSET_PREFIX}{self.id}", backend.encode({"result": self.as_tuple()}))
        return self

    @classmethod
    def restore(cls, group_id, app=None):
        app = app or current_app()
        data = app.backend._get(f"{app.backend.TASKSET_PREFIX}{group_id}")
        if data is None:
            return None
        _, members = app.backend.decode(data)["result"]
        return cls(group_id, [AsyncResult(m[0][0], app=app) for m in members], app=app)

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def __repr__(self):
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"


class ChordError(MiniCeleryError):
    """Stored as the chord body's FAILURE when a header task failed."""


def _after_success(app, request, retval):
    """Start what comes next: link callbacks, the rest of a chain, a chord's body."""
    ids = {"parent_id": request.id, "root_id": request.root_id or request.id}
    for callback in request.callbacks or ():
        _send_next(app, callback, (retval,), **ids)
    if request.chain:
        rest = list(request.chain)
        _send_next(app, rest.pop(), (retval,), chain=rest or None, **ids)
    if request.chord:  # (a result a task returned counts as its tuple, as it is stored)
        _chord_part_done(app, request, SUCCESS, _stored_value(retval))


def _stored_value(value):
    """A value as the backend stores it: a result (AsyncResult, GroupResult) as its tuple."""
    return value.as_tuple() if isinstance(value, (AsyncResult, GroupResult)) else value


def _send_next(app, sig, args, **options):
    """Send a workflow's next step. One that can't be sent (its arguments don't fit
    its task, they can't be serialized) fails at once, and so does what waits on it:
    the rest of its chain, its chord, its errbacks; nobody's get() waits for ever."""
    sig = signature(sig, app=app)
    try:
        sig.apply_async(args, **options)
    except (TypeError, EncodeError, NotRegistered) as exc:
        task_logger.error("Can't send %r: %r", sig, exc)
        for task_id in _result_ids(sig):
            app.backend.store_result(task_id, exc, FAILURE, traceback=_format_exc())
        step = _step_request(sig, options.get("chain"), options.get("root_id"))
        step.errbacks = _unique([*(step.errbacks or []), *_errbacks_within(sig)])  # (each runs once)
        _after_failure(app, step, exc, _format_exc())


def _errbacks_within(sig) -> list:
    """The errbacks of a signature that won't run: its own; a group's, those of each task
    (a chain's errbacks sit on each of its tasks); a chord's, its own (where Celery's
    client puts them) and its body's."""
    if isinstance(sig, chord):
        return (_signature_list(sig.options.get("link_error")) or []) + _errbacks_within(sig.body)
    if isinstance(sig, group):
        return [errback for task in _flat_tasks(sig) for errback in _errbacks_within(task)]
    return _signature_list(sig.options.get("link_error")) or []


def _unique(items) -> list:
    """The items in order, each once (signatures are dicts: not hashable)."""
    return [item for i, item in enumerate(items) if item not in items[:i]]


def _step_request(sig, chain=None, root_id=None):
    """The Request of a workflow step that never ran, so its failure can reach what
    waits on it (Celery's backend makes the same stand-in from the signature)."""
    options = sig.options
    return Request(id=sig.id, task=sig.task, args=sig.args, kwargs=sig.kwargs, root_id=root_id,
                   chain=options.get("chain") or chain, errbacks=_signature_list(options.get("link_error")),
                   chord=options.get("chord"), group=options.get("group_id"), group_index=options.get("group_index"))


def _after_failure(app, request, exc, exc_traceback, state=FAILURE):
    """Errbacks run; the rest of the chain fails with the same error; a chord counts
    it, whether the task or its chain's last step is the chord's member. A revoked
    task (state REVOKED) is heard the same way, without errbacks (as Celery).

    Celery: revoked-chain: the steps after a revoked one are stored REVOKED; Celery's
    worker leaves them PENDING (its get() looks at the parents), so a chord whose
    header chain holds the revoked step waits there for ever."""
    if request.chord:
        _chord_part_done(app, request, state, exception_to_dict(exc))
    for step in reversed(request.chain or ()):  # (stored reversed) in order: the step get() waits on last
        step = signature(step, app=app)
        for step_id in _result_ids(step):
            app.backend.store_result(step_id, exc, state, traceback=exc_traceback)
        if step.options.get("chord"):
            _chord_part_done(app, _step_request(step), state, exception_to_dict(exc))
    if state == FAILURE:
        _call_errbacks(app, request, exc, exc_traceback)  # (last, as Celery: what waits is told first)


def _call_errbacks(app, request, exc, exc_traceback):
    """Celery's two errback styles: a function task that takes more than one argument
    (besides those its signature stores) is called here as `errback(request, exc,
    traceback)`; any other (bind=True, a Task class, unknown here) is sent as a task
    with the failed task's id."""
    for errback in request.errbacks or ():
        errback = signature(errback, app=app)
        if _is_new_style_errback(app.tasks.get(errback.task), errback):
            _call_hook(errback, request, exc, exc_traceback)
        else:  # (one that can't be sent is logged, failed, and the next errback still runs)
            _send_next(app, errback, (request.id,), parent_id=request.id, root_id=request.root_id or request.id)


def _is_new_style_errback(task, errback):
    if task is None or task._bound or not hasattr(task, "__wrapped__"):
        return False
    args, kwargs = ((), {}) if errback.immutable else (errback.args, errback.kwargs)
    try:
        params = inspect.signature(functools.partial(task.run, *args, **kwargs)).parameters.values()
    except (TypeError, ValueError):  # (stored arguments that don't fit: classified as if none)
        params = inspect.signature(task.run).parameters.values()
    kinds = [p.kind for p in params]
    return inspect.Parameter.VAR_POSITIONAL in kinds or sum(
        kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for kind in kinds) > 1


def _result_ids(sig):
    """The task ids a caller waits on for a (frozen) signature: a chord's body, a group's members."""
    if isinstance(sig, chord):
        return _result_ids(sig.body)
    if isinstance(sig, (group, chain)):
        members = _flat_tasks(sig) if isinstance(sig, group) else sig.tasks[-1:]
        return [i for member in members for i in _result_ids(member)]
    return [sig.id] if sig.id else []


def _chord_part_done(app, request, state, value):
    """Count one header task; the one that completes the chord sends (or fails) the body."""
    parts = app.backend.chord_part(request.group, request.group_index, request.id, state, value)
    if parts is None:
        return
    body = signature(request.chord, app=app)
    failed = [part for part in parts if part[2] in (FAILURE, REVOKED)]
    if failed:
        _, task_id, _, exc = failed[0]
        _fail_chord_body(app, request, body, task_id, exception_from_dict(exc))
    else:
        _send_next(app, body, ([part[3] for part in parts],), parent_id=request.id,
                   root_id=request.root_id or request.id)
    app.backend.chord_done(request.group)


def _chord_error(task_id, exc):
    """The ChordError a body fails with: a header's own ChordError (a chord in a chord's
    header) is passed on as it is, so nesting never grows the message."""
    if isinstance(exc, ChordError):
        return exc
    return ChordError(f"Dependency {task_id} raised {_short_repr(exc)}")


def _fail_chord_body(app, request, body, task_id, exc):
    """A header task failed: what waits on the body hears it (its result, its errbacks,
    its chain, an enclosing chord). Celery's rules: a body fails with ChordError, but
    a group body's tasks each fail with the header task's own error, and each calls
    its own errbacks (a chord's: its body's) and the group's, each errback once.

    Celery: nested-chord-error: a body that is in an outer chord's header counts as
    failed there (through _after_failure), so the outer chord fails too; Celery's
    worker leaves the outer chord waiting."""
    error = _chord_error(task_id, exc)
    members, group_errbacks = [body], []
    if isinstance(body, group):
        members, group_errbacks, error = _flat_tasks(body), body.options.get("link_error"), exc
        if body.id:  # (the group's own id too, as Celery marks it)
            app.backend.store_result(body.id, exc, FAILURE)
    for member in members:
        errbacks = _errbacks_within(member) + (_signature_list(group_errbacks) or [])
        while isinstance(member, chord):  # (what waits on a chord waits on its body)
            member = member.body
        for member_id in _result_ids(member):
            app.backend.store_result(member_id, error, FAILURE, request=Request(group=request.group))
        step = _step_request(member, root_id=request.root_id)
        step.errbacks = _unique(errbacks)
        _after_failure(app, step, error, None)
    if isinstance(body, group) and body.options.get("chain"):  # (the steps after a group body)
        rest = Request(id=body.id, chain=body.options["chain"], root_id=request.root_id)
        _after_failure(app, rest, _chord_error(task_id, exc), None)


# =============================================================================
# 9. App and configuration
# =============================================================================
# The app holds the settings (Celery's lower-case names and defaults), the
# task registry, and the broker and backend, created on first use from their
# URLs. Settings are checked when set: a wrong type fails right there.

@dataclasses.dataclass
class Config:
    """Celery's settings that minicelery honours, with Celery's defaults.

    broker_url and result_backend are the properties below the fields: they
    read what is in effect, also where it comes from the environment.
    """

    #: {'visibility_timeout': seconds a reserved message may go unacked (3600)}
    broker_transport_options: dict = dataclasses.field(default_factory=dict)
    task_serializer: str = "json"
    result_serializer: str = "json"
    #: content types a worker will decode; add 'pickle' only if you trust every sender
    accept_content: list | tuple | set = dataclasses.field(default_factory=lambda: ["json"])
    result_accept_content: list | tuple | set | None = None
    task_compression: str | None = None
    #: seconds (or a timedelta) results are kept; 0 or None keeps them forever
    result_expires: int | float | dt.timedelta | None = 86400
    task_default_queue: str = "celery"
    #: the queues a worker without -Q consumes: names, kombu Queue objects, or
    #: Celery 3's {name: {...}}; unset means task_default_queue alone
    task_queues: list | tuple | dict | None = None
    task_default_priority: int | None = None
    #: {'name or glob': {'queue': 'q'} or 'q'}, a list of those, or router functions
    task_routes: dict | list | tuple | None = None
    task_ignore_result: bool = False
    task_store_eager_result: bool = False
    task_store_errors_even_if_ignored: bool = False
    result_extended: bool = False
    #: ack after the task ran (at-least-once) instead of before (at-most-once)
    task_acks_late: bool = False
    #: with acks_late: requeue a task whose child died instead of failing it
    task_reject_on_worker_lost: bool = False
    task_track_started: bool = False
    #: run tasks inline on delay()/apply_async(); for tests
    task_always_eager: bool = False
    task_eager_propagates: bool = False
    #: retry sending while the broker is unreachable, by task_publish_retry_policy:
    #: {'max_retries': 3 (None: forever), 'interval_start': 0, 'interval_step': 0.2, 'interval_max': 0.2}
    task_publish_retry: bool = True
    task_publish_retry_policy: dict | None = None
    task_time_limit: int | float | None = None
    task_soft_time_limit: int | float | None = None
    #: rate limit for tasks that set none, like '10/s'
    task_default_rate_limit: str | int | float | None = None
    #: {'task name' or '*': {'option': value}} (or a list of those) overriding task options
    task_annotations: dict | list | tuple | None = None
    #: pool processes; None means one per CPU
    worker_concurrency: int | None = None
    #: messages reserved per pool process
    worker_prefetch_multiplier: int = 4
    #: minicelery's own: a message body larger than this many bytes is refused (dead letter)
    worker_max_message_size: int = 64 * 1024 * 1024
    worker_max_tasks_per_child: int | None = None
    #: task events (-E): received, started, succeeded, failed, retried, rejected, revoked
    worker_send_task_events: bool = False
    worker_disable_rate_limits: bool = False
    #: clients send a task-sent event for each task they send
    task_send_sent_event: bool = False
    #: 'prefork' or 'solo' (Celery's threads, eventlet and gevent pools are not here)
    worker_pool: str = "prefork"
    #: minicelery's own: explain mode, a log line for each broker and result-backend operation
    #: with the Redis commands or SQL it sends, and why; $MINICELERY_EXPLAIN=1 or `worker --explain`
    explain: bool = dataclasses.field(default_factory=lambda: _environment_flag("MINICELERY_EXPLAIN"))
    timezone: str | None = None
    enable_utc: bool = True
    #: {name: {'task': ..., 'schedule': seconds|timedelta|crontab, 'args', 'kwargs', 'options'}}
    beat_schedule: dict = dataclasses.field(default_factory=dict)
    #: longest beat sleeps between checks, in seconds
    beat_max_loop_interval: int | float = 300
    #: where beat keeps each entry's last run (JSON)
    beat_schedule_filename: str = "celerybeat-schedule.json"
    #: only Celery's default, the file above: database schedulers are not here
    beat_scheduler: str = "celery.beat:PersistentScheduler"
    #: modules the worker imports at start (Celery's `include` and `imports`)
    include: list | tuple = dataclasses.field(default_factory=list)
    imports: list | tuple = dataclasses.field(default_factory=list)

    #: the broker, and result backend, when none is configured anywhere: zero setup
    #: (Celery: default-broker: Celery's is amqp://localhost)
    DEFAULT_URL = "sqlite:///minicelery.db"

    @property
    def broker_url(self):
        """Where tasks go: $MINICELERY_BROKER_URL or $CELERY_BROKER_URL (as in Celery, the
        environment wins, so a deployment can point a project elsewhere), else the setting,
        else DEFAULT_URL. redis://[:password@]host:port/db, rediss://, redis+socket:///path,
        sqlite:///file, memory://name
        """
        return _environment_url("BROKER_URL", BROKERS) or self.__dict__.get("_broker_url") or self.DEFAULT_URL

    @broker_url.setter
    def broker_url(self, url):
        self.__dict__["_broker_url"] = _checked_url(url, BROKERS)

    @property
    def result_backend(self):
        """Where results go: its environment variables (they win, as in Celery), else the
        setting; a SQLite or memory broker keeps them too. None: results are not stored."""
        url = _environment_url("RESULT_BACKEND", BACKENDS) or self.__dict__.get("_result_backend")
        if url is None and self.broker_url.split("://")[0] in ("sqlite", "memory"):
            url = self.broker_url
        return url

    @result_backend.setter
    def result_backend(self, url):
        self.__dict__["_result_backend"] = _checked_url(url, BACKENDS)

    def __setattr__(self, name, value):
        self.update({name: value})

    def update(self, other=None, **settings):
        settings = dict(other or {}, **settings)
        unknown = [(name, value) for name, value in settings.items() if name not in self.__dataclass_fields__
                   and setting_name(name) is None and name.lower().startswith(_SETTING_PREFIXES)]
        _check_unused_settings(unknown)  # once for them all; stored all the same (apps keep their own here)
        for name, value in settings.items():
            self._set(name, value)

    def _set(self, name, value):
        if name not in self.__dataclass_fields__:  # Celery 3's names: CELERYD_CONCURRENCY is worker_concurrency
            name = setting_name(name) or name
        allowed = _CONFIG_TYPES.get(name)
        if allowed and not _fits(value, allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ImproperlyConfigured(
                f"setting {name} must be {names}, not {type(value).__name__}: {_mask_secrets(name, value)!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ImproperlyConfigured(f"setting {name} must be a finite number, not {value!r}")
        if _is_number(value) and value < 0:
            raise ImproperlyConfigured(f"setting {name} can't be negative: {value!r}")
        if name == "task_queues" and value:
            queue_names(value)  # fails here, not when a worker starts
        object.__setattr__(self, name, value)
        if name == "explain":  # (also turned on or off after the broker or backend was made)
            for store in [store for store in _STORES if store.app.conf is self]:
                store.explain_operations(value)

    def __repr__(self):
        # Settings end up in logs and tracebacks: URLs and anything named *password* masked.
        shown = (f"{name}={_mask_secrets(name, getattr(self, name))!r}" for name in _CONFIG_TYPES)
        return f"Config({', '.join(shown)})"

    def __getitem__(self, name):
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    __setitem__ = __setattr__

    def get(self, name, default=None):
        return getattr(self, name, default)

    @property
    def result_expires_seconds(self) -> int:
        """result_expires as whole seconds (Redis TTLs are integers); 0 means never."""
        value = self.result_expires
        value = value.total_seconds() if isinstance(value, dt.timedelta) else value
        return int(-(-value // 1)) if value else 0


def _checked_url(url, registry):
    """The URL, once its scheme is one minicelery offers: an unknown one (amqp://, django-db)
    fails where it is configured, at start-up, in one line that names those it offers."""
    if url:
        _pick_by_scheme(registry, url, "broker" if registry is BROKERS else "result backend")
    return url


def _environment_flag(name) -> bool:
    """An on/off environment variable; anything but 1/true/yes/on, 0/false/no/off or unset fails."""
    value = os.environ.get(name, "").strip().lower()
    if value not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        raise ImproperlyConfigured(f"${name} must be 1 or 0 (or true/false, yes/no, on/off), not {value!r}")
    return value in ("1", "true", "yes", "on")


def _environment_url(setting, registry):
    """$MINICELERY_<setting> or Celery's $CELERY_<setting>, checked like a configured URL."""
    return _checked_url(os.environ.get(f"MINICELERY_{setting}") or os.environ.get(f"CELERY_{setting}"), registry)


#: setting (or option) names whose values are hidden, as Celery's `inspect conf` hides them
#: (Celery: masked-secrets: here in every banner, log line, error and repr; see the README)
_SECRET_NAMES = re.compile(r"API|TOKEN|KEY|SECRET|PASS|SIGNATURE|DATABASE", re.IGNORECASE)


def _mask_secrets(name, value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {key: _mask_secrets(str(key), item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_secrets(name, item) for item in value]
    if _SECRET_NAMES.search(name) and value:
        return "**"
    return _safe_url(value) if isinstance(value, str) and "://" in value else value


def _fits(value, allowed):
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


#: each setting's allowed types, from its annotation: `int | None` is (int, NoneType)
_CONFIG_TYPES = {"broker_url": (str, type(None)), "result_backend": (str, type(None)),
                 **{f.name: typing.get_args(f.type) or (f.type,) for f in dataclasses.fields(Config)}}

#: Celery 3's upper-case setting names, renamed by prefix as Celery's table does
#: (CELERYD_CONCURRENCY: worker_concurrency), tried in this order ...
_OLD_PREFIXES = (("CELERYD_", "worker_"), ("CELERYBEAT_", "beat_"), ("CELERY_RESULT_", "result_"),
                 ("CELERY_DEFAULT_", "task_default_"), ("CELERY_TASK_", "task_"), ("BROKER_", "broker_"),
                 ("CELERY_", "task_"), ("CELERY_", ""), ("", ""))
#: ... except for these, which the table renames its own way
_OLD_RENAMES = {"CELERYD_TASK_TIME_LIMIT": "task_time_limit", "CELERYD_TASK_SOFT_TIME_LIMIT": "task_soft_time_limit",
                "CELERY_EAGER_PROPAGATES_EXCEPTIONS": "task_eager_propagates",
                "CELERY_MESSAGE_COMPRESSION": "task_compression", "CELERY_TASK_RESULT_EXPIRES": "result_expires",
                "CELERY_SEND_EVENTS": "worker_send_task_events", "CELERY_DISABLE_RATE_LIMITS": "worker_disable_rate_limits",
                "CELERY_SEND_TASK_SENT_EVENT": "task_send_sent_event"}


def setting_name(key):
    """The setting a key names: our names as they are, Celery 3's through Celery's
    renames (CELERY_ALWAYS_EAGER is task_always_eager); None for one we don't use."""
    if key in _CONFIG_TYPES or key in _OLD_RENAMES:
        return _OLD_RENAMES.get(key, key)
    return _celery5_name(key, _CONFIG_TYPES)


def _celery5_name(key, known):
    """Celery 3's upper-case key as Celery 5 names it (BROKER_USE_SSL: broker_use_ssl), if
    `known` has that name; else None."""
    for old, new in _OLD_PREFIXES if key.isupper() else ():
        if key.startswith(old) and new + key[len(old):].lower() in known:
            return new + key[len(old):].lower()
    return None


#: what names of Celery's settings start with, to tell a mistyped one from an app's own
_SETTING_PREFIXES = ("task_", "worker_", "result_", "broker_", "beat_", "celery", "redis_", "security_")


#: Celery settings that change nothing here, whatever their value: minicelery always
#: retries a broker it can't reach and its result backend, creates queues, leaves the
#: root logger alone, keeps its revocations in the broker; AMQP's exchanges, heartbeats
#: and queue types; connection pools; other result backends' options.
_QUIET_SETTINGS = {
    "broker_connection_retry_on_startup", "broker_connection_retry", "broker_connection_max_retries",
    "task_create_missing_queues", "worker_hijack_root_logger", "worker_redirect_stdouts", "worker_state_db",
    "broker_channel_error_retry", "broker_connection_timeout", "broker_failover_strategy", "broker_heartbeat",
    "broker_heartbeat_checkrate", "broker_login_method", "broker_native_delayed_delivery_queue_type",
    "broker_pool_acquire_timeout", "broker_pool_limit", "event_serializer", "redis_max_connections",
    "redis_retry_on_timeout", "redis_socket_connect_timeout", "redis_socket_keepalive", "redis_socket_timeout",
    "result_backend_always_retry", "result_backend_base_sleep_between_retries_ms", "result_backend_max_retries",
    "result_backend_max_sleep_between_retries_ms", "result_cache_max", "result_chord_join_timeout",
    "result_chord_retry_interval", "result_exchange", "result_exchange_type", "result_persistent",
    "task_create_missing_queue_exchange_type", "task_create_missing_queue_type", "task_default_delivery_mode",
    "task_default_exchange", "task_default_exchange_type", "task_default_queue_type", "task_default_routing_key",
    "task_queue_max_priority", "task_repr_maxlevels", "worker_agent", "worker_autoscaler", "worker_consumer",
    "worker_detect_quorum_queues", "worker_enable_prefetch_count_reduction", "worker_log_color", "worker_lost_wait",
    "worker_pool_putlocks", "worker_proc_alive_timeout", "worker_redirect_stdouts_level", "worker_timer",
    "worker_timer_precision", "beat_sync_every", "beat_remote_control_max_tick_age", "control_exchange",
    "control_queue_durable", "control_queue_exclusive", "control_queue_expires", "control_queue_ttl",
    "event_exchange", "event_queue_durable", "event_queue_exclusive", "event_queue_expires", "event_queue_prefix",
    "event_queue_ttl"}
_QUIET_PREFIXES = ("arangodb_", "azureblockblob_", "cassandra_", "cosmosdbsql_", "couchbase_", "database_",
                   "elasticsearch_", "gcs_", "mongodb_", "s3_", "cache_backend")

#: Celery settings minicelery doesn't offer, with Celery's default: set to it, nothing
#: changes; set otherwise, a project would silently not get what it asked for.
# Celery: settings: Celery honours these; here they are refused where the app is configured.
_NOT_OFFERED = {
    "beat_cron_starting_deadline": None, "beat_enable_remote_control": False, "broker_use_ssl": False,
    "broker_host": None, "broker_port": None, "broker_user": None, "broker_password": None, "broker_vhost": None,
    "broker_read_url": None, "broker_write_url": None, "broker_transport": None, "redis_backend_use_ssl": None,
    "redis_host": None, "redis_port": None, "redis_db": None, "redis_password": None, "redis_username": None,
    "result_backend_transport_options": {}, "result_chord_expires": None, "result_compression": None,
    "result_failure_expires": None, "security_cert_store": None, "security_certificate": None,
    "security_digest": "sha256", "security_key": None, "security_key_password": None, "task_acks_on_failure": None,
    "task_acks_on_failure_or_timeout": True, "task_acks_on_timeout": None,
    "task_allow_error_cb_on_chord_header": False, "task_inherit_parent_priority": False, "task_protocol": 2,
    "task_remote_tracebacks": False, "task_retry_on_worker_lost": False,
    "worker_cancel_long_running_tasks_on_connection_loss": False, "worker_deduplicate_successful_tasks": False,
    "worker_direct": False, "worker_disable_prefetch": False, "worker_enable_remote_control": True,
    "worker_enable_soft_shutdown_on_idle": False, "worker_eta_task_limit": None, "worker_log_datefmt": None,
    "worker_log_format": LOG_FORMAT, "worker_max_memory_per_child": None, "worker_pool_restarts": False,
    "worker_pool_start_method": "fork", "worker_soft_shutdown_timeout": 0.0, "worker_task_log_datefmt": None,
    "worker_task_log_format": "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"}


def _check_unused_settings(settings, prefix=""):
    """Settings minicelery has no use for ((key, value) pairs): Celery's that mean nothing
    here pass; Celery's that would change something are refused; the others (a typo, or
    an app's own) get one warning, with the closest name minicelery has."""
    refused, unknown = [], []
    for key, value in settings:
        name = _celery5_name(key[len(prefix):], _NOT_OFFERED.keys() | _QUIET_SETTINGS) or key[len(prefix):].lower()
        if name in _NOT_OFFERED and value != _NOT_OFFERED[name]:
            refused.append(f"{key}={_short_repr(_mask_secrets(name, value), 80)} (Celery's default: "
                           f"{_NOT_OFFERED[name]!r})")
        elif name not in _NOT_OFFERED and name not in _QUIET_SETTINGS and not name.startswith(_QUIET_PREFIXES):
            unknown.append(key)
    if refused:
        raise ImproperlyConfigured(f"minicelery doesn't offer these Celery settings: {'; '.join(refused)}. "
                                   f"Remove them (or set Celery's default): a worker would not do what they say")
    if unknown:
        logger.warning("minicelery ignores these settings (it has no such feature, or a typo?): %s", "; ".join(
            key + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(
                key[len(prefix):].lower(), _CONFIG_TYPES, 1, cutoff=0.8)) for key in unknown))


def queue_names(task_queues) -> list:
    """task_queues as names, from kombu Queue objects (their .name, without importing
    kombu), plain names, or Celery 3's {name: {'exchange': ..., 'routing_key': ...}}."""
    entries = list(task_queues)  # a dict's keys are its queue names
    names = [entry if isinstance(entry, str) else getattr(entry, "name", None) for entry in entries]
    for entry, name in zip(entries, names):
        if not (isinstance(name, str) and name):
            raise ImproperlyConfigured(f"task_queues: {_short_repr(entry, 80)} is not a queue name or kombu Queue")
        if type(entry).__name__ == "Broadcast":  # one message to every worker: not offered
            raise ImproperlyConfigured("task_queues: Broadcast queues (each message to every worker) "
                                       "are not offered; use a Queue")
    return names


def _queue_bound_to(task_queues, routing_key):
    """The task_queues queue bound with this routing key (kombu's Queue(name, routing_key=...),
    or Celery 3's {name: {'routing_key': ...}}), for a route naming a key and no queue."""
    specs = task_queues.items() if isinstance(task_queues, dict) else \
        ((getattr(entry, "name", entry), {"routing_key": getattr(entry, "routing_key", None)})
         for entry in task_queues or ())
    return next((name for name, spec in specs if routing_key and spec.get("routing_key") == routing_key), None)

#: the app the calls without an explicit app use: the last one created
_current_app = None
#: functions decorated with @shared_task, registered on every app
_shared_tasks = []
#: every app, so a shared task defined after an app was made still joins it
_all_apps = weakref.WeakSet()


def _django():
    """Django, when this process runs a Django project (DJANGO_SETTINGS_MODULE set); else None."""
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        with contextlib.suppress(ImportError):
            return importlib.import_module("django")
    return None


def _close_django_connections(forking=False):
    """Celery's Django fix-up: a child must not share its parent's database connections,
    and a task must not leave a stale or broken one behind for the next."""
    if "django.db" in sys.modules and _django() is not None:
        db = sys.modules["django.db"]
        db.connections.close_all() if forking else db.close_old_connections()


def current_app():
    """The current app (the last one created with set_as_current); if none, a new one, which becomes it."""
    return _current_app or Celery("default")


#: apply_async options that go into the message's properties as they are (kombu's)
_PROPERTY_OPTIONS = ("app_id", "user_id", "type", "timestamp")
#: apply_async options Celery accepts that mean nothing for Redis; ignored.
_IGNORED_OPTIONS = frozenset({"exchange", "routing_key", "retry", "retry_policy",
                              "reply_to", "add_to_parent", "mandatory", "delivery_mode",
                              "declare", "producer", "connection", "publisher",
                              "exchange_type", "result_cls"})


class Celery:
    """The application: settings, tasks, broker and backend.

    `Celery('proj', broker='redis://...', backend='redis://...', include=['proj.tasks'])`
    """

    def __init__(self, main=None, broker=None, backend=None, include=None,
                 set_as_current=True, **settings):
        global _current_app
        self.main = main
        self.conf = Config()
        self.conf.update(settings)
        if broker:
            self.conf.broker_url = broker
        if backend:
            self.conf.result_backend = backend
        if include:
            self.conf.include = list(include)
        self.tasks = {}
        self._broker = self._backend = None
        #: entries from add_periodic_task(), beside conf.beat_schedule
        self.periodic_tasks = {}
        self.on_after_configure, self.on_after_finalize = Signal("on_after_configure"), Signal("on_after_finalize")
        self._finalized, self._autodiscover = False, []
        _add_builtin_tasks(self)
        for fun, options in _shared_tasks:
            self._task_from_fun(fun, **options)
        _all_apps.add(self)
        if set_as_current:
            _current_app = self

    def __repr__(self):
        return f"<Celery {self.main}:{id(self):#x}>"

    # -- tasks ------------------------------------------------------------

    def task(self, *args, **options):
        """Decorator: `@app.task` or `@app.task(bind=True, name=..., base=...)`."""
        if len(args) == 1 and callable(args[0]) and not options:
            return self._task_from_fun(args[0])
        if args:
            raise TypeError("use @app.task or @app.task(option=value, ...)")
        return lambda fun: self._task_from_fun(fun, **options)

    def _task_from_fun(self, fun, name=None, base=None, bind=False, **options):
        name = name or self.gen_task_name(fun.__name__, fun.__module__)
        if name in self.tasks and getattr(self.tasks[name], "__wrapped__", None) is fun:
            return self.tasks[name]
        base = base or Task
        pydantic = {key: options.pop(key) for key in list(options) if key.startswith("pydantic")}
        unknown = [key for key in options if not hasattr(base, key)]
        if unknown:
            raise TypeError(f"unknown task option(s) {unknown} for {name!r}")
        run = _pydantic_wrapper(fun, **pydantic) if pydantic.pop("pydantic", False) else fun
        attrs = dict(options, name=name, app=self, run=run if bind else staticmethod(run), _bound=bind,
                     _pydantic=run is not fun, __wrapped__=fun, __doc__=fun.__doc__, __module__=fun.__module__)
        self.tasks[name] = type(fun.__name__, (base,), attrs)()
        return self.tasks[name]

    def register_task(self, task, **options):
        """Celery's way to add a Task class (or instance) with a run() method: `app.register_task(MyTask)`."""
        task = task() if inspect.isclass(task) else task
        task.name = task.name or self.gen_task_name(type(task).__name__, type(task).__module__)
        task.app, self.tasks[task.name] = self, task
        return task

    def gen_task_name(self, name, module):
        """Celery's names: `module.function`, with the app's main name for __main__."""
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{name}"

    def config_from_object(self, obj, namespace=None, silent=False):
        """Load settings from an object, a module, or 'module' / 'module:attr'.

        With namespace='CELERY', only `CELERY_`-prefixed names count, so
        Django's `CELERY_BROKER_URL` sets broker_url.
        """
        if isinstance(obj, str):
            try:
                obj = import_string(obj)
            except ImportError:
                if silent:
                    return
                raise
        items = obj.items() if isinstance(obj, dict) else \
            ((key, getattr(obj, key)) for key in dir(obj) if not key.startswith("_"))
        prefix = f"{namespace}_" if namespace else ""
        unused = []
        for key, value in items:
            if not key.startswith(prefix):
                continue
            # CELERY_TASK_ALWAYS_EAGER in Django is task_always_eager, and so is Celery 3's CELERY_ALWAYS_EAGER
            setting = setting_name(key[len(prefix):].lower()) or setting_name(key)
            if setting:
                setattr(self.conf, setting, value)
            elif (prefix or key.islower() or key.startswith(("CELERY", "BROKER"))) \
                    and not (callable(value) or isinstance(value, (type(sys), Celery))):
                unused.append((key, value))  # a config module's imports (modules, classes, functions, apps) are not
        _check_unused_settings(unused, prefix)

    def autodiscover_tasks(self, packages=None, related_name="tasks", force=False):
        """Import `<package>.tasks` of each package when the worker starts (now with force=True).

        Lazy as in Celery: a project can call this while it is being imported.
        `packages` may be a callable returning them; without it, Django's INSTALLED_APPS.
        """
        self._autodiscover.append((packages, related_name))
        if force:
            self._discover(packages, related_name)

    def _discover(self, packages, related_name):
        if packages is None and _django() is not None:  # (Django by name: it is no dependency of ours)
            packages = [config.name for config in importlib.import_module("django.apps").apps.get_app_configs()]
        for package in (packages() if callable(packages) else packages) or ():
            found = import_string(package)  # (a package that isn't there is an error, as in Celery)
            if isinstance(found, type):  # Django's 'orders.apps.OrdersConfig': its app is `name`
                package = found.name
            module = f"{package}.{related_name}" if related_name else package
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:  # an import inside the tasks module failed: the user's error
                    raise

    def import_task_modules(self):
        """Import conf.include and conf.imports, which register their tasks, then autodiscover."""
        for module in list(self.conf.include) + list(self.conf.imports):
            importlib.import_module(module)
        for packages, related_name in self._autodiscover:
            self._discover(packages, related_name)

    def finalize(self):
        """Import the task modules and run the on_after_* receivers; once (worker and beat call it).

        In a Django project (DJANGO_SETTINGS_MODULE set), django.setup() comes first, as
        Celery's Django fix-up does, so task modules can use the ORM.
        """
        if not self._finalized:
            self._finalized = True
            django = _django()
            if django is not None:
                django.setup()
            self.import_task_modules()
            self.on_after_configure.send(sender=self, source=self.conf)
            self.on_after_finalize.send(sender=self)

    def add_periodic_task(self, schedule, sig, args=(), kwargs=(), name=None, **options):
        """`app.add_periodic_task(10.0, ping.s('hi'), name='ping', expires=10)`: a beat entry."""
        sig = sig if isinstance(sig, Signature) else signature(sig, args, kwargs, app=self)
        self.periodic_tasks[name or repr(sig)] = {
            "task": sig.task, "schedule": maybe_schedule(schedule), "args": sig.args,
            "kwargs": sig.kwargs, "options": dict(sig.options, **options)}

    # -- broker and backend -------------------------------------------------

    broker_url = property(lambda self: self.conf.broker_url, doc="the broker URL in effect (Config.broker_url)")
    backend_url = property(lambda self: self.conf.result_backend, doc="the result backend URL in effect, or None")

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            if self.broker_url == Config.DEFAULT_URL:
                _say_which_default(os.path.abspath("minicelery.db"))
            self._broker = _connect(BROKERS, self, self.broker_url, "broker")
        return self._broker

    @property
    def backend(self) -> ResultBackend:
        if self._backend is None:
            url = self.backend_url
            self._backend = _connect(BACKENDS, self, url, "result backend") if url else DisabledBackend(self, url)
        return self._backend

    def after_fork(self):
        """Forget the parent's connections; the child opens its own on first use.

        Closing them here could shut down sockets the parent still uses.
        """
        self._broker = self._backend = None

    def close(self):
        for part in (self._broker, self._backend):
            if part is not None:
                part.close()
        self._broker = self._backend = None

    def AsyncResult(self, task_id):
        return AsyncResult(task_id, app=self)

    def Worker(self, **options):
        """A worker for this app; see Worker (options: concurrency, pool, queues, hostname, ...)."""
        return Worker(self, **options)

    @property
    def control(self):
        """Remote control of the workers; minicelery implements revoke()."""
        return Control(self)

    @property
    def revoke_expires(self):
        """Seconds a revocation is remembered: 3 hours as in Celery, or longer results."""
        return max(10800, self.conf.result_expires_seconds or 0)

    # -- sending ----------------------------------------------------------

    def send_task(self, name, args=None, kwargs=None, countdown=None, eta=None,
                  task_id=None, expires=None, queue=None, priority=None,
                  serializer=None, compression=None, headers=None, ignore_result=None,
                  time_limit=None, soft_time_limit=None, timelimit=None, retries=0,
                  root_id=None, parent_id=None, group_id=None, group_index=None,
                  shadow=None, link=None, link_error=None, chain=None, chord=None,
                  replaced_task_nesting=0, stamped_headers=None, **options) -> AsyncResult:
        """Send a task by name, registered here or not; returns an AsyncResult.

        Nothing is published if the arguments can't be serialized (EncodeError).
        """
        if not isinstance(name, str):
            raise TypeError(f"send_task(): a task name is a str, not {_short_repr(name, 80)}")
        stamps = {name: options.pop(name, None) for name in stamped_headers or ()}  # (Celery's stamping)
        unknown = set(options) - _IGNORED_OPTIONS - set(_PROPERTY_OPTIONS)
        if unknown:
            close = {k: difflib.get_close_matches(k, _SEND_OPTIONS, 1) for k in unknown}
            hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "")
                              for k, c in sorted(close.items()))
            raise TypeError(f"send_task({name!r}): unknown option {hints}")
        args, kwargs = list(args or ()), dict(kwargs or {})
        task_id = task_id or uuid()
        # A countdown or an eta; expires in seconds from now, or a time. A naive time is UTC,
        # whatever the app's timezone and enable_utc (as Celery reads one: utcnow() + ... is right).
        now = utcnow()
        eta = now + dt.timedelta(seconds=countdown) if countdown is not None else to_datetime(eta)
        expires_at = now + dt.timedelta(seconds=expires) if isinstance(expires, (int, float)) else to_datetime(expires)
        parent = current_task()
        if parent is not None and parent_id is None and not parent.request.called_directly:
            parent_id, root_id = parent.request.id, root_id or parent.request.root_id
        queue, priority = self.route_for(name, args, kwargs, queue, options.get("routing_key"), priority)
        message_headers = build_headers(
            name, task_id, args, kwargs, headers, eta=eta and eta.isoformat(),
            expires=expires_at and expires_at.isoformat(), retries=retries, shadow=shadow,
            timelimit=list(timelimit or (time_limit, soft_time_limit)), root_id=root_id or task_id,
            parent_id=parent_id, group=group_id, group_index=group_index,
            replaced_task_nesting=replaced_task_nesting, stamped_headers=stamped_headers, stamps=stamps,
            ignore_result=bool(self.conf.task_ignore_result if ignore_result is None else ignore_result))
        embed = {"callbacks": _signature_list(link), "errbacks": _signature_list(link_error),
                 "chain": [dict(s) for s in chain] if chain else None, "chord": chord}
        published = {"body": (args, kwargs, embed), "exchange": "", "routing_key": queue,
                     "headers": message_headers}  # (a receiver may add headers)
        before_task_publish.send(sender=name, properties={}, declare=[], retry_policy=None, **published)
        body, content_type, compression_header = dumps(
            [args, kwargs, embed],
            serializer or self.conf.task_serializer, compression or self.conf.task_compression)
        tag = uuid()
        try:
            envelope = build_envelope(
                message_headers, body, content_type, queue, priority=priority,
                compression=compression_header, delivery_tag=tag,
                expires_in=(expires_at - now).total_seconds() if expires_at else None,
                more_properties={name: options[name] for name in _PROPERTY_OPTIONS if name in options})
        except (TypeError, ValueError) as exc:  # (headers, stamps, properties are JSON in the envelope)
            raise EncodeError(f"send_task({name!r}): a header or property isn't JSON: {exc}") from None
        self._publish(queue, envelope, priority, f"{name}[{task_id}]", tag)
        after_task_publish.send(sender=name, **published)
        if self.conf.task_send_sent_event:
            self.broker.send_event(make_event(
                "task-sent", message_headers["origin"], uuid=task_id, name=name, args=message_headers["argsrepr"],
                kwargs=message_headers["kwargsrepr"], retries=retries, eta=message_headers["eta"],
                expires=message_headers["expires"], queue=queue, exchange="", routing_key=queue,
                root_id=message_headers["root_id"], parent_id=parent_id))
        result = AsyncResult(task_id, app=self, task_name=name, ignored=message_headers["ignore_result"])
        return _trail(result, options.get("add_to_parent", True))

    @property
    def timezone(self):
        """The app's `timezone` setting as a tzinfo (UTC when unset and enable_utc is on)."""
        if self.conf.timezone:
            import zoneinfo
            try:
                return zoneinfo.ZoneInfo(self.conf.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ImproperlyConfigured(f"unknown timezone {self.conf.timezone!r}") from None
        if self.conf.enable_utc:
            return dt.timezone.utc
        return dt.datetime.now().astimezone().tzinfo

    def _publish(self, queue, envelope, priority, what, tag):
        """Publish, retrying while the broker is unreachable (task_publish_retry_policy).

        Retrying is safe: the broker queues a message (by its tag) only once. Raises
        OperationalError once the retries are used up: an id is returned only for a
        message the broker confirmed. A task running in a worker (sending a chain's
        next step, a callback, a retry) keeps trying for up to the visibility
        timeout instead: its message is work already done, not to be lost.
        """
        policy = dict(max_retries=3, interval_start=0, interval_step=0.2, interval_max=0.2)
        policy.update(self.conf.task_publish_retry_policy or {})
        retries = policy["max_retries"] if self.conf.task_publish_retry else 0
        patient_until = time.monotonic() + self.broker.visibility_timeout if _local.__dict__.get("in_worker") else 0
        for attempt in itertools.count():
            try:
                return self.broker.publish(queue, envelope, priority, tag)
            except self.broker.connection_errors as exc:
                if time.monotonic() < patient_until:
                    worker_logger.warning("can't send %s yet (%s: %s); trying again", what, type(exc).__name__, exc)
                elif retries is not None and attempt >= retries:
                    raise OperationalError(
                        f"could not send {what}: the broker did not take it after {attempt} "
                        f"retries ({exc!r}). If it only stalled, it may still queue it, once.") from exc
                time.sleep(1.0 if patient_until else min(policy["interval_start"] + attempt * policy["interval_step"],
                                                         policy["interval_max"]))

    def route_for(self, name, args=(), kwargs=None, queue=None, routing_key=None, priority=None) -> tuple:
        """Where a task goes, as (queue name, priority 0-9), by the first task_routes entry
        matching `name` ({'queue': ..., 'routing_key': ..., 'priority': ...}, or a queue name).

        The queue: the one given, else the route's, else the queue bound to the routing key
        given or routed (a route may name only that), else task_default_queue. The priority:
        the one given, else the route's, else task_default_priority.
        """
        routes = self.conf.task_routes or ()
        routers = routes if isinstance(routes, (list, tuple)) else [routes]
        route = next(filter(None, (_apply_router(router, name, args, kwargs or {}) for router in routers)), {})
        route = {"queue": route} if isinstance(route, str) else dict(route)
        routing_key = routing_key or route.get("routing_key")
        queue = (queue or route.get("queue") or _queue_bound_to(self.conf.task_queues, routing_key)
                 or self.conf.task_default_queue)
        queue = getattr(queue, "name", queue)  # a kombu Queue stands for its name
        if not isinstance(queue, str):
            raise TypeError(f"send_task({name!r}): queue must be a name (str), not {queue!r}")
        if priority is None:
            priority = route.get("priority", self.conf.task_default_priority)
        return queue, clamp_priority(priority)


class Control:
    """`app.control`: what a client can ask of the workers, over Celery's pidbox, so
    Celery's workers answer too. A method given reply=True returns the answers, a
    list of {node name: answer}, that came within `timeout` seconds."""

    def __init__(self, app):
        self.app = app

    def broadcast(self, command, arguments=None, destination=None, reply=False, timeout=1.0, limit=None):
        if not isinstance(command, str):  # (a worker would refuse it, and log what it held)
            raise TypeError(f"a control command is a name (str), not {type(command).__name__}")
        body = {"method": command, "arguments": arguments or {}, "destination": destination,
                "pattern": None, "matcher": None}
        if len(json_dumps(body)) > CONTROL_BODY_LIMIT:  # workers would refuse it, and nobody would know
            raise ValueError(f"the {command} command is over the {CONTROL_MESSAGE_LIMIT} bytes a worker reads"
                             + ("; app.control.revoke() sends a long list of ids in parts" if command == "revoke" else ""))
        if not reply:
            return self.app.broker.broadcast(body)
        return self.app.broker.ask(body, timeout, limit or (len(destination) if destination else None))

    def inspect(self, destination=None, timeout=1.0):
        return Inspect(self, destination, timeout)

    def ping(self, destination=None, timeout=1.0):
        return self.broadcast("ping", destination=destination, reply=True, timeout=timeout)

    def rate_limit(self, task_name, rate_limit, destination=None, reply=False, timeout=1.0):
        parse_rate(rate_limit)  # a bad one fails here
        return self.broadcast("rate_limit", {"task_name": task_name, "rate_limit": rate_limit},
                              destination, reply, timeout)

    def time_limit(self, task_name, soft=None, hard=None, destination=None, reply=False, timeout=1.0):
        return self.broadcast("time_limit", {"task_name": task_name, "soft": soft, "hard": hard},
                              destination, reply, timeout)

    def add_consumer(self, queue, destination=None, reply=False, timeout=1.0, **options):
        return self.broadcast("add_consumer", {"queue": queue}, destination, reply, timeout)

    def cancel_consumer(self, queue, destination=None, reply=False, timeout=1.0, **options):
        return self.broadcast("cancel_consumer", {"queue": queue}, destination, reply, timeout)

    def shutdown(self, destination=None):
        return self.broadcast("shutdown", destination=destination)

    def revoke_by_stamped_headers(self, headers, destination=None, terminate=False, signal="SIGTERM",
                                  reply=False, timeout=1.0, **celery_options):
        """Celery 5.3: revoke the tasks stamped so ({'monitoring_id': [id, ...]}), on the
        workers running now (kept in their memory, as Celery's are)."""
        return self.broadcast("revoke_by_stamped_headers", {"headers": headers, "terminate": terminate,
                                                            "signal": signal}, destination, reply, timeout)

    def revoke(self, task_id, terminate=False, signal="SIGTERM", reply=False, timeout=1.0, **celery_options):
        """Revoke one id or a list: a task not yet started never runs (state REVOKED);
        with terminate=True a running one gets `signal`. Reaches every worker, also
        ones started later, for app.revoke_expires seconds; with reply=True, the answers.

        Celery's `destination` (some workers only) is not supported.
        """
        if celery_options.get("destination"):
            raise TypeError("revoke(destination=...) is not supported: revocations reach every worker")
        ids, terminate, _, _ = revoke_command(task_id, terminate, signal)  # raises at the call site
        self.app.broker.revoke(ids, terminate=terminate, signal=signal, expires=self.app.revoke_expires,
                               broadcast=not reply)
        if reply:  # (broadcast here instead, asking for answers)
            return [answer for body in _revoke_bodies(ids, terminate, signal)
                    for answer in self.app.broker.ask(body, timeout)]


class Inspect:
    """`app.control.inspect()`: each method returns {node name: answer} from the
    workers that answered within the timeout (None if none did), as in Celery.
    The commands without arguments (ping, stats, ...) are set below the class."""

    def __init__(self, control, destination=None, timeout=1.0):
        self.control, self.destination, self.timeout = control, destination, timeout

    def _ask(self, command, **arguments):
        answers = self.control.broadcast(command, arguments, self.destination, reply=True, timeout=self.timeout)
        return {node: answer for each in answers for node, answer in each.items()} or None

    def active(self, safe=None):
        return self._ask("active", safe=safe)

    def registered(self, *taskinfoitems):
        return self._ask("registered", taskinfoitems=taskinfoitems)

    registered_tasks = registered

    def query_task(self, *ids):
        return self._ask("query_task", ids=list(ids[0] if len(ids) == 1 and not isinstance(ids[0], str) else ids))

    def conf(self, with_defaults=False):
        return self._ask("conf", with_defaults=with_defaults)


#: Inspect's commands that take no arguments, each a method: `inspect().stats()` asks for `stats`
for _command in ("ping", "reserved", "scheduled", "clock", "report", "stats", "revoked", "active_queues"):
    setattr(Inspect, _command, functools.partialmethod(Inspect._ask, _command))
del _command


def _signature_list(value):
    return [dict(s) for s in _as_list(value)] if value else None


_SEND_OPTIONS = list(inspect.signature(Celery.send_task).parameters)[4:-1]  # countdown ... stamped_headers


def _apply_router(router, name, args, kwargs):
    if callable(router):
        return router(name, args, kwargs, {})
    for pattern, route in router.items() if isinstance(router, dict) else router:  # or (pattern, route) pairs
        if isinstance(pattern, re.Pattern):
            if pattern.match(name):
                return route
        elif pattern == name or fnmatch.fnmatchcase(name, pattern):
            return route
    return None


def shared_task(*args, **options):
    """@shared_task: a task every app gets, for modules that don't know the app."""
    def register(fun):
        _shared_tasks.append((fun, options))
        for app in list(_all_apps):  # in a module the worker imports (include, autodiscover)
            app._task_from_fun(fun, **options)
        return _SharedTaskProxy(fun, options)
    if len(args) == 1 and callable(args[0]) and not options:
        return register(args[0])
    return register


class _SharedTaskProxy:
    """Stands for a shared task; resolves to the task of the current app on each use."""

    def __init__(self, fun, options):
        self._fun, self._options = fun, options

    def _task(self):
        return current_app()._task_from_fun(self._fun, **self._options)

    def __getattr__(self, name):
        return getattr(self._task(), name)

    def __call__(self, *args, **kwargs):
        return self._task()(*args, **kwargs)

    def __repr__(self):
        return f"<@shared_task: {self._fun.__name__}>"


# =============================================================================
# 10. Worker: the consumer and its pool
# =============================================================================
# A worker is a main process, the Consumer, and a pool. The consumer takes
# messages from the broker, holds each (its Book has one record per message)
# until it may run (an ETA, a rate limit), lends it to a pool process as a Job,
# and sees it acked: by the pool process just before the task starts (the
# default: at most once), or by itself once the task ended (acks_late: at least
# once). A pool process only runs jobs: run_job() decodes the message and calls
# run_task(), which runs the task and stores its outcome; then the process
# reports how it ended. The main process never runs task code and never waits
# for a pool process.
#
#     broker ──reserve()──► Book.held ──Job──► pool process: run_job() ──► result backend
#        ▲                     │   ▲                    │
#        └──ack, requeue───────┘   └───Done or Lost─────┘
#
# The solo pool runs each job in the main process instead, as Celery's does.

#: what the consumer lends a pool process: a message to run, or to record as ended without
#: running (`verdict`, the exception it ends with: revoked, or lost with its process), with
#: the time limits and task events setting in effect when it was lent. With a `claim`, the
#: pool process acks the message just before the task starts (run_job()).
Job = namedtuple("Job", "tag raw queue claim verdict limits events")
#: a job ended: the state run_task() gave it (None: not run, its claim was no longer ours),
#: whether to requeue it (Reject(requeue=True)), and for a message that can't run, why (it
#: goes to the dead letters), else None
Done = namedtuple("Done", "tag state requeue dead_letter")
#: the pool process of a job died: `reason` says how; `cause` is why we killed it ("timeout",
#: "revoked", "shutdown"), or "unstarted" for a job it never started (given back, say)
Lost = namedtuple("Lost", "tag reason cause")


class Unrunnable(Exception):
    """A message no worker can run: `reason` for the log and the dead letter, the `exc`
    stored as its FAILURE (under `task_id`, when that could be read), and the `message`
    if it decoded that far."""

    def __init__(self, reason, exc, message=None):
        super().__init__(reason)
        self.reason, self.exc, self.message = reason, exc, message
        self.task_id = message.id if message is not None else getattr(exc, "task_id", None)


def _expired(message) -> bool:
    try:
        return message.expires is not None and message.expires <= utcnow()
    except (ValueError, TypeError, AttributeError):
        return False  # (a bad header: its pool process says so)


def runnable_message(app, raw, queue="", tag="") -> Message:
    """The envelope as a Message ready to run: decoded, of a task registered here, its body
    readable and its arguments fitting the task's signature. Raises Unrunnable.

    Celery: bad-messages: Celery 5.7's worker exits on some of these, and loses others."""
    max_size = app.conf.worker_max_message_size
    try:
        message = decode_message(raw, queue, tag, max_size)
    except DecodeError as exc:
        raise Unrunnable(f"can't decode message: {exc}", exc) from None
    if message.task_name not in app.tasks:
        name = _short_repr(message.task_name, 200)  # (a name is what a sender wrote: any size)
        short = len(message.task_name) < 200  # (close matches of a long one cost too much)
        close = difflib.get_close_matches(message.task_name, list(app.tasks), 3) if short else []
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise Unrunnable(f"Received unregistered task of type {name}. The message has been "
                         f"ignored and discarded.{hint}",
                         NotRegistered(f"Task of kind {name} never registered.{hint}"), message)
    try:
        message.decode_body(accepted_types(app.conf.accept_content), max_size)
        app.tasks[message.task_name].check_arguments(message.args, message.kwargs)
    except (DecodeError, TypeError) as exc:
        raise Unrunnable(f"can't run task {message.describe()}: {exc}", exc, message) from None
    return message


def run_job(app, job, hostname) -> Done:
    """Run one job where jobs run (a pool process; the solo pool's main process) and say how
    it ended. Never raises for the job's sake: an error storing its outcome is logged."""
    if job.claim and not _acked(app, job):
        return Done(job.tag, None, False, None)
    try:
        message = runnable_message(app, job.raw, job.queue, job.tag)
    except Unrunnable as bad:
        try:
            _record_unrunnable(app, bad, hostname)
        except Exception:  # (the backend away)
            worker_logger.exception("The failure of a message that can't run could not be stored")
        return Done(job.tag, FAILURE, False, bad.reason)
    message.headers["timelimit"], message.events = list(job.limits), job.events
    try:
        outcome = run_task(app, message, hostname=hostname, verdict=job.verdict)
        return Done(job.tag, outcome.state, outcome.requeue, None)
    except Exception:
        worker_logger.exception("Task %s: its outcome may not be stored (it may have run)", message.describe())
        return Done(job.tag, FAILURE, False, None)
    finally:
        _close_django_connections()


def _acked(app, job) -> bool:
    """Ack a job's message just before its task starts, as long as its claim is the worker's:
    whether the task may run. This is the default, at most once: whatever happens next, the
    broker can't hand the message out again.

    An ack whose answer was lost is asked again, until the broker answers (a cold
    shutdown ends the wait). Finding the message gone then means the first one went through:
    had the message gone back to its queue meanwhile (held too long unrenewed), the broker
    would say it is not ours (see RedisBroker.RESTORED); and the consumer acts on no claim
    it lent.

    Celery: early-ack: Celery's worker acks once the pool process accepted the job, after
    the task started: a worker lost in between runs it again.
    """
    broker, asked, pause = app.broker, False, 0.1
    while True:
        try:
            gone, others = broker.ack({job.tag: job.claim})
            break
        except broker.connection_errors as exc:
            asked = True
            worker_logger.warning("Can't ack task %s yet (%r); asking again in %.1fs", _job_name(job), exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
    if others or (gone and not asked):
        worker_logger.warning("Task %s was given back to its queue (we were out of touch with the broker "
                              "longer than the visibility timeout): not run here", _job_name(job))
    return not others and (asked or not gone)


def _job_name(job) -> str:
    """`name[id]` of a job's task for a log line, read from its message (or its delivery tag)."""
    try:
        return decode_message(job.raw, job.queue, job.tag).describe()
    except DecodeError:
        return f"in message {printable(job.tag)}"


def _record_unrunnable(app, bad, hostname):
    """Log a message no worker can run and store its FAILURE, when its id is known. What
    waits on it hears of the failure too (its chord, the rest of its chain, its errbacks),
    so no get() on a workflow waits for ever. (The consumer dead-letters it.)"""
    worker_logger.error(bad.reason)
    message = bad.message
    if message is not None:
        if not message.embed:  # an unregistered task's body was not read yet
            with contextlib.suppress(DecodeError):
                message.decode_body(accepted_types(app.conf.accept_content), app.conf.worker_max_message_size)
        request = Request.from_message(message, hostname=hostname)
        app.backend.store_result(message.id, bad.exc, FAILURE, request=request)
        _after_failure(app, request, bad.exc, None)
    elif bad.task_id is not None:  # (only its id could be read: nothing else to tell)
        app.backend.store_result(bad.task_id, bad.exc, FAILURE)


class Pool:
    """Where jobs run: the consumer lends a job to each free process and learns how it ended.

    apply() is called only while free() > 0, and never blocks. collect() returns
    the Done and Lost events of the processes whose handles turned ready (all of
    them for None), without waiting; handles() says what to wait on for the next.
    """

    name = "pool"

    def __init__(self, app, concurrency, hostname, max_tasks_per_child=None):
        self.app, self.concurrency, self.hostname = app, concurrency, hostname
        self.max_tasks_per_child = max_tasks_per_child

    def start(self, depth=1, keep_alive=None, every=1.0):
        """Start the pool processes, if any, each to be lent up to `depth` jobs at a time.
        `keep_alive()` renews the claims of the held messages: a pool that runs jobs in the
        main process calls it every `every` seconds while one runs."""

    def free(self) -> int:
        """How many processes could take a job now."""

    def apply(self, jobs: list):
        """Lend each Job of `jobs` (no more than free()) to a free process."""

    def collect(self, ready=None) -> list:
        """What ended (Done, Lost) among the processes whose handles are in `ready`."""

    def handles(self) -> tuple:
        """(readable, writable): what to wait on for the next event."""
        return [], []

    def jobs(self) -> dict:
        """{pid: tag of its job, or None}: for `inspect`."""

    def terminate(self, tag, signum) -> bool:
        """Send `signum` to the process running `tag` (revoke with terminate=True)."""
        return False

    def kill_running(self):
        """A cold shutdown: kill the processes running a task (their jobs are Lost, "shutdown")."""

    def stop(self):
        """Let the processes go, once they are idle."""


class SoloPool(Pool):
    """Runs each job in the worker's main process, inline: for debugging, and where fork is
    missing. While a job runs, nothing else in the worker does, but for a thread that keeps
    the held messages' claims fresh.

    Celery: solo-limits: no hard time limit here: killing the task would kill the worker.
    """

    name = "solo"

    def __init__(self, app, concurrency, hostname, max_tasks_per_child=None):
        super().__init__(app, 1, hostname, max_tasks_per_child)
        self.running, self.events = None, []
        self._lock = threading.Lock()  # the keepalive thread renews only while a job runs

    def start(self, depth=1, keep_alive=None, every=1.0):
        if keep_alive is not None:
            threading.Thread(target=self._keep_alive, args=(keep_alive, every), name="keepalive",
                             daemon=True).start()

    def _keep_alive(self, renew, every):
        while True:
            time.sleep(every)
            with self._lock:
                try:
                    if self.running is not None:
                        renew()
                except Exception:  # the broker away: next time
                    worker_logger.debug("keepalive renewal failed", exc_info=True)

    def free(self):
        return 0 if self.running else 1

    def jobs(self):
        return {os.getpid(): self.running}

    def apply(self, jobs):
        for job in jobs:
            with self._lock:
                self.running, _local.in_worker = job.tag, True
            try:
                self.events.append(run_job(self.app, job, self.hostname))
            except WorkerTerminate:  # a cold shutdown interrupted it
                self.events.append(Lost(job.tag, "cold shutdown", "shutdown"))
                raise
            finally:
                with self._lock:
                    self.running = None

    def collect(self, ready=None):
        events, self.events = self.events, []
        return events


class _Link:
    """Length-prefixed pickles over one end of a socket pair: a pool process's link to the
    main process. The main process's end never blocks: what doesn't fit in the socket now
    waits in `outbox`, written as the socket drains, and ready() returns only what has
    arrived whole. The pool process's end waits (put(), get())."""

    SIZE = struct.Struct("!Q")

    def __init__(self, sock, limit=None):
        #: the longest item taken (the main process takes reports: a few bytes each)
        self.sock, self.limit = sock, limit
        self.outbox, self.inbox, self.closed = deque(), bytearray(), False
        self.sending = threading.Lock()  # (in a pool process, two threads send)

    def queue(self, item, tag=None):
        """(main process) Queue `item` (the job `tag`), for flush() to write."""
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        self.outbox.append((memoryview(self.SIZE.pack(len(data)) + data), tag))

    def flush(self):
        """(main process) Write what the socket takes now; raises OSError if the other end is gone."""
        with contextlib.suppress(BlockingIOError):
            while self.outbox:
                frame, tag = self.outbox[0]
                frame = frame[self.sock.send(frame):]
                self.outbox[0] = (frame, tag)
                if not frame:
                    self.outbox.popleft()

    def put(self, item):
        """(pool process) Send `item`, waiting as long as it takes."""
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        with self.sending:
            self.sock.sendall(self.SIZE.pack(len(data)) + data)

    def ready(self) -> list:
        """The items that have arrived whole, without waiting; `closed` once the other end is."""
        with contextlib.suppress(BlockingIOError):
            while True:
                chunk = self.sock.recv(65536, socket.MSG_DONTWAIT)
                self.inbox += chunk
                self.closed = not chunk  # (b"": end of file)
                if len(chunk) < 65536:  # (all there was)
                    break
        return list(iter(self._item, None))

    def get(self):
        """(pool process) The next item, waiting for it; None once the main process closed its end."""
        while (item := self._item()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.inbox += chunk
        return item

    def _item(self):
        """The first item that has arrived whole, taken out of the inbox; None if none has."""
        if len(self.inbox) < self.SIZE.size:
            return None
        (size,) = self.SIZE.unpack_from(self.inbox)
        if self.limit and size > self.limit:
            raise ValueError(f"an item of {size} bytes")
        if len(self.inbox) < self.SIZE.size + size:
            return None
        item = pickle.loads(self.inbox[self.SIZE.size:self.SIZE.size + size])
        del self.inbox[:self.SIZE.size + size]
        return item


class _Deadlines:
    """Each pool process's hard time limit, in memory the main process shares with them: a
    process writes when its task must end (time.monotonic(); 0: none) as it starts it, and a
    thread of the main process kills the process once that has passed, on time, whatever the
    main thread is busy with (a broker command that stalls, say). A lock per process makes
    "the task ended" and "kill it for running late" one or the other."""

    def __init__(self, size):
        import mmap
        import multiprocessing
        self.values = memoryview(mmap.mmap(-1, 8 * size)).cast("d")  # (anonymous: shared by forks)
        self.locks = [multiprocessing.Lock() for _ in range(size)]
        self.pids, self.killed = [0] * size, set()  # pid of each slot's process; pids killed for their limit

    def renew(self, slot):
        """(main process, before it forks a process for `slot`) A new lock: one killed
        holding the old one keeps it."""
        import multiprocessing
        self.locks[slot], self.values[slot], self.pids[slot] = multiprocessing.Lock(), 0, 0

    @contextlib.contextmanager
    def running(self, slot, seconds):
        """(pool process) While a task with a hard limit of `seconds` (None: none) runs."""
        with self.locks[slot]:
            self.values[slot] = time.monotonic() + seconds if seconds else 0
        try:
            yield
        finally:
            with self.locks[slot]:
                self.values[slot] = 0

    def watch(self, every=0.05):
        """(a thread of the main process) Kill each process past its deadline."""
        while True:
            time.sleep(every)
            for slot, (pid, lock) in enumerate(zip(self.pids, self.locks)):
                if pid > 0 and 0 < self.values[slot] <= time.monotonic() and lock.acquire(timeout=every):
                    try:
                        if 0 < self.values[slot] <= time.monotonic() and pid == self.pids[slot]:
                            self.killed.add(pid)
                            _kill(pid)
                    finally:
                        lock.release()


class _PoolProcess:
    """The main process's view of one pool process."""

    def __init__(self, index, pid, link):
        self.index, self.pid, self.link = index, pid, link
        # Readable when the process exits. The link alone can't tell us: a grandchild
        # the task forked may hold the process's end open.
        self.sentinel = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
        self.jobs = deque()       # the Jobs lent to it, in order: the first runs (or is about to)
        self.since = 0.0          # time.monotonic() the first became first (lent, or the one before it ended)
        self.stuck_since = None   # time.monotonic() since which a job waits to be written to it
        self.done = 0             # jobs it ran (max_tasks_per_child)
        self.cause = None         # why we killed it, if we did

    def close(self):
        """Let go of our handles on it (closing the link tells an idle process to leave)."""
        self.link.sock.close()
        if self.sentinel is not None:
            os.close(self.sentinel)


class PreforkPool(Pool):
    """Pool processes made by fork(); each is lent up to `depth` jobs (the prefetch
    multiplier) over a socket, and runs them one after the other.

    Nothing a pool process does can block the main process: jobs are written
    without waiting (what doesn't fit waits, and is written as the socket
    drains), reports are read as they arrive, and a process that hasn't taken a
    job within SEND_WITHIN seconds is killed. A job waiting behind a task that
    runs longer than TAKE_BACK_AFTER seconds is given back (Celery's fair
    scheduling, -O fair), to go to a free process. A thread kills a process
    whose task passed its hard time limit. A process that dies is replaced at once.

    Celery: lent-ahead: Celery's default scheduling (-O fair) sends a task only to an idle process.
    """

    name = "prefork"
    #: seconds a pool process may take to receive a job before it counts as unreachable
    SEND_WITHIN = 10.0
    #: a task running this long (seconds) gives up the jobs lent behind it
    TAKE_BACK_AFTER = 0.1
    #: seconds worker_process_init's receivers may take in a new pool process (Celery's 4.0)
    INIT_WITHIN = 4

    def __init__(self, app, concurrency, hostname, max_tasks_per_child=None):
        super().__init__(app, concurrency, hostname, max_tasks_per_child)
        self.processes, self.stopping, self.depth = [], False, 1
        self.deadlines = _Deadlines(concurrency)

    def start(self, depth=1, keep_alive=None, every=1.0):
        self.depth = max(1, depth)
        threading.Thread(target=self.deadlines.watch, name="hard-time-limits", daemon=True).start()
        self.processes = [self._spawn(index) for index in range(1, self.concurrency + 1)]

    def _spawn(self, index) -> _PoolProcess:
        ours, theirs = socket.socketpair()

        def run_child():
            # Keep only our own end, so we see end-of-file when the main process dies.
            ours.close()
            for other in self.processes:
                other.close()
            pool_process(self.app, theirs, index, self.hostname, self.max_tasks_per_child, self.deadlines)

        _close_django_connections(forking=True)
        self.deadlines.renew(index - 1)
        worker_before_create_process.send(sender=self)
        pid = fork_child(run_child)
        self.deadlines.pids[index - 1] = pid
        theirs.close()
        ours.setblocking(False)
        return _PoolProcess(index, pid, _Link(ours, limit=1024 * 1024))

    def _room_in(self, process, now) -> int:
        """How many more jobs `process` takes now: none behind a long task (they come back)."""
        if process.jobs and now - process.since > self.TAKE_BACK_AFTER:
            return 0
        left = self.max_tasks_per_child - process.done if self.max_tasks_per_child else self.depth
        return max(0, min(self.depth, left) - len(process.jobs))

    def free(self):
        now = time.monotonic()
        return 0 if self.stopping else sum(self._room_in(process, now) for process in self.processes)

    def jobs(self):
        return {p.pid: p.jobs[0].tag if p.jobs else None for p in self.processes}

    def apply(self, jobs):
        now, lent = time.monotonic(), set()
        for job in jobs:
            # A process may have run out of room since free() was asked (its task passed
            # TAKE_BACK_AFTER): a job lent to it anyway comes back, given back or unstarted.
            process = min(self.processes, key=lambda p: (not self._room_in(p, now), len(p.jobs)))
            if not process.jobs:
                process.since, process.cause = now, None
            process.jobs.append(job)
            process.link.queue(job, job.tag)
            lent.add(process)
        for process in lent:  # (one write each)
            process.stuck_since = process.stuck_since or now
            self._write(process, now)

    def handles(self):
        readable = [h for p in self.processes for h in (p.link.sock, p.sentinel) if h is not None]
        return readable, [p.link.sock for p in self.processes if p.link.outbox]

    def collect(self, ready=None):
        events, now = [], time.monotonic()
        exited = set(wait_readable([p.sentinel for p in self.processes if p.sentinel is not None], 0)
                     if ready is None else ready)
        for process in list(self.processes):
            self._write(process, now)
            if ready is None or process.link.sock in ready:
                events += self._reports(process, now)
            if process.link.closed or process.sentinel in exited:
                events += self._replace(process)
        return events

    def _write(self, process, now):
        """Write what waits for it; a process that takes nothing for SEND_WITHIN seconds is killed."""
        if process.link.outbox:
            with contextlib.suppress(OSError):  # it died: collect() sees it exit
                process.link.flush()
            if not process.link.outbox:
                process.stuck_since = None
            elif now - process.stuck_since > self.SEND_WITHIN:
                worker_logger.error("Pool process %d took no job for %ss: killed", process.pid, self.SEND_WITHIN)
                _kill(process.pid)

    def _reports(self, process, now) -> list:
        try:
            reports = process.link.ready()
        except (OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:  # not our reports
            worker_logger.error("Pool process %d broke its link (%r): killed", process.pid, exc)
            process.link.closed = True
            return []
        events = []
        for report in reports:
            tags = [report.tag] if isinstance(report, Done) else report  # (a list: the jobs it gave back)
            process.jobs = deque(job for job in process.jobs if job.tag not in tags)
            if isinstance(report, Done):
                process.since, process.done = now, process.done + 1
                events.append(report)
            else:
                events += [Lost(tag, "given back", "unstarted") for tag in tags]
        return events

    def _replace(self, process) -> list:
        """A pool process exited (or closed its link: it is killed): reap it, start another in
        its place, and say what became of its jobs: the first may have started; the others
        had not (nor any not written to it whole)."""
        _kill(process.pid)
        status = _reap(process.pid)
        process.close()
        self.processes.remove(process)
        if not self.stopping:
            self.processes.append(self._spawn(process.index))
        if not process.done and process.cause is None and not self.stopping:  # (a worker_process_init, say)
            worker_logger.error("Pool process %d ended (%s) before it ran a job", process.pid, _exit_reason(status))
        if not process.jobs:
            return []
        reason, jobs = _exit_reason(status), list(process.jobs)
        cause = "timeout" if process.pid in self.deadlines.killed else process.cause
        self.deadlines.killed.discard(process.pid)
        started = jobs[0].tag not in {tag for _, tag in process.link.outbox}  # (written whole: it may have)
        first = [Lost(jobs[0].tag, reason, cause)] if started else []
        return first + [Lost(job.tag, reason, "unstarted") for job in jobs[len(first):]]

    def terminate(self, tag, signum):
        for process in self.processes:
            if process.jobs and process.jobs[0].tag == tag:
                process.cause = "revoked"
                _kill(process.pid, signum)
                return True
        return False

    def kill_running(self):
        for process in self.processes:
            if process.jobs and process.jobs[0].verdict is None and process.cause is None:
                process.cause = "shutdown"
                _kill(process.pid)

    def stop(self):
        """Close every link: the idle processes leave. Those left after a few seconds are killed."""
        self.stopping, deadline = True, time.monotonic() + 5.0
        for process in self.processes:
            process.link.sock.close()
        for process in self.processes:
            _reap(process.pid, timeout=max(deadline - time.monotonic(), 0))
            process.close()  # (its link again: closing a closed socket does nothing)
        self.processes = []


class _GiveBack:
    """(in a pool process) A thread that gives back the jobs lent behind a task running longer
    than `after` seconds, so that a free process runs them (Celery's fair scheduling): it
    takes them off the link and sends their tags back. It wakes at most once every `after`
    seconds, not for each task, and takes only while a task runs (the loop, which reads the
    link between tasks, doesn't then): each job is either started here or given back."""

    def __init__(self, link, after):
        self.link, self.after, self.started, self.idle = link, after, None, False
        self.changed = threading.Condition()
        threading.Thread(target=self._watch, name="give-back", daemon=True).start()

    def next(self):
        """The next job lent, waiting for it (a task then runs); None once the link is closed."""
        with self.changed:
            self.started = None
            job = self.link.get()
            self.started = time.monotonic()
            if self.idle:
                self.changed.notify()
            return job

    def _watch(self):
        with self.changed:
            while True:
                self.idle = self.started is None
                if self.idle:
                    self.changed.wait()
                elif (left := self.started + self.after - time.monotonic()) > 0:
                    self.changed.wait(left)
                else:
                    tags = [job.tag for job in self.link.ready()]
                    if tags:
                        self.link.put(tags)
                    self.changed.wait(self.after)


def pool_process(app, sock, index, hostname, max_tasks=None, deadlines=None):
    """The loop of one pool process (in a child made by fork_child()): run the jobs lent to
    it, one after the other, and report how each ended. It owns no message: it acks one
    only as run_job() says, just before its task starts. It leaves when the main process
    closes the link (or dies: the link ends, and the parent-death signal kills it anyway),
    or after max_tasks jobs."""
    global _process_name
    _process_name = f"ForkPoolWorker-{index}"
    _local.in_worker = True
    app.after_fork()
    _init_within(PreforkPool.INIT_WITHIN)
    link = _Link(sock)
    jobs, done = _GiveBack(link, PreforkPool.TAKE_BACK_AFTER), 0
    while (not max_tasks or done < max_tasks) and (job := jobs.next()) is not None:
        with deadlines.running(index - 1, None if job.verdict else job.limits[0]):
            report = run_job(app, job, hostname)
        link.put(report)
        done += 1
    worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)


def _init_within(seconds):
    """Send worker_process_init; a receiver that doesn't return within `seconds` ends this
    pool process (another takes its place), as Celery's worker_proc_alive_timeout does:
    one that hung would hold the jobs lent to it for ever."""
    def give_up(*_):
        worker_logger.error("worker_process_init's receivers did not return within %ss: this pool process "
                            "leaves", seconds)
        os._exit(1)
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    worker_process_init.send(sender=None)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _kill(pid, sig=signal.SIGKILL):
    with contextlib.suppress(ProcessLookupError):  # gone already
        os.kill(pid, sig)


def _reap(pid, timeout=10.0):
    """Wait for a child to exit; kill it if it lingers. Returns its status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return status
        if time.monotonic() > deadline:
            _kill(pid)
            deadline = float("inf")
        time.sleep(0.001)


def _exit_reason(status) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"signal {number} ({signal.Signals(number).name})"
    return f"exitcode {os.WEXITSTATUS(status)}"


def fork_child(run_child) -> int:
    """fork(); the child runs `run_child()`, then always leaves by os._exit().

    Whatever the child's code does (a task that broke stdout, an exception in a
    finally), it never returns into the parent's code: a child that ran the
    parent's shutdown would give back the parent's messages, and they would run
    twice. Signals are blocked across fork(), so one arriving meanwhile is
    neither lost by the parent nor handled in the child by the parent's handler:
    the child ignores SIGINT, SIGHUP, SIGQUIT and SIGUSR2 (a Ctrl-C or a hang-up
    reaches the whole process group; the main process decides what to do) and
    dies of SIGTERM.
    """
    _flush_std_streams()
    watched = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    parent = os.getpid()
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid
    status = 1
    try:
        _die_with_parent(parent)
        _stop_watching_signals()  # the parent's pipe is not the child's business
        for signum in watched:
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        run_child()
        status = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        _flush_std_streams()
        os._exit(status)


def _die_with_parent(parent):
    """(Linux) Be killed when the process that forked us dies: a pool process whose main
    process was SIGKILLed must not run on past its hard time limit."""
    with contextlib.suppress(Exception):  # (elsewhere: it leaves when its link ends)
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # (it died before that)
        os._exit(1)


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):  # a broken stream must not stop us
            stream.flush()


POOLS = {"prefork": PreforkPool, "solo": SoloPool}


@dataclasses.dataclass(eq=False)
class Held:
    """The consumer's record of one message it holds (see Book: who owns a message)."""
    delivery: Delivery
    #: the scores our claim may have in the broker: one, or two after a renewal whose
    #: answer never came; () once acked (or no longer ours)
    claim: tuple
    #: its headers, decoded (None when they can't be, but its id: its pool process says why)
    message: Message = None
    late: bool = False          # acks_late: acked once it ended, not before it starts
    verdict: Exception = None   # it ends without running, with this (revoked; lost with its process)
    lent: float = None          # time.time() it went to the pool, while it is there
    #: once the pool is done with it: "ack", "requeue", or "dead" (dead-letter it, for `reason`)
    end: str = None
    reason: str = None
    #: its pool process died before it said whether it acked it, or it found the claim
    #: not ours as it was to start (the broker knows which of these is still ours: settle())
    lost: "Lost" = None
    recordings: int = 0         # how often a pool process died recording its verdict

    tag = property(lambda self: self.delivery.tag)

    def describe(self):
        return self.message.describe() if self.message is not None else printable(self.tag)


class Waiting:
    """The held messages waiting to be lent: those due now, in order (`ready`), and those
    due later, for their ETA or their task's rate limit (`scheduled`, a heap by due time).

    A rate limit is Celery's token bucket with a capacity of one: at `rate` a second, a task
    type starts at most every 1/rate seconds in a worker; a message over it is scheduled for
    its turn, and the other task types go on.
    """

    def __init__(self, app):
        self.app, self.ready, self.scheduled = app, deque(), []
        self._sequence = itertools.count()  # breaks ties between equal due times
        self.spacing = {}     # task name -> seconds between starts under its rate limit (0: none)
        self.next_start = {}  # task name -> time.monotonic() before which no more may start

    def put(self, held, due=0.0, eta=False):
        if due > time.time():
            heapq.heappush(self.scheduled, (due, next(self._sequence), held, eta))
        else:
            self.ready.append(held)

    def put_first(self, helds):
        """Back to the head of the line, in their order."""
        self.ready.extendleft(reversed(helds))

    def release(self):
        """Make ready what came due."""
        while self.scheduled and self.scheduled[0][0] <= time.time():
            self.ready.append(heapq.heappop(self.scheduled)[2])

    def take(self, count, lendable) -> list:
        """Up to `count` messages to lend now, in order, past their rate limits; one that is
        not `lendable(held)` any more (let go meanwhile) is left out."""
        taken = []
        while self.ready and len(taken) < count:
            held = self.ready.popleft()
            if lendable(held) and not self._throttled(held):
                taken.append(held)
        return taken

    def _throttled(self, held) -> bool:
        """Whether `held` must wait for its task type's rate limit (then it is scheduled)."""
        name, now = held.message.task_name if held.message else None, time.monotonic()
        if held.verdict is not None or name not in self.app.tasks:
            return False
        if name not in self.spacing:
            rate = None if self.app.conf.worker_disable_rate_limits else \
                parse_rate(self.app.tasks[name].option("rate_limit"))
            self.spacing[name] = 1 / rate if rate else 0
        wait = self.next_start.get(name, now) - now
        if wait > 0:
            self.put(held, time.time() + wait)
        else:
            self.next_start[name] = now + self.spacing[name]
        return wait > 0

    def rate_changed(self, name):
        """A task's rate limit changed: worked out again for its next message, and a wait under
        the old one ends."""
        self.spacing.pop(name, None)
        self.next_start.pop(name, None)

    def first(self, matches):
        """Move the scheduled messages that match to the head of the line."""
        moving = [entry[2] for entry in sorted(self.scheduled) if matches(entry[2])]
        if moving:
            self.scheduled = [entry for entry in self.scheduled if entry[2] not in moving]
            heapq.heapify(self.scheduled)
            self.put_first(moving)

    @property
    def for_eta(self) -> int:
        """How many of the scheduled wait for their ETA (not a rate limit)."""
        return sum(entry[3] for entry in self.scheduled)

    def due(self):
        """time.time() at which the next scheduled message is due, or None."""
        return self.scheduled[0][0] if self.scheduled else None


class Book:
    """The messages a worker holds, one record each, and the broker's word on them.

    Who owns a message. A message is the broker's until the worker's main
    process takes it (reserve() marks it held under the worker's claim). From
    then until it leaves the worker it is the main process's, and its one
    record is `held[tag]`: waiting (`waiting`: due now, or at its ETA or rate
    limit), lent to a pool process as a job, or ended, its end (ack, requeue,
    dead letter) not yet confirmed by the broker. A pool process owns nothing:
    it runs the jobs it is lent and says how each ended; the one act it makes on
    a message is the ack of an early-ack job, just before its task starts, with
    the claim the job carries (and the main process acts on no claim it lent).
    Every broker operation on a held message acts only while the claim is still
    ours, and no task starts before the broker confirmed that (by that ack, or,
    with acks_late, by a renewal in the round trip before the job is lent). So
    a message that went back to its queue while we were out of touch is let go:
    never run, acked or requeued by us. A record leaves `held` once the broker
    confirmed its end, or said it is not ours any more.
    """

    #: ETA tasks due within this many seconds wait here; later ones are parked in the broker,
    #: which moves them back to their queue Broker.ETA_MOVE_AHEAD seconds before they are due
    ETA_HORIZON = 3.0
    #: how many of those may wait here besides `capacity` (see room())
    ETA_ROOM = 100

    def __init__(self, app, queues, capacity):
        self.app, self.broker, self.queues = app, app.broker, queues
        #: the most messages held at a time: the prefetch limit, and one running in each pool process
        self.capacity = capacity
        self.held = {}                  # delivery tag -> Held: every message this worker holds
        self.waiting = Waiting(app)     # those that wait to be lent
        self.revoked = {}               # task ids revoked (from the broker, kept fresh), the newest last
        self.revoked_stamps = {}        # Celery 5.3's revocations by stamp: header -> {values} (memory only)
        self.renew_every = max(0.2, min(5.0, self.broker.visibility_timeout / 4))
        self._next_renewal = 0.0
        self.orphans = []               # claims of takes whose answer never came (see settle())
        self.unparked = []              # (held, due) of far-ETA messages whose parking failed: again
        self.more = False               # the last take filled its room: there may be more

    def holds(self, held) -> bool:
        return self.held.get(held.tag) is held

    def lendable(self, held) -> bool:
        """Still held, and not given back by a stopping worker."""
        return self.holds(held) and held.end is None

    def room(self) -> int:
        """How many more messages to take: a worker holds at most `capacity` (those waiting
        for a rate limit, and those lent ahead to a pool process, count), and takes more once
        half of that is free (fewer round trips). Up to ETA_ROOM more may wait out the last
        seconds of their ETA: as in Celery, they don't count, so they hold no room from the
        messages due now, which the broker may have put behind them."""
        counted = len(self.held) - min(self.waiting.for_eta, self.ETA_ROOM)
        return 0 if counted > self.capacity / 2 else self.capacity - counted

    def settle(self, taking=True) -> tuple:
        """One round trip with the broker: ack what ended, renew the claims of the acks_late
        messages ready to go (none starts on a claim not confirmed in the same step: just
        taken, or renewed here), of every message now and then, and of the jobs whose
        process died unheard (did it ack them?), and take new messages. Returns (the
        messages received, the jobs whose process died after acking them: they started).

        Should the answer be lost, what it asked may have been done: a renewal may have
        moved a claim (both scores count as ours), and the take may have taken messages
        we never heard of (restore_claimed() gives them back).
        """
        self.more = False
        self._tell_ends()
        now, ending = time.time(), [held for held in self.held.values() if held.end == "ack"]
        renewing = {held.tag: held for held in self.waiting.ready if held.late and held.claim and self.holds(held)}
        renewing.update((held.tag, held) for held in self.held.values() if held.lost is not None)
        if now >= self._next_renewal:  # (a lent early-ack job's claim is its pool process's to ack)
            self._next_renewal = now + self.renew_every
            renewing.update((held.tag, held) for held in self.held.values()
                            if held.claim and held.end is None and (held.late or held.lent is None))
        room = self.room() if taking else 0
        if not (ending or renewing or room):
            return [], []
        try:
            deliveries, gone, others = self.broker.reserve(
                self.queues, room, {h.tag: h.claim for h in ending}, {h.tag: h.claim for h in renewing.values()}, now)
        except Exception:
            self._unheard(renewing.values(), now)
            self.orphans += [now] if room else []
            raise
        for held in ending:
            if held.tag in others:
                worker_logger.warning("Task %s went back to its queue while it ran (out of touch with the "
                                      "broker for longer than the visibility timeout): it may run again",
                                      held.describe())
            del self.held[held.tag]
        started = self._confirmed(renewing.values(), gone, others, now)
        self.more = len(deliveries) >= room > 0
        return self._receive(deliveries), started

    def _confirmed(self, renewed, gone, others, now) -> list:
        """Take the broker's word on the claims we renewed: those it confirmed stay ours, the
        others we let go (a job already lent runs on). A job whose pool process died unheard
        had started if its message is gone (its process acked it: returned), and goes out
        again if it is still ours."""
        let_go, started = [], []
        for held in renewed:
            if held.lost is not None and held.tag in gone and held.lost.cause != "unstarted":
                held.claim = ()
                started.append(held)
            elif held.tag in gone or held.tag in others:
                held.claim, held.lost = (), None
                if held.lent is None:
                    let_go.append(held)
                else:
                    worker_logger.warning("Task %s went back to its queue while it ran (out of touch with the "
                                          "broker): it may run again", held.describe())
            else:
                held.claim = (now,)
                if held.lost is not None:
                    held.lost = None
                    self.waiting.put_first([held])  # it never started: lend it again
        if let_go:
            worker_logger.warning("Out of touch with the broker for longer than the visibility timeout: "
                                  "%d held message(s) went back to the queue; letting them go", len(let_go))
            for held in let_go:
                del self.held[held.tag]
        return started

    def _tell_ends(self):
        """Requeue and dead-letter what the pool finished so: broker operations of their own.
        (Requeued last taken first: each goes to the head of its queue.) What has no claim
        left needs nothing more from the broker."""
        for held in reversed([held for held in self.held.values() if held.end]):
            if held.end == "dead":
                self.broker.dead_letter(held.delivery.raw, held.reason, held.delivery.queue)
                held.end = "ack"
            if held.end == "requeue" and held.claim:
                self.broker.requeue({held.tag: held.claim})
            if held.end == "requeue" or not held.claim:
                del self.held[held.tag]

    def _receive(self, deliveries) -> list:
        received, parked = [], []
        for delivery in deliveries:
            if delivery.tag in self.held:
                # A copy of a message we hold, restored while we were out of touch and taken
                # again by us: the new claim is ours; the copy we hold is the one that runs.
                worker_logger.warning("Task %s came back while we hold it; running it once",
                                      self.held[delivery.tag].describe())
                self.held[delivery.tag].claim = (delivery.claim,)
                continue
            held = self.held[delivery.tag] = Held(delivery, (delivery.claim,))
            try:
                self._file(held, parked)
                received += [held.message] if held.message is not None else []
            except Exception as exc:  # one message must never take the worker down
                worker_logger.exception("can't handle message %s", printable(delivery.tag))
                held.end, held.reason = "dead", f"can't handle message: {exc!r}"
        unparked, self.unparked = self.unparked, []
        for held, due in unparked:  # (parking failed: again, unless they are due soon)
            if not (self.lendable(held) and held.claim):
                continue
            if due > time.time() + self.ETA_HORIZON:
                parked.append((held, due))
            else:
                self.waiting.put(held, due, eta=True)
        if parked:
            self._park(parked)
        return received

    def _park(self, parked):
        """Hand far-ETA messages to the broker. Should that fail, they stay held (their claims
        renewed) and the next round trip tries again, rather than stall this one. (Parked
        though the answer was lost, they are not ours any more: the next try, or renewal,
        finds that, and lets them go.)"""
        try:
            self.broker.park([(held.delivery, held.claim, held.message.priority, due) for held, due in parked])
        except Exception as exc:
            worker_logger.warning("Can't park %d task(s) with a later ETA in the broker (%r): trying again",
                                  len(parked), exc)
            self.unparked = parked
            return
        for held, _ in parked:
            del self.held[held.tag]
        worker_logger.info("Parked %d task(s) with a later ETA in the broker", len(parked))

    def _file(self, held, parked):
        """File a new message as waiting (due now or soon), parked, or a dead letter."""
        delivery = held.delivery
        try:
            held.message = message = decode_message(delivery.raw, delivery.queue, delivery.tag,
                                                    self.app.conf.worker_max_message_size)
        except DecodeError as exc:
            if getattr(exc, "task_id", None) is not None:
                self.waiting.put(held)  # its id is known: its pool process stores its FAILURE and says why
            else:
                worker_logger.error("can't decode message: %s", exc)
                held.end, held.reason = "dead", f"can't decode message: {exc}"
            return
        task = self.app.tasks.get(message.task_name)
        held.late = bool(task and task.option("acks_late"))
        try:
            due = message.eta.timestamp() if message.eta else 0
        except (ValueError, TypeError, AttributeError):
            due = 0  # (a bad eta: its pool process says so)
        if self.is_revoked(message):
            held.verdict, due = TaskRevokedError("revoked"), 0
        if due > time.time() + self.ETA_HORIZON:
            parked.append((held, due))
        else:
            self.waiting.put(held, due, eta=True)

    def give_back(self):
        """Put what waits back in its queue (a stopping worker): what ends without running
        stays, for a pool process to record."""
        waiting = [held for held in self.held.values() if held.lent is None and held.end is None
                   and held.verdict is None and held.lost is None]
        if waiting:
            worker_logger.info("Restoring %d unacknowledged message(s)", len(waiting))
        for held in waiting:
            held.end = "requeue"

    def revoke(self, task_ids=(), stamps=None):
        """Remember revoked ids (the newest REVOKES_MAX), or stamps ({header: [values]}); held
        messages of theirs that wait for their ETA go first, to be recorded as REVOKED now."""
        self.revoked.update(dict.fromkeys(task_ids))
        while len(self.revoked) > Broker.REVOKES_MAX:  # (a flood keeps the newest, as the broker does)
            del self.revoked[next(iter(self.revoked))]
        for header, values in (stamps or {}).items():
            kept = self.revoked_stamps.setdefault(header, set())
            kept.update(list(values)[:Broker.REVOKES_MAX - len(kept)])
        self.waiting.first(lambda held: self.is_revoked(held.message))

    def is_revoked(self, message) -> bool:
        """By its id, or by one of its stamps (Celery's stamped_headers and stamps headers)."""
        if message.id in self.revoked:
            return True
        stamps, headers = message.headers.get("stamps"), message.headers.get("stamped_headers")
        if not self.revoked_stamps or not isinstance(stamps, dict) or not isinstance(headers, list):
            return False
        for header in (h for h in headers if isinstance(h, str) and h in self.revoked_stamps):
            values = stamps.get(header) if isinstance(stamps.get(header), list) else [stamps.get(header)]
            if any(isinstance(v, (str, int, float)) and v in self.revoked_stamps[header] for v in values):
                return True
        return False

    def renew_all(self):
        """Renew every claim held (the solo pool's keepalive thread, while a job runs), but
        those lent to be acked as they start."""
        now = time.time()
        renewing = [held for held in self.held.values() if held.claim and (held.late or held.lent is None)]
        if renewing:
            try:
                gone, others = self.broker.touch({held.tag: held.claim for held in renewing}, now)
            except Exception:
                self._unheard(renewing, now)
                raise
            for held in renewing:
                held.claim = () if held.tag in gone | others else (now,)

    @staticmethod
    def _unheard(renewed, now):
        """A renewal whose answer never came may have moved each claim to `now`: both count."""
        for held in renewed:
            held.claim = (held.claim[0], now)

    def restore_orphans(self):
        """Give back what a take whose answer was lost took (not ours: we never heard of it)."""
        while self.orphans:
            self.broker.restore_claimed(self.orphans[0], keep=set(self.held))
            self.orphans.pop(0)


class Consumer:
    """The worker's main process: it takes messages, holds them (its Book), lends them
    to the pool as jobs, learns how each ended and settles it with the broker, one
    step() at a time. The same loop serves every pool. It never waits for a pool
    process, and runs no task code.
    """

    #: longest a step waits, so signals and housekeeping are never late by more
    MAX_WAIT = 1.0
    #: seconds between reloads of every revoked id from the broker
    REVOKED_RELOAD = 30.0
    #: seconds a stopping worker tries to record and settle what is left once no task runs
    #: (and that a cold shutdown gives the pool to record the tasks it killed)
    LEAVE_WITHIN = 10.0
    #: seconds between worker-heartbeat events (Celery's freq; Flower counts a worker gone after a few missed)
    HEARTBEAT = 2.0

    def __init__(self, app, pool, queues, hostname, prefetch_limit):
        self.app, self.pool, self.queues, self.hostname = app, pool, list(queues), hostname
        self.broker = app.broker
        self.prefetch_limit = max(1, prefetch_limit)
        self.book = Book(app, self.queues, self.prefetch_limit + pool.concurrency)
        self.total = collections.Counter()  # task name -> how many ran here, for `inspect stats`
        self.remote = RemoteControl(self)
        self.born = time.monotonic()
        self.events = app.conf.worker_send_task_events  # task events (-E); worker events always
        self.stopping = None            # None while running; "warm" or "cold" once a shutdown was asked for
        self._next_heartbeat = self._restore_after = self._next_revoked_reload = 0.0
        self._ready_handles = None      # what the last wait found ready (None: look at everything)
        self._leave_by = None
        self._to_say = []               # warnings from signal handlers, for the loop to log

    def start_pool(self):
        self.pool.start(depth=self.prefetch_limit // self.pool.concurrency, keep_alive=self.book.renew_all,
                        every=self.book.renew_every)

    def stop(self, cold=False):
        self.stopping = "cold" if cold else (self.stopping or "warm")

    def say_soon(self, text):
        """A warning from a signal handler, logged by the loop: a handler that logged itself
        could interrupt a log line being written, and fail (a reentrant write)."""
        self._to_say.append(text)

    def _say_what_was_said(self):
        while self._to_say:
            worker_logger.warning(self._to_say.pop(0))

    # -- the loop ---------------------------------------------------------

    def run(self):
        """Consume until stop() is called, then leave: waiting messages go back to their
        queues, running jobs end (warm) or are killed (cold), and their ends are recorded.

        While the broker is unreachable, wait and retry with backoff: held messages stay
        where they are, jobs already lent run on, and what they report is kept.
        """
        self._heartbeat("worker-online")
        failures = 0
        while not self._finished():
            try:
                self.step()
                failures = 0
            except WorkerTerminate:  # a cold shutdown interrupted the solo pool's job
                continue
            except Exception as exc:  # nothing a broker or a message does may stop the worker
                failures += 1
                lost = isinstance(exc, self.broker.connection_errors)  # else a bug: with its traceback
                self._restore_after = time.monotonic() + 2 * self.book.renew_every  # see _sweep
                if lost:
                    self.broker.forget_connections()
                self.back_off(failures, "Connection to broker lost" if lost else "Unexpected error in the worker "
                              "loop", exc, exc_info=not lost)
        self._leave()

    def step(self):
        """One turn: learn what the pool did, obey commands, keep house, settle with the
        broker (ends, claims, new messages), lend what may start, then wait for news."""
        self._say_what_was_said()
        self._learn(self.pool.collect(self._ready_handles))
        self.remote.obey(self._ready_handles)
        self._ready_handles = None
        self._heartbeat()
        self._sweep()
        if self.stopping:
            self.book.give_back()
        self.book.waiting.release()
        received, started = self.book.settle(taking=not self.stopping)
        for message in received:
            self._received(message)
        for held in started:
            self._lost(held, held.lost)
        self._lend(self.book.waiting.take(self.pool.free(), self.book.lendable))
        self._wait()

    def back_off(self, failures, problem, exc, exc_info=False):
        """Log a broker error (`problem`: what it stopped) and wait longer after each of
        `failures` in a row (0.2s to 10s) before trying again, learning what the pool does."""
        delay = min(2 ** failures * 0.1, 10.0)
        worker_logger.error("%s: %s: %s; trying again in %.1fs", problem, type(exc).__name__, exc, delay,
                            exc_info=exc_info)
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0 and not self._finished():
            readable, writable = self.pool.handles()
            self._learn(self.pool.collect(wait_readable(readable, min(left, 0.1), writable)))

    def _finished(self) -> bool:
        """Whether a stopping worker may leave: no task runs (a cold stop kills them), and
        nothing is left to record or settle, or it tried for LEAVE_WITHIN seconds."""
        if not self.stopping:
            return False
        if self.stopping == "cold":
            self.pool.kill_running()
        elif any(held.lent for held in self.book.held.values()):
            return False
        self._leave_by = self._leave_by or time.monotonic() + self.LEAVE_WITHIN
        return not self.book.held or time.monotonic() > self._leave_by

    def _received(self, message):
        worker_logger.info("Task %s received", message.describe())
        if task_received.receivers:  # (a Request for each message only if someone listens)
            task_received.send(sender=self, request=Request.from_message(message, hostname=self.hostname))
        if self.events:
            headers = message.headers
            self.send_event("task-received", uuid=message.id, name=message.task_name,
                            args=str(headers.get("argsrepr") or "")[:1024],
                            kwargs=str(headers.get("kwargsrepr") or "")[:1024], root_id=headers.get("root_id"),
                            parent_id=headers.get("parent_id"), retries=message.retries,
                            eta=headers.get("eta"), expires=headers.get("expires"))

    # -- lending, and what the pool says ---------------------------------------

    def _lend(self, starting):
        """Lend each job to a free pool process. Unless acks_late, it takes the message's claim
        with it: its process acks the message just before the task starts (run_job())."""
        for held in starting:
            held.lent = time.time()
            message = held.message
            if held.verdict is None and message is not None and self.book.is_revoked(message):
                held.verdict = TaskRevokedError("revoked")
            elif held.verdict is None and message is not None and _expired(message):
                held.verdict = TaskRevokedError("expired")
            if isinstance(held.verdict, TaskRevokedError) and message is not None:
                self._tell_revoked(message, expired=str(held.verdict) == "expired")
            if worker_logger.isEnabledFor(logging.DEBUG):  # (this loop is the hot path)
                worker_logger.debug("TaskPool: Apply %s (ack %s%s)", message.describe() if message else held.tag,
                                    "late" if held.late else "as it starts",
                                    f"; not run: {held.verdict!r}" if held.verdict is not None else "")
        self.pool.apply([Job(held.tag, held.delivery.raw, held.delivery.queue, () if held.late else held.claim,
                             held.verdict, self._limits(held), self.events) for held in starting])

    def _tell_revoked(self, message, terminated=False, signum=None, expired=False):
        """The task_revoked signal, from this process, as Celery's worker sends it."""
        if message.task_name in self.app.tasks:
            task_revoked.send(sender=self.app.tasks[message.task_name], terminated=terminated, signum=signum,
                              expired=expired, request=Request.from_message(message, hostname=self.hostname))

    def _limits(self, held) -> tuple:
        """(hard, soft) time limits in effect now (`control time_limit` changes them here)."""
        try:  # (AttributeError: no message, its headers unreadable)
            _check_timelimit(held.message.headers.get("timelimit"))
            return time_limits(self.app.tasks.get(held.message.task_name), held.message)
        except (AttributeError, DecodeError, TypeError):  # (a bad header: its pool process says so)
            return None, None

    def _learn(self, events):
        unstarted = []
        for event in events:
            held = self.book.held.get(event.tag)
            if held is None or held.lent is None:
                continue
            held.lent = None
            if isinstance(event, Done):
                self._done(held, event)
            elif event.cause == "unstarted":
                unstarted.append(held)
            else:
                self._lost(held, event)
        self.book.waiting.put_first(unstarted)

    def _done(self, held, event):
        if event.state is None:
            # Not run: its claim was not ours as it was to start. Unless we took it again
            # since, it is not ours any more: settle() asks the broker.
            held.lost = Lost(held.tag, "not ours", "unstarted")
            return
        if not held.late:
            held.claim = ()  # its pool process acked it
        if held.message is not None and held.verdict is None and held.message.task_name in self.app.tasks:
            self.total[held.message.task_name] += 1
        if event.dead_letter is not None:
            held.end, held.reason = "dead", event.dead_letter
        elif held.claim:  # (acks_late: still unacked, unless it went back while we were out of touch)
            held.end = "requeue" if event.requeue else "ack"
        else:
            del self.book.held[held.tag]

    def _lost(self, held, event):
        """The pool process of a job died. A task acked late is requeued at a cold shutdown,
        or when it asks to be (reject_on_worker_lost); otherwise it ends with the loss,
        recorded by a pool process (the main process runs no task code: errbacks)."""
        held.lost = None
        if not held.late and held.claim:
            held.lost = event  # did it ack it, so start it? The broker knows (Book.settle asks)
            return
        if held.verdict is not None:  # it died recording an end: again, twice at most
            held.recordings += 1
            if held.recordings < 3 and event.cause != "timeout":
                worker_logger.warning("Task %s: the pool process recording its end died (%s); recording it "
                                      "again", held.describe(), event.reason)
                return self.book.waiting.put_first([held])
            worker_logger.error("Task %s: the pool process recording its end died (%s): its end is not "
                                "recorded", held.describe(), event.reason)
            return self._done(held, Done(held.tag, FAILURE, False, None))
        task = self.app.tasks.get(held.message.task_name) if held.message is not None else None
        if held.late and held.claim and (event.cause == "shutdown" or (
                event.cause is None and task is not None and task.option("reject_on_worker_lost"))):
            worker_logger.warning("Task %s: worker lost (%s); requeued", held.describe(), event.reason)
            held.end = "requeue"
            return
        if event.cause == "timeout":
            limit = self._limits(held)[0]
            worker_logger.error("Hard time limit (%ss) exceeded for %s", limit, held.describe())
            held.verdict = TimeLimitExceeded(limit)
        elif event.cause == "revoked":
            held.verdict = TaskRevokedError("terminated")
        else:
            held.verdict = WorkerLostError(f"Worker exited prematurely: {event.reason} Job: "
                                           f"{held.message.id if held.message else held.tag}.")
            worker_logger.error("Task handler raised error: %r", held.verdict)
        self.book.waiting.put_first([held])

    # -- waiting and housekeeping -----------------------------------------------

    def _wait(self):
        """Wait until something needs us: a pool process reports, dies or can take the rest of
        its job; a command or a signal; a message, while there is room for one; or the next
        ETA, rate limit, renewal or heartbeat."""
        book, readable, writable = self.book, *self.pool.handles()
        commands = self.broker.control_handles()
        at_hand = (book.waiting.ready and self.pool.free()) or book.more or book.orphans or any(
            held.end or held.lost for held in book.held.values()) or (self.stopping and not book.held)
        timeout = 0 if at_hand else self._timeout(polling=commands is None)
        queues = self.queues if timeout and not self.stopping and book.room() else ()
        self._ready_handles = self.broker.wait(queues, timeout, readable + (commands or []), writable)

    def _timeout(self, polling) -> float:
        """Seconds until something is due here (at most MAX_WAIT; 0.1 where commands can't wake us)."""
        now, due = time.time(), self.book.waiting.due()
        wait = min(0.1 if polling else self.MAX_WAIT, self.book.renew_every, self._next_heartbeat - time.monotonic())
        return max(min(wait, due - now) if due else wait, 0.0)

    def _sweep(self):
        """Now and then: give back what a take whose answer was lost took, bring back the
        messages of dead workers, and reload the revocations."""
        self.book.restore_orphans()
        if time.monotonic() >= self._restore_after:
            # After a broker error we wait two rounds first: the other workers were cut off
            # too, and need a round to renew their claims before theirs look abandoned.
            self._restore_after = time.monotonic() + self.book.renew_every
            restored = self.broker.restore_unacked()
            if restored:
                worker_logger.warning("Restored %d unacknowledged message(s) of lost workers", restored)
        if time.monotonic() >= self._next_revoked_reload:
            self._next_revoked_reload = time.monotonic() + self.REVOKED_RELOAD
            self.book.revoked = {}
            self.book.revoke(self.broker.revoked())

    def send_event(self, kind, **fields):
        try:  # a lost event changes nothing else: not worth a task, nor the loop
            self.broker.send_event(make_event(kind, self.hostname, **fields))
        except Exception as exc:
            worker_logger.debug("event %s not sent: %r", kind, exc)

    def _heartbeat(self, kind="worker-heartbeat"):
        if kind != "worker-heartbeat" or time.monotonic() >= self._next_heartbeat:
            self._next_heartbeat = time.monotonic() + self.HEARTBEAT
            active = sum(1 for held in self.book.held.values() if held.lent)
            self.send_event(kind, freq=self.HEARTBEAT, active=active, processed=sum(self.total.values()),
                            loadavg=[round(x, 2) for x in os.getloadavg()], sw_ident="py-celery",
                            sw_ver=__version__, sw_sys=os.uname().sysname)

    # -- revocation and leaving -----------------------------------------------

    def revoke(self, task_ids, terminate, signum):
        worker_logger.info("Tasks flagged as revoked: %s", _cut(printable(", ".join(task_ids[:20])), 1000) +
                           (f" and {len(task_ids) - 20} more" if len(task_ids) > 20 else ""))  # (a line, not 700 KB)
        self.book.revoke(task_ids)
        # Make revocations broadcast by real Celery durable too, for workers started later.
        self.broker.revoke(task_ids, expires=self.app.revoke_expires, broadcast=False)
        running = {held.message.id for held in self.book.held.values() if held.lent and held.message is not None}
        self._mark_revoked([task_id for task_id in task_ids[:self.REVOKES_MARKED] if task_id not in running])
        task_ids = set(task_ids)  # (a broadcast may name thousands: looked up once per held message)
        for held in self.book.held.values():
            if terminate and held.lent and held.message is not None and held.message.id in task_ids:
                self.terminate(held, signum)

    def terminate(self, held, signum):
        """End the task a pool process runs for `held` (revoke with terminate=True)."""
        worker_logger.info("Terminating %s (%s)", printable(held.message.id), signum)
        self._tell_revoked(held.message, terminated=True, signum=signum)
        if not self.pool.terminate(held.tag, signum):
            worker_logger.warning("the %s pool can't terminate %s", self.pool.name, held.describe())

    #: the most ids of one broadcast whose stored state a worker looks at (a read each)
    REVOKES_MARKED = 1000

    def _mark_revoked(self, task_ids):
        """As Celery 5.7: a revoked task nobody has started is stored REVOKED at once (it
        read PENDING until a worker met its message); one that another worker started
        (STARTED, or a state of its own) or that ended is left as it is."""
        if isinstance(self.app.backend, DisabledBackend):
            return
        for task_id in task_ids:
            try:
                if self.app.backend.get_meta(task_id)["status"] in (PENDING, RECEIVED, RETRY, REJECTED):
                    self.app.backend.store_result(task_id, TaskRevokedError("revoked"), REVOKED)
            except Exception as exc:  # (the revocation itself holds: the message won't run here)
                worker_logger.warning("Could not store %s as revoked: %s: %s", printable(task_id),
                                      type(exc).__name__, exc)

    def _leave(self):
        self._say_what_was_said()
        self._heartbeat("worker-offline")
        self.pool.stop()
        held = self.book.held.values()
        if held:
            worker_logger.error("Leaving without recording what became of %d message(s) (the broker is away): %s",
                                len(held), ", ".join(h.describe() for h in held))


def _ok(text):
    return {"ok": text}


#: a project's own remote-control commands: name -> (function(state, **arguments), "control" |
#: "inspect", Celery's args: [(name, type), ...] for the command line)
CUSTOM_COMMANDS = {}


def control_command(name=None, args=None, **celery_options):
    """Celery's `@control_command(args=[('n', int)])`: `def command(state, n=1)` runs in each
    worker's main process (state.consumer, state.app, state.hostname); its return is the reply."""
    return functools.partial(_register_command, "control", name, args)


def inspect_command(name=None, args=None, **celery_options):
    """Celery's `@inspect_command()`: as control_command, for commands that only look."""
    return functools.partial(_register_command, "inspect", name, args)


def add_consumer(state, queue, **_):
    """Celery's built-in command as a function, for a project's own command to call."""
    return state.control.do_add_consumer(queue)


def cancel_consumer(state, queue, **_):
    return state.control.do_cancel_consumer(queue)


def _register_command(kind, name, args, function):
    CUSTOM_COMMANDS[name or function.__name__] = (function, kind, list(args or ()))
    return function


def _within_reply_limit(answer):
    """The answer, or an error if it is more than a client reads (its base64 is 4/3 of it),
    or can't be sent as JSON (a project's own command can return anything)."""
    try:
        size = len(json_dumps(answer))
    except (TypeError, ValueError, RecursionError) as exc:
        return {"error": f"the reply can't be sent as JSON: {_short_repr(exc, 200)}"}
    if size * 4 // 3 + 4096 <= CONTROL_REPLY_LIMIT:
        return answer
    return {"error": f"the reply of {size} bytes is over the {CONTROL_REPLY_LIMIT} bytes a client reads"}


class RemoteControl:
    """A worker's answers to Celery's remote-control commands (`celery inspect ...`,
    `celery control ...`, app.control): do_<command>(**arguments) returns the reply,
    in Celery's form, or None for no reply. The consumer calls it between its steps."""

    def __init__(self, consumer):
        self.consumer, self.app, self.broker = consumer, consumer.app, consumer.broker
        self._heard = []  # commands heard before the first step (listen())
        self._next_look = 0.0
        self.clock = 0  # Celery's logical clock: here, the commands this worker has handled

    def listen(self):
        """Start hearing broadcasts before the worker says it is ready, so that a ping sent
        the moment it is ready is answered (the commands wait for the first step)."""
        self._heard = self.broker.control_messages()

    def obey(self, ready=None):
        """Obey the commands broadcast since the last step; answer those that ask. A broker
        whose commands wake us is read when its handle is in `ready` (None: not known);
        one without handles, ten times a second."""
        handles = self.broker.control_handles()
        if handles is None and time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + 0.1
        if handles and ready is not None and not set(handles) & set(ready) and not self._heard:
            return
        heard, self._heard = self._heard, []
        hostname = self.consumer.hostname
        for command in heard + self.broker.control_messages():
            if command.destination and hostname not in command.destination:
                continue
            answer = self.handle(command)
            if command.reply_to and answer is not None:
                self.broker.reply(command.reply_to, command.ticket, {hostname: _within_reply_limit(answer)})

    def handle(self, command):
        self.clock += 1
        handler = getattr(self, f"do_{command.method}", None)
        if handler is None and command.method in CUSTOM_COMMANDS:  # the project's own (Celery's Panel)
            state = types.SimpleNamespace(consumer=self.consumer, app=self.app, hostname=self.consumer.hostname,
                                          control=self)
            handler = functools.partial(CUSTOM_COMMANDS[command.method][0], state)
        if handler is None:
            return {"error": f"unknown command {command.method!r}"}
        try:
            return handler(**command.arguments)
        except (TypeError, ValueError, ImproperlyConfigured) as exc:  # arguments that don't fit
            worker_logger.error("Control command error: %s: %s", command.method, exc)
            return {"error": f"{command.method}: {exc}"}
        except Exception as exc:  # (a project's command that failed: the worker goes on)
            worker_logger.exception("Control command %s raised", command.method)
            return {"error": f"{command.method}: {type(exc).__name__}: {_cut(str(exc), 200)}"}

    #: a held message's body is read for `inspect` up to this size; a bigger one is shown
    #: by the sender's argsrepr and kwargsrepr (the main process reads no big bodies)
    INFO_BODY_MAX = 8192

    def info(self, held):
        """A held message as Celery's Request.info() shows it.

        Celery: inspect-args: a task's arguments over INFO_BODY_MAX bytes show as their
        sender's repr (argsrepr, kwargsrepr: 1 KiB at most), as `safe=True` shows them.
        """
        message, consumer, args, kwargs = held.message, self.consumer, None, None
        with contextlib.suppress(DecodeError):  # (its arguments are read only when asked for)
            if len(message.body) <= self.INFO_BODY_MAX:
                message.decode_body(accepted_types(self.app.conf.accept_content), self.INFO_BODY_MAX)
                args, kwargs = message.args, message.kwargs
        if args is None:
            args, kwargs = (str(message.headers.get(key) or "")[:1024] for key in ("argsrepr", "kwargsrepr"))
        pid = next((pid for pid, tag in consumer.pool.jobs().items() if tag == held.tag), None) \
            if held.tag is not None else None  # (a parked message: no process has it)
        return {"id": message.id, "name": message.task_name, "args": args, "kwargs": kwargs,
                "type": message.task_name, "hostname": consumer.hostname, "time_start": held.lent if pid else None,
                "acknowledged": bool(pid) and not held.late, "worker_pid": pid,
                "delivery_info": {"exchange": "", "routing_key": message.queue, "priority": message.priority,
                                  "redelivered": bool(message.properties.get("redelivered"))}}

    def _held(self):
        """("active" | "reserved" | "scheduled", Held) for each held message with readable headers:
        active, running in a pool process; scheduled, waiting for its ETA or rate limit;
        reserved, the others (waiting, or lent behind a task that runs)."""
        consumer, running = self.consumer, set(self.consumer.pool.jobs().values())
        scheduled = {id(entry[2]) for entry in consumer.book.waiting.scheduled}
        return [("active" if held.tag in running else "scheduled" if id(held) in scheduled else "reserved", held)
                for held in consumer.book.held.values() if held.message is not None and (held.lent or held.end is None)]

    # -- inspect ----------------------------------------------------------------

    def do_ping(self, **_):
        return _ok("pong")

    def do_active(self, safe=None, **_):
        return [self.info(held) for state, held in self._held() if state == "active"]

    def do_reserved(self, **_):
        return [self.info(held) for state, held in self._held() if state == "reserved"]

    def do_scheduled(self, **_):
        """Held for their ETA (or rate limit) here, then those parked in the broker for a later
        ETA (`"parked": true`: each worker of their queue lists them; none holds them yet)."""
        scheduled = [(held, {}) for state, held in self._held() if state == "scheduled"]
        parked = [(held, {"parked": True}) for held in self._parked()]
        # ("priority": 6 is what Celery shows there: its timer's priority for ETA entries)
        return [{"eta": held.message.eta.isoformat() if held.message.eta else None, "priority": 6,
                 "request": self.info(held), **extra} for held, extra in scheduled + parked]

    #: parked messages looked at for `inspect scheduled` (each a read of its envelope)
    PARKED_SHOWN = 100

    def _parked(self) -> list:
        """The parked messages, each as a held message that no pool process has (for info())."""
        parked = []
        for queue, raw in self.broker.parked(self.consumer.queues, self.PARKED_SHOWN):
            with contextlib.suppress(DecodeError):  # (a bad one shows where a worker meets it: dead letters)
                message = decode_message(raw, queue, max_size=self.app.conf.worker_max_message_size)
                parked.append(types.SimpleNamespace(message=message, tag=None, lent=None, late=False))
        return parked

    def do_registered(self, taskinfoitems=None, builtins=False, **_):
        """Task names; with taskinfoitems (Celery's default: rate_limit), `name [item=value ...]`."""
        items = taskinfoitems or ("exchange", "routing_key", "rate_limit")
        names = sorted(name for name in self.app.tasks if builtins or not name.startswith("celery."))
        described = {name: " ".join(f"{item}={getattr(self.app.tasks[name], item)}" for item in items
                                    if getattr(self.app.tasks[name], item, None) is not None) for name in names}
        return [f"{name} [{described[name]}]" if described[name] else name for name in names]

    def do_clock(self, **_):
        return {"clock": self.clock}

    def do_report(self, **_):
        """Celery's bug report: the software, the platform, the settings (secrets masked)."""
        import platform
        settings = "\n".join(f"{name}: {_short_repr(_mask_secrets(name, getattr(self.app.conf, name)), 200)}"
                             for name in _CONFIG_TYPES)
        return _ok(f"software -> celery:minicelery-{__version__} py:{platform.python_version()}\n"
                   f"platform -> system:{platform.system()} arch:{platform.machine()} "
                   f"imp:{platform.python_implementation()}\n"
                   f"settings -> transport:{self.app.broker_url.split(':')[0]} "
                   f"results:{_safe_url(self.app.backend_url or 'disabled')}\n\n{settings}")

    def do_revoked(self, **_):
        return sorted(self.consumer.book.revoked)

    def do_query_task(self, ids=(), **_):
        ids = {ids} if isinstance(ids, str) else set(ids)
        found = [("scheduled", held) for held in self._parked()] + self._held()  # (held wins over parked)
        return {held.message.id: [state, self.info(held)] for state, held in found if held.message.id in ids}

    def do_active_queues(self, **_):
        """Each queue as kombu describes a Queue (Flower's worker page reads every field)."""
        return [{"name": queue, "exchange": {"name": queue, "type": "direct", "arguments": None, "auto_delete": False,
                                             "delivery_mode": None, "durable": True, "no_declare": False,
                                             "passive": False},
                 "routing_key": queue, "durable": True, "exclusive": False, "auto_delete": False, "no_ack": False,
                 "alias": None, "bindings": [], "binding_arguments": None, "consumer_arguments": None,
                 "expires": None, "max_length": None, "max_length_bytes": None, "max_priority": None,
                 "message_ttl": None, "no_declare": None, "queue_arguments": None} for queue in self.consumer.queues]

    def do_stats(self, **_):
        """Celery's `inspect stats`, with every field Flower reads (what we don't have: its empty value)."""
        consumer, pool, conf, url = self.consumer, self.consumer.pool, self.app.conf, self.app.broker_url
        usage = resource.getrusage(resource.RUSAGE_SELF)
        writes = {"total": sum(consumer.total.values()), "avg": "0.00", "all": "", "raw": "", "strategy": "fair",
                  "inqueues": {"total": pool.concurrency, "active": len(pool.jobs())}}
        broker = {"hostname": _safe_url(url), "userid": None, "virtual_host": "/", "port": None, "insist": False,
                  "ssl": url.startswith("rediss"), "transport": url.split("://")[0],
                  "connect_timeout": RedisBackend.SOCKET_TIMEOUT,
                  "transport_options": _jsonable(dict(conf.broker_transport_options or {})), "login_method": None,
                  "uri_prefix": None, "heartbeat": None, "failover_strategy": None, "alternates": [],
                  "credential_provider": None}
        return {"total": dict(consumer.total), "pid": os.getpid(), "clock": str(self.clock),
                "uptime": int(time.monotonic() - consumer.born), "prefetch_count": consumer.prefetch_limit,
                "pool": {"implementation": pool.name, "max-concurrency": pool.concurrency,
                         "processes": sorted(pool.jobs()), "max-tasks-per-child": pool.max_tasks_per_child or "N/A",
                         "put-guarded-by-semaphore": False,
                         "timeouts": [conf.task_soft_time_limit or 0, conf.task_time_limit or 0], "writes": writes},
                "broker": broker,
                "rusage": {name[3:]: getattr(usage, name) for name in dir(usage) if name.startswith("ru_")}}

    #: Celery's settings that mean nothing here, as `inspect conf` shows them (what minicelery does)
    CELERY_ONLY_CONF = {"worker_hijack_root_logger": False, "worker_log_color": False, "broker_heartbeat": None,
                        "deprecated_settings": None, "worker_redirect_stdouts": False, "worker_disable_prefetch": False}

    def do_conf(self, with_defaults=False, **_):
        conf = {name: _jsonable(_mask_secrets(name, getattr(self.app.conf, name))) for name in _CONFIG_TYPES}
        return {**self.CELERY_ONLY_CONF, **conf}

    # -- control ----------------------------------------------------------------

    def do_revoke(self, task_id, terminate=False, signal=None, **_):
        ids, terminate, signum, _ = revoke_command(task_id, terminate, signal)
        self.consumer.revoke(ids, terminate, signum)
        return _ok(f"tasks {set(ids)} flagged as revoked")

    def do_revoke_by_stamped_headers(self, headers, terminate=False, signal=None, **_):
        """Celery 5.3's: headers {name: value or [values]} (or a list of 'name=value')."""
        if isinstance(headers, list):
            headers = dict(h.split("=", 1) for h in headers if isinstance(h, str) and "=" in h)
        if not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers):
            raise TypeError(f"headers must be {{name: [values]}}, not {_short_repr(headers, 80)}")
        stamps = {k: [v for v in (vs if isinstance(vs, list) else [vs]) if isinstance(v, (str, int, float))]
                  for k, vs in headers.items()}
        _, terminate, signum, _ = revoke_command([], terminate, signal)
        self.consumer.book.revoke(stamps=stamps)
        if not terminate:
            return _ok(f"headers {headers} flagged as revoked, but not terminated")
        running = [held for held in self.consumer.book.held.values()
                   if held.lent and held.message is not None and self.consumer.book.is_revoked(held.message)]
        for held in running:
            self.consumer.terminate(held, signum)
        return _ok(f"headers {headers} revoked" if running else f"headers {headers} were not terminated")

    def do_rate_limit(self, task_name, rate_limit, **_):
        if task_name not in self.app.tasks:
            return {"error": "unknown task"}
        try:
            parse_rate(rate_limit)
        except ImproperlyConfigured as exc:
            return {"error": f"Invalid rate limit string: {exc!r}"}
        self.app.tasks[task_name].set_by_control(rate_limit=rate_limit)
        self.consumer.book.waiting.rate_changed(task_name)
        return _ok("new rate limit set successfully" if rate_limit else "rate limit disabled successfully")

    def do_time_limit(self, task_name=None, hard=None, soft=None, **_):
        if task_name not in self.app.tasks:
            return {"error": "unknown task"}
        if not all(limit is None or (_is_number(limit) and limit >= 0) for limit in (hard, soft)):
            return {"error": f"time limits are seconds >= 0 or null, not {hard!r} and {soft!r}"}
        self.app.tasks[task_name].set_by_control(time_limit=hard, soft_time_limit=soft)  # (stamped on each job)
        return _ok("time limits set successfully")

    def do_add_consumer(self, queue, **_):
        if not (isinstance(queue, str) and queue):
            return {"error": f"a queue is a name, not {_short_repr(queue, 80)}"}
        if queue not in self.consumer.queues:
            self.consumer.queues.append(queue)
        return _ok(f"add consumer {queue}")

    def do_cancel_consumer(self, queue, **_):
        if self.consumer.queues == [queue]:
            return {"error": f"{queue} is the last queue this worker consumes"}
        if queue in self.consumer.queues:
            self.consumer.queues.remove(queue)
        return _ok(f"no longer consuming from {queue}")

    def do_enable_events(self, **_):
        was, self.consumer.events = self.consumer.events, True
        return _ok("task events already enabled" if was else "task events enabled")

    def do_disable_events(self, **_):
        was, self.consumer.events = self.consumer.events, False
        return _ok("task events disabled" if was else "task events already disabled")

    def do_shutdown(self, **_):
        worker_logger.warning("Got shutdown from remote")
        self.consumer.stop()
        return None  # Celery's worker leaves without a reply


def _check_privileges(app):
    """As Celery: run as root, a worker that accepts pickle (any message could run any
    code, as root) refuses to start unless C_FORCE_ROOT is set; any other, a warning."""
    if os.getuid() != 0 and os.geteuid() != 0:
        return
    if PICKLE_TYPE in accepted_types(app.conf.accept_content) and not os.environ.get("C_FORCE_ROOT"):
        raise ImproperlyConfigured("Running a worker with superuser privileges when the worker accepts messages "
                                   "serialized with pickle is a very bad idea! If you really want to continue "
                                   "then you have to set the C_FORCE_ROOT environment variable.")
    worker_logger.warning("You're running the worker with superuser privileges: this is absolutely not recommended!")


class Worker:
    """A whole worker: banner, pool, consumer and signal handling.

    `app.Worker(concurrency=2, queues=['celery']).start()` blocks until a
    SIGTERM/SIGINT (warm shutdown: running tasks finish) or a second one (cold).
    As a context manager it runs in a thread until the block ends, for tests:
    `with app.Worker(pool='solo'): ...`.
    """

    def __init__(self, app, concurrency=None, pool=None, queues=None, hostname=None,
                 loglevel="INFO", max_tasks_per_child=None, prefetch_multiplier=None, beat=False):
        conf = app.conf
        self.app = app
        self.concurrency = concurrency or conf.worker_concurrency or os.cpu_count() or 1
        pool = pool or conf.worker_pool
        for name in set(CONTENT_TYPES) & {"msgpack", "yaml"} & set(conf.accept_content):
            _optional_library(name)  # accepted but not installed: say so now, not per message
        if beat:
            _check_beat_config(app)
        if pool not in POOLS:
            raise ImproperlyConfigured(f"the {pool!r} pool is not offered; use one of {sorted(POOLS)}")
        self.pool_name = pool
        # Without -Q, every queue in task_queues, as Celery's worker consumes them.
        self.queues = list(queues or queue_names(conf.task_queues or [conf.task_default_queue]))
        if not queues and conf.task_default_queue not in self.queues:
            worker_logger.warning("task_queues leaves out task_default_queue %r: tasks sent without "
                                  "a route wait there, for a worker started with -Q", conf.task_default_queue)
        self.hostname = _expand_hostname(hostname or "celery@%h")
        self.loglevel = loglevel
        self.max_tasks_per_child = max_tasks_per_child or conf.worker_max_tasks_per_child
        self.prefetch_multiplier = prefetch_multiplier or conf.worker_prefetch_multiplier
        if pool != "solo" and app.broker_url.startswith("memory://"):
            raise ImproperlyConfigured(
                "memory:// keeps messages inside one process, which forked pool processes "
                "can't share: use pool='solo' (-P solo), or sqlite:// to share them between processes")
        self.consumer = self._thread = None  # made once it starts (the thread: as a context manager)
        self.embed_beat = beat
        self.restarting = False  # SIGHUP asked for a restart
        self.ready = threading.Event()  # set once the worker consumes

    def start(self):
        celeryd_init.send(sender=self.hostname, instance=self, conf=self.app.conf, options={})
        self.app.finalize()
        pool = POOLS[self.pool_name](self.app, self.concurrency, self.hostname, self.max_tasks_per_child)
        self.consumer = Consumer(self.app, pool, self.queues, self.hostname, self.prefetch_multiplier * pool.concurrency)
        worker_init.send(sender=self)
        print(self.banner(pool), file=sys.stderr, flush=True)
        celeryd_after_setup.send(sender=self.hostname, instance=self, conf=self.app.conf)
        _check_privileges(self.app)
        beat_pid = self._start_beat() if self.embed_beat else None
        self.consumer.start_pool()
        self._install_signal_handlers()
        if self._connect():
            worker_logger.info("Connected to %s", _safe_url(self.app.broker_url))
            self._warn_what_loses_tasks()
            worker_logger.info("%s ready.", self.hostname)
            worker_ready.send(sender=self.consumer)
            self.ready.set()
        try:
            self.consumer.run()
        finally:
            if beat_pid:
                _kill(beat_pid, signal.SIGTERM)
                _reap(beat_pid)
            worker_shutdown.send(sender=self)
            self.app.close()
        if self.restarting:
            self._restart()

    def _connect(self) -> bool:
        """Reach the broker, waiting for it as long as it takes: a worker started before it
        (a container start order, a reboot) says why it waits and works once it can. False
        if the worker was stopped while it waited."""
        failures = 0
        while not self.consumer.stopping:
            try:
                self.consumer.remote.listen()
                return True
            except self.app.broker.connection_errors as exc:
                failures += 1
                self.consumer.back_off(failures, f"Cannot connect to {_safe_url(self.app.broker_url)}", exc)
            except Exception as exc:  # (it answers, but not as Redis does: no use waiting)
                raise ImproperlyConfigured(f"can't use the broker at {_safe_url(self.app.broker_url)}: "
                                           f"{type(exc).__name__}: {_cut(str(exc), 200)}") from exc
        return False

    def _warn_what_loses_tasks(self):
        """What `doctor` finds would lose or repeat tasks, each as a warning: the worker starts anyway."""
        try:
            findings = doctor(self.app)
        except Exception as exc:  # (a check is advice: it never keeps a worker from its work)
            worker_logger.warning("doctor's checks could not be made: %s: %s", type(exc).__name__, exc)
            return
        for finding in findings:
            if finding.level in ("LOSES", "unknown"):
                worker_logger.warning("%s: %s: %s (fix: %s; `doctor` says more)", finding.check, finding.found,
                                      finding.why, finding.fix)

    def _restart(self):
        """SIGHUP: after a warm shutdown, run this program again as it was started (as Celery does)."""
        worker_logger.warning("Restarting worker (%s)", " ".join(sys.orig_argv))
        logging.shutdown()  # flushed: nothing logged is lost in the exec
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # stays ignored across exec, until the new
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # worker handles it again

    def _start_beat(self):
        """`worker -B`: beat in a process of its own, forked before the pool."""
        def run_beat():
            global _process_name
            _process_name = "Beat"
            self.app.after_fork()
            beat = Beat(self.app)
            beat_embedded_init.send(sender=beat)
            beat.run()
        return fork_child(run_beat)

    def stop(self, cold=False):
        if self.consumer is not None:
            self.consumer.stop(cold)

    def __enter__(self):
        self._thread = threading.Thread(target=self.start, name="minicelery-worker", daemon=True)
        self._thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the worker did not start within 30 s")
        return self

    def __exit__(self, *exc_info):
        self.stop()
        self._thread.join(30)

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return  # a worker in a thread is stopped with stop()

        def on_signal(signum, frame):
            cold = self.consumer.stopping is not None
            self.restarting = False  # asked to stop: no restart after all
            self.stop(cold)
            self.consumer.say_soon(f"worker: {'Cold' if cold else 'Warm'} shutdown (MainProcess)")
            if cold and isinstance(self.consumer.pool, SoloPool) and self.consumer.pool.running:
                raise WorkerTerminate(1)  # interrupt the task running in this very process

        def on_hangup(signum, frame):
            self.restarting = True
            self.stop()
            self.consumer.say_soon("worker: Warm shutdown, then restart (SIGHUP)")

        def on_quit(signum, frame):  # Celery's cold shutdown at once
            self.consumer.stopping = "warm"
            on_signal(signum, frame)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
        signal.signal(signal.SIGQUIT, on_quit)
        import faulthandler  # SIGUSR1: every thread's stack to the log, as Celery's worker does
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        signal.signal(signal.SIGUSR2, lambda *_: self.consumer.say_soon(
            "SIGUSR2 ignored (Celery's remote debugger is not offered)"))
        watch_signals()

    def banner(self, pool):
        import platform
        tasks = "\n".join(f"  . {name}" for name in sorted(self.app.tasks)  # (Celery's built-ins at -l debug)
                          if not name.startswith("celery.") or worker_logger.isEnabledFor(logging.DEBUG)) or "  (none)"
        queues = "\n".join(f"                .> {q:<16} exchange={q}(direct) key={q}" for q in self.queues)
        backend = _safe_url(self.app.backend_url) if self.app.backend_url else "disabled://"
        events = "ON" if self.app.conf.worker_send_task_events else "OFF (enable -E to monitor tasks in this worker)"
        default = f" (the default, no broker configured: {os.path.abspath('minicelery.db')}; clients " \
                  "must start in this directory too)" if self.app.broker_url == Config.DEFAULT_URL else ""
        return "\n".join([
            f" -------------- {self.hostname} v{__version__} (minicelery)",
            "--- ***** ----- ",
            f"-- ******* ---- {platform.platform()} {dt.datetime.now():%Y-%m-%d %H:%M:%S}",
            "- *** --- * --- ",
            "- ** ---------- [config]",
            f"- ** ---------- .> app:         {self.app.main}:{id(self.app):#x}",
            f"- ** ---------- .> transport:   {_safe_url(self.app.broker_url)}{default}",
            f"- ** ---------- .> results:     {backend}",
            f"- *** --- * --- .> concurrency: {pool.concurrency} ({pool.name})",
            f"-- ******* ---- .> task events: {events}",
            "--- ***** ----- ",
            " -------------- [queues]",
            queues, "", "[tasks]", tasks, "",
        ])


# =============================================================================
# 11. Beat: periodic tasks
# =============================================================================
# A schedule answers beat's one question about an entry: given when it last ran,
# is it due now, and how long may beat sleep before asking again? `schedule` is a
# fixed interval of elapsed time; `crontab` names wall-clock minutes as cron(5)
# does. Both take `now` so tests can drive the clock.
#
# Crontab minutes are wall-clock times in the schedule's zone, and daylight
# saving makes the clocks skip some of them and show others twice. Every time a
# crontab names runs exactly once:
#   - a time the clocks skip (02:30 on the spring-forward night in Berlin) runs
#     at the first instant after the gap (03:00), as cron(8) does for jobs at a
#     fixed time, so a daily job keeps its place before a 03:15 one;
#   - a time the clocks show twice (02:30 on the fall-back night) runs the first
#     time only.
# So an hourly job at :30 runs at 01:30, 03:00 and 03:30 on the spring-forward
# night, and at 01:30, 02:30 (summer time) and 03:30 on the fall-back night.
# Celery: daylight-saving: a skipped time runs as late as the clocks jumped (02:30 at 03:30), so
# there the hourly job runs at 01:30 and 03:30 only; fall-back is the same.

#: What is_due() returns: whether to run now, and seconds until beat should ask again.
schedstate = namedtuple("schedstate", ("is_due", "next"))


def _as_utc(moment: dt.datetime) -> dt.datetime:
    """`moment` in UTC; a naive datetime is taken to be in UTC already.

    Arithmetic and comparisons happen in UTC because Python compares two
    datetimes of the same zone by their wall clocks, which DST makes lie.
    """
    return moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment.astimezone(dt.timezone.utc)


class schedule:
    """Run every `run_every` (seconds or a timedelta), counted from the last run.

    The interval is elapsed time: across a DST change, one day is 24 hours and not
    "the same time tomorrow" (crontab does that).
    """
    # Celery: schedules: no `relative=True` (rounding runs to the interval's clock boundary).

    def __init__(self, run_every):
        if _is_number(run_every):
            run_every = dt.timedelta(seconds=run_every)
        if not isinstance(run_every, dt.timedelta):
            raise ImproperlyConfigured(
                f"schedule run_every must be seconds or a timedelta, "
                f"not {type(run_every).__name__}: {run_every!r}")
        if run_every <= dt.timedelta(0):  # beat would send it in a tight loop
            raise ImproperlyConfigured(f"a schedule must run every more than 0 seconds, not {run_every}")
        self.run_every = run_every

    seconds = property(lambda self: max(self.run_every.total_seconds(), 0))

    def remaining_estimate(self, last_run_at, now=None) -> dt.timedelta:
        """Time from `now` until the next run; negative when it is overdue."""
        return _as_utc(last_run_at) + self.run_every - _as_utc(now or utcnow())

    def is_due(self, last_run_at, now=None) -> schedstate:
        """(True, interval) when due, else (False, seconds left).

        Overdue by many intervals is still one run: beat runs the entry now and
        records now as its last run, so missed runs are not made up.
        """
        left = self.remaining_estimate(last_run_at, now).total_seconds()
        return schedstate(False, left) if left > 0 else schedstate(True, self.seconds)

    def __repr__(self):
        return f"<freq: {self.seconds:g} seconds>"

    def __eq__(self, other):
        if isinstance(other, schedule):
            return self.run_every == other.run_every
        return NotImplemented


_DAY_NAMES = {name: n for n, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_MONTH_NAMES = {name: n for n, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
#: Each crontab field: its lowest and highest value, and the names it accepts.
_CRON_FIELDS = {
    "minute": (0, 59, {}), "hour": (0, 23, {}), "day_of_week": (0, 6, _DAY_NAMES),
    "day_of_month": (1, 31, {}), "month_of_year": (1, 12, _MONTH_NAMES),
}
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the longest February
#: One comma-separated part: `*`, `5`, `mon` or a range `1-5`, then maybe `/step`.
_CRON_PART = re.compile(r"(?:(\*)|(\w+)(?:-(\w+))?)(?:/(\d+))?")
#: The Gregorian calendar repeats every 400 years, so a day that ever matches
#: matches within this many days.
_GREGORIAN_CYCLE_DAYS = 146097


def _cron_field(field: str, spec) -> frozenset:
    """A crontab field (an int, a cron string or a collection of ints) as the set
    of values it matches."""
    if spec is None:
        spec = "*"
    if isinstance(spec, str):
        values = {v for part in spec.split(",") for v in _cron_part(field, spec, part)}
    elif isinstance(spec, int):
        values = {spec}
    elif isinstance(spec, (set, frozenset, list, tuple, range)) and all(isinstance(v, int) for v in spec):
        values = set(spec)
    else:
        raise ImproperlyConfigured(
            f"crontab {field} {spec!r} is not an int, a string like '*/15' or a set of ints")
    if not values:
        raise ImproperlyConfigured(f"crontab {field} {spec!r} matches nothing")
    for value in values:
        _cron_check(field, spec, value)
    return frozenset(v % 7 if field == "day_of_week" else v for v in values)


def _cron_part(field: str, spec: str, part: str) -> list:
    """One part of a cron string: `*`, `5`, `mon`, or a range `1-5`; a range that
    ends below its start wraps around (`fri-mon`, `22-2`). `*` and ranges may
    take a step: `*/15`, `2-30/2`."""
    lo, hi, _ = _CRON_FIELDS[field]
    match = _CRON_PART.fullmatch(part.strip())
    if not match or match[4] is not None and not (match[1] or match[3]):
        raise ImproperlyConfigured(
            f"crontab {field} {spec!r}: {part!r} is not like '*', '5', '1-5', '*/15' or '1-30/2'")
    star, first, last, step = match.groups()
    if star:
        values = list(range(lo, hi + 1))
    else:
        first, last = _cron_value(field, spec, first), _cron_value(field, spec, last or first)
        values = list(range(first, last + 1)) if first <= last else \
            list(range(first, hi + 1)) + list(range(lo, last + 1))
    if step is not None and int(step) == 0:
        raise ImproperlyConfigured(f"crontab {field} {spec!r}: the step in {part!r} must be 1 or more")
    return values[::int(step or 1)]


def _cron_value(field: str, spec: str, token: str) -> int:
    """A number or a name (`sun`, `sunday`, `jan`: the first three letters count)."""
    names = _CRON_FIELDS[field][2]
    if token.isdecimal():
        return _cron_check(field, spec, int(token))
    if token[:3].lower() in names:
        return names[token[:3].lower()]
    hint = f" or one of {', '.join(names)}" if names else ""
    raise ImproperlyConfigured(f"crontab {field} {spec!r}: {token!r} is not a number{hint}")


def _cron_check(field: str, spec, value: int) -> int:
    lo, hi, _ = _CRON_FIELDS[field]
    top = 7 if field == "day_of_week" else hi  # cron(5)'s 7 is Sunday too
    if not lo <= value <= top:
        what = repr(spec) if str(spec).strip() == str(value) else f"{spec!r}: {value}"
        raise ImproperlyConfigured(f"crontab {field} {what} is out of range {lo}-{top}")
    return value


def _wall_to_instant(wall: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """The first instant the clocks in `tz` show the naive time `wall`, or when
    they skip it (a DST gap), the instant they resume."""
    while True:
        moment = wall.replace(tzinfo=tz)  # fold=0: the earlier of a repeated time
        if moment.astimezone(dt.timezone.utc).astimezone(tz).replace(tzinfo=None) == wall:
            return moment
        wall += dt.timedelta(minutes=1)


class crontab:
    """Run at the wall-clock minutes cron(5) would, in zone `tz` (UTC when None):
    crontab(minute=0, hour='*/3') runs at midnight, 3am, 6am and so on.

    Each field takes an int, a set of ints, or a cron string: `*`, `*/15`, `1-5`,
    `0,3,6`, `*/3,8-17`, `2-30/2`. day_of_week takes day names too (`mon-fri`,
    `sunday`; Sunday is 0, or 7), and month_of_year month names (`jan`, `march`).
    A day runs only if it matches day_of_month, month_of_year *and* day_of_week:
    day_of_week='mon', day_of_month='1-7' is the first Monday of each month.
    """
    # cron(5) runs on a day matching either day field when both are restricted;
    # Celery needs both to match, and so do we.
    # Celery: daylight-saving: day_of_week=7 is an error there, and month or day names
    # are accepted in any field there (hour='mon' is 1).
    # As in Celery, tz comes from the app's timezone setting, unless given.

    def __init__(self, minute="*", hour="*", day_of_week="*", day_of_month="*",
                 month_of_year="*", tz=None):
        self._specs = (minute, hour, day_of_month, month_of_year, day_of_week)
        for field, spec in zip(_CRON_FIELDS, (minute, hour, day_of_week, day_of_month, month_of_year)):
            setattr(self, field, _cron_field(field, spec))  # self.minute = the set of minutes it runs at, ...
        if not any(day <= _MONTH_DAYS[month - 1]
                   for month in self.month_of_year for day in self.day_of_month):
            raise ImproperlyConfigured(
                f"crontab day_of_month {day_of_month!r} never occurs in "
                f"month_of_year {month_of_year!r}")
        #: the zone its wall-clock times are in; None: the app's timezone in beat, else UTC
        self.tz = tz
        if tz is not None and not isinstance(tz, dt.tzinfo):
            raise ImproperlyConfigured(
                f"crontab tz must be a tzinfo such as zoneinfo.ZoneInfo({tz!r}), "
                f"not {type(tz).__name__}")

    @classmethod
    def from_string(cls, line: str, tz=None) -> "crontab":
        """A crontab from a cron(5) line: `minute hour day_of_month month day_of_week`."""
        fields = line.split()
        if len(fields) != 5:
            raise ImproperlyConfigured(
                f"crontab {line!r} has {len(fields)} fields, not 5: "
                f"minute hour day_of_month month_of_year day_of_week")
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        return cls(minute, hour, day_of_week, day_of_month, month_of_year, tz=tz)

    def _runs_on(self, day: dt.date) -> bool:
        return (day.month in self.month_of_year and day.day in self.day_of_month
                and day.isoweekday() % 7 in self.day_of_week)

    def next_run_after(self, when: dt.datetime) -> dt.datetime:
        """The first run strictly after `when`, as an aware datetime in tz.

        Walks the zone's calendar day by day and tries each day's wall-clock
        minutes in order; as they only ever map to later instants, the first one
        after `when` is the answer. See the chapter comment for DST.
        """
        when, tz = _as_utc(when), self.tz or dt.timezone.utc
        start = when.astimezone(tz).replace(tzinfo=None, second=0, microsecond=0)
        day = start.date()
        for _ in range(_GREGORIAN_CYCLE_DAYS):
            if self._runs_on(day):
                for hour in sorted(h for h in self.hour if day > start.date() or h >= start.hour):
                    for minute in sorted(self.minute):
                        wall = dt.datetime.combine(day, dt.time(hour, minute))
                        if wall >= start and (run := _wall_to_instant(wall, tz)) > when:
                            return run
            day += dt.timedelta(days=1)
        raise ImproperlyConfigured(f"{self!r} never runs")  # unreachable: __init__ checks

    def remaining_estimate(self, last_run_at, now=None) -> dt.timedelta:
        """Time from `now` until the first run after `last_run_at`; negative when overdue."""
        return self.next_run_after(last_run_at) - _as_utc(now or utcnow())

    def is_due(self, last_run_at, now=None) -> schedstate:
        """(True, seconds to the following run) when a run came due since
        `last_run_at`, else (False, seconds to it).

        However many runs were missed, it is due once: beat runs the entry now and
        records now as its last run, so the next answer counts from now.
        """
        # Celery: schedules: beat_cron_starting_deadline can skip a run missed long ago; not here.
        now = _as_utc(now or utcnow())
        left = self.remaining_estimate(last_run_at, now).total_seconds()
        if left > 0:
            return schedstate(False, left)
        return schedstate(True, self.remaining_estimate(now, now).total_seconds())

    def __repr__(self):
        fields = " ".join(str(spec).replace(" ", "") for spec in self._specs)
        return f"<crontab: {fields} (m/h/dM/MY/d) {self.tz or 'UTC'}>"

    def __eq__(self, other):
        if isinstance(other, crontab):
            return all(getattr(self, name) == getattr(other, name) for name in (*_CRON_FIELDS, "tz"))
        return NotImplemented


def maybe_schedule(value):
    """A beat entry's `schedule` as a schedule object: seconds or a timedelta
    become schedule(value); schedule, crontab, and any object with is_due() (a
    schedule of your own) pass through."""
    # As in Celery, None passes through, and fails later in beat.
    if _is_number(value) or isinstance(value, dt.timedelta):
        return schedule(value)
    if type(value).__module__.startswith("celery."):  # a project half moved over
        raise ImproperlyConfigured(f"{type(value).__name__} from {type(value).__module__} is the real "
                                   "Celery's; import it from minicelery.schedules")
    if callable(getattr(value, "is_due", None)):
        return value
    raise ImproperlyConfigured(
        f"a beat schedule must be seconds, a timedelta, schedule(...) or crontab(...), "
        f"not {type(value).__name__}: {value!r}")


class ScheduleEntry:
    """One periodic task: what to send, on which schedule, and when it last went."""

    def __init__(self, name, task, schedule, args=(), kwargs=None, options=None,
                 last_run_at=None, total_run_count=0):
        self.name, self.task, self.schedule = name, task, maybe_schedule(schedule)
        self.args, self.kwargs, self.options = list(args or ()), dict(kwargs or {}), dict(options or {})
        self.last_run_at, self.total_run_count = last_run_at, total_run_count

    def __repr__(self):
        return f"<ScheduleEntry: {self.name} {self.task}(*{self.args}, **{self.kwargs}) {self.schedule}>"


def _check_beat_config(app):
    """At start-up (beat's, or the worker's with -B): what beat would die of later."""
    for spec in dict(app.conf.beat_schedule, **app.periodic_tasks).values():
        if "schedule" in spec:
            maybe_schedule(spec["schedule"])
    if app.conf.beat_scheduler not in ("celery.beat:PersistentScheduler", "celery.beat.PersistentScheduler"):
        raise ImproperlyConfigured(
            f"beat_scheduler {app.conf.beat_scheduler!r} is not offered: minicelery's beat is Celery's default "
            "scheduler, with its schedule in beat_schedule (or add_periodic_task) and its state in a file")


class Beat:
    """Sends periodic tasks when due; one tick() at a time, with the clock passed in.

    State (each entry's last run) is kept as JSON in `schedule_filename`, so a
    restarted beat resumes: entries not yet due wait, overdue ones run once.
    Only the beat holding the broker's lease sends anything: a second beat
    started by mistake stands by, and takes over if the first stops renewing.
    Celery: beat-lease: Celery's beat has no such lock; two beats send everything twice.
    """

    #: seconds a lease lasts unless renewed; the leader renews it every LEASE_TTL / 3, and
    #: a standby asks every LEASE_TTL / 6: it takes over at most 7 s after the leader died
    LEASE_TTL = 6.0

    def __init__(self, app, schedule_filename=None, max_interval=None, lease_ttl=None):
        _check_beat_config(app)
        self.app = app
        self.lease_ttl = lease_ttl or self.LEASE_TTL
        self.filename = schedule_filename or app.conf.beat_schedule_filename
        self.max_interval = max_interval or app.conf.beat_max_loop_interval
        self.token, self.leading, self.stopping = uuid(), None, False  # None: not asked yet
        self.entries = {}

    def setup(self, now=None):
        """Load the entries from beat_schedule and add_periodic_task, with saved state."""
        self.app.finalize()
        now = now or utcnow()
        saved = self._load_state()
        for name, spec in dict(self.app.conf.beat_schedule, **self.app.periodic_tasks).items():
            if "task" not in spec or "schedule" not in spec:
                raise ImproperlyConfigured(f"beat_schedule entry {name!r} needs 'task' and 'schedule'")
            last_run_at, count = saved.get(name, (now, 0))
            entry = ScheduleEntry(name, spec["task"], spec["schedule"], spec.get("args"), spec.get("kwargs"),
                                  spec.get("options"), min(last_run_at, now), count)
            if isinstance(entry.schedule, crontab) and entry.schedule.tz is None:
                import copy
                entry.schedule = copy.copy(entry.schedule)  # the declared one may be shared
                entry.schedule.tz = self.app.timezone
            self.entries[name] = entry

    def tick(self, now=None) -> float:
        """Send what is due (when leading); returns how long to sleep before the next tick."""
        if not self._hold_lease():
            return min(self.lease_ttl / 6, self.max_interval)
        now = now or utcnow()
        sleep = self.max_interval
        for entry in self.entries.values():
            if entry.schedule.is_due(entry.last_run_at, now).is_due:
                self.send(entry, now)
            sleep = min(sleep, entry.schedule.remaining_estimate(entry.last_run_at, now).total_seconds())
        return max(min(sleep, self.lease_ttl / 3), 0.0)

    def send(self, entry, now):
        beat_logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        # Count the run from when it was due, so lateness doesn't add up run after run;
        # from now if that would make it due again at once (runs missed are not made up).
        due_at = now + entry.schedule.remaining_estimate(entry.last_run_at, now)
        entry.last_run_at = now if entry.schedule.is_due(due_at, now).is_due else due_at
        entry.total_run_count += 1
        self._save_state()  # before sending: a crash in between skips a run rather than doubling it
        try:
            self.app.send_task(entry.task, entry.args, entry.kwargs, **entry.options)
        except Exception:  # a bad entry must not stop the others
            beat_logger.exception("Message Error: couldn't send %s", entry.name)

    def _hold_lease(self) -> bool:
        leading = self.app.broker.lease("beat", self.token, self.lease_ttl)
        if leading != self.leading:
            beat_logger.info("beat: %s", "leading: this beat sends the periodic tasks" if leading else
                             "another beat leads; standing by to take over")
            if leading and self.leading is not None:
                self._catch_up_with_state()
            self.leading = leading
        return leading

    def _catch_up_with_state(self):
        """Taking over: runs the old leader recorded (same state file) are not run again."""
        now = utcnow()
        for name, (last, _) in self._load_state().items():
            if name in self.entries and self.entries[name].last_run_at < last <= now:
                self.entries[name].last_run_at = last

    def _load_state(self) -> dict:
        """{entry name: (last_run_at, total_run_count)} from the state file; anything
        unreadable is logged and left out (that entry starts afresh)."""
        try:
            with open(self.filename, encoding="utf-8") as f:
                entries = json.load(f)["entries"]
            if not isinstance(entries, dict):
                raise TypeError("'entries' is not an object")
        except FileNotFoundError:
            return {}
        except Exception as exc:  # whatever is in it (too deep, not JSON, not ours)
            beat_logger.warning("beat: ignoring unreadable state file %s: %r", self.filename, exc)
            return {}
        state = {}
        for name, saved in entries.items():
            try:
                last, count = to_datetime(saved["last_run_at"]), saved.get("total_run_count", 0)
                if not isinstance(last, dt.datetime) or not isinstance(count, int):
                    raise TypeError("wrong types")
                state[name] = (last, count)
            except Exception as exc:  # a date out of range, a wrong type, ...
                beat_logger.warning("beat: ignoring the saved state of %r: %r", name, exc)
        return state

    def _save_state(self):
        state = {name: {"last_run_at": e.last_run_at.isoformat(), "total_run_count": e.total_run_count}
                 for name, e in self.entries.items()}
        import tempfile
        # A fresh file of our own (O_EXCL: never one planted, never through a link), then an
        # atomic rename: a crash leaves the old state or the new.
        fd, temporary = tempfile.mkstemp(prefix=os.path.basename(self.filename) + ".",
                                         dir=os.path.dirname(os.path.abspath(self.filename)))
        try:
            with open(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "entries": state}, f)
            os.replace(temporary, self.filename)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def run(self):
        """Tick until stop() (SIGTERM/SIGINT in the main thread)."""
        self.setup()
        beat_init.send(sender=self)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.stop())
        print(self.banner(), file=sys.stderr, flush=True)
        failures = 0
        while not self.stopping:
            try:
                wait = self.tick()
                if failures:
                    beat_logger.warning("beat: the broker is back")
                failures = 0
            except self.app.broker.connection_errors as exc:  # wait for it: beat goes on once it is back
                failures += 1
                wait = min(2 ** failures * 0.1, 10.0)
                if failures == 1:  # (one line for an outage, however long, and one when it ends)
                    beat_logger.error("beat: the broker did not answer (%s: %s); trying again until it does",
                                      type(exc).__name__, exc)
            deadline = time.monotonic() + wait
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        if self.leading:
            self.app.broker.lease("beat", self.token, 0)  # a restarted or standby beat goes on at once
        beat_logger.info("beat: stopped")

    def stop(self):
        self.stopping = True

    def banner(self):
        return "\n".join([
            f"minicelery beat v{__version__} is starting.",
            f"LocalTime -> {dt.datetime.now():%Y-%m-%d %H:%M:%S}",
            "Configuration ->",
            f"    . broker -> {_safe_url(self.app.broker_url)}",
            f"    . scheduler -> minicelery.Beat (lease {self.lease_ttl:g}s in the broker)",
            f"    . db -> {self.filename}",
            f"    . maxinterval -> {self.max_interval:g}s",
            f"    . entries -> {', '.join(self.entries) or '(none)'}"])


# =============================================================================
# 12. Command line
# =============================================================================
# python -m minicelery worker APP [options]      (or Celery's order: -A APP worker)
# python -m minicelery -A APP call NAME --args '[2, 2]'
# python -m minicelery -A APP purge [-Q queue,...]
# python -m minicelery beat APP [-s FILE] [--max-interval S]   (or: worker APP -B)
# python -m minicelery -A APP doctor             (what would lose tasks: exit 1 if anything)

def find_app(spec: str) -> Celery:
    """The app `-A spec` names, found in Celery's order: 'module:attr' as named; for a
    module, its `app` or `celery` attribute, then for a package its `celery` submodule
    (Celery's project layout: proj/celery.py), then any app the module holds."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as Celery does, so `-A tasks` finds ./tasks.py
    try:
        found = import_string(spec)
        if isinstance(found, type(sys)) and ":" not in spec:
            found = _app_in_module(found)
    except (ImportError, AttributeError, SyntaxError, ValueError) as exc:  # (ValueError: an empty name)
        raise ImproperlyConfigured(f"can't import the app {spec!r}: {exc}") from exc
    if not isinstance(found, Celery):
        raise ImproperlyConfigured(f"{spec!r} is {_short_repr(found, 80)}, not a Celery app; name it 'module:app'")
    return found


def _app_in_module(module):
    for attr in ("app", "celery"):
        if isinstance(getattr(module, attr, None), Celery):
            return getattr(module, attr)
    if hasattr(module, "__path__") and importlib.util.find_spec(f"{module.__name__}.celery"):
        return _app_in_module(importlib.import_module(f"{module.__name__}.celery"))
    apps = [value for value in vars(module).values() if isinstance(value, Celery)]
    if not apps and any(type(value).__module__.startswith("celery.") for value in vars(module).values()):
        raise AttributeError(f"{module.__name__!r} holds the real Celery's app: import Celery from minicelery")
    if not apps:
        raise AttributeError(f"{module.__name__!r} has no Celery app; name it like 'module:app'")
    return apps[0]


# -- doctor: what would lose or repeat tasks without an error ------------------
# A queue can be configured to lose tasks without one error line: Redis evicting
# keys, or restarting empty; a clock far off; a SQLite file two machines share.
# `doctor` checks each and says what it found, why it matters and the fix; the
# worker logs at start, as warnings, what would lose tasks (it starts anyway).

@dataclasses.dataclass
class Finding:
    level: str  # "ok", "warn", "unknown" (could not check) or "LOSES" (loses or repeats tasks without an error)
    found: str
    why: str = ""
    fix: str = ""
    check: str = ""  # what was checked: the check's docstring, and where


def doctor(app) -> list:
    """Every check that applies to the app's broker, backend and tasks, as Findings. A check
    that can't be made (a command refused, a setting of the wrong type) is "unknown"."""
    checks = [(check, (client,), f" ({roles})") for client, roles in _redis_servers(app)
              for check in (_check_eviction, _check_persistence, _check_redis_commands, _check_clock)
              if check is not _check_persistence or "broker" in roles]
    checks += [(check, (), "") for check in (_check_default_broker, _check_sqlite_files,
                                            _check_acks_late_limits, _check_result_expiry)]
    findings, silent = [], set()  # (a server that stopped answering is not asked again: each wait is 5 s)
    for check, arguments, where in checks:
        try:
            if arguments and id(arguments[0]) in silent:
                raise TimeoutError("it did not answer the checks before")
            found = check(app, *arguments)
        except Exception as exc:
            if isinstance(exc, (TimeoutError, *_redis_transient_errors())) and arguments:
                silent.add(id(arguments[0]))
            found = [Finding("unknown", f"could not check: {type(exc).__name__}: {_short_repr(str(exc), 200)}",
                             "a command refused (rename-command, an ACL), or a setting of the wrong type",
                             "check it by hand")]
        findings += [dataclasses.replace(finding, check=check.__doc__ + where) for finding in found]
    return findings


def _redis_servers(app) -> list:
    """(client, "broker" | "result backend" | "broker and result backend") for each Redis server
    (one reached by two URLs counts once, when INFO says so)."""
    servers = {}
    for role, url, kinds in (("broker", app.broker_url, BROKERS), ("result backend", app.backend_url, BACKENDS)):
        if url and _pick_by_scheme(kinds, url, role) in (RedisBroker, RedisBackend):
            client = (app.broker if role == "broker" else app.backend).client
            try:
                server = client.info("server")["run_id"]
            except Exception as exc:  # INFO refused, or answered by something else than Redis
                if isinstance(exc, _redis_transient_errors()):
                    raise  # (unreachable: one line, exit 69)
                server = role  # (each is its own; its checks say what they can't find)
            servers.setdefault(server, (client, []))[1].append(role)
    return [(client, " and ".join(roles)) for client, roles in servers.values()]


def _check_eviction(app, client):
    """Redis maxmemory-policy"""
    memory = client.info("memory")
    policy, limit = memory["maxmemory_policy"], memory["maxmemory"]
    if policy == "noeviction":
        return [Finding("ok", "noeviction: a full Redis refuses writes (delay() raises), it drops nothing")]
    return [Finding("LOSES" if limit else "warn",
                    f"{policy}, maxmemory {limit / 2**20:g} MiB" if limit else f"{policy}, no maxmemory",
                    "at maxmemory Redis deletes keys to make room: queued messages, claims, revocations and results "
                    "vanish without an error" + ("" if limit else " (once a maxmemory is set)"),
                    "CONFIG SET maxmemory-policy noeviction, and the same in redis.conf")]


def _check_persistence(app, client):
    """Redis persistence"""
    if client.config_get("appendonly").get("appendonly") == "yes":
        return [Finding("ok", "appendonly yes: a restart keeps the queues")]
    if client.config_get("save").get("save"):
        return [Finding("warn", "RDB snapshots only", "a crash loses what was queued or acked since the last "
                        "snapshot: tasks lost, or run again", "CONFIG SET appendonly yes (and in redis.conf)")]
    return [Finding("LOSES", "no AOF, no RDB snapshots", "a restart of Redis empties every queue",
                    "CONFIG SET appendonly yes (and in redis.conf)")]


#: the commands minicelery sends itself; its Lua scripts call others (a rename hides them there too)
_REDIS_COMMANDS = ("eval", "evalsha", "publish", "subscribe", "psubscribe", "lpush", "brpop", "llen", "lrange",
                   "lrem", "ltrim", "hget", "hdel", "zadd", "zrem", "zrangebyscore", "zremrangebyscore",
                   "zremrangebyrank", "sadd", "srem", "smembers", "expire", "get", "set", "del", "time", "info", "incrby")


def _check_redis_commands(app, client):
    """Redis version and commands"""
    version = client.info("server")["redis_version"]
    # The commands of _REDIS_COMMANDS and those the Lua scripts call, read from the scripts;
    # then the two ways to take a message, of which either will do.
    scripts = [source for name, source in globals().items() if name.endswith("_LUA")]
    called = {name.lower() for source in scripts for name in re.findall(r"redis\.p?call\('(\w+)'", source)}
    needed = sorted(called.union(_REDIS_COMMANDS)) + ["blmove", "brpoplpush"]
    raw = HeldConnection(client)  # (redis-py can't parse COMMAND INFO's answer for a command not there)
    try:
        [known] = raw.run(("COMMAND", "INFO", *needed))
    finally:
        raw.close()
    there = {name for name, info in zip(needed, known) if info}
    missing = [name for name in needed[:-2] if name not in there]
    missing += [] if there & {"blmove", "brpoplpush"} else ["blmove (or brpoplpush)"]
    if tuple(int(part) for part in version.split(".")[:2]) < (5, 0) or missing:
        return [Finding("LOSES", f"Redis {version}" + (f", without {', '.join(missing)}" if missing else ""),
                        "minicelery needs Redis 5.0 or later and these commands (renamed or disabled ones fail "
                        "every task that needs them)", "upgrade Redis, or drop the rename-command lines")]
    return [Finding("ok", f"Redis {version}, every command minicelery sends")]


def _check_clock(app, client):
    """clock against the Redis server's"""
    before = time.time()
    seconds, micros = client.time()
    skew = seconds + micros / 1e6 - (before + time.time()) / 2
    limit = app.broker.visibility_timeout / 2
    if abs(skew) <= 1:
        return [Finding("ok", f"{round(skew, 3) + 0.0:+.3f} s")]
    return [Finding("LOSES" if abs(skew) >= limit else "warn", f"this host is {-skew:+.1f} s off",
                    "ETAs, expiries and claims are times of the host that sets them: a skew runs ETAs early or "
                    "late, expires tasks early" + (", and hands out messages other workers still run"
                                                   if abs(skew) >= limit else ""), "run NTP (chrony, systemd-timesyncd)")]


def _check_default_broker(app):
    """broker"""
    if app.broker_url != Config.DEFAULT_URL:
        return []
    return [Finding("warn", f"none configured: the zero-setup default, {os.path.abspath('minicelery.db')}",
                    "a worker or client started in another directory uses another file, and its tasks wait "
                    "there for ever", "set broker_url (or $MINICELERY_BROKER_URL)")]


#: filesystems whose locks SQLite can't trust (https://www.sqlite.org/faq.html#q5)
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
                       "fuse.sshfs", "fuse.s3fs", "fuse.glusterfs")
MOUNTS = "/proc/self/mounts"


def _check_sqlite_files(app):
    """SQLite file"""
    paths = {sqlite_path(url) for url in (app.broker_url, app.backend_url or "") if url.startswith("sqlite://")}
    return [_check_sqlite_file(os.path.realpath(path)) for path in sorted(paths)]  # (named by URL: none opened)


def _check_sqlite_file(path):
    if not os.path.isdir(os.path.dirname(path)):
        return Finding("warn", f"{path}: no such directory", "nothing can open the file: every send and every "
                       "worker fails", "make the directory, or fix the URL (sqlite:///relative, sqlite:////absolute)")
    fstype = _filesystem_of(path)
    if fstype in NETWORK_FILESYSTEMS:
        return Finding("LOSES", f"{path} is on {fstype}", "SQLite's locks don't hold on a network filesystem: two "
                       "workers can take one message, or corrupt the file",
                       "keep the file on a local disk, or use Redis to share a queue between machines")
    if fstype in ("tmpfs", "ramfs"):
        return Finding("warn", f"{path} is on {fstype}", "a reboot empties it, and the queue with it",
                       "keep the file on a disk")
    return Finding("ok", f"{path} ({fstype or 'filesystem unknown'})")


def _filesystem_of(path) -> str:
    """The type of the filesystem holding `path`: that of its longest mount point."""
    best, fstype = "", ""
    with contextlib.suppress(OSError), open(MOUNTS) as mounts:
        for line in mounts:
            point, kind = line.split()[1:3]
            point = point.replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, fstype = point, kind
    return fstype


def _check_acks_late_limits(app):
    """acks_late tasks against the visibility timeout"""
    timeout = (app.conf.broker_transport_options or {}).get("visibility_timeout", 3600)
    late = [task for task in app.tasks.values() if task.option("acks_late")]
    unbounded = [task.name for task in late if not task.option("time_limit") or task.option("time_limit") >= timeout]
    if not unbounded:
        return [Finding("ok", f"{len(late)} acks_late task(s), each with a hard limit under {timeout:g} s")]
    return [Finding("warn", f"{', '.join(sorted(unbounded)[:5])}{' ...' if len(unbounded) > 5 else ''}: "
                    f"no hard time limit under the visibility timeout ({timeout:g} s)",
                    "minicelery's workers renew the claims of what they run, but a Celery worker on the same "
                    "queues doesn't: it would hand such a task out again while it runs",
                    "set time_limit below visibility_timeout (broker_transport_options), or raise the timeout")]


def _check_result_expiry(app):
    """result_expires"""
    if not app.backend_url:
        return []
    expires = app.conf.result_expires_seconds
    if not expires:
        return [Finding("warn", "results are kept for ever", "the backend grows with every task; a full Redis "
                        "(noeviction) then refuses new tasks", "set result_expires (Celery's: 1 day)")]
    return [Finding("ok", f"results kept {expires:g} s")]


def _cli_doctor(app, args):
    findings = doctor(app)
    print(f"minicelery doctor: broker {_safe_url(app.broker_url)}, results {_safe_url(app.backend_url or 'disabled')}\n")
    for finding in findings:
        print(f"[{finding.level}] {finding.check}: {finding.found}")
        for label, text in (("why", finding.why), ("fix", finding.fix)):
            if text and finding.level != "ok":
                print(f"    {label}: {text}")
    losing, warnings = sum(f.level == "LOSES" for f in findings), sum(f.level in ("warn", "unknown") for f in findings)
    print(f"\n{losing} finding(s) that lose or repeat tasks, {warnings} warning(s).")
    return 1 if losing else 0


def _parser():
    import argparse
    # -A also after the command (-A APP worker, or worker -A APP): given there, it wins.
    app_option = argparse.ArgumentParser(add_help=False)
    app_option.add_argument("-A", "--app", default=argparse.SUPPRESS, help="the app: module or module:attr")
    app_option.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                            help="print nothing; the exit code tells")
    service = argparse.ArgumentParser(add_help=False, parents=[app_option])  # worker and beat
    service.add_argument("app_positional", nargs="?", metavar="APP")
    service.add_argument("-l", "--loglevel", default="INFO", type=_cli_log_level)
    parser = argparse.ArgumentParser(prog="minicelery", description="Celery's core, in one file.", parents=[app_option])
    commands = parser.commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run a worker", parents=[service])
    worker.add_argument("-c", "--concurrency", type=_cli_count)
    worker.add_argument("-Q", "--queues", help="comma-separated queues to consume")
    worker.add_argument("-P", "--pool", choices=sorted(POOLS), help="default: worker_pool, prefork")
    worker.add_argument("-n", "--hostname", help="node name, like name@%%h")
    worker.add_argument("--max-tasks-per-child", type=int)
    worker.add_argument("--prefetch-multiplier", type=int)
    worker.add_argument("-B", "--beat", action="store_true", help="also run beat, in a process of its own")
    worker.add_argument("-E", "--task-events", action="store_true", help="send task events (Flower, `events`)")
    worker.add_argument("--explain", action="store_true",
                        help="log each broker and backend operation: its Redis commands or SQL, and why")
    worker.add_argument("--pidfile", help="write the worker's pid here; refuse to start if it runs already")
    worker.add_argument("--logfile", help="log here instead of to stderr")
    for flag in ("--without-gossip", "--without-mingle", "--without-heartbeat"):  # Celery's; nothing to turn off
        worker.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("-O", choices=["fair", "default"], help="accepted: a worker here is always fair")
    beat = commands.add_parser("beat", help="send periodic tasks", parents=[service])
    beat.add_argument("-s", "--schedule", help="state file (JSON)")
    beat.add_argument("--max-interval", type=float)
    call = commands.add_parser("call", help="send a task by name", parents=[app_option])
    call.add_argument("name")
    call.add_argument("-a", "--args", default=[], type=_cli_json(list), help="JSON list")
    call.add_argument("-k", "--kwargs", default={}, type=_cli_json(dict), help="JSON object")
    call.add_argument("--countdown", type=_cli_seconds)
    call.add_argument("--queue")
    purge = commands.add_parser("purge", help="delete all waiting messages", parents=[app_option])
    purge.add_argument("-Q", "--queues", help="comma-separated (default: the app's queues)")
    purge.add_argument("-f", "--force", action="store_true", help="don't ask first")
    asking = argparse.ArgumentParser(add_help=False, parents=[app_option])  # commands that ask the workers
    asking.add_argument("-t", "--timeout", type=_cli_seconds, default=1.0, help="seconds to wait for answers")
    asking.add_argument("-d", "--destination", help="comma-separated node names (default: all)")
    asking.add_argument("-j", "--json", action="store_true", help="print the answers as JSON")
    commands.add_parser("status", help="list the workers that answer", parents=[asking])
    inspect = commands.add_parser("inspect", help="ask the workers", parents=[asking])
    inspect.add_argument("what", help=f"one of {', '.join(_INSPECT_COMMANDS)}, or the project's own")
    inspect.add_argument("arguments", nargs="*", metavar="ids",
                         help="task ids, for query_task (or a command's own arguments)")
    control = commands.add_parser("control", help="steer the workers", parents=[asking])
    control.add_argument("what", help=f"one of {', '.join(sorted(CONTROL_ARGUMENTS))}, or the project's own")
    control.add_argument("arguments", nargs="*", help="; ".join(f"{k} {' '.join(v)}" for k, v in
                                                                 CONTROL_ARGUMENTS.items() if v))
    dead = commands.add_parser("dead", help="list the dead letters, send them again after a fix, or drop them",
                               parents=[app_option])
    dead.add_argument("action", nargs="?", default="list", choices=["list", "requeue", "drop"])
    dead.add_argument("ids", nargs="*", help="dead letter ids, as `dead list` shows them")
    dead.add_argument("--all", action="store_true", help="every dead letter")
    events = commands.add_parser("events", help="watch the workers live (or --dump the raw events)",
                                 parents=[app_option])
    events.add_argument("--dump", action="store_true", help="print each event as JSON, as it comes")
    events.add_argument("-n", "--count", type=int, help="leave after this many events (with --dump)")
    events.add_argument("-Q", "--queues", help="comma-separated queues whose depth to show")
    multi = commands.add_parser("multi", help="start, stop or restart several workers in the background",
                                parents=[app_option], epilog="Other options go to each worker (-l INFO, -c 2).")
    multi.add_argument("action", choices=["start", "stop", "stopwait", "restart", "kill"])
    multi.add_argument("names", nargs="+", help="node names (w1 w2, or a count: 3)")
    multi.add_argument("--pidfile", default="%n.pid", help="%%n: node name, %%h: host name (default %%n.pid)")
    multi.add_argument("--logfile", default="%n%I.log", help="%%n, %%h, %%I as Celery's (default %%n%%I.log)")
    commands.add_parser("doctor", help="check for what would lose or repeat tasks without an error",
                        parents=[app_option])
    commands.add_parser("celery", parents=[app_option], add_help=False,  # (what follows goes to it as it is)
                        help="run the real Celery's command line on this project's broker "
                             "(`celery status`, `celery inspect active`, ...)")
    commands.add_parser("flower", parents=[app_option], add_help=False,
                        help="run Flower, installed apart, on this project's broker (Redis)")
    commands.add_parser("help", help="this list, or a command's options: help worker",
                        parents=[app_option]).add_argument("topic", nargs="?", help="a command")
    result = commands.add_parser("result", help="show a task's result", parents=[app_option])
    result.add_argument("id")
    result.add_argument("--traceback", action="store_true", help="its traceback instead")
    result.add_argument("-t", "--timeout", type=_cli_seconds, help="wait this long for it to finish")
    return parser


#: `control` commands and the names of their arguments, in order
CONTROL_ARGUMENTS = {"rate_limit": ("task_name", "rate_limit"), "time_limit": ("task_name", "soft", "hard"),
                     "add_consumer": ("queue",), "cancel_consumer": ("queue",), "revoke": ("task_id",),
                     "enable_events": (), "disable_events": (), "shutdown": ()}
_INSPECT_COMMANDS = sorted(n for n in vars(Inspect) if not n.startswith("_"))
#: Celery's exit code when no worker answered in time
EX_UNAVAILABLE = 69


def _print_answers(answers, as_json, show=lambda answer: json.dumps(answer, indent=2, default=str)):
    if not answers:
        print("Error: No nodes replied within time constraint", file=sys.stderr)
        return EX_UNAVAILABLE
    merged = {node: answer for each in answers for node, answer in each.items()}
    if as_json:
        print(json.dumps(merged, default=str))
    for node, answer in merged.items() if not as_json else ():
        failed = isinstance(answer, dict) and "error" in answer
        print(f"-> {node}: {'ERROR' if failed else 'OK'}\n" + textwrap.indent(show(answer), "    "))
    return 0


def _cli_ask_workers(app, args):
    destination = args.destination.split(",") if args.destination else None
    if args.command == "status":
        answers = app.control.ping(destination, args.timeout)
        code = _print_answers(answers, args.json, show=lambda answer: "pong")
        if answers and not args.json:
            print(f"\n{len(answers)} node{'s' if len(answers) != 1 else ''} online.")
        return code
    custom = CUSTOM_COMMANDS.get(args.what)
    if custom and custom[1] == args.command:  # (a project's own: its args say how to read the words)
        if len(args.arguments) > len(custom[2]):
            raise ImproperlyConfigured(f"{args.what} takes: {' '.join(name for name, _ in custom[2]) or 'nothing'}")
        try:
            arguments = {name: kind(word) for (name, kind), word in zip(custom[2], args.arguments)}
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"{args.what}: {exc}") from None
    elif args.command == "inspect" and args.what in _INSPECT_COMMANDS:
        arguments = {"ids": args.arguments} if args.what == "query_task" else {}
    elif args.command == "inspect" or args.what not in CONTROL_ARGUMENTS:
        known = _INSPECT_COMMANDS if args.command == "inspect" else sorted(CONTROL_ARGUMENTS)
        mine = sorted(n for n, (_, kind, _) in CUSTOM_COMMANDS.items() if kind == args.command)
        raise ImproperlyConfigured(f"{args.command}: no command {args.what!r}; use one of {', '.join(known + mine)}")
    else:
        names = CONTROL_ARGUMENTS[args.what]
        values = [args.arguments] if args.what == "revoke" else [_cli_number(v) for v in args.arguments]
        if len(values) > len(names) or (names and not values):
            raise ImproperlyConfigured(f"control {args.what} takes: {' '.join(names)}")
        arguments = dict(zip(names, values))
    reply = args.what != "shutdown"  # (a worker leaves without answering that one)
    if args.what == "revoke" and not destination:  # stored for workers started later; a long list in parts
        answers = app.control.revoke(args.arguments, reply=True, timeout=args.timeout)
    else:
        answers = app.control.broadcast(args.what, arguments, destination, reply, args.timeout)
    return _print_answers(answers, args.json) if reply else 0


def _run_celerys_tool(app, args):
    """Celery's own command line (or Flower's) on this project's broker and backend: the
    real Celery can't load a minicelery app, but it works with any app on the same Redis."""
    urls = [_celery_url(url) for url in (app.broker_url, app.backend_url or "")]
    if not urls[0].startswith(("redis", "rediss")):
        raise ImproperlyConfigured(f"Celery's tools and Flower need a Redis broker, not {_safe_url(app.broker_url)}")
    # (Through the environment, which Celery reads: on the command line, `ps` would show a password.)
    urls_for_celery = {"CELERY_BROKER_URL": urls[0], **({"CELERY_RESULT_BACKEND": urls[1]}
                                                         if urls[1].startswith("redis") else {})}
    command = ["flower"] if args.command == "flower" else []
    os.execve(sys.executable, [sys.executable, "-m", "celery", *command, *args.passed_on],
              dict(os.environ, **urls_for_celery))


def _celery_url(url):
    """A URL as Celery writes it: its Redis transport reads a socket as redis+socket://path?virtual_host=N."""
    if url.startswith("unix://"):
        return "redis+socket://" + url[len("unix://"):].replace("db=", "virtual_host=")
    return url


def _cli_result(app, args):
    """A task's result (or traceback); a failure or revocation says its state, exit 1."""
    result = app.AsyncResult(args.id)
    value = result.traceback if args.traceback else \
        result.get(timeout=args.timeout, propagate=False) if args.timeout else result.result
    state = result.state
    if state in (FAILURE, REVOKED) and not args.traceback:
        print(f"{state}: {_short_repr(value)}")
    else:
        print(value if value is not None else f"(none: state {state})")
    return 1 if state in (FAILURE, REVOKED) else 0


def _cli_dead(app, args):
    letters = app.broker.dead_letters()
    if args.action == "list":
        for letter in letters:
            print(f"{letter['id']}  {dt.datetime.fromtimestamp(letter['time']):%Y-%m-%d %H:%M:%S}  "
                  f"{letter['queue'] or '-'}  {_dead_task(letter) or '(not a task message)'}\n    {letter['reason']}")
        print(f"{len(letters)} dead letter(s).")
        return 0
    wanted = {letter["id"] for letter in letters} if args.all else set(args.ids)
    if args.all and not wanted:
        print("No dead letters.")
        return 0
    if not wanted:
        raise ImproperlyConfigured(f"dead {args.action}: name the ids (as `dead list` shows them), or --all")
    asked = set(wanted)
    if args.action == "requeue":  # a letter cut to size, or not a message, can't go again
        whole = {letter["id"] for letter in letters if _dead_task(letter) and "cut to" not in letter["reason"]}
        for left_out in sorted(wanted - whole):
            print(f"{left_out}: not a whole task message; left where it is", file=sys.stderr)
        wanted &= whole
    done = 0
    for letter in (letter for letter in letters if letter["id"] in wanted):
        # Sent first, then taken out: should this stop half-way, a letter may go twice, never nowhere.
        if args.action == "requeue":
            envelope = json.loads(letter["raw"])
            envelope["properties"]["delivery_tag"] = tag = uuid()  # a new message: its old tag is spent
            try:
                app.broker.publish(letter["queue"] or app.conf.task_default_queue, json.dumps(envelope),
                                   clamp_priority(envelope["properties"].get("priority")), tag)
            except ValueError as exc:
                print(f"{letter['id']}: {exc}; left where it is", file=sys.stderr)
                continue
        done += len(app.broker.take_dead_letters({letter["id"]}))
    print(f"{'Requeued' if args.action == 'requeue' else 'Dropped'} {done} dead letter(s).")
    return 0 if done and done == len(asked) else 1


def _cli_events(app, args):
    """`events --dump`: the raw events; `events`: a view of the workers, redrawn every second."""
    seen, workers, finished, failures = 0, {}, deque(maxlen=1000), deque(maxlen=5)
    names = collections.OrderedDict()  # task id -> name, from task-received/-sent (task-failed has none)
    queues = _cli_queues(app, args)
    away = None  # the broker's error while it is away: said once, and once more when it is back
    while not args.count or seen < args.count:
        try:
            events = app.broker.events(1.0)[:args.count - seen if args.count else None]
            for event in events:
                if args.dump:
                    print(json.dumps(event, default=str), flush=True)
                elif event["type"].startswith("worker-"):
                    workers[event["hostname"]] = event
                elif event["type"] in ("task-received", "task-sent") and event.get("name"):
                    names[event.get("uuid")] = event["name"]
                    while len(names) > 10000:
                        names.popitem(last=False)
                elif event["type"] in ("task-succeeded", "task-failed"):
                    finished.append(event["timestamp"])
                    if event["type"] == "task-failed":
                        name = names.get(event.get("uuid"), "?")
                        failures.append(printable(f"{name}[{event.get('uuid')}]: {event.get('exception')}"))
            seen += len(events)
            if not args.dump:
                _draw_events_view(app, queues, workers, finished, failures)
        except app.broker.connection_errors as exc:
            if away is None:
                print(f"events: the broker is away ({type(exc).__name__}: {exc}); waiting for it", file=sys.stderr)
            away = exc
            time.sleep(1.0)
            continue
        if away is not None:
            print("events: the broker is back", file=sys.stderr, flush=True)
            away = None
    return 0


def _draw_events_view(app, queues, workers, finished, failures):
    now = time.time()
    lines = [f"minicelery events  {dt.datetime.now():%H:%M:%S}  (Ctrl-C to leave; task events need -E)", "",
             "workers:"]
    for node, event in sorted(workers.items()):
        freq = event["freq"] if _is_number(event.get("freq")) else 2.0
        alive = event["type"] != "worker-offline" and now - event["timestamp"] < 3 * freq
        lines.append(f"  {node:<30} {'online' if alive else 'OFFLINE':<8} active {event.get('active', 0)!s:<4}"
                     f" processed {event.get('processed', 0)!s}")
    lines += ["", "queues:"] + [f"  {queue:<30} {app.broker.size(queue)} waiting, {_parked_count(app, queue)} parked "
                                f"for a later ETA" for queue in queues]
    lines += ["", f"tasks/s (last 10 s): {sum(1 for t in finished if now - t < 10) / 10:.1f}", "",
              "recent failures:"] + [f"  {failure}" for failure in failures]
    if sys.stdout.isatty():
        print("\033[H\033[J" + "\n".join(lines), flush=True)  # home, clear: redrawn in place
    else:  # (into a pipe or a file: one view after the other, no terminal codes)
        print("\n".join(lines) + "\n", flush=True)


def _parked_count(app, queue) -> str:
    parked = len(app.broker.parked([queue], 101))
    return "100+" if parked > 100 else str(parked)


def _dead_task(letter):
    """`name[id]` of the task message a dead letter holds, or None."""
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
        envelope = json.loads(letter["raw"])
        if isinstance(envelope["properties"], dict):
            return f"{envelope['headers']['task']}[{envelope['headers']['id']}]"
    return None


def _ask_user(question):
    """The user's answer, lower case; no answer (no terminal, end of input) is "no"."""
    try:
        return input(question).strip().lower()
    except EOFError:
        return ""


@contextlib.contextmanager
def _pidfile(path):
    """The worker's pid in `path` while it runs (`multi` finds it there); one running already refuses.

    The file is locked (flock) for as long as the worker runs: of two started at once
    with the same pidfile, one gets it and the other refuses, where a look then a write
    let both in. A lock dies with its process, so a file left by a crash doesn't count.
    """
    import fcntl
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # (a directory, a missing one, no permission)
            raise ImproperlyConfigured(f"can't write the pidfile {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ImproperlyConfigured(f"pidfile {path} is held by a running worker: is it running already?") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)  # removed (as stale) between our open and our lock: open it again
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _pid_in(pidfile):
    with contextlib.suppress(OSError, ValueError):
        with open(pidfile) as f:
            return int(f.read().strip())
    return None


def _worker_pid(pidfile, node):
    """The pid in `pidfile` if it is that node's worker, running; a stale file (a dead pid,
    or one the system gave to another program since) is removed, and never signalled. A
    file a worker holds (see _pidfile) is not stale, even while it writes its pid there."""
    pid = _pid_in(pidfile)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:  # (what multi started: ... minicelery ... -n <node>)
            command = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        ours = pid > 0 and "minicelery" in command and f" {node} " in f"{command} "
    except (OSError, ValueError, OverflowError, TypeError):
        ours = False
    if not ours and not _held(pidfile):
        with contextlib.suppress(OSError):
            os.unlink(pidfile)
    return pid if ours else None


def _held(pidfile) -> bool:
    """Whether a running worker holds `pidfile` locked."""
    import fcntl
    try:
        with open(pidfile) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (let go as the file closes)
    except BlockingIOError:
        return True
    except OSError:
        pass
    return False


def _alive(pid) -> bool:
    return os.path.exists(f"/proc/{pid}")  # (a zombie too, as kill(pid, 0) says)


def multi(action, names, app_spec, pidfile, logfile, worker_options, wait=60.0) -> int:
    """Celery's `multi`: each name a worker in the background (name@host), its pid in
    `pidfile` and its output in `logfile` (%n the name, %h the host, %I nothing: the
    main process). start, stop (SIGTERM), stopwait (and wait), restart, kill (SIGKILL)."""
    if len(names) == 1 and names[0].isdigit():
        names = [f"celery{i}" for i in range(1, int(names[0]) + 1)]  # `multi start 3`, as Celery's
    if not pidfile or not logfile:  # (a worker started without one can't be found again)
        raise ImproperlyConfigured("multi needs a --pidfile and a --logfile pattern (default %n.pid, %n.log)")
    failed = 0
    for name in names:
        if "/" in name or "\0" in name or name.startswith("."):  # names become file names
            raise ImproperlyConfigured(f"multi: {name!r} is not a node name (no '/', no leading '.')")
        node = _expand_hostname(name if "@" in name else f"{name}@%h")
        short = node.split("@")[0]
        files = [pattern.replace("%n", short).replace("%h", os.uname().nodename).replace("%I", "")
                 for pattern in (pidfile, logfile)]
        if action in ("stop", "stopwait", "restart", "kill"):
            failed += not _stop_node(node, files[0], action, wait)
        if action in ("start", "restart"):
            failed += not _start_node(node, files, app_spec, worker_options, wait)
    return 1 if failed else 0


def _start_node(node, files, app_spec, worker_options, wait):
    pidfile, logfile = files
    if _worker_pid(pidfile, node) is not None:
        print(f"> {node}: already running (pidfile {pidfile})")
        return True
    import subprocess
    with open(logfile, "a") as log:  # (a session of its own: the worker outlives this command and its terminal)
        proc = subprocess.Popen([sys.executable, "-m", __name__, "-A", app_spec, "worker", "-n", node,
                                 "--pidfile", pidfile, *worker_options], stdout=log, stderr=log,
                                start_new_session=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + wait
    while not (mine := _pid_in(pidfile) == proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = mine and proc.poll() is None
    if not ok and _worker_pid(pidfile, node) not in (None, proc.pid):  # (started at once by another `multi`)
        print(f"> {node}: already running (pidfile {pidfile})")
        return True
    print(f"> Starting node {node}: {'OK' if ok else f'FAILED (see {logfile})'}")
    return ok


def _stop_node(node, pidfile, action, wait):
    pid = _worker_pid(pidfile, node)
    if pid is None:
        print(f"> {node}: DOWN")
        return True
    signum = signal.SIGKILL if action == "kill" else signal.SIGTERM
    print(f"> Stopping node {node}: {signum.name} -> {pid}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
    if action == "kill":
        with contextlib.suppress(OSError):
            os.unlink(pidfile)  # it can't remove it itself
    deadline = time.monotonic() + wait
    while action in ("stopwait", "restart") and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not (action in ("stopwait", "restart") and _alive(pid))


def _cli_number(text):
    """A command-line argument as a number where it is one ('30', '1.5'), else as it is ('10/s')."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def _cli_worker(app, args):
    if args.task_events:
        app.conf.worker_send_task_events = True
    if args.explain or args.loglevel.upper() == "DEBUG":  # (debug: each broker step, and why)
        app.conf.explain = True
    queues = args.queues.split(",") if args.queues else None
    with _pidfile(args.pidfile) if args.pidfile else contextlib.nullcontext():
        Worker(app, concurrency=args.concurrency, pool=args.pool, queues=queues,
               hostname=args.hostname, loglevel=args.loglevel,
               max_tasks_per_child=args.max_tasks_per_child,
               prefetch_multiplier=args.prefetch_multiplier, beat=args.beat).start()


def _cli_beat(app, args):
    Beat(app, schedule_filename=args.schedule, max_interval=args.max_interval).run()


def _cli_call(app, args):
    result = app.send_task(args.name, args.args, args.kwargs, countdown=args.countdown, queue=args.queue)
    print(result.id)


def _cli_purge(app, args):
    queues = _cli_queues(app, args)
    if not args.force and _ask_user(f"Delete every waiting message in {', '.join(queues)}? [y/N] ") \
            not in ("y", "yes"):
        print("Aborted.", file=sys.stderr)
        return 1
    count = sum(app.broker.purge(q) for q in queues)
    print(f"Purged {count} message(s) from {len(queues)} queue(s).")


def _cli_queues(app, args) -> list:
    """The queues -Q names, else all the app's."""
    if args.queues:
        return args.queues.split(",")
    return queue_names(app.conf.task_queues or [app.conf.task_default_queue])


#: what runs each command that needs the app: function(app, args) -> exit code (None: 0)
CLI_COMMANDS = {"worker": _cli_worker, "beat": _cli_beat, "call": _cli_call, "purge": _cli_purge,
                "status": _cli_ask_workers, "inspect": _cli_ask_workers, "control": _cli_ask_workers,
                "dead": _cli_dead, "events": _cli_events, "doctor": _cli_doctor, "result": _cli_result,
                "celery": _run_celerys_tool, "flower": _run_celerys_tool}


def _cli_json(kind):
    """An argparse type: JSON text holding a `kind` (list or dict)."""
    def parse(text):
        value = json.loads(text)  # (a ValueError is argparse's "invalid value" line)
        if not isinstance(value, kind):
            raise ValueError(f"not a JSON {kind.__name__}")
        return value
    parse.__name__ = f"JSON {kind.__name__}"
    return parse


def _cli_seconds(text) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    seconds = float(text)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(text)
    return seconds


def _cli_count(text) -> int:
    """An argparse type: a whole number, 1 or more."""
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def _cli_log_level(text) -> str:
    """An argparse type: a logging level's name, any case."""
    if not isinstance(logging.getLevelName(text.upper()), int):
        raise ValueError(text)
    return text


# (argparse names a type in its error line: "invalid <name> value")
_cli_seconds.__name__, _cli_count.__name__, _cli_log_level.__name__ = "seconds", "count (1 or more)", "log level"


def main(argv=None):
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("multi", "celery", "flower"):  # (they hand them on)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "help":  # (Celery's `celery help`)
        known = parser.commands.choices
        if args.topic not in (None, *known):
            print(f"minicelery: no command {args.topic!r}", file=sys.stderr)
        print((known[args.topic] if args.topic in known else parser).format_help())
        return 0 if args.topic in (None, *known) else 2
    args.passed_on = extra
    spec = getattr(args, "app_positional", None) or getattr(args, "app", None)
    stopping = args.command == "multi" and args.action in ("stop", "stopwait", "kill")  # (from the pidfiles)
    if not spec and not stopping:
        print("minicelery: name the app with -A module (or module:app)", file=sys.stderr)
        return 2
    if getattr(args, "quiet", False):  # (before the command, or after it)
        sys.stdout = open(os.devnull, "w")
    logfile = getattr(args, "logfile", None)
    app = None
    try:
        if args.command == "multi":
            return multi(args.action, args.names, spec, args.pidfile, args.logfile, extra)
        app = find_app(spec)  # (first: its receivers of setup_logging may configure logging themselves)
        configure_logging(getattr(args, "loglevel", "INFO"), _cli_logfile(logfile), logfile)
        return CLI_COMMANDS[args.command](app, args) or 0
    except ImproperlyConfigured as exc:
        print(f"minicelery: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C leaving `events` (or a question)
        return 130
    except Exception as exc:  # a one-shot command whose broker or backend is away: one line
        if app is None or not isinstance(exc, (OperationalError, *app.broker.connection_errors,
                                               *app.backend.connection_errors)):
            raise
        print(f"Error: the broker or the result backend did not answer ({type(exc).__name__}: {exc})", file=sys.stderr)
        return EX_UNAVAILABLE


def _cli_logfile(path):
    """The --logfile opened for appending, or None; one that can't be opened is a clear error."""
    try:
        return open(path, "a", buffering=1) if path else None
    except OSError as exc:
        raise ImproperlyConfigured(f"can't open the log file {path!r}: {exc.strerror}") from None


# Celery's import paths, so code written for Celery imports unchanged: `from
# minicelery.schedules import crontab` finds this same module (it stays one file).
CELERY_MODULE_PATHS = ("app", "app.task", "beat", "canvas", "exceptions", "result", "schedules", "signals", "states",
                       "utils", "utils.log", "worker", "worker.control")


def __getattr__(name):
    if name in CELERY_MODULE_PATHS:  # `import minicelery.result; minicelery.result.AsyncResult`
        return sys.modules[__name__]
    if name == "TimeoutError":  # celery.exceptions.TimeoutError, without hiding the builtin here
        return ResultTimeout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ != "__main__":
    for _path in CELERY_MODULE_PATHS:
        sys.modules.setdefault(f"{__name__}.{_path}", sys.modules[__name__])

