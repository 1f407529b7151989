"""The example projects in examples/, run as their users run them.

examples/proj is the layout of Celery's "Using Celery in your Application"
tutorial and examples/django_proj the one of "First steps with Django", each
with only `from celery` changed to `from minicelery`. Every test copies the
example into tmp_path (so the SQLite files land there, not in the checkout),
starts a real worker with `python -m minicelery -A <project> worker`, and
sends tasks from separate client processes, on Redis and on the zero-setup
SQLite default. PYTHONPATH is the repository root, so the examples import
this checkout's minicelery.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from decimal import Decimal

import pytest

from test_minicelery import redis_client, redis_server, wait_until  # noqa: F401 (fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))
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


class CliWorker:
    """A `python -m minicelery -A ... worker` process, logging to a file."""

    def __init__(self, proc, log_path):
        self.proc, self.log_path, self.returncode = proc, log_path, None

    def log(self):
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text, timeout=20.0):
        wait_until(lambda: text in self.log() or self.proc.poll() is not None, timeout,
                   f"{text!r} in the worker log")
        assert text in self.log(), f"the worker exited ({self.proc.returncode}):\n{self.log()}"


@contextlib.contextmanager
def cli_worker(cwd, env, app, log_path, *options, command=(sys.executable, "-m", "minicelery")):
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
    return cli_worker(cwd, env, app, log_path, "--without-mingle", "--without-gossip",
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


@pytest.fixture(params=["redis", "sqlite"])
def proj(request, tmp_path):
    """examples/proj copied to tmp_path, and its environment: on the test Redis, or on no settings at all."""
    project = copy_example("proj", tmp_path)
    if request.param == "redis":
        sock = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_client")  # flushed
        env = example_env(PROJ_BROKER_URL=f"redis+socket://{sock}",
                          PROJ_RESULT_BACKEND=f"redis+socket://{sock}?virtual_host=1")
    else:
        env = example_env()
    return request.param, project, env


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
    with cli_worker(project, env, "proj", tmp_path / "worker.log") as worker:
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
    with cli_worker(project, env, "proj", tmp_path / "worker.log", "-Q", "heavy") as worker:
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
    if request.param == "redis":
        sock = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_client")  # flushed
        env = example_env(CELERY_BROKER_URL=f"redis+socket://{sock}",
                          CELERY_RESULT_BACKEND=f"redis+socket://{sock}?virtual_host=1")
    else:
        env = example_env()
    out = run(project, env, "manage.py", "migrate", "--noinput")
    assert "Applying orders.0001_initial... OK" in out
    return request.param, project, env


def test_django_example_runs_in_a_cli_worker(django_proj, tmp_path):
    broker, project, env = django_proj
    with cli_worker(project, env, "mysite", tmp_path / "worker.log") as worker:
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
