"""The minicelery quickstart: tasks, a worker, results.

Run it:   python3 examples/quickstart.py

It starts a worker (`python -m minicelery -A quickstart worker`) in the
background, sends it some tasks, prints what comes back, and stops it. The
broker and backend come from MINICELERY_BROKER_URL / MINICELERY_RESULT_BACKEND;
without them the demo starts a private redis-server on a unix socket.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from minicelery import Celery  # noqa: E402

app = Celery("quickstart")  # broker and backend: from the environment (see above)


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


def start_private_redis(directory):
    """A throwaway redis-server on a unix socket, so the demo touches no real Redis."""
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("This demo needs redis-server (apt-get install redis-server) "
                 "or MINICELERY_BROKER_URL pointing at a Redis.")
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", sock, "--save", "",
                             "--appendonly", "no", "--dir", directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("redis-server did not start")
        time.sleep(0.05)
    os.environ["MINICELERY_BROKER_URL"] = f"unix://{sock}"
    os.environ["MINICELERY_RESULT_BACKEND"] = f"unix://{sock}?db=1"
    return proc


def main():
    with tempfile.TemporaryDirectory() as scratch:
        redis_proc = None
        if not os.environ.get("MINICELERY_BROKER_URL"):
            redis_proc = start_private_redis(scratch)
        print(f"broker: {app.broker_url}")
        log_path = os.path.join(scratch, "worker.log")
        worker = subprocess.Popen(
            [sys.executable, "-m", "minicelery", "-A", "quickstart", "worker", "-c", "2", "-l", "info"],
            cwd=HERE, env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)),
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
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(5)


if __name__ == "__main__":
    main()
