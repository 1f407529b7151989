"""Tests for minicelery, in the module's chapter order.

Everything runs against a real redis-server that the `redis_server` fixture
starts on a unix socket, and real workers: forked from this process (so they
share the tasks defined below) or started through the command line. Nothing
is mocked. Interop tests run the real `celery` package when it is installed.
"""

import ast
import base64
import collections
import contextlib
import datetime as dt
import errno
import functools
import gc
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import zlib
import zoneinfo
from decimal import Decimal

import pytest
import redis
from freezegun import freeze_time
from zoneinfo import ZoneInfo

import minicelery
from minicelery import (Celery, Config, AsyncResult, EagerResult, ImproperlyConfigured,
                        EncodeError, NotRegistered, ResultTimeout, WorkerLostError,
                        MaxRetriesExceededError, Reject, Ignore, Task, shared_task,
                        signature, chain, group, chord, GroupResult, ChordError,
                        crontab, schedule, Beat, TaskRevokedError)
from minicelery import maybe_schedule

HERE = os.path.dirname(os.path.abspath(__file__))
# This suite runs as root on CI, and some of its workers accept pickle: Celery's escape
# hatch lets them start (test_a_root_worker_that_accepts_pickle_refuses_to_start unsets it).
os.environ.setdefault("C_FORCE_ROOT", "1")

# Real Celery 5.7 traffic, captured into shared/spec/samples/ and kept here so the
# suite runs from any checkout: a_add_delay.json (an LPUSHed message),
# j_priority_list_keys.json, f2_unacked_hash_and_index_snapshot.json (an
# `unacked` entry) and m_minimal_message_acceptance_tests.json (M1).
CELERY_ADD_MESSAGE = '{"body": "W1syLCAyXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "wireapp.add", "id": "24e197f0-40a2-4d90-88fd-e33b4a949ee7", "shadow": null, "eta": null, "expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null], "root_id": "24e197f0-40a2-4d90-88fd-e33b4a949ee7", "parent_id": null, "argsrepr": "(2, 2)", "kwargsrepr": "{}", "origin": "gen5669@vm", "ignore_result": false, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": "24e197f0-40a2-4d90-88fd-e33b4a949ee7", "reply_to": "f90bd527-b5fd-32b1-bc7d-cdde4af70490", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "d9956b54-ec46-40d3-b958-c2437765ac51"}}'
CELERY_PRIORITY_KEYS = {'0': 'celery', '1': 'celery', '2': 'celery', '3': 'celery\x06\x163', '4': 'celery\x06\x163', '5': 'celery\x06\x163', '6': 'celery\x06\x166', '7': 'celery\x06\x166', '8': 'celery\x06\x166', '9': 'celery\x06\x169', '10': 'celery\x06\x169'}
CELERY_UNACKED_ENTRY = '[{"body": "W1sxMDAwLCAxXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "wireapp.add", "id": "stale-task-8127071c", "shadow": null, "eta": null, "expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null], "root_id": "stale-task-8127071c", "parent_id": null, "argsrepr": "(1000, 1)", "kwargsrepr": "{}", "origin": "dead@host", "ignore_result": false}, "properties": {"correlation_id": "stale-task-8127071c", "reply_to": "", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "stale-tag-1"}}, "", "celery"]'
CELERY_MINIMAL_MESSAGE = {'body': 'W1sxLCAyXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d', 'content-encoding': 'utf-8', 'content-type': 'application/json', 'headers': {'task': 'wireapp.add', 'id': '0a419ba9-5a97-48a0-99f1-a8356e4cf78e'}, 'properties': {'delivery_tag': '3f85114f-65d6-4c1c-9f3e-f0ebbf72b359', 'body_encoding': 'base64', 'delivery_info': {'exchange': '', 'routing_key': 'celery'}}}

try:
    import celery as real_celery
except ImportError:  # the interop extra is not installed
    real_celery = None


# --- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def no_urls_from_the_shell():
    """As in Celery, these win over any app's settings: a developer's shell must not steer the tests.
    (Not at import: the CLI workers the tests start import this module, and get theirs that way.)"""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "MINICELERY_BROKER_URL", "MINICELERY_RESULT_BACKEND"):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (bash .ci/run installs it)")
        pytest.skip("redis-server not installed")
    directory = tmp_path_factory.mktemp("redis")
    sock = str(directory / "redis.sock")
    proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, what="redis-server socket")
    if proc.poll() is not None:
        pytest.fail("redis-server did not start")
    yield sock
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def redis_client(redis_server):
    """A clean Redis (all databases flushed) for one test."""
    client = redis.Redis(unix_socket_path=redis_server)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def app(redis_client, redis_server):
    """The test app, pointed at the test Redis, with fresh default settings."""
    app_ = APP
    app_.close()
    app_.conf = Config()
    app_.conf.update(broker_url=f"unix://{redis_server}",
                     result_backend=f"redis+socket://{redis_server}?virtual_host=1",
                     broker_transport_options={"visibility_timeout": 3600})
    yield app_
    app_.close()


@pytest.fixture(params=["redis", "sqlite", "memory"])
def any_app(request, tmp_path):
    """The test app on each broker and backend in turn: the contract every one keeps."""
    app_ = APP
    app_.close()
    app_.conf = Config()
    if request.param == "redis":
        sock = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_client")  # flushed
        app_.conf.update(broker_url=f"unix://{sock}", result_backend=f"unix://{sock}?db=1")
    elif request.param == "sqlite":
        app_.conf.update(broker_url=f"sqlite:///{tmp_path}/minicelery.db")
    else:
        app_.conf.update(broker_url=f"memory://{request.node.name}")
    yield app_
    app_.close()


@pytest.fixture
def results(redis_server):
    """A Redis client on the results database, for reading raw result keys."""
    client = redis.Redis(unix_socket_path=redis_server, db=1)
    yield client
    client.close()


def wait_until(condition, timeout=15.0, what="condition"):
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def take(broker, queues, limit, timeout=0.0):
    """Take up to `limit` messages as a worker's loop does: reserve(), and while nothing came,
    wait for a message (up to `timeout` in all) and reserve() again."""
    deadline = time.monotonic() + timeout
    while True:
        deliveries = broker.reserve(queues, limit)[0]
        if deliveries or time.monotonic() >= deadline:
            return deliveries
        broker.wait(queues, deadline - time.monotonic())


def claims(*deliveries):
    """The claims of deliveries, as the broker's operations take them: {tag: (claim,)}."""
    return {d.tag: (d.claim,) for d in deliveries}


class WorkerProcess:
    """A worker forked from the test process, logging to a file."""

    def __init__(self, pid, log_path):
        self.pid, self.log_path = pid, log_path

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_log(self, text, timeout=15.0, count=1):
        return wait_until(lambda: self.log().count(text) >= count, timeout, f"{text!r} in the worker log")

    def children(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def alive(self):
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return done == 0

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Signal the worker and wait for it; returns its exit status."""
        if not self.alive():
            return None
        os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        pytest.fail(f"worker did not stop within {timeout}s after {sig!r}; its log ends:\n{self.log()[-3000:]}")


_worker_count = 0


class WorkerThread:
    """A solo worker in a thread of the test process (memory:// can't leave the process)."""

    def __init__(self, app, log_path, **options):
        self.log_path, self.pid = log_path, os.getpid()
        self.handler = logging.FileHandler(log_path)
        self.handler.setFormatter(logging.Formatter(minicelery.LOG_FORMAT))
        self.handler.addFilter(minicelery._ProcessNameFilter())
        root = logging.getLogger()
        self.old_level = root.level
        root.addHandler(self.handler)
        root.setLevel(logging.INFO)
        options.update(pool="solo", concurrency=1)
        self.worker = app.Worker(**options).__enter__()

    log, wait_for_log = WorkerProcess.log, WorkerProcess.wait_for_log

    def children(self):
        return []

    def alive(self):
        return self.worker._thread.is_alive()

    def stop(self, sig=None, timeout=15.0):
        if self.alive():
            self.worker.__exit__(None, None, None)
            assert not self.alive(), "the worker thread did not stop"
        logging.getLogger().removeHandler(self.handler)
        logging.getLogger().setLevel(self.old_level)


@contextlib.contextmanager
def worker(app, tmp_path, wait_ready=True, **options):
    """Run `minicelery.Worker(app, **options)` in a forked process for the block
    (in a thread, with the solo pool, when the broker is memory://)."""
    global _worker_count
    _worker_count += 1
    log_path = tmp_path / f"worker-{_worker_count}.log"
    log_path.touch()
    options.setdefault("concurrency", 2)
    if app.broker_url.startswith("memory://"):
        handle = WorkerThread(app, log_path, **options)
        try:
            yield handle
        finally:
            handle.stop()
        return
    pid = os.fork()
    if pid == 0:  # the worker process: never return into pytest
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # pytest swaps sys.stdout/err for its own capture objects; use the file.
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
            app.after_fork()
            minicelery.configure_logging("INFO")
            minicelery.Worker(app, **options).start()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):  # a broken stderr must not keep us from leaving
                sys.stderr.flush()
            os._exit(code)
    handle = WorkerProcess(pid, log_path)
    try:
        if wait_ready:
            handle.wait_for_log("ready.")
        yield handle
    finally:
        handle.stop()


# --- tasks the tests use (forked workers inherit them) ---------------------------

APP = Celery("t", set_as_current=False)


class MyError(Exception):
    """A user-defined exception that must come back as itself."""


@APP.task
def add(x, y):
    return x + y


@APP.task
def fail(message):
    raise ValueError(message)


@APP.task
def custom_fail():
    raise MyError("custom", 42)


@APP.task
def echo(value):
    return value


@APP.task
def send_two():
    """Sends two tasks while it runs: its result lists them as its children."""
    return [add.delay(1, 1).id, group(add.s(2, 2), add.s(3, 3)).delay().id]


@APP.task
def raise_shared(depth):
    """Raises an exception holding a list that names 2 ** depth elements through shared parts."""
    value = 1
    for _ in range(depth):
        value = [value, value]
    raise ValueError(value)


@APP.task
def pid():
    return os.getpid()


@APP.task
def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


@APP.task(bind=True)
def whoami(self):
    r = self.request
    return {"id": r.id, "retries": r.retries, "hostname": r.hostname, "is_eager": r.is_eager,
            "root_id": r.root_id, "parent_id": r.parent_id,
            "routing_key": r.delivery_info.get("routing_key")}


@APP.task(acks_late=True)
def late_sleep(seconds, value=None):
    time.sleep(seconds)
    return value


@APP.task(acks_late=True, reject_on_worker_lost=True)
def late_reject_sleep(seconds, marker_key=None):
    if marker_key:
        _marker_redis().incr(marker_key)
    time.sleep(seconds)
    return "done"


@APP.task(bind=True, max_retries=2, default_retry_delay=0)
def flaky(self, succeed_on):
    if self.request.retries < succeed_on:
        raise self.retry(exc=RuntimeError(f"try again {self.request.retries}"), countdown=0.1)
    return f"ok after {self.request.retries}"


@APP.task(bind=True, max_retries=1)
def always_retry(self):
    raise self.retry(countdown=0)


@APP.task(bind=True)
def retry_switching(self, foo, bar):
    """Retried once with only kwargs (or only args): what the second run is given."""
    if not self.request.retries:
        raise self.retry(kwargs={"foo": foo + 1}, countdown=0) if isinstance(foo, int) \
            else self.retry(args=("again",), countdown=0)
    return {"foo": foo, "bar": bar, "retries": self.request.retries}


@APP.task(bind=True, expires=120.0, max_retries=1)
def retry_once_expiring(self, expires=None):
    if self.request.retries:
        return self.request.retries
    raise self.retry(countdown=0.1, expires=expires, max_retries=1)


@APP.task
def unserializable_result():
    return object()


@APP.task
def rejecter():
    raise Reject("not today", requeue=False)


@APP.task
def ignorer():
    raise Ignore()


@APP.task(ignore_result=True)
def no_result(key):
    _marker_redis().set(key, "ran")


class HookedTask(Task):
    """Records every hook call in Redis, where the test process can see it."""

    def on_success(self, retval, task_id, args, kwargs):
        _marker_redis().rpush("hooks", f"success:{retval}")

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        _marker_redis().rpush("hooks", f"failure:{exc!r}:{'Traceback' in einfo}")

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        _marker_redis().rpush("hooks", f"after_return:{status}")

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        _marker_redis().rpush("hooks", f"retry:{exc!r}")


@APP.task(base=HookedTask)
def hooked(fail_it):
    if fail_it:
        raise KeyError("nope")
    return "fine"


@APP.task(queue="low")
def on_low_queue():
    return "low"


@APP.task(bind=True, base=HookedTask, default_retry_delay=0)
def hooked_retry(self):
    if self.request.retries == 0:
        raise self.retry(exc=OSError("again"))
    return "retried"


@APP.task(autoretry_for=(KeyError,), retry_kwargs={"max_retries": 2}, default_retry_delay=0)
def auto_retry(counter_key):
    _marker_redis().incr(counter_key)
    raise KeyError("still missing")


@APP.task(autoretry_for=(OSError,), retry_backoff=2, retry_jitter=False, max_retries=5)
def backoff_retry():
    raise OSError("down")


@APP.task(time_limit=1)
def hard_limited(seconds):
    time.sleep(seconds)
    return os.getpid()


@APP.task(soft_time_limit=0.3)
def soft_limited():
    try:
        time.sleep(10)
    except minicelery.SoftTimeLimitExceeded:
        return "cleaned up"


@APP.task(rate_limit="5/s")
def rate_limited(i):
    return time.time()


@APP.task(bind=True, name="test_minicelery.flaky_cross")
def flaky_cross(self):
    if self.request.retries == 0:
        raise self.retry(exc=RuntimeError("first try"), countdown=2)
    return f"minicelery after {self.request.retries}"


class UnencodableArgs(Exception):
    pass


@APP.task
def fail_with_object():
    raise UnencodableArgs(object(), "text")


@APP.task
def fork_grandchild():
    """Leaves a grandchild that holds the pool child's pipe open, as a task using fork can."""
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(20)
        os._exit(0)
    return grandchild


@APP.task
def bare_retry():
    raise minicelery.Retry()


@APP.task(acks_late=True)
def counted_sleep(path, seconds):
    """Sleeps; each run appends a line to `path`, so the test can count runs."""
    record.run(os.getpid(), path)
    time.sleep(seconds)
    return "slept"


def lines_in(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@APP.task(ignore_result=True)
def record(i, path):
    """Append one line per run: the file shows every task lost or run twice."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)


@APP.task
def mul(x, y):
    return x * y


@APP.task
def xsum(numbers):
    return sum(numbers)


@APP.task
def on_error(request, exc, traceback, path):
    """A Celery 5 errback: called in the worker with the failed task's request."""
    record.run(f"{request.id} {exc!r} {'Traceback' in (traceback or '')}", path)  # (None for a chord's body)


@APP.task
def note_failure(task_id):
    """An old-style errback: published as a task with the failed task's id."""
    _marker_redis().rpush("failed", task_id)


@APP.task(bind=True)
def replace_with(self, sig, *_):
    """Hands its place to the signature it was given (a task, a chain, a group)."""
    return self.replace(signature(sig, app=APP))


@APP.task(bind=True)
def nesting(self, *_):
    return self.request.replaced_task_nesting


@APP.task(bind=True)
def grow_chord(self, value):
    """Adds one more task to the chord it is in."""
    self.add_to_chord(add.si(value, 100))
    return value


@APP.task(bind=True)
def grow_chord_by_group(self, value):
    """Adds a group of two tasks to the chord it is in: the chord waits for both."""
    self.add_to_chord(group(add.si(value, 100), add.si(value, 200)))
    return value


@APP.task(bind=True)
def my_stamps(self, *_):
    return {name: self.request.stamps[name] for name in sorted(self.request.stamped_headers)}


@APP.task
def old_errback(task_id, path):
    """An old-style errback with a stored argument: sent as a task with the failed id."""
    record.run(f"old {task_id}", path)


@APP.task
def apply_signature(sig, value):
    """Receives a signature as an argument (Celery's dict form) and calls it here."""
    return minicelery.signature(sig, app=APP)(value)


@APP.task(ignore_result=True)
def stamp(path):
    """A periodic task: appends the time it ran."""
    record.run(repr(time.time()), path)


@APP.task(acks_late=True, reject_on_worker_lost=True)
def chaos_late(i, path, seconds):
    """Chaos work, acked after it ran; its line is written once the work is done."""
    time.sleep(seconds)
    record.run(i, path)
    return i


@APP.task
def chaos_early(i, path, seconds):
    """The same work with early ack: a killed run ends FAILURE (WorkerLostError)."""
    return chaos_late.run(i, path, seconds)


@APP.task(bind=True)
def when_run(self):
    return {"at": time.time(), "eta": self.request.eta, "expires": self.request.expires}


@APP.task(bind=True)
def request_fields(self):
    request = self.request
    return [request.time_limit, request.soft_time_limit, request.properties.get("app_id"),
            request.replaced_task_nesting]


@APP.task(bind=True, time_limit=60, soft_time_limit=45)
def declared_limits(self):
    return [self.request.time_limit, self.request.soft_time_limit]


@APP.task(time_limit=1, soft_time_limit=2)
def soft_over_hard():
    pass


if os.environ.get("TEST_BEAT_STAMPS"):  # the CLI beat test configures the subprocess's app
    APP.conf.beat_schedule = {"stamp": {"task": "test_minicelery.stamp", "schedule": 0.5,
                                        "args": (os.environ["TEST_BEAT_STAMPS"],)}}


def _marker_redis():
    """A client on the test Redis from inside a task (the URL comes from the app)."""
    return redis.Redis.from_url(APP.conf.broker_url)


# --- §1 Errors and states --------------------------------------------------------

def test_errors_result_timeout_is_a_builtin_timeout():
    assert issubclass(ResultTimeout, TimeoutError)
    assert issubclass(NotRegistered, KeyError)
    assert minicelery.READY_STATES == {"SUCCESS", "FAILURE", "REVOKED"}


# --- §3 Serialization ------------------------------------------------------------

def test_serialization_roundtrips_kombu_types():
    import decimal
    import uuid
    value = {"when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
             "day": dt.date(2026, 1, 2), "price": decimal.Decimal("1.10"),
             "id": uuid.UUID(int=5), "raw": b"\xff\x00", "text": b"abc"}
    data, content_type, _ = minicelery.dumps(value)
    assert content_type == "application/json"
    assert json.loads(data)["when"] == {"__type__": "datetime", "__value__": "2026-01-02T03:04:05+00:00"}
    assert minicelery.loads(data, content_type, {"application/json"}) == value


def test_serialization_refuses_pickle_unless_accepted():
    data, content_type, _ = minicelery.dumps([1], "pickle")
    with pytest.raises(minicelery.ContentDisallowed, match="accept_content"):
        minicelery.loads(data, content_type, minicelery.accepted_types(["json"]))
    assert minicelery.loads(data, content_type, minicelery.accepted_types(["json", "pickle"])) == [1]


@pytest.mark.parametrize("compression", ["zlib", "bzip2"])
def test_serialization_compression_roundtrip(compression):
    data, content_type, header = minicelery.dumps({"a": "x" * 1000}, compression=compression)
    assert len(data) < 200 and header in ("application/x-gzip", "application/x-bz2")
    assert minicelery.loads(data, content_type, {content_type}, header) == {"a": "x" * 1000}


def test_serialization_exceptions_in_celery_form():
    assert minicelery.exception_to_dict(ValueError("boom")) == {
        "exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}
    assert minicelery.exception_to_dict(WorkerLostError("x"))["exc_module"] == "billiard.exceptions"
    rebuilt = minicelery.exception_from_dict(
        {"exc_type": "MyCustomError", "exc_message": ["custom", 42], "exc_module": "nowhere.to.be.found"})
    assert type(rebuilt).__name__ == "MyCustomError" and rebuilt.args == ("custom", 42)
    # A result must not be able to make us call an arbitrary function.
    not_an_exception = minicelery.exception_from_dict(
        {"exc_type": "system", "exc_message": ["echo pwned"], "exc_module": "os"})
    assert isinstance(not_an_exception, Exception) and type(not_an_exception).__name__ == "system"
    revoked = minicelery.exception_from_dict(
        {"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"})
    assert isinstance(revoked, minicelery.TaskRevokedError)


# --- §4 Messages -----------------------------------------------------------------

def _queued(client, key="celery"):
    return [json.loads(raw) for raw in client.lrange(key, 0, -1)]


def test_message_envelope_matches_celery_sample(app, redis_client):
    add.apply_async((2, 2), task_id="fixed-id")
    [envelope] = _queued(redis_client)
    sample = json.loads(CELERY_ADD_MESSAGE)
    assert set(envelope) == set(sample)
    assert list(envelope["headers"]) == list(sample["headers"])
    assert set(envelope["properties"]) == set(sample["properties"])
    assert envelope["properties"]["delivery_info"] == {"exchange": "", "routing_key": "celery"}
    assert envelope["headers"]["task"] == "test_minicelery.add"
    assert envelope["headers"]["root_id"] == "fixed-id"
    assert envelope["headers"]["argsrepr"] == "(2, 2)"
    body = json.loads(base64.b64decode(envelope["body"]))
    assert body == [[2, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def test_message_options_in_headers(app, redis_client):
    eta = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    add.apply_async((1, 2), eta=eta, expires=60, time_limit=30, soft_time_limit=20,
                    headers={"custom": "yes"})
    [envelope] = _queued(redis_client)
    headers = envelope["headers"]
    assert headers["eta"] == "2030-01-01T12:00:00+00:00"
    assert dt.datetime.fromisoformat(headers["expires"]) > dt.datetime.now(dt.timezone.utc)
    assert headers["timelimit"] == [30, 20] and headers["custom"] == "yes"
    assert 59000 <= int(envelope["properties"]["expiration"]) <= 60000


def test_message_priority_picks_kombus_list_key(app, redis_client):
    for priority in (0, 2, 3, 6, 9):
        add.apply_async((1, 1), priority=priority)
    expected = CELERY_PRIORITY_KEYS
    for priority, key in expected.items():
        assert minicelery._queue_key("celery", int(priority)) == key
    assert {k.decode() for k in redis_client.keys("celery*")} == set(expected.values())
    assert redis_client.llen("celery") == 2 and redis_client.llen("celery\x06\x169") == 1


def test_message_unserializable_args_raise_at_call_site(app, redis_client):
    with pytest.raises(EncodeError, match="not JSON serializable"):
        echo.delay(object())
    assert redis_client.llen("celery") == 0


def test_message_wrong_arguments_raise_at_call_site(app, redis_client):
    with pytest.raises(TypeError, match="add"):
        add.delay(1, 2, 3)
    with pytest.raises(TypeError, match="countdwn"):
        add.apply_async((1, 2), countdwn=3)
    assert redis_client.llen("celery") == 0


# --- §5 Brokers ------------------------------------------------------------------

def test_broker_reserve_moves_messages_to_unacked_as_kombu_does(app, redis_client):
    for i in range(5):
        add.delay(i, i)
    broker = app.broker
    got = take(broker, ["celery"], 3)
    assert len(got) == 3 and redis_client.llen("celery") == 2
    entry = json.loads(redis_client.hget("unacked", got[0].tag))
    sample_entry = json.loads(CELERY_UNACKED_ENTRY)
    assert entry[1:] == sample_entry[1:] == ["", "celery"]
    assert entry[0]["properties"]["delivery_tag"] == got[0].tag  # the envelope itself, as kombu keeps it
    assert redis_client.zcard("unacked_index") == 3
    assert broker.ack(claims(*got)) == (set(), set())
    assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0
    assert redis_client.sismember("_kombu.binding.celery", "celery\x06\x16\x06\x16celery")


def test_broker_wait_ends_when_a_message_arrives(app):
    started = time.monotonic()
    assert app.broker.wait(["celery"], 0.1) == [] and time.monotonic() - started >= 0.1
    thread, box = _in_background(app.broker.wait, ["celery"], 30.0)
    time.sleep(0.2)  # paces the test: the wait has begun
    add.delay(1, 1)
    thread.join(15)
    assert box["seconds"] < 15
    [delivery] = app.broker.reserve(["celery"], 4)[0]
    assert delivery.queue == "celery"


#: commands newer than Redis 5.0, renamed away to play an older server (Ubuntu 22.04 ships 6.0,
#: Debian 11 5.0); without HELLO, a client must speak RESP2 from the start
NEWER_THAN_REDIS_5_0 = ["HELLO", "ACL", "RESET", "BLMOVE", "LMOVE", "GETDEL", "GETEX", "ZRANGESTORE", "COPY", "LMPOP", "BLMPOP",
                        "ZMSCORE", "SMISMEMBER", "HRANDFIELD", "ZRANDMEMBER", "ZUNION", "ZINTER", "ZDIFF",
                        "ZDIFFSTORE", "XAUTOCLAIM", "EXPIRETIME", "PEXPIRETIME", "SINTERCARD", "LCS", "FCALL"]


def _redis_5_0(tmp_path, *also_missing):
    renames = [arg for name in NEWER_THAN_REDIS_5_0 + list(also_missing) for arg in ("--rename-command", name, "")]
    return _start_redis(tmp_path, "redis-5.0", *renames)


@pytest.mark.parametrize("server", ["redis", "redis-5.0"])
def test_broker_wakes_for_a_message_on_any_queue_and_priority(app, tmp_path, server):
    """An idle wait ends when a message comes to any of its queues at any priority, not at
    its timeout, without taking anything to learn it (one blocked connection per list);
    on a Redis without BLMOVE too."""
    sock, proc = _redis_5_0(tmp_path) if server == "redis-5.0" else (None, None)
    try:
        if proc is not None:
            _use_private_redis(app, sock)
        broker = app.broker
        for queue, priority in [("second", 9), ("first", 5), ("second", 0), ("first", 0)]:
            thread, box = _in_background(take, broker, ["first", "second"], 1, 30.0)
            wait_until(lambda: len(broker._watch.watchers) == 8 and all(w.armed for w in broker._watch.watchers.values()),
                       what="a wait on every list of both queues")
            add.apply_async((1, 2), queue=queue, priority=priority)
            thread.join(15)
            [delivery] = box["outcome"]
            assert delivery.queue == queue and box["seconds"] < 15  # the message woke it, not its 30 s
            broker.ack(claims(delivery))
        assert broker._watch.blmove is (server == "redis")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def test_worker_runs_tasks_on_redis_5_0(app, tmp_path):
    """A worker on a Redis without the commands of 6 and 7 (renamed away): tasks on
    every queue and priority run, and acks_late and ETA tasks too."""
    sock, proc = _redis_5_0(tmp_path)
    try:
        _use_private_redis(app, sock)
        with worker(app, tmp_path, queues=["celery", "low"]):
            results = [add.apply_async((i, 1), queue=queue, priority=priority)
                       for i, (queue, priority) in enumerate([("celery", 0), ("low", 9), ("low", 3)])]
            results.append(late_sleep.apply_async((0, "late"), countdown=1))
            assert [r.get(timeout=15) for r in results] == [1, 2, 3, "late"]
    finally:
        proc.kill()
        proc.wait()


def test_broker_reads_every_redis_wording_of_a_missing_blocking_command(app):
    """Redis 6 says `BLMOVE` with backticks, 7 'blmove' with quotes, an ACL 'no permissions';
    without BRPOPLPUSH either, an idle worker looks every tenth of a second (said once)."""
    error = minicelery._import_redis().exceptions.ResponseError
    broker = app.broker
    for wording in ["unknown command `BLMOVE`, with args beginning with: `celery`, ",
                    "unknown command 'BLMOVE', with args beginning with: 'celery' ",
                    "this user has no permissions to run the 'blmove' command"]:
        broker._watch.blmove = True
        assert broker._watch._came(error(wording)) is False and broker._watch.blmove is False
    assert broker._watch._came(error("unknown command `BRPOPLPUSH`, with args beginning with: ")) is False
    assert broker._watch.blmove is None
    with pytest.raises(error):
        broker._watch._came(error("ERR something else"))


def test_broker_without_any_blocking_command_still_serves(app, tmp_path):
    sock, proc = _redis_5_0(tmp_path, "BRPOPLPUSH")
    try:
        _use_private_redis(app, sock)
        thread, box = _in_background(take, app.broker, ["celery"], 1, 20.0)
        wait_until(lambda: app.broker._watch.blmove is None, what="the broker giving up blocking commands")
        add.delay(1, 1)
        thread.join(15)
        assert len(box["outcome"]) == 1 and box["seconds"] < 15
    finally:
        proc.kill()
        proc.wait()


def test_broker_recovers_at_once_when_redis_drops_its_connections(app, redis_client):
    """Every watcher of a 10-queue worker dies at once (CLIENT KILL, a restart): one
    wait fails, the next ones work, not one per dead connection."""
    queues = [f"q{i}" for i in range(10)]
    assert take(app.broker, queues, 1, 0.2) == []  # 40 watchers armed
    redis_client.client_kill_filter(_type="normal", skipme=True)
    failures = 0
    for _ in range(6):
        try:
            take(app.broker, queues, 1, 0.2)
        except app.broker.connection_errors:
            failures += 1
    assert failures <= 2
    add.apply_async((1, 1), queue="q7")
    assert len(take(app.broker, queues, 1, 5.0)) == 1


def test_broker_skips_a_queue_whose_key_is_not_a_list(app, redis_client, caplog):
    """A key of another type under a queue's name (a clash with an app's key) must not stop
    the other queues, nor leave their messages taken in `unacked`."""
    redis_client.set("b\x06\x166", "junk")
    add.apply_async((1, 1), queue="a")
    [delivery] = take(app.broker, ["a", "b"], 5)
    assert delivery.queue == "a" and redis_client.hlen("unacked") == 1
    assert take(app.broker, ["a", "b"], 5, 0.3) == []  # its watcher is left out too
    assert caplog.text.count("is not a list") == 1


def test_worker_signals_as_celery(app, tmp_path):
    """SIGUSR1 logs every thread's stack and the worker goes on; SIGUSR2 is ignored (said
    so); SIGQUIT is a cold shutdown. None of them kills the worker without a word."""
    with worker(app, tmp_path) as w:
        os.kill(w.pid, signal.SIGUSR1)
        w.wait_for_log("(most recent call first)")
        os.kill(w.pid, signal.SIGUSR2)
        w.wait_for_log("SIGUSR2 ignored")
        assert add.delay(2, 3).get(timeout=10) == 5
        assert w.stop(signal.SIGQUIT) == 0
        assert "Cold shutdown" in w.log()


def test_held_connections_survive_a_flushed_script_cache(app, redis_client):
    """The hot paths run their Lua scripts by SHA1 on held connections: after Redis lost its
    script cache (a restart, SCRIPT FLUSH) each sends its script again and goes on."""
    add.delay(1, 1)
    [delivery] = take(app.broker, ["celery"], 1)
    redis_client.script_flush()
    add.delay(2, 2)  # publish
    assert app.broker.ack(claims(delivery)) == (set(), set())
    [second] = take(app.broker, ["celery"], 1)  # take
    redis_client.script_flush()
    app.backend.store_result("flushed", 4, minicelery.SUCCESS)  # store
    assert app.AsyncResult("flushed").get(timeout=5) == 4
    assert minicelery.decode_message(second.raw).headers["argsrepr"] == "(2, 2)"


def test_held_connections_are_not_shared_with_a_forked_child(app, redis_client):
    """A producer that forks after sending (a web server forking its workers) must not
    share its held socket with the child: each would read the other's replies."""
    add.delay(0, 0)  # the parent's held connection is made
    held = app.broker._producer  # (what publish() uses)

    def echo_many(who):
        return all(held.connection.run(("ECHO", f"{who}-{i}"))[0] == f"{who}-{i}".encode() for i in range(2000))

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if echo_many("child") else 2
        finally:
            os._exit(code)
    assert echo_many("parent")
    assert os.waitpid(pid, 0)[1] == 0, "the child read replies meant for the parent"
    add.delay(3, 0)
    assert redis_client.llen("celery") == 2


def test_broker_wait_ends_on_a_signal(any_app):
    """A worker's waits (the broker's, the pool's) end at once when a signal comes, so an
    idle worker leaves at SIGTERM without first sleeping out its wait."""
    if any_app.broker_url.startswith("memory://"):
        pytest.skip("a forked process can't share memory://")
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            any_app.after_fork()
            signal.signal(signal.SIGUSR1, lambda *_: None)
            minicelery.watch_signals()
            os.write(ready_write, b"1")  # a signal from now on ends the wait, even one before it starts
            started = time.monotonic()
            found = any_app.broker.wait(["celery"], 30.0)
            code = 0 if found == [] and time.monotonic() - started < 20 else 2
        finally:
            os._exit(code)
    assert os.read(ready_read, 1) == b"1"
    os.kill(pid, signal.SIGUSR1)
    assert os.waitpid(pid, 0)[1] == 0, "wait() did not end at the signal"


def test_broker_serves_lower_priority_numbers_first(app):
    add.apply_async((1, 0), priority=9)
    add.apply_async((2, 0), priority=0)
    add.apply_async((3, 0), priority=5)
    got = take(app.broker, ["celery"], 3)
    assert [minicelery.decode_message(d.raw).properties["priority"] for d in got] == [0, 5, 9]


def test_broker_restores_messages_past_visibility_timeout(app, redis_client):
    app.conf.broker_transport_options = {"visibility_timeout": 1}
    app.close()
    add.delay(1, 1)
    [delivery] = take(app.broker, ["celery"], 1)
    assert app.broker.restore_unacked() == 0
    assert app.broker.restore_unacked(now=time.time() + 2) == 1
    [envelope] = _queued(redis_client)
    assert envelope["properties"]["delivery_tag"] == delivery.tag
    assert envelope["headers"]["redelivered"] is True
    assert redis_client.hlen("unacked") == 0


def test_broker_touch_keeps_a_held_message(app, redis_client):
    app.conf.broker_transport_options = {"visibility_timeout": 5}
    app.close()
    add.delay(1, 1)
    [delivery] = take(app.broker, ["celery"], 1)
    touched = time.time()
    assert app.broker.touch(claims(delivery), touched) == (set(), set())
    assert redis_client.zscore("unacked_index", delivery.tag) == touched
    assert app.broker.restore_unacked(now=touched + 4) == 0
    # The old claim is no longer ours; either score of a claim whose renewal went unanswered is.
    assert app.broker.touch(claims(delivery)) == (set(), {delivery.tag})
    assert app.broker.touch({delivery.tag: (delivery.claim, touched)}, touched + 1) == (set(), set())
    # A claim someone else rewrote (restored and taken again) is reported as theirs, not renewed,
    # nor acked; a message no longer held at all is gone.
    redis_client.zadd("unacked_index", {delivery.tag: time.time() - 100})
    assert app.broker.ack({delivery.tag: (touched + 1,)}) == (set(), {delivery.tag})
    assert app.broker.restore_unacked() == 1
    assert app.broker.ack({delivery.tag: (touched + 1,)}) == ({delivery.tag}, set())


def test_broker_requeue_purge_and_size(app):
    for i in range(3):
        add.delay(i, i)
    got = take(app.broker, ["celery"], 2)
    app.broker.requeue({got[0].tag: (time.time() - 100,)})  # not our claim: it stays
    assert app.broker.size("celery") == 1
    app.broker.requeue(claims(*got))
    assert app.broker.size("celery") == 3
    assert app.broker.purge("celery") == 3 and app.broker.size("celery") == 0


def test_broker_keeps_a_message_without_delivery_tag(app, redis_client):
    message = dict(CELERY_MINIMAL_MESSAGE, properties={"body_encoding": "base64"})
    redis_client.lpush("celery", json.dumps(message))
    [delivery] = take(app.broker, ["celery"], 1)
    assert delivery.tag.startswith("minicelery-")
    assert json.loads(redis_client.hget("unacked", delivery.tag))[2] == "celery"


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://:secret@example.com:6380/2",
                                 "redis+socket:///tmp/r.sock", "unix:///tmp/r.sock?db=3",
                                 "socket:///tmp/r.sock?virtual_host=1"])
def test_broker_url_forms(url):
    app_ = Celery("urls", broker=url, backend=url, set_as_current=False)
    assert isinstance(app_.broker, minicelery.RedisBroker)
    assert isinstance(app_.backend, minicelery.RedisBackend)
    kwargs = app_.broker.client.connection_pool.connection_kwargs
    if "socket" in url or url.startswith("unix"):
        assert kwargs["path"] == "/tmp/r.sock"
    if "virtual_host=1" in url:
        assert kwargs["db"] == 1
    if "secret" in url:
        assert kwargs["password"] == "secret" and kwargs["db"] == 2


def test_broker_unknown_scheme_is_a_clear_error_when_configured():
    # At start-up (where the project configures its app), not at the first delay().
    with pytest.raises(ImproperlyConfigured, match=r"unknown broker URL scheme 'amqp'.*redis://"):
        Celery("bad", broker="amqp://guest@localhost//", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match=r"unknown result backend URL scheme ''.*'django-db'.*sqlite://"):
        Celery("bad", set_as_current=False).conf.update(result_backend="django-db")


# --- §6 Result backends ----------------------------------------------------------

def test_backend_meta_is_celerys_json(app, results):
    meta = app.backend.store_result("abc", 4, "SUCCESS")
    raw = results.get("celery-task-meta-abc").decode()
    assert list(json.loads(raw)) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    assert raw.startswith('{"status": "SUCCESS", "result": 4, "traceback": null')
    assert 86390 < results.ttl("celery-task-meta-abc") <= 86400
    assert dt.datetime.fromisoformat(meta["date_done"]).tzinfo is not None


def test_backend_does_not_overwrite_success(app):
    app.backend.store_result("abc", 4, "SUCCESS")
    app.backend.store_result("abc", None, "STARTED")
    assert app.backend.get_meta("abc")["status"] == "SUCCESS"


def test_backend_result_expires_sets_ttl(app, results):
    app.conf.result_expires = dt.timedelta(seconds=100)
    app.close()
    app.backend.store_result("x", 1, "SUCCESS")
    assert 90 < results.ttl("celery-task-meta-x") <= 100


def test_backend_get_times_out_and_pending_state(app):
    result = AsyncResult("never-sent", app=app)
    assert result.state == "PENDING" and not result.ready()
    with pytest.raises(ResultTimeout):
        result.get(timeout=0.2)
    with pytest.raises(TimeoutError):
        result.get(timeout=0.1)


def test_backend_get_wakes_on_publish(app):
    # The write happens after get() subscribed: only the PUBLISH can wake it.
    pid_ = os.fork()
    if pid_ == 0:
        app.after_fork()
        channel = "celery-task-meta-later"
        while not app.backend.client.pubsub_numsub(channel)[0][1]:  # until get() listens
            time.sleep(0.01)
        app.backend.store_result("later", 42, "SUCCESS")
        os._exit(0)
    try:
        assert AsyncResult("later", app=app).get(timeout=10) == 42
    finally:
        os.waitpid(pid_, 0)


def test_backend_forget_and_result_api(app):
    app.backend.store_result("f", ValueError("bad"), "FAILURE", traceback="Traceback: ...")
    result = AsyncResult("f", app=app)
    assert result.failed() and not result.successful() and result.ready()
    assert isinstance(result.result, ValueError) and result.traceback == "Traceback: ..."
    assert isinstance(result.get(propagate=False), ValueError)
    assert result.date_done is not None and result.task_id == "f"
    result.forget()
    assert AsyncResult("f", app=app).state == "PENDING"


def test_backend_disabled_says_how_to_enable(app):
    app.conf.result_backend = None
    app.close()
    with pytest.raises(ImproperlyConfigured, match="no result backend"):
        add.delay(1, 1).get(timeout=1)


# --- §7 Tasks --------------------------------------------------------------------

def test_task_names_and_registry():
    assert add.name == "test_minicelery.add"
    assert APP.tasks["test_minicelery.add"] is add
    main_app = Celery("proj", set_as_current=False)
    assert main_app.gen_task_name("f", "__main__") == "proj.f"
    named = main_app.task(name="custom.name")(lambda: 1)
    assert main_app.tasks["custom.name"] is named and named() == 1
    with pytest.raises(TypeError, match="unknown task option"):
        main_app.task(max_retires=3)(lambda: 1)


def test_task_call_runs_locally_and_bind_gives_request():
    assert add(2, 3) == 5
    assert whoami()["id"] is None


def test_task_apply_is_eager():
    result = add.apply((2, 2))
    assert isinstance(result, EagerResult) and result.get() == 4 and result.state == "SUCCESS"
    failed = fail.apply(("x",))
    assert failed.state == "FAILURE" and isinstance(failed.result, ValueError)
    with pytest.raises(ValueError):
        failed.get()
    info = whoami.apply(task_id="eager-id").get()
    assert info["id"] == "eager-id" and info["is_eager"] is True
    assert flaky.apply((2,)).get() == "ok after 2"
    with pytest.raises(MaxRetriesExceededError):
        always_retry.apply().get()


def test_task_always_eager_and_propagates(app):
    app.conf.task_always_eager = True
    assert add.delay(3, 3).get() == 6
    assert isinstance(fail.delay("e").result, ValueError)
    app.conf.task_eager_propagates = True
    with pytest.raises(ValueError):
        fail.delay("e")


def test_task_shared_task_binds_to_the_current_app():
    @shared_task
    def shared_mul(x, y):
        return x * y

    first = Celery("first")
    assert shared_mul.name == "test_minicelery.shared_mul"
    assert first.tasks["test_minicelery.shared_mul"].app is first
    second = Celery("second")
    assert "test_minicelery.shared_mul" in second.tasks and shared_mul.app is second
    assert shared_mul(3, 4) == 12


def test_task_run_task_decides_outcomes(app):
    def outcome_of(task, *args):
        message = minicelery._eager_message(task, args, {}, minicelery.uuid(), 0, {})
        return minicelery.run_task(app, message)
    assert outcome_of(add, 1, 2).state == "SUCCESS"
    assert outcome_of(fail, "x").state == "FAILURE"
    assert outcome_of(rejecter).state == "REJECTED"
    assert outcome_of(ignorer).state == "IGNORED"
    unserializable = outcome_of(unserializable_result)
    assert unserializable.state == "FAILURE" and isinstance(unserializable.retval, EncodeError)


# --- §8 App and configuration ----------------------------------------------------

def test_config_defaults_are_celerys():
    conf = Config()
    assert conf.task_default_queue == "celery" and conf.result_expires == 86400
    assert conf.worker_prefetch_multiplier == 4 and conf.accept_content == ["json"]
    assert conf.task_acks_late is False and conf.enable_utc is True


def test_config_update_and_assignment_check_types():
    app_ = Celery("cfg", set_as_current=False, task_acks_late=True)
    assert app_.conf.task_acks_late is True
    app_.conf.update(worker_concurrency=3, result_expires=dt.timedelta(hours=1))
    app_.conf["task_default_queue"] = "q"
    assert app_.conf.worker_concurrency == 3 and app_.conf.task_default_queue == "q"
    with pytest.raises(ImproperlyConfigured, match="worker_concurrency must be int or None, not str"):
        app_.conf.worker_concurrency = "4"
    with pytest.raises(ImproperlyConfigured, match="task_acks_late must be bool"):
        app_.conf.update(task_acks_late="yes")


class DjangoSettings:
    CELERY_BROKER_URL = "redis://django:6379/0"
    CELERY_TASK_ACKS_LATE = True
    CELERY_RESULT_BACKEND = "redis://django:6379/1"
    DEBUG = True


def test_config_from_object_with_namespace():
    app_ = Celery("cfg", set_as_current=False)
    app_.config_from_object(DjangoSettings, namespace="CELERY")
    assert app_.conf.broker_url == "redis://django:6379/0" and app_.conf.task_acks_late is True
    assert app_.conf.result_backend == "redis://django:6379/1"
    app_.config_from_object("test_minicelery:DjangoSettings", namespace="CELERY")
    plain = Celery("cfg", set_as_current=False)
    plain.config_from_object({"task_default_queue": "from-dict", "broker_url": "redis://x/0"})
    assert plain.conf.task_default_queue == "from-dict"


def test_config_routes_dict_glob_and_explicit_queue(app, redis_client):
    app.conf.task_routes = {"test_minicelery.echo": {"queue": "echoes"}, "test_minicelery.a*": "a-queue"}
    echo.delay(1)
    add.delay(1, 1)
    add.apply_async((1, 1), queue="explicit")
    on_low_queue.delay()
    assert [redis_client.llen(q) for q in ("echoes", "a-queue", "explicit", "low", "celery")] == [1, 1, 1, 1, 0]


def test_config_env_broker_url(monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://from-env:6379/0")
    assert Celery("env", set_as_current=False).broker_url == "redis://from-env:6379/0"
    monkeypatch.delenv("CELERY_BROKER_URL")
    assert Celery("env", broker="redis://arg/0", set_as_current=False).broker_url == "redis://arg/0"


# --- §9 Worker -------------------------------------------------------------------

def test_worker_runs_tasks_in_child_processes(app, tmp_path):
    with worker(app, tmp_path) as w:
        assert add.delay(4, 4).get(timeout=10) == 8
        child_pid = pid.delay().get(timeout=10)
        assert child_pid in w.children() and child_pid != w.pid
        result = add.delay(2, 2)
        result.get(timeout=10)
        w.wait_for_log(f"Task test_minicelery.add[{result.id}] succeeded in ")
    log = w.log()
    assert f"Task test_minicelery.add[{result.id}] received" in log
    assert "INFO/ForkPoolWorker-" in log and "celery@" in log and ". test_minicelery.add" in log


def test_worker_stores_failures_with_their_type(app, tmp_path, results):
    with worker(app, tmp_path) as w:
        result = fail.delay("boom")
        with pytest.raises(ValueError, match="boom"):
            result.get(timeout=10)
        assert result.state == "FAILURE" and "raise ValueError(message)" in result.traceback
        with pytest.raises(MyError) as caught:
            custom_fail.delay().get(timeout=10)
        assert caught.value.args == ("custom", 42)
        w.wait_for_log(f"Task test_minicelery.fail[{result.id}] raised unexpected: ValueError('boom')")
    stored = json.loads(results.get(f"celery-task-meta-{result.id}"))
    assert stored["result"] == {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}


def test_worker_request_context(app, tmp_path):
    with worker(app, tmp_path, hostname="w1@%h") as w:
        result = whoami.delay()
        info = result.get(timeout=10)
    assert info["id"] == result.id and info["root_id"] == result.id and info["retries"] == 0
    assert info["hostname"].startswith("w1@") and info["routing_key"] == "celery"
    assert info["is_eager"] is False


def test_worker_track_started_and_hooks(app, tmp_path, redis_client):
    app.conf.task_track_started = True
    with worker(app, tmp_path):
        slow = sleep_then.delay(2.0, "v")
        wait_until(lambda: slow.state == "STARTED", what="STARTED state")
        assert AsyncResult(slow.id, app=app).result["pid"] > 0
        assert slow.get(timeout=10) == "v"
        assert hooked.delay(False).get(timeout=10) == "fine"
        # after_return runs after the result is stored, as in Celery: wait
        # for it, or the next task (in the other pool process) may overtake.
        wait_until(lambda: redis_client.llen("hooks") == 2, what="the first task's hooks")
        with pytest.raises(KeyError):
            hooked.delay(True).get(timeout=10)
        wait_until(lambda: redis_client.llen("hooks") == 4, what="hook calls")
    assert [h.decode() for h in redis_client.lrange("hooks", 0, -1)] == [
        "success:fine", "after_return:SUCCESS", "failure:KeyError('nope'):True", "after_return:FAILURE"]


def test_worker_retry_resends_with_same_id(app, tmp_path, results):
    with worker(app, tmp_path) as w:
        result = flaky.delay(1)
        assert result.get(timeout=10) == "ok after 1"
        w.wait_for_log(f"Task test_minicelery.flaky[{result.id}] retry: Retry in 0.1s: RuntimeError('try again 0')")
        with pytest.raises(MaxRetriesExceededError):
            always_retry.delay().get(timeout=10)
    assert json.loads(results.get(f"celery-task-meta-{result.id}"))["parent_id"] == result.id


def test_worker_honours_countdown(app, tmp_path):
    with worker(app, tmp_path):
        sent = time.time()
        result = echo.apply_async(("late",), countdown=1)
        assert result.get(timeout=10) == "late"
        assert dt.datetime.fromisoformat(AsyncResult(result.id, app=app)._get_meta()["date_done"]
                                         ).timestamp() >= sent + 1


def test_worker_discards_expired_tasks(app, tmp_path):
    with worker(app, tmp_path, wait_ready=False) as w:
        result = echo.apply_async((1,), expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))
        with pytest.raises(minicelery.TaskRevokedError):
            result.get(timeout=10)
        assert result.state == "REVOKED"
        w.wait_for_log(f"Discarding revoked task: test_minicelery.echo[{result.id}]")


def test_worker_unserializable_result_is_encode_error(app, tmp_path):
    with worker(app, tmp_path):
        with pytest.raises(EncodeError):
            unserializable_result.delay().get(timeout=10)
        assert add.delay(1, 1).get(timeout=10) == 2


def test_worker_ignore_result_writes_nothing(app, tmp_path, results, redis_client):
    with worker(app, tmp_path):
        result = no_result.delay("ran-key")
        wait_until(lambda: redis_client.get("ran-key"), what="task side effect")
        assert add.delay(1, 1).get(timeout=10) == 2
    assert results.get(f"celery-task-meta-{result.id}") is None


def test_worker_unknown_task_is_failed_logged_and_dead_lettered(app, tmp_path, redis_client):
    with worker(app, tmp_path) as w:
        result = app.send_task("test_minicelery.ad", (1, 2))
        with pytest.raises(NotRegistered, match="never registered"):
            result.get(timeout=10)
        w.wait_for_log("Received unregistered task of type 'test_minicelery.ad'")
        assert "Did you mean: test_minicelery.add" in w.log()
        huge = app.send_task("x" * 100_000)  # (its log line and its error are cut)
        with pytest.raises(NotRegistered) as error:
            huge.get(timeout=10)
        assert len(str(error.value)) < 300 and "xxx..." in w.log() and "x" * 300 not in w.log()
        assert add.delay(1, 2).get(timeout=10) == 3
    dead = app.broker.dead_letters()
    assert "unregistered" in dead[-1]["reason"] and json.loads(dead[-1]["raw"])["headers"]["id"] == result.id


def test_worker_survives_undecodable_messages(app, tmp_path, redis_client):
    good_body = base64.b64encode(json.dumps([[1, 2], {}, {}]).encode()).decode()
    bad = [b"\xff\xfe garbage", b"{not json", json.dumps({"headers": {}}).encode(),
           json.dumps({"body": base64.b64encode(b"[[1], {}]").decode(), "content-type": "application/json",
                       "headers": {"task": "test_minicelery.add", "id": "two-element"},
                       "properties": {"body_encoding": "base64", "delivery_tag": "t1"}}).encode(),
           json.dumps({"body": good_body, "headers": {"task": "test_minicelery.add", "id": "no-ctype"},
                       "properties": {"body_encoding": "base64", "delivery_tag": "t2"}}).encode()]
    for raw in bad:
        redis_client.lpush("celery", raw)
    # A pickle message is refused by the default accept_content.
    refused = app.send_task("test_minicelery.add", (1, 1), serializer="pickle")
    with worker(app, tmp_path) as w:
        assert add.delay(2, 3).get(timeout=10) == 5
        with pytest.raises(minicelery.ContentDisallowed):
            refused.get(timeout=10)
        with pytest.raises(minicelery.DecodeError, match="body must be"):
            AsyncResult("two-element", app=app).get(timeout=10)
        wait_until(lambda: len(app.broker.dead_letters()) == 6, what="six dead letters")
        assert w.alive()
    assert redis_client.hlen("unacked") == 0
    reasons = " | ".join(d["reason"] for d in app.broker.dead_letters())
    assert "no content-type" in reasons and "refusing to deserialize" in reasons


def test_worker_accepts_pickle_when_configured(app, tmp_path):
    app.conf.accept_content = ["json", "pickle"]
    with worker(app, tmp_path):
        result = echo.apply_async(({1, 2},), serializer="pickle")
        assert result.get(timeout=10) == [1, 2]
        assert echo.apply_async(("z" * 500,), compression="zlib").get(timeout=10) == "z" * 500


def test_worker_consumes_only_its_queues(app, tmp_path, redis_client):
    with worker(app, tmp_path, queues=["low", "other"]):
        assert on_low_queue.delay().get(timeout=10) == "low"
        assert add.apply_async((1, 1), queue="other").get(timeout=10) == 2
        add.delay(5, 5)  # default queue: not consumed here
        assert add.apply_async((2, 2), queue="other").get(timeout=10) == 4  # sent after it, done
        assert redis_client.llen("celery") == 1


def test_worker_early_ack_child_killed_is_worker_lost(app, tmp_path, redis_client):
    with worker(app, tmp_path, concurrency=1) as w:
        result = sleep_then.delay(30)
        w.wait_for_log(f"[{result.id}] received")
        child = wait_until(lambda: w.children(), what="pool child")[0]
        wait_until(lambda: redis_client.hlen("unacked") == 0, what="early ack")
        os.kill(child, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="signal 9"):
            result.get(timeout=10)
        assert add.delay(1, 1).get(timeout=10) == 2  # a new child took its place
        assert child not in w.children()


@APP.task
def dies_the_first_time(request, exc, traceback_):
    """An errback (Celery 5's form) whose pool process dies the first time it runs."""
    if APP.broker.client.incr("errback-runs") == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def test_worker_a_pool_process_dying_as_it_records_a_loss_is_followed_by_another(app, tmp_path, redis_client):
    """The loss of a task is recorded (FAILURE, its errbacks) by a pool process; should that
    one die too, another records it."""
    with worker(app, tmp_path, concurrency=1) as w:
        result = sleep_then.apply_async((30,), link_error=dies_the_first_time.s())
        wait_until(lambda: redis_client.hlen("unacked") == 0 and w.children(), what="the task to start")
        os.kill(w.children()[0], signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="signal 9"):
            result.get(timeout=10)
        wait_until(lambda: redis_client.get("errback-runs") == b"2", what="the errback's second run")
        assert "recording it again" in w.log()


def test_worker_acks_late_child_killed_is_redelivered(app, tmp_path, redis_client):
    with worker(app, tmp_path, concurrency=1) as w:
        result = late_reject_sleep.delay(1.0, "runs")
        wait_until(lambda: redis_client.get("runs") == b"1", what="first run")
        assert redis_client.hlen("unacked") == 1
        os.kill(w.children()[0], signal.SIGKILL)
        assert result.get(timeout=15) == "done"
        assert redis_client.get("runs") == b"2"
        wait_until(lambda: redis_client.hlen("unacked") == 0, what="late ack")


def test_worker_max_tasks_per_child_recycles(app, tmp_path):
    with worker(app, tmp_path, concurrency=1, max_tasks_per_child=2):
        pids = [pid.delay().get(timeout=10) for _ in range(4)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]


def test_worker_warm_shutdown_finishes_running_and_returns_prefetched(app, tmp_path, redis_client):
    # Queued before the worker starts, so its first reserve takes all four (its prefetch):
    # one sent while it runs may be taken only after the first task is done.
    running = late_sleep.delay(2.0, "finished")
    waiting = [late_sleep.delay(0, i) for i in range(3)]
    with worker(app, tmp_path, concurrency=1) as w:
        wait_until(lambda: redis_client.llen("celery") == 0, what="prefetch")
        w.wait_for_log(f"[{running.id}] received")
        w.stop(signal.SIGTERM)
        assert running.get(timeout=10) == "finished"
    assert redis_client.llen("celery") == 3 and redis_client.hlen("unacked") == 0
    assert "Restoring 3 unacknowledged message(s)" in w.log()
    assert all(r.state == "PENDING" for r in waiting)
    with worker(app, tmp_path):
        assert [r.get(timeout=10) for r in waiting] == [0, 1, 2]


def test_worker_cold_shutdown_requeues_acks_late(app, tmp_path, redis_client):
    with worker(app, tmp_path, concurrency=1) as w:
        running = late_sleep.delay(30, "never")
        wait_until(lambda: w.children() and redis_client.hlen("unacked") == 1, what="task start")
        w.wait_for_log(f"[{running.id}] received")
        os.kill(w.pid, signal.SIGTERM)
        w.wait_for_log("Warm shutdown")
        w.stop(signal.SIGTERM)
    assert "Cold shutdown" in w.log()
    assert redis_client.llen("celery") == 1 and redis_client.hlen("unacked") == 0


def test_worker_killed_restored_by_another_after_visibility_timeout(app, tmp_path, redis_client):
    app.conf.broker_transport_options = {"visibility_timeout": 1}
    with worker(app, tmp_path, concurrency=1) as w:
        result = late_sleep.delay(2, "x")
        w.wait_for_log(f"[{result.id}] received")
        children = wait_until(w.children, what="pool child")
        w.stop(signal.SIGKILL)
        for child in children:
            os.kill(child, signal.SIGKILL)
    assert redis_client.hlen("unacked") == 1 and result.state == "PENDING"
    with worker(app, tmp_path, concurrency=2) as w2:
        assert result.get(timeout=15) == "x"
        w2.wait_for_log("Restored 1 unacknowledged message(s)")
    assert redis_client.hlen("unacked") == 0


def _gone(pid):
    """Whether a process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_worker_pool_processes_leave_when_the_main_process_is_killed(any_app, tmp_path):
    with worker(any_app, tmp_path, concurrency=2) as w:
        assert add.delay(1, 1).get(timeout=10) == 2
        children = wait_until(lambda: len(w.children()) == 2 and w.children(), what="two pool processes")
        busy = sleep_then.delay(30)  # one of them busy: it must not run on unsupervised (no time limit)
        w.wait_for_log(f"[{busy.id}] received")
        w.stop(signal.SIGKILL)
        try:
            wait_until(lambda: all(_gone(child) for child in children), timeout=5, what="the pool processes gone")
        finally:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


def test_worker_solo_pool(app, tmp_path):
    with worker(app, tmp_path, pool="solo") as w:
        assert pid.delay().get(timeout=10) == w.pid
        with pytest.raises(ValueError):
            fail.delay("solo").get(timeout=10)
    assert "(solo)" in w.log()


def test_worker_rejects_unknown_pool(app):
    with pytest.raises(ImproperlyConfigured, match="the 'threads' pool is not offered; use one of \\['prefork', 'solo'\\]"):
        minicelery.Worker(app, pool="threads")


def test_app_imports_without_redis_py():
    code = ("import sys; sys.modules['redis'] = None\n"
            "import minicelery\n"
            "app = minicelery.Celery('x', broker='redis://localhost/0', set_as_current=False)\n"
            "try:\n    app.broker\nexcept minicelery.ImproperlyConfigured as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=30)
    assert "pip install redis" in out.stdout, out.stderr


# --- §9 Worker: retries, ETA, expiry, time limits, rate limits, revocation -------

def _run_message(app, task, args=(), retries=0, **send_options):
    """Run one task message through run_task() as a worker would, without a worker."""
    message = minicelery._eager_message(task, tuple(args), {}, send_options.pop("task_id", minicelery.uuid()),
                                        retries, {})
    message.properties["delivery_info"] = {"routing_key": "celery"}
    return minicelery.run_task(app, message, hostname="test@host")


def test_retry_republishes_same_id_with_eta(app, redis_client, results):
    from freezegun import freeze_time
    with freeze_time("2026-03-01 12:00:00"):
        outcome = _run_message(app, flaky, (5,), task_id="retry-me")
    assert outcome.state == "RETRY"
    [envelope] = _queued(redis_client)
    headers = envelope["headers"]
    assert headers["id"] == "retry-me" and headers["retries"] == 1 and headers["parent_id"] == "retry-me"
    assert headers["eta"] == "2026-03-01T12:00:00.100000+00:00"
    meta = json.loads(results.get("celery-task-meta-retry-me"))
    assert meta["status"] == "RETRY" and meta["result"]["exc_message"] == ["try again 0"]


def test_retry_backoff_schedule():
    backoff_retry.retry_jitter = False
    assert [backoff_retry.backoff_countdown(n) for n in range(10)] == [2, 4, 8, 16, 32, 64, 128, 256, 512, 600]
    backoff_retry.retry_jitter = True
    try:
        assert all(0 <= backoff_retry.backoff_countdown(4) <= 32 for _ in range(50))
    finally:
        backoff_retry.retry_jitter = False


def test_retry_autoretry_uses_backoff_for_eta(app, redis_client):
    from freezegun import freeze_time
    with freeze_time("2026-03-01 12:00:00"):
        outcome = _run_message(app, backoff_retry, retries=3)
    assert outcome.state == "RETRY"
    assert _queued(redis_client)[0]["headers"]["eta"] == "2026-03-01T12:00:16+00:00"
    assert _run_message(app, backoff_retry, retries=5).state == "FAILURE"


def test_retry_autoretry_through_worker(app, tmp_path, redis_client):
    with worker(app, tmp_path):
        result = auto_retry.delay("auto-runs")
        with pytest.raises(KeyError, match="still missing"):
            result.get(timeout=15)
    assert redis_client.get("auto-runs") == b"3"


def test_retry_state_and_on_retry_hook(app, tmp_path, redis_client):
    with worker(app, tmp_path, concurrency=1):  # one child: the hooks come in order
        assert hooked_retry.delay().get(timeout=10) == "retried"
        wait_until(lambda: redis_client.llen("hooks") >= 4, what="hooks")
    assert [h.decode() for h in redis_client.lrange("hooks", 0, -1)] == [
        "retry:OSError('again')", "after_return:RETRY", "success:retried", "after_return:SUCCESS"]


def test_eta_naive_is_utc_whatever_the_timezone(app, redis_client):
    from freezegun import freeze_time
    with freeze_time("2026-07-01 10:00:00"):
        add.apply_async((1, 1), countdown=30)
        add.apply_async((1, 1), eta=dt.datetime(2026, 7, 1, 12, 0))  # naive: UTC
        app.conf.update(enable_utc=False, timezone="Europe/Berlin")
        add.apply_async((1, 1), eta=dt.datetime(2026, 7, 1, 12, 0))  # still UTC, as Celery reads it
        add.apply_async((1, 1), eta=dt.datetime(2026, 7, 1, 14, 0, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin")),
                        expires=60)
    etas = [dt.datetime.fromisoformat(e["headers"]["eta"]) for e in reversed(_queued(redis_client))]
    assert [e.astimezone(dt.timezone.utc).strftime("%H:%M:%S") for e in etas] == [
        "10:00:30", "12:00:00", "12:00:00", "12:00:00"]
    assert _queued(redis_client)[0]["headers"]["expires"] == "2026-07-01T10:01:00+00:00"


def test_naive_utc_eta_and_expires_with_enable_utc_off(app, tmp_path):
    """The tutorials build times with utcnow() and elsewhere set a timezone with
    enable_utc=False: together, an eta 3 s ahead ran at once and an expiry a minute
    ahead was stored REVOKED, read as Shanghai times (Celery reads naive times as UTC)."""
    app.conf.update(timezone="Asia/Shanghai", enable_utc=False)
    naive_now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    eta = naive_now + dt.timedelta(seconds=2)
    with worker(app, tmp_path):
        later = when_run.apply_async(eta=eta, expires=naive_now + dt.timedelta(seconds=60))
        info = later.get(timeout=15)
    assert info["at"] >= eta.replace(tzinfo=dt.timezone.utc).timestamp() and later.state == "SUCCESS"


def test_a_reject_without_requeue_is_stored_as_a_failure(app, tmp_path, redis_client):
    """From Celery's integration tests: the message of Reject(requeue=False) never runs
    again, so its result is a FAILURE (it read PENDING, and get() timed out)."""
    with worker(app, tmp_path) as w:
        rejected = rejecter.delay()
        with pytest.raises(Reject):
            rejected.get(timeout=10)
        w.wait_for_log(f"[{rejected.id}] rejected: not today")
    assert rejected.state == "FAILURE" and rejected.failed() and not rejected.successful()
    assert redis_client.llen("celery") == 0  # (and not requeued)


def test_retry_switching_between_args_and_kwargs_and_with_expires(app, tmp_path):
    """From Celery's integration tests: retry(kwargs=...) of a call made with args raised
    'multiple values for argument'; retry(expires=...) of a task sent with expires
    raised 'got multiple values for keyword argument'."""
    with worker(app, tmp_path):
        assert retry_switching.apply_async(args=(1, 2)).get(timeout=10) == {"foo": 2, "bar": 2, "retries": 1}
        assert retry_switching.apply_async(kwargs={"foo": "x", "bar": 3}).get(timeout=10) == \
            {"foo": "again", "bar": 3, "retries": 1}
        assert retry_once_expiring.delay(expires=60).get(timeout=10) == 1
        assert retry_once_expiring.delay().get(timeout=10) == 1


def test_pydantic_models_as_arguments_and_results(tmp_path, redis_server):
    """Celery 5.5's @app.task(pydantic=True), from Celery's integration tests: a model
    argument is sent as a dict and validated back into the model; a model returned is
    stored as its dump; Optional[Model] may be None; a bad dict fails the task."""
    pytest.importorskip("pydantic")
    url = f"unix://{redis_server}"
    write_tree(tmp_path, {"pydproj.py": f"""
        from typing import Optional
        from pydantic import BaseModel
        from minicelery import Celery
        app = Celery("pydproj", broker="{url}", backend="{url}?db=1")

        class Point(BaseModel):
            x: int
            y: int

        @app.task(pydantic=True)
        def shift(point: Point, by: int) -> Point:
            assert isinstance(point, Point)
            return Point(x=point.x + by, y=point.y + by)

        @app.task(bind=True, pydantic=True)
        def maybe(self, point: Optional[Point] = None):
            return [self.name, None if point is None else point.x]
        """})
    env = project_env(tmp_path)
    with cli_worker(tmp_path, env, "-A", "pydproj", "worker", "-c", "1"):
        sent = run_python(tmp_path, env, """
            from pydproj import Point, shift, maybe
            assert shift.delay(Point(x=1, y=2), 3).get(timeout=20) == {"x": 4, "y": 5}
            assert shift.delay({"x": 1, "y": 2}, by=1).get(timeout=20) == {"x": 2, "y": 3}
            assert maybe.delay().get(timeout=20) == ["pydproj.maybe", None]
            assert maybe.delay(point={"x": 7, "y": 0}).get(timeout=20) == ["pydproj.maybe", 7]
            bad = shift.delay({"x": "not a number", "y": 2}, 1)
            try:
                bad.get(timeout=20)
            except Exception as exc:
                print("failed:", bad.state, bad.traceback)
            """)
    assert sent.returncode == 0 and "failed: FAILURE" in sent.stdout, sent.stdout + sent.stderr
    assert "validation error for Point" in sent.stdout  # (its traceback: ValidationError has no args to store)


def test_request_time_limits_properties_and_nesting(app, tmp_path):
    """From Celery's integration tests: self.request.time_limit and soft_time_limit are
    those in effect (the call's, else the task's, else the app's), request.properties
    the message's (apply_async(app_id=...) among them), replaced_task_nesting 0."""
    with pytest.raises(ValueError, match="soft_time_limit must be less than or equal to time_limit"):
        soft_over_hard.delay()
    app.conf.task_soft_time_limit = 100
    with worker(app, tmp_path):
        assert request_fields.apply_async(time_limit=30, soft_time_limit=20, app_id="1234").get(timeout=10) == \
            [30, 20, "1234", 0]
        assert request_fields.delay().get(timeout=10) == [None, 100, None, 0]
        assert declared_limits.delay().get(timeout=10) == [60, 45]
        assert declared_limits.apply_async(time_limit=10, soft_time_limit=5).get(timeout=10) == [10, 5]


def test_result_extended_stores_the_call_as_celery_does(app, tmp_path):
    """result_extended=True (a Celery setting projects use for Flower and admin pages)
    was warned about and dropped: the result stores the task's name, arguments, worker,
    retries and queue, and AsyncResult reads them."""
    app.conf.result_extended = True
    with worker(app, tmp_path, hostname="ext@%h"):
        result = add.apply_async((2, 3), queue="celery")
        assert result.get(timeout=10) == 5
    raw = json.loads(app.backend.client.get(f"celery-task-meta-{result.id}"))
    assert {k: raw[k] for k in ("name", "args", "kwargs", "retries", "queue")} == {
        "name": "test_minicelery.add", "args": [2, 3], "kwargs": {}, "retries": 0, "queue": "celery"}
    fresh = AsyncResult(result.id, app=app)
    assert (fresh.name, fresh.args, fresh.worker) == ("test_minicelery.add", [2, 3],
                                                      minicelery._expand_hostname("ext@%h"))


def test_a_result_lists_the_tasks_it_sent_as_its_children(app, tmp_path):
    with worker(app, tmp_path):
        result = send_two.delay()
        task_id, group_id = result.get(timeout=10)
        single, grouped = result.children
        assert isinstance(single, AsyncResult) and single.id == task_id and single.get(timeout=10) == 2
        assert isinstance(grouped, minicelery.GroupResult) and grouped.id == group_id
        assert grouped.get(timeout=10) == [4, 6]  # (run by the worker: inside its block)
    raw = json.loads(app.backend.client.get(f"celery-task-meta-{result.id}"))
    assert raw["children"][0] == [[task_id, None], None]  # (Celery's form, as a Celery client reads it)
    assert add.delay(1, 2).children == []  # (nothing stored yet: PENDING)
    for stored in ({"status": "SUCCESS", "children": 5}, {"status": "SUCCESS"}):  # (written by someone else)
        app.backend.client.set("celery-task-meta-odd", json.dumps(stored))
        odd = AsyncResult("odd", app=app)
        assert odd.children == [] and odd.result is None


def test_eta_near_runs_on_time_and_carries_request_fields(app, tmp_path):
    with worker(app, tmp_path):
        eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1.5)
        result = when_run.apply_async(eta=eta, expires=60)
        info = result.get(timeout=10)
    assert eta.timestamp() <= info["at"] < eta.timestamp() + 1.0
    assert dt.datetime.fromisoformat(info["eta"]) == eta and info["expires"]


def test_eta_far_is_parked_in_redis_not_held(app, tmp_path, redis_client):
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)  # beyond ETA_HORIZON (3 s)
    result = when_run.apply_async(eta=eta)
    with worker(app, tmp_path) as w:
        w.wait_for_log("Parked 1 task(s)")
        assert redis_client.zcard("minicelery:eta") == 1 and redis_client.hlen("unacked") == 0
        assert redis_client.llen("celery") == 0
    with worker(app, tmp_path) as w2:  # survives a restart, and runs once, on time
        info = result.get(timeout=15)
        w2.wait_for_log(f"when_run[{result.id}] succeeded")
    assert eta.timestamp() <= info["at"] < eta.timestamp() + 1.0
    assert redis_client.zcard("minicelery:eta") == 0 and redis_client.hlen("minicelery:eta-messages") == 0
    assert (w.log() + w2.log()).count(f"when_run[{result.id}] succeeded") == 1


def test_eta_tasks_held_for_later_leave_room_for_tasks_due_now(app, tmp_path, monkeypatch):
    """A worker full of ETA tasks not yet due still takes a task due now, and runs it at
    once (as Celery: ETA tasks don't count against the prefetch limit); up to ETA_ROOM of
    them: more wait in the queue."""
    monkeypatch.setattr(minicelery.Book, "ETA_HORIZON", 120.0)  # (held, not parked)
    monkeypatch.setattr(minicelery.Book, "ETA_ROOM", 2)
    started = str(tmp_path / "started")
    with worker(app, tmp_path, concurrency=1, prefetch_multiplier=1) as w:  # capacity: 2
        later = [counted_sleep.apply_async((started, 0), countdown=60) for _ in range(2)]
        wait_until(lambda: w.log().count("received") == 2, what="the worker full of ETA tasks")
        assert add.delay(2, 3).get(timeout=15) == 5
        later += [counted_sleep.apply_async((started, 0), countdown=60) for _ in range(3)]
        wait_until(lambda: w.log().count("received") == 5, what="two more ETA tasks held")
        assert app.broker.size("celery") == 1 and lines_in(started) == 0  # (none of them ran)
        app.control.revoke([r.id for r in later])


def test_expires_before_eta_is_revoked(app, tmp_path):
    with worker(app, tmp_path) as w:
        result = echo.apply_async((1,), countdown=1, expires=0.5)
        with pytest.raises(minicelery.TaskRevokedError):
            result.get(timeout=10)
        w.wait_for_log(f"Discarding revoked task: test_minicelery.echo[{result.id}]")


def test_time_limit_hard_kills_child_and_replaces_it(app, tmp_path):
    with worker(app, tmp_path, concurrency=1) as w:
        first_child = pid.delay().get(timeout=10)
        result = hard_limited.delay(30)
        with pytest.raises(minicelery.TimeLimitExceeded):
            result.get(timeout=10)
        assert pid.delay().get(timeout=10) != first_child
        assert hard_limited.delay(0).get(timeout=10) > 0
        w.wait_for_log(f"Hard time limit (1s) exceeded for test_minicelery.hard_limited[{result.id}]")


def test_time_limit_soft_raises_inside_task(app, tmp_path):
    with worker(app, tmp_path) as w:
        assert soft_limited.delay().get(timeout=10) == "cleaned up"
        w.wait_for_log("Soft time limit (0.3s) exceeded")


def test_time_limit_per_call_and_global(app, tmp_path):
    app.conf.task_time_limit = 0.5
    with worker(app, tmp_path):
        with pytest.raises(minicelery.TimeLimitExceeded):
            sleep_then.delay(30).get(timeout=10)
        with pytest.raises(minicelery.SoftTimeLimitExceeded):
            sleep_then.apply_async((30,), soft_time_limit=0.2).get(timeout=10)
        assert sleep_then.apply_async((0.7, "ok"), time_limit=5).get(timeout=10) == "ok"


def test_rate_limit_spaces_one_type_only(app, tmp_path):
    with worker(app, tmp_path, concurrency=2) as w:
        limited = [rate_limited.delay(i) for i in range(6)]
        quick = add.delay(1, 1)
        assert quick.get(timeout=10) == 2
        quick_done = time.time()
        times = sorted(r.get(timeout=15) for r in limited)
    assert times[-1] - times[0] >= 0.9  # 5 gaps of 0.2 s at 5/s (10 % slack for clocks)
    assert quick_done < times[-1]  # the other task type did not wait behind them


def test_rate_limit_from_annotations(app, tmp_path):
    app.conf.task_annotations = {"test_minicelery.when_run": {"rate_limit": "4/s"}}
    assert when_run.option("rate_limit") == "4/s"
    with worker(app, tmp_path):
        times = sorted(r.get(timeout=15)["at"] for r in [when_run.delay() for _ in range(5)])
    assert times[-1] - times[0] >= 0.9
    with pytest.raises(ImproperlyConfigured, match="rate limit '3/d'"):
        minicelery.parse_rate("3/d")


def test_control_rate_limit_and_time_limit_win_over_annotations(app, tmp_path):
    """With the limits in task_annotations, `control rate_limit` and `time_limit` replied
    ok and changed nothing (tasks ran 6 s apart after 10/m was raised to 600/m): the
    annotations were read before what the command set. In Celery the command wins."""
    app.conf.task_annotations = {"test_minicelery.when_run": {"rate_limit": "10/m"},
                                 "test_minicelery.sleep_then": {"time_limit": 0.5}}
    with worker(app, tmp_path, hostname="limits@%h"):
        one = {"destination": [minicelery._expand_hostname("limits@%h")], "reply": True, "timeout": 5}
        assert app.control.rate_limit("test_minicelery.when_run", "600/s", **one)[0]
        runs = [when_run.delay() for _ in range(4)]
        assert all(run.get(timeout=10) for run in runs)  # (at 10/m: 18 s)
        assert app.control.time_limit("test_minicelery.sleep_then", hard=30, **one)[0]
        assert sleep_then.delay(1, "ran").get(timeout=10) == "ran"  # (killed at 0.5 s before)


def test_revoke_before_it_runs(app, tmp_path, redis_client):
    with worker(app, tmp_path) as w:
        held = echo.apply_async(("held",), countdown=2)
        parked = echo.apply_async(("parked",), countdown=3600)
        w.wait_for_log(f"[{held.id}] received")
        held.revoke()
        app.control.revoke(parked.id)
        w.wait_for_log(f"Tasks flagged as revoked: {held.id}")
        with pytest.raises(minicelery.TaskRevokedError):
            held.get(timeout=10)
        assert echo.delay("after").get(timeout=10) == "after"
    assert "[held]" not in w.log() and held.state == "REVOKED"
    assert redis_client.zscore("minicelery:revoked", parked.id) > time.time() + 10000


@pytest.mark.parametrize("started_state", ["STARTED", "PROGRESS"])
def test_a_revoke_stores_revoked_unless_another_worker_started_it(app, tmp_path, started_state):
    """From Celery's integration tests: a worker that gets a revoke stores REVOKED for a
    task nobody started (it read PENDING), and leaves one that another worker started."""
    started, not_started = minicelery.uuid(), minicelery.uuid()
    app.backend.store_result(started, {"hostname": "other@host"}, started_state)  # (playing another worker)
    with worker(app, tmp_path):
        app.control.revoke([started, not_started])
        wait_until(lambda: AsyncResult(not_started, app=app).state == "REVOKED", what="the revoke handled")
    assert AsyncResult(started, app=app).state == started_state  # (the same command: handled too)


def test_revoke_by_stamped_headers(app, tmp_path):
    """Celery 5.3's app.control.revoke_by_stamped_headers: tasks whose stamps match are
    revoked when met, and with terminate=True ended if running; its reply says ok."""
    def stamped(task, args, value):
        return task.apply_async(args, headers={"stamped_headers": ["monitoring_id"],
                                               "stamps": {"monitoring_id": value}})
    with worker(app, tmp_path, concurrency=2) as w:
        reply = app.control.revoke_by_stamped_headers({"monitoring_id": ["m1"]}, reply=True, timeout=5)
        assert list(reply[0].values()) == [{"ok": "headers {'monitoring_id': ['m1']} flagged as revoked, "
                                                  "but not terminated"}]
        revoked, other, plain = stamped(add, (1, 1), "m1"), stamped(add, (2, 2), "m2"), add.delay(3, 3)
        with pytest.raises(minicelery.TaskRevokedError):
            revoked.get(timeout=10)
        assert other.get(timeout=10) == 4 and plain.get(timeout=10) == 6
        started = str(tmp_path / "started")
        running = stamped(counted_sleep, (started, 30), ["m3", "m4"])
        wait_until(lambda: lines_in(started) == 1, what="the stamped task to start")
        running.revoke_by_stamped_headers({"monitoring_id": "m4"}, terminate=True)
        with pytest.raises(minicelery.TaskRevokedError, match="terminated"):
            running.get(timeout=10)
        w.wait_for_log(f"Terminating {running.id}")


def test_revoke_reaches_workers_started_later(app, tmp_path):
    result = echo.delay("never")
    result.revoke()
    with worker(app, tmp_path) as w:
        with pytest.raises(minicelery.TaskRevokedError):
            result.get(timeout=10)
        w.wait_for_log(f"Discarding revoked task: test_minicelery.echo[{result.id}]")
    assert "succeeded" not in w.log()


def test_revoke_terminate_stops_a_running_task(app, tmp_path):
    with worker(app, tmp_path, concurrency=1) as w:
        started = str(tmp_path / "started")
        result = counted_sleep.delay(started, 30)
        wait_until(lambda: lines_in(started) == 1, what="the task to start")  # terminate hits running tasks
        result.revoke(terminate=True)
        with pytest.raises(minicelery.TaskRevokedError, match="terminated"):
            result.get(timeout=10)
        w.wait_for_log(f"Terminating {result.id} (15)")
        assert add.delay(2, 2).get(timeout=10) == 4


# --- §9 Worker: regressions from review ----------------------------------------

def test_regression_timedelta_expiry_and_dead_letters(app, tmp_path, results):
    app.conf.result_expires = dt.timedelta(seconds=90.5)
    with worker(app, tmp_path) as w:
        with pytest.raises(NotRegistered):
            app.send_task("test_minicelery.nope").get(timeout=10)
        assert add.delay(1, 1).get(timeout=10) == 2 and w.alive()
    assert app.broker.client.ttl("minicelery:dead-letters") in (90, 91)  # 90.5 s, rounded up; a second may pass


def test_regression_bad_eta_header_is_a_bad_message(app, tmp_path, redis_client):
    with worker(app, tmp_path) as w:
        result = add.apply_async((1, 1), headers={"eta": "not-a-date"})
        with pytest.raises(minicelery.DecodeError, match="eta/expires"):
            result.get(timeout=10)
        redis_client.lpush("celery", json.dumps({"headers": {"task": "x", "id": "y"}, "properties": [1]}))
        assert add.delay(2, 2).get(timeout=10) == 4 and w.alive()
        wait_until(lambda: len(app.broker.dead_letters()) == 2, what="two dead letters")


def test_regression_grandchild_holding_the_pipe_does_not_stall_the_pool(app, tmp_path):
    with worker(app, tmp_path, concurrency=1, max_tasks_per_child=1):
        grandchild = fork_grandchild.delay().get(timeout=10)
        try:
            started = time.monotonic()
            assert add.delay(1, 2).get(timeout=10) == 3
            assert time.monotonic() - started < 10  # stalled, it would wait for the grandchild: 20 s
        finally:
            os.kill(grandchild, signal.SIGKILL)


def test_regression_exception_with_unencodable_args_is_stored(app, tmp_path):
    with worker(app, tmp_path):
        with pytest.raises(UnencodableArgs) as caught:
            fail_with_object.delay().get(timeout=10)
    assert caught.value.args[0].startswith("<object object at") and caught.value.args[1] == "text"


def test_regression_results_never_import_modules():
    assert "colorsys" not in sys.modules
    exc = minicelery.exception_from_dict({"exc_type": "Whatever", "exc_message": [1], "exc_module": "colorsys"})
    assert "colorsys" not in sys.modules and type(exc).__name__ == "Whatever"


def test_regression_retry_keeps_priority_and_custom_headers(app, redis_client):
    message = minicelery._eager_message(flaky, (5,), {}, "prio-retry", 0, {})
    message.headers["trace"] = "abc"
    message.properties.update(delivery_info={"routing_key": "celery"}, priority=9)
    assert minicelery.run_task(app, message).state == "RETRY"
    [envelope] = _queued(redis_client, "celery\x06\x169")
    assert envelope["headers"]["trace"] == "abc" and envelope["properties"]["priority"] == 9


def test_regression_eager_bare_retry():
    assert bare_retry.apply().state == "RETRY"


def test_regression_config_from_object_takes_settings_only():
    import types
    module = types.SimpleNamespace(os=os, broker_url="redis://m/0", CELERY_RESULT_BACKEND="redis://m/1")
    app_ = Celery("cfg", set_as_current=False)
    app_.config_from_object(module)
    assert app_.conf.broker_url == "redis://m/0" and app_.conf.result_backend == "redis://m/1"
    assert not hasattr(app_.conf, "os")


def test_regression_solo_worker_keeps_its_long_task_leased(app, tmp_path, redis_client):
    app.conf.broker_transport_options = {"visibility_timeout": 1}
    runs = str(tmp_path / "solo-runs")
    with worker(app, tmp_path, pool="solo") as solo:
        result = counted_sleep.delay(runs, 3)
        wait_until(lambda: lines_in(runs) == 1, what="the solo task to start")
        with worker(app, tmp_path, queues=["other"]) as other:  # sweeps for abandoned messages
            assert result.get(timeout=10) == "slept"
    assert lines_in(runs) == 1
    assert "Restored" not in other.log() + solo.log()


def test_worker_main_process_is_never_blocked_by_its_pool_processes(app, tmp_path, monkeypatch):
    """Both pool processes frozen, a job too big for a socket's buffer lent to one: the main
    process goes on answering pings; the process that can't take its job is killed after
    SEND_WITHIN seconds, and the job goes to another (it had never started)."""
    monkeypatch.setattr(minicelery.PreforkPool, "SEND_WITHIN", 1.0)
    with worker(app, tmp_path, concurrency=2, hostname="frozen@%h") as w:
        node = minicelery._expand_hostname("frozen@%h")
        children = wait_until(lambda: len(w.children()) == 2 and w.children(), what="two pool processes")
        for child in children:
            os.kill(child, signal.SIGSTOP)
        try:
            big = echo.delay("x" * 5_000_000)
            pings = [_ping(app, node) for _ in range(3)]
            assert big.get(timeout=30) == "x" * 5_000_000
        finally:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGCONT)
        w.wait_for_log("took no job for 1.0s: killed")
    assert all(pings)


def test_pool_takes_a_job_for_a_process_that_ran_out_of_room_since_free_was_asked(app, tmp_path):
    """free() said a process had room; its task then passed TAKE_BACK_AFTER before the job
    was lent. apply() still takes the job (it once raised, leaving the job marked lent for
    ever and the worker unable to stop), and the job comes back, given back."""
    started = str(tmp_path / "started")
    counted_sleep.delay(started, 2)
    add.delay(1, 2)
    long_one, short_one = take(app.broker, ["celery"], 2, timeout=5)
    pool = minicelery.PreforkPool(app, 1, "room@x")
    pool.start(depth=2)
    try:
        as_job = lambda d: minicelery.Job(d.tag, d.raw, d.queue, (), None, (None, None), False)
        pool.apply([as_job(long_one)])
        wait_until(lambda: lines_in(started) == 1 and pool.free() == 0, what="the long task past TAKE_BACK_AFTER")
        pool.apply([as_job(short_one)])
        events = []
        wait_until(lambda: events.extend(pool.collect(wait_readable_pool(pool))) or len(events) >= 2,
                   timeout=15, what="both jobs back from the pool")
        assert {(type(e).__name__, e.tag) for e in events} == {("Done", long_one.tag), ("Lost", short_one.tag)}
        assert [e.reason for e in events if isinstance(e, minicelery.Lost)] == ["given back"]
    finally:
        pool.stop()


def wait_readable_pool(pool, timeout=0.1):
    readable, writable = pool.handles()
    return minicelery.wait_readable(readable, timeout, writable)


def test_worker_hard_time_limit_fires_while_the_broker_stalls(app, tmp_path, private_redis):
    """redis-server SIGSTOPped while a task spins past its hard time limit: the main thread
    is stuck in a broker command, and the limit still kills the task on time."""
    sock, procs, _ = private_redis
    _use_private_redis(app, sock)
    with worker(app, tmp_path, concurrency=1) as w:
        started = str(tmp_path / "started")
        result = counted_sleep.apply_async((started, 60), time_limit=2)
        wait_until(lambda: lines_in(started) == 1, what="the task to start")
        [child] = w.children()
        os.kill(procs[0].pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            wait_until(lambda: _gone(child), timeout=10, what="the pool process killed at its limit")
            killed_after = time.monotonic() - began
        finally:
            os.kill(procs[0].pid, signal.SIGCONT)
        with pytest.raises(minicelery.TimeLimitExceeded):
            result.get(timeout=30)
    assert killed_after < 2.5, f"killed {killed_after:.1f}s into the stall"


def test_worker_keeps_at_most_the_newest_revocations(app):
    book = minicelery.Book(app, ["celery"], 4)
    book.revoke([f"id-{i}" for i in range(minicelery.Broker.REVOKES_MAX + 10)])
    assert len(book.revoked) == minicelery.Broker.REVOKES_MAX and "id-10" in book.revoked and "id-9" not in book.revoked


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, which the test may stop and restart."""
    sock = str(tmp_path / "own.sock")

    def start():
        proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", sock,
                                 "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: redis.Redis(unix_socket_path=sock, protocol=2).ping() if os.path.exists(sock) else False,
                   what="private redis")
        return proc

    procs = [start()]
    yield sock, procs, start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_regression_worker_survives_a_redis_restart(app, tmp_path, private_redis):
    sock, procs, start = private_redis
    app.conf.update(broker_url=f"unix://{sock}", result_backend=f"unix://{sock}?db=1")
    app.close()
    with worker(app, tmp_path) as w:
        assert add.delay(1, 1).get(timeout=10) == 2
        procs[0].kill()
        procs[0].wait()
        w.wait_for_log("Connection refused")  # (it tried again while Redis was away)
        procs.append(start())
        assert add.delay(2, 2).get(timeout=20) == 4
        assert w.alive()
    # The connections kept from before the restart are dropped at the first error: each
    # failed once when Redis was back (a broken pipe, a closed connection), each failure
    # doubling the wait, so a worker took 18 s to work again.
    after_first_refusal = w.log().split("Connection refused", 1)[1]
    assert "Broken pipe" not in after_first_refusal and "Connection closed" not in after_first_refusal


def test_regression_rediss_cert_reqs_in_celerys_spelling():
    app_ = Celery("tls", broker="rediss://:pw@example.com:6380/0?ssl_cert_reqs=CERT_REQUIRED",
                  set_as_current=False)
    assert app_.broker.client.connection_pool.connection_kwargs["ssl_cert_reqs"] == "required"


# --- §5-§9 The same contract on Redis, SQLite and memory --------------------------

def test_contract_broker_primitives(any_app):
    broker = any_app.broker
    for priority in (9, 0, 5):
        add.apply_async((priority, 0), priority=priority)
    assert broker.size("celery") == 3
    got = take(broker, ["celery"], 2)
    assert [minicelery.decode_message(d.raw).properties["priority"] for d in got] == [0, 5]
    assert broker.size("celery") == 1
    broker.requeue(claims(got[1]))
    [again] = take(broker, ["celery"], 1)
    assert minicelery.decode_message(again.raw).properties["priority"] == 5  # requeued: next out
    assert broker.ack(claims(got[0])) == (set(), set())
    assert broker.restore_unacked(now=time.time() + 1) == 0
    renewed = time.time()
    assert broker.touch(claims(again), renewed) == (set(), set())
    assert broker.restore_unacked(now=renewed + broker.visibility_timeout + 1) == 1
    assert broker.size("celery") == 2 and broker.purge("celery") == 2 and broker.size("celery") == 0
    assert take(broker, ["celery"], 1, 0.05) == []


def test_contract_claims_guard_every_operation_on_a_held_message(any_app):
    """A message restored and taken again is the new holder's: the old claim neither acks,
    renews, requeues nor parks it; an ack asked again after it went through finds it gone.
    Restored and not taken again yet, it is not ours either (not gone: it was not acked)."""
    broker = any_app.broker
    echo.delay("held")
    [first] = take(broker, ["celery"], 1)
    assert broker.restore_unacked(now=time.time() + broker.visibility_timeout + 1) == 1
    assert broker.ack(claims(first)) == (set(), {first.tag}) and broker.size("celery") == 1
    [second] = broker.reserve(["celery"], 1, now=first.claim + 1)[0]  # another worker's take
    assert second.tag == first.tag and second.claim != first.claim
    mine = claims(first)
    assert broker.ack(mine) == (set(), {first.tag}) and broker.touch(mine) == (set(), {first.tag})
    broker.requeue(mine)
    broker.park([(first, (first.claim,), 0, time.time() + 60)])
    assert broker.size("celery") == 0 and take(broker, ["celery"], 1) == []
    assert broker.ack(claims(second)) == (set(), set())  # the holder's ack works,
    assert broker.ack(claims(second)) == ({second.tag}, set())  # and once it is gone, it is gone


def test_broker_hands_out_parked_messages_earliest_due_first(app):
    for word in ("third", "first", "second"):
        echo.delay(word)
    held = take(app.broker, ["celery"], 3)
    due = {"first": time.time() - 3, "second": time.time() - 2, "third": time.time() - 1}
    app.broker.park([(d, (d.claim,), 0, due[_body_args(d)[0]]) for d in held])
    assert [_body_args(d)[0] for d in take(app.broker, ["celery"], 3)] == ["first", "second", "third"]


def _body_args(delivery):
    message = minicelery.decode_message(delivery.raw)
    message.decode_body({"application/json"})
    return message.args


def test_contract_park_and_revocations(any_app):
    broker = any_app.broker
    echo.delay("later")
    [delivery] = take(broker, ["celery"], 1)
    broker.park([(delivery, (delivery.claim,), 0, time.time() + 60)])
    assert take(broker, ["celery"], 1) == [] and broker.size("celery") == 0
    broker.park([])
    # Due within ETA_MOVE_AHEAD: reserve hands it out again.
    broker.restore_unacked()
    echo.delay("now")
    assert len(take(broker, ["celery"], 5)) == 1
    broker.control_messages()  # start listening
    broker.revoke(["t1", "t2"], terminate=True, signal="SIGKILL")
    assert {"t1", "t2"} <= broker.revoked()
    commands = wait_until(broker.control_messages, timeout=5, what="revoke broadcast")
    assert [(c.method, c.arguments) for c in commands] == [
        ("revoke", {"task_id": ["t1", "t2"], "terminate": True, "signal": "SIGKILL"})]


def test_contract_tasks_run_fail_retry(any_app, tmp_path):
    with worker(any_app, tmp_path):
        assert add.delay(4, 4).get(timeout=10) == 8
        with pytest.raises(MyError):
            custom_fail.delay().get(timeout=10)
        assert flaky.delay(1).get(timeout=10) == "ok after 1"
        assert whoami.apply_async(queue="celery").get(timeout=10)["retries"] == 0


def test_contract_countdown_parked_eta_and_expiry(any_app, tmp_path):
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=4.5)  # past ETA_HORIZON: parked
    parked = when_run.apply_async(eta=eta)
    soon = when_run.apply_async(countdown=1)
    expired = echo.apply_async((1,), countdown=0.5, expires=0.2)
    with worker(any_app, tmp_path) as w:
        assert soon.get(timeout=10)["at"] >= time.time() - 10
        with pytest.raises(minicelery.TaskRevokedError):
            expired.get(timeout=10)
        info = parked.get(timeout=15)
        w.wait_for_log("Parked 1 task(s)")
    assert eta.timestamp() <= info["at"] < eta.timestamp() + 1.0
    assert w.log().count(f"when_run[{parked.id}] succeeded") == 1


def test_contract_revoke_held_and_for_later_workers(any_app, tmp_path):
    early = echo.delay("never")
    early.revoke()
    with worker(any_app, tmp_path) as w:
        with pytest.raises(minicelery.TaskRevokedError):
            early.get(timeout=10)
        held = echo.apply_async(("held",), countdown=2)
        w.wait_for_log(f"[{held.id}] received")
        held.revoke()
        with pytest.raises(minicelery.TaskRevokedError):
            held.get(timeout=10)
        assert echo.delay("ok").get(timeout=10) == "ok"
    assert "'held'" not in w.log() and "'never'" not in w.log()


def test_contract_bad_messages_and_queues(any_app, tmp_path):
    with worker(any_app, tmp_path, queues=["low", "celery"]) as w:
        with pytest.raises(NotRegistered):
            any_app.send_task("test_minicelery.ad").get(timeout=10)
        assert on_low_queue.delay().get(timeout=10) == "low"
        assert w.alive()
    [dead] = any_app.broker.dead_letters()
    assert "unregistered" in dead["reason"]


def test_contract_results_expire_and_forget(any_app, tmp_path):
    any_app.conf.result_expires = 2
    with worker(any_app, tmp_path):
        result = add.delay(1, 1)
        assert result.get(timeout=10) == 2
        assert AsyncResult(result.id, app=any_app).state == "SUCCESS"
    wait_until(lambda: AsyncResult(result.id, app=any_app).state == "PENDING", timeout=5, what="expiry")
    any_app.backend.store_result("to-forget", 1, "SUCCESS")
    AsyncResult("to-forget", app=any_app).forget()
    assert AsyncResult("to-forget", app=any_app).state == "PENDING"


def test_contract_final_states_stay(any_app):
    """A state stored late must not replace a final one: a SUCCESS stays (Celery's rule), and so
    does a FAILURE or REVOKED against a RETRY or STARTED (a run that lost the race to its own
    retry, in the other pool process); a ready state may replace a FAILURE (a rerun)."""
    store = any_app.backend.store_result
    store("ok", 4, "SUCCESS")
    store("ok", None, "STARTED")
    store("ok", ValueError("late"), "FAILURE")
    store("failed", ValueError("gave up"), "FAILURE")
    store("failed", RuntimeError("retry in 0s"), "RETRY")
    store("revoked", minicelery.TaskRevokedError("revoked"), "REVOKED")
    store("revoked", None, "STARTED")
    store("rerun", ValueError("first"), "FAILURE")
    store("rerun", 5, "SUCCESS")
    store("retried", None, "STARTED")
    store("retried", RuntimeError("again"), "RETRY")
    states = {task_id: AsyncResult(task_id, app=any_app).state for task_id in ("ok", "failed", "revoked", "rerun", "retried")}
    assert states == {"ok": "SUCCESS", "failed": "FAILURE", "revoked": "REVOKED", "rerun": "SUCCESS", "retried": "RETRY"}
    with pytest.raises(ValueError, match="gave up"):
        AsyncResult("failed", app=any_app).get(timeout=5)


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)  # memory: one process
def test_contract_kill_9_with_acks_late_redelivers(any_app, tmp_path):
    any_app.conf.broker_transport_options = {"visibility_timeout": 1}
    runs = [str(tmp_path / f"runs-{i}") for i in range(3)]
    with worker(any_app, tmp_path, concurrency=2) as w:
        held = [counted_sleep.delay(path, 3) for path in runs]
        # (which two run first is the pool processes' choice: one may take two at once)
        wait_until(lambda: sum(lines_in(path) for path in runs) == 2, what="two tasks running")
        children = w.children()
        w.stop(signal.SIGKILL)
        for child in children:
            os.kill(child, signal.SIGKILL)
    first = [lines_in(path) for path in runs]
    assert sorted(first) == [0, 1, 1]
    with worker(any_app, tmp_path, concurrency=2):
        assert [r.get(timeout=20) for r in held] == ["slept"] * 3
    assert [lines_in(path) for path in runs] == [n + 1 for n in first]


def _answer_lost_once(monkeypatch, marker, broker_class, method, when=lambda *args: True):
    """Make the broker's `method` (reserve or ack) lose its answer once, when `when(*args)`:
    it runs, then raises a connection error (as when Redis restarts just after running it)."""
    real = getattr(broker_class, method)

    def run_then_lose_the_answer(broker, *args, **kwargs):
        answer = real(broker, *args, **kwargs)
        if when(*args) and not marker.exists():
            marker.touch()
            raise broker.connection_errors[0]("the answer was lost")
        return answer

    monkeypatch.setattr(broker_class, method, run_then_lose_the_answer)


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_contract_a_take_whose_answer_is_lost_gives_its_messages_back_at_once(any_app, tmp_path, monkeypatch):
    lost = tmp_path / "lost"
    _answer_lost_once(monkeypatch, lost, type(any_app.broker), "reserve", lambda queues, limit, *rest: limit)
    result = add.delay(2, 2)
    with worker(any_app, tmp_path, concurrency=1):
        # The visibility timeout is an hour: only its own worker can bring it back this soon.
        assert result.get(timeout=10) == 4 and lost.exists()


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_contract_an_early_ack_whose_answer_is_lost_runs_its_task_once(any_app, tmp_path, monkeypatch):
    """The ack went through but its answer never came: asked again, it finds the message gone,
    which within the visibility timeout can only mean it was ours. Not run twice, not lost."""
    lost, path = tmp_path / "lost", str(tmp_path / "runs")
    _answer_lost_once(monkeypatch, lost, type(any_app.broker), "ack")
    with worker(any_app, tmp_path, concurrency=1) as w:
        result = chaos_early.delay(7, path, 0)
        assert result.get(timeout=10) == 7 and lost.exists()
        w.wait_for_log("Can't ack")
    assert lines_in(path) == 1


def _ack_lost_once(monkeypatch, marker, broker_class, before_losing):
    """Make the broker's first ack lose its answer: `before_losing(broker, ack)` runs first
    (ack runs the real one), then a connection error is raised."""
    real = broker_class.ack

    def lose_the_answer(broker, claims_):
        if not marker.exists():
            marker.touch()
            before_losing(broker, lambda: real(broker, claims_))
            raise broker.connection_errors[0]("the answer was lost")
        return real(broker, claims_)

    monkeypatch.setattr(broker_class, "ack", lose_the_answer)


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_contract_an_early_ack_lost_while_its_claim_went_stale_still_runs_its_task_once(any_app, tmp_path,
                                                                                       monkeypatch):
    """The ack went through, and its claim went stale before it was asked again: the message
    is gone, and not given back meanwhile, so the ack was ours: it runs (not lost)."""
    any_app.conf.broker_transport_options = {"visibility_timeout": 1}
    lost, path = tmp_path / "lost", str(tmp_path / "runs")
    _ack_lost_once(monkeypatch, lost, type(any_app.broker), lambda broker, ack: (ack(), time.sleep(1.5)))
    with worker(any_app, tmp_path, concurrency=1):
        assert chaos_early.delay(7, path, 0).get(timeout=10) == 7 and lost.exists()
    assert lines_in(path) == 1


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_contract_an_early_ack_lost_while_its_message_went_back_runs_its_task_once(any_app, tmp_path,
                                                                                  monkeypatch):
    """The ack never arrived, and meanwhile the message went back to its queue (as when
    another worker finds the claim stale): asked again, the broker says it's not ours. It
    runs once, taken again."""
    lost, path = tmp_path / "lost", str(tmp_path / "runs")

    def give_it_back(broker, ack):
        assert broker.restore_unacked(now=time.time() + broker.visibility_timeout + 1) == 1

    _ack_lost_once(monkeypatch, lost, type(any_app.broker), give_it_back)
    with worker(any_app, tmp_path, concurrency=1) as w:
        assert chaos_early.delay(7, path, 0).get(timeout=10) == 7 and lost.exists()
        assert "given back to its queue" in w.log() and "chaos_early[" in w.log()
    assert lines_in(path) == 1


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_contract_a_task_waiting_behind_a_long_one_runs_in_another_process(any_app, tmp_path):
    slow, quick = sleep_then.delay(3, "slow"), add.delay(1, 1)
    with worker(any_app, tmp_path, concurrency=2):
        assert quick.get(timeout=2) == 2  # not behind the slow one (else: 3 s)
        assert slow.get(timeout=10) == "slow"


def test_sqlite_many_processes_lose_and_double_nothing(tmp_path):
    app_ = APP
    app_.close()
    app_.conf = Config()
    app_.conf.update(broker_url=f"sqlite:///{tmp_path}/load.db", worker_prefetch_multiplier=8)
    out, total, producers = str(tmp_path / "runs.txt"), 20000, []
    for part in range(2):  # two producer processes, 10,000 tasks each
        pid_ = os.fork()
        if pid_ == 0:
            app_.after_fork()
            code = 1
            try:
                for i in range(part, total, 2):
                    record.delay(i, out)
                code = 0
            finally:
                os._exit(code)
        producers.append(pid_)
    with contextlib.ExitStack() as stack:
        for _ in range(4):
            stack.enter_context(worker(app_, tmp_path, pool="solo"))
        assert all(os.waitpid(p, 0)[1] == 0 for p in producers)
        # Done when every line is written and no message is left, not even a reserved one:
        # from then on nothing can run again, so the file's count is final.
        wait_until(lambda: os.path.exists(out) and sum(1 for _ in open(out)) >= total
                   and app_.broker.store.read("SELECT COUNT(*) FROM messages")[0][0] == 0,
                   timeout=240, what="20,000 tasks")
    with open(out) as f:
        runs = [int(line) for line in f]
    assert len(runs) == total and set(runs) == set(range(total))
    assert app_.broker.store.read("SELECT COUNT(*) FROM messages")[0][0] == 0
    app_.close()


def test_memory_needs_the_solo_pool():
    app_ = Celery("mem", broker="memory://", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="pool='solo'"):
        app_.Worker(pool="prefork")


def test_default_broker_is_a_sqlite_file_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("MINICELERY_BROKER_URL", "CELERY_BROKER_URL", "MINICELERY_RESULT_BACKEND",
                 "CELERY_RESULT_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    app_ = Celery("zero", set_as_current=False)
    double = app_.task(name="zero.double")(lambda x: x * 2)
    assert app_.broker_url == "sqlite:///minicelery.db" and app_.backend_url == app_.broker_url
    with app_.Worker(pool="solo") as w:
        assert double.delay(21).get(timeout=10) == 42
        assert f"(the default, no broker configured: {tmp_path / 'minicelery.db'};" in w.banner(w.consumer.pool)
    assert (tmp_path / "minicelery.db").exists()


# The README's example of testing with minicelery, kept working here.
@pytest.fixture
def celery_app_example():
    app_ = Celery("myproject", broker="memory://readme", set_as_current=False)
    app_.task(name="myproject.add")(lambda x, y: x + y)
    yield app_


@pytest.fixture
def celery_worker_example(celery_app_example):
    with celery_app_example.Worker(pool="solo") as running:
        yield running


def test_readme_testing_example(celery_app_example, celery_worker_example):
    assert celery_app_example.tasks["myproject.add"].delay(2, 3).get(timeout=10) == 5


# --- §8 Canvas -------------------------------------------------------------------

def test_canvas_signatures_are_celerys_dicts():
    sig = add.signature((2, 2), countdown=10)
    assert dict(sig) == {"task": "test_minicelery.add", "args": [2, 2], "kwargs": {},
                         "options": {"countdown": 10}, "subtask_type": None, "immutable": False}
    assert add.subtask((1,)) == add.s(1) and add.si(1)["immutable"] is True
    assert signature("test_minicelery.add", args=(1, 2), app=APP)() == 3
    partial = add.s(2)
    assert partial.clone((8,)).args == [8, 2] and partial(8) == 10
    assert add.si(1, 1).clone((5,)).args == [1, 1]
    assert partial.set(queue="q").options == {"queue": "q"}
    rebuilt = signature(json.loads(json.dumps(add.s(1) | mul.s(3))), app=APP)
    assert isinstance(rebuilt, chain) and [t.task for t in rebuilt.tasks] == [add.name, mul.name]
    assert isinstance(group(add.s(1, 1)) | xsum.s(), chord)


def test_canvas_docs_examples(any_app, tmp_path):
    with worker(any_app, tmp_path):
        assert (add.s(4, 4) | mul.s(8))().get(timeout=10) == 64
        assert chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=10) == 90
        res = (add.si(2, 2) | add.si(4, 4) | add.si(8, 8))()
        assert res.get(timeout=10) == 16 and res.parent.get(timeout=10) == 8
        assert res.parent.parent.get(timeout=10) == 4
        assert group(add.s(i, i) for i in range(10))().get(timeout=10) == list(range(0, 20, 2))
        assert add.s(2).delay(8).get(timeout=10) == 10


def test_canvas_signature_as_argument_and_links(app, tmp_path, redis_client):
    errors = str(tmp_path / "errors")
    with worker(app, tmp_path):
        assert apply_signature.delay(mul.s(3), 5).get(timeout=10) == 15
        add.apply_async((2, 2), link=[mul.s(10).set(task_id="cb1"), mul.s(100).set(task_id="cb2")])
        assert AsyncResult("cb1", app=app).get(timeout=10) == 40
        assert AsyncResult("cb2", app=app).get(timeout=10) == 400
        failed = fail.apply_async(("x",), link=mul.s(2).set(task_id="never"),
                                  link_error=[on_error.s(errors), note_failure.s()])
        with pytest.raises(ValueError):
            failed.get(timeout=10)
        wait_until(lambda: lines_in(errors) == 1 and redis_client.llen("failed") == 1, what="both errbacks")
    assert open(errors).read() == f"{failed.id} ValueError('x') True\n"
    assert redis_client.lrange("failed", 0, -1) == [failed.id.encode()]
    assert AsyncResult("never", app=app).state == "PENDING"


def test_canvas_chain_partial_failure_and_parents(app, tmp_path):
    with worker(app, tmp_path):
        assert chain(add.s(4) | mul.s(8))(4).get(timeout=10) == 64
        assert chain([add.s(1, 1), mul.s(5)]).apply_async().get(timeout=10) == 10
        broken = (add.s(1, 1) | fail.si("in the middle") | mul.s(2) | mul.s(3))()
        with pytest.raises(ValueError, match="in the middle"):
            broken.get(timeout=10)
        assert broken.parent.state == "FAILURE" and broken.parent.parent.state == "FAILURE"
        assert broken.parent.parent.parent.get(timeout=10) == 2


def test_canvas_group_result_api(app, tmp_path):
    with worker(app, tmp_path):
        result = group(add.s(i, i) for i in range(5))()
        assert result.join(timeout=10) == [0, 2, 4, 6, 8]
        assert result.ready() and result.successful() and not result.failed()
        assert result.completed_count() == 5 and len(result) == 5
        result.save()
        restored = GroupResult.restore(result.id, app=app)
        assert [r.id for r in restored] == [r.id for r in result] and restored.get(timeout=5) == [0, 2, 4, 6, 8]
        assert group(add.s(1), mul.s(3))(10).get(timeout=10) == [11, 30]
        mixed = group(add.s(1, 1), fail.s("g"))()
        assert mixed.get(timeout=10, propagate=False)[0] == 2 and mixed.failed()
        later = group(add.s(1, 1).set(countdown=2), add.s(2, 2).set(countdown=2))()
        later.revoke()
        with pytest.raises(minicelery.TaskRevokedError):
            later.get(timeout=10)
    raw = json.loads(app.backend.client.get(f"celery-taskset-meta-{result.id}"))
    assert raw == {"result": [[result.id, None], [[[r.id, None], None] for r in result]]}


def test_canvas_chord_counts_on_redis_and_fails_clearly(app, tmp_path, results):
    with worker(app, tmp_path):
        header = group(add.s(i, i) for i in range(3))
        done = chord(header, xsum.s())()
        assert done.get(timeout=10) == 6
        group_id = done.parent.id
        assert (group(add.s(1, 1), add.s(2, 2)) | xsum.s())().get(timeout=10) == 6
        bad = chord([add.s(1, 1), fail.s("chordfail")])(xsum.s())
        with pytest.raises(ChordError, match=r"Dependency .* raised ValueError\('chordfail'\)"):
            bad.get(timeout=10)
    assert results.get(f"celery-taskset-meta-{group_id}.c") == b"done"
    assert not results.exists(*(f"celery-taskset-meta-{group_id}.{s}" for s in "jtsd"))
    meta = json.loads(results.get(f"celery-task-meta-{done.id}"))
    assert meta["group_id"] == group_id and meta["parent_id"]


def test_canvas_nesting(any_app, tmp_path):
    with worker(any_app, tmp_path):
        assert chain(add.s(1, 1), group(add.s(1), add.s(2)), xsum.s(), mul.s(10))().get(timeout=10) == 70
        assert group(chain(add.s(1, 1), mul.s(3)), chain(add.s(2, 2), mul.s(3)))().get(timeout=10) == [6, 12]
        assert chain(add.s(1, 1), chord([add.s(1), add.s(2)], xsum.s()), mul.s(10))().get(timeout=10) == 70


def test_canvas_eager():
    APP.conf.task_always_eager = True
    try:
        assert (add.s(4, 4) | mul.s(8))().get() == 64
        assert chord((add.s(i, i) for i in range(4)), xsum.s())().get() == 12
        assert group(add.s(1, 1), add.s(2, 2))().get() == [2, 4]
        assert replace_with.delay(group(add.si(i, i) for i in range(3))).get() == [0, 2, 4]
        assert chain(add.si(1, 0), group(add.s(1), add.s(1)), xsum.s(), add.s(1))().get() == 5
        assert add.chunks([(1, 1), (2, 2)], 1)().get() == [[2], [4]]
    finally:
        APP.conf.task_always_eager = False


def test_regression_canvas_review_cases(tmp_path):
    app_ = APP
    app_.close()
    app_.conf = Config()
    app_.conf.update(broker_url=f"memory://{tmp_path}")
    with worker(app_, tmp_path):
        # a chain in a chord header counts when its last task is done
        assert chord([add.s(1, 1) | mul.s(10), add.s(2, 2) | mul.s(10)], xsum.s())().get(timeout=10) == 60
        # chords inside a group, and an empty header
        assert group(chord([add.s(1, 1)], xsum.s()), chord([add.s(2, 2)], xsum.s()))().get(timeout=10) == [2, 4]
        assert chord([], xsum.s())().get(timeout=10) == 0
        # link and link_error on a chain mean its end and any of its steps
        linked = add.s(1, 1) | mul.s(10)
        linked.link(mul.s(2).set(task_id="after-chain"))
        linked()
        assert AsyncResult("after-chain", app=app_).get(timeout=10) == 40
        failing = add.s(1, 1) | fail.s()
        failing.link_error(echo.si("errback ran").set(task_id="chain-errback"))
        failing()
        assert AsyncResult("chain-errback", app=app_).get(timeout=10) == "errback ran"
        # a failure before a chord or group at the end of a chain fails those too
        with pytest.raises(ValueError):
            chain(fail.s("early"), chord([add.s(1), add.s(2)], xsum.s()))().get(timeout=10)
        with pytest.raises(ValueError):
            chain(fail.s("early"), group(add.s(1), add.s(2)))().get(timeout=10)
        # a header task revoked before it runs still lets the chord finish (failed)
        later = echo.s().set(countdown=1)
        header_member = later.freeze()
        header_member.revoke()
        with pytest.raises(ChordError):
            chord([add.s(1, 1), later.clone(("x",))], xsum.s())().get(timeout=10)
    app_.close()


def test_canvas_compositions_compute_what_celery_computes(any_app, tmp_path):
    """Celery's rules (its canvas.py, and the same workflows on a Celery 5.7 worker): a
    group followed by a step is a chord; what follows a chord runs after its body."""
    with worker(any_app, tmp_path, concurrency=4):
        # the rest of a chain after a group: once, after the chord's body (was 3: once per header task)
        assert chain(add.si(1, 0), group(add.s(1), add.s(1)), xsum.s(), add.s(1))().get(timeout=10) == 5
        # a chain of chords passes each chord's result on
        assert chain(chord([add.si(1, 1), add.si(2, 2)], xsum.s()),
                     chord([add.s(1), add.s(2)], xsum.s()), mul.s(10))().get(timeout=10) == 150
        # a chain of two groups: the first group's results reach each task of the second
        assert chain(add.si(1, 1), group(add.s(1), add.s(2)), group(xsum.s(), xsum.s()))().get(
            timeout=10) == [7, 7]
        # a chord whose body is a chain, whose header holds chains and a chord, a group in a group
        assert chord([add.si(1, 1), add.si(2, 2)], chain(xsum.s(), mul.s(10)))().get(timeout=10) == 60
        assert chord([add.si(1, 1) | mul.s(2), chord([add.si(1, 1), add.si(2, 2)], xsum.s()),
                      group(add.si(5, 5), add.si(6, 6))], xsum.s())().get(timeout=10) == 4 + 6 + 10 + 12
        assert group(group(add.si(1, 1), add.si(2, 2)), add.si(3, 3))().get(timeout=10) == [2, 4, 6]
        # a chain in a group gets the previous result; a group of one chain ending in a group is that group
        assert (add.s(5, 6) | group((add.s(1) | add.s(2), add.s(3))))().get(timeout=10) == [14, 14]
        assert group(add.s(1, 2) | group(add.s(1), add.s(2)))().get(timeout=10) == [4, 5]
        # a chain's link option is its last task's (here a chord: its body's), link_error every task's
        callback = echo.s()
        callback_result = callback.freeze()
        assert chain(add.si(1, 1), chord([add.si(2, 2), add.si(3, 3)], xsum.s())).apply_async(
            link=callback).get(timeout=10) == 10
        assert callback_result.get(timeout=10) == 10
        errback = echo.si("chord body chain failed")
        errback_result = errback.freeze()
        failing = chord([add.si(1, 1)], chain(echo.si(1), fail.si("in the body"), echo.si(2)))
        failing.link_error(errback)
        with pytest.raises(ValueError, match="in the body"):
            failing().get(timeout=10)
        assert errback_result.get(timeout=10) == "chord body chain failed"
        # a chain given a task_id: its last task's (as Celery's chain(task_id=...))
        assert chain(add.si(1, 1), mul.s(2), task_id="last-of-chain")().id == "last-of-chain"
        # a chain ending with a group, in a chord's header: one part, the group's list (as Celery's worker)
        assert chord([chain(add.si(1, 1), group(add.s(1), add.s(2))), add.si(10, 0)], echo.s())().get(
            timeout=10) == [[3, 4], 10]
        # a chain led by a group, then a chain: the nested chain runs once
        assert chain(group(add.si(1, 1), add.si(2, 2)), xsum.s(), chain(add.s(1), mul.s(2)))().get(
            timeout=10) == 14
        # a signature's apply_async(chain=...) (stored reversed, as in a message) runs the steps after
        last = mul.s(3).freeze()
        add.s(1, 1).apply_async(chain=[mul.s(3).set(task_id=last.id), add.s(1)])
        assert last.get(timeout=10) == 9


def test_canvas_ports_of_celerys_own_workflows(any_app, tmp_path):
    """Workflows from Celery 5.7's t/integration/test_canvas.py (named there as below),
    in our words, with the values a Celery worker computes."""
    path = str(tmp_path / "errbacks")
    with worker(any_app, tmp_path, concurrency=4):
        # test_chain_of_nine_chords: each chord after the first maps x to 3 * (x + 1)
        nine = chain(chord([add.si(1, 0) for _ in range(3)], xsum.s()),
                     *[chord([add.s(1) for _ in range(3)], xsum.s()) for _ in range(7)],
                     chord([add.s(0) for _ in range(3)], xsum.s()))
        assert nine().get(timeout=30) == 29520
        # test_chain_of_implicit_chords_as_body: a chord whose body is a chain of implicit chords
        for serialized in (False, True):
            steps = [xsum.s()] + [step for _ in range(5) for step in (group(add.s(1), add.s(2)), xsum.s())]
            callback = echo.s()
            callback_result = callback.freeze()
            steps[-1].link(callback)
            workflow = chord([add.si(1, 1), add.si(2, 2)], chain(*steps))
            if serialized:
                workflow = signature(json.loads(json.dumps(workflow)), app=any_app)
            wanted = minicelery.uuid()
            result = workflow.apply_async(task_id=wanted)
            assert result.id == wanted and result.get(timeout=30) == 285
            assert callback_result.get(timeout=10) == 285
        # test_chain_with_a_nested_chain_led_by_a_group
        inner = chain(group(add.si(1, 1), add.si(2, 2)), xsum.s(), add.s(10))
        assert chain(inner, add.s(100))().get(timeout=10) == 116
        # test_chain_of_two_groups_as_tuple_holds_each_task_once (the value)
        assert chain(add.si(1, 0), group(add.s(1), add.s(2)), group(xsum.s(), xsum.s()), xsum.s(),
                     add.s(1))().get(timeout=10) == 11
        # test_chain_of_a_chord_and_a_group_with_two_tasks
        c = add.si(1, 0) | group(add.s(1), add.s(1)) | xsum.s() | add.s(1) | group(add.s(1), add.s(1))
        assert c().get(timeout=10) == [6, 6]
        # test_second_order_replace, test_replace_chain_with_empty_chain: see test_canvas_task_replace
        # test_chain_with_errback_child_replaced: the replacement's failure reaches the chain's errback
        failing = chain(add.si(1, 1), replace_with.si(fail.si("the replacement fails"))).on_error(
            old_errback.s(path))
        with pytest.raises(ValueError, match="the replacement fails"):
            failing().get(timeout=10)
        wait_until(lambda: lines_in(path) == 1, what="the errback of the replaced step")
        # test_mutable_errback_with_stored_arguments: a new-style errback with a stored argument
        fail.apply_async(("stored",), link_error=on_error.s(path))
        wait_until(lambda: lines_in(path) == 2, what="the errback with its stored argument")
        assert "ValueError('stored') True" in open(path).read()


def test_canvas_errors_reach_everything_that_waits(any_app, tmp_path):
    """A failure in a chain inside a chord's header fails the chord; errbacks of every
    style run: new-style (request, exc, traceback) and old-style (task id), each with
    stored arguments, on a task, on a chord's body and on a chord inside a chain."""
    new_style, old_style = str(tmp_path / "new"), str(tmp_path / "old")
    with worker(any_app, tmp_path, concurrency=4):
        in_header = chord([chain(add.si(1, 1), fail.si("in a header chain"), mul.s(2)), add.si(1, 1)], xsum.s())
        with pytest.raises(ChordError, match="in a header chain"):
            in_header().get(timeout=10)
        failed = fail.apply_async(("one",), link_error=[on_error.s(new_style), old_errback.s(old_style)])
        wait_until(lambda: lines_in(new_style) == 1 and lines_in(old_style) == 1, what="both errbacks")
        assert open(new_style).read() == f"{failed.id} ValueError('one') True\n"
        assert open(old_style).read() == f"old {failed.id}\n"
        body = chord([fail.si("header")], xsum.s()).on_error(on_error.s(new_style)).on_error(
            old_errback.si("immutable", old_style))
        result = chain(add.si(1, 1), body)()
        with pytest.raises(ChordError):
            result.get(timeout=10)
        wait_until(lambda: lines_in(new_style) == 2 and lines_in(old_style) == 2, what="the chord's errbacks")
        assert open(new_style).read().splitlines()[1].startswith(f"{result.id} ChordError(")
        assert open(old_style).read().splitlines()[1] == "old immutable"
        # A group body (Celery's rule): each task fails with the header task's own error
        # and calls its errbacks (a chord's: its body's) and the group's, each once.
        errback = old_errback.si("group", old_style)
        group_body = group(chord([add.si(2, 2)], xsum.s()), xsum.s())
        result = chord([add.si(1, 1), fail.si("header")], group_body).apply_async(link_error=errback)
        with pytest.raises(ValueError, match="header"):
            result.get(timeout=10)
        wait_until(lambda: [r.state for r in result.results] == ["FAILURE", "FAILURE"], what="both tasks failed")
        wait_until(lambda: lines_in(old_style) == 4, what="the group's errback, once a task")
        assert open(old_style).read().splitlines()[2:] == ["old group"] * 2
        # A chord body that is a chord, its errback on the chord itself (where Celery's client puts it)
        chord_body = chord([xsum.s(), xsum.s()], xsum.s()).set(link_error=[old_errback.si("chord body", old_style)])
        chord([fail.si("header")], chord_body).delay()
        wait_until(lambda: lines_in(old_style) == 5, what="the errback of a chord's chord body, once")


def test_canvas_hostile_results_and_errbacks_end_every_wait(any_app, tmp_path):
    """A chord header task returning a GroupResult (chunks) never completed the chord (its
    value was counted unencoded); an errback that can't be sent (its stored arguments
    don't fit) stopped the failure handling after it: the rest of the chain and the chord
    waited for ever."""
    path = str(tmp_path / "errbacks")
    with worker(any_app, tmp_path, concurrency=4):
        value = chord([add.chunks([(1, 1)], 1), add.si(1, 1)], echo.s())().get(timeout=10)
        assert value[1] == 2 and minicelery.result_from_tuple(value[0], any_app).get(timeout=10) == [[2]]
        unfit = fail.si("boom").on_error(add.s(1, 2)).on_error(old_errback.s(path))
        with pytest.raises(ValueError, match="boom"):
            chain(unfit, echo.s())().get(timeout=10)
        with pytest.raises(ChordError, match="boom"):
            chord([fail.si("boom").on_error(add.s(1, 2)), add.si(1, 1)], echo.s())().get(timeout=10)
        wait_until(lambda: lines_in(path) == 1, what="the errback after the one that can't be sent")


def test_canvas_deep_failures_revoked_steps_and_unsent_groups_end_every_wait(any_app, tmp_path):
    """Found by a hostile review: a failure 30 chords deep grew its ChordError's text
    twofold a level (16 MB at 24) until get() hung; a revoked step in the middle of a
    chain (or of a chord's header chain) left get() waiting for ever; a chain's errback
    was skipped when the group after a step couldn't be sent; a group added to a chord
    counted as one task, so the body came before its tasks ended."""
    path = str(tmp_path / "errbacks")
    with worker(any_app, tmp_path, concurrency=4):
        deep = fail.si("deep down")
        for _ in range(30):
            deep = chord([deep, add.si(0, 1)], xsum.s())
        with pytest.raises(ChordError, match="deep down") as raised:
            deep.delay().get(timeout=20)
        assert len(str(raised.value)) < 1000
        revoked = chain(sleep_then.si(1, 1), add.si(1, 1).set(task_id="middle-1"), add.s(1)).delay()
        any_app.control.revoke("middle-1")
        with pytest.raises(minicelery.TaskRevokedError):
            revoked.get(timeout=10)
        header = chain(sleep_then.si(1, 1), add.si(1, 1).set(task_id="middle-2"), add.s(1))
        waiting = chord([header, add.si(2, 2)], xsum.s()).delay()
        any_app.control.revoke("middle-2")
        with pytest.raises(ChordError, match="revoked"):
            waiting.get(timeout=10)
        unsent = chain(add.si(0, 0), group(add.s(1, 1), add.si(0, 1))).on_error(old_errback.s(path)).delay()
        with pytest.raises(TypeError):
            unsent.get(timeout=10)
        wait_until(lambda: lines_in(path) == 1, what="the chain's errback")
        grown = chord([grow_chord_by_group.s(1), sleep_then.si(1, 7)], echo.s()).delay()
        assert sorted(grown.get(timeout=10)) == [1, 7, 101, 201]
    assert chain().delay() is None
    with pytest.raises(TypeError, match="list or tuple"):
        minicelery.Signature("test_minicelery.add", args="ab")


def test_canvas_task_replace(any_app, tmp_path):
    """Task.replace(): the replacement takes the task's id, callbacks, chain and place
    in a chord; a group becomes a chord whose value is the group's list, in order."""
    with worker(any_app, tmp_path, concurrency=4):
        assert replace_with.delay(add.si(2, 3)).get(timeout=10) == 5
        assert replace_with.delay(chain(add.si(1, 1), mul.s(5))).get(timeout=10) == 10
        assert replace_with.delay(group(add.si(i, i) for i in range(5))).get(timeout=10) == [0, 2, 4, 6, 8]
        assert chain(add.si(1, 1), replace_with.si(add.si(3, 3)), mul.s(10))().get(timeout=10) == 60
        assert chord([replace_with.si(add.si(1, 1)), replace_with.si(group(add.si(2, 2), add.si(3, 3)))],
                     echo.s())().get(timeout=10) == [2, [4, 6]]
        kept = replace_with.apply_async((add.si(1, 2),), link=mul.s(7).set(task_id="after-replace"))
        assert kept.get(timeout=10) == 3 and AsyncResult("after-replace", app=any_app).get(timeout=10) == 21
        assert replace_with.delay(replace_with.si(nesting.si())).get(timeout=10) == 2
        with pytest.raises(ImproperlyConfigured, match="empty chain"):
            replace_with.delay(chain()).get(timeout=10)


def test_canvas_pieces_workflows_use(any_app, tmp_path):
    """add_to_chord, xmap/xstarmap/chunks, Signature.from_dict and settable args, a task
    returning a GroupResult (stored as its tuple), stamping."""
    with worker(any_app, tmp_path, concurrency=4):
        assert sorted(chord([grow_chord.s(1), grow_chord.s(2)], echo.s())().get(timeout=10)) == [1, 2, 101, 102]
        assert add.map([(1, 1)]).type.name == "celery.map"
        assert minicelery.xstarmap(add.s(), [(1, 1), (2, 2)]).delay().get(timeout=10) == [2, 4]
        assert minicelery.xmap(echo.s(), [1, 2]).delay().get(timeout=10) == [1, 2]
        assert add.chunks([(i, i) for i in range(5)], 2)().get(timeout=10) == [[0, 2], [4, 6], [8]]
        sig = minicelery.Signature.from_dict(json.loads(json.dumps(add.s(1, 2))), app=any_app)
        sig.args = (5, 5)
        assert sig.delay().get(timeout=10) == 10
        stored = any_app.send_task("celery.chunks", (dict(add.s()), [(1, 1)], 1)).get(timeout=10)
        assert minicelery.result_from_tuple(stored, any_app).get(timeout=10) == [[2]]
        stamped = group(my_stamps.si(), chain(add.si(1, 1), my_stamps.s()))
        stamped.stamp(visitor=_MonitoringStamps(), tenant="t1")
        assert stamped().get(timeout=10) == [{"monitoring_id": "m-1", "tenant": "t1"}] * 2
        with pytest.raises(minicelery.EncodeError, match="isn't JSON"):  # (a stamp is a header)
            my_stamps.si().stamp(when=object()).delay()
        assert minicelery.xmap(signature("test_minicelery.echo", app=any_app), [1]).delay().get(timeout=10) == [1]


class _MonitoringStamps(minicelery.StampingVisitor):
    def on_signature(self, sig, **headers):
        return {"monitoring_id": "m-1"}


def test_regression_sqlite_revocations_are_not_rebroadcast(tmp_path):
    app_ = Celery("rev", broker=f"sqlite:///{tmp_path}/r.db", set_as_current=False)
    echo_ = app_.task(name="rev.echo")(lambda x: x)
    with app_.Worker(pool="solo") as w:
        app_.control.revoke("some-id")
        wait_until(lambda: "some-id" in w.consumer.book.revoked, what="the revocation")
        rows = app_.broker.store.read("SELECT COUNT(*) FROM revocations")[0][0]
        for i in range(5):  # each task takes the consumer through more steps
            assert echo_.delay(i).get(timeout=10) == i
        assert app_.broker.store.read("SELECT COUNT(*) FROM revocations")[0][0] == rows == 1


def test_regression_beat_takeover_and_shared_crontab(tmp_path):
    every_minute = crontab()
    berlin = Celery("berlin", broker=f"memory://{tmp_path}b", set_as_current=False, timezone="Europe/Berlin")
    york = Celery("york", broker=f"memory://{tmp_path}b", set_as_current=False, timezone="America/New_York")
    for app_ in (berlin, york):
        app_.conf.beat_schedule = {"tick": {"task": "x.tick", "schedule": every_minute}}
    state = str(tmp_path / "state.json")
    start = dt.datetime(2026, 3, 1, 12, 0, 30, tzinfo=dt.timezone.utc)
    first, second = Beat(berlin, schedule_filename=state), Beat(york, schedule_filename=state)
    first.setup(now=start)
    second.setup(now=start)
    assert str(second.entries["tick"].schedule.tz) == "America/New_York" and every_minute.tz is None
    first.tick(start + dt.timedelta(seconds=40))  # leads, sends the 12:01 run
    assert second.tick(start + dt.timedelta(seconds=40)) > 0 and not second.leading
    berlin.broker.lease("beat", first.token, 0)  # the leader steps down
    second.tick(start + dt.timedelta(seconds=45))  # takes over: 12:01 was sent already
    assert berlin.broker.size("celery") == 1


# --- §11 Beat: schedules (expected run times computed once with real Celery 5.7) ---

UTC = dt.timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(text):
    """'2024-01-01 12:00[:30]' as an aware UTC datetime."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def next_runs(sched, start, n=5):
    """The next n runs after `start`, each found from the one before."""
    runs = []
    for _ in range(n):
        start = sched.next_run_after(start)
        runs.append(start)
    return runs


def utc_minutes(runs):
    return [r.astimezone(UTC).strftime("%Y-%m-%d %H:%M") for r in runs]


def walls(runs, tz):
    """Runs as wall-clock times with their offset: '2024-03-31T03:00+02:00'."""
    return [r.astimezone(tz).isoformat(timespec="minutes") for r in runs]


def simulate(sched, start, end, step=dt.timedelta(minutes=1)):
    """Drive `sched` as beat would from `start` (its last run) until `end`: tick a
    frozen clock, run when is_due() says so, and record the run as the last run."""
    runs, last_run = [], start
    with freeze_time(start) as clock:
        while minicelery.utcnow() < end:
            clock.tick(step)
            if sched.is_due(last_run).is_due:
                last_run = minicelery.utcnow()
                runs.append(last_run)
    return runs


def exists(wall, tz):
    """Whether the clocks in `tz` ever show the naive time `wall`."""
    aware = wall.replace(tzinfo=tz)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall


# -----------------------------------------------------------------------------
# The crontab examples table of Celery's periodic-tasks guide
# -----------------------------------------------------------------------------

DOCS_ROWS = {
    "crontab()": ((), {}),
    "crontab(minute=0, hour=0)": ((), dict(minute=0, hour=0)),
    "crontab(minute=0, hour='*/3')": ((), dict(minute=0, hour="*/3")),
    "crontab(minute=0, hour='0,3,6,9,12,15,18,21')":
        ((), dict(minute=0, hour="0,3,6,9,12,15,18,21")),
    "crontab(minute='*/15')": ((), dict(minute="*/15")),
    "crontab(day_of_week='sunday')": ((), dict(day_of_week="sunday")),
    "crontab(minute='*', hour='*', day_of_week='sun')":
        ((), dict(minute="*", hour="*", day_of_week="sun")),
    "crontab(minute='*/10', hour='3,17,22', day_of_week='thu,fri')":
        ((), dict(minute="*/10", hour="3,17,22", day_of_week="thu,fri")),
    "crontab(minute=0, hour='*/2,*/3')": ((), dict(minute=0, hour="*/2,*/3")),
    "crontab(minute=0, hour='*/5')": ((), dict(minute=0, hour="*/5")),
    "crontab(minute=0, hour='*/3,8-17')": ((), dict(minute=0, hour="*/3,8-17")),
    "crontab(0, 0, day_of_month='2')": ((0, 0), dict(day_of_month="2")),
    "crontab(0, 0, day_of_month='2-30/2')": ((0, 0), dict(day_of_month="2-30/2")),
    "crontab(0, 0, day_of_month='1-7,15-21')": ((0, 0), dict(day_of_month="1-7,15-21")),
    "crontab(0, 0, day_of_month='11', month_of_year='5')":
        ((0, 0), dict(day_of_month="11", month_of_year="5")),
    "crontab(0, 0, month_of_year='*/3')": ((0, 0), dict(month_of_year="*/3")),
}

#: Start instants (UTC): on a slot, the eve of a leap day (with seconds), a
#: Saturday night at the end of a year, and the day before the 11th of May.
DOCS_STARTS = ["2024-01-01 00:00:00", "2024-02-28 23:59:30",
               "2023-12-30 21:47:13", "2025-05-10 12:00:00"]

#: For each row, the next 5 runs after each of DOCS_STARTS, per Celery 5.7.
DOCS_TABLE = {
    'crontab()': (
        ['2024-01-01 00:01', '2024-01-01 00:02', '2024-01-01 00:03', '2024-01-01 00:04', '2024-01-01 00:05'],
        ['2024-02-29 00:00', '2024-02-29 00:01', '2024-02-29 00:02', '2024-02-29 00:03', '2024-02-29 00:04'],
        ['2023-12-30 21:48', '2023-12-30 21:49', '2023-12-30 21:50', '2023-12-30 21:51', '2023-12-30 21:52'],
        ['2025-05-10 12:01', '2025-05-10 12:02', '2025-05-10 12:03', '2025-05-10 12:04', '2025-05-10 12:05'],
    ),
    'crontab(minute=0, hour=0)': (
        ['2024-01-02 00:00', '2024-01-03 00:00', '2024-01-04 00:00', '2024-01-05 00:00', '2024-01-06 00:00'],
        ['2024-02-29 00:00', '2024-03-01 00:00', '2024-03-02 00:00', '2024-03-03 00:00', '2024-03-04 00:00'],
        ['2023-12-31 00:00', '2024-01-01 00:00', '2024-01-02 00:00', '2024-01-03 00:00', '2024-01-04 00:00'],
        ['2025-05-11 00:00', '2025-05-12 00:00', '2025-05-13 00:00', '2025-05-14 00:00', '2025-05-15 00:00'],
    ),
    "crontab(minute=0, hour='*/3')": (
        ['2024-01-01 03:00', '2024-01-01 06:00', '2024-01-01 09:00', '2024-01-01 12:00', '2024-01-01 15:00'],
        ['2024-02-29 00:00', '2024-02-29 03:00', '2024-02-29 06:00', '2024-02-29 09:00', '2024-02-29 12:00'],
        ['2023-12-31 00:00', '2023-12-31 03:00', '2023-12-31 06:00', '2023-12-31 09:00', '2023-12-31 12:00'],
        ['2025-05-10 15:00', '2025-05-10 18:00', '2025-05-10 21:00', '2025-05-11 00:00', '2025-05-11 03:00'],
    ),
    "crontab(minute=0, hour='0,3,6,9,12,15,18,21')": (
        ['2024-01-01 03:00', '2024-01-01 06:00', '2024-01-01 09:00', '2024-01-01 12:00', '2024-01-01 15:00'],
        ['2024-02-29 00:00', '2024-02-29 03:00', '2024-02-29 06:00', '2024-02-29 09:00', '2024-02-29 12:00'],
        ['2023-12-31 00:00', '2023-12-31 03:00', '2023-12-31 06:00', '2023-12-31 09:00', '2023-12-31 12:00'],
        ['2025-05-10 15:00', '2025-05-10 18:00', '2025-05-10 21:00', '2025-05-11 00:00', '2025-05-11 03:00'],
    ),
    "crontab(minute='*/15')": (
        ['2024-01-01 00:15', '2024-01-01 00:30', '2024-01-01 00:45', '2024-01-01 01:00', '2024-01-01 01:15'],
        ['2024-02-29 00:00', '2024-02-29 00:15', '2024-02-29 00:30', '2024-02-29 00:45', '2024-02-29 01:00'],
        ['2023-12-30 22:00', '2023-12-30 22:15', '2023-12-30 22:30', '2023-12-30 22:45', '2023-12-30 23:00'],
        ['2025-05-10 12:15', '2025-05-10 12:30', '2025-05-10 12:45', '2025-05-10 13:00', '2025-05-10 13:15'],
    ),
    "crontab(day_of_week='sunday')": (
        ['2024-01-07 00:00', '2024-01-07 00:01', '2024-01-07 00:02', '2024-01-07 00:03', '2024-01-07 00:04'],
        ['2024-03-03 00:00', '2024-03-03 00:01', '2024-03-03 00:02', '2024-03-03 00:03', '2024-03-03 00:04'],
        ['2023-12-31 00:00', '2023-12-31 00:01', '2023-12-31 00:02', '2023-12-31 00:03', '2023-12-31 00:04'],
        ['2025-05-11 00:00', '2025-05-11 00:01', '2025-05-11 00:02', '2025-05-11 00:03', '2025-05-11 00:04'],
    ),
    "crontab(minute='*', hour='*', day_of_week='sun')": (
        ['2024-01-07 00:00', '2024-01-07 00:01', '2024-01-07 00:02', '2024-01-07 00:03', '2024-01-07 00:04'],
        ['2024-03-03 00:00', '2024-03-03 00:01', '2024-03-03 00:02', '2024-03-03 00:03', '2024-03-03 00:04'],
        ['2023-12-31 00:00', '2023-12-31 00:01', '2023-12-31 00:02', '2023-12-31 00:03', '2023-12-31 00:04'],
        ['2025-05-11 00:00', '2025-05-11 00:01', '2025-05-11 00:02', '2025-05-11 00:03', '2025-05-11 00:04'],
    ),
    "crontab(minute='*/10', hour='3,17,22', day_of_week='thu,fri')": (
        ['2024-01-04 03:00', '2024-01-04 03:10', '2024-01-04 03:20', '2024-01-04 03:30', '2024-01-04 03:40'],
        ['2024-02-29 03:00', '2024-02-29 03:10', '2024-02-29 03:20', '2024-02-29 03:30', '2024-02-29 03:40'],
        ['2024-01-04 03:00', '2024-01-04 03:10', '2024-01-04 03:20', '2024-01-04 03:30', '2024-01-04 03:40'],
        ['2025-05-15 03:00', '2025-05-15 03:10', '2025-05-15 03:20', '2025-05-15 03:30', '2025-05-15 03:40'],
    ),
    "crontab(minute=0, hour='*/2,*/3')": (
        ['2024-01-01 02:00', '2024-01-01 03:00', '2024-01-01 04:00', '2024-01-01 06:00', '2024-01-01 08:00'],
        ['2024-02-29 00:00', '2024-02-29 02:00', '2024-02-29 03:00', '2024-02-29 04:00', '2024-02-29 06:00'],
        ['2023-12-30 22:00', '2023-12-31 00:00', '2023-12-31 02:00', '2023-12-31 03:00', '2023-12-31 04:00'],
        ['2025-05-10 14:00', '2025-05-10 15:00', '2025-05-10 16:00', '2025-05-10 18:00', '2025-05-10 20:00'],
    ),
    "crontab(minute=0, hour='*/5')": (
        ['2024-01-01 05:00', '2024-01-01 10:00', '2024-01-01 15:00', '2024-01-01 20:00', '2024-01-02 00:00'],
        ['2024-02-29 00:00', '2024-02-29 05:00', '2024-02-29 10:00', '2024-02-29 15:00', '2024-02-29 20:00'],
        ['2023-12-31 00:00', '2023-12-31 05:00', '2023-12-31 10:00', '2023-12-31 15:00', '2023-12-31 20:00'],
        ['2025-05-10 15:00', '2025-05-10 20:00', '2025-05-11 00:00', '2025-05-11 05:00', '2025-05-11 10:00'],
    ),
    "crontab(minute=0, hour='*/3,8-17')": (
        ['2024-01-01 03:00', '2024-01-01 06:00', '2024-01-01 08:00', '2024-01-01 09:00', '2024-01-01 10:00'],
        ['2024-02-29 00:00', '2024-02-29 03:00', '2024-02-29 06:00', '2024-02-29 08:00', '2024-02-29 09:00'],
        ['2023-12-31 00:00', '2023-12-31 03:00', '2023-12-31 06:00', '2023-12-31 08:00', '2023-12-31 09:00'],
        ['2025-05-10 13:00', '2025-05-10 14:00', '2025-05-10 15:00', '2025-05-10 16:00', '2025-05-10 17:00'],
    ),
    "crontab(0, 0, day_of_month='2')": (
        ['2024-01-02 00:00', '2024-02-02 00:00', '2024-03-02 00:00', '2024-04-02 00:00', '2024-05-02 00:00'],
        ['2024-03-02 00:00', '2024-04-02 00:00', '2024-05-02 00:00', '2024-06-02 00:00', '2024-07-02 00:00'],
        ['2024-01-02 00:00', '2024-02-02 00:00', '2024-03-02 00:00', '2024-04-02 00:00', '2024-05-02 00:00'],
        ['2025-06-02 00:00', '2025-07-02 00:00', '2025-08-02 00:00', '2025-09-02 00:00', '2025-10-02 00:00'],
    ),
    "crontab(0, 0, day_of_month='2-30/2')": (
        ['2024-01-02 00:00', '2024-01-04 00:00', '2024-01-06 00:00', '2024-01-08 00:00', '2024-01-10 00:00'],
        ['2024-03-02 00:00', '2024-03-04 00:00', '2024-03-06 00:00', '2024-03-08 00:00', '2024-03-10 00:00'],
        ['2024-01-02 00:00', '2024-01-04 00:00', '2024-01-06 00:00', '2024-01-08 00:00', '2024-01-10 00:00'],
        ['2025-05-12 00:00', '2025-05-14 00:00', '2025-05-16 00:00', '2025-05-18 00:00', '2025-05-20 00:00'],
    ),
    "crontab(0, 0, day_of_month='1-7,15-21')": (
        ['2024-01-02 00:00', '2024-01-03 00:00', '2024-01-04 00:00', '2024-01-05 00:00', '2024-01-06 00:00'],
        ['2024-03-01 00:00', '2024-03-02 00:00', '2024-03-03 00:00', '2024-03-04 00:00', '2024-03-05 00:00'],
        ['2024-01-01 00:00', '2024-01-02 00:00', '2024-01-03 00:00', '2024-01-04 00:00', '2024-01-05 00:00'],
        ['2025-05-15 00:00', '2025-05-16 00:00', '2025-05-17 00:00', '2025-05-18 00:00', '2025-05-19 00:00'],
    ),
    "crontab(0, 0, day_of_month='11', month_of_year='5')": (
        ['2024-05-11 00:00', '2025-05-11 00:00', '2026-05-11 00:00', '2027-05-11 00:00', '2028-05-11 00:00'],
        ['2024-05-11 00:00', '2025-05-11 00:00', '2026-05-11 00:00', '2027-05-11 00:00', '2028-05-11 00:00'],
        ['2024-05-11 00:00', '2025-05-11 00:00', '2026-05-11 00:00', '2027-05-11 00:00', '2028-05-11 00:00'],
        ['2025-05-11 00:00', '2026-05-11 00:00', '2027-05-11 00:00', '2028-05-11 00:00', '2029-05-11 00:00'],
    ),
    "crontab(0, 0, month_of_year='*/3')": (
        ['2024-01-02 00:00', '2024-01-03 00:00', '2024-01-04 00:00', '2024-01-05 00:00', '2024-01-06 00:00'],
        ['2024-04-01 00:00', '2024-04-02 00:00', '2024-04-03 00:00', '2024-04-04 00:00', '2024-04-05 00:00'],
        ['2024-01-01 00:00', '2024-01-02 00:00', '2024-01-03 00:00', '2024-01-04 00:00', '2024-01-05 00:00'],
        ['2025-07-01 00:00', '2025-07-02 00:00', '2025-07-03 00:00', '2025-07-04 00:00', '2025-07-05 00:00'],
    ),
}


@pytest.mark.parametrize("row", DOCS_ROWS)
@pytest.mark.parametrize("start_index", range(len(DOCS_STARTS)))
def test_beat_docs_table_matches_celery(row, start_index):
    args, kwargs = DOCS_ROWS[row]
    start = utc(DOCS_STARTS[start_index])
    expected = DOCS_TABLE[row][start_index]
    assert utc_minutes(next_runs(crontab(*args, **kwargs), start)) == expected


@pytest.mark.parametrize("row", DOCS_ROWS)
def test_beat_docs_table_through_is_due(row):
    """The same runs come out of beat's view: is_due() with a frozen clock."""
    args, kwargs = DOCS_ROWS[row]
    start = utc(DOCS_STARTS[0])
    first, second = (utc(t) for t in DOCS_TABLE[row][0][:2])
    sched = crontab(*args, **kwargs)
    assert sched.remaining_estimate(start, now=start) == first - start
    with freeze_time(first - dt.timedelta(seconds=1)):
        assert sched.is_due(start) == (False, 1.0)
    with freeze_time(first):
        assert sched.is_due(start) == (True, (second - first).total_seconds())


def test_beat_both_day_fields_must_match():
    """Celery ANDs day_of_week and day_of_month (cron(5) would OR them)."""
    first_mondays = crontab(0, 0, day_of_week="mon", day_of_month="1-7")
    assert utc_minutes(next_runs(first_mondays, utc("2024-01-01 12:00"))) == [
        "2024-02-05 00:00", "2024-03-04 00:00", "2024-04-01 00:00",
        "2024-05-06 00:00", "2024-06-03 00:00"]
    friday_13th = crontab(0, 0, day_of_week="fri", day_of_month=13)
    assert utc_minutes(next_runs(friday_13th, utc("2024-01-01 12:00"), 4)) == [
        "2024-09-13 00:00", "2024-12-13 00:00", "2025-06-13 00:00", "2026-02-13 00:00"]


# -----------------------------------------------------------------------------
# Month ends and leap days (expected values agree with Celery 5.7)
# -----------------------------------------------------------------------------

def test_beat_31st_skips_30_day_months():
    assert utc_minutes(next_runs(crontab(0, 0, day_of_month=31), utc("2024-04-01 00:00"))) == [
        "2024-05-31 00:00", "2024-07-31 00:00", "2024-08-31 00:00",
        "2024-10-31 00:00", "2024-12-31 00:00"]
    in_q2 = crontab(0, 0, day_of_month=31, month_of_year="4,5,6")
    assert utc_minutes(next_runs(in_q2, utc("2024-01-01 00:00"), 3)) == [
        "2024-05-31 00:00", "2025-05-31 00:00", "2026-05-31 00:00"]


@pytest.mark.parametrize("start, expected", [
    ("2023-01-30 12:00", ["2023-01-31", "2023-03-29", "2023-03-30", "2023-03-31",
                          "2023-04-29", "2023-04-30"]),
    ("2024-01-30 12:00", ["2024-01-31", "2024-02-29", "2024-03-29", "2024-03-30",
                          "2024-03-31", "2024-04-29"]),
], ids=["non-leap", "leap"])
def test_beat_late_days_in_february(start, expected):
    runs = next_runs(crontab(0, 0, day_of_month="29-31"), utc(start), 6)
    assert [r.strftime("%Y-%m-%d") for r in runs] == expected


def test_beat_feb_29_only_in_leap_years():
    leap_day = crontab(0, 0, day_of_month=29, month_of_year=2)
    assert utc_minutes(next_runs(leap_day, utc("2023-01-01 00:00"))) == [
        "2024-02-29 00:00", "2028-02-29 00:00", "2032-02-29 00:00",
        "2036-02-29 00:00", "2040-02-29 00:00"]
    # 2100 is not a leap year.
    assert utc_minutes(next_runs(leap_day, utc("2097-01-01 00:00"), 2)) == [
        "2104-02-29 00:00", "2108-02-29 00:00"]
    on_a_monday = crontab(0, 0, day_of_week="mon", day_of_month=29, month_of_year=2)
    assert utc_minutes(next_runs(on_a_monday, utc("2024-03-01 00:00"), 2)) == [
        "2044-02-29 00:00", "2072-02-29 00:00"]


def test_beat_feb_28_and_29():
    end_of_feb = crontab(30, 12, day_of_month="28-29", month_of_year="feb")
    assert utc_minutes(next_runs(end_of_feb, utc("2023-02-27 00:00"), 4)) == [
        "2023-02-28 12:30", "2024-02-28 12:30", "2024-02-29 12:30", "2025-02-28 12:30"]


# -----------------------------------------------------------------------------
# Daylight saving time: every named wall-clock time runs exactly once
# -----------------------------------------------------------------------------
# Berlin 2024: clocks jump 02:00 -> 03:00 on 31 March, fall 03:00 -> 02:00 on 27 October.
# New York 2024: 02:00 -> 03:00 on 10 March, 02:00 -> 01:00 on 3 November.

DST_CASES = {
    "berlin-spring-daily-0230": (BERLIN, dict(minute=30, hour=2), "2024-03-30 12:00", [
        "2024-03-31T03:00+02:00",   # 02:30 doesn't exist: the first instant after the gap
        "2024-04-01T02:30+02:00"]),
    "berlin-fall-daily-0230": (BERLIN, dict(minute=30, hour=2), "2024-10-26 12:00", [
        "2024-10-27T02:30+02:00",   # the first 02:30 only, not the one an hour later
        "2024-10-28T02:30+01:00"]),
    "new-york-spring-daily-0230": (NEW_YORK, dict(minute=30, hour=2), "2024-03-09 12:00", [
        "2024-03-10T03:00-04:00",
        "2024-03-11T02:30-04:00"]),
    "new-york-fall-daily-0230": (NEW_YORK, dict(minute=30, hour=2), "2024-11-02 12:00", [
        "2024-11-03T02:30-05:00",   # 02:30 happens once in New York
        "2024-11-04T02:30-05:00"]),
    "new-york-fall-daily-0130": (NEW_YORK, dict(minute=30, hour=1), "2024-11-02 12:00", [
        "2024-11-03T01:30-04:00",   # 01:30 happens twice: the first one
        "2024-11-04T01:30-05:00"]),
    "berlin-spring-hourly-30": (BERLIN, dict(minute=30), "2024-03-30 22:00", [
        "2024-03-30T23:30+01:00", "2024-03-31T00:30+01:00", "2024-03-31T01:30+01:00",
        "2024-03-31T03:00+02:00",   # the skipped 02:30
        "2024-03-31T03:30+02:00", "2024-03-31T04:30+02:00"]),
    "berlin-spring-hourly-00": (BERLIN, dict(minute=0), "2024-03-30 21:30", [
        "2024-03-30T23:00+01:00", "2024-03-31T00:00+01:00", "2024-03-31T01:00+01:00",
        "2024-03-31T03:00+02:00",   # the skipped 02:00 and the real 03:00: one run
        "2024-03-31T04:00+02:00"]),
    "berlin-fall-hourly-30": (BERLIN, dict(minute=30), "2024-10-26 22:00", [
        "2024-10-27T00:30+02:00", "2024-10-27T01:30+02:00", "2024-10-27T02:30+02:00",
        "2024-10-27T03:30+01:00",   # not 02:30+01:00 again
        "2024-10-27T04:30+01:00"]),
    "new-york-spring-hourly-30": (NEW_YORK, dict(minute=30), "2024-03-10 05:00", [
        "2024-03-10T00:30-05:00", "2024-03-10T01:30-05:00", "2024-03-10T03:00-04:00",
        "2024-03-10T03:30-04:00", "2024-03-10T04:30-04:00"]),
    "new-york-fall-hourly-30": (NEW_YORK, dict(minute=30), "2024-11-03 04:00", [
        "2024-11-03T00:30-04:00", "2024-11-03T01:30-04:00",
        "2024-11-03T02:30-05:00",   # not 01:30-05:00 again
        "2024-11-03T03:30-05:00"]),
}


@pytest.mark.parametrize("case", DST_CASES)
def test_beat_dst_next_run_after(case):
    tz, fields, start, expected = DST_CASES[case]
    runs = next_runs(crontab(**fields, tz=tz), utc(start), len(expected))
    assert walls(runs, tz) == expected


@pytest.mark.parametrize("case", DST_CASES)
def test_beat_dst_as_beat_sees_it(case):
    """Beat ticking every minute runs each expected time once and nothing else."""
    tz, fields, start, expected = DST_CASES[case]
    end = dt.datetime.fromisoformat(expected[-1]) + dt.timedelta(seconds=30)
    runs = simulate(crontab(**fields, tz=tz), utc(start), end)
    assert walls(runs, tz) == expected


@pytest.mark.parametrize("tz", [BERLIN, NEW_YORK], ids=["berlin", "new-york"])
@pytest.mark.parametrize("day", ["spring", "fall"])
def test_beat_dst_hourly_no_double_no_skip(tz, day):
    """Over a DST day, an hourly job runs once at each wall-clock :15 that exists,
    never twice at the same one; on the spring day the skipped 02:15 runs at 03:00."""
    date = {(BERLIN, "spring"): "2024-03-31", (BERLIN, "fall"): "2024-10-27",
            (NEW_YORK, "spring"): "2024-03-10", (NEW_YORK, "fall"): "2024-11-03"}[tz, day]
    midnight = dt.datetime.fromisoformat(date).replace(tzinfo=tz)
    next_midnight = (midnight + dt.timedelta(days=1)).replace(tzinfo=tz)
    runs = simulate(crontab(minute=15, tz=tz), midnight.astimezone(UTC), next_midnight)
    minutes = [r.astimezone(tz).strftime("%H:%M") for r in runs]
    existing = {f"{h:02}:15" for h in range(24)
                if exists(midnight.replace(tzinfo=None, hour=h, minute=15), tz)}
    assert len(minutes) == len(set(minutes))     # no wall-clock minute twice
    assert existing <= set(minutes)              # no existing one skipped
    if day == "spring":
        assert len(existing) == 23 and set(minutes) - existing == {"03:00"}
    else:
        assert len(existing) == 24 and set(minutes) == existing


def test_beat_last_run_in_the_repeated_hour():
    """A last run during the second 02:xx of the fall-back night is later than the
    first 02:30, so the next run is 03:30, not 02:30 again."""
    second_0210 = dt.datetime(2024, 10, 27, 2, 10, tzinfo=BERLIN, fold=1)
    run = crontab(minute=30, tz=BERLIN).next_run_after(second_0210)
    assert walls([run], BERLIN) == ["2024-10-27T03:30+01:00"]
    first_0210 = second_0210.replace(fold=0)
    run = crontab(minute=30, tz=BERLIN).next_run_after(first_0210)
    assert walls([run], BERLIN) == ["2024-10-27T02:30+02:00"]


def test_beat_inputs_in_any_zone_or_naive():
    sched = crontab(minute=0, hour=9, tz=BERLIN)
    naive = dt.datetime(2024, 6, 1, 12, 0)                  # naive is UTC
    in_tokyo = naive.replace(tzinfo=UTC).astimezone(ZoneInfo("Asia/Tokyo"))
    expected = ["2024-06-02T09:00+02:00"]
    assert walls([sched.next_run_after(naive)], BERLIN) == expected
    assert walls([sched.next_run_after(in_tokyo)], BERLIN) == expected
    assert sched.remaining_estimate(naive, now=naive) == dt.timedelta(hours=19)


# -----------------------------------------------------------------------------
# Parsing
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, spec, expected", [
    ("minute", "*/15", {0, 15, 30, 45}),
    ("minute", "1,13,30-45,50-59/2", {1, 13, *range(30, 46), 50, 52, 54, 56, 58}),
    ("minute", "0-59/20", {0, 20, 40}),
    ("minute", " 5 , 10 ", {5, 10}),
    ("minute", {0, 30}, {0, 30}),
    ("minute", range(0, 60, 20), {0, 20, 40}),
    ("minute", 7, {7}),
    ("hour", "0,8-17/2", {0, 8, 10, 12, 14, 16}),
    ("hour", "*/3,8-17", {0, 3, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 21}),
    ("hour", "*/2,*/3", set(range(24)) - {1, 5, 7, 11, 13, 17, 19, 23}),
    ("hour", "22-2", {22, 23, 0, 1, 2}),
    ("hour", [8, 17], {8, 17}),
    ("day_of_week", "mon-fri", {1, 2, 3, 4, 5}),
    ("day_of_week", "sunday", {0}),
    ("day_of_week", "SUN", {0}),
    ("day_of_week", "Thursday,fri", {4, 5}),
    ("day_of_week", "fri-mon", {5, 6, 0, 1}),
    ("day_of_week", "sat-sun", {6, 0}),
    ("day_of_week", "*/2", {0, 2, 4, 6}),
    ("day_of_week", "mon-fri/2", {1, 3, 5}),
    ("day_of_week", 7, {0}),
    ("day_of_week", "7", {0}),
    ("day_of_week", "5-7", {5, 6, 0}),
    ("day_of_week", "0-7", set(range(7))),
    ("day_of_week", {0, 6}, {0, 6}),
    ("day_of_month", "2-30/2", set(range(2, 31, 2))),
    ("day_of_month", "*/3", {1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31}),
    ("day_of_month", "1-7,15-21", {*range(1, 8), *range(15, 22)}),
    ("month_of_year", "*/3", {1, 4, 7, 10}),
    ("month_of_year", "2-12/2", {2, 4, 6, 8, 10, 12}),
    ("month_of_year", "jan", {1}),
    ("month_of_year", "January,MAR-may", {1, 3, 4, 5}),
    ("month_of_year", "nov-feb", {11, 12, 1, 2}),
    ("month_of_year", None, set(range(1, 13))),
])
def test_beat_field_syntax(field, spec, expected):
    assert getattr(crontab(**{field: spec}), field) == expected


def test_beat_defaults_are_every_minute():
    every = crontab()
    assert every.minute == set(range(60)) and every.hour == set(range(24))
    assert every.day_of_week == set(range(7)) and every.day_of_month == set(range(1, 32))
    assert every.month_of_year == set(range(1, 13)) and every.tz is None  # beat: the app's zone


@pytest.mark.parametrize("kwargs, message", [
    (dict(minute="60"), "crontab minute '60' is out of range 0-59"),
    (dict(minute="1-70"), "crontab minute '1-70': 70 is out of range 0-59"),
    (dict(minute="*/0"), "crontab minute '*/0': the step in '*/0' must be 1 or more"),
    (dict(minute="1-5/"), "crontab minute '1-5/'"),
    (dict(minute="5/15"), "crontab minute '5/15'"),
    (dict(minute="-1"), "crontab minute '-1'"),
    (dict(minute="1,,2"), "crontab minute '1,,2'"),
    (dict(minute=""), "crontab minute ''"),
    (dict(minute=1.5), "crontab minute 1.5 is not an int"),
    (dict(minute=["1"]), "crontab minute ['1'] is not an int"),
    (dict(minute=[]), "crontab minute [] matches nothing"),
    (dict(minute=[0, 60]), "crontab minute [0, 60]: 60 is out of range 0-59"),
    (dict(hour="25"), "crontab hour '25' is out of range 0-23"),
    (dict(hour=24), "crontab hour 24 is out of range 0-23"),
    (dict(hour="22-25"), "crontab hour '22-25': 25 is out of range 0-23"),
    (dict(hour="mon"), "crontab hour 'mon': 'mon' is not a number"),
    (dict(day_of_week="funday"), "crontab day_of_week 'funday': 'funday' is not a number "
                                 "or one of sun, mon, tue, wed, thu, fri, sat"),
    (dict(day_of_week=8), "crontab day_of_week 8 is out of range 0-7"),
    (dict(day_of_week="mon-8"), "crontab day_of_week 'mon-8': 8 is out of range 0-7"),
    (dict(day_of_week="jan"), "crontab day_of_week 'jan': 'jan' is not a number"),
    (dict(day_of_month="0"), "crontab day_of_month '0' is out of range 1-31"),
    (dict(day_of_month="32"), "crontab day_of_month '32' is out of range 1-31"),
    (dict(day_of_month="L"), "crontab day_of_month 'L': 'L' is not a number"),
    (dict(month_of_year="13"), "crontab month_of_year '13' is out of range 1-12"),
    (dict(month_of_year="0"), "crontab month_of_year '0' is out of range 1-12"),
    (dict(month_of_year="foo"), "crontab month_of_year 'foo': 'foo' is not a number "
                                "or one of jan, feb"),
    (dict(day_of_month=30, month_of_year=2),
     "crontab day_of_month 30 never occurs in month_of_year 2"),
    (dict(day_of_month=31, month_of_year="apr,jun,sep,nov"),
     "crontab day_of_month 31 never occurs in month_of_year 'apr,jun,sep,nov'"),
    (dict(tz="Europe/Berlin"), "crontab tz must be a tzinfo such as zoneinfo.ZoneInfo"),
])
def test_beat_invalid_expressions_name_the_field_and_value(kwargs, message):
    with pytest.raises(ImproperlyConfigured) as error:
        crontab(**kwargs)
    assert str(error.value).startswith(message)


def test_beat_from_string_uses_cron_field_order():
    assert crontab.from_string("*/15 8-17 1 jan-mar mon-fri") == crontab(
        minute="*/15", hour="8-17", day_of_month=1, month_of_year="1-3", day_of_week="1-5")
    with pytest.raises(ImproperlyConfigured, match="has 4 fields, not 5"):
        crontab.from_string("* * * *")


def test_beat_equality_and_repr():
    assert crontab(minute="0,30") == crontab(minute=[30, 0])
    assert crontab(day_of_week=7) == crontab(day_of_week="sun")
    assert crontab(minute=0) != crontab(minute=0, tz=BERLIN)
    assert repr(crontab(0, "*/3", tz=BERLIN)) == "<crontab: 0 */3 * * * (m/h/dM/MY/d) Europe/Berlin>"
    assert schedule(30) == schedule(dt.timedelta(seconds=30))
    assert repr(schedule(1.5)) == "<freq: 1.5 seconds>"


# -----------------------------------------------------------------------------
# is_due and remaining_estimate
# -----------------------------------------------------------------------------

@freeze_time("2024-01-01 12:00:00")
def test_beat_interval_is_due_and_remaining():
    every_30s = schedule(30)
    now = utc("2024-01-01 12:00:00")
    assert every_30s.seconds == 30
    assert every_30s.remaining_estimate(now - dt.timedelta(seconds=10)) == dt.timedelta(seconds=20)
    state = every_30s.is_due(now - dt.timedelta(seconds=10))
    assert state == (False, 20.0) and state.is_due is False and state.next == 20.0
    assert every_30s.is_due(now - dt.timedelta(seconds=30)) == (True, 30.0)
    assert every_30s.is_due(now - dt.timedelta(seconds=45)) == (True, 30.0)
    # naive last_run_at is UTC; an explicit now wins over the clock
    assert every_30s.is_due(dt.datetime(2024, 1, 1, 11, 59, 50)) == (False, 20.0)
    assert every_30s.is_due(now, now=now + dt.timedelta(seconds=31)) == (True, 30.0)


def test_beat_interval_with_a_ticking_clock():
    every_5m = schedule(dt.timedelta(minutes=5))
    assert every_5m.seconds == 300
    with freeze_time("2024-01-01 12:00:00") as clock:
        last_run = minicelery.utcnow()
        clock.tick(299)
        assert every_5m.is_due(last_run) == (False, 1.0)
        clock.tick(1)
        assert every_5m.is_due(last_run) == (True, 300.0)


def test_beat_interval_is_elapsed_time_across_dst():
    """A 1-hour interval on Berlin's 23-hour spring-forward day runs 23 times."""
    start = dt.datetime(2024, 3, 31, tzinfo=BERLIN).astimezone(UTC)
    runs = simulate(schedule(3600), start, start + dt.timedelta(hours=23))
    assert len(runs) == 23
    assert {b - a for a, b in zip(runs, runs[1:])} == {dt.timedelta(hours=1)}


@pytest.mark.parametrize("run_every", ["30", None, True, [30]])
def test_beat_interval_rejects_other_values(run_every):
    with pytest.raises(ImproperlyConfigured, match="schedule run_every must be seconds or a timedelta"):
        schedule(run_every)


def test_beat_interval_missed_many_slots_is_due_once():
    every_30s = schedule(30)
    with freeze_time("2024-01-05 12:00:00"):
        last_run = utc("2024-01-01 00:00:00")      # thousands of slots ago
        assert every_30s.is_due(last_run) == (True, 30.0)
        last_run = minicelery.utcnow()              # beat ran it and recorded now
        assert every_30s.is_due(last_run) == (False, 30.0)


def test_beat_crontab_missed_many_slots_is_due_once():
    quarter_hours = crontab(minute="*/15")
    with freeze_time("2024-01-05 10:07:30"):
        last_run = utc("2024-01-02 10:00:00")      # ~300 runs missed
        assert quarter_hours.remaining_estimate(last_run) < dt.timedelta(days=-2)
        assert quarter_hours.is_due(last_run) == (True, 450.0)   # next: 10:15
        assert quarter_hours.is_due(minicelery.utcnow()) == (False, 450.0)


def test_beat_crontab_missed_runs_as_beat_sees_it():
    """Beat down for a day, then ticking: one catch-up run, then back on schedule."""
    daily = crontab(minute=0, hour=6)
    runs, last_run = [], utc("2024-01-01 06:00")
    with freeze_time("2024-01-03 12:00:00") as clock:
        for _ in range(24 * 60):
            if daily.is_due(last_run).is_due:
                last_run = minicelery.utcnow()
                runs.append(last_run)
            clock.tick(60)
    assert utc_minutes(runs) == ["2024-01-03 12:00", "2024-01-04 06:00"]


def test_beat_crontab_is_due_next_is_seconds_to_the_run_after_now():
    hourly = crontab(minute=0)
    last = utc("2024-01-01 09:00")
    assert hourly.is_due(last, now=utc("2024-01-01 09:59:00")) == (False, 60.0)
    assert hourly.is_due(last, now=utc("2024-01-01 10:00:00")) == (True, 3600.0)
    assert hourly.is_due(last, now=utc("2024-01-01 10:20:30")) == (True, 2370.0)


def test_beat_next_run_after_is_strictly_after():
    every_minute = crontab()
    assert every_minute.next_run_after(utc("2024-01-01 10:00:00")) == utc("2024-01-01 10:01")
    assert every_minute.next_run_after(utc("2024-01-01 09:59:59.999")) == utc("2024-01-01 10:00")


@pytest.mark.parametrize("fields", [
    dict(minute="*/7", hour="*/5", day_of_week="mon-wed,sat"),
    dict(minute="13,47", hour="22-2", day_of_month="1-3,28-31"),
    dict(minute=59, hour=23, day_of_week="sun", day_of_month="*/2"),
])
def test_beat_agrees_with_a_brute_force_minute_scan(fields):
    """Every minute of 9 days, checked by hand against the fields."""
    sched = crontab(**fields)
    t, expected = utc("2024-02-25 00:00"), []
    while t < utc("2024-03-05 00:00"):
        if (t.minute in sched.minute and t.hour in sched.hour
                and t.isoweekday() % 7 in sched.day_of_week
                and t.day in sched.day_of_month and t.month in sched.month_of_year):
            expected.append(t)
        t += dt.timedelta(minutes=1)
    assert next_runs(sched, utc("2024-02-24 23:59:59"), len(expected)) == expected


# -----------------------------------------------------------------------------
# maybe_schedule
# -----------------------------------------------------------------------------

def test_beat_maybe_schedule():
    assert maybe_schedule(10) == schedule(10)
    assert maybe_schedule(0.5).seconds == 0.5
    assert maybe_schedule(dt.timedelta(hours=1)).seconds == 3600
    cron, every = crontab(minute=0), schedule(5)
    assert maybe_schedule(cron) is cron and maybe_schedule(every) is every

    class Sunrise:
        def is_due(self, last_run_at, now=None):
            return minicelery.schedstate(False, 60.0)

    own = Sunrise()
    assert maybe_schedule(own) is own


@pytest.mark.parametrize("value", ["*/5 * * * *", None, True, {"minute": 0}])
def test_beat_maybe_schedule_rejects_other_values(value):
    with pytest.raises(ImproperlyConfigured, match="a beat schedule must be seconds, a timedelta"):
        maybe_schedule(value)


# --- §11 Beat: running ---------------------------------------------------------

def stamps(path):
    return [float(line) for line in open(path)] if os.path.exists(path) else []


@contextlib.contextmanager
def beat_process(app, tmp_path, name="beat", **options):
    """`Beat(app, **options).run()` in a forked process, logging to a file."""
    log_path = tmp_path / f"{name}.log"
    log_path.touch()
    pid_ = os.fork()
    if pid_ == 0:
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
            app.after_fork()
            minicelery.configure_logging("INFO")
            Beat(app, **options).run()
            code = 0
        finally:
            os._exit(code)
    handle = WorkerProcess(pid_, log_path)
    try:
        yield handle
    finally:
        handle.stop()


def test_beat_tick_sends_due_entries_and_resumes(tmp_path):
    app_ = Celery("beaty", broker=f"memory://{tmp_path}", set_as_current=False)
    ping = app_.task(name="beaty.ping")(lambda x: x)
    calls = []

    @app_.on_after_configure.connect
    def setup_periodic_tasks(sender, **kwargs):
        calls.append("configure")
        sender.add_periodic_task(10.0, ping.s("hi"), name="ping every 10s", expires=10)

    @app_.on_after_finalize.connect
    def finalized(sender, **kwargs):
        calls.append("finalize")

    app_.conf.beat_schedule = {"daily": {"task": "beaty.ping", "schedule": crontab(minute=0, hour=7),
                                         "args": (1,)}}
    state = str(tmp_path / "state.json")
    start = dt.datetime(2026, 3, 1, 6, 59, 55, tzinfo=dt.timezone.utc)
    beat = Beat(app_, schedule_filename=state, lease_ttl=30)  # renewing every 10 s
    beat.setup(now=start)
    assert calls == ["configure", "finalize"]
    assert beat.tick(start) == pytest.approx(5.0)  # the 07:00 run is next
    assert app_.broker.size("celery") == 0
    beat.tick(start + dt.timedelta(seconds=10))  # both due
    assert app_.broker.size("celery") == 2
    entry = beat.entries["ping every 10s"]
    [delivery] = [d for d in take(app_.broker, ["celery"], 2)
                  if minicelery.decode_message(d.raw).headers["expires"]]
    assert entry.total_run_count == 1 and entry.options == {"expires": 10}
    # A restart an hour later: each overdue entry runs once, not once per missed slot.
    restarted = Beat(app_, schedule_filename=state)
    restarted.token = beat.token  # the same lease holder, as after a quick restart
    restarted.setup(now=start + dt.timedelta(hours=1))
    assert restarted.entries["daily"].last_run_at == start + dt.timedelta(seconds=5)  # when it was due
    restarted.tick(start + dt.timedelta(days=1, seconds=30))
    assert app_.broker.size("celery") == 2
    assert json.load(open(state))["entries"]["daily"]["total_run_count"] == 2


def test_beat_bad_entries_are_clear_errors(tmp_path):
    app_ = Celery("beaty", broker=f"memory://{tmp_path}", set_as_current=False)
    app_.conf.beat_schedule = {"broken": {"task": "x", "schedule": "every minute"}}
    with pytest.raises(ImproperlyConfigured, match="a beat schedule must be seconds"):
        Beat(app_, schedule_filename=str(tmp_path / "s.json")).setup()
    app_.conf.beat_schedule = {"no-task": {"schedule": 5}}
    with pytest.raises(ImproperlyConfigured, match="'no-task' needs 'task' and 'schedule'"):
        Beat(app_, schedule_filename=str(tmp_path / "s.json")).setup()


def test_beat_every_second_on_time_and_restart_without_duplicates(app, tmp_path):
    out = str(tmp_path / "stamps")
    app.conf.beat_schedule = {"stamp": {"task": "test_minicelery.stamp", "schedule": 1.0, "args": (out,)}}
    state = str(tmp_path / "beat-state.json")
    with worker(app, tmp_path):
        with beat_process(app, tmp_path, schedule_filename=state, lease_ttl=2) as beat:
            wait_until(lambda: len(stamps(out)) >= 4, what="four runs")
            beat.wait_for_log("beat: leading")
        first = len(stamps(out))
        with beat_process(app, tmp_path, name="beat2", schedule_filename=state, lease_ttl=2):
            wait_until(lambda: len(stamps(out)) >= first + 3, what="three more runs")
    runs = stamps(out)
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert all(0.6 < gap < 1.6 for gap in gaps), gaps  # on time, and no duplicate after the restart


def test_beat_second_beat_stands_by_until_the_leader_dies(app, tmp_path):
    out = str(tmp_path / "stamps")
    app.conf.beat_schedule = {"stamp": {"task": "test_minicelery.stamp", "schedule": 1.0, "args": (out,)}}
    with worker(app, tmp_path):
        with beat_process(app, tmp_path, name="leader", schedule_filename=str(tmp_path / "a.json"),
                          lease_ttl=2) as leader:
            leader.wait_for_log("beat: leading")
            with beat_process(app, tmp_path, name="standby", schedule_filename=str(tmp_path / "b.json"),
                              lease_ttl=2) as standby:
                standby.wait_for_log("standing by")
                before = len(stamps(out))
                wait_until(lambda: len(stamps(out)) >= before + 3, what="runs while both are up")
                assert "Sending due task" not in standby.log()
                leader.stop(signal.SIGKILL)
                standby.wait_for_log("beat: leading", timeout=10)
                taken_over = len(stamps(out))
                wait_until(lambda: len(stamps(out)) >= taken_over + 2, what="runs after the takeover")
    runs = stamps(out)
    assert all(b - a > 0.6 for a, b in zip(runs, runs[1:]))  # never two beats sending


# --- §10 Command line ------------------------------------------------------------

def _cli(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "minicelery", *args], cwd=HERE,
                            env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.parametrize("argv", [["worker", "test_minicelery", "-l", "info", "-c", "1"],
                                  ["-A", "test_minicelery", "worker", "--loglevel=info", "-P", "solo"],
                                  ["-A", "test_minicelery", "worker", "-l", "debug", "-c", "1"]])
def test_cli_worker_runs_tasks(app, redis_server, argv):
    env = {"MINICELERY_BROKER_URL": app.conf.broker_url,
           "MINICELERY_RESULT_BACKEND": app.conf.result_backend}
    proc = _cli(*argv, env=env)
    try:
        assert add.delay(20, 22).get(timeout=20) == 42
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0]
    assert proc.returncode == 0, output
    assert "[tasks]" in output and ". test_minicelery.add" in output and "ready." in output
    debug = "debug" in argv  # (-l debug printed no debug lines): each task lent, each broker step
    assert ("DEBUG/MainProcess] TaskPool: Apply test_minicelery.add[" in output) == debug, output
    assert ("] explain take: " in output) == debug, output


@pytest.mark.skipif(os.geteuid() != 0, reason="the check is for a worker run as root")
def test_a_root_worker_that_accepts_pickle_refuses_to_start(tmp_path):
    """As Celery: any message could run any code, as root. C_FORCE_ROOT lets it start."""
    write_tree(tmp_path, {"rootproj.py": f"""
        from minicelery import Celery
        app = Celery("rootproj", broker="sqlite:///{tmp_path}/q.db", accept_content=["json", "pickle"])
        """})
    env = {k: v for k, v in project_env(tmp_path).items() if k != "C_FORCE_ROOT"}
    refused = run_cli(tmp_path, env, "-A", "rootproj", "worker", "-c", "1", timeout=60)
    assert refused.returncode == 1 and "superuser privileges when the worker accepts messages serialized " \
        "with pickle" in refused.stderr and "C_FORCE_ROOT" in refused.stderr, refused.stderr
    with cli_worker(tmp_path, dict(env, C_FORCE_ROOT="1"), "-A", "rootproj", "worker", "-c", "1") as forced:
        forced.wait_for_log("ready.")
    assert "superuser privileges: this is absolutely not recommended" in forced.log()


def test_cli_help_and_quiet_after_the_command(tmp_path):
    """`help` (Celery's `celery help`) needs no app; -q works after the command too
    (`status -q` printed a usage error)."""
    env = project_env(tmp_path)
    listed = run_cli(tmp_path, env, "help")
    assert listed.returncode == 0 and "doctor" in listed.stdout and "worker" in listed.stdout
    worker_help = run_cli(tmp_path, env, "help", "worker")
    assert worker_help.returncode == 0 and "--concurrency" in worker_help.stdout
    assert run_cli(tmp_path, env, "help", "nothing").returncode == 2
    env["MINICELERY_BROKER_URL"] = f"sqlite:///{tmp_path}/q.db"
    for argv in (["-q", "status"], ["status", "-q"]):
        quiet = run_cli(tmp_path, env, "-A", "test_minicelery", *argv, "-t", "0.2")
        assert quiet.returncode == 69 and quiet.stdout == "" and "usage" not in quiet.stderr, quiet


def test_cli_call_and_purge(app, redis_client):
    env = {"MINICELERY_BROKER_URL": app.conf.broker_url}
    call = _cli("-A", "test_minicelery", "call", "test_minicelery.add", "--args", "[1, 2]", env=env)
    task_id = call.communicate(timeout=20)[0].strip().splitlines()[-1]
    assert call.returncode == 0
    assert json.loads(redis_client.lindex("celery", 0))["headers"]["id"] == task_id
    purge = _cli("-A", "test_minicelery", "purge", "-f", env=env)
    assert "Purged 1 message(s)" in purge.communicate(timeout=20)[0]
    assert redis_client.llen("celery") == 0


def test_cli_bad_app_is_a_clear_error():
    proc = _cli("worker", "no_such_module_here")
    output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 1 and "can't import the app 'no_such_module_here'" in output


# --- Hostile input and faults: each promise kept when the input or the machine misbehaves ---

@APP.task
def exits(code):
    sys.exit(code)


@APP.task
def deep_result(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


class BadRepr(Exception):
    def __repr__(self):
        raise ValueError("no repr for you")

    __str__ = __repr__


@APP.task
def fail_with_bad_repr():
    raise BadRepr(object())


@APP.task(rate_limit="1/m")
def one_a_minute(i):
    return i


def _pidbox_broadcast(body_text):
    return json.dumps({"body": base64.b64encode(body_text.encode()).decode(), "content-encoding": "utf-8",
                       "content-type": "application/json", "headers": {"clock": 1},
                       "properties": {"delivery_mode": 2, "body_encoding": "base64",
                                      "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
                                      "delivery_tag": "x"}})


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_hostile_control_messages_never_stop_a_worker(kind, app, tmp_path, redis_client):
    if kind == "sqlite":
        app.conf.update(broker_url=f"sqlite:///{tmp_path}/b.db", result_backend=None)
        app.close()
    with pytest.raises(ValueError, match="unknown signal"):
        app.control.revoke("x", terminate=True, signal="SIGNOPE")
    with pytest.raises(TypeError, match="task_id"):
        app.control.revoke(12, terminate=True)
    with worker(app, tmp_path, concurrency=1) as w:
        if kind == "redis":
            wait_until(lambda: redis_client.pubsub_numsub("/0.celery.pidbox")[0][1], what="worker listening")
            bodies = [{"method": "revoke", "arguments": {"task_id": "a", "terminate": True, "signal": s}}
                      for s in ("term", "SIGNOPE", 12345, ["SIGTERM"])]
            bodies += [{"method": "revoke", "arguments": {"task_id": t}} for t in ({"a": 1}, 7, [1, 2])]
            bodies += [{"method": "revoke", "arguments": {"task_id": "a"}, "destination": d} for d in (3, "w")]
            bodies += [{"method": "revoke"}, ["not", "an", "object"]]
            for body in bodies:
                redis_client.publish("/0.celery.pidbox", _pidbox_broadcast(json.dumps(body)))
            for raw in ("not json", json.dumps({"body": "!!not base64"}), _pidbox_broadcast("x" * 2_000_000)):
                redis_client.publish("/0.celery.pidbox", raw)
            expected_errors = len(bodies) + 2  # "term" is fine: any case is accepted
        else:
            store = minicelery.SQLiteStore.for_url(app.conf.broker_url)
            bad_signal = {"method": "revoke", "arguments": {"task_id": "a", "terminate": True, "signal": "SIGNOPE"}}
            with store.transaction() as db:  # broadcasts another process (or version) wrote
                db.executemany("INSERT INTO broadcasts (time, raw) VALUES (?, ?)", [
                    (time.time(), _pidbox_broadcast(json.dumps(bad_signal))), (time.time(), "not json")])
            expected_errors = 2
        w.wait_for_log("Control command error", count=expected_errors)
        # Still consuming, and a good revoke still works.
        assert add.delay(1, 2).get(timeout=10) if app.conf.result_backend else True
        held = sleep_then.apply_async((30,), countdown=2)
        app.control.revoke(held.id)
        w.wait_for_log("Discarding revoked task")
        assert w.alive()


def test_hostile_headers_and_embeds_are_bad_messages_not_worker_errors(app, tmp_path, redis_client):
    def send_with(headers=None, embed=None, compression=None, body=None):
        result = add.delay(1, 2)
        raw = json.loads(redis_client.lpop("celery"))
        raw["headers"].update(headers or {})
        if embed is not None or body is not None:
            payload = body if body is not None else json.dumps([[1, 2], {}, embed]).encode()
            raw["body"] = base64.b64encode(payload).decode()
        if compression:
            raw["headers"]["compression"] = compression
        redis_client.lpush("celery", json.dumps(raw))
        return result
    app.conf.worker_max_message_size = 1_000_000
    bomb = zlib.compress(b"[" * 50_000_000)  # 50 MB of JSON from 50 KB of zlib
    bad = [send_with(headers={"timelimit": ["soon", None]}), send_with(headers={"timelimit": [-1, None]}),
           send_with(headers={"retries": "many"}), send_with(headers={"group_index": "x"}),
           send_with(embed={"chain": "not a list"}), send_with(embed={"callbacks": [1, 2]}),
           send_with(embed=["not", "an", "object"]), send_with(compression="application/x-gzip", body=bomb),
           send_with(embed={"chain": [{"task": "test_minicelery.add", "options": "zz"}]}),
           send_with(embed={"errbacks": [{"task": "test_minicelery.add", "args": 5}]}),
           send_with(embed={"chord": {"no": "task"}}),
           send_with(compression="application/x-snappy", body=b"...")]
    # nested: a chain step that is a chord with no proper header or body, a group whose tasks
    # aren't a list ("abc" sent tasks a, b and c), a chain step's own errbacks, a bool index
    step = {"task": "celery.chord", "subtask_type": "chord", "kwargs": {"header": 5, "body": dict(add.s())}}
    bad += [send_with(embed={"chain": [step]}), send_with(embed={"chain": [dict(step, kwargs={"header": []})]}),
            send_with(embed={"chain": [{"task": "celery.group", "subtask_type": "group", "kwargs": {"tasks": "abc"}}]}),
            send_with(embed={"chain": [dict(add.s(), options={"link_error": [{"task": 5}]})]}),
            send_with(headers={"group_index": True})]
    with worker(app, tmp_path) as w:
        assert add.delay(2, 2).get(timeout=10) == 4
        wait_until(lambda: all(r.ready() for r in bad), what="every bad message failed")
        assert all(isinstance(r.result, minicelery.DecodeError) for r in bad)
        assert "inflates to more than worker_max_message_size" in w.log()
        assert w.alive() and add.delay(3, 3).get(timeout=10) == 6
    assert redis_client.hlen("unacked") == 0
    assert len(app.broker.dead_letters()) == len(bad)


def test_hostile_broken_envelope_with_an_id_fails_its_task_and_forges_no_log_line(app, tmp_path, redis_client):
    """A message whose id can be read but whose properties or body are broken gets a FAILURE
    under that id (else get() waits for ever); an id holding a newline can't start a log line
    of its own. Both pools."""
    def send_broken(breaks):
        result = add.delay(1, 2)
        raw = json.loads(redis_client.lpop("celery"))
        breaks(raw)
        redis_client.lpush("celery", json.dumps(raw))
        return result

    forged = "[2026-01-01 00:00:00,000: INFO/MainProcess] FORGED"
    for pool in ("solo", "prefork"):
        broken = [send_broken(lambda raw: raw.update(properties="notadict")),
                  send_broken(lambda raw: raw.update(body=12345)),
                  send_broken(lambda raw: raw["properties"].update(delivery_info="x"))]
        evil = add.apply_async((2, 3), task_id=f"evil\n{forged}")
        with worker(app, tmp_path, pool=pool, concurrency=1) as w:
            assert evil.get(timeout=10) == 5
            for result in broken:
                with pytest.raises(minicelery.DecodeError):
                    result.get(timeout=10)
            w.wait_for_log("succeeded")
        assert not [line for line in w.log().splitlines() if line.startswith(forged)], w.log()
        assert "evil\\n[2026-01-01" in w.log()  # (the id is there, escaped)
    assert redis_client.hlen("unacked") == 0 and len(app.broker.dead_letters()) == 6


def test_hostile_sys_exit_in_a_task_fails_the_task_not_the_worker(app, tmp_path):
    for pool in ("solo", "prefork"):
        with worker(app, tmp_path, pool=pool, concurrency=1) as w:
            result = exits.delay(3)
            with pytest.raises(Exception) as raised:  # an Exception here: never the caller's exit
                result.get(timeout=10)
            assert type(raised.value).__name__ == "SystemExit" and raised.value.args == (3,)
            assert add.delay(1, 1).get(timeout=10) == 2
            assert w.alive()


def test_hostile_unstorable_results_are_failures_and_args_fail_at_the_call_site(app, tmp_path):
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(EncodeError):
        echo.delay(deep)
    with pytest.raises(EncodeError):
        echo.delay(BadRepr(object()))
    with worker(app, tmp_path) as w:
        with pytest.raises(EncodeError):
            deep_result.delay(100_000).get(timeout=10)
        with pytest.raises(Exception) as raised:
            fail_with_bad_repr.delay().get(timeout=10)
        assert type(raised.value).__name__ in ("BadRepr", "EncodeError")
        assert w.alive()


def test_hostile_rate_limited_messages_count_against_prefetch(app, tmp_path, redis_client):
    sent = [one_a_minute.delay(i) for i in range(60)]
    with worker(app, tmp_path, concurrency=1, prefetch_multiplier=4) as first:
        assert sent[0].get(timeout=10) == 0  # one ran; the rest wait a minute each
        first.wait_for_log("received", count=5)  # the one that ran and 4 waiting
        with worker(app, tmp_path, concurrency=1, prefetch_multiplier=4) as second:
            second.wait_for_log("received", count=5)  # the rest were left for other workers
            assert first.log().count("received") == 5
            # (each holds 4 waiting, once the second one's first task is acked)
            wait_until(lambda: redis_client.hlen("unacked") <= 8, what="4 held by each")
            assert app.broker.size("celery") >= 50


def test_hostile_many_threads_wait_in_get_on_one_connection(app, tmp_path):
    with worker(app, tmp_path, concurrency=2):
        results = [add.delay(i, i) for i in range(300)]
        values, errors = {}, []

        def wait(i):
            try:
                values[i] = results[i].get(timeout=60)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=wait, args=(i,)) for i in range(300)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    assert not errors and values == {i: 2 * i for i in range(300)}


def test_hostile_sqlite_get_keeps_its_deadline_while_another_process_holds_the_lock(tmp_path):
    url = f"sqlite:///{tmp_path}/locked.db"
    app_ = Celery("locked", broker=url, set_as_current=False)
    result = app_.AsyncResult("nobody")
    assert result.state == "PENDING"  # creates the file and tables
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(30)"),
        str(tmp_path / "locked.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        def write():
            with contextlib.suppress(Exception):
                app_.backend.store_result("w", 1, "SUCCESS")
        writer = threading.Thread(target=write, daemon=True)
        writer.start()  # this process's writer now waits for the lock...
        started = time.monotonic()
        with pytest.raises(ResultTimeout):
            result.get(timeout=1)  # ...and must not hold up a reader
        assert time.monotonic() - started < 2.5
    finally:
        holder.kill()
        holder.wait()
    # The writer gets the lock now: no thread may be inside SQLite when the next test forks.
    writer.join(15)
    assert not writer.is_alive()


def test_hostile_sqlite_database_deleted_under_a_worker(tmp_path):
    url = f"sqlite:///{tmp_path}/gone.db"
    APP.close()
    APP.conf = Config()
    APP.conf.update(broker_url=url)
    with worker(APP, tmp_path, concurrency=1) as w:
        assert add.delay(1, 1).get(timeout=10) == 2
        APP.close()
        minicelery.SQLiteStore._open.clear()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp_path}/gone.db{suffix}")
        results = [add.delay(i, i) for i in range(20)]  # a producer makes a new file
        assert [r.get(timeout=15) for r in results] == [2 * i for i in range(20)]
        assert "deleted or replaced" in w.log()
    APP.close()


def test_hostile_sqlite_full_database_is_named_and_ridden_out(tmp_path):
    url = f"sqlite:///{tmp_path}/full.db"
    app_ = Celery("full", broker=url, set_as_current=False)
    store = minicelery.SQLiteStore.for_url(url)
    pages = store.read("PRAGMA page_count")[0][0]
    with store.lock:
        store.conn.execute(f"PRAGMA max_page_count = {pages}")  # this connection: the disk is full
    with pytest.raises(minicelery.OperationalError, match="full"):
        app_.send_task("x.y", ["z" * 100_000])
    assert store.conn.in_transaction is False  # rolled back, and not "cannot rollback"
    with store.lock:
        store.conn.execute("PRAGMA max_page_count = 1073741823")
    app_.send_task("x.y", [1])
    assert app_.broker.size("celery") == 1


def test_hostile_sighup_restarts_the_worker_and_loses_nothing(app, redis_server, tmp_path):
    env = {"MINICELERY_BROKER_URL": app.conf.broker_url,
           "MINICELERY_RESULT_BACKEND": app.conf.result_backend}
    out = str(tmp_path / "runs")
    log = open(tmp_path / "cli.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "minicelery", "worker", "test_minicelery", "-c", "1"],
                            cwd=HERE, env=dict(os.environ, **env), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "ready." in (tmp_path / "cli.log").read_text(), what="worker ready")
        results = [chaos_early.delay(i, out, 0.05) for i in range(20)]
        wait_until(lambda: os.path.exists(out), what="first task")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: (tmp_path / "cli.log").read_text().count("ready.") >= 2, what="restart")
        assert [r.get(timeout=30) for r in results] == list(range(20))
        assert sorted(int(line) for line in open(out)) == list(range(20))  # each once
        assert proc.poll() is None and "Restarting worker" in (tmp_path / "cli.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        log.close()


def test_hostile_a_signal_during_fork_is_neither_lost_nor_handled_in_the_child(tmp_path):
    marks = tmp_path / "marks"
    code = f"""
import os, signal, minicelery
marks = {str(marks)!r}
def note(signum, frame):
    with open(marks, "a") as f:
        f.write(str(os.getpid()) + "\\n")
signal.signal(signal.SIGINT, note)
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})
os.kill(os.getpid(), signal.SIGINT)  # pending across the fork
pid = minicelery.fork_child(lambda: os.kill(os.getpid(), signal.SIGINT))
_, status = os.waitpid(pid, 0)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
print(os.getpid(), os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=20)
    parent, child_exit = out.stdout.split()
    assert child_exit == "0", out.stderr
    assert marks.read_text().split() == [parent]  # handled once, in the parent only


def test_hostile_child_that_breaks_stdout_never_runs_parent_code(app, tmp_path):
    # The child's last flush raises; it must still leave by os._exit, not unwind into the parent.
    code = """
import io, os, sys, minicelery
class Broken(io.TextIOBase):
    def write(self, s): raise OSError("broken pipe")
    def flush(self): raise OSError("broken pipe")
def child():
    sys.stdout = sys.stderr = Broken()
pid = minicelery.fork_child(child)
_, status = os.waitpid(pid, 0)
print("parent", os.getpid(), os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=20)
    assert out.stdout.count("parent") == 1 and out.stdout.split()[-1] == "0", out


def test_hostile_a_stall_past_the_visibility_timeout_runs_nothing_twice(app, tmp_path, private_redis):
    sock, procs, _ = private_redis
    app.conf.update(broker_url=f"unix://{sock}", result_backend=f"unix://{sock}?db=1",
                    broker_transport_options={"visibility_timeout": 2})
    app.close()
    out = str(tmp_path / "runs")
    results = [chaos_early.delay(i, out, 0.1) for i in range(60)]
    with worker(app, tmp_path, concurrency=1) as first, worker(app, tmp_path, concurrency=1) as second:
        wait_until(lambda: lines_in(out) >= 4, what="both working")
        procs[0].send_signal(signal.SIGSTOP)  # Redis stalls for twice the visibility timeout
        time.sleep(4)  # the fault itself: the stall lasts this long
        procs[0].send_signal(signal.SIGCONT)
        assert [r.get(timeout=60) for r in results] == list(range(60))
        assert first.alive() and second.alive()
    runs = [int(line) for line in open(out)]
    assert sorted(runs) == list(range(60)), "a task ran twice or never"


def test_hostile_config_values_and_urls_are_clear_errors():
    with pytest.raises(ImproperlyConfigured, match="notaport"):
        Celery("c", broker="redis://h:notaport/0", set_as_current=False).broker
    with pytest.raises(ImproperlyConfigured, match="visibility_timeout"):
        Celery("c", broker="redis://h/0", broker_transport_options={"visibility_timeout": "x"},
               set_as_current=False).broker
    with pytest.raises(ImproperlyConfigured, match="negative"):
        Celery("c", result_expires=-5, set_as_current=False)
    for url in ("sqlite://tasks.db", "sqlite:///x.db?mode=ro"):  # (the first used the file asks.db)
        with pytest.raises(ImproperlyConfigured, match="sqlite:///relative.db or sqlite:////absolute.db"):
            Celery("c", broker=url, set_as_current=False).broker
    for odd in (float("nan"), float("inf")):  # (a NaN visibility timeout restored nothing, and said nothing)
        with pytest.raises(ImproperlyConfigured, match="visibility_timeout must be a number"):
            Celery("c", broker="redis://h/0", broker_transport_options={"visibility_timeout": odd},
                   set_as_current=False).broker
        with pytest.raises(ImproperlyConfigured, match="result_expires must be a finite number"):
            Celery("c", result_expires=odd, set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="must be str") as raised:
        Celery("c", set_as_current=False).conf.update(broker_url=b"redis://:hunter2@h/0")
    assert "hunter2" not in str(raised.value)


def test_hostile_secrets_never_printed(app, tmp_path, redis_server):
    url = f"unix://{redis_server}?db=0&password=s3cr@t"
    app_ = Celery("s", broker="redis://user:p@ss:w/rd@localhost:1/0", set_as_current=False)
    assert "p@ss" not in repr(app_.conf) and "w/rd" not in repr(app_.conf)
    with pytest.raises(ImproperlyConfigured) as raised:
        Celery("s", broker="amqp://u:hunter2@host//", set_as_current=False).broker
    assert "hunter2" not in str(raised.value)
    banner = minicelery.Worker(Celery("s", broker=url, set_as_current=False), pool="solo").banner(
        minicelery.SoloPool(app_, 1, "h"))
    assert "s3cr" not in banner and "password=**" in banner


def test_hostile_beat_state_files_of_the_wrong_shape_or_time(tmp_path):
    app_ = Celery("b", broker=f"sqlite:///{tmp_path}/b.db", set_as_current=False)
    app_.conf.beat_schedule = {"tick": {"task": "b.tick", "schedule": 10.0}}
    state = tmp_path / "state.json"
    for content in ('["a", "list"]', '{"entries": []}', '{"entries": {"tick": "x"}}',
                    '{"entries": {"tick": {"last_run_at": 5}}}', '{"entries": {"tick": {"last_run_at": "2999-01-01T00:00:00+00:00"}}}'):
        state.write_text(content)
        beat = Beat(app_, schedule_filename=str(state))
        now = minicelery.utcnow()
        beat.setup(now=now)
        assert beat.entries["tick"].last_run_at <= now  # a future last run is not believed
        beat.tick(now=now + dt.timedelta(seconds=11))
        assert beat.entries["tick"].total_run_count >= 1, content
        app_.broker.lease("beat", beat.token, 0)  # the next Beat leads at once
    # The state file is written through a fresh temp file, never through a planted link.
    target = tmp_path / "victim"
    target.write_text("keep")
    os.symlink(target, f"{state}.tmp")
    beat._save_state()
    assert target.read_text() == "keep" and json.loads(state.read_text())["entries"]["tick"]


def test_hostile_queue_names_with_any_byte_park_and_come_back(app, tmp_path, redis_client):
    queue = "odd\nqueue\x06\x16name"
    result = add.apply_async((4, 4), queue=queue, countdown=6)  # (parked: due later than 3 s when taken)
    with worker(app, tmp_path, queues=[queue]) as w:
        w.wait_for_log("Parked 1 task")
        assert result.get(timeout=15) == 8
    with pytest.raises(TypeError, match="queue"):
        add.apply_async((1, 1), queue=7)


def test_hostile_bookkeeping_does_not_grow_for_ever(app, tmp_path, redis_client):
    app.control.revoke("gone")
    assert 0 < redis_client.ttl("minicelery:revoked") <= app.revoke_expires + 1
    sqlite_app = Celery("c", broker=f"sqlite:///{tmp_path}/c.db", set_as_current=False)
    backend = sqlite_app.backend
    backend.chord_start("g", 1)
    assert backend.chord_part("g", 0, "t", "SUCCESS", 1)
    backend.chord_done("g")
    assert backend.chord_part("g", 0, "t", "SUCCESS", 1) is None  # a late duplicate
    assert backend.store.read("SELECT COUNT(*) FROM chords")[0][0] == 0
    assert backend.store.read("SELECT COUNT(*) FROM chord_parts")[0][0] == 0



@APP.task
def fork_and_return():
    """Forks, and both copies return: only the original may report."""
    os.fork()
    return os.getpid()


def test_hostile_a_forked_task_copy_never_acts_as_the_worker(app, tmp_path):
    with worker(app, tmp_path, concurrency=1) as w:
        fork_and_return.delay().get(timeout=10)
        assert [add.delay(2, i).get(timeout=10) for i in range(3)] == [2, 3, 4]  # none taken for lost
        w.wait_for_log("succeeded", count=4)  # the log line follows the stored result
        log = w.log()
        assert "WorkerLostError" not in log and log.count("succeeded") == 4  # the copy reported nothing


def test_hostile_sighup_twice_in_a_row_still_restarts(app, redis_server, tmp_path):
    env = {"MINICELERY_BROKER_URL": app.conf.broker_url,
           "MINICELERY_RESULT_BACKEND": app.conf.result_backend}
    log_path = tmp_path / "cli.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minicelery", "worker", "test_minicelery", "-c", "1"],
                                cwd=HERE, env=dict(os.environ, **env), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "ready." in log_path.read_text(), what="worker ready")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "Restarting worker" in log_path.read_text(), what="restart begins")
        proc.send_signal(signal.SIGHUP)  # lands while the new program starts up
        wait_until(lambda: log_path.read_text().count("ready.") >= 2, what="restarted")
        assert add.delay(1, 1).get(timeout=20) == 2 and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_hostile_an_oversized_message_never_reaches_a_worker(kind, app, tmp_path, redis_client):
    if kind == "sqlite":
        app.conf.update(broker_url=f"sqlite:///{tmp_path}/big.db", result_backend=None)
        app.close()
    app.conf.worker_max_message_size = 100_000

    def memory_kb(w, field):
        with open(f"/proc/{w.pid}/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])
    with worker(app, tmp_path, concurrency=1) as w:
        at_start = memory_kb(w, "VmRSS")
        raw = json.dumps({"body": "x" * 30_000_000, "headers": {"id": "big", "task": "test_minicelery.add"},
                          "properties": {"delivery_tag": "big"}})
        if kind == "redis":
            # Behind a small one, so an idle worker's wake-up (BLMOVE returns what it
            # moves) brings the small one: the reserve script meets the big one.
            small = json.loads(CELERY_ADD_MESSAGE)
            small["headers"]["task"] = "test_minicelery.add"
            redis_client.lpush("celery", json.dumps(small), raw)
        else:
            app.broker.publish("celery", raw)
        w.wait_for_log("over worker_max_message_size: kept (cut) in the dead letters")
        [dead] = app.broker.dead_letters()
        assert len(dead["raw"]) <= 65536 and "30000" in dead["reason"]
        # The 30 MB message never came into the worker's memory (not even once).
        assert memory_kb(w, "VmHWM") - at_start < 20_000
        if kind == "redis":
            assert add.delay(1, 1).get(timeout=10) == 2


def test_hostile_two_messages_with_one_tag_both_park_and_run(app, tmp_path, redis_client):
    out = str(tmp_path / "runs")
    for i in (0, 1):
        chaos_early.apply_async((i, out, 0), countdown=4)
        raw = json.loads(redis_client.lpop("celery"))
        raw["properties"]["delivery_tag"] = "same"
        redis_client.lpush("celery", json.dumps(raw))
    with worker(app, tmp_path, concurrency=1) as w:
        w.wait_for_log("Parked", count=1)
        wait_until(lambda: lines_in(out) >= 2, timeout=20, what="both runs")
    assert sorted(int(line) for line in open(out)) == [0, 1]


def test_hostile_delivery_tags_that_are_not_plain_words_are_replaced(app, tmp_path, redis_client):
    """Tags empty, the reserve script's own markers, too long or not plain: each such message
    runs once, and so does one a worker of old left in unacked under a tag that isn't UTF-8.
    A tag of bytes that aren't UTF-8 makes a message that isn't JSON: a dead letter."""
    out = str(tmp_path / "runs")
    tags = [b"", b"!", b"x" * 300, b"with space", b"left-over", b"\xff\xfe-bad"]
    for i, tag in enumerate(tags):
        chaos_early.delay(i, out, 0)
        raw = json.loads(redis_client.lpop("celery"))
        raw["properties"]["delivery_tag"] = "TAG"
        raw = json.dumps(raw).encode().replace(b'"TAG"', b'"' + tag + b'"')
        if tag == b"left-over":  # abandoned long ago by a worker that kept a tag of any bytes
            redis_client.hset("unacked", b"\xff" + tag, b'[' + raw + b', "", "celery"]')
            redis_client.zadd("unacked_index", {b"\xff" + tag: 1.0})
        else:
            redis_client.lpush("celery", raw)
    with worker(app, tmp_path, concurrency=1, hostname="tags@%h") as w:
        wait_until(lambda: lines_in(out) >= len(tags) - 1, timeout=20, what="every message to run")
        assert _ping(app, minicelery._expand_hostname("tags@%h"))
        wait_until(lambda: redis_client.llen("minicelery:dead-letters") == 1, what="the one that isn't JSON")
        assert "Unexpected error" not in w.log() and len(w.log()) < 20_000
    assert sorted(int(line) for line in open(out)) == list(range(len(tags) - 1))
    assert redis_client.hlen("unacked") == 0


def test_hostile_a_revocation_flood_is_capped(app, redis_client):
    app.control.revoke([f"flood-{i}" for i in range(60_000)])
    app.control.revoke("the-newest")
    assert redis_client.zcard("minicelery:revoked") <= minicelery.Broker.REVOKES_MAX
    assert "the-newest" in app.broker.revoked()


def test_hostile_stored_results_that_are_not_results(app, redis_client, results):
    results.rpush("celery-task-meta-wrongtype", "x")
    started = time.monotonic()
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        app.AsyncResult("wrongtype").get(timeout=30)
    assert time.monotonic() - started < 5  # not retried as if Redis were away
    for exc_type in ("SystemExit", "KeyboardInterrupt", ["a", "list"]):
        results.set(f"celery-task-meta-{exc_type}", json.dumps(
            {"status": "FAILURE", "result": {"exc_type": exc_type, "exc_message": [3],
                                             "exc_module": "builtins"}, "task_id": "x"}))
        with pytest.raises(Exception):  # an Exception: the caller's `except Exception` catches it
            app.AsyncResult(str(exc_type)).get(timeout=5)


def test_hostile_beat_state_out_of_range_or_too_deep(tmp_path):
    app_ = Celery("b", broker=f"sqlite:///{tmp_path}/b.db", set_as_current=False)
    app_.conf.beat_schedule = {"tick": {"task": "b.tick", "schedule": 10.0}}
    state = tmp_path / "state.json"
    for content in ('{"entries": {"tick": {"last_run_at": "0001-01-01T00:00:00+23:59"}}}',
                    "[" * 100_000 + "]" * 100_000):
        state.write_text(content)
        beat = Beat(app_, schedule_filename=str(state))
        beat.setup()
        assert beat.entries["tick"].total_run_count == 0


def test_hostile_secrets_in_odd_places_of_a_url():
    for url, secret in [("redis://h/0?pass%77ord=SECRET", "SECRET"), ("redis://user:a?SECRET@host/0", "SECRET"),
                        ("redis:/:SECRET@host", "SECRET"), ("redis://SECRET@host", "SECRET"),
                        ("redis://u:p@ss/w@rd@host:1/0", "ss/w")]:
        assert secret not in minicelery._safe_url(url), url


@pytest.mark.chaos
@pytest.mark.parametrize("workers", [1, 2])
def test_chaos_stalls_past_the_visibility_timeout_run_nothing_twice(workers, app, tmp_path, private_redis):
    """Redis stalls 3 s (past a 2 s visibility timeout, short of the 5 s socket timeout) three
    times while tasks are sent and run: early-ack tasks run once, none lost."""
    sock, procs, _ = private_redis
    app.conf.update(broker_url=f"unix://{sock}", result_backend=f"unix://{sock}?db=1",
                    broker_transport_options={"visibility_timeout": 2})
    app.close()
    sent, out, started = chaos_size(800, 300), str(tmp_path / "runs"), time.monotonic()
    with contextlib.ExitStack() as stack:
        running = [stack.enter_context(worker(app, tmp_path, concurrency=2)) for _ in range(workers)]

        def produce():
            for i in range(sent):
                chaos_early.delay(i, out, 0.01)
                time.sleep(0.002)  # paces the producer

        producer = threading.Thread(target=produce)
        producer.start()
        for _ in range(3):
            time.sleep(1.5)  # pacing the fault
            procs[0].send_signal(signal.SIGSTOP)
            time.sleep(3)  # the fault itself
            procs[0].send_signal(signal.SIGCONT)
        producer.join(120)
        wait_until(lambda: _distinct_runs(out) >= sent, timeout=120, what="every task run")
        assert all(w.alive() for w in running)
    row = chaos_report(f"8b. Redis stalled 3 s x3 (visibility 2 s), {workers} worker(s)", sent, out, started)
    assert row["duplicates"] == 0 and row["lost"] == 0


def _abandoned_and_a_late_worker(app, redis_client):
    """A message whose holder went quiet long ago, and a second (late) worker's app."""
    app.conf.broker_transport_options = {"visibility_timeout": 5}
    app.close()
    add.delay(1, 1)
    [delivery] = take(app.broker, ["celery"], 1)
    redis_client.zadd("unacked_index", {delivery.tag: time.time() - 100})  # its holder went quiet
    late = Celery("late", broker=app.conf.broker_url, set_as_current=False)
    late.conf.broker_transport_options = {"visibility_timeout": 5}
    return delivery, late


def test_hostile_a_message_restored_and_taken_again_is_not_restored_twice(app, redis_client):
    delivery, late = _abandoned_and_a_late_worker(app, redis_client)
    deadline = time.time() - 5  # the late worker listed it as stale...
    assert app.broker.restore_unacked() == 1  # ...another restored it first,
    [again] = take(app.broker, ["celery"], 1)  # and took it again: a fresh claim
    assert again.tag == delivery.tag
    assert late.broker._restore(delivery.tag, stale_before=deadline) == 0  # so the late restore does nothing
    assert redis_client.hlen("unacked") == 1 and app.broker.size("celery") == 0
    late.close()


def test_hostile_a_restore_finding_the_message_gone_spares_its_new_claim(app, redis_client):
    """A late worker lists a stale message, but finds its entry gone: another gave it back
    first, and takes it again before the late one tidies the index. The new claim stays
    (a chaos run lost a task this way: its index entry dropped, the message sat in unacked
    with nothing to bring it back)."""
    delivery, late = _abandoned_and_a_late_worker(app, redis_client)
    assert app.broker.restore_unacked() == 1  # another gave it back first
    taken, hget = [], late.broker.client.hget

    def hget_then_taken_again(*args):
        entry = hget(*args)  # the late worker finds it gone...
        taken.extend(take(app.broker, ["celery"], 1))  # ...and the other takes it again meanwhile
        return entry

    late.broker.client.hget = hget_then_taken_again
    assert late.broker._restore(delivery.tag, stale_before=time.time() - 5) == 0
    [again] = taken
    assert redis_client.zscore("unacked_index", delivery.tag) == again.claim  # the new claim stands
    assert app.broker.touch(claims(again)) == (set(), set())
    assert app.broker.restore_unacked(now=time.time() + 6) == 1  # and, abandoned, it comes back
    assert app.broker.size("celery") == 1
    late.close()


def test_hostile_an_unreadable_entry_in_unacked_goes_to_the_dead_letters(app, redis_client):
    redis_client.hset("unacked", "odd", b"\xff\xfe not json")  # (bytes no JSON can hold)
    redis_client.zadd("unacked_index", {"odd": time.time() - 7200})
    assert app.broker.restore_unacked() == 0
    [dead] = app.broker.dead_letters()
    assert dead["reason"] == "unreadable entry in unacked"
    assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0


def _queue_raw(redis_client, tag, **properties):
    """Queue an add(1, 1) message with delivery tag `tag` and these properties changed."""
    add.delay(1, 1)
    envelope = json.loads(redis_client.rpop("celery"))
    envelope["properties"].update(properties, delivery_tag=tag)
    redis_client.lpush("celery", json.dumps(envelope).replace('"INFINITY"', "1e999"))


def test_hostile_a_priority_of_infinity_does_not_stop_the_restores(app, redis_client):
    """JSON's 1e999 is infinity, which int() refuses with OverflowError: the restores of every
    worker stopped at that message, and the stale ones listed after it never came back."""
    _queue_raw(redis_client, "poison", priority="INFINITY")
    [poison] = app.broker.reserve(["celery"], 1, now=time.time() - 7200)[0]  # its holder died long ago
    add.delay(2, 2)
    app.broker.reserve(["celery"], 1, now=time.time() - 7100)  # and this one's too
    assert app.broker.restore_unacked() == 2
    assert redis_client.hlen("unacked") == 0 and app.broker.size("celery") == 2
    [poison_again, _] = take(app.broker, ["celery"], 2)
    app.broker.requeue(claims(poison_again))  # (as Reject(requeue=True) does)
    assert app.broker.size("celery") == 1


def test_hostile_a_message_whose_queue_key_is_no_list_goes_to_the_dead_letters(app, redis_client):
    """A routing key naming some other app's string key: giving the message back there failed
    after it had left unacked (lost); now it is kept in the dead letters, and says why."""
    _queue_raw(redis_client, "elsewhere", delivery_info={"exchange": "", "routing_key": "reports"})
    redis_client.set("reports", "some other app's string")
    [delivery] = take(app.broker, ["celery"], 1)
    app.broker.requeue(claims(delivery))
    _queue_raw(redis_client, "elsewhere-too", delivery_info={"exchange": "", "routing_key": "reports"})
    take(app.broker, ["celery"], 1)
    assert app.broker.restore_unacked(now=time.time() + 7200) == 0  # (its holder dead: the same)
    [dead, _] = app.broker.dead_letters()
    assert "the key reports is not a list" in dead["reason"] and dead["queue"] == "reports"
    assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0
    assert redis_client.get("reports") == b"some other app's string"


def test_hostile_a_parked_message_whose_list_key_changed_type_goes_to_the_dead_letters(app, redis_client):
    """The list a parked message goes back to now holds a string: every worker's take failed
    on it, for ever. Now the message goes to the dead letters, and takes go on."""
    add.apply_async((1, 1), queue="later")
    [delivery] = take(app.broker, ["later"], 1)
    app.broker.park([(delivery, (delivery.claim,), 0, time.time())])
    redis_client.delete("later")
    redis_client.set("later", "a string now")
    second = add.delay(2, 2)
    [other] = take(app.broker, ["celery"], 1)
    assert minicelery.decode_message(other.raw).id == second.id
    [dead] = app.broker.dead_letters()
    assert "not a list any more" in dead["reason"] and dead["queue"] == "later"
    assert redis_client.zcard("minicelery:eta") == 0


def test_hostile_a_worker_whose_park_fails_holds_the_task_and_goes_on(app, tmp_path, redis_client, monkeypatch):
    """Redis away as a far-ETA task is parked: it waits in the worker instead (as in Celery),
    runs at its ETA, and the worker's round trips go on (the failure used to leave them
    failing for ever, with a job lost beside it: see the next test)."""
    park = minicelery.RedisQueues.park

    def park_fails_once(self, parked):
        if not os.path.exists(tmp_path / "failed"):
            open(tmp_path / "failed", "w").close()
            raise redis.ConnectionError("Redis went away (as the test has it)")
        return park(self, parked)

    monkeypatch.setattr(minicelery.RedisQueues, "park", park_fails_once)
    with worker(app, tmp_path) as w:
        result = when_run.apply_async(countdown=4)
        w.wait_for_log("Can't park 1 task(s) with a later ETA in the broker")
        assert add.delay(2, 3).get(timeout=10) == 5
        info = result.get(timeout=15)
    assert info["at"] >= dt.datetime.fromisoformat(info["eta"]).timestamp()
    assert w.log().count(f"when_run[{result.id}] succeeded") == 1 and redis_client.hlen("unacked") == 0


def test_hostile_a_failed_park_loses_no_word_of_a_lost_job(app, redis_client, monkeypatch):
    """A pool process died after acking its job (the broker must say whether it started), in
    the same round trip as a far-ETA message whose park fails: the answer is not dropped."""
    add.delay(1, 1)
    book = minicelery.Book(app, ["celery"], 4)
    book.settle()
    [held] = book.held.values()
    book.waiting.ready.clear()
    assert app.broker.ack(claims(held.delivery)) == (set(), set())  # its process acked it, then died
    held.lost = minicelery.Lost(held.tag, "killed by signal 9", None)
    add.apply_async((2, 2), countdown=3600)
    monkeypatch.setattr(app.broker, "park", lambda parked: (_ for _ in ()).throw(redis.ConnectionError("away")))
    received, started = book.settle()  # (it raised, and the job's record was left claimless, lost for ever)
    assert started == [held] and len(received) == 1
    assert len(book.unparked) == 1 and redis_client.zcard("minicelery:eta") == 0
    del book.held[held.tag]  # (the consumer has it recorded as lost with its process: Consumer._lost)
    monkeypatch.undo()
    book.settle()  # the next round trip parks it (they used to wait here, filling the worker)
    assert not book.unparked and redis_client.zcard("minicelery:eta") == 1 and redis_client.hlen("unacked") == 0
    assert not book.held  # (parked: not held here any more)


def test_hostile_a_task_whose_park_keeps_failing_waits_here_once_due_soon(app, redis_client, monkeypatch):
    """Parking that fails every time: a task stays held, and once due within the horizon it
    waits here, to run on time (it used to be held for ever, parked never)."""
    add.apply_async((1, 1), countdown=3.5)
    book = minicelery.Book(app, ["celery"], 4)
    monkeypatch.setattr(app.broker, "park", lambda parked: (_ for _ in ()).throw(redis.ConnectionError("away")))
    book.settle()
    assert len(book.unparked) == 1 and not book.waiting.ready
    wait_until(lambda: book.settle() is not None and book.waiting.for_eta == 1, timeout=5, what="it waits here")
    assert not book.unparked
    book.settle()
    assert book.waiting.for_eta == 1  # (once)


def test_hostile_a_park_whose_answer_is_lost_is_not_taken_for_an_ack(app, redis_client):
    """Parked though its answer was lost: an early ack asked with the old claim must hear
    "given back" (not run here), not "gone" (acked: run, and the parked copy runs again)."""
    add.apply_async((1, 1), countdown=3600)
    [delivery] = take(app.broker, ["celery"], 1)
    app.broker.park([(delivery, (delivery.claim,), 0, time.time() + 3600)])  # (its answer, say, lost)
    assert app.broker.ack(claims(delivery)) == (set(), {delivery.tag})
    assert redis_client.zcard("minicelery:eta") == 1


@pytest.mark.parametrize("key", ["minicelery:restored", "minicelery:dead-letters", "unacked", "_kombu.binding.x"])
def test_hostile_a_routing_key_naming_one_of_our_keys_goes_to_the_dead_letters(app, redis_client, key):
    """Given back to the list its routing key names: one of minicelery's or kombu's own keys
    would have become a list (every take failing after). It is kept in the dead letters
    instead, whole, so `dead requeue` can send it again."""
    redis_client.delete(key)
    _queue_raw(redis_client, "ours", delivery_info={"exchange": "", "routing_key": key})
    [delivery] = take(app.broker, ["celery"], 1)
    app.broker.requeue(claims(delivery))
    dead = [d for d in app.broker.dead_letters() if "is one of ours" in (d.get("reason") or "")]
    assert len(dead) == 1 and dead[0]["queue"] == key, app.broker.dead_letters()
    assert minicelery.decode_message(dead[0]["raw"]).id == minicelery.decode_message(delivery.raw).id
    assert (key == "minicelery:dead-letters" or redis_client.type(key) != b"list") and redis_client.hlen("unacked") == 0
    add.delay(2, 3)
    assert take(app.broker, ["celery"], 1)  # takes go on
    with pytest.raises(ValueError, match="keeps for itself, not a queue"):
        add.apply_async((1, 1), queue=key)  # (nor may a producer send there)


def test_hostile_dead_requeue_sends_no_letter_to_our_keys_and_loses_none(app, redis_client):
    """A letter kept because its queue is one of our keys is left where it is; the letters
    after it still go (they were taken out all at once, and lost when one failed)."""
    _queue_raw(redis_client, "ours", delivery_info={"exchange": "", "routing_key": "unacked_mutex"})
    [delivery] = take(app.broker, ["celery"], 1)
    app.broker.requeue(claims(delivery))
    assert app.broker.ack(claims(delivery)) == (set(), {delivery.tag})  # given back (to the letters), not acked
    sent = add.delay(2, 3)
    app.broker.dead_letter(redis_client.rpop("celery"), "kept by hand", "celery")
    env = dict(os.environ, PYTHONPATH=HERE, MINICELERY_BROKER_URL=app.conf.broker_url,
               MINICELERY_RESULT_BACKEND=app.conf.result_backend)
    done = subprocess.run([sys.executable, "-m", "minicelery", "-A", "test_minicelery", "dead", "requeue", "--all"],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "keeps for itself" in done.stderr and "Requeued 1 dead letter(s)." in done.stdout
    assert [d["queue"] for d in app.broker.dead_letters()] == ["unacked_mutex"]
    assert redis_client.type("unacked_mutex") == b"none"
    [again] = take(app.broker, ["celery"], 1)
    assert minicelery.decode_message(again.raw).id == sent.id


def test_hostile_a_keepalive_renewal_whose_answer_is_lost_keeps_the_claim(app, redis_client, monkeypatch):
    """The solo pool's keepalive renews claims while a job runs; a renewal done but never
    answered must count both scores, as a worker's round trip does, or the next renewal
    lets go of what is still ours (an acks_late task ran twice)."""
    late_sleep.delay(0)
    book = minicelery.Book(app, ["celery"], 4)
    book.settle()
    [held] = book.held.values()
    held.lent = time.time()  # running in the solo pool
    script = app.broker.held.script

    def answer_lost(*args):
        script(*args)
        raise redis.ConnectionError("the answer was lost")

    monkeypatch.setattr(app.broker.held, "script", answer_lost)
    with pytest.raises(redis.ConnectionError):
        book.renew_all()
    monkeypatch.undo()
    book.renew_all()
    assert held.claim and book.holds(held)
    assert app.broker.ack({held.tag: held.claim}) == (set(), set()) and redis_client.hlen("unacked") == 0


def test_hostile_a_message_given_back_and_taken_at_once_is_ours_to_ack(app, redis_client, monkeypatch):
    """Worker B's claim is the time its round trip began; worker A gave the message back in
    between (a requeue), noting its later claim. B's early ack whose answer is lost, asked
    again, must find "gone" (acked: run it), not "given back" (not run: but acked, so lost)."""
    add.delay(1, 1)
    began_b = time.time()  # B's round trip begins...
    [a] = take(app.broker, ["celery"], 1)  # ...A takes (or renews) it...
    app.broker.requeue(claims(a))  # ...and gives it back, noting its claim
    [b] = app.broker.reserve(["celery"], 1, now=began_b)[0]  # B's take, under its earlier claim
    assert b.tag == a.tag and b.claim < a.claim
    script, lost = app.broker.held.script, []

    def answer_lost_once(*args):
        answer = script(*args)
        if not lost:
            lost.append(True)
            raise redis.ConnectionError("the answer was lost")
        return answer

    monkeypatch.setattr(app.broker.held, "script", answer_lost_once)
    job = minicelery.Job(b.tag, b.raw, b.queue, (b.claim,), None, (None, None), False)
    assert minicelery._acked(app, job)  # acked by the first ask: the task runs
    assert redis_client.hlen("unacked") == 0 and app.broker.size("celery") == 0


def test_hostile_sqlite_file_replaced_by_a_copy_keeps_its_claims(tmp_path):
    url = f"sqlite:///{tmp_path}/copy.db"
    app_ = Celery("copy", broker=url, set_as_current=False)
    app_.send_task("x.y", [1])
    [delivery] = take(app_.broker, ["celery"], 1)
    with sqlite3.connect(f"{tmp_path}/copy.db") as source, sqlite3.connect(f"{tmp_path}/new.db") as copy:
        source.backup(copy)
    os.replace(f"{tmp_path}/new.db", f"{tmp_path}/copy.db")
    renewed = time.time()
    assert app_.broker.touch(claims(delivery), renewed) == (set(), set())  # the copy holds our claim: still ours
    assert app_.broker.ack({delivery.tag: (renewed,)}) == (set(), set())
    assert app_.broker.store.read("SELECT COUNT(*) FROM messages")[0][0] == 0  # acked in the new file
    assert "copy.db" in app_.broker.store.path


def test_hostile_many_processes_open_a_new_sqlite_file_at_once(tmp_path):
    code = ("import sys, minicelery; app = minicelery.Celery('s', broker=sys.argv[1], set_as_current=False); "
            "app.send_task('x.y', [1])")
    url = f"sqlite:///{tmp_path}/fresh.db"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=HERE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errors
    assert Celery("s", broker=url, set_as_current=False).broker.size("celery") == 8


def test_hostile_many_threads_wait_on_one_result(app, tmp_path):
    result = sleep_then.delay(0.5, "done")
    values = []
    threads = [threading.Thread(target=lambda: values.append(app.AsyncResult(result.id).get(timeout=30)))
               for _ in range(50)]
    for t in threads:
        t.start()
    with worker(app, tmp_path, concurrency=1):
        for t in threads:
            t.join(40)
    assert values == ["done"] * 50


def test_hostile_a_chain_survives_its_broker_going_away_between_steps(app, tmp_path, private_redis, redis_server):
    sock, procs, start = private_redis
    app.conf.update(broker_url=f"unix://{sock}", result_backend=f"unix://{redis_server}?db=1")
    app.close()
    with worker(app, tmp_path, concurrency=1) as w:
        started = str(tmp_path / "started")
        result = (counted_sleep.si(started, 1.0) | echo.si(12))()
        wait_until(lambda: lines_in(started), what="the first step running")
        procs[0].kill()  # its broker goes away before it can send the next step

        procs[0].wait()
        w.wait_for_log("can't send")
        procs.append(start())
        assert result.get(timeout=30) == 12


# --- Interop with the real Celery ----------------------------------------------------
# A real Celery app with the same task names. Its worker runs as `celery -A
# test_minicelery:CELERY_APP worker`, and reads its URLs from the environment.

if real_celery is not None:
    CELERY_APP = real_celery.Celery("interop", broker=os.environ.get("INTEROP_BROKER_URL"),
                                    backend=os.environ.get("INTEROP_BACKEND_URL"),
                                    set_as_current=False)
    CELERY_APP.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=True)

    @CELERY_APP.task(name="test_minicelery.add")
    def celery_add(x, y):
        return x + y

    @CELERY_APP.task(name="test_minicelery.fail")
    def celery_fail(message):
        raise ValueError(message)

    @CELERY_APP.task(name="test_minicelery.custom_fail")
    def celery_custom_fail():
        raise MyError("custom", 42)

    @CELERY_APP.task(name="test_minicelery.mul")
    def celery_mul(x, y):
        return x * y

    @CELERY_APP.task(name="test_minicelery.xsum")
    def celery_xsum(numbers):
        return sum(numbers)

    @CELERY_APP.task(name="test_minicelery.flaky_cross", bind=True)
    def celery_flaky_cross(self):
        if self.request.retries == 0:
            raise self.retry(exc=RuntimeError("first try"), countdown=2)
        return f"celery after {self.request.retries}"

    @CELERY_APP.task(name="test_minicelery.when_run", bind=True)
    def celery_when_run(self):
        return {"at": time.time(), "eta": self.request.eta, "expires": self.request.expires}

    @CELERY_APP.task(name="test_minicelery.echo")
    def celery_echo(value):
        return value

    @CELERY_APP.task(name="test_minicelery.replace_with", bind=True)
    def celery_replace_with(self, sig, *_):
        return self.replace(real_celery.signature(sig, app=CELERY_APP))

    @CELERY_APP.task(name="test_minicelery.my_stamps", bind=True)
    def celery_my_stamps(self, *_):
        return {name: self.request.stamps[name] for name in sorted(self.request.stamped_headers)}

    @CELERY_APP.task(name="test_minicelery.whoami", bind=True)
    def celery_whoami(self):
        return {"id": self.request.id, "retries": self.request.retries,
                "routing_key": self.request.delivery_info.get("routing_key")}


@pytest.fixture
def celery_app(app, redis_server):
    """The real Celery app, on the same Redis as the minicelery `app`."""
    if real_celery is None:
        if os.environ.get("CI"):
            pytest.fail("the real celery is not installed (pip install -e '.[interop]')")
        pytest.skip("the real celery package is not installed")
    CELERY_APP.conf.update(broker_url=f"redis+socket://{redis_server}",
                           result_backend=f"redis+socket://{redis_server}?virtual_host=1")
    yield CELERY_APP


@contextlib.contextmanager
def celery_worker(redis_server, tmp_path):
    """A real `celery worker` process, with the solo pool, for the block."""
    log_path = tmp_path / "celery-worker.log"
    env = dict(os.environ, INTEROP_BROKER_URL=f"redis+socket://{redis_server}",
               INTEROP_BACKEND_URL=f"redis+socket://{redis_server}?virtual_host=1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "test_minicelery:CELERY_APP", "worker", "-P", "solo",
             "-l", "info", "--without-mingle", "--without-gossip", "--without-heartbeat",
             "-n", "real-celery@%h"], cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "ready." in log_path.read_text() or proc.poll() is not None,
                   timeout=30, what="the real celery worker")
        assert proc.poll() is None, log_path.read_text()
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_celery_3_settings_disable_rate_limits_and_store_errors_are_honoured(app, tmp_path, caplog):
    """CELERY_DISABLE_RATE_LIMITS and CELERY_STORE_ERRORS_EVEN_IF_IGNORED were warned
    about and dropped; the config module's own `app` object was listed as a setting."""
    config = type("celeryconfig", (), {"CELERY_DISABLE_RATE_LIMITS": True, "app": app,
                                       "CELERY_STORE_ERRORS_EVEN_IF_IGNORED": True})
    with caplog.at_level(logging.WARNING, logger="minicelery"):
        app.config_from_object(config)
    assert not [r for r in caplog.records if "ignores these settings" in r.getMessage()]
    app.conf.task_annotations = {"test_minicelery.when_run": {"rate_limit": "6/m"}}
    with worker(app, tmp_path) as w:
        assert all(run.get(timeout=10) for run in [when_run.delay() for _ in range(3)])  # (at 6/m: 20 s)
        failed = fail.apply_async(("kept",), ignore_result=True)
        wait_until(lambda: AsyncResult(failed.id, app=app).state == "FAILURE", what="the failure stored")
        ignored = add.apply_async((1, 2), ignore_result=True)
        w.wait_for_log(f"[{ignored.id}] succeeded")
    assert AsyncResult(failed.id, app=app).result.args == ("kept",)
    assert AsyncResult(ignored.id, app=app).state == "PENDING"  # (a success is still not stored)


@pytest.mark.interop
def test_interop_minicelery_sends_real_celery_runs(app, celery_app, redis_server, tmp_path):
    with celery_worker(redis_server, tmp_path):
        assert add.delay(2, 2).get(timeout=20) == 4
        with pytest.raises(ValueError, match="boom"):
            fail.delay("boom").get(timeout=20)
        with pytest.raises(MyError) as caught:
            custom_fail.delay().get(timeout=20)
        assert caught.value.args == ("custom", 42)
        sent = whoami.apply_async(queue="celery", priority=3)
        info = sent.get(timeout=20)
        assert info["id"] == sent.id and info["routing_key"] == "celery"
        # Celery's client reads what Celery's worker stored for our message, too.
        assert celery_app.AsyncResult(sent.id).get(timeout=5) == info


@pytest.mark.interop
def test_interop_real_celery_sends_minicelery_runs(app, celery_app, tmp_path):
    with worker(app, tmp_path):
        assert celery_app.send_task("test_minicelery.add", (2, 2)).get(timeout=20) == 4
        assert celery_add.apply_async((3, 4), priority=9).get(timeout=20) == 7
        with pytest.raises(ValueError, match="boom"):
            celery_fail.delay("boom").get(timeout=20)
        with pytest.raises(MyError) as caught:
            celery_custom_fail.delay().get(timeout=20)
        assert caught.value.args == ("custom", 42)
        with pytest.raises(real_celery.exceptions.NotRegistered):
            celery_app.send_task("test_minicelery.not_there").get(timeout=20)
        failing = celery_fail.delay("seen")
        with pytest.raises(ValueError):
            failing.get(timeout=20)
        assert failing.state == "FAILURE" and "raise ValueError(message)" in failing.traceback
    # And our client reads what our worker stored for Celery's message.
    assert isinstance(AsyncResult(failing.id, app=app).result, ValueError)


@pytest.mark.interop
def test_interop_retry_and_countdown_from_real_celery_finish_on_minicelery(
        app, celery_app, redis_server, tmp_path):
    retried = celery_flaky_cross.delay()
    with celery_worker(redis_server, tmp_path) as proc:
        wait_until(lambda: retried.state == "RETRY", what="Celery's retry")
        wait_until(lambda: redis.Redis(unix_socket_path=redis_server).hlen("unacked") == 1,
                   what="the retry message held by Celery")
    # Celery's warm shutdown put its retry message back; minicelery runs the second try.
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    counted = celery_when_run.apply_async(eta=eta)
    revoked = celery_app.send_task("test_minicelery.echo", ("never",), countdown=1)
    with worker(app, tmp_path) as w:
        w.wait_for_log(f"[{revoked.id}] received")
        celery_app.control.revoke(revoked.id)
        assert AsyncResult(retried.id, app=app).get(timeout=15) == "minicelery after 1"
        assert retried.get(timeout=5) == "minicelery after 1"
        assert counted.get(timeout=10)["at"] >= eta.timestamp()
        with pytest.raises(real_celery.exceptions.TaskRevokedError):
            revoked.get(timeout=10)


@pytest.mark.interop
def test_interop_retry_and_countdown_from_minicelery_finish_on_real_celery(
        app, celery_app, redis_server, tmp_path, redis_client):
    retried = flaky_cross.delay()
    with worker(app, tmp_path) as w:
        wait_until(lambda: retried.state == "RETRY", what="minicelery's retry")
        w.wait_for_log(f"[{retried.id}] received", count=2)
    assert redis_client.llen("celery") == 1  # the retry, given back at warm shutdown
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    counted = when_run.apply_async(eta=eta, expires=60)
    revoked = add.apply_async((1, 1), countdown=2)
    with celery_worker(redis_server, tmp_path):
        assert retried.get(timeout=15) == "celery after 1"
        info = counted.get(timeout=10)
        assert info["at"] >= eta.timestamp() and info["expires"]
        revoked.revoke()
        with pytest.raises(minicelery.TaskRevokedError):
            revoked.get(timeout=10)


@pytest.mark.interop
def test_interop_canvas_from_minicelery_runs_on_real_celery(app, celery_app, redis_server, tmp_path):
    with celery_worker(redis_server, tmp_path):
        assert (add.s(4, 4) | mul.s(8))().get(timeout=20) == 64
        assert group(add.s(i, i) for i in range(5))().get(timeout=20) == [0, 2, 4, 6, 8]
        assert chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=20) == 90
        failing = chord([add.s(1, 1), fail.s("chordfail")], xsum.s())()
        with pytest.raises(ChordError, match="chordfail"):
            failing.get(timeout=20)
        # issue 23's workflows, sent by our client, computed by Celery's worker as by ours
        assert chain(add.si(1, 0), group(add.s(1), add.s(1)), xsum.s(), add.s(1))().get(timeout=20) == 5
        assert chain(add.si(1, 1), group(add.s(1), add.s(2)), group(xsum.s(), xsum.s()))().get(
            timeout=20) == [7, 7]
        with pytest.raises(ChordError, match="in a header chain"):
            chord([chain(add.si(1, 1), fail.si("in a header chain")), add.si(1, 1)], xsum.s())().get(timeout=20)
        assert replace_with.delay(group(add.si(i, i) for i in range(3))).get(timeout=20) == [0, 2, 4]
        assert minicelery.xstarmap(add.s(), [(1, 1), (2, 2)]).delay().get(timeout=20) == [2, 4]
        assert my_stamps.si().stamp(tenant="t1").delay().get(timeout=20) == {"tenant": "t1"}


@pytest.mark.interop
def test_interop_canvas_from_real_celery_runs_on_minicelery(app, celery_app, tmp_path):
    from celery import chain as c_chain, chord as c_chord, group as c_group
    with worker(app, tmp_path):
        assert c_chain(celery_add.s(4, 4), celery_mul.s(8))().get(timeout=20) == 64
        assert c_group(celery_add.s(i, i) for i in range(5))().get(timeout=20) == [0, 2, 4, 6, 8]
        assert c_chord((celery_add.s(i, i) for i in range(10)), celery_xsum.s())().get(timeout=20) == 90
        failing = c_chord([celery_add.s(1, 1), celery_fail.s("chordfail")], celery_xsum.s())()
        # Celery's get() raises the header's error when it sees that one first, else the body's
        # ChordError (which it sees first is a race in Celery's client)
        with pytest.raises((ValueError, real_celery.exceptions.ChordError), match="chordfail"):
            failing.get(timeout=20)
        body = AsyncResult(failing.id, app=app)
        wait_until(body.ready, what="the chord body's state")
        assert isinstance(body.result, ChordError) and "chordfail" in str(body.result)
        # issue 23's workflows, built by Celery's canvas, computed by our worker as by Celery's
        assert c_chain(celery_add.si(1, 0), c_group(celery_add.s(1), celery_add.s(1)), celery_xsum.s(),
                       celery_add.s(1))().get(timeout=20) == 5
        assert c_chain(c_chord([celery_add.si(1, 1), celery_add.si(2, 2)], celery_xsum.s()),
                       c_chord([celery_add.s(1), celery_add.s(2)], celery_xsum.s()))().get(timeout=20) == 15
        in_header = c_chord([c_chain(celery_add.si(1, 1), celery_fail.si("in a header chain")),
                             celery_add.si(1, 1)], celery_xsum.s())()
        with pytest.raises(ValueError, match="in a header chain"):
            in_header.get(timeout=20)
        replaced = celery_replace_with.delay(c_group(celery_add.si(i, i) for i in range(3)))
        assert replaced.get(timeout=20) == [0, 2, 4]
        assert celery_add.chunks([(1, 1), (2, 2), (3, 3)], 2)().get(timeout=20) == [[2, 4], [6]]
        assert celery_my_stamps.si().stamp(tenant="t1").delay().get(timeout=20) == {"tenant": "t1"}


def test_cli_beat_and_worker_minus_b(app, tmp_path):
    env = {"MINICELERY_BROKER_URL": app.conf.broker_url,
           "MINICELERY_RESULT_BACKEND": app.conf.result_backend, "TEST_BEAT_STAMPS": str(tmp_path / "cli")}
    proc = subprocess.Popen([sys.executable, "-m", "minicelery", "worker", "test_minicelery", "-B", "-P", "solo"],
                            cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=HERE, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: len(stamps(env["TEST_BEAT_STAMPS"])) >= 2, timeout=20, what="runs from worker -B")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0 and "minicelery beat v" in output and "beat: leading" in output
    app.broker.purge("celery")  # what worker -B's beat sent after the worker stopped
    beat = subprocess.Popen([sys.executable, "-m", "minicelery", "beat", "-A", "test_minicelery", "-s",
                             str(tmp_path / "cli-beat.json"), "--max-interval", "1"],
                            cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=HERE, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: app.broker.size("celery") >= 1, timeout=20, what="a message from beat")
    finally:
        beat.send_signal(signal.SIGTERM)
        output = beat.communicate(timeout=20)[0]
    assert beat.returncode == 0 and ". maxinterval -> 1s" in output



# --- Chaos: prove that nothing is lost (pytest -m chaos; full sizes: examples/chaos.py) ---

CHAOS_FULL = os.environ.get("MINICELERY_CHAOS") == "full"


def chaos_size(full, trimmed):
    return full if CHAOS_FULL else trimmed


def chaos_report(scenario, sent, path, started, ended_otherwise=()):
    """Count a scenario: completed (ran, or ended as expected), duplicates, lost."""
    runs = [int(line) for line in open(path)] if os.path.exists(path) else []
    done = set(runs) | set(ended_otherwise)
    row = {"scenario": scenario, "sent": sent, "completed": len(done & set(range(sent))),
           "duplicates": len(runs) - len(set(runs)), "lost": sent - len(done & set(range(sent))),
           "seconds": round(time.monotonic() - started, 1)}
    if os.environ.get("MINICELERY_CHAOS_REPORT"):
        with open(os.environ["MINICELERY_CHAOS_REPORT"], "a") as f:
            f.write(json.dumps(row) + "\n")
    print(row)
    return row


def _distinct_runs(path):
    return len({line for line in open(path)}) if os.path.exists(path) else 0


def _kill_children_while(w, busy, kills, interval):
    killed = 0
    while killed < kills and busy():
        children = w.children()
        if children:
            os.kill(random.choice(children), signal.SIGKILL)
            killed += 1
        time.sleep(interval)  # paces the fault: a kill every `interval`
    return killed


@pytest.mark.chaos
@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_chaos_children_killed(any_app, tmp_path):
    n, kills, out = chaos_size(2000, 300), chaos_size(100, 15), str(tmp_path / "runs")
    started = time.monotonic()
    for i in range(n):
        chaos_late.delay(i, out, 0.02)
    with worker(any_app, tmp_path, concurrency=4) as w:
        killed = _kill_children_while(w, lambda: _distinct_runs(out) < n, kills, 0.1)
        wait_until(lambda: _distinct_runs(out) >= n, timeout=chaos_size(600, 120), what="every task")
    row = chaos_report(f"1. children killed {killed}x ({_kind(any_app)}, acks_late)",
                       n, out, started)
    assert row["lost"] == 0 and killed > 0


@pytest.mark.chaos
def test_chaos_children_killed_early_ack_fail_loudly(app, tmp_path):
    n, out = chaos_size(300, 100), str(tmp_path / "runs")
    started = time.monotonic()
    results = [chaos_early.delay(i, out, 0.02) for i in range(n)]
    with worker(app, tmp_path, concurrency=4) as w:
        killed = _kill_children_while(w, lambda: _distinct_runs(out) < n, chaos_size(20, 5), 0.1)
        wait_until(lambda: all(r.ready() for r in results), timeout=120, what="every task ended")
    lost_loudly = {i for i, r in enumerate(results) if r.failed() and isinstance(r.result, WorkerLostError)}
    row = chaos_report(f"1b. children killed {killed}x (early ack: WorkerLostError)", n, out, started,
                       lost_loudly)
    assert row["lost"] == 0 and row["duplicates"] == 0


@pytest.mark.chaos
@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_chaos_main_worker_killed(any_app, tmp_path):
    any_app.conf.broker_transport_options = {"visibility_timeout": 1}
    n, kills, out = chaos_size(2000, 300), chaos_size(10, 3), str(tmp_path / "runs")
    started = time.monotonic()
    for i in range(n):
        chaos_late.delay(i, out, 0.01)
    for _ in range(kills):
        with worker(any_app, tmp_path, concurrency=2) as w:
            time.sleep(random.uniform(0.3, 1.0))  # let it take work, then kill it mid-flight
            children = w.children()
            w.stop(signal.SIGKILL)
            for child in children:
                _kill(child)
    with worker(any_app, tmp_path, concurrency=2):
        wait_until(lambda: _distinct_runs(out) >= n, timeout=chaos_size(600, 120), what="every task")
    row = chaos_report(f"2. main worker killed {kills}x ({_kind(any_app)})", n, out, started)
    assert row["lost"] == 0


def _kill(pid_):
    try:
        os.kill(pid_, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.chaos
@pytest.mark.parametrize("ack, down", [("late", 0.3), ("early", 0.3), ("early", chaos_size(10, 2))])
def test_chaos_redis_restarted(app, tmp_path, ack, down):
    """redis-server (appendonly, fsync always) stopped for `down` seconds and started again,
    several times, while a producer sends and a worker runs: every task runs exactly once
    (an ack whose answer was lost is asked again, never replayed blindly)."""
    sock, proc = str(tmp_path / "aof.sock"), []

    def start():
        proc.append(subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", sock,
                                      "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                      "--dir", str(tmp_path)], stdout=subprocess.DEVNULL))
        wait_until(lambda: os.path.exists(sock) and redis.Redis(unix_socket_path=sock).ping(), what="redis")

    start()
    app.conf.update(broker_url=f"unix://{sock}", result_backend=f"unix://{sock}?db=1",
                    task_publish_retry_policy={"max_retries": 20 + int(down * 2), "interval_step": 0.1,
                                               "interval_max": 0.5})
    app.close()
    n, restarts, out = chaos_size(1000, 200), chaos_size(3, 1), str(tmp_path / "runs")
    sent, refused, started = [], [], time.monotonic()
    try:
        with worker(app, tmp_path, concurrency=2) as w:
            def produce():
                for i in range(n):
                    try:
                        sent.append((i, (chaos_late if ack == "late" else chaos_early).delay(i, out, 0.005)))
                    except minicelery.OperationalError:
                        refused.append(i)
            producer = threading.Thread(target=produce)
            producer.start()
            for _ in range(restarts):
                time.sleep(0.5)  # paces the fault: work goes on before each restart
                proc[-1].terminate()
                proc[-1].wait(10)
                time.sleep(down)  # paces the fault: Redis stays down this long
                start()
            producer.join(120)
            try:
                assert all(r.get(timeout=60) == i for i, r in sent)
            except minicelery.ResultTimeout:  # say where the missing ones are
                client = redis.Redis(unix_socket_path=sock)
                missing = [(i, r.id) for i, r in sent if not r.ready()]
                raw = b" ".join(client.lrange("celery", 0, -1) + client.hvals("unacked"))
                print("MISSING", [(i, tid, tid.encode() in raw) for i, tid in missing[:5]], len(missing),
                      "runs", _distinct_runs(out), "queue", client.llen("celery"), "unacked", client.hlen("unacked"))
                raise
            w.wait_for_log("Connection to broker lost")
        row = chaos_report(f"3. redis stopped {down:g}s and restarted, {restarts}x (appendonly, {ack} ack)",
                           len(sent), out, started)
        assert row["lost"] == 0 and not refused and len(sent) == n
    finally:
        for p in proc:
            p.kill()
            p.wait()


@pytest.mark.chaos
def test_chaos_bad_input(app, tmp_path, redis_client):
    n_bad, out = chaos_size(1000, 200), str(tmp_path / "runs")
    app.conf.worker_max_message_size = 100_000
    started, good, bad_with_id = time.monotonic(), [], []
    kinds = ["garbage", "json", "two", "headers", "unknown", "pickle", "arguments", "huge"]
    for i in range(n_bad):
        kind = kinds[i % len(kinds)]
        if kind == "garbage":
            redis_client.lpush("celery", os.urandom(64))
        elif kind == "json":
            redis_client.lpush("celery", b'{"body": "not closed')
        elif kind == "headers":
            redis_client.lpush("celery", json.dumps({"body": "", "properties": {}}))
        else:
            options = {"pickle": {"serializer": "pickle"}}.get(kind, {})
            name = "test_minicelery.nope" if kind == "unknown" else "test_minicelery.chaos_late"
            args = {"arguments": (1, 2, 3, 4, 5), "huge": ("x" * 200_000, out, 0)}.get(kind, (i, out, 0))
            result = app.send_task(name, args, **options)
            if kind == "two":
                raw = json.loads(redis_client.lpop("celery"))
                raw["body"] = base64.b64encode(json.dumps([[1], {}]).encode()).decode()
                redis_client.lpush("celery", json.dumps(raw))
            bad_with_id.append(result)
        good.append(chaos_late.delay(n_bad + i, out, 0))  # good work interleaved with the bad
    with worker(app, tmp_path, concurrency=2) as w:
        assert [r.get(timeout=60) for r in good] == list(range(n_bad, 2 * n_bad))
        wait_until(lambda: all(r.ready() for r in bad_with_id), timeout=60, what="every bad message handled")
        assert w.alive()
    assert all(r.failed() for r in bad_with_id)
    assert len(app.broker.dead_letters()) == n_bad and redis_client.hlen("unacked") == 0
    said = [line for line in w.log().splitlines() if "can't" in line or "unregistered" in line]
    assert len(said) == n_bad  # logged once each
    # Report: the good tasks, every one completed beside the bad.
    shifted = str(tmp_path / "good")
    with open(shifted, "w") as f:
        f.writelines(f"{int(line) - n_bad}\n" for line in open(out))
    row = chaos_report(f"4. bad input ({n_bad} bad messages interleaved)", n_bad, shifted, started)
    assert row["lost"] == 0 and row["duplicates"] == 0


@pytest.mark.chaos
def test_chaos_results_that_cannot_be_stored(app, tmp_path):
    n, started = chaos_size(200, 50), time.monotonic()
    with worker(app, tmp_path, concurrency=1):
        child = pid.delay().get(timeout=10)
        results = [unserializable_result.delay() for _ in range(n)]
        for r in results:
            with pytest.raises(EncodeError):
                r.get(timeout=30)
        assert pid.delay().get(timeout=10) == child  # the child survived them all
    path = str(tmp_path / "none")
    row = chaos_report("5. results that can't be stored (EncodeError)", n, path, started, range(n))
    assert row["lost"] == 0


@pytest.mark.chaos
@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_chaos_warm_shutdown_under_load(any_app, tmp_path):
    n, out = chaos_size(500, 200), str(tmp_path / "runs")
    started = time.monotonic()
    # All queued before the worker starts: sending them while it runs could take
    # longer than the first two run, on a busy machine.
    running = [chaos_late.delay(i, out, 5.0) for i in range(2)]
    for i in range(2, n):
        chaos_late.delay(i, out, 0)
    with worker(any_app, tmp_path, concurrency=2, hostname="shut@%h") as w:
        node = minicelery._expand_hostname("shut@%h")
        inspect = any_app.control.inspect(destination=[node], timeout=5.0)
        # (a process may take both long ones at once: the second waits up to 0.1 s, then the
        # other process runs it once it is done with its batch: long enough for both to overlap)
        wait_until(lambda: {a["id"] for a in (inspect.active() or {}).get(node, ())} == {r.id for r in running},
                   what="the two long tasks running")
        assert all(r.state == "PENDING" for r in running)
        w.stop(signal.SIGTERM)
    assert all(r.get(timeout=10) in (0, 1) for r in running)
    with worker(any_app, tmp_path, concurrency=2):
        wait_until(lambda: _distinct_runs(out) >= n, timeout=60, what="the rest")
    row = chaos_report(f"6. warm shutdown with {n} queued ({_kind(any_app)})", n, out, started)
    assert row["lost"] == 0 and row["duplicates"] == 0


@pytest.mark.chaos
def test_chaos_security_password_and_no_pickle(tmp_path):
    import socket as socket_
    with socket_.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", "s3cret", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: redis.Redis(port=port, password="s3cret").ping() if _port_open(port) else False,
                   what="password redis")
        app_ = APP
        app_.close()
        app_.conf = Config()
        app_.conf.update(broker_url=f"redis://:s3cret@127.0.0.1:{port}/0",
                         result_backend=f"redis://:s3cret@127.0.0.1:{port}/1")
        with worker(app_, tmp_path):
            assert add.delay(1, 2).get(timeout=10) == 3
            with pytest.raises(minicelery.ContentDisallowed):
                app_.send_task("test_minicelery.add", (1, 1), serializer="pickle").get(timeout=10)
            with pytest.raises(NotRegistered):
                app_.send_task("os.system", ("echo pwned",)).get(timeout=10)
        wrong = Celery("wrong", broker=f"redis://:nope@127.0.0.1:{port}/0", set_as_current=False)
        with pytest.raises(redis.AuthenticationError):
            wrong.broker.size("celery")
        assert app_.broker.client.ttl("minicelery:dead-letters") > 0
        row = chaos_report("7. password Redis; pickle and unregistered names refused", 3, str(tmp_path / "x"),
                           time.monotonic(), range(3))
        assert row["lost"] == 0
    finally:
        proc.kill()
        proc.wait()
        APP.close()


def _port_open(port):
    import socket as socket_
    with socket_.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kind(app_):
    return "sqlite" if app_.broker_url.startswith("sqlite") else "redis"


# --- Chaos: hostile environments ----------------------------------------------------
# A paused Redis, a full Redis, a full disk under SQLite, malformed control
# messages, and tasks that break their own stdout.


class _ExplodingStream:
    """A stand-in for sys.stdout whose every write and flush fails."""

    def write(self, text):
        raise OSError(errno.EIO, "this stdout explodes")

    def flush(self):
        raise OSError(errno.EIO, "this stdout explodes")

    def fileno(self):
        raise OSError(errno.EBADF, "this stdout has no file descriptor")

    def close(self):
        raise OSError(errno.EIO, "this stdout explodes")


STDOUT_BREAKERS = ["nothing", "sys.stdout.close()", "os.close(1)", "os.close(stdout's fd)",
                   "a stdout that raises", "print to a closed pipe"]


@APP.task(ignore_result=True)
def break_stdout(i, path, how):
    """Records its run, then leaves its process's stdout broken in the way `how` says."""
    record.run(i, path)
    if how == "sys.stdout.close()":
        sys.stdout.close()  # in a forked test worker, sys.stderr is the same object
    elif how == "os.close(1)":
        print("left in the buffer", end="")
        os.close(1)
    elif how == "os.close(stdout's fd)":
        print("left in the buffer", end="")
        os.close(sys.stdout.fileno())
    elif how == "a stdout that raises":
        sys.stdout = sys.stderr = _ExplodingStream()
    elif how == "print to a closed pipe":
        read_end, write_end = os.pipe()
        os.close(read_end)
        os.dup2(write_end, sys.stdout.fileno())
        os.close(write_end)
        print("into a pipe nobody reads", end="")  # EPIPE when flushed


# --- helpers ------------------------------------------------------------------------

def _settle(condition, timeout):
    """wait_until that returns False at the deadline instead of failing, so the
    test can report what is missing before it asserts."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _runs(path):
    return [int(line) for line in open(path)] if os.path.exists(path) else []


def _renumbered(path, order, out):
    """Write the runs in `path` renumbered by `order` (index -> position), for chaos_report,
    which counts 0..sent-1. Runs of indices not in `order` get numbers past the end, so
    they still count as duplicates when they ran twice."""
    extra = {}
    with open(out, "w") as f:
        for i in _runs(path):
            number = order.get(i)
            if number is None:
                number = extra.setdefault(i, len(order) + len(extra))
            f.write(f"{number}\n")
    return out


def _tail(w, lines=15):
    """The worker's last warnings and errors (with their tracebacks), then its last lines."""
    log = w.log().splitlines()
    ready = max((n for n, line in enumerate(log) if line.endswith(" ready.")), default=0)
    loud = [line for line in log[ready + 1:] if "INFO/" not in line and "DEBUG/" not in line]
    return "\n".join(loud[-lines:] + ["..."] + log[-5:])


def _process_state(pid_):
    with open(f"/proc/{pid_}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _use_private_redis(app_, sock):
    app_.conf.update(broker_url=f"unix://{sock}", result_backend=f"unix://{sock}?db=1")
    app_.close()


def _start_redis(tmp_path, name, *options):
    """A redis-server of the test's own on a unix socket (private_redis with options)."""
    sock = str(tmp_path / f"{name}.sock")
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", sock,
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path), *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: redis.Redis(unix_socket_path=sock, protocol=2).ping() if os.path.exists(sock) else
                   proc.poll() is not None, what=f"redis-server {name}")
        assert proc.poll() is None, f"redis-server {' '.join(options)} did not start"
    except BaseException:
        proc.kill()  # (a test that fails here must not leave its server behind)
        raise
    return sock, proc


def _in_background(function, *args):
    """Run function(*args) in a daemon thread; returns (thread, box) where box gets
    'outcome' (the return value or the exception) and 'seconds'."""
    box = {}

    def run():
        started = time.monotonic()
        try:
            box["outcome"] = function(*args)
        except BaseException as exc:
            box["outcome"] = exc
        box["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# --- 8. Redis paused (SIGSTOP) for longer than the socket timeout ---------------------

PAUSE = 7.0           # seconds: longer than redis-py's 5 s socket timeout
GET_TIMEOUT = 2.0     # get(timeout=) asked for during the pause
GET_SLACK = 1.5       # what get() may take beyond its timeout


@pytest.mark.chaos
def test_chaos_redis_paused(app, tmp_path, private_redis):
    """redis-server SIGSTOPped for 7 s, while a producer keeps sending and two
    workers (early ack) consume: every task delay() took runs exactly once, a
    get(timeout=2) during the pause ends with ResultTimeout on time, and both
    workers live on. delay() may refuse (OperationalError) while Redis is away."""
    sock, procs, _ = private_redis
    _use_private_redis(app, sock)
    redis_pid = procs[0].pid
    pauses, out = chaos_size(3, 1), str(tmp_path / "runs")
    sent, refused, gets = {}, [], []
    stop = threading.Event()
    started = time.monotonic()

    def produce():
        i = 0
        while not stop.is_set():
            try:
                sent[i] = chaos_early.delay(i, out, 0.005)
            except minicelery.OperationalError:
                refused.append(i)
            i += 1
            time.sleep(0.02)  # paces the producer: about 40 tasks a second

    def get_something_never_sent():
        return AsyncResult(minicelery.uuid(), app=app).get(timeout=GET_TIMEOUT)

    try:
        with worker(app, tmp_path, concurrency=2) as w1, worker(app, tmp_path, concurrency=2) as w2:
            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            for _ in range(pauses):
                time.sleep(1.0)  # paces the fault: sending and working before each pause
                os.kill(redis_pid, signal.SIGSTOP)
                try:
                    wait_until(lambda: _process_state(redis_pid) == "T", what="redis-server stopped")
                    getter, box = _in_background(get_something_never_sent)
                    time.sleep(PAUSE)  # the fault itself
                finally:
                    os.kill(redis_pid, signal.SIGCONT)
                getter.join(120)
                gets.append(box)
            time.sleep(1.0)  # sending and working after the last pause
            stop.set()
            producer.join(120)
            assert not producer.is_alive(), "delay() still blocked two minutes after Redis came back"
            everything_ran = _settle(lambda: set(sent) <= set(_runs(out)), chaos_size(60, 20))
            alive = w1.alive(), w2.alive()
            logs = _tail(w1) + "\n---\n" + _tail(w2)
        order = {i: n for n, i in enumerate(sorted(sent))}
        row = chaos_report(f"8. redis paused {PAUSE:.0f}s x{pauses} (2 workers, early ack)", len(sent),
                           _renumbered(out, order, str(tmp_path / "sent-runs")), started)
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    if not everything_ran:
        client = redis.Redis(unix_socket_path=sock)
        missing = sorted(set(sent) - set(_runs(out)))
        raw = b" ".join(client.lrange("celery", 0, -1) + client.hvals("unacked"))
        print("MISSING", len(missing), [(i, sent[i].id.encode() in raw) for i in missing[:5]],
              "queue", client.llen("celery"), "unacked", client.hlen("unacked"))
    refused_but_ran = sorted(set(refused) & set(_runs(out)))
    print("refused", len(refused), "of which ran anyway", len(refused_but_ran))
    print("get() during the pauses:", [(box.get("outcome"), round(box.get("seconds", -1), 2))
                                       for box in gets])
    assert len(sent) > 0 and row["lost"] == 0 and row["duplicates"] == 0, f"{row}\n{logs}"
    for box in gets:
        outcome, seconds = box.get("outcome"), box.get("seconds")
        assert isinstance(outcome, ResultTimeout), \
            f"get(timeout={GET_TIMEOUT}) during the pause ended with {outcome!r} after {seconds}s"
        assert seconds <= GET_TIMEOUT + GET_SLACK, \
            f"get(timeout={GET_TIMEOUT}) during the pause took {seconds:.1f}s"
    assert alive == (True, True), logs


# --- 9. Redis full (maxmemory, noeviction) ----------------------------------------------

#: seconds a full Redis or disk stays full after the worker first said so
FULL_FOR = 2.0


def _memory_errors(log):
    """Log lines at ERROR or WARNING that say Redis is out of memory."""
    return [line for line in log.splitlines()
            if ("ERROR" in line or "WARNING" in line)
            and any(word in line for word in ("maxmemory", "OutOfMemory", "OOM", "out of memory"))]


@pytest.mark.chaos
def test_chaos_redis_full(app, tmp_path):
    """Redis at its maxmemory with noeviction: every write is refused (OOM) while a
    worker runs and tasks wait. The worker says so and stays up, delay() raises
    OperationalError, and once memory is freed every accepted task runs once."""
    sock, proc = _start_redis(tmp_path, "small", "--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    client = redis.Redis(unix_socket_path=sock)
    try:
        _use_private_redis(app, sock)
        n, out = chaos_size(1000, 200), str(tmp_path / "runs")
        started = time.monotonic()
        with worker(app, tmp_path, concurrency=2) as w:
            for i in range(n):
                chaos_early.delay(i, out, 0.01)
            client.setrange("filler", 16 * 2 ** 20, b"x")  # 16 MB over an 8 MB limit
            with pytest.raises(redis.OutOfMemoryError):
                client.lpush("probe", "x")  # the fault is real: writes are refused
            with pytest.raises(minicelery.OperationalError):
                chaos_early.delay(n, out, 0)
            wait_until(lambda: _memory_errors(w.log()) or not w.alive(), timeout=20,
                       what="the worker to report the full Redis")
            time.sleep(FULL_FOR)  # paces the fault: Redis stays full while the worker goes on trying
            assert w.alive(), _tail(w)
            still_waiting = n - len(set(_runs(out)))
            client.delete("filler")
            everything_ran = _settle(lambda: _distinct_runs(out) >= n, chaos_size(120, 20))
            assert add.delay(2, 2).get(timeout=20) == 4
            assert w.alive(), _tail(w)
        row = chaos_report(f"9. redis full (maxmemory, noeviction), {still_waiting} waiting",
                           n, out, started)
        assert everything_ran and row["lost"] == 0 and row["duplicates"] == 0, f"{row}\n{_tail(w)}"
        assert still_waiting > 0  # the test did hold tasks back while Redis was full
    finally:
        proc.kill()
        proc.wait()


# --- 10. SQLite on a full disk --------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 8 MiB tmpfs of the test's own: a disk that can really fill up."""
    if os.geteuid() != 0:
        pytest.skip("a full disk here is a small tmpfs, and mounting one needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    directory = tmp_path / "disk"
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"can't mount a tmpfs for a full disk: {done.stderr.strip()}")
    yield directory
    # This process keeps its SQLite connection open (one per database per process): detach lazily.
    if subprocess.run(["umount", str(directory)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def _fill(path):
    """Write zeros to `path` until the disk is full; returns the bytes written."""
    fd, written = os.open(path, os.O_WRONLY | os.O_CREAT), 0
    try:
        while True:
            written += os.write(fd, b"\0" * 65536)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return written


@pytest.mark.chaos
def test_chaos_sqlite_disk_full(tmp_path, small_disk):
    """The disk under the SQLite broker fills up while a worker works: it logs that
    the disk is full (not a masking "cannot rollback"), stays up, and once space is
    freed runs every queued task, none twice."""
    app_ = APP
    app_.close()
    app_.conf = Config()
    app_.conf.update(broker_url=f"sqlite:///{small_disk}/minicelery.db")
    n, out = chaos_size(300, 100), str(tmp_path / "runs")
    started = time.monotonic()
    try:
        with worker(app_, tmp_path, concurrency=2) as w:
            for i in range(n):
                chaos_early.delay(i, out, 0.05)  # ~2.5 s of work: most of it waits for the full disk
            filler = small_disk / "filler"
            _fill(filler)
            assert shutil.disk_usage(small_disk).free < 65536
            wait_until(lambda: "disk is full" in w.log() or not w.alive(), timeout=20,
                       what="the worker to report the full disk")
            time.sleep(FULL_FOR)  # paces the fault: the disk stays full while the worker goes on trying
            assert w.alive(), _tail(w)
            assert "cannot rollback" not in w.log(), _tail(w)
            still_waiting = n - len(set(_runs(out)))
            os.unlink(filler)
            everything_ran = _settle(lambda: _distinct_runs(out) >= n, chaos_size(120, 20))
            assert add.delay(2, 2).get(timeout=20) == 4
            assert w.alive(), _tail(w)
        row = chaos_report(f"10. sqlite disk full (tmpfs), {still_waiting} waiting", n, out, started)
        assert everything_ran and row["lost"] == 0 and row["duplicates"] == 0, f"{row}\n{_tail(w)}"
        assert still_waiting > 0  # the test did hold tasks back while the disk was full
    finally:
        app_.close()


# --- 11. Hostile control messages ------------------------------------------------------

def _pidbox_envelope(body, encode=True):
    """A Celery pidbox broadcast, as RedisBroker.revoke builds it, around `body`."""
    if encode:
        body = base64.b64encode(body if isinstance(body, bytes) else body.encode()).decode()
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"clock": 1, "expires": time.time() + 60},
        "properties": {"delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
                       "delivery_tag": minicelery.uuid()}})


def _revoke(destination=None, **arguments):
    return json.dumps({"method": "revoke", "arguments": arguments, "destination": destination,
                       "pattern": None, "matcher": None})


def _hostile_broadcasts():
    """(label, make) pairs: make(running) is the raw broadcast, where `running` is the
    id of a task running at the time (so a bad terminate has something to hit)."""
    nobody = minicelery.uuid()
    return [
        ("signal 'term'", lambda running: _pidbox_envelope(
            _revoke(task_id=running, terminate=True, signal="term"))),
        ("signal 'SIGNOPE'", lambda running: _pidbox_envelope(
            _revoke(task_id=running, terminate=True, signal="SIGNOPE"))),
        ("signal 12345", lambda running: _pidbox_envelope(
            _revoke(task_id=running, terminate=True, signal=12345))),
        ("task_id a dict", lambda running: _pidbox_envelope(
            _revoke(task_id={"id": running}, terminate=True))),
        ("task_id an int", lambda running: _pidbox_envelope(_revoke(task_id=12345, terminate=True))),
        ("task_id a list of ints", lambda running: _pidbox_envelope(
            _revoke(task_id=[1, 2, 3], terminate=True))),
        ("destination an int", lambda running: _pidbox_envelope(
            _revoke(destination=7, task_id=nobody, terminate=True))),
        ("destination a string", lambda running: _pidbox_envelope(
            _revoke(destination="celery@nowhere", task_id=nobody))),
        ("arguments missing", lambda running: _pidbox_envelope(json.dumps({"method": "revoke"}))),
        ("arguments a list", lambda running: _pidbox_envelope(
            json.dumps({"method": "revoke", "arguments": [running]}))),
        ("body not base64", lambda running: _pidbox_envelope("%%% not base64 %%%", encode=False)),
        ("body not JSON", lambda running: _pidbox_envelope(b"\xff\xfe not json")),
        ("body nested 100,000 deep", lambda running: _pidbox_envelope(b"[" * 100_000)),
        ("envelope not JSON", lambda running: b"\x00\xff garbage"),
        ("envelope a JSON list", lambda running: "[1, 2, 3]"),
        ("a 5 MB body", lambda running: _pidbox_envelope(_revoke(task_id=nobody) + " " * 5_000_000)),
    ]


def _control_error_lines(log):
    return [line for line in log.splitlines()
            if "Control command error" in line or "control message" in line]


class _Victim:
    """A task kept running in the worker, for bad terminates to aim at. Short enough
    that a worker whose shutdown waits for it (after a test failed) still stops."""

    SECONDS = 8

    def __init__(self, tmp_path):
        self.tmp_path, self.count, self.result = tmp_path, 0, None

    def start(self):
        self.count += 1
        started = str(self.tmp_path / f"started-{self.count}")
        self.result = counted_sleep.delay(started, self.SECONDS)
        wait_until(lambda: lines_in(started) == 1, what="a long task to be running")
        return self.result.id


def _survive_each(app_, tmp_path, stack, w, faults, out):
    """Inject each (label, inject) fault (inject gets the id of a running task), then
    run a task through the worker. A fault after which the worker died is noted and
    the worker replaced. Returns the labels of the faults that killed it, and the
    worker now running."""
    killers, victim = [], _Victim(tmp_path)
    running = victim.start()
    for k, (label, inject) in enumerate(faults):
        children = w.children()
        inject(running)
        proof = chaos_early.delay(k, out, 0)  # behind the fault: the worker reads control first
        if not _settle(lambda: proof.ready() or not w.alive(), 5) or not w.alive():
            killers.append(label)
            for child in children:  # the long task may hold up its shutdown: end it
                _kill(child)
            _settle(lambda: not w.alive(), 5)  # then it exits, with its traceback
            print(f"KILLED BY {label}:\n{_tail(w, 12)}")
            w.stop(signal.SIGKILL)
            w = stack.enter_context(worker(app_, tmp_path, concurrency=2))
            proof.get(timeout=15)  # the replacement runs what the dead one left
            victim.result.revoke()  # it died with the old worker; never run it again
            running = victim.start()
        elif victim.result.ready():  # a bad terminate was taken as a good one: aim at a new task
            running = victim.start()
    victim.result.revoke(terminate=True)
    return killers, w


def _valid_revokes_still_work(w, tmp_path):
    """A valid revoke reaches the worker: one for a task it holds, one for a running task."""
    held = echo.apply_async(("held",), countdown=2)
    w.wait_for_log(f"[{held.id}] received")
    held.revoke()
    with pytest.raises(TaskRevokedError):
        held.get(timeout=10)
    started = str(tmp_path / "started-last")
    sleeper = counted_sleep.delay(started, _Victim.SECONDS)
    wait_until(lambda: lines_in(started) == 1, what="a task to be running")
    sleeper.revoke(terminate=True)
    with pytest.raises(TaskRevokedError, match="terminated"):
        sleeper.get(timeout=_Victim.SECONDS + 5)
    assert w.alive(), _tail(w)
    assert "'held'" not in w.log()


@pytest.mark.chaos
def test_chaos_hostile_control_messages_redis(app, tmp_path, redis_client):
    """Malformed revoke broadcasts on the pidbox channel (bad signals, ids and
    destinations, no arguments, not base64, not JSON, too deep, 5 MB): the worker
    logs them and keeps running tasks; a valid revoke afterwards still works."""
    out, started = str(tmp_path / "runs"), time.monotonic()
    broadcasts = _hostile_broadcasts()

    def broadcaster(make):
        def publish(running):
            receivers = redis_client.publish(app.broker.pidbox, make(running))
            assert receivers >= 1, "no worker listens on the pidbox"
        return publish

    faults = [(label, broadcaster(make)) for label, make in broadcasts]
    with contextlib.ExitStack() as stack:
        w = stack.enter_context(worker(app, tmp_path, concurrency=2))
        killers, w = _survive_each(app, tmp_path, stack, w, faults, out)
        assert not killers, f"malformed broadcasts that killed the worker: {killers}"
        assert _control_error_lines(w.log()), "no 'Control command error' line for the malformed broadcasts"
        _valid_revokes_still_work(w, tmp_path)
    row = chaos_report(f"11. {len(broadcasts)} malformed revoke broadcasts (redis)", len(broadcasts),
                       out, started)
    assert row["lost"] == 0 and row["duplicates"] == 0


@pytest.mark.chaos
def test_chaos_malformed_broadcasts_do_not_swallow_their_neighbours(app, tmp_path, redis_client):
    """Each malformed broadcast sent between two valid revokes, in one go (so the
    worker reads all three together): both valid revokes still take effect, the
    tasks they name never run. A bad message is dropped alone, not with its batch."""
    out, started, swallowed = str(tmp_path / "runs"), time.monotonic(), []
    broadcasts = _hostile_broadcasts()
    with worker(app, tmp_path, concurrency=2) as w:
        wait_until(lambda: redis_client.pubsub_numsub(app.broker.pidbox)[0][1] >= 1,
                   what="the worker listening on the pidbox")
        for k, (label, make) in enumerate(broadcasts):
            held = [echo.apply_async((f"{label}: {side}",), countdown=2.5) for side in ("before", "after")]
            for result in held:
                w.wait_for_log(f"[{result.id}] received")
            with redis_client.pipeline() as pipe:  # MULTI: delivered back to back
                pipe.publish(app.broker.pidbox, _pidbox_envelope(_revoke(task_id=held[0].id)))
                pipe.publish(app.broker.pidbox, make(minicelery.uuid()))
                pipe.publish(app.broker.pidbox, _pidbox_envelope(_revoke(task_id=held[1].id)))
                pipe.execute()
            _settle(lambda: all(result.ready() for result in held) or not w.alive(), 10)
            assert w.alive(), f"the worker died on {label}:\n{_tail(w)}"
            states = [result.state for result in held]
            assert all(state in ("SUCCESS", "REVOKED") for state in states), (label, states)
            ran = [side for side, state in zip(("before", "after"), states) if state == "SUCCESS"]
            if ran:
                swallowed.append(f"{label} (revoke {' and '.join(ran)} lost)")
            else:
                record.run(k, out)  # this hostile broadcast left its neighbours alone
    row = chaos_report("11c. malformed broadcasts between valid revokes (redis)", len(broadcasts),
                       out, started)
    assert not swallowed, f"valid revokes lost next to a malformed broadcast: {swallowed}"
    assert row["lost"] == 0


@pytest.fixture
def sqlite_app(tmp_path):
    app_ = APP
    app_.close()
    app_.conf = Config()
    app_.conf.update(broker_url=f"sqlite:///{tmp_path}/minicelery.db")
    yield app_
    app_.close()


@pytest.mark.chaos
def test_chaos_hostile_revocation_rows_sqlite(sqlite_app, tmp_path):
    """Revocation rows another version (or a person with sqlite3) wrote with bad
    values: the worker logs them and keeps running tasks. A bad signal is refused at
    the call site, and a valid revoke afterwards still works."""
    out, started = str(tmp_path / "runs"), time.monotonic()
    sqlite_app.broker.size("celery")  # creates the tables
    database = sqlite3.connect(str(tmp_path / "minicelery.db"), timeout=30, isolation_level=None)

    def row(task_id, signal_name):
        def insert(running):  # a durable revocation, and its broadcast (raw bytes for a blob id)
            database.execute("INSERT INTO revocations (task_id, expires, terminate, signal) "
                             "VALUES (?, ?, 1, ?)", (task_id or running, time.time() + 3600, signal_name))
            body = {"method": "revoke", "arguments": {"task_id": running, "terminate": True, "signal": signal_name}}
            raw = task_id if isinstance(task_id, bytes) else _pidbox_broadcast(json.dumps(body))
            database.execute("INSERT INTO broadcasts (time, raw) VALUES (?, ?)", (time.time(), raw))
        return insert

    rows = [("signal 'SIGNOPE'", row(None, "SIGNOPE")),
            ("signal 'term'", row(None, "term")),
            ("signal '12345'", row(None, "12345")),
            ("signal ''", row(None, "")),
            ("task_id a blob", row(b"\x00\xff", "SIGTERM"))]
    try:
        with contextlib.ExitStack() as stack:
            w = stack.enter_context(worker(sqlite_app, tmp_path, concurrency=2))
            killers, w = _survive_each(sqlite_app, tmp_path, stack, w, rows, out)
            assert not killers, f"revocation rows that killed the worker: {killers}"
            assert _control_error_lines(w.log()), "no 'Control command error' line for the bad rows"
            # At the call site, a signal that does not exist is a clear error, and nothing is written.
            count = database.execute("SELECT COUNT(*) FROM revocations").fetchone()[0]
            with pytest.raises((ValueError, TypeError), match="SIGNOPE"):
                sqlite_app.control.revoke(minicelery.uuid(), terminate=True, signal="SIGNOPE")
            assert database.execute("SELECT COUNT(*) FROM revocations").fetchone()[0] == count
            _valid_revokes_still_work(w, tmp_path)
    finally:
        database.close()
    report = chaos_report(f"11b. {len(rows)} bad revocation rows (sqlite)", len(rows), out, started)
    assert report["lost"] == 0 and report["duplicates"] == 0


# --- 12. Tasks that break their process's stdout ------------------------------------

@contextlib.contextmanager
def _forks_stay_out():
    """End any forked copy of this process that gets here.

    A pool child that escapes its os._exit runs its parent's code, and if that
    escapes worker()'s os._exit too (its stderr is broken), it unwinds into this
    test as a second pytest, which would run the rest of the session (and hold
    the terminal's pipe open). Such a copy ends here instead.
    """
    pid = os.getpid()
    try:
        yield
    finally:
        if os.getpid() != pid:
            os._exit(70)


def _drained(app_):
    """No message waiting or held anywhere in the broker."""
    broker = app_.broker
    if isinstance(broker, minicelery.SQLiteBroker):
        return broker.store.read("SELECT COUNT(*) FROM messages")[0][0] == 0
    return broker.size("celery") == 0 and broker.client.hlen(broker.UNACKED) == 0


@pytest.mark.chaos
@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_chaos_children_break_their_stdout(any_app, tmp_path):
    """Tasks close sys.stdout, close fd 1, swap in a stdout that raises, or leave
    output for a closed pipe, in children recycled every 3 tasks: each task runs
    exactly once (early ack), so no child ever runs the worker's own code, and the
    worker lives on."""
    n, out = chaos_size(600, 60), str(tmp_path / "runs")
    started = time.monotonic()
    for i in range(n):  # queued first, so the worker holds a full prefetch from the start
        break_stdout.delay(i, out, STDOUT_BREAKERS[i % len(STDOUT_BREAKERS)])
    with _forks_stay_out(), worker(any_app, tmp_path, concurrency=2, max_tasks_per_child=3) as w:
        everything_ran = _settle(lambda: _distinct_runs(out) >= n, chaos_size(120, 30))
        # Everything is out of the broker and one more task goes through: no straggler left
        # to run a second time.
        wait_until(lambda: _drained(any_app), what="the broker to be empty")
        assert add.delay(2, 2).get(timeout=15) == 4
        assert w.alive(), _tail(w)
    row = chaos_report(f"12. children break their stdout, recycled every 3 ({_kind(any_app)})",
                       n, out, started)
    assert everything_ran and row["lost"] == 0 and row["duplicates"] == 0, f"{row}\n{_tail(w, 40)}"


# --- 13. The worker's own faults: frozen processes, floods, rejections, slow errbacks ------
# Each past the visibility timeout where it matters, with a second worker taking what
# looks abandoned: an early-ack task may be delayed, never run twice; nothing is lost.

def _freeze(pids, seconds):
    """SIGSTOP `pids` for `seconds` (the fault itself), then SIGCONT them."""
    for pid_ in pids:
        os.kill(pid_, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for pid_ in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid_, signal.SIGCONT)


FREEZES = {  # what is frozen: (the pids to stop, given the worker; seconds; how many times)
    "main": (lambda w: [w.pid], chaos_size(6.0, 3.0), 1),
    "worker": (lambda w: [w.pid, *w.children()], chaos_size(5.0, 3.0), 2),
    "pool process": (lambda w: w.children()[:1], chaos_size(5.0, 3.0), 8),
}
#: the visibility timeout of the freeze scenarios: shorter than each freeze
FREEZE_VISIBILITY = chaos_size(3, 2)


@pytest.mark.chaos
@pytest.mark.parametrize("frozen", list(FREEZES))
def test_chaos_frozen_past_the_visibility_timeout(app, tmp_path, frozen):
    """Worker A's main process, its whole process group (as `docker pause` does) or one of
    its pool processes is SIGSTOPped past the visibility timeout while worker B runs: B
    takes what A held, and A, woken, runs none of it again (early ack)."""
    app.conf.broker_transport_options = {"visibility_timeout": FREEZE_VISIBILITY}
    pids_of, seconds, times = FREEZES[frozen]
    n, out, started = chaos_size(2000, 600), str(tmp_path / "runs"), time.monotonic()
    for i in range(n):
        chaos_early.delay(i, out, 0.01)
    with worker(app, tmp_path, concurrency=2) as a, worker(app, tmp_path, concurrency=2) as b:
        for _ in range(chaos_size(times, 1)):
            wait_until(lambda: len(a.children()) == 2, what="worker A's pool")
            _freeze(pids_of(a), seconds)
            time.sleep(0.5)  # paces the fault: A works a moment before the next freeze
        everything_ran = _settle(lambda: _distinct_runs(out) >= n, chaos_size(300, 120))
        alive = a.alive() and b.alive()
        logs = _tail(a) + "\n---\n" + _tail(b)
    row = chaos_report(f"13. {frozen} frozen {seconds:.0f}s x{chaos_size(times, 1)} (visibility "
                       f"{FREEZE_VISIBILITY} s, 2 workers, early ack)", n, out, started)
    assert everything_ran and alive and row["lost"] == 0 and row["duplicates"] == 0, f"{row}\n{logs}"


@APP.task
def spin(seconds):
    """Busy for `seconds` (no sleep: a hard time limit has to kill it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "spun"


def _ping(app_, hostname):
    """Whether the worker `hostname` answers a ping within a second."""
    return bool(app_.control.ping(destination=[hostname], timeout=1.0))


@pytest.mark.chaos
def test_chaos_a_long_task_with_a_hard_limit_beside_a_stream(app, tmp_path):
    """A task spinning until its hard time limit kills it, beside a steady stream of short
    ones and then a flood of revoke() calls: the limit fires on time, the stream goes on,
    and the worker answers every ping meanwhile."""
    limit, n = chaos_size(180, 5), chaos_size(1200, 30)
    out, started, pings = str(tmp_path / "runs"), time.monotonic(), []
    with worker(app, tmp_path, concurrency=2, hostname="stream@%h") as w:
        node = minicelery._expand_hostname("stream@%h")
        spun_at = time.monotonic()
        long = spin.apply_async((limit * 10,), time_limit=limit)
        for i in range(n):  # about 7 a second, each 0.15 s
            chaos_early.delay(i, out, 0.15)
            time.sleep(0.14)
            if i % 20 == 0:
                pings.append(_ping(app, node))
        for i in range(chaos_size(4000, 1000)):  # then a flood of single revokes
            app.control.revoke(f"flood-{i}")
        pings.append(_ping(app, node))
        with pytest.raises(minicelery.TimeLimitExceeded):
            long.get(timeout=limit * 2 + 30)
        killed_after = time.monotonic() - spun_at
        everything_ran = _settle(lambda: _distinct_runs(out) >= n, 60)
        assert w.alive(), _tail(w)
    row = chaos_report(f"13. a {limit}s hard limit beside {n} short tasks, then a revoke flood",
                       n, out, started)
    assert everything_ran and row["lost"] == 0 and row["duplicates"] == 0, row
    assert all(pings), f"{pings.count(False)} of {len(pings)} pings unanswered"
    assert killed_after < max(limit, n * 0.14) + 10, f"the {limit}s limit fired after {killed_after:.0f}s"


@APP.task(bind=True, acks_late=True)
def reject_once(self, i, path):
    """Asks to be requeued the first time it runs, then succeeds."""
    key = f"rejected-{self.request.id}"
    if _marker_redis().set(key, 1, nx=True, ex=600):
        raise Reject("once", requeue=True)
    record.run(i, path)
    return i


@pytest.mark.chaos
def test_chaos_reject_requeue_runs_each_task_once_more(app, tmp_path, redis_client):
    """acks_late with Reject(requeue=True): each rejection requeues the message once, and a
    task that succeeded is acked: nothing stays in unacked, nothing runs a third time."""
    visibility = chaos_size(4, 2)
    app.conf.broker_transport_options = {"visibility_timeout": visibility}
    n, out, started = chaos_size(300, 60), str(tmp_path / "runs"), time.monotonic()
    results = [reject_once.delay(i, out) for i in range(n)]
    with worker(app, tmp_path, concurrency=1):
        assert [r.get(timeout=chaos_size(120, 60)) for r in results] == list(range(n))
        wait_until(lambda: redis_client.hlen("unacked") == 0, what="every message acked")
        time.sleep(visibility + 1)  # paces the check: past the visibility timeout, nothing comes back
        assert redis_client.hlen("unacked") == 0 and redis_client.llen("celery") == 0
    row = chaos_report(f"13. Reject(requeue=True) once each (acks_late, visibility {visibility} s)", n, out, started)
    assert row["lost"] == 0 and row["duplicates"] == 0, row


@APP.task
def sleepy_errback(request, exc, traceback_):
    """An errback of Celery 5's form that takes its time (the failed task's `nap` kwarg), then
    says so in the file its `woke` kwarg names."""
    time.sleep(request.kwargs["nap"])
    with open(request.kwargs["woke"], "w") as f:
        f.write(str(os.getpid()))


@pytest.mark.chaos
def test_chaos_an_errback_that_sleeps_runs_in_a_pool_process(app, tmp_path):
    """A message whose arguments don't fit has its errback run where tasks run, not in the
    main process: while it sleeps, pings are answered, other tasks run, and another task's
    hard time limit fires on time."""
    nap, limit = chaos_size(20, 3), chaos_size(3, 1.5)
    out, started = str(tmp_path / "runs"), time.monotonic()
    with worker(app, tmp_path, concurrency=2, hostname="nap@%h") as w:
        node = minicelery._expand_hostname("nap@%h")
        woke = tmp_path / "woke"
        bad = app.send_task("test_minicelery.add", (1,), {"nap": nap, "woke": str(woke)},  # add(x, y): no fit
                            link_error=sleepy_errback.s())
        wait_until(lambda: bad.state == "FAILURE", what="the bad message failed")
        limited_at = time.monotonic()
        limited = spin.apply_async((60,), time_limit=limit)
        done = [chaos_early.delay(i, out, 0) for i in range(20)]
        pings = [_ping(app, node) for _ in range(3)]
        with pytest.raises(minicelery.TimeLimitExceeded):
            limited.get(timeout=30)
        killed_after = time.monotonic() - limited_at
        assert [r.get(timeout=30) for r in done] == list(range(20))
        assert w.alive() and not woke.exists()  # (all that while the errback slept)
        wait_until(woke.exists, timeout=nap + 15, what="the errback to wake")
        assert int(woke.read_text()) in w.children()  # it ran in a pool process
    row = chaos_report(f"13. an errback sleeping {nap}s beside a {limit:g} s hard limit and 20 tasks", 20, out,
                       started)
    assert all(pings) and row["lost"] == 0 and row["duplicates"] == 0, (pings, row)
    assert killed_after < limit + 2.5, f"the {limit}s limit fired after {killed_after:.1f}s"


# --- Celery projects run unchanged --------------------------------------------
# Celery projects run unchanged: the project layouts, import paths, settings and
# workflow behaviour of real Celery code, through real workers on a real Redis
# (and the zero-setup SQLite broker where it applies).
#
# Project packages are written into tmp_path and run with `python -m minicelery
# -A ... worker`, as their users run them; in-process workers are forked from
# this process by test_minicelery's `worker()` and run the tasks defined below.

# --- tasks the tests use (defined before any worker forks, so workers have them) ----

@APP.task(bind=True, name="x.heavy_task")
def heavy_task(self, value):
    return [value, self.request.delivery_info.get("routing_key")]


@APP.task(bind=True)
def where_it_ran(self, value):
    return [value, self.request.delivery_info.get("routing_key")]


@APP.task
def get_inside(x):
    """Waits on another task's result: Celery refuses that in a worker."""
    return add.delay(x, x).get(timeout=10)


@APP.task
def get_inside_allowed(x):
    return add.delay(x, x).get(timeout=10, disable_sync_subtasks=False)


@APP.task
def group_get_inside(n):
    return group(add.s(i, i) for i in range(n))().get(timeout=10)


@APP.task
def get_inside_join_allowed(x):
    with minicelery.allow_join_result():  # Celery's escape hatch, from celery.result
        return add.delay(x, x).get(timeout=10)


@APP.task
def apply_get_inside(x):
    """Runs get_inside eagerly, in the worker: its get() is not refused."""
    return get_inside.apply((x,)).get()


@APP.task(bind=True, max_retries=3, default_retry_delay=0)
def retry_once(self, x):
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return x


@APP.task(bind=True, max_retries=3, default_retry_delay=0)
def retry_then_fail(self, message):
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    raise ValueError(message)


# --- helpers ------------------------------------------------------------------------

#: settings a developer's shell may export that would steer a project elsewhere
_STRAY = ("DJANGO_SETTINGS_MODULE",)


def project_env(tmp_path, **settings):
    """A clean shell's environment: this checkout and tmp_path on PYTHONPATH, no
    CELERY_*/MINICELERY_* settings, plus `settings`."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CELERY_", "MINICELERY_")) and key not in _STRAY}
    env["PYTHONPATH"] = os.pathsep.join([HERE, str(tmp_path)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def write_tree(root, files):
    """Write {relative path: source} under root (sources dedented)."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))


def run_python(tmp_path, env, code, timeout=60):
    """`python -c code` in tmp_path; its CompletedProcess."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_cli(tmp_path, env, *argv, timeout=30):
    return subprocess.run([sys.executable, "-m", "minicelery", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    """Found by a hostile review: each of these printed a Python traceback."""
    write_tree(tmp_path, PROJ)
    env = project_env(tmp_path)
    for argv, says in [(["call", "proj.tasks.add", "--args", "[1,"], "invalid JSON list value"),
                       (["call", "proj.tasks.add", "--kwargs", "[1]"], "invalid JSON dict value"),
                       (["call", "proj.tasks.add", "--countdown", "nan"], "invalid seconds value"),
                       (["inspect", "ping", "-t", "-1"], "invalid seconds value"),
                       (["worker", "-c", "-1"], "invalid count (1 or more) value"),
                       (["worker", "-l", "bogus"], "invalid log level value"),
                       (["worker", "--logfile", str(tmp_path / "no" / "such.log")], "can't open the log file"),
                       (["multi", "start", "w/../x"], "is not a node name")]:
        out = run_cli(tmp_path, env, "-A", "proj", *argv)
        assert out.returncode in (1, 2) and says in out.stderr and "Traceback" not in out.stderr, (argv, out)
    out = run_cli(tmp_path, env, "-A", ":", "status")
    assert out.returncode == 1 and "can't import the app" in out.stderr and "Traceback" not in out.stderr, out


class CliWorker:
    """A `python -m minicelery ... worker` process, logging to a file."""

    def __init__(self, proc, log_path):
        self.proc, self.log_path, self.returncode = proc, log_path, None

    def log(self):
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text, timeout=20.0):
        wait_until(lambda: text in self.log() or self.proc.poll() is not None, timeout,
                   f"{text!r} in the worker log")
        assert text in self.log(), f"the worker exited ({self.proc.poll()}):\n{self.log()}"


_cli_count = 0


@contextlib.contextmanager
def cli_worker(tmp_path, env, *argv):
    """`python -m minicelery *argv` (a worker) in tmp_path, for the block, once ready."""
    global _cli_count
    _cli_count += 1
    log_path = tmp_path / f"cli-worker-{_cli_count}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minicelery", *argv], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    handle = CliWorker(proc, log_path)
    try:
        handle.wait_for_log("ready.")
        yield handle
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["redis", "sqlite"])
def urls(request, tmp_path):
    """(broker, result backend) for a project: the test Redis, or a SQLite file."""
    if request.param == "redis":
        sock = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_client")  # flushed
        return f"unix://{sock}", f"unix://{sock}?db=1"
    return f"sqlite:///{tmp_path}/x.db", None


def url_env(urls):
    broker, backend = urls
    return {"MINICELERY_BROKER_URL": broker, **({"MINICELERY_RESULT_BACKEND": backend} if backend else {})}


@contextlib.contextmanager
def client(urls):
    """A client app on the project's broker, not the process's current app."""
    broker, backend = urls
    app_ = Celery("client", broker=broker, backend=backend, set_as_current=False)
    try:
        yield app_
    finally:
        app_.close()


@pytest.fixture
def isolated_imports(tmp_path, monkeypatch):
    """tmp_path importable; modules, apps and shared tasks made in the test forgotten after it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    modules, shared, current = set(sys.modules), list(minicelery._shared_tasks), minicelery._current_app
    yield tmp_path
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    minicelery._shared_tasks[:] = shared
    minicelery._current_app = current


#: Celery's "Using Celery in your Application" layout; the broker comes from the environment.
PROJ = {
    "proj/__init__.py": """
        from .celery import app as celery_app

        __all__ = ("celery_app",)
        """,
    "proj/celery.py": """
        from minicelery import Celery

        app = Celery("proj", include=["proj.tasks"])
        """,
    "proj/tasks.py": """
        from minicelery.utils.log import get_task_logger

        from .celery import app

        logger = get_task_logger(__name__)


        @app.task
        def add(x, y):
            logger.info("proj adds %s and %s", x, y)
            return x + y
        """,
}


# --- 1. -A proj finds proj.celery:app -----------------------------------------------

@pytest.mark.parametrize("spec", ["proj", "proj.celery", "proj.celery:app"])
def test_cli_worker_finds_the_app_of_a_celery_project(tmp_path, urls, spec):
    write_tree(tmp_path, PROJ)
    env = project_env(tmp_path, **url_env(urls))
    with cli_worker(tmp_path, env, "-A", spec, "worker", "-c", "1") as w, client(urls) as c:
        assert c.send_task("proj.tasks.add", (2, 3)).get(timeout=20) == 5
        assert ". proj.tasks.add" in w.log()
        w.wait_for_log("proj adds 2 and 3")  # get_task_logger(__name__) reaches the worker log


def _explained(text):
    """The explain-mode lines of a log, as (operation, line)."""
    return [(m.group(1), line) for line in text.splitlines() if (m := re.search(r"explain (\w+): ", line))]


def test_explain_says_a_wait_before_it_waits(app, caplog):
    """A note was held back until its operation returned when its text merely said
    "result" (the SQL table `results`): a get() that timed out never said its wait."""
    app.conf.explain = True
    with caplog.at_level(logging.INFO, logger="minicelery.explain"):
        with pytest.raises(ResultTimeout):
            app.AsyncResult("never-stored").get(timeout=0.2)
    said = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in said] == ["explain wait"] and "never-stored" in said[0], said


def test_a_control_command_that_is_not_a_name_fails_where_it_is_sent(app):
    """It was sent, refused by every worker with the body logged (a secret in it too), and
    explain mode showed it; with reply=True the caller heard "nobody answered"."""
    for command in ({"password": "s3cret"}, None, 5):
        with pytest.raises(TypeError, match="a control command is a name"):
            app.control.broadcast(command, reply=True)


def test_explain_says_an_idle_workers_watch_once(app, caplog, monkeypatch):
    """An idle worker re-arms its watch each time Redis answers "nothing" (every 10 s):
    explain mode said it all again each time."""
    monkeypatch.setattr(minicelery.ListWatcher, "BLOCK", 1)
    app.conf.explain = True
    app.close()
    with caplog.at_level(logging.INFO, logger="minicelery.explain"):
        app.broker.wait(["celery"], 2.5)  # (re-armed twice meanwhile)
    watching = [r for r in caplog.records if r.getMessage().startswith("explain watch:")]
    assert len(watching) == len(minicelery._queue_keys("celery")), [r.getMessage() for r in watching]


def test_explain_mode_tells_one_tasks_life(tmp_path, urls):
    """A client with MINICELERY_EXPLAIN=1 and `worker --explain` log each operation of one
    task's life in order, naming its keys, and never its arguments or result."""
    write_tree(tmp_path, PROJ)
    env = project_env(tmp_path, **url_env(urls))
    with cli_worker(tmp_path, env, "-A", "proj", "worker", "-c", "1", "--explain") as w:
        sent = run_python(tmp_path, dict(env, MINICELERY_EXPLAIN="1"), """
            from proj.tasks import add
            result = add.delay("s3cret-", "argument")
            print(result.id, result.get(timeout=20))
            """)
        assert sent.returncode == 0, sent.stderr
        task_id, value = sent.stdout.split()
        assert value == "s3cret-argument"
        w.wait_for_log("explain store: ")
        worker_lines = _explained(w.log())
    client_lines = _explained(sent.stderr)
    assert [op for op, _ in client_lines] == ["publish", "wait"]
    assert f"celery-task-meta-{task_id}" in client_lines[1][1]
    life = [(op, line) for op, line in worker_lines if op in ("take", "ack", "store")]
    assert [op for op, _ in life] == ["take", "ack", "store"], worker_lines
    tag = re.search(r"(?:HSET unacked|WHERE id = <each of) (\S+?)[ >]", life[0][1]).group(1)
    assert tag in life[1][1]  # the ack names the message the take moved
    if urls[1]:  # Redis: the publish names the delivery tag, and an idle worker watched the list
        assert f"LPUSH celery <message, delivery tag {tag}," in client_lines[0][1]
        assert worker_lines[0][0] == "watch" and "BLMOVE celery celery RIGHT RIGHT" in worker_lines[0][1]
    assert f"celery-task-meta-{task_id}" in life[2][1] and "SUCCESS" in life[2][1]
    assert not [line for _, line in client_lines + worker_lines if "s3cret" in line]
    # Off by default; on as soon as it is set, also after the broker was first used.
    toggled = run_python(tmp_path, env, """
        from proj.celery import app
        from proj.tasks import add
        add.delay(1, 2)
        app.conf.explain = True
        add.delay(3, 4)
        """)
    assert toggled.returncode == 0 and [op for op, _ in _explained(toggled.stderr)] == ["publish"], toggled.stderr
    # The solo pool explains its acks too (on Redis they ride with its next take), and a bad
    # message's dead letter is explained without its reason (which may quote what it carried).
    with cli_worker(tmp_path, env, "-A", "proj", "worker", "-P", "solo", "--explain") as w:
        with client(urls) as c:
            assert c.send_task("proj.tasks.add", (1, 2)).get(timeout=20) == 3
            with pytest.raises(TypeError):
                c.send_task("proj.tasks.add", (1, 2), {"s3cret_kw": 1}).get(timeout=20)
        w.wait_for_log("explain dead_letter: ")
        w.wait_for_log("explain ack")
        assert "s3cret" in w.log() and not [line for _, line in _explained(w.log()) if "s3cret" in line]
    # A value that means neither on nor off fails where it enters.
    unclear = run_python(tmp_path, dict(env, MINICELERY_EXPLAIN="maybe"), "import proj")
    assert unclear.returncode != 0 and "$MINICELERY_EXPLAIN must be 1 or 0" in unclear.stderr


def test_find_app_follows_celerys_order(isolated_imports):
    write_tree(isolated_imports, {
        "fa_both.py": """
            from minicelery import Celery
            celery = Celery("by_celery_attr", set_as_current=False)
            app = Celery("by_app_attr", set_as_current=False)
            """,
        "fa_celery_attr.py": """
            from minicelery import Celery
            other = Celery("other", set_as_current=False)
            celery = Celery("by_celery_attr", set_as_current=False)
            """,
        "fa_pkg/__init__.py": "",
        "fa_pkg/celery.py": """
            from minicelery import Celery
            app = Celery("in_submodule", set_as_current=False)
            """,
        "fa_pkg_first/__init__.py": """
            from minicelery import Celery
            mine = Celery("in_package", set_as_current=False)
            """,
        "fa_pkg_first/celery.py": """
            from minicelery import Celery
            app = Celery("in_submodule", set_as_current=False)
            """,
        "fa_any.py": """
            from minicelery import Celery
            my_app = Celery("any_instance", set_as_current=False)
            """,
        "fa_none.py": "x = 1\n",
    })
    assert minicelery.find_app("fa_both").main == "by_app_attr"
    assert minicelery.find_app("fa_celery_attr").main == "by_celery_attr"
    assert minicelery.find_app("fa_pkg").main == "in_submodule"
    assert minicelery.find_app("fa_pkg_first").main == "in_submodule"  # the submodule comes before any instance
    assert minicelery.find_app("fa_pkg.celery").main == "in_submodule"
    assert minicelery.find_app("fa_pkg.celery:app").main == "in_submodule"
    assert minicelery.find_app("fa_any").main == "any_instance"
    with pytest.raises(ImproperlyConfigured, match="fa_none"):
        minicelery.find_app("fa_none")


def test_cli_app_that_names_a_module_without_an_app_exits_1_with_one_line(tmp_path):
    write_tree(tmp_path, {"noapp.py": "x = 1\n", "nopkg/__init__.py": ""})
    for spec in ("noapp", "nopkg", "noapp:app"):
        proc = run_cli(tmp_path, project_env(tmp_path), "-A", spec, "worker")
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and spec.split(":")[0] in lines[0] and "app" in lines[0], proc.stderr


# --- 2. autodiscover_tasks ----------------------------------------------------------

def _discoverable(root, *packages):
    for name in packages:
        write_tree(root, {
            f"{name}/__init__.py": "",
            f"{name}/tasks.py": f"""
                from minicelery import shared_task

                @shared_task
                def ping():
                    return "{name}"
                """,
        })


def test_autodiscover_tasks_is_lazy_until_the_app_finalizes(isolated_imports):
    _discoverable(isolated_imports, "ad_a", "ad_b")
    write_tree(isolated_imports, {"ad_empty/__init__.py": ""})  # no tasks module: skipped
    app_ = Celery("ad", set_as_current=False)
    app_.autodiscover_tasks(["ad_a", "ad_b", "ad_empty"])
    assert "ad_a.tasks" not in sys.modules and "ad_b.tasks" not in sys.modules
    assert "ad_a.tasks.ping" not in app_.tasks
    app_.finalize()
    assert "ad_a.tasks" in sys.modules and "ad_b.tasks" in sys.modules
    assert {"ad_a.tasks.ping", "ad_b.tasks.ping"} <= set(app_.tasks)
    assert app_.tasks["ad_b.tasks.ping"].apply().get() == "ad_b"


def test_autodiscover_tasks_related_name_force_and_callable(isolated_imports):
    write_tree(isolated_imports, {
        "ad_jobs/__init__.py": "",
        "ad_jobs/jobs.py": "from minicelery import shared_task\n\n@shared_task\ndef job():\n    return 'job'\n",
        "ad_forced/__init__.py": "",
        "ad_forced/tasks.py": "from minicelery import shared_task\n\n@shared_task\ndef now():\n    return 1\n",
        "ad_called/__init__.py": "",
        "ad_called/tasks.py": "from minicelery import shared_task\n\n@shared_task\ndef later():\n    return 2\n",
    })
    calls = []

    def packages():
        calls.append(1)
        return ["ad_called"]

    app_ = Celery("ad2", set_as_current=False)
    app_.autodiscover_tasks(["ad_jobs"], related_name="jobs")
    app_.autodiscover_tasks(packages)
    assert "ad_jobs.jobs" not in sys.modules and "ad_called.tasks" not in sys.modules and not calls
    app_.autodiscover_tasks(["ad_forced"], force=True)
    assert "ad_forced.tasks.now" in app_.tasks
    app_.import_task_modules()
    assert {"ad_jobs.jobs.job", "ad_called.tasks.later"} <= set(app_.tasks)


def test_autodiscover_tasks_raises_when_a_tasks_module_fails_to_import(isolated_imports):
    write_tree(isolated_imports, {
        "ad_broken/__init__.py": "",
        "ad_broken/tasks.py": "import no_such_dependency_here\n",
        "ad_raising/__init__.py": "",
        "ad_raising/tasks.py": "raise RuntimeError('the tasks module is broken')\n",
    })
    app_ = Celery("ad3", set_as_current=False)
    app_.autodiscover_tasks(["ad_broken"])
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_here"):
        app_.finalize()
    other = Celery("ad4", set_as_current=False)
    with pytest.raises(RuntimeError, match="broken"):
        other.autodiscover_tasks(["ad_raising"], force=True)


# --- 3. @shared_task from include / autodiscovery, in a CLI worker ------------------

SHARED_PROJ = {
    "sproj/__init__.py": "from .celery import app as celery_app\n",
    "sproj/celery.py": """
        from minicelery import Celery

        app = Celery("sproj", include=["sproj.included"])
        app.autodiscover_tasks(["billing", "shipping"])
        """,
    "sproj/included.py": """
        from minicelery import shared_task

        @shared_task
        def mul(x, y):
            return x * y
        """,
    "billing/__init__.py": "",
    "billing/tasks.py": """
        from minicelery import shared_task

        @shared_task(name="billing.charge")
        def charge(amount):
            return {"charged": amount}
        """,
    "shipping/__init__.py": "",
}


def test_shared_tasks_from_include_and_autodiscovery_run_in_a_cli_worker(tmp_path, urls):
    write_tree(tmp_path, SHARED_PROJ)
    env = project_env(tmp_path, **url_env(urls))
    with cli_worker(tmp_path, env, "-A", "sproj", "worker", "-c", "1") as w:
        assert ". sproj.included.mul" in w.log() and ". billing.charge" in w.log()
        proc = run_python(tmp_path, env, """
            import sproj
            from sproj.included import mul
            from billing.tasks import charge
            app = sproj.celery_app
            assert "billing.charge" in app.tasks and "sproj.included.mul" in app.tasks
            print(mul.delay(6, 7).get(timeout=20), charge.delay(5).get(timeout=20)["charged"])
            """)
        assert proc.returncode == 0, proc.stderr + w.log()
        assert proc.stdout.split() == ["42", "5"]


# --- 4. task_queues -----------------------------------------------------------------

def test_worker_without_queues_consumes_every_queue_in_task_queues(app, tmp_path):
    kombu = pytest.importorskip("kombu")
    app.conf.update(task_queues=(kombu.Queue("default"), kombu.Queue("heavy")),
                    task_default_queue="default", task_routes={"x.heavy_task": {"queue": "heavy"}})
    assert minicelery.Worker(app).queues == ["default", "heavy"]
    with worker(app, tmp_path):
        light, heavy = where_it_ran.delay("light"), heavy_task.delay("heavy")
        assert heavy.get(timeout=10) == ["heavy", "heavy"]
        assert light.get(timeout=10) == ["light", "default"]


def test_task_queues_as_names_and_celery3_dicts(app):
    app.conf.task_default_queue = "default"
    app.conf.task_queues = ["default", "heavy"]
    assert minicelery.Worker(app).queues == ["default", "heavy"]
    app.conf.task_queues = {"default": {"exchange": "default", "routing_key": "default"},
                            "heavy": {"exchange": "heavy", "routing_key": "heavy"}}
    assert minicelery.Worker(app).queues == ["default", "heavy"]
    assert minicelery.Worker(app, queues=["only"]).queues == ["only"]  # -Q wins


def test_task_queues_with_a_bad_entry_raises_when_set():
    conf = minicelery.Config()
    with pytest.raises(ImproperlyConfigured, match="task_queues"):
        conf.task_queues = [42]
    with pytest.raises(ImproperlyConfigured, match="task_queues"):
        Celery("badq", set_as_current=False).conf.update(task_queues=["ok", None])


def test_task_queues_from_celery3_dict_through_a_worker(app, tmp_path):
    app.conf.update(task_queues={"default": {"exchange": "default", "routing_key": "default"},
                                 "heavy": {"exchange": "heavy", "routing_key": "heavy"}},
                    task_default_queue="default", task_routes={"x.heavy_task": "heavy"})
    with worker(app, tmp_path):
        assert heavy_task.delay(1).get(timeout=10) == [1, "heavy"]
        assert where_it_ran.delay(2).get(timeout=10) == [2, "default"]


# --- 5. Celery 3's setting names ----------------------------------------------------

OLD_SETTINGS = [
    ("BROKER_URL", "broker_url", "redis://localhost:6379/3"),
    ("CELERY_RESULT_BACKEND", "result_backend", "redis://localhost:6379/4"),
    ("CELERY_ALWAYS_EAGER", "task_always_eager", True),
    ("CELERYD_CONCURRENCY", "worker_concurrency", 3),
    ("CELERYD_PREFETCH_MULTIPLIER", "worker_prefetch_multiplier", 1),
    ("CELERYD_MAX_TASKS_PER_CHILD", "worker_max_tasks_per_child", 50),
    ("CELERY_DEFAULT_QUEUE", "task_default_queue", "jobs"),
    ("CELERYBEAT_SCHEDULE", "beat_schedule", {"tick": {"task": "t.tick", "schedule": 5.0}}),
    ("CELERY_ANNOTATIONS", "task_annotations", {"*": {"rate_limit": "10/s"}}),
    ("CELERY_IGNORE_RESULT", "task_ignore_result", True),
    ("CELERY_MESSAGE_COMPRESSION", "task_compression", "zlib"),
    ("CELERYD_TASK_TIME_LIMIT", "task_time_limit", 30),
    ("CELERY_TASK_RESULT_EXPIRES", "result_expires", 600),
    ("CELERY_ACCEPT_CONTENT", "accept_content", ["json", "msgpack"]),
    ("CELERY_TIMEZONE", "timezone", "Europe/Paris"),
]


@pytest.mark.parametrize("old, new, value", OLD_SETTINGS, ids=[o for o, _, _ in OLD_SETTINGS])
def test_old_setting_names(old, new, value):
    assert minicelery.setting_name(old) == new
    by_dict = Celery("old1", set_as_current=False)
    by_dict.config_from_object({old: value})
    assert getattr(by_dict.conf, new) == value
    by_class = Celery("old2", set_as_current=False)
    by_class.config_from_object(type("OldConfig", (), {old: value}))
    assert getattr(by_class.conf, new) == value
    by_update = Celery("old3", set_as_current=False)
    by_update.conf.update({old: value})
    assert getattr(by_update.conf, new) == value


def test_conf_update_takes_celerys_upper_case_names_of_new_settings():
    """Celery's table has ENABLE_UTC and RESULT_ACCEPT_CONTENT (no CELERY_ prefix) as old names."""
    app_ = Celery("upper", set_as_current=False)
    app_.conf.update(ENABLE_UTC=False, RESULT_ACCEPT_CONTENT=["json", "msgpack"])
    assert app_.conf.enable_utc is False
    assert app_.conf.result_accept_content == ["json", "msgpack"]


def test_setting_name_is_none_for_what_minicelery_lacks():
    assert minicelery.setting_name("task_always_eager") == "task_always_eager"
    assert minicelery.setting_name("CELERY_SEND_EVENTS") == "worker_send_task_events"
    assert minicelery.setting_name("CELERYD_MAX_MEMORY_PER_CHILD") is None  # worker_max_memory_per_child: not here
    assert minicelery.setting_name("no_such_setting") is None


def test_conf_update_old_always_eager_runs_tasks_inline(app, redis_client):
    app.conf.update(CELERY_ALWAYS_EAGER=True)
    result = add.delay(2, 3)
    assert isinstance(result, EagerResult) and result.get() == 5
    assert redis_client.llen("celery") == 0


def test_old_style_config_class_drives_a_worker(app, tmp_path, redis_server):
    class OldConfig:
        BROKER_URL = f"unix://{redis_server}"
        CELERY_RESULT_BACKEND = f"unix://{redis_server}?db=1"
        CELERY_DEFAULT_QUEUE = "oldstyle"
        CELERYD_CONCURRENCY = 1
        CELERYD_PREFETCH_MULTIPLIER = 1

    app.config_from_object(OldConfig)
    with worker(app, tmp_path, concurrency=None) as w:
        assert where_it_ran.delay("old").get(timeout=10) == ["old", "oldstyle"]
        assert "concurrency: 1 (prefork)" in w.log()


def test_namespaced_config_takes_new_and_old_names(tmp_path):
    for key in ("CELERY_TASK_ALWAYS_EAGER", "CELERY_ALWAYS_EAGER"):
        app_ = Celery("ns", set_as_current=False)
        settings = type("settings", (), {key: True, "CELERY_BROKER_URL": f"sqlite:///{tmp_path}/ns.db",
                                         "ALWAYS_EAGER": False, "DEBUG": True})
        app_.config_from_object(settings, namespace="CELERY")
        assert app_.conf.task_always_eager is True, key
        assert app_.conf.broker_url == f"sqlite:///{tmp_path}/ns.db"


def test_a_misspelt_namespaced_setting_logs_one_warning_with_the_closest_name(caplog):
    app_ = Celery("typo", set_as_current=False)
    with caplog.at_level(logging.WARNING, logger="minicelery"):
        app_.config_from_object({"CELERY_TAKS_ALWAYS_EAGER": True, "CELERY_TASK_SERIALIZER": "json",
                                 "SECRET_KEY": "x"}, namespace="CELERY")
    warnings = [r for r in caplog.records if r.name == "minicelery" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "CELERY_TAKS_ALWAYS_EAGER" in message and "did you mean task_always_eager?" in message
    assert "SECRET_KEY" not in message and "SERIALIZER" not in message
    assert app_.conf.task_always_eager is False


@pytest.mark.interop
def test_interop_setting_name_matches_celerys_table():
    pytest.importorskip("celery")
    from celery.app.defaults import _TO_NEW_KEY
    wrong = {old: (new if new in minicelery._CONFIG_TYPES else None, minicelery.setting_name(old))
             for old, new in _TO_NEW_KEY.items()
             if minicelery.setting_name(old) != (new if new in minicelery._CONFIG_TYPES else None)}
    assert not wrong, f"old name: (Celery's new name, setting_name()): {wrong}"


# --- 6. Celery's import paths -------------------------------------------------------

def test_celerys_import_paths_in_a_fresh_interpreter(tmp_path):
    proc = run_python(tmp_path, project_env(tmp_path), f"""
        from minicelery.schedules import crontab
        from minicelery.result import AsyncResult
        from minicelery.exceptions import SoftTimeLimitExceeded, TimeoutError
        from minicelery.utils.log import get_task_logger
        from minicelery.canvas import chain, group, chord, signature
        from minicelery.app.task import Task
        from minicelery.beat import crontab as crontab_too, schedule
        import minicelery.result, minicelery
        import builtins

        assert crontab is minicelery.crontab is crontab_too and AsyncResult is minicelery.result.AsyncResult
        assert SoftTimeLimitExceeded is minicelery.SoftTimeLimitExceeded
        assert TimeoutError is minicelery.ResultTimeout and builtins.TimeoutError is not minicelery.ResultTimeout
        assert (chain, group, chord, signature, Task) == (minicelery.chain, minicelery.group,
                                                           minicelery.chord, minicelery.signature, minicelery.Task)
        app = minicelery.Celery("paths", broker="sqlite:///{tmp_path}/paths.db")
        try:
            app.AsyncResult("never-sent").get(timeout=0.2)
        except TimeoutError:
            print("timed out")
        print(get_task_logger("proj.tasks").name)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["timed", "out", "proj.tasks"]


# --- 7. result.get() inside a task --------------------------------------------------

def test_result_get_inside_a_task_fails_the_task(app, tmp_path, results):
    with worker(app, tmp_path):
        refused = get_inside.delay(3)
        with pytest.raises(RuntimeError, match=r"Never call result.get\(\) within a task"):
            refused.get(timeout=10)
        assert refused.state == "FAILURE"
        stored = json.loads(results.get(f"celery-task-meta-{refused.id}"))
        assert stored["status"] == "FAILURE" and stored["result"]["exc_type"] == "RuntimeError"
        with pytest.raises(RuntimeError, match="Never call result.get"):
            group_get_inside.delay(3).get(timeout=10)


def test_result_get_inside_a_task_with_disable_sync_subtasks_false(app, tmp_path):
    with worker(app, tmp_path, concurrency=2):
        assert get_inside_allowed.delay(4).get(timeout=15) == 8
        assert get_inside_join_allowed.delay(6).get(timeout=15) == 12
        with pytest.raises(RuntimeError, match="Never call result.get"):  # only inside the block
            get_inside.delay(3).get(timeout=15)
        assert apply_get_inside.delay(5).get(timeout=15) == 10  # .apply() in a worker: eager, allowed


def test_a_mistyped_setting_set_on_conf_warns_and_an_apps_own_does_not(caplog):
    app_ = Celery("typo", set_as_current=False)
    with caplog.at_level(logging.WARNING, logger="minicelery"):
        app_.conf.update(task_always_eagr=True, my_own_setting=1, CELERY_ALWAYS_EAGER=True, BROKER_POOL_LIMIT=3)
    warnings = [r.getMessage() for r in caplog.records if r.name == "minicelery"]
    assert len(warnings) == 1 and warnings[0].endswith("task_always_eagr (did you mean task_always_eager?)")
    assert "BROKER_POOL_LIMIT" not in warnings[0]  # (Celery's, and means nothing here: taken quietly)
    assert app_.conf.task_always_eager is True and app_.conf.my_own_setting == 1


def test_every_celery_setting_is_ours_quiet_or_refused():
    """Celery 5.7's table of settings: each is minicelery's, means nothing here, or is
    refused unless at Celery's default (whose value the refusal compares with)."""
    defaults = pytest.importorskip("celery.app.defaults")
    table = {name: option.default for name, option in defaults.flatten(defaults.NAMESPACES)}
    left = [name for name in table if name not in minicelery._CONFIG_TYPES and name not in minicelery._QUIET_SETTINGS
            and name not in minicelery._NOT_OFFERED and not name.startswith(minicelery._QUIET_PREFIXES)]
    assert left == []
    assert {name: table[name] for name in minicelery._NOT_OFFERED} == minicelery._NOT_OFFERED


def test_a_celery_setting_minicelery_does_not_offer_is_refused_unless_at_celerys_default():
    """Settings Celery honours were warned about and dropped (a project got plain TCP where
    it set broker_use_ssl, no memory limit where it set worker_max_memory_per_child). Set
    to Celery's default they change nothing and pass; otherwise the app refuses them."""
    app_ = Celery("refused", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="doesn't offer these Celery settings") as raised:
        app_.config_from_object({"CELERY_BROKER_USE_SSL": {"ssl_cert_reqs": "required"},
                                 "CELERY_WORKER_MAX_MEMORY_PER_CHILD": 200_000, "CELERY_BROKER_PASSWORD": "hunter2",
                                 "CELERY_TASK_PROTOCOL": 2, "CELERY_BROKER_POOL_LIMIT": 5}, namespace="CELERY")
    text = str(raised.value)
    assert "CELERY_BROKER_USE_SSL=" in text and "CELERY_WORKER_MAX_MEMORY_PER_CHILD=200000" in text
    assert "hunter2" not in text and "TASK_PROTOCOL" not in text and "POOL_LIMIT" not in text
    with pytest.raises(ImproperlyConfigured, match="task_remote_tracebacks=True"):
        app_.conf.update(task_remote_tracebacks=True)
    app_.conf.update(task_acks_on_failure_or_timeout=True, worker_enable_remote_control=True,
                     mongodb_backend_settings={"x": 1}, event_queue_ttl=5)  # (defaults, and nothing here)
    with pytest.raises(ImproperlyConfigured, match="REDIS_HOST"):
        Celery("old", set_as_current=False).config_from_object({"CELERY_REDIS_HOST": "redis.example"})


def test_result_get_inside_an_eager_task_is_allowed(app):
    app.conf.task_always_eager = True
    assert get_inside.delay(3).get() == 6
    assert group_get_inside.delay(3).get() == [0, 2, 4]
    assert get_inside.apply((2,)).get() == 4


# --- 8. retry inside workflows ------------------------------------------------------

def test_retry_in_a_chain_step_continues_the_chain(app, tmp_path):
    with worker(app, tmp_path):
        assert (retry_once.s(5) | add.s(1))().get(timeout=10) == 6
        assert (add.s(1, 1) | retry_once.s() | mul.s(10))().get(timeout=10) == 20


def test_retry_in_a_chord_header_runs_the_body(app, tmp_path):
    with worker(app, tmp_path):
        assert chord([retry_once.s(1), retry_once.s(2), add.s(3, 4)])(xsum.s()).get(timeout=10) == 10


def test_retry_keeps_link_and_link_error(app, tmp_path):
    done, failed = str(tmp_path / "done"), str(tmp_path / "failed")
    with worker(app, tmp_path):
        linked = retry_once.apply_async((7,), link=record.s(done))
        assert linked.get(timeout=10) == 7
        wait_until(lambda: lines_in(done) == 1, timeout=10, what="the link after a retry")
        assert open(done).read() == "7\n"
        failing = retry_then_fail.apply_async(("boom",), link_error=on_error.s(failed))
        with pytest.raises(ValueError, match="boom"):
            failing.get(timeout=10)
        wait_until(lambda: lines_in(failed) >= 1, timeout=10, what="the errback after a retry")
        text = open(failed).read()
        assert text.count("\n") == 1 and failing.id in text and "ValueError('boom')" in text


# --- 9. a step whose arguments don't fit --------------------------------------------

def test_chain_step_that_does_not_fit_fails_the_chain_promptly(app, tmp_path):
    with worker(app, tmp_path):
        with pytest.raises(TypeError):
            (add.si(2, 2) | add.si(4, 4) | add.s(8, 8))().get(timeout=10)
        last = (add.s(1, 1) | add.s(1, 2) | add.s(3))()
        with pytest.raises(TypeError):
            last.get(timeout=10)
        middle, first = last.parent, last.parent.parent
        assert first.get(timeout=10) == 2
        assert middle.state == "FAILURE" and isinstance(middle.result, TypeError)
        assert last.state == "FAILURE"


def test_chord_header_chain_that_does_not_fit_fails_the_chord_promptly(app, tmp_path):
    with worker(app, tmp_path):
        body = chord([add.si(2, 2) | add.s(8, 8), add.s(1, 1)])(xsum.s())
        with pytest.raises(ChordError):
            body.get(timeout=10)
        assert body.state == "FAILURE"


def test_chord_body_that_does_not_fit_fails_promptly(app, tmp_path):
    with worker(app, tmp_path):
        body = chord([add.s(1, 1), add.s(2, 2)])(add.s(1, 2))  # add([2, 4], 1, 2)
        with pytest.raises((TypeError, ChordError)):  # Celery: ChordError('Callback error: TypeError(...)')
            body.get(timeout=10)


# --- 10. a chord naming an unregistered task ----------------------------------------

@pytest.mark.parametrize("bound", [True, False], ids=["bound", "unbound"])
def test_chord_with_an_unregistered_header_task_fails_promptly(app, tmp_path, bound):
    missing = signature("no.such.task", app=app) if bound else signature("no.such.task")
    with worker(app, tmp_path):
        body = chord([add.s(1, 1), missing])(xsum.s())
        with pytest.raises(ChordError):
            body.get(timeout=10)
        header = body.parent
        assert isinstance(header, GroupResult)
        assert header.results[0].get(timeout=10) == 2
        part = header.results[1]
        wait_until(part.ready, timeout=10, what="the unregistered part's state")
        assert part.state == "FAILURE" and isinstance(part.result, NotRegistered)


# --- 11. msgpack and yaml -----------------------------------------------------------

VALUE = {"text": "héllo", "numbers": [1, 2.5, -3], "nested": {"ok": True, "none": None}}


@pytest.mark.parametrize("serializer, library", [("msgpack", "msgpack"), ("yaml", "yaml")])
def test_msgpack_and_yaml_round_trip_through_a_worker(app, tmp_path, redis_client, results,
                                                      serializer, library):
    lib = pytest.importorskip(library)
    app.conf.update(task_serializer=serializer, result_serializer=serializer,
                    accept_content=["json", serializer])
    sent = minicelery.signature("test_minicelery.echo", (VALUE,), app=app).apply_async()
    wire = json.loads(redis_client.lindex("celery", 0))
    assert wire["content-type"] == minicelery.CONTENT_TYPES[serializer]
    with worker(app, tmp_path):
        assert sent.get(timeout=10) == VALUE
    raw = results.get(f"celery-task-meta-{sent.id}")
    stored = lib.unpackb(raw, raw=False) if library == "msgpack" else lib.safe_load(raw)
    assert stored["status"] == "SUCCESS" and stored["result"] == VALUE


@pytest.mark.interop
def test_interop_real_celery_sends_msgpack_minicelery_runs(app, tmp_path, redis_server):
    pytest.importorskip("celery")
    pytest.importorskip("msgpack")
    app.conf.update(accept_content=["json", "msgpack"], result_serializer="msgpack")
    sender = real_celery.Celery("msgpack-interop", broker=f"redis+socket://{redis_server}",
                                backend=f"redis+socket://{redis_server}?virtual_host=1",
                                set_as_current=False)
    sender.conf.update(task_serializer="msgpack", result_serializer="msgpack",
                       accept_content=["json", "msgpack"], result_accept_content=["json", "msgpack"])
    try:
        with worker(app, tmp_path):
            sent = sender.send_task("test_minicelery.add", (2, 40), serializer="msgpack")
            assert sent.get(timeout=20) == 42
            assert sender.send_task("test_minicelery.echo", (VALUE,)).get(timeout=20) == VALUE
    finally:
        sender.close()


@pytest.mark.parametrize("serializer, package", [("msgpack", "msgpack"), ("yaml", "pyyaml")])
def test_a_missing_serializer_library_is_a_clear_error(tmp_path, serializer, package):
    library = {"msgpack": "msgpack", "yaml": "yaml"}[serializer]
    proc = run_python(tmp_path, project_env(tmp_path), f"""
        import sys
        sys.modules[{library!r}] = None
        import minicelery
        app = minicelery.Celery("s", broker="sqlite:///{tmp_path}/s.db", task_serializer={serializer!r})
        try:
            app.send_task("t.add", (1, 2))
        except minicelery.ImproperlyConfigured as exc:
            print(exc)
        """)
    assert proc.returncode == 0, proc.stderr
    assert f"pip install {package}" in proc.stdout


# --- 12. start-up failures: one clear line ------------------------------------------

def test_unsupported_broker_and_backend_fail_at_once():
    with pytest.raises(ImproperlyConfigured, match="amqp") as caught:
        Celery("amqp", broker="amqp://guest@localhost//", set_as_current=False)
    message = str(caught.value)
    assert "\n" not in message and "redis://" in message and "sqlite://" in message
    app_ = Celery("django-db", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="django-db") as caught:
        app_.conf.result_backend = "django-db"
    assert "\n" not in str(caught.value) and "redis://" in str(caught.value)


def test_database_beat_scheduler_and_other_pools_are_refused(tmp_path):
    app_ = Celery("refused", broker=f"sqlite:///{tmp_path}/r.db", set_as_current=False)
    app_.conf.beat_scheduler = "django_celery_beat.schedulers:DatabaseScheduler"
    with pytest.raises(ImproperlyConfigured, match="DatabaseScheduler"):
        minicelery.Beat(app_)
    app_.conf.beat_scheduler = "celery.beat:PersistentScheduler"
    app_.conf.worker_pool = "eventlet"
    with pytest.raises(ImproperlyConfigured, match="eventlet"):
        minicelery.Worker(app_)


def test_cli_start_up_failures_say_one_clear_line(tmp_path):
    write_tree(tmp_path, {
        "dbbeat.py": """
            from minicelery import Celery
            app = Celery("dbbeat")
            app.conf.beat_scheduler = "django_celery_beat.schedulers:DatabaseScheduler"
            """,
        "greenpool.py": """
            from minicelery import Celery
            app = Celery("greenpool", worker_pool="eventlet")
            """,
        "amqpapp.py": """
            from minicelery import Celery
            app = Celery("amqpapp")
            app.conf.broker_url = "amqp://guest@localhost//"
            """,
    })
    env = project_env(tmp_path)
    beat = run_cli(tmp_path, env, "-A", "dbbeat", "beat")
    assert beat.returncode == 1 and len(beat.stderr.strip().splitlines()) == 1, beat.stderr
    assert "DatabaseScheduler" in beat.stderr
    pool = run_cli(tmp_path, env, "-A", "greenpool", "worker")
    assert pool.returncode == 1 and len(pool.stderr.strip().splitlines()) == 1, pool.stderr
    assert "eventlet" in pool.stderr
    embedded = run_cli(tmp_path, env, "-A", "dbbeat", "worker", "-B")
    assert embedded.returncode == 1 and len(embedded.stderr.strip().splitlines()) == 1, embedded.stderr
    assert "DatabaseScheduler" in embedded.stderr
    option = run_cli(tmp_path, env, "-A", "dbbeat", "worker", "-P", "eventlet")
    assert option.returncode != 0 and "eventlet" in option.stderr and "prefork" in option.stderr
    amqp = run_cli(tmp_path, env, "-A", "amqpapp", "worker")
    assert amqp.returncode == 1 and len(amqp.stderr.strip().splitlines()) == 1, amqp.stderr
    assert "amqp" in amqp.stderr and "redis://" in amqp.stderr


def test_start_up_refuses_the_real_celerys_schedules_broadcast_queues_and_missing_libraries(tmp_path):
    real_schedules = pytest.importorskip("celery.schedules")
    app_ = Celery("half-moved", broker=f"sqlite:///{tmp_path}/h.db", set_as_current=False)
    app_.conf.beat_schedule = {"tick": {"task": "t.tick", "schedule": real_schedules.crontab(minute="*")}}
    for start in (lambda: minicelery.Beat(app_), lambda: minicelery.Worker(app_, beat=True)):
        with pytest.raises(ImproperlyConfigured, match="import it from minicelery.schedules"):
            start()  # beat would die at its first tick; under -B the worker would go on without it
    kombu = pytest.importorskip("kombu")
    from kombu.common import Broadcast
    with pytest.raises(ImproperlyConfigured, match="Broadcast queues .* are not offered"):
        app_.conf.task_queues = [kombu.Queue("default"), Broadcast("everyone")]
    proc = run_python(tmp_path, project_env(tmp_path), f"""
        import sys
        sys.modules["msgpack"] = None
        import minicelery
        app = minicelery.Celery("m", broker="sqlite:///{tmp_path}/m.db", accept_content=["json", "msgpack"])
        try:
            minicelery.Worker(app)
        except minicelery.ImproperlyConfigured as exc:
            print("refused:", exc)
        try:  # a message a worker can't read: a bad message (FAILURE stored), not a crash
            minicelery.loads(b"\\x90", minicelery.MSGPACK_TYPE, {{minicelery.MSGPACK_TYPE}})
        except minicelery.DecodeError as exc:
            print("bad message:", exc)
        """)
    assert "refused: the msgpack serializer needs its library: pip install msgpack" in proc.stdout, proc.stderr
    assert "bad message:" in proc.stdout and "pip install msgpack" in proc.stdout


def test_a_route_naming_a_routing_key_goes_to_the_queue_bound_to_it(app, redis_client, tmp_path):
    kombu = pytest.importorskip("kombu")
    app.conf.task_queues = [kombu.Queue("default"),
                            kombu.Queue("heavy", kombu.Exchange("heavy"), routing_key="heavy.key")]
    app.conf.task_default_queue = "default"
    app.conf.task_routes = {"x.heavy_task": {"exchange": "heavy", "routing_key": "heavy.key"}}
    result = heavy_task.delay(1)
    assert redis_client.llen("heavy") == 1 and redis_client.llen("default") == 0
    app.conf.task_routes = ([("x.heavy*", {"queue": kombu.Queue("heavy")})],)  # Celery's list of pairs
    by_pairs = heavy_task.delay(2)
    app.conf.task_routes = None
    by_option = heavy_task.apply_async((3,), exchange="heavy", routing_key="heavy.key")
    by_queue_object = heavy_task.apply_async((4,), queue=kombu.Queue("heavy"))
    assert redis_client.llen("heavy") == 4 and redis_client.llen("default") == 0
    with worker(app, tmp_path, queues=["heavy"]):
        assert [r.get(timeout=10) for r in (result, by_pairs, by_option, by_queue_object)] == \
            [[1, "heavy"], [2, "heavy"], [3, "heavy"], [4, "heavy"]]


def test_get_on_an_ignored_result_returns_none_at_once(app, tmp_path):
    with worker(app, tmp_path):
        # Nothing will be stored: get() must not wait (a regression raises ResultTimeout here).
        assert add.apply_async((1, 2), ignore_result=True).get(timeout=5) is None
        assert add.apply_async((1, 2)).get(timeout=10) == 3


def test_an_unsupported_url_in_the_environment_stops_the_worker_at_start(tmp_path):
    write_tree(tmp_path, {"envapp.py": """
        from minicelery import Celery
        app = Celery("envapp", broker="sqlite:///envapp.db")
        """})
    for variable, value in (("CELERY_RESULT_BACKEND", "rpc://"), ("CELERY_BROKER_URL", "amqp://guest@localhost//")):
        proc = run_cli(tmp_path, project_env(tmp_path, **{variable: value}), "-A", "envapp", "worker")
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert value.split(":")[0] in proc.stderr and "redis://" in proc.stderr
    with pytest.raises(ImproperlyConfigured, match="run every more than 0 seconds"):
        minicelery.schedule(0)  # beat would send it in a tight loop


def test_environment_urls_win_over_settings_as_in_celery(monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://from-env:6379/0")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://from-env:6379/1")
    app_ = Celery("env", broker="redis://explicit/3", backend="redis://explicit/4", set_as_current=False)
    assert app_.conf.broker_url == "redis://from-env:6379/0" and app_.conf.result_backend == "redis://from-env:6379/1"


def test_celery_projects_half_moved_or_with_django_app_configs(isolated_imports, caplog):
    pytest.importorskip("celery")
    write_tree(isolated_imports, {
        "stillceleryapp.py": """
            from celery import Celery
            app = Celery("still_celery")
            """,
        "broken_syntax.py": "app = (\n",
        "shop/__init__.py": "",
        "shop/apps.py": """
            class ShopConfig:  # what Django's AppConfig subclass holds: the app's module
                name = "shop"
            """,
        "shop/tasks.py": """
            from minicelery import shared_task
            @shared_task
            def shop_task():
                return "shop"
            """,
    })
    with pytest.raises(ImproperlyConfigured, match="holds the real Celery's app: import Celery from minicelery"):
        minicelery.find_app("stillceleryapp")
    with pytest.raises(ImproperlyConfigured, match="can't import the app 'broken_syntax'"):
        minicelery.find_app("broken_syntax")
    app_ = Celery("configs", set_as_current=False)
    app_.autodiscover_tasks(lambda: ["shop.apps.ShopConfig"], force=True)
    assert "shop.tasks.shop_task" in app_.tasks
    with caplog.at_level(logging.WARNING, logger="minicelery"):
        app_.config_from_object({"CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP": True}, namespace="CELERY")
    assert not caplog.records  # a Celery setting that changes nothing here: no warning
    args = minicelery._parser().parse_args(["-A", "x", "worker", "--without-gossip", "--without-mingle",
                                            "--without-heartbeat", "-O", "fair"])
    assert args.command == "worker"


# --- 13. the zero-setup default -----------------------------------------------------

def test_zero_setup_conf_reads_the_sqlite_default(tmp_path):
    proc = run_python(tmp_path, project_env(tmp_path), """
        from minicelery import Celery
        app = Celery("zero")
        print(app.conf.broker_url, app.conf.result_backend, app.conf["result_backend"])
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["sqlite:///minicelery.db"] * 3


# --- 14. Django ---------------------------------------------------------------------

DJANGO_PROJ = {
    "manage.py": """
        import os, sys
        if __name__ == "__main__":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site14.settings")
            from django.core.management import execute_from_command_line
            execute_from_command_line(sys.argv)
        """,
    "site14/__init__.py": """
        from .celery import app as celery_app

        __all__ = ("celery_app",)
        """,
    "site14/celery.py": """
        import os

        from minicelery import Celery

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site14.settings")
        app = Celery("site14")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        app.autodiscover_tasks()
        """,
    "site14/settings.py": """
        import os
        from pathlib import Path

        BASE_DIR = Path(__file__).resolve().parent.parent
        SECRET_KEY = "test-only"
        DEBUG = False
        USE_TZ = True
        INSTALLED_APPS = ["django.contrib.contenttypes", "stock"]
        DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3",
                                 "OPTIONS": {"timeout": 20}}}
        DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
        CELERY_BROKER_URL = os.environ["SITE_BROKER_URL"]
        CELERY_RESULT_BACKEND = os.environ.get("SITE_RESULT_BACKEND")
        CELERY_TASK_ACKS_LATE = True
        """,
    "stock/__init__.py": "",
    "stock/apps.py": """
        from django.apps import AppConfig

        class StockConfig(AppConfig):
            name = "stock"
        """,
    "stock/models.py": """
        from django.db import models

        class Item(models.Model):
            name = models.CharField(max_length=50, unique=True)
            count = models.IntegerField(default=0)
        """,
    "stock/migrations/__init__.py": "",
    "stock/migrations/0001_initial.py": """
        from django.db import migrations, models

        class Migration(migrations.Migration):
            initial = True
            dependencies = []
            operations = [migrations.CreateModel(name="Item", fields=[
                ("id", models.AutoField(auto_created=True, primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=50, unique=True)),
                ("count", models.IntegerField(default=0)),
            ])]
        """,
    "stock/tasks.py": """
        import os

        from django.db import connection
        from django.db.models import F
        from minicelery import shared_task

        from .models import Item

        # The worker's main process reads the database before it forks its pool:
        # its connection must not be the one a pool process uses.
        STARTED_WITH = Item.objects.count()
        IMPORTED_IN, PARENT_CONNECTION = os.getpid(), connection.connection


        @shared_task
        def add_item(name):
            item = Item.objects.create(name=name)
            Item.objects.filter(pk=item.pk).update(count=F("count") + 1)
            shared = os.getpid() != IMPORTED_IN and connection.connection is PARENT_CONNECTION
            return [Item.objects.get(pk=item.pk).count, os.getpid(), shared]


        @shared_task
        def total():
            return sum(Item.objects.values_list("count", flat=True))
        """,
}


def test_django_project_tasks_use_the_orm_in_a_prefork_worker(tmp_path, urls):
    pytest.importorskip("django")
    write_tree(tmp_path, DJANGO_PROJ)
    broker, backend = urls
    if broker.startswith("sqlite"):
        broker = f"sqlite:///{tmp_path}/broker.db"  # not the Django database
    env = project_env(tmp_path, SITE_BROKER_URL=broker, **({"SITE_RESULT_BACKEND": backend} if backend else {}))
    migrate = subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert migrate.returncode == 0, migrate.stderr
    with cli_worker(tmp_path, env, "-A", "site14", "worker", "-c", "2") as w:
        assert ". stock.tasks.add_item" in w.log()
        proc = run_python(tmp_path, env, """
            import site14  # as the web process does: it sets DJANGO_SETTINGS_MODULE
            import django
            django.setup()
            from stock.tasks import add_item, total
            from stock.models import Item
            sent = [add_item.delay(f"item-{i}") for i in range(8)]
            runs = [r.get(timeout=30) for r in sent]
            assert all(count == 1 for count, _, _ in runs), runs
            assert not any(shared for _, _, shared in runs), f"a pool process used its parent's connection: {runs}"
            print(len({pid for _, pid, _ in runs}), total.delay().get(timeout=30), Item.objects.count())
            """)
        assert proc.returncode == 0, proc.stderr + w.log()
        pids, total, count = proc.stdout.split()
        assert (total, count) == ("8", "8")
        log = w.log()
    assert "AppRegistryNotReady" not in log and "Traceback" not in log, log


# --- The example projects in examples/ ----------------------------------------
# The example projects in examples/, run as their users run them.
#
# examples/proj is the layout of Celery's "Using Celery in your Application"
# tutorial and examples/django_proj the one of "First steps with Django", each
# with only `from celery` changed to `from minicelery`. Every test copies the
# example into tmp_path (so the SQLite files land there, not in the checkout),
# starts a real worker with `python -m minicelery -A <project> worker`, and
# sends tasks from separate client processes, on Redis and on the zero-setup
# SQLite default. PYTHONPATH is the repository root, so the examples import
# this checkout's minicelery.

EXAMPLES = os.path.join(HERE, "examples")

#: settings a developer's shell may export that would steer the examples elsewhere
_STRAY_SETTINGS = ("MINICELERY_BROKER_URL", "MINICELERY_RESULT_BACKEND", "CELERY_BROKER_URL",
                   "CELERY_RESULT_BACKEND", "PROJ_BROKER_URL", "PROJ_RESULT_BACKEND",
                   "DJANGO_SETTINGS_MODULE", "MYSITE_DB")


def copy_example(name, tmp_path):
    """A copy of examples/<name> in tmp_path, without caches or databases."""
    dest = tmp_path / name
    shutil.copytree(os.path.join(EXAMPLES, name), dest,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.db", "*.db-*", "*.sqlite3"))
    return dest


def example_env(**settings):
    """The environment of a user's shell: this checkout first on PYTHONPATH, plus `settings`."""
    env = {key: value for key, value in os.environ.items() if key not in _STRAY_SETTINGS}
    env["PYTHONPATH"] = os.pathsep.join([HERE, *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"  # a task's print() reaches the worker log at once
    env.update(settings)
    return env


def run(cwd, env, *argv, timeout=60, worker=None):
    """Run `python *argv` in cwd like a user would; its stdout (it must succeed)."""
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        shown = " ".join(a if len(a) < 60 else a.strip().splitlines()[0] + " ..." for a in argv)
        more = f"\n--- the worker's log:\n{worker.log()}" if worker else ""
        pytest.fail(f"python {shown} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}{more}")
    return proc.stdout


@contextlib.contextmanager
def example_worker(cwd, env, app, log_path, *options, command=(sys.executable, "-m", "minicelery")):
    """The worker for the block: started as the README says, stopped with SIGTERM."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*command, "-A", app, "worker", "-l", "INFO", "-c", "2", *options],
                                cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    handle = CliWorker(proc, log_path)
    try:
        handle.wait_for_log("ready.", timeout=30)
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"the worker did not stop within 20s of SIGTERM:\n{handle.log()}")
        handle.returncode = proc.returncode


def real_celery_copy(name, tmp_path):
    """examples/<name> as the Celery project it came from: `from celery import`, for the real worker."""
    pytest.importorskip("celery", reason="the real celery package is not installed")
    dest = copy_example(name, tmp_path / "real-celery")
    for path in dest.rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace("from minicelery import", "from celery import"))
    code = "".join(p.read_text() for p in dest.rglob("*.py"))
    assert not re.search(r"^\s*(from|import) minicelery\b", code, re.M)
    return dest


def real_celery_worker(cwd, env, app, log_path):
    """`celery -A app worker`, the real one, on a project from real_celery_copy()."""
    return example_worker(cwd, env, app, log_path, "--without-mingle", "--without-gossip",
                      command=(sys.executable, "-m", "celery"))


def banner_queues(log):
    """The queue names under the worker banner's [queues]."""
    section = log.split("[queues]", 1)[1].split("[tasks]", 1)[0]
    return re.findall(r"\.> (\S+)", section)


def banner_tasks(log):
    """The task names under the worker banner's [tasks]."""
    section = log.split("[tasks]", 1)[1]
    return re.findall(r"^\s+\. (\S+)$", section.split("\n\n", 1)[0], re.M)


# --- examples/proj: Celery's tutorial layout --------------------------------------

# Sent before any worker runs, so the messages wait in their queues.
PROJ_SEND = """
import json, minicelery
from proj.celery import app
from proj.tasks import add, crunch, ping
sent = {"add": add.delay(2, 2).id, "crunch": crunch.delay(10000).id, "ping": ping.delay().id}
print(json.dumps({"ids": sent, "minicelery": minicelery.__file__,
                  "sizes": {q: app.broker.size(q) for q in ("default", "heavy", "celery")}}))
"""

# While the worker runs: the results of those, and a round trip each.
PROJ_GET = """
import json, sys
from proj.celery import app
from proj.tasks import add, mul, xsum, crunch, ping
ids = json.loads(sys.argv[1])
waited = {name: app.AsyncResult(task_id).get(timeout=20) for name, task_id in ids.items()}
fresh = {"add": add.delay(2, 2).get(timeout=20), "mul": mul.delay(6, 7).get(timeout=20),
         "xsum": xsum.delay([1, 2, 3, 4]).get(timeout=20), "crunch": crunch.delay(100).get(timeout=20),
         "ping": ping.delay().get(timeout=20)}
print(json.dumps({"waited": waited, "fresh": fresh,
                  "sizes": {q: app.broker.size(q) for q in ("default", "heavy")}}))
"""


def example_broker_env(request, broker_variable, backend_variable):
    """An example's environment: pointed at the test Redis by those two variables, or with no settings."""
    if request.param != "redis":
        return example_env()
    sock = request.getfixturevalue("redis_server")
    request.getfixturevalue("redis_client")  # flushed
    return example_env(**{broker_variable: f"redis+socket://{sock}",
                          backend_variable: f"redis+socket://{sock}?virtual_host=1"})


@pytest.fixture(params=["redis", "sqlite"])
def proj(request, tmp_path):
    """examples/proj copied to tmp_path, and its environment: on the test Redis, or on no settings at all."""
    project = copy_example("proj", tmp_path)
    return request.param, project, example_broker_env(request, "PROJ_BROKER_URL", "PROJ_RESULT_BACKEND")


def test_proj_example_runs_in_a_cli_worker(proj, request, tmp_path):
    broker, project, env = proj
    sent = json.loads(run(project, env, "-c", PROJ_SEND))
    assert sent["minicelery"] == os.path.join(HERE, "minicelery.py")  # this checkout's, not an installed copy
    # task_routes put crunch on `heavy`; the rest go to task_default_queue.
    assert sent["sizes"] == {"default": 2, "heavy": 1, "celery": 0}
    if broker == "redis":
        client = request.getfixturevalue("redis_client")
        [raw] = client.lrange("heavy", 0, -1)
        assert json.loads(raw)["headers"]["task"] == "proj.tasks.crunch"
        assert sorted(json.loads(m)["headers"]["task"] for m in client.lrange("default", 0, -1)) == \
            ["proj.tasks.add", "proj.tasks.ping"]
    else:
        assert (project / "minicelery.db").exists()  # the zero-setup default, in the cwd

    # No -Q: the worker consumes both queues of task_queues.
    with example_worker(project, env, "proj", tmp_path / "worker.log") as worker:
        got = json.loads(run(project, env, "-c", PROJ_GET, json.dumps(sent["ids"]), worker=worker))
        log = worker.log()
    assert worker.returncode == 0, log
    assert got["waited"] == {"add": 4, "crunch": 1229, "ping": "pong"}
    assert got["fresh"] == {"add": 4, "mul": 42, "xsum": 10, "crunch": 25, "ping": "pong"}
    assert got["sizes"] == {"default": 0, "heavy": 0}
    assert sorted(banner_queues(log)) == ["default", "heavy"]
    # include= registered the app's tasks and the shared_task alike
    assert {"proj.tasks.add", "proj.tasks.mul", "proj.tasks.xsum", "proj.tasks.crunch",
            "proj.tasks.ping"} <= set(banner_tasks(log))
    assert f"Task proj.tasks.crunch[{sent['ids']['crunch']}] received" in log
    assert "Traceback" not in log


def test_proj_example_worker_minus_q_heavy_runs_only_crunch(redis_server, redis_client, tmp_path):
    project = copy_example("proj", tmp_path)
    env = example_env(PROJ_BROKER_URL=f"redis+socket://{redis_server}",
                      PROJ_RESULT_BACKEND=f"redis+socket://{redis_server}?virtual_host=1")
    sent = json.loads(run(project, env, "-c", PROJ_SEND))["ids"]
    with example_worker(project, env, "proj", tmp_path / "worker.log", "-Q", "heavy") as worker:
        worker.wait_for_log(f"Task proj.tasks.crunch[{sent['crunch']}] succeeded")
        log = worker.log()
    assert worker.returncode == 0, log
    assert banner_queues(log) == ["heavy"]
    assert redis_client.llen("heavy") == 0 and redis_client.llen("default") == 2


# --- examples/django_proj: Celery's Django integration ------------------------------

PLACED = re.compile(r"^Order (\d+) placed: task (\S+)$", re.M)


def order_rows(project):
    """The orders table, read straight from the Django project's SQLite file."""
    with contextlib.closing(sqlite3.connect(project / "db.sqlite3", timeout=10)) as db:
        return [(pk, name, Decimal(str(total)), status) for pk, name, total, status in
                db.execute("SELECT id, name, total, status FROM orders_order ORDER BY id")]


@pytest.fixture(params=["sqlite", "redis"])
def django_proj(request, tmp_path):
    """examples/django_proj copied to tmp_path and migrated; on the SQLite default or on the test Redis."""
    pytest.importorskip("django")
    project = copy_example("django_proj", tmp_path)
    env = example_broker_env(request, "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
    out = run(project, env, "manage.py", "migrate", "--noinput")
    assert "Applying orders.0001_initial... OK" in out
    return request.param, project, env


def test_django_example_runs_in_a_cli_worker(django_proj, tmp_path):
    broker, project, env = django_proj
    with example_worker(project, env, "mysite", tmp_path / "worker.log") as worker:
        tasks = banner_tasks(worker.log())
        assert {"orders.tasks.process_order", "mysite.celery.debug_task"} <= set(tasks), worker.log()

        out = run(project, env, "manage.py", "place_order", "--name", "widgets", "--total", "120.00",
                  "--wait", "--timeout", "20", worker=worker)
        [(pk, task_id)] = PLACED.findall(out)
        assert f"Result: {{'id': {pk}, 'status': 'processed', 'total': '108.00'}}" in out, out

        out = run(project, env, "manage.py", "place_order", "--name", "small", "--total", "50",
                  "--wait", "--timeout", "20", worker=worker)
        assert "Result: {'id': 2, 'status': 'processed', 'total': '50.00'}" in out, out

        # Without --wait the command returns at once; the worker still gets to the row.
        out = run(project, env, "manage.py", "place_order", "--name", "later", worker=worker)
        [(later, later_task)] = PLACED.findall(out)
        assert "Result:" not in out
        wait_until(lambda: order_rows(project)[-1][3] == "processed", timeout=20,
                   what="the worker to process the order placed without --wait")

        # A bound task, sent from Django's shell, sees its request.
        debug_id = run(project, env, "manage.py", "shell", "-c",
                       "from mysite.celery import debug_task; print(debug_task.delay().id)", worker=worker).split()[-1]
        worker.wait_for_log(f"Task mysite.celery.debug_task[{debug_id}] succeeded")
        worker.wait_for_log("Request: ")
        log = worker.log()
    assert worker.returncode == 0, log
    assert order_rows(project) == [
        (int(pk), "widgets", Decimal("108.00"), "processed"),
        (2, "small", Decimal("50.00"), "processed"),
        (int(later), "later", Decimal("108.00"), "processed"),
    ]
    assert f"Task orders.tasks.process_order[{task_id}] received" in log
    assert f"Task orders.tasks.process_order[{later_task}] received" in log
    assert "Traceback" not in log
    if broker == "sqlite":
        assert (project / "minicelery.db").exists()  # the worker and manage.py shared it
    else:
        assert not (project / "minicelery.db").exists()


# --- the same projects under the real Celery: proof they are Celery projects ---------

@pytest.mark.interop
def test_proj_example_real_celery_worker_runs_what_minicelery_sent(redis_server, redis_client, tmp_path):
    """The example's minicelery client sends; `celery -A proj worker` (no -Q) on the
    same project with `from celery import` runs both queues; minicelery reads the results."""
    project, real = copy_example("proj", tmp_path), real_celery_copy("proj", tmp_path)
    env = example_env(PROJ_BROKER_URL=f"redis+socket://{redis_server}",
                      PROJ_RESULT_BACKEND=f"redis+socket://{redis_server}?virtual_host=1")
    sent = json.loads(run(project, env, "-c", PROJ_SEND))
    assert sent["sizes"] == {"default": 2, "heavy": 1, "celery": 0}
    with real_celery_worker(real, env, "proj", tmp_path / "celery.log") as worker:
        got = json.loads(run(project, env, "-c", PROJ_GET, json.dumps(sent["ids"]), worker=worker))
        log = worker.log()
    assert got["waited"] == {"add": 4, "crunch": 1229, "ping": "pong"}
    assert got["fresh"] == {"add": 4, "mul": 42, "xsum": 10, "crunch": 25, "ping": "pong"}
    assert got["sizes"] == {"default": 0, "heavy": 0}
    assert sorted(banner_queues(log)) == ["default", "heavy"]
    assert f"Task proj.tasks.crunch[{sent['ids']['crunch']}] received" in log


@pytest.mark.interop
def test_django_example_real_celery_worker_processes_minicelerys_order(redis_server, redis_client, tmp_path):
    """`manage.py place_order --wait` on minicelery, the real `celery -A mysite worker` runs it."""
    pytest.importorskip("django")
    project, real = copy_example("django_proj", tmp_path), real_celery_copy("django_proj", tmp_path)
    env = example_env(CELERY_BROKER_URL=f"redis+socket://{redis_server}",
                      CELERY_RESULT_BACKEND=f"redis+socket://{redis_server}?virtual_host=1",
                      MYSITE_DB=str(tmp_path / "shared.sqlite3"))
    run(project, env, "manage.py", "migrate", "--noinput")
    with real_celery_worker(real, env, "mysite", tmp_path / "celery.log") as worker:
        assert {"orders.tasks.process_order", "mysite.celery.debug_task"} <= set(banner_tasks(worker.log()))
        out = run(project, env, "manage.py", "place_order", "--wait", "--timeout", "20", worker=worker)
    [(pk, task_id)] = PLACED.findall(out)
    assert f"Result: {{'id': {pk}, 'status': 'processed', 'total': '108.00'}}" in out, out
    with contextlib.closing(sqlite3.connect(tmp_path / "shared.sqlite3")) as db:
        assert db.execute("SELECT status FROM orders_order WHERE id = ?", (pk,)).fetchone() == ("processed",)
    assert f"Task orders.tasks.process_order[{task_id}] received" in worker.log()


def test_a_projects_own_remote_control_commands(tmp_path, redis_server):
    """Celery's docs show per-worker state behind custom commands (celery.worker.control's
    control_command and inspect_command): sent by the CLI and by app.control, answered by
    each worker's main process; one that raises is an error reply, not a dead worker."""
    url = f"unix://{redis_server}"
    write_tree(tmp_path, {"cmdproj.py": f"""
        from minicelery import Celery
        from minicelery.worker.control import control_command, inspect_command
        app = Celery("cmdproj", broker="{url}", backend="{url}?db=1")
        bumped = []

        @control_command(args=[("n", int)], signature="[N=1]")
        def bump(state, n=1):
            bumped.append(n)
            return {{"ok": f"bumped by {{n}} to {{sum(bumped)}}"}}

        @inspect_command()
        def concurrency(state):
            return {{"concurrency": state.consumer.pool.concurrency, "node": state.hostname}}

        @inspect_command()
        def broken(state):
            raise RuntimeError("not today")

        @inspect_command()
        def not_json(state):
            return object()
        """})
    env = project_env(tmp_path)
    with cli_worker(tmp_path, env, "-A", "cmdproj", "worker", "-c", "2", "-n", "cmd@%h") as w:
        node = minicelery._expand_hostname("cmd@%h")
        only = ("-d", node, "-t", "5")  # (back at its one answer)
        first = run_cli(tmp_path, env, "-A", "cmdproj", "control", "bump", "3", *only)
        second = run_cli(tmp_path, env, "-A", "cmdproj", "control", "bump", "4", *only)
        assert "bumped by 3 to 3" in first.stdout and "bumped by 4 to 7" in second.stdout, (first, second)
        looked = run_cli(tmp_path, env, "-A", "cmdproj", "inspect", "concurrency", "-j", *only)
        assert json.loads(looked.stdout) == {node: {"concurrency": 2, "node": node}}, looked
        unknown = run_cli(tmp_path, env, "-A", "cmdproj", "inspect", "nothing_such", *only)
        assert unknown.returncode == 1 and "no command 'nothing_such'" in unknown.stderr and "concurrency" in \
            unknown.stderr
        client = Celery("cmdproj", broker=url, set_as_current=False)
        [answer] = client.control.broadcast("broken", destination=[node], reply=True, timeout=5)
        assert answer == {node: {"error": "broken: RuntimeError: not today"}}
        [answer] = client.control.broadcast("not_json", destination=[node], reply=True, timeout=5)  # (no reply)
        assert answer[node]["error"].startswith("the reply can't be sent as JSON")
        assert client.control.ping([node], timeout=5) == [{node: {"ok": "pong"}}]
    assert "Control command broken raised" in w.log()


# --- Celery's signals: who sends them, with what, and in which process --------------

SIGNALS_PROJECT = """
    import gc, json, logging, os
    from minicelery import Celery
    from minicelery import signals

    app = Celery("sigproj", broker="{broker}", backend="{backend}")
    app.conf.beat_schedule = {{"tick": {{"task": "sigproj.add", "schedule": 3600, "args": (0, 0)}}}}

    def record(name, sender, **info):
        sender = sender if isinstance(sender, (str, type(None))) else getattr(sender, "name", type(sender).__name__)
        with open(os.environ["SIGNALS_OUT"], "a") as out:
            out.write(json.dumps(dict(signal=name, sender=sender, pid=os.getpid(), **info)) + "\\n")

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def boom():
        raise ValueError("boom")

    @app.task(bind=True)
    def again(self):
        if not self.request.retries:
            raise self.retry(countdown=0)
        return "retried"

    def each(name, *fields):
        def receiver(sender=None, signal=None, **arguments):
            assert signal is getattr(signals, name)
            record(name, sender, **{{f: repr(arguments[f]) for f in fields}})
        getattr(signals, name).connect(receiver, weak=False)

    for name, fields in {{"before_task_publish": ("body", "headers", "routing_key"),
                         "after_task_publish": ("body", "routing_key"), "task_received": ("request",),
                         "task_prerun": ("task_id", "args"), "task_postrun": ("retval", "state"),
                         "task_success": ("result",), "task_failure": ("exception", "einfo"),
                         "task_retry": ("reason",), "task_revoked": ("terminated", "expired"),
                         "celeryd_init": ("conf",), "celeryd_after_setup": (), "worker_init": (),
                         "worker_before_create_process": (), "worker_process_init": (),
                         "worker_process_shutdown": ("exitcode",), "worker_ready": (), "worker_shutdown": (),
                         "beat_init": (), "beat_embedded_init": (), "after_setup_logger": ("loglevel",),
                         "after_setup_task_logger": ("loglevel",)}}.items():
        each(name, *fields)

    @signals.setup_logging.connect
    def own_logging(loglevel=None, **_):  # (then minicelery leaves logging to it, as Celery does)
        logging.basicConfig(level=loglevel, format="OWN %(levelname)s %(message)s")
        record("setup_logging", None, loglevel=loglevel)

    @signals.task_success.connect(sender=boom)
    def never(**_):  # (connected for another sender)
        record("wrong_sender", None)
    """


def test_celerys_signals_are_sent_where_celery_sends_them(tmp_path, redis_server):
    """Each of Celery's signals that real projects connect to (database pools, tracing,
    error reports), with Celery's sender and arguments, in the process Celery sends it
    in: the client, the worker's main process, a pool process, beat."""
    out = tmp_path / "signals.jsonl"
    url = f"unix://{redis_server}"
    write_tree(tmp_path, {"sigproj.py": SIGNALS_PROJECT.format(broker=url, backend=url + "?db=1")})
    env = project_env(tmp_path, SIGNALS_OUT=str(out))
    with cli_worker(tmp_path, env, "-A", "sigproj", "worker", "-c", "1", "-B") as w:
        sent = run_python(tmp_path, env, """
            import os, time, datetime as dt
            from sigproj import add, boom, again
            print(os.getpid())
            assert add.delay(2, 3).get(timeout=20) == 5
            try:
                boom.delay().get(timeout=20)
            except ValueError:
                pass
            assert again.delay().get(timeout=20) == "retried"
            expired = add.apply_async((1, 1), expires=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))
            try:
                expired.get(timeout=20)
            except Exception as exc:
                print(type(exc).__name__)
            """)
        assert sent.returncode == 0 and "TaskRevokedError" in sent.stdout, sent.stderr
        wait_until(lambda: '"beat_init"' in out.read_text(), what="beat's signal")
    client = int(sent.stdout.split()[0])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    where = {}
    for line in lines:
        where.setdefault(line["signal"], set()).add(line["pid"])
    main, = where["worker_ready"]
    children = where["worker_process_init"]
    beat, = where["beat_init"]
    assert len({client, main, beat, *children}) == 3 + len(children)
    for name in ("before_task_publish", "after_task_publish"):
        assert client in where[name]  # (and the worker, sending the retry)
    for name in ("celeryd_init", "celeryd_after_setup", "worker_init", "worker_before_create_process",
                 "worker_ready", "task_received", "task_revoked", "worker_shutdown", "setup_logging",
                 "after_setup_logger", "after_setup_task_logger"):
        assert where[name] == {main}, name
    for name in ("worker_process_init", "task_prerun", "task_postrun", "task_success", "task_failure",
                 "task_retry", "worker_process_shutdown"):
        assert where[name] <= children, name
    assert where["beat_embedded_init"] == {beat}
    assert "wrong_sender" not in where
    by_signal = {}
    for line in lines:
        by_signal.setdefault(line["signal"], line)  # (the first of each)
    published = next(line for line in lines if line["signal"] == "before_task_publish" and line["pid"] == client)
    assert published["sender"] == "sigproj.add" and "'routing_key'" not in published["headers"]
    assert published["routing_key"] == "'celery'" and published["body"].startswith("([2, 3], {}")
    assert by_signal["task_success"]["sender"] == "sigproj.add" and by_signal["task_success"]["result"] == "5"
    assert by_signal["task_failure"]["exception"] == "ValueError('boom')"
    assert "Traceback" in by_signal["task_failure"]["einfo"]
    assert by_signal["task_revoked"]["expired"] == "True" and by_signal["task_revoked"]["terminated"] == "False"
    assert by_signal["setup_logging"]["loglevel"] == "INFO" and "OWN INFO" in w.log()
    assert by_signal["worker_process_shutdown"]["exitcode"] == "0"


def test_a_pool_process_whose_worker_process_init_hangs_or_exits_is_replaced(tmp_path, redis_server):
    """A worker_process_init receiver that hung left its pool process holding the jobs lent
    to it for ever (the worker said ready, and ran nothing); one that exited was replaced
    without a word of why. Now: 4 s at most (Celery's worker_proc_alive_timeout), said."""
    url = f"unix://{redis_server}"
    write_tree(tmp_path, {"initproj.py": f"""
        import os, time
        from minicelery import Celery
        from minicelery.signals import worker_process_init
        app = Celery("initproj", broker="{url}", backend="{url}?db=1")

        @worker_process_init.connect
        def init(**_):
            if os.path.exists("{tmp_path}/EXIT"):
                os.unlink("{tmp_path}/EXIT")
                os._exit(3)
            while os.path.exists("{tmp_path}/HANG"):
                time.sleep(0.1)

        @app.task
        def add(x, y):
            return x + y
        """})
    (tmp_path / "EXIT").touch()
    (tmp_path / "HANG").touch()
    env = project_env(tmp_path)
    with cli_worker(tmp_path, env, "-A", "initproj", "worker", "-c", "1") as w:
        client = Celery("initproj", broker=url, backend=url + "?db=1", set_as_current=False)
        result = client.send_task("initproj.add", (1, 2))
        w.wait_for_log("did not return within 4s: this pool process leaves")
        (tmp_path / "HANG").unlink()
        assert result.get(timeout=20) == 3
    assert "ended (exitcode 3) before it ran a job" in w.log() and "ended (exitcode 1) before it ran" in w.log()


def test_a_signal_holds_bound_methods_of_several_instances_weakly():
    """As Celery's Signal: two instances' bound methods are two receivers; each can be
    disconnected; one whose instance is gone is dropped; dispatch_uid names one."""
    signal = minicelery.Signal("test")
    heard = []

    class Listener:
        def __init__(self, name):
            self.name = name

        def hear(self, sender, **arguments):
            heard.append((self.name, sender, arguments["value"]))

    first, second = Listener("first"), Listener("second")
    signal.connect(first.hear)
    signal.connect(second.hear)
    signal.connect(first.hear)  # (once only)
    signal.send(sender="x", value=1)
    assert heard == [("first", "x", 1), ("second", "x", 1)]
    assert signal.disconnect(first.hear) and not signal.disconnect(first.hear)
    del second
    gc.collect()
    heard.clear()
    assert signal.send(sender="x", value=2) == [] and heard == [] and not signal.has_listeners()

    @signal.connect(sender="only-this", dispatch_uid="named")
    def named(sender, **arguments):
        raise RuntimeError("a receiver's error is logged, not raised")
    [(receiver, error)] = signal.send(sender="only-this", value=3)
    assert receiver is named and isinstance(error, RuntimeError) and signal.send(sender="other", value=3) == []
    assert signal.disconnect(sender="only-this", dispatch_uid="named") and not signal.has_listeners("only-this")

    def gone(sender, **_):
        heard.append("gone")
    signal.connect(gone, dispatch_uid="reused")
    del gone
    gc.collect()
    signal.connect(lambda sender, **_: heard.append("new"), weak=False, dispatch_uid="reused")  # (its key is free)
    signal.send(sender="x", value=4)
    assert heard[-1:] == ["new"]


# --- Operations: remote control over Celery's pidbox --------------------------------
# `app.control` / `celery inspect` / `celery control` reach every worker through the
# pidbox broadcast; the ones that want answers get one reply per worker.

class AutoRetriedClassTask(Task):
    """A task written as a class (Celery 1.0 style), added with app.register_task()."""
    name = "test_minicelery.auto_retried_class"
    autoretry_for = (ValueError,)
    retry_kwargs = {"max_retries": 1}
    default_retry_delay = 0

    def run(self):
        if self.request.retries:
            return self.request.retries
        raise ValueError("first try")


def test_register_task_and_a_parked_task_held_by_no_process(app, tmp_path):
    """Celery's app.register_task(TaskClass); `inspect scheduled` showed a parked task as
    acknowledged by an idle pool process (its pid), where Celery shows it as nobody's."""
    task = app.register_task(AutoRetriedClassTask)
    assert app.tasks[task.name] is task and task.app is app
    parked = add.apply_async((4, 4), countdown=3600)
    with worker(app, tmp_path, concurrency=2, hostname="classy@%h"):
        assert task.delay().get(timeout=10) == 1
        node = minicelery._expand_hostname("classy@%h")
        [entry] = app.control.inspect(destination=[node], timeout=5.0).scheduled()[node]
    assert (entry["priority"], entry["parked"]) == (6, True)  # (6: Celery's timer priority for ETA tasks)
    assert entry["request"]["id"] == parked.id
    assert (entry["request"]["acknowledged"], entry["request"]["worker_pid"]) == (False, None)


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_remote_inspect_answers_in_celerys_form(any_app, tmp_path):
    # Queued before the worker starts, its pool process takes the three at once: it runs the
    # first, hands the one with an ETA to the main process, and gives back the one waiting
    # behind the long task (reserved by the main process, for the next free process).
    running = sleep_then.delay(5, "slept")
    waiting, big = add.delay(1, 2), echo.delay("b" * 20_000)  # (a big one shows its argsrepr)
    later = add.apply_async((2, 3), countdown=2.5)  # held by the worker (not parked) for a while
    parked = add.apply_async((4, 4), countdown=3600)  # parked in the broker: listed too, marked so
    echo.apply_async(("p" * 100_000,), countdown=3600)  # parked too, but too big for the main process to read
    unknown = any_app.send_task("no.such.task")  # (not counted in its stats)
    with worker(any_app, tmp_path, concurrency=1, hostname="inspected@%h") as w:
        node = minicelery._expand_hostname("inspected@%h")
        inspect = any_app.control.inspect(destination=[node], timeout=5.0)  # back at its one answer
        # (first, while `later` is surely not due: the countdown began before the worker)
        wait_until(lambda: [(s["request"]["id"], s.get("parked")) for s in (inspect.scheduled() or {}).get(node, [])]
                   == [(later.id, None), (parked.id, True)], what="the task with a countdown held, the one parked")
        [(state, info)] = inspect.query_task(parked.id)[node].values()
        assert state == "scheduled" and info["args"] == [4, 4] and info["worker_pid"] is None
        assert any_app.control.ping(timeout=1.0) == [{node: {"ok": "pong"}}]  # (waits the whole second)
        assert inspect.ping() == {node: {"ok": "pong"}}
        wait_until(lambda: (inspect.active() or {}).get(node), what="the task running")
        active = inspect.active()[node]
        assert [(a["id"], a["name"], a["args"]) for a in active] == [(running.id, "test_minicelery.sleep_then",
                                                                      [5, "slept"])]
        assert active[0]["worker_pid"] in w.children() and active[0]["time_start"] > 0
        assert active[0]["delivery_info"]["routing_key"] == "celery"
        reserved = inspect.reserved()[node]
        assert [(r["id"], r["args"]) for r in reserved[:1]] == [(waiting.id, [1, 2])]
        assert reserved[1]["id"] == big.id and reserved[1]["args"].startswith("('bbbb")
        assert len(reserved[1]["args"]) <= 1024
        assert inspect.query_task(running.id, waiting.id)[node] == {
            running.id: ["active", active[0]], waiting.id: ["reserved", inspect.reserved()[node][0]]}
        assert "test_minicelery.add" in inspect.registered()[node]
        stats = inspect.stats()[node]
        assert stats["pool"]["max-concurrency"] == 1 and stats["pool"]["processes"] == w.children()
        assert stats["pid"] == w.pid and stats["prefetch_count"] == 4
        assert [q["name"] for q in inspect.active_queues()[node]] == ["celery"]
        conf = inspect.conf()[node]
        assert conf["task_default_queue"] == "celery" and conf["broker_url"] == minicelery._safe_url(
            any_app.conf.broker_url)
        any_app.control.revoke(later.id)
        wait_until(lambda: later.id in (inspect.revoked() or {}).get(node, []), what="the revoke")
        assert running.get(timeout=10) == "slept" and waiting.get(timeout=10) == 3
        with pytest.raises(minicelery.NotRegistered):
            unknown.get(timeout=10)
        # (counted when the pool process's report is read, which may come after get() returns)
        wait_until(lambda: inspect.stats()[node]["total"] == {"test_minicelery.sleep_then": 1,
                                                              "test_minicelery.add": 1,
                                                              "test_minicelery.echo": 1}, what="all counted")
        with pytest.raises(ValueError, match="at most 255"):  # (every worker would keep it)
            any_app.control.revoke("x" * 256)
    assert any_app.control.inspect(timeout=0.5).ping() is None  # nobody left to answer


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_remote_control_commands_are_obeyed_and_answered(any_app, tmp_path):
    with worker(any_app, tmp_path, concurrency=1, hostname="steered@%h") as w:
        node = minicelery._expand_hostname("steered@%h")
        control = any_app.control
        one = {"destination": [node], "reply": True, "timeout": 5.0}  # back at its one answer
        assert control.rate_limit("test_minicelery.rate_limited", "1/m", **one) == [
            {node: {"ok": "new rate limit set successfully"}}]
        assert control.rate_limit("no.such.task", "1/s", **one) == [
            {node: {"error": "unknown task"}}]
        first, second = rate_limited.delay(1), rate_limited.delay(2)
        assert first.get(timeout=10) > 0  # (it returns when it ran)
        wait_until(lambda: control.inspect(destination=[node], timeout=5.0).scheduled(), what="the second held by its new rate limit")
        assert second.state == "PENDING"
        assert control.time_limit("test_minicelery.sleep_then", hard=1, **one) == [
            {node: {"ok": "time limits set successfully"}}]
        with pytest.raises(minicelery.TimeLimitExceeded):
            sleep_then.delay(30).get(timeout=15)
        assert control.add_consumer("extra", **one) == [{node: {"ok": "add consumer extra"}}]
        assert add.apply_async((2, 2), queue="extra").get(timeout=10) == 4
        assert control.cancel_consumer("extra", **one) == [
            {node: {"ok": "no longer consuming from extra"}}]
        assert control.cancel_consumer("celery", **one)[0][node]["error"]
        assert control.broadcast("no_such_command", **one) == [
            {node: {"error": "unknown command 'no_such_command'"}}]
        control.shutdown()
        wait_until(lambda: not w.alive(), what="the worker to obey shutdown")
    assert "Got shutdown from remote" in w.log()


@pytest.mark.interop
def test_interop_celerys_inspect_and_status_list_a_minicelery_worker(app, tmp_path):
    pytest.importorskip("celery")
    env = dict(os.environ, PYTHONPATH=HERE, MINICELERY_BROKER_URL=app.conf.broker_url,
               MINICELERY_RESULT_BACKEND=app.conf.result_backend)
    write_tree(tmp_path, {"realproj.py": f"""
        from celery import Celery
        app = Celery("realproj", broker={app.conf.broker_url.replace("unix://", "redis+socket://")!r})
        """})
    with worker(app, tmp_path, hostname="mini@%h"):
        node = minicelery._expand_hostname("mini@%h")
        celery = [sys.executable, "-m", "celery", "-A", "realproj"]
        ping = subprocess.run([*celery, "inspect", "ping", "--timeout", "3"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0 and f"{node}: OK" in ping.stdout and "pong" in ping.stdout, ping
        status = subprocess.run([*celery, "status", "--timeout", "3"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and node in status.stdout and "1 node online" in status.stdout, status
        registered = subprocess.run([*celery, "inspect", "registered", "--timeout", "3"], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=60)
        assert "test_minicelery.add" in registered.stdout, registered
        held = sleep_then.delay(5, "held")
        wait_until(lambda: app.control.inspect(destination=[node], timeout=3).active()[node], what="a task running")
        active = subprocess.run([*celery, "inspect", "active", "--timeout", "3"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert active.returncode == 0 and node in active.stdout and held.id in active.stdout, active
        real = real_celery.Celery("realproj", broker=app.conf.broker_url.replace("unix://", "redis+socket://"))
        assert real.control.inspect(timeout=3).stats()[node]["pool"]["max-concurrency"] == 2
        assert real.control.rate_limit("test_minicelery.add", "5/s", reply=True, timeout=3) == [
            {node: {"ok": "new rate limit set successfully"}}]
        # And the other way: minicelery's client lists a real Celery worker beside its own.
        log = open(tmp_path / "real-worker.log", "w")
        proc = subprocess.Popen([*celery, "worker", "-l", "INFO", "-c", "1", "-n", "real@%h", "--without-mingle",
                                 "--without-gossip", "-Q", "elsewhere"], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            real_node = minicelery._expand_hostname("real@%h")
            wait_until(lambda: "ready." in (tmp_path / "real-worker.log").read_text(), timeout=30,
                       what="the real Celery worker")
            # (a real Celery worker may say "ready." a moment before it listens to broadcasts)
            both = {node: {"ok": "pong"}, real_node: {"ok": "pong"}}
            wait_until(lambda: app.control.inspect(destination=[node, real_node], timeout=2).ping() == both,
                       timeout=30, what="both workers answering a ping")
            assert app.control.inspect(destination=[real_node], timeout=5).active_queues()[real_node][0][
                "name"] == "elsewhere"
            # Each answer of ours has the fields of a real worker's (Flower's worker page read
            # active_queues' queue_arguments, and failed), asked by the real Celery client.
            both_inspect = real.control.inspect(destination=[node, real_node], timeout=5)
            for command in ("ping", "clock", "registered", "active_queues", "stats", "report", "revoked",
                            "scheduled", "active", "reserved"):
                answers = getattr(both_inspect, command)()
                assert _same_fields(answers[node], answers[real_node]), (command, answers)
            confs = both_inspect.conf()
            assert set(confs[real_node]) <= set(confs[node])
            assert both_inspect.clock()[node]["clock"] > 0 and "software -> celery:" in both_inspect.report()[node]["ok"]
            # A revoke and a rate_limit cross both ways, with Celery's replies.
            revoked = app.control.revoke("rev-1", reply=True, timeout=3)
            assert sorted(revoked, key=str) == sorted([{node: {"ok": "tasks {'rev-1'} flagged as revoked"}},
                                                       {real_node: {"ok": "tasks {'rev-1'} flagged as revoked"}}],
                                                      key=str)
            assert real.control.revoke("rev-2", reply=True, timeout=5, destination=[node]) == [
                {node: {"ok": "tasks {'rev-2'} flagged as revoked"}}]
            [stamp_reply] = real.control.revoke_by_stamped_headers({"mid": ["x"]}, reply=True, timeout=5,
                                                                   destination=[node])
            assert "flagged as revoked" in stamp_reply[node]["ok"]
            assert app.control.rate_limit("test_minicelery.add", "5/s", destination=[real_node], reply=True,
                                          timeout=5) == [{real_node: {"error": "unknown task"}}]
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()


def test_celerys_command_line_and_flower_on_a_minicelery_project(app, tmp_path):
    """`celery -A <a minicelery project>` can't load our app ('Celery' object has no
    attribute 'user_options'): `python -m minicelery -A proj celery ...` and `... flower`
    run them on the project's broker. Flower's worker page answered HTTP 500 (active_queues
    lacked queue_arguments)."""
    pytest.importorskip("flower")
    env = dict(os.environ, PYTHONPATH=HERE, MINICELERY_BROKER_URL=app.conf.broker_url,
               MINICELERY_RESULT_BACKEND=app.conf.result_backend)
    with worker(app, tmp_path, hostname="flowered@%h"):
        node = minicelery._expand_hostname("flowered@%h")
        status = run_cli(tmp_path, env, "-A", "test_minicelery", "celery", "status", "--timeout", "5", timeout=60)
        assert status.returncode == 0 and node in status.stdout and "1 node online" in status.stdout, status
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log = open(tmp_path / "flower.log", "w")
        flower = subprocess.Popen([sys.executable, "-m", "minicelery", "-A", "test_minicelery", "flower",
                                   f"--port={port}", "--address=127.0.0.1"], cwd=tmp_path, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            import urllib.request

            def worker_page():
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/worker/{node}", timeout=5) as page:
                        return page.status, page.read().decode()
                return None
            wait_until(lambda: (worker_page() or (0, ""))[1].count("test_minicelery.add"), timeout=60,
                       what="Flower's page of the worker, with its tasks")
            status_code, page = worker_page()
            assert status_code == 200 and node in page and "celery" in page
        finally:
            flower.terminate()
            try:
                flower.wait(20)
            except subprocess.TimeoutExpired:  # (Flower's own shutdown, not ours to test)
                flower.kill()
                flower.wait()
            log.close()
    nobroker = run_cli(tmp_path, dict(env, MINICELERY_BROKER_URL=f"sqlite:///{tmp_path}/q.db"),
                       "-A", "test_minicelery", "flower", timeout=60)
    assert nobroker.returncode == 1 and "need a Redis broker" in nobroker.stderr


def _same_fields(ours, theirs) -> bool:
    """Whether two answers have the same keys all the way down (lists by their first
    items; an empty list or dict, or a value, stands for any)."""
    if isinstance(ours, dict) and isinstance(theirs, dict) and ours and theirs:
        return ours.keys() == theirs.keys() and all(_same_fields(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(theirs, list) and ours and theirs:
        return _same_fields(ours[0], theirs[0])
    return isinstance(ours, dict) == isinstance(theirs, dict)


# --- Operations: events in Celery's form ----------------------------------------------

def _events_from(raws):
    """The events (dicts) in pidbox-style envelopes, task.multi lists flattened."""
    out = []
    for raw in raws:
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        out += body if isinstance(body, list) else [body]
    return out


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_events_worker_and_task_events_in_celerys_form(any_app, tmp_path, request):
    if any_app.broker_url.startswith("sqlite"):
        store = minicelery.SQLiteStore.for_url(any_app.conf.broker_url)
        any_app.broker.size("celery")  # creates the tables

        def seen():
            return _events_from(raw for (raw,) in store.read("SELECT raw FROM events ORDER BY id"))
    else:
        client = redis.Redis(unix_socket_path=request.getfixturevalue("redis_server"))
        listener = client.pubsub()
        listener.psubscribe("/0.celeryev/*")
        channels, raws = [], []

        def seen():
            while (message := listener.get_message(timeout=0.05)) is not None:
                if message["type"] == "pmessage":
                    channels.append(message["channel"].decode())
                    raws.append(message["data"])
            return _events_from(raws)
    any_app.conf.worker_send_task_events = True
    any_app.conf.task_send_sent_event = True
    with worker(any_app, tmp_path, concurrency=1, hostname="eventful@%h") as w:
        node = minicelery._expand_hostname("eventful@%h")
        ok, bad = add.delay(2, 2), fail.delay("boom")
        assert ok.get(timeout=10) == 4
        with pytest.raises(ValueError):
            bad.get(timeout=10)
        wait_until(lambda: [e["type"] for e in seen()].count("worker-heartbeat") >= 1, what="a heartbeat")
        # (the pool process sends task-failed after it stored the FAILURE: before worker-offline)
        wait_until(lambda: ("task-failed", bad.id) in [(e["type"], e.get("uuid")) for e in seen()],
                   what="task-failed")
    events = wait_until(lambda: (e := seen()) and e[-1]["type"] == "worker-offline" and e, what="worker-offline")
    kinds = [(e["type"], e.get("uuid")) for e in events]
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert (kind, ok.id) in kinds
    assert ("task-failed", bad.id) in kinds and kinds[0][0] in ("task-sent", "worker-online")
    succeeded = next(e for e in events if e["type"] == "task-succeeded")
    assert succeeded["result"] == "4" and succeeded["runtime"] >= 0 and succeeded["hostname"] == node
    failed = next(e for e in events if e["type"] == "task-failed")
    assert failed["exception"] == "ValueError('boom')" and "Traceback" in failed["traceback"]
    received = next(e for e in events if e["type"] == "task-received" and e["uuid"] == ok.id)
    assert received["name"] == "test_minicelery.add" and received["args"] == "(2, 2)"
    heartbeat = next(e for e in events if e["type"] == "worker-heartbeat")
    assert heartbeat["hostname"] == node and heartbeat["freq"] == 2.0 and heartbeat["pid"] == w.pid
    if not any_app.broker_url.startswith("sqlite"):  # Celery's channels: task events batched on task.multi
        assert {"/0.celeryev/worker.online", "/0.celeryev/worker.heartbeat", "/0.celeryev/task.multi",
                "/0.celeryev/worker.offline"} <= set(channels)


def test_events_only_with_minus_e_and_switched_by_control(app, tmp_path, redis_client):
    listener = redis_client.pubsub()
    listener.psubscribe("/0.celeryev/task.*")
    with worker(app, tmp_path, hostname="quiet@%h"):
        node = minicelery._expand_hostname("quiet@%h")
        assert add.delay(1, 1).get(timeout=10) == 2
        assert app.control.broadcast("enable_events", destination=[node], reply=True, timeout=5) == [
            {node: {"ok": "task events enabled"}}]
        loud = add.delay(2, 2)
        assert loud.get(timeout=10) == 4
    uuids = []
    while (message := listener.get_message(timeout=0.2)) is not None:
        if message["type"] == "pmessage":
            uuids += [e["uuid"] for e in _events_from([message["data"]])]
    assert set(uuids) == {loud.id}  # nothing for the first: events were off


# --- Operations: the command line ---------------------------------------------------

@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_cli_status_inspect_control_result_and_purge(any_app, tmp_path):
    env = dict(os.environ, PYTHONPATH=HERE, MINICELERY_BROKER_URL=any_app.conf.broker_url,
               MINICELERY_RESULT_BACKEND=any_app.conf.result_backend)

    def cli(*argv, answer=None):
        return subprocess.run([sys.executable, "-m", "minicelery", "-A", "test_minicelery", *argv], cwd=HERE,
                              env=env, capture_output=True, text=True, timeout=60, input=answer)
    nobody = cli("status", "-t", "0.5")
    assert nobody.returncode == 69 and "No nodes replied within time constraint" in nobody.stderr
    with worker(any_app, tmp_path, hostname="cli@%h"):
        node = minicelery._expand_hostname("cli@%h")
        status = cli("status", "-t", "2")
        assert status.returncode == 0 and f"-> {node}: OK" in status.stdout and "1 node online." in status.stdout
        registered = cli("inspect", "registered", "-j", "-d", node, "-t", "5")
        assert "test_minicelery.add" in json.loads(registered.stdout)[node], registered
        limited = cli("control", "rate_limit", "test_minicelery.add", "100/s", "-d", node, "-t", "5")
        assert limited.returncode == 0 and "new rate limit set successfully" in limited.stdout, limited
        unknown = cli("control", "rate_limit", "no.such.task", "1/s", "-d", node, "-t", "5")
        assert f"-> {node}: ERROR" in unknown.stdout and "unknown task" in unknown.stdout
        done, failed = add.delay(3, 4), fail.delay("from the cli")
        assert done.get(timeout=10) == 7
        with pytest.raises(ValueError):
            failed.get(timeout=10)
        assert cli("result", done.id).stdout.strip() == "7"
        assert "ValueError: from the cli" in cli("result", failed.id, "--traceback").stdout
        shown = cli("result", failed.id)  # (printed like a return value, exit 0)
        assert shown.returncode == 1 and shown.stdout.strip() == "FAILURE: ValueError('from the cli')", shown
    for i in range(3):
        echo.delay(i)
    aborted = cli("purge", answer="n\n")
    assert aborted.returncode == 1 and any_app.broker.size("celery") == 3
    purged = cli("purge", "-f")
    assert purged.returncode == 0 and "Purged 3 message(s)" in purged.stdout and any_app.broker.size("celery") == 0


@pytest.mark.interop
def test_interop_flower_lists_a_minicelery_worker_and_its_tasks(app, tmp_path):
    pytest.importorskip("flower")
    import socket as socket_
    import urllib.request
    with socket_.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = app.conf.broker_url.replace("unix://", "redis+socket://")
    write_tree(tmp_path, {"flowerproj.py": f"""
        from celery import Celery
        app = Celery("flowerproj", broker={broker!r})
        """})
    env = dict(os.environ, PYTHONPATH=HERE, FLOWER_UNAUTHENTICATED_API="1")
    app.conf.worker_send_task_events = True
    log = open(tmp_path / "flower.log", "w")
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "flowerproj", "flower", f"--port={port}",
                               "--address=127.0.0.1", "--inspect_timeout=5000"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def api(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{path}", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None
    try:
        wait_until(lambda: api("workers") is not None, timeout=30, what="Flower up")
        with worker(app, tmp_path, hostname="flowered@%h"):
            node = minicelery._expand_hostname("flowered@%h")
            # Flower's event capture starts on its own time: once it has our heartbeat, it sees task events.
            wait_until(lambda: (api("workers?status=true") or {}).get(node), timeout=30,
                       what="Flower hearing the worker's events")
            result = add.delay(20, 22)
            assert result.get(timeout=10) == 42
            tasks = wait_until(lambda: (api("tasks") or {}).get(result.id, {}).get("state") == "SUCCESS"
                               and api("tasks"), timeout=30, what="Flower seeing the task")
            assert tasks[result.id]["worker"] == node and tasks[result.id]["result"] == "42"
            # (Flower asks with a short timeout; an answer too late for one refresh comes with the next)
            workers = wait_until(lambda: (api("workers?refresh=1") or {}).get(node, {}).get("registered") and
                                 api("workers")[node], timeout=30, what="Flower listing the worker")
            assert "test_minicelery.add" in workers["registered"]
    finally:
        flower.terminate()
        flower.wait(20)
        log.close()


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_cli_dead_lists_requeues_after_a_fix_and_drops(any_app, tmp_path):
    env = dict(os.environ, PYTHONPATH=HERE, MINICELERY_BROKER_URL=any_app.conf.broker_url,
               MINICELERY_RESULT_BACKEND=any_app.conf.result_backend)

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "minicelery", "-A", "test_minicelery", "dead", *argv],
                              cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    with worker(any_app, tmp_path):
        refused = any_app.send_task("test_minicelery.add", (2, 3), serializer="pickle")  # not accepted here
        unknown = any_app.send_task("no.such.task", ())
        for result in (refused, unknown):
            with pytest.raises(Exception):
                result.get(timeout=10)
    listing = cli("list")
    assert listing.returncode == 0 and "2 dead letter(s)." in listing.stdout, listing
    ids = {line.split()[0]: line for line in listing.stdout.splitlines() if "[" in line}
    refused_id = next(i for i, line in ids.items() if f"test_minicelery.add[{refused.id}]" in line)
    unknown_id = next(i for i, line in ids.items() if f"no.such.task[{unknown.id}]" in line)
    assert "refusing to deserialize" in listing.stdout and "unregistered" in listing.stdout
    assert cli("drop", unknown_id).returncode == 0
    assert cli("requeue", "no-such-id").returncode == 1
    requeued = cli("requeue", refused_id)
    assert requeued.returncode == 0 and "Requeued 1 dead letter(s)." in requeued.stdout
    assert "0 dead letter(s)." in cli().stdout
    any_app.conf.accept_content = ["json", "pickle"]  # the fix
    with worker(any_app, tmp_path):
        wait_until(lambda: any_app.AsyncResult(refused.id).state == "SUCCESS", what="the requeued task run")
    assert any_app.AsyncResult(refused.id).result == 5


@pytest.mark.parametrize("any_app", ["redis", "sqlite"], indirect=True)
def test_cli_events_dump_and_live_view(any_app, tmp_path):
    env = dict(os.environ, PYTHONPATH=HERE, MINICELERY_BROKER_URL=any_app.conf.broker_url,
               MINICELERY_RESULT_BACKEND=any_app.conf.result_backend)
    any_app.broker.size("celery")  # (SQLite: the tables exist before the watcher looks)
    command = [sys.executable, "-m", "minicelery", "-A", "test_minicelery", "events"]
    dump = subprocess.Popen([*command, "--dump", "-n", "6"], cwd=HERE, env=env, stdout=subprocess.PIPE, text=True)
    # Ctrl-C's default, even when this suite runs as a shell's background job (which ignores it)
    drawing = open(tmp_path / "view.out", "w")  # (a file: not a terminal)
    view = subprocess.Popen(command, cwd=HERE, env=env, stdout=drawing, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        any_app.conf.worker_send_task_events = True
        with worker(any_app, tmp_path, hostname="watched@%h"):
            node = minicelery._expand_hostname("watched@%h")
            first = dump.stdout.readline()  # a worker event (a heartbeat at least): the watcher listens
            assert add.delay(1, 1).get(timeout=10) == 2
            with pytest.raises(ValueError):
                fail.delay("shown").get(timeout=10)
            add.apply_async((5, 5), countdown=3600)  # (parked: counted as such)
            out, _ = dump.communicate(timeout=30)
            out = first + out
            wait_until(lambda: "1 parked for a later ETA" in (tmp_path / "view.out").read_text(), timeout=20,
                       what="the view to count the parked task")
            os.kill(view.pid, signal.SIGINT)
            view.wait(30)
            drawn = (tmp_path / "view.out").read_text()
    finally:
        for proc in (dump, view):
            if proc.poll() is None:
                proc.kill()
        drawing.close()
    events = [json.loads(line) for line in out.splitlines()]
    assert dump.returncode == 0 and len(events) == 6 and events[0]["type"].startswith("worker-")
    assert {"task-received", "task-started", "task-succeeded"} <= {e["type"] for e in events}
    kinds = [e["type"] for e in events if e["type"].startswith("task-")]
    assert kinds.index("task-received") < kinds.index("task-started")  # (was seen the other way round)
    assert view.returncode == 130 and f"{node}" in drawn and "online" in drawn and "tasks/s" in drawn
    assert "\033[" not in drawn  # (a pipe gets no terminal codes)
    assert "test_minicelery.fail[" in drawn and "ValueError('shown')" in drawn  # (the failure with its name)
    assert re.search(r"celery +\d+ waiting, 1 parked for a later ETA", drawn), drawn


def test_cli_multi_starts_stops_restarts_and_kills_workers(tmp_path):
    write_tree(tmp_path, {"multiproj.py": """
        from minicelery import Celery
        app = Celery("multiproj", broker="sqlite:///multi.db")

        @app.task
        def add(x, y):
            return x + y
        """})
    env = project_env(tmp_path)

    def multi(*argv):
        return run_cli(tmp_path, env, "multi", *argv, "-A", "multiproj", timeout=90)

    def pid_of(name):
        path = tmp_path / f"{name}.pid"
        return int(path.read_text()) if path.exists() else None
    started = multi("start", "w1", "w2", "-l", "INFO", "-c", "1", "--logfile", "%n%I.log")
    host = socket.gethostname()
    assert started.returncode == 0 and f"> Starting node w1@{host}: OK" in started.stdout, started
    first = pid_of("w1")
    assert first and pid_of("w2") and first != pid_of("w2")
    sent = run_python(tmp_path, env, "from multiproj import add; print(add.delay(2, 3).get(timeout=20))")
    assert sent.stdout.strip() == "5", sent
    wait_until(lambda: "ready." in (tmp_path / "w1.log").read_text() and "ready." in (tmp_path / "w2.log").read_text(),
               what="both workers ready")
    assert "already running" in multi("start", "w1").stdout
    restarted = multi("restart", "w1", "-l", "INFO")
    assert restarted.returncode == 0 and pid_of("w1") not in (None, first), restarted
    stopped = run_cli(tmp_path, env, "multi", "stopwait", "w1", "w2", timeout=90)  # (no -A: from the pidfiles)
    assert stopped.returncode == 0 and pid_of("w1") is None and pid_of("w2") is None, stopped
    assert "Warm shutdown" in (tmp_path / "w2.log").read_text()
    assert multi("start", "w3").returncode == 0
    victim = pid_of("w3")
    killed = multi("kill", "w3")
    assert killed.returncode == 0 and "SIGKILL" in killed.stdout and pid_of("w3") is None
    wait_until(lambda: not os.path.exists(f"/proc/{victim}") or "zombie" in open(f"/proc/{victim}/status").read()
               .lower(), what="w3 gone")
    assert "DOWN" in multi("stop", "w1").stdout


def test_hostile_remote_control_arguments_and_bindings_never_stop_a_worker(app, tmp_path, redis_client):
    app.conf.broker_transport_options = {"visibility_timeout": 3600, "secret_access_key": "LEAK1",
                                         "sentinels": ["redis://:LEAK2@h:1"]}
    with worker(app, tmp_path, concurrency=1, hostname="poked@%h"):
        node = minicelery._expand_hostname("poked@%h")
        redis_client.sadd("_kombu.binding.reply.celery.pidbox", *[f"garbage{i}" for i in range(50)])

        def ask(command, **arguments):
            return app.control.broadcast(command, arguments, [node], reply=True, timeout=5)[0][node]
        assert "error" in ask("add_consumer", queue=["a", "b"]) and "error" in ask("add_consumer", queue="")
        assert "error" in ask("time_limit", task_name="test_minicelery.add", hard="abc")
        assert "error" in ask("time_limit", task_name="test_minicelery.add", soft=-5)
        assert "error" in ask("rate_limit", task_name="test_minicelery.add", rate_limit={"a": 1})
        assert "error" in ask("revoke")  # no task_id
        conf = json.dumps(ask("conf"))
        assert "LEAK1" not in conf and "LEAK2" not in conf
        assert add.delay(2, 2).get(timeout=10) == 4  # still working, on its own queue only
        assert [q["name"] for q in ask("active_queues")] == ["celery"]


def test_multi_never_signals_a_process_that_is_not_its_worker(tmp_path):
    write_tree(tmp_path, {"multiproj.py": """
        from minicelery import Celery
        app = Celery("multiproj", broker="sqlite:///multi.db")
        """})
    env = project_env(tmp_path)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "w1.pid").write_text(f"{bystander.pid}\n")  # stale: the pid went to another program
        (tmp_path / "w2.pid").write_text("0\n")  # 0 would be the whole process group
        stopped = run_cli(tmp_path, env, "multi", "kill", "w1", "w2", "-A", "multiproj")
        assert stopped.returncode == 0 and stopped.stdout.count("DOWN") == 2, stopped
        assert bystander.poll() is None and not (tmp_path / "w1.pid").exists()
        bad = run_cli(tmp_path, env, "multi", "start", "../escape", "-A", "multiproj")
        assert bad.returncode == 1 and "not a node name" in bad.stderr and not (tmp_path.parent / "escape.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_cli_dead_reads_entries_it_did_not_write(app, redis_client):
    redis_client.lpush("minicelery:dead-letters", b"\xff\xfe not json", json.dumps([1, 2]),
                       json.dumps({"reason": 5, "queue": {"x": 1}, "time": "later", "raw": {"not": "text"}}))
    env = dict(os.environ, PYTHONPATH=HERE, MINICELERY_BROKER_URL=app.conf.broker_url)
    listing = _cli("-A", "test_minicelery", "dead", env=env)
    out = listing.communicate(timeout=30)[0]  # (stderr too)
    assert listing.returncode == 0 and "3 dead letter(s)." in out and "Traceback" not in out, out
    dropped = _cli("-A", "test_minicelery", "dead", "drop", "--all", env=env)
    assert "Dropped 3 dead letter(s)." in dropped.communicate(timeout=30)[0]
    assert redis_client.llen("minicelery:dead-letters") == 0
    again = _cli("-A", "test_minicelery", "dead", "drop", "--all", env=env)  # (said "name the ids ... or --all")
    assert again.communicate(timeout=30)[0].strip() == "No dead letters." and again.returncode == 0


# --- Outside the worker loop: the clients and tools under hostile use ------------------

def test_threads_that_come_and_go_never_exhaust_connections(app, redis_client):
    """Each thread's held connection is made outside the pool's count and closed with its
    thread: after 65,536 short-lived threads, every delay() used to raise MaxConnectionsError."""
    for client in (app.broker.client, app.backend.client):
        client.connection_pool.max_connections = 10  # the limit, reached after 10 threads, not 65,536
    for i in range(40):
        thread = threading.Thread(target=lambda i=i: add.delay(i, 0).forget())
        thread.start()
        thread.join()
    add.delay(0, 0)
    assert redis_client.llen("celery") == 41
    assert len(redis_client.client_list()) < 10  # the dead threads' connections were closed


def test_a_worker_started_before_redis_waits_for_it_then_works(app, tmp_path):
    """A container start order, a reboot: the worker says why it waits, and works once
    Redis is there (it used to exit with a traceback from its SUBSCRIBE)."""
    sock = str(tmp_path / "later.sock")
    _use_private_redis(app, sock)
    proc = None
    try:
        with worker(app, tmp_path, wait_ready=False) as w:
            w.wait_for_log("Cannot connect to unix://", count=2)
            assert w.alive() and "Traceback" not in w.log()
            sock, proc = _start_redis(tmp_path, "later")
            w.wait_for_log("ready.")
            assert add.delay(2, 3).get(timeout=15) == 5
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def _cli_to_files(tmp_path, name, env, *argv):
    """`python -m minicelery -A test_minicelery *argv` in the background, its output in
    two files; returns (process, read) where read('out' | 'err') is what it wrote so far."""
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "minicelery", "-A", "test_minicelery", *argv], cwd=HERE,
                            env=dict(os.environ, PYTHONPATH=HERE, **env), stdout=out, stderr=err, text=True)
    return proc, lambda which: (tmp_path / f"{name}.{which}").read_text()


def test_events_survives_redis_restarting_and_counts_under_a_flood(app, tmp_path):
    """`events` says in one line that the broker is away and once more that it is back, and
    goes on; under a flood `--dump -n 5` prints five events, where it printed none (its
    gathering had no end) or more than five."""
    sock, server = _start_redis(tmp_path, "events")
    _use_private_redis(app, sock)
    client = redis.Redis(unix_socket_path=sock)
    watcher, read = _cli_to_files(tmp_path, "watch", {"MINICELERY_BROKER_URL": f"unix://{sock}"}, "events", "--dump")
    counter = None
    try:
        wait_until(lambda: client.pubsub_numpat() == 1, what="events listening")
        server.kill()
        server.wait()
        wait_until(lambda: "events: the broker is away" in read("err"), what="the line saying the broker is away")
        sock, server = _start_redis(tmp_path, "events")
        client = redis.Redis(unix_socket_path=sock)
        wait_until(lambda: client.pubsub_numpat() == 1, what="events listening again")
        app.broker.send_event(minicelery.make_event("worker-heartbeat", "back@host", freq=2.0))
        wait_until(lambda: "back@host" in read("out"), what="an event after the restart")
        assert read("err").count("\n") == 2 and "events: the broker is back" in read("err")
        assert watcher.poll() is None
        counter, counted = _cli_to_files(tmp_path, "count", {"MINICELERY_BROKER_URL": f"unix://{sock}"},
                                         "events", "--dump", "-n", "5")
        wait_until(lambda: sum(int(c["psub"]) for c in client.client_list()) == 2, what="the second events listening")
        flood = minicelery.event_envelope(minicelery.make_event("worker-heartbeat", "flood@host", freq=2.0))[1]
        for _ in range(20):
            with client.pipeline(transaction=False) as pipe:
                for _ in range(1000):
                    pipe.publish("/0.celeryev/worker.heartbeat", flood)
                pipe.execute()
        assert counter.wait(30) == 0
        assert counted("out").count("flood@host") == 5 and counted("out").count("\n") == 5
    finally:
        for proc in (watcher, counter, server):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_one_shot_commands_say_in_one_line_that_the_broker_is_away(tmp_path):
    env = {"MINICELERY_BROKER_URL": f"unix://{tmp_path}/nobody.sock",
           "MINICELERY_RESULT_BACKEND": f"unix://{tmp_path}/nobody.sock?db=1"}
    for argv in (["purge", "-f"], ["dead"], ["status", "-t", "0.5"],
                 ["call", "test_minicelery.add", "--args", "[1, 2]"]):
        proc = subprocess.run([sys.executable, "-m", "minicelery", "-A", "test_minicelery", *argv], cwd=HERE,
                              env=dict(os.environ, PYTHONPATH=HERE, **env), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 69, (argv, proc.stderr)
        assert proc.stderr.startswith("Error: the broker or the result backend did not answer") and proc.stderr.count("\n") == 1, proc.stderr


@contextlib.contextmanager
def _answering_socket(path, reply: bytes, close=True):
    """A unix socket where something else than Redis answers `reply` to whatever it reads."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(16)

    def answer(peer):
        with peer, contextlib.suppress(OSError):
            while peer.recv(65536):
                peer.sendall(reply)
                if close:
                    return

    def serve():
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=answer, args=(listener.accept()[0],), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"unix://{path}"
    finally:
        listener.close()


def test_a_worker_at_a_socket_that_is_not_redis_says_so_in_one_line(tmp_path):
    """A broker URL naming a socket where something else answers (a web server here):
    the worker ended with a traceback. No use waiting for it: one line, exit 1."""
    with _answering_socket(tmp_path / "web.sock", b"HTTP/1.1 400 Bad Request\r\n\r\n"):
        env = {"MINICELERY_BROKER_URL": f"unix://{tmp_path}/web.sock",
               "MINICELERY_RESULT_BACKEND": f"sqlite:///{tmp_path}/r.db"}
        proc = subprocess.run([sys.executable, "-m", "minicelery", "-A", "test_minicelery", "worker", "-c", "1"],
                              cwd=HERE, env=dict(os.environ, PYTHONPATH=HERE, **env), capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "can't use the broker" in line]
    assert f"can't use the broker at unix://{tmp_path}/web.sock: " in line and "Traceback" not in proc.stderr


def test_beat_waits_out_the_broker_going_away(app, tmp_path, caplog):
    sock, server = _start_redis(tmp_path, "beat")
    _use_private_redis(app, sock)
    app.conf.update(beat_schedule={"often": {"task": "test_minicelery.add", "schedule": 0.2, "args": (1, 1)}})
    beat = minicelery.Beat(app, schedule_filename=str(tmp_path / "beat-state"), lease_ttl=3)
    thread, box = _in_background(beat.run)
    try:
        client = redis.Redis(unix_socket_path=sock)
        wait_until(lambda: client.llen("celery") > 0, what="a periodic task")
        server.kill()
        server.wait()
        wait_until(lambda: "beat: the broker did not answer (ConnectionError" in caplog.text, what="beat's line")
        sock, server = _start_redis(tmp_path, "beat")
        client = redis.Redis(unix_socket_path=sock)
        wait_until(lambda: client.llen("celery") > 0, what="a periodic task once Redis is back")
        assert thread.is_alive(), box
        wait_until(lambda: "beat: the broker is back" in caplog.text, what="beat's line")
        assert caplog.text.count("beat: the broker did not answer") == 1  # (one for the outage, not one a retry)
    finally:
        beat.stop()
        thread.join(10)
        server.kill()
        server.wait()


def test_a_url_socket_timeout_does_not_outlast_a_get_deadline(app, tmp_path, caplog):
    """With socket_timeout=30 in the backend URL, get(timeout=2) during a Redis stall took
    30 s: the URL's timeouts are cut to minicelery's, with a warning that says so."""
    sock, server = _start_redis(tmp_path, "stall")
    app.conf.update(broker_url=f"unix://{sock}", result_backend=f"unix://{sock}?db=1&socket_timeout=30")
    app.close()
    try:
        assert app.backend.get_meta("nothing-yet")["status"] == "PENDING"  # connected before the stall
        assert "socket_timeout=30 in the Redis URL cut to 1s" in caplog.text
        os.kill(server.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(minicelery.ResultTimeout):
            AsyncResult("nothing-yet", app=app).get(timeout=GET_TIMEOUT)
        assert time.monotonic() - started < GET_TIMEOUT + GET_SLACK
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait()
    for value in ("1e3", "inf", "nan", "-1", "0", "+60", "soon"):  # (float() reads each; none may pass)
        url = minicelery._cap_url_timeouts(f"unix:///r.sock?socket_timeout=1&socket_connect_timeout={value}", 5)
        assert url == "unix:///r.sock?socket_timeout=1&socket_connect_timeout=5", value


def test_a_revoke_of_20000_ids_reaches_the_workers_in_parts(app, tmp_path):
    """20,000 ids are over the 1 MiB a worker reads: every worker refused the broadcast and
    `terminate` was lost, with no error for the client. Now the client sends it in parts."""
    many = [minicelery.uuid() for _ in range(20_000)]
    with worker(app, tmp_path, concurrency=1) as w:
        started = str(tmp_path / "started")
        result = counted_sleep.delay(started, 30)
        wait_until(lambda: lines_in(started) == 1, what="the task to start")
        app.control.revoke(many + [result.id], terminate=True)  # (its id in the second part)
        with pytest.raises(minicelery.TaskRevokedError, match="terminated"):
            result.get(timeout=10)
        assert "Control command error" not in w.log()
        assert re.search(r"and \d+ more", w.log()) and max(map(len, w.log().splitlines())) < 3000  # (was 700 KB)
        [revoked] = app.control.inspect(timeout=5).revoked().values()  # (a reply over 1 MiB: "No nodes replied")
        assert len(revoked) == 20_001 and {many[0], many[-1]} <= set(revoked)
    too_long = minicelery._within_reply_limit(["€" * 255] * 50_000)  # (the most a worker keeps, 76 MB of JSON)
    assert "bytes is over the 16777216 bytes a client reads" in too_long["error"]
    assert all(app.broker.client.zscore("minicelery:revoked", i) for i in (many[0], many[-1]))
    with pytest.raises(ValueError, match="over the 1048576 bytes a worker reads"):
        app.control.broadcast("rate_limit", {"task_name": "x" * 2_000_000, "rate_limit": "1/s"})


@pytest.mark.parametrize("any_app", ["sqlite"], indirect=True)
def test_sqlite_over_its_file_size_limit_backs_off_then_drains(any_app, tmp_path):
    """A worker whose SQLite file may not grow (ulimit -f) logs its failures with backoff,
    not a thousand lines a second, and runs every task once the limit is lifted."""
    sent = [add.delay(i, 1) for i in range(300)]
    database = any_app.broker_url[len("sqlite:///"):]
    env = project_env(tmp_path, MINICELERY_BROKER_URL=any_app.broker_url)
    limit = os.path.getsize(database)
    log = open(tmp_path / "limited.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "minicelery", "-A", "test_minicelery", "worker", "-c", "2"],
                            cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)))
    try:
        read = lambda: (tmp_path / "limited.log").read_text()
        wait_until(lambda: "trying again in 3.2s" in read(), timeout=30, what="the worker backing off")
        failing = read()
        assert len(re.findall(r"(WARNING|ERROR)/", failing)) < 60, failing[-3000:]
        for pid_ in [proc.pid] + WorkerProcess(proc.pid, None).children():  # (each pool process has its own)
            resource.prlimit(pid_, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert [result.get(timeout=60) for result in sent] == [i + 1 for i in range(300)]
    finally:
        proc.terminate()
        proc.wait(30)


def test_two_multi_starts_of_one_node_at_once_start_one_worker(tmp_path):
    write_tree(tmp_path, {"raceproj.py": """
        from minicelery import Celery
        app = Celery("raceproj", broker="sqlite:///race.db")
        """})
    env = project_env(tmp_path)
    argv = [sys.executable, "-m", "minicelery", "multi", "start", "w1", "-A", "raceproj", "-c", "1"]
    racers = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=90)[0] for racer in racers]
    try:
        assert sum(": OK" in output for output in outputs) == 1, outputs
        assert sum(": already running (pidfile w1.pid)" in output for output in outputs) == 1, outputs
        assert [racer.returncode for racer in racers] == [0, 0], outputs
        pid_ = int((tmp_path / "w1.pid").read_text())
    finally:
        stopped = run_cli(tmp_path, env, "multi", "stopwait", "w1", "-A", "raceproj", timeout=90)
    assert stopped.returncode == 0 and not _alive_pid(pid_), stopped
    empty = run_cli(tmp_path, env, "multi", "start", "w2", "-A", "raceproj", "--pidfile", "", timeout=60)
    assert empty.returncode == 1 and "multi needs a --pidfile" in empty.stderr  # (it waited, and left a worker)
    (tmp_path / "w2.pid").mkdir()  # (a pidfile that can't be one: its worker says why in one line)
    failed = run_cli(tmp_path, env, "worker", "-A", "raceproj", "--pidfile", "w2.pid", timeout=60)
    assert failed.returncode == 1 and "can't write the pidfile w2.pid: Is a directory" in failed.stderr
    assert "Traceback" not in failed.stderr


def _alive_pid(pid_):
    return os.path.exists(f"/proc/{pid_}") and "zombie" not in open(f"/proc/{pid_}/status").read().lower()


# --- doctor: each check against a real redis-server set up to fail it, and a clean one ---

DOCTOR_PROJECT = """
    from minicelery import Celery
    app = Celery("docproj", broker="unix://{sock}", backend="unix://{sock}?db=1")

    @app.task(acks_late=True, time_limit=60)
    def add(x, y):
        return x + y
    """


def _doctor(tmp_path, sock):
    write_tree(tmp_path, {"docproj.py": DOCTOR_PROJECT.format(sock=sock)})
    proc = subprocess.run([sys.executable, "-m", "minicelery", "-A", "docproj", "doctor"], cwd=tmp_path,
                          env=project_env(tmp_path), capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_doctor_passes_a_redis_set_up_not_to_lose_tasks(tmp_path):
    sock, server = _start_redis(tmp_path, "clean", "--appendonly", "yes", "--maxmemory", "64mb",
                                "--maxmemory-policy", "noeviction")
    try:
        code, out = _doctor(tmp_path, sock)
    finally:
        server.kill()
    assert code == 0 and "0 finding(s) that lose or repeat tasks, 0 warning(s)." in out, out
    for check in ("maxmemory-policy (broker and result backend)", "persistence (broker and", "Redis version",
                  "clock", "acks_late tasks", "result_expires"):
        assert re.search(rf"^\[ok\] .*{re.escape(check)}", out, re.M), (check, out)


def test_doctor_finds_eviction_no_persistence_and_a_missing_command(tmp_path):
    sock, server = _start_redis(tmp_path, "lossy", "--maxmemory", "16mb", "--maxmemory-policy", "allkeys-lru",
                                "--rename-command", "EVALSHA", "", "--rename-command", "HSET", "")
    try:
        code, out = _doctor(tmp_path, sock)
    finally:
        server.kill()
    assert code == 1 and "3 finding(s) that lose or repeat tasks" in out, out
    assert "[LOSES] Redis maxmemory-policy (broker and result backend): allkeys-lru, maxmemory 16 MiB" in out
    assert "[LOSES] Redis persistence (broker and result backend): no AOF, no RDB snapshots" in out
    assert re.search(r"\[LOSES\] Redis version and commands .*: Redis [0-9.]+, without evalsha, hset", out), out
    assert "fix: CONFIG SET maxmemory-policy noeviction" in out


def test_doctor_volatile_eviction_snapshots_only_and_results_kept_for_ever(tmp_path):
    sock, server = _start_redis(tmp_path, "volatile", "--maxmemory", "16mb", "--maxmemory-policy", "volatile-lru",
                                "--save", "900 1")
    try:
        write_tree(tmp_path, {"docproj.py": DOCTOR_PROJECT.format(sock=sock) + "app.conf.result_expires = None\n"})
        proc = subprocess.run([sys.executable, "-m", "minicelery", "-A", "docproj", "doctor"], cwd=tmp_path,
                              env=project_env(tmp_path), capture_output=True, text=True, timeout=60)
    finally:
        server.kill()
    out = proc.stdout
    assert proc.returncode == 1 and "revocations and results vanish" in out, out
    assert "[warn] Redis persistence (broker and result backend): RDB snapshots only" in out
    assert "[warn] result_expires: results are kept for ever" in out


def test_doctor_says_what_it_could_not_check_and_a_worker_starts_anyway(app, tmp_path):
    """INFO renamed away (a managed Redis, an ACL): no traceback, each check it needs is
    `[unknown]`, the others are made; the worker logs the unknown ones and works."""
    sock, server = _start_redis(tmp_path, "noinfo", "--rename-command", "INFO", "")
    try:
        code, out = _doctor(tmp_path, sock)
        assert code == 1 and "Traceback" not in out, out
        assert "[unknown] Redis maxmemory-policy (broker): could not check: ResponseError" in out, out
        assert "[LOSES] Redis persistence (broker and result backend)" not in out  # (INFO can't tell them apart)
        assert "[LOSES] Redis persistence (broker)" in out
        _use_private_redis(app, sock)
        app.conf.task_annotations = {"*": {"time_limit": "soon"}}  # of the wrong type: that check can't be made
        [late] = [f for f in minicelery.doctor(app) if f.check.startswith("acks_late")]
        assert late.level == "unknown" and "TypeError" in late.found
        app.conf.task_annotations = None
        with worker(app, tmp_path) as w:
            assert add.delay(1, 2).get(timeout=10) == 3
        assert "WARNING/MainProcess] Redis maxmemory-policy (broker): could not check" in w.log()
    finally:
        server.kill()
    with _answering_socket(tmp_path / "ok.sock", b"+OK\r\n", close=False) as url:  # (not Redis, but RESP)
        write_tree(tmp_path, {"fakeproj.py": f"from minicelery import Celery\napp = Celery('f', broker='{url}')\n"})
        proc = run_cli(tmp_path, project_env(tmp_path), "-A", "fakeproj", "doctor", timeout=60)
    assert "Traceback" not in proc.stdout + proc.stderr and "[unknown] Redis maxmemory-policy" in proc.stdout


def test_doctor_clock_skew_against_redis_time(app):
    with freeze_time(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=90)):
        findings = minicelery.doctor(app)
    [clock] = [f for f in findings if f.check.startswith("clock")]
    off = float(clock.found.split()[3])  # "this host is +89.9 s off": frozen here, while Redis's clock runs on
    assert clock.level == "warn" and 85 < off <= 90 and "NTP" in clock.fix
    app.conf.broker_transport_options = {"visibility_timeout": 100}
    app.close()
    with freeze_time(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=90)):
        [clock] = [f for f in minicelery.doctor(app) if f.check.startswith("clock")]
    assert clock.level == "LOSES" and "hands out messages other workers still run" in clock.why
    [clock] = [f for f in minicelery.doctor(app) if f.check.startswith("clock")]
    assert clock.level == "ok"


def test_doctor_acks_late_limits_against_the_visibility_timeout(app):
    app.conf.broker_transport_options = {"visibility_timeout": 30}
    app.close()
    [late] = [f for f in minicelery.doctor(app) if f.check.startswith("acks_late")]
    assert late.level == "warn" and "test_minicelery." in late.found and "(30 s)" in late.found


def test_the_first_send_through_the_implicit_default_says_which_file(tmp_path):
    """A second Celery('proj') in a tasks module, with no broker, queued quietly into a file
    no worker reads. The default stays, but the first use says, once, which file."""
    script = textwrap.dedent("""
        import minicelery
        app = minicelery.Celery("proj")
        app.send_task("proj.add", (1, 2))
        app.send_task("proj.add", (3, 4))
        minicelery.Celery("other").send_task("proj.add", (5, 6))
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=HERE),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [said] = proc.stderr.splitlines()
    assert f"no broker configured: the zero-setup default, sqlite:///{tmp_path}/minicelery.db" in said
    assert "set broker_url" in said
    queued = sqlite3.connect(tmp_path / "minicelery.db").execute("SELECT COUNT(*) FROM messages").fetchone()
    assert queued == (3,)


def test_doctor_sqlite_default_and_network_filesystems(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = Celery("nobroker", set_as_current=False)
    [broker] = [f for f in minicelery.doctor(default) if f.check == "broker"]
    assert broker.level == "warn" and str(tmp_path / "minicelery.db") in broker.found
    shared = Celery("shared", broker=f"sqlite:///{tmp_path}/q.db", set_as_current=False)
    [local] = [f for f in minicelery.doctor(shared) if f.check == "SQLite file"]
    assert local.level == "ok"
    mounts = tmp_path / "mounts"  # (no NFS server here: the mount table says where the file is)
    mounts.write_text(f"/dev/root / ext4 rw 0 0\nserver:/export {tmp_path} nfs4 rw 0 0\n")
    monkeypatch.setattr(minicelery, "MOUNTS", str(mounts))
    [remote] = [f for f in minicelery.doctor(shared) if f.check == "SQLite file"]
    assert remote.level == "LOSES" and "nfs4" in remote.found and "locks" in remote.why
    results_only = Celery("results", broker="memory://x", backend=f"sqlite:///{tmp_path}/r.db", set_as_current=False)
    [remote] = [f for f in minicelery.doctor(results_only) if f.check == "SQLite file"]
    assert remote.level == "LOSES" and remote.found.startswith(f"{tmp_path}/r.db")
    assert not os.path.exists(tmp_path / "r.db")  # (looked at, not made)
    nowhere = Celery("nowhere", broker="sqlite:///no/such/dir/q.db", set_as_current=False)  # (relative: 3 slashes)
    [missing] = [f for f in minicelery.doctor(nowhere) if f.check == "SQLite file"]
    assert missing.level == "warn" and missing.found == f"{tmp_path}/no/such/dir/q.db: no such directory"
    nowhere.close()
    results_only.close()
    default.close()
    shared.close()


def test_a_worker_warns_at_start_of_what_would_lose_tasks_and_works(app, tmp_path):
    sock, server = _start_redis(tmp_path, "evicting", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    _use_private_redis(app, sock)
    try:
        with worker(app, tmp_path) as w:
            assert add.delay(1, 2).get(timeout=10) == 3
        log = w.log()
        assert "WARNING/MainProcess] Redis maxmemory-policy (broker and result backend): allkeys-lru" in log
        assert "WARNING/MainProcess] Redis persistence (broker and result backend): no AOF" in log
    finally:
        server.kill()


def _yaml_alias_bomb(levels=9):  # (9 at most)
    """A YAML list of 300 bytes that names 9 ** levels elements through its aliases."""
    anchors = ["&a [x, x, x, x, x, x, x, x, x]"] + [
        f"&{name} [{', '.join([f'*{below}'] * 9)}]" for below, name in zip("abcdefgh"[:levels - 1], "bcdefghi")]
    return f"[{', '.join(anchors)}]"


def test_a_yaml_alias_bomb_is_refused_where_it_enters(app, tmp_path, redis_client):
    """300 bytes of YAML naming 387 million elements: the worker refuses the message as
    it decodes it (it cost a pool process 12 s and 750 MB, then the main process more)."""
    app.conf.update(accept_content=["json", "yaml"])
    bomb = minicelery.signature("test_minicelery.echo", (1,), app=app).apply_async(serializer="yaml")
    raw = json.loads(redis_client.lpop("celery"))
    raw["body"] = base64.b64encode(f"[[{_yaml_alias_bomb()}], {{}}, {{}}]".encode()).decode()
    redis_client.lpush("celery", json.dumps(raw))
    with worker(app, tmp_path) as w:
        w.wait_for_log("(a YAML bomb?)")
        assert add.delay(1, 2).get(timeout=10) == 3
        assert app.control.ping(timeout=5)
    assert f"{bomb.id}" in w.log() and "MemoryError" not in w.log()
    used_aliases = minicelery.loads(b"a: &x [1, 2]\nb: *x\n", minicelery.YAML_TYPE, {minicelery.YAML_TYPE})
    assert used_aliases == {"a": [1, 2], "b": [1, 2]}  # aliases that only save typing pass


def test_a_yaml_merge_key_bomb_is_refused_before_it_is_built():
    """Merge keys (<<: *a) copy a mapping while PyYAML builds the document, in quadratic
    time, into a small result: 55 KB took 3.5 s and 290 KB a pool process for minutes.
    The parsed nodes are counted before anything is built."""
    keys = 4000
    big = "&a {" + ", ".join(f"k{i}: 0" for i in range(keys)) + "}"
    bomb = f"b: [{big}, {{<<: [{', '.join(['*a'] * keys)}]}}]".encode()
    with pytest.raises(minicelery.DecodeError, match="merge keys"):  # (built, it is a small dict that passed)
        minicelery.loads(bomb, minicelery.YAML_TYPE, {minicelery.YAML_TYPE})
    merged = minicelery.loads(b"base: &b {x: 1}\nmore: {<<: *b, y: 2}\n", minicelery.YAML_TYPE, {minicelery.YAML_TYPE})
    assert merged == {"base": {"x": 1}, "more": {"x": 1, "y": 2}}  # a merge that saves typing passes
    assert minicelery.loads(b"", minicelery.YAML_TYPE, {minicelery.YAML_TYPE}) is None


class _CountedRepr:
    calls = 0

    def __repr__(self):
        _CountedRepr.calls += 1
        return "x"


def test_short_repr_costs_what_it_shows_not_what_it_names():
    shared = [_CountedRepr()] * 9
    for _ in range(6):
        shared = [shared] * 9  # 4.8 million elements, 70 objects
    text = minicelery._short_repr(shared, limit=200)
    assert text.startswith("[[[[[[[x, x, x") and text.endswith("...") and len(text) == 203
    assert _CountedRepr.calls < 200
    assert minicelery._short_repr(({"a": [1, (2,)]}, (3,))) == repr(({"a": [1, (2,)]}, (3,)))
    assert minicelery._short_repr([{1}, frozenset({(2,)})]) == repr([{1}, frozenset({(2,)})])


def _frozenset_bomb(depth):
    """541 pickled bytes at depth 40, whose repr() would be 2 ** 40 pieces long."""
    value = ("a",)
    for _ in range(depth):
        value = frozenset([(value, 1), (value, 2)])
    return value


@APP.task
def frozenset_bomb(depth):
    return _frozenset_bomb(depth)


def test_shared_parts_can_not_wedge_a_worker(app, tmp_path):
    """A list that holds its part twice, 60 times over: 382 bytes of pickle naming 2 ** 60
    elements. Sent with pickle, a pool process wrote its JSON result or its error text
    for ever (8 GB in 3 minutes): such a pickle is refused where it enters. Raised by
    the task itself, its error text and stored exception are cut to what they show."""
    app.conf.update(accept_content=["json", "pickle"])
    bomb = 1
    for _ in range(60):
        bomb = [bomb, bomb]
    with worker(app, tmp_path) as w:
        refused = echo.apply_async((bomb,), serializer="pickle")
        w.wait_for_log(f"names more elements than that through parts it holds more than once")
        with pytest.raises(ValueError) as raised:
            raise_shared.delay(60).get(timeout=15)
        assert add.delay(1, 2).get(timeout=10) == 3
    assert str(raised.value).startswith("[[[[") and len(str(raised.value)) < 2000
    assert refused.id in w.log() and "raised unexpected: ValueError([[[[" in w.log()


def test_a_set_bomb_costs_its_repr_what_it_shows(app, tmp_path):
    """Sets, frozensets and subclasses of the containers are written piece by piece
    too: delay() of a shared frozenset never returned (argsrepr ran repr() on it),
    and a pool process that returned one spun on its 'succeeded' line for ever."""
    Point = collections.namedtuple("Point", "x y")
    assert minicelery._short_repr(Point([1], 2)) == "Point(x=[1], y=2)"  # (small: its own repr)
    text = minicelery._short_repr([Point(_frozenset_bomb(40), 0)], limit=100)
    assert text.startswith("[Point((frozenset({(frozenset({") and len(text) == 103
    app.conf.update(result_accept_content=["json", "pickle"], result_serializer="pickle")
    with worker(app, tmp_path) as w:
        result = frozenset_bomb.delay(40)
        w.wait_for_log(f"frozenset_bomb[{result.id}] succeeded in")
        with pytest.raises(minicelery.DecodeError, match="a bomb"):  # (and the client refuses it)
            result.get(timeout=10)
        assert add.delay(1, 2).get(timeout=10) == 3


# --- examples/benchmarks.py: its smoke run (the full runs are in the README) ------------

def test_benchmarks_compare_smoke():
    """examples/benchmarks.py compare runs end to end on a tiny load, minicelery only, and
    prints its table with a positive drain rate and the targets."""
    root = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, os.path.join(root, "examples", "benchmarks.py"), "compare",
            "--systems", "minicelery", "--tasks", "20", "--roundtrips", "5"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["system", "enqueue/s", "drain/s"])
    row = lines[header + 1].split()
    assert row[0] == "minicelery" and float(row[2]) > 0, proc.stdout  # drain/s
    assert "targets" in proc.stdout


# --- the README's "How it works" and "differs" lists stay true to the module -------------

def _readme_section(heading, end_marker="\n## "):
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(heading)
    return text[start:text.find(end_marker, start + len(heading))]


def _module_source():
    with open(os.path.join(HERE, "minicelery.py"), encoding="utf-8") as f:
        return f.read()


def test_readme_walk_names_only_functions_that_exist():
    walk = _readme_section("### One task's life", "The same task with explain mode on").split("\n", 1)[1]
    names = re.findall(r"`([A-Za-z_][\w.]*)\(\)`", walk)
    assert len(names) > 30, names
    missing = []
    for name in names:
        try:
            functools.reduce(getattr, name.split("."), minicelery)
        except AttributeError:
            missing.append(name)
    assert not missing, f"the README's walk names what the module lacks: {missing}"


@functools.lru_cache(maxsize=None)
def _module_tree():
    return ast.parse(_module_source())


def _definition_lines(name):
    """How many lines the module's definition of `name` ("Class", "Class.method",
    "function", "CONSTANT") takes, or None if it has none."""
    nodes, node = _module_tree().body, None
    for part in name.split("."):
        node = next((n for n in nodes if getattr(n, "name", None) == part or (
            isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == [part])), None)
        if node is None:
            return None
        nodes = getattr(node, "body", [])
    return node.end_lineno - node.lineno + 1 + len(getattr(node, "decorator_list", []))


def test_readme_first_reading_is_at_most_2500_lines_of_names_that_exist():
    section = _readme_section("### A first reading", "### One task's life")
    reading, skipped = section.split("It may skip the rest")
    names = list(dict.fromkeys(re.findall(r"`([A-Za-z_][\w.]*)`", reading)))
    # (a method of a class read whole counts once, in its class)
    counted = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    sizes = {name: _definition_lines(name) for name in counted}
    assert len(names) > 40 and all(sizes.values()), [n for n, size in sizes.items() if not size]
    assert sum(sizes.values()) <= 2500, sorted(sizes.items(), key=lambda item: -item[1])
    skippable = re.findall(r"`([A-Z_][\w.]*)`", skipped)
    assert skippable and all(_definition_lines(name) for name in skippable), skippable


def test_no_class_is_over_350_lines():
    tree = _module_tree()
    sizes = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    assert max(sizes.values()) <= 350, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_readme_chapter_map_matches_the_module():
    headings = re.findall(r"^# (\d+)\. (\w+)", _module_source(), re.M)
    table = re.findall(r"^\| (\d+)\. (\w+)", _readme_section("## How it works"), re.M)
    assert headings == table and len(headings) == 12


def test_every_difference_from_celery_is_tagged_in_the_code_and_listed_in_the_readme():
    section = _readme_section("## Where minicelery differs from Celery")
    bullets = re.findall(r"^- (.*)", section, re.M)
    listed = [re.search(r"^\*\*[^*]+\*\* \(`([a-z-]+)`\)", bullet) for bullet in bullets]
    untagged = [bullet[:60] for bullet, tag in zip(bullets, listed) if tag is None]
    assert untagged == ["Not there: AMQP and other brokers, mingle and gossip, protoc"], untagged
    listed = {tag.group(1) for tag in listed if tag}
    in_code = set(re.findall(r"Celery: ([a-z][a-z0-9]*(?:-[a-z0-9]+)*): ", _module_source()))
    assert listed == in_code, (f"in the README only: {sorted(listed - in_code)}; "
                               f"in the code only: {sorted(in_code - listed)}")
