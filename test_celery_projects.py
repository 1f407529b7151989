"""Celery projects run unchanged: the project layouts, import paths, settings and
workflow behaviour of real Celery code, through real workers on a real Redis
(and the zero-setup SQLite broker where it applies).

Project packages are written into tmp_path and run with `python -m minicelery
-A ... worker`, as their users run them; in-process workers are forked from
this process by test_minicelery's `worker()` and run the tasks defined below.
"""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import minicelery
from minicelery import (Celery, ChordError, EagerResult, GroupResult, ImproperlyConfigured,
                        NotRegistered, chord, group, signature)
from test_minicelery import (APP, HERE, add, any_app, app, lines_in, mul, on_error, record,  # noqa: F401
                             redis_client, redis_server, results, wait_until, worker, xsum)

try:
    import celery as real_celery
except ImportError:  # the interop extra is not installed
    real_celery = None


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


class CliWorker:
    def __init__(self, proc, log_path):
        self.proc, self.log_path = proc, log_path

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
    assert minicelery.setting_name("CELERY_SEND_EVENTS") is None  # worker_send_task_events: not here
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
        import minicelery.result, minicelery
        import builtins

        assert crontab is minicelery.crontab and AsyncResult is minicelery.result.AsyncResult
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
        assert apply_get_inside.delay(5).get(timeout=15) == 10  # .apply() in a worker: eager, allowed


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
