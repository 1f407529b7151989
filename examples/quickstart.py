"""The minicelery quickstart: tasks, a worker, results.

Run it:   python3 examples/quickstart.py

It starts a worker (`python -m minicelery -A quickstart worker`) in the
background, sends it some tasks, prints what comes back, and stops it. With no
broker configured, minicelery uses a SQLite file in the current directory, so
this needs nothing but Python. Set MINICELERY_BROKER_URL (say, to
redis://localhost:6379/0) to run the same demo on Redis.
"""
import os
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from minicelery import Celery  # noqa: E402

app = Celery("quickstart")  # no broker given: $MINICELERY_BROKER_URL, else ./minicelery.db


@app.task
def add(x, y):
    return x + y


@app.task(bind=True, max_retries=3)
def flaky_fetch(self, url):
    """Fails on the first try, then works: shows retries."""
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError(f"{url} timed out"), countdown=0.5)
    return f"fetched {url} after {self.request.retries} retry"


@app.task
def divide(x, y):
    return x / y


def main():
    with tempfile.TemporaryDirectory() as scratch:
        # No broker configured: minicelery uses ./minicelery.db (SQLite). Work in a
        # scratch directory so the demo leaves nothing behind.
        os.chdir(scratch)
        print(f"broker and results: {app.broker_url}, in {scratch}")
        log_path = os.path.join(scratch, "worker.log")
        worker = subprocess.Popen(
            [sys.executable, "-m", "minicelery", "-A", "quickstart", "worker", "-c", "2", "-l", "info"],
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)])),
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        try:
            print("add.delay(4, 4).get()        ->", add.delay(4, 4).get(timeout=10))
            results = [add.delay(i, i) for i in range(10)]
            print("ten adds                     ->", [r.get(timeout=10) for r in results])
            print("flaky_fetch.delay(...).get() ->", flaky_fetch.delay("example.org").get(timeout=10))
            failed = divide.delay(1, 0)
            try:
                failed.get(timeout=10)
            except ZeroDivisionError as exc:
                print(f"divide.delay(1, 0).get()     -> raised {exc!r}, state {failed.state}")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(15)
            with open(log_path) as log:
                lines = [line for line in log if line.startswith("[2")]
            print(f"\nThe worker logged {len(lines)} lines; the first and last few:")
            print("".join(lines[:3] + ["...\n"] + lines[-3:]), end="")


if __name__ == "__main__":
    main()
