"""Benchmarks: minicelery and the real Celery side by side, on one private Redis.

    python3 examples/benchmarks.py throughput [--tasks 5000] [--events]
    python3 examples/benchmarks.py eta-lateness [--tasks 200]
    python3 examples/benchmarks.py eta-memory [--tasks 100000]
    python3 examples/benchmarks.py beat-drift [--tasks 60]
    python3 examples/benchmarks.py chord [--tasks 1000]

Each run starts its own redis-server on a unix socket, then for each system a
worker (`python -m minicelery ...` or `celery ...`, prefork, 2 processes) and
prints a table. The real Celery is measured when `celery` is installed. The
numbers are for the machine they ran on; the README says which.
"""
import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import redis  # noqa: E402

import minicelery  # noqa: E402

app = minicelery.Celery("benchmarks")  # URLs from MINICELERY_BROKER_URL / _RESULT_BACKEND


@app.task(name="bench.noop")
def noop(i):
    return i


@app.task(name="bench.stamp", ignore_result=True)
def stamp(path):
    with open(path, "a") as f:
        f.write(f"{time.time()!r}\n")


STAMPS = os.environ.get("BENCH_STAMPS")
if STAMPS:  # beat-drift: one entry, every second
    app.conf.beat_schedule = {"stamp": {"task": "bench.stamp", "schedule": 1.0, "args": (STAMPS,)}}


@app.task(name="bench.count")
def count(values):
    return len(values)


@app.task(name="bench.lateness")
def lateness(eta_timestamp):
    return time.time() - eta_timestamp


try:
    import celery
    celery_app = celery.Celery("benchmarks", broker=os.environ.get("BENCH_CELERY_BROKER"),
                               backend=os.environ.get("BENCH_CELERY_BACKEND"))
    celery_app.conf.broker_connection_retry_on_startup = True
    celery_app.task(name="bench.lateness")(lateness.run)
    celery_app.task(name="bench.noop")(noop.run)
    celery_app.task(name="bench.stamp", ignore_result=True)(stamp.run)
    celery_app.task(name="bench.count")(count.run)
    celery_app.conf.beat_schedule = app.conf.beat_schedule
except ImportError:
    celery = celery_app = None


def start_redis(directory):
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", sock,
                             "--save", "", "--appendonly", "no", "--dir", directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            sys.exit("redis-server did not start")
        time.sleep(0.05)
    return proc, sock


@contextlib.contextmanager
def private_redis(broker_url=None):
    """A scratch directory with its own redis-server; the demo app points at it
    (or at `broker_url`, for SQLite) for the block."""
    with tempfile.TemporaryDirectory() as directory:
        redis_proc, sock = start_redis(directory)
        os.environ.update(MINICELERY_BROKER_URL=broker_url or f"unix://{sock}",
                          MINICELERY_RESULT_BACKEND=broker_url or f"unix://{sock}?db=1")
        app.close()
        try:
            yield directory, sock
        finally:
            redis_proc.kill()
            redis_proc.wait()


def start_worker(system, sock, directory, broker_url=None, settle=3, options=()):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE),
               MINICELERY_BROKER_URL=broker_url or f"unix://{sock}",
               MINICELERY_RESULT_BACKEND=broker_url or f"unix://{sock}?db=1",
               BENCH_CELERY_BROKER=f"redis+socket://{sock}",
               BENCH_CELERY_BACKEND=f"redis+socket://{sock}?virtual_host=1")
    if system == "minicelery":
        argv = [sys.executable, "-m", "minicelery", "-A", "benchmarks:app", "worker", "-c", "2", "-l", "warning",
                *options]
    else:
        argv = [sys.executable, "-m", "celery", "-A", "benchmarks:celery_app", "worker", "-c", "2",
                "-l", "warning", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    log = open(os.path.join(directory, f"{system}.log"), "w")
    proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(settle)  # let it start; the measurements below wait on conditions
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mib(pid):
    """Resident memory of a process and its children, in MiB."""
    pids = [pid] + [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)],
                                                   capture_output=True, text=True).stdout.split()]
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return total / 1024


def throughput(count, events=False):
    """Tasks a second through one worker with 2 pool processes: the queue is filled
    first; the rate is from the first result's date_done to the last one's. With
    events, minicelery runs once more with task events on (-E)."""
    rows = []
    setups = [("minicelery", "sqlite"), ("minicelery", "redis")] + ([("minicelery -E", "redis")] if events else []) \
        + ([("celery", "redis")] if celery_app is not None else [])
    for label, broker in setups:
        system, options = label.split()[0], label.split()[1:]
        scratch = tempfile.mkdtemp()
        url = f"sqlite:///{scratch}/bench.db" if broker == "sqlite" else None
        with private_redis(url) as (directory, sock):
            results = [noop.delay(i) for i in range(count)]
            worker = start_worker(system, sock, directory, url, settle=0, options=options)
            try:
                assert [r.get(timeout=600) for r in results] == list(range(count))
                done = sorted(r.date_done for r in results)
                seconds = (done[-1] - done[0]).total_seconds()
            finally:
                stop(worker)
                shutil.rmtree(scratch, ignore_errors=True)
            rows.append((label, broker, count, seconds, count / seconds))
    print(f"{'system':<14} {'broker':<7} {'tasks':>6} {'seconds':>8} {'tasks/s':>8}")
    for label, broker, n, seconds, rate in rows:
        print(f"{label:<14} {broker:<7} {n:>6} {seconds:>8.2f} {rate:>8.0f}")


def beat_drift(count):
    """Runs of a 1-second beat entry: how far the last of `count` intervals drifted."""
    rows = []
    for system in systems():
        with private_redis() as (directory, sock):
            path = os.path.join(directory, "stamps")
            os.environ["BENCH_STAMPS"] = path
            worker = start_worker(system, sock, directory, settle=0)
            env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), MINICELERY_BROKER_URL=f"unix://{sock}",
                       BENCH_CELERY_BROKER=f"redis+socket://{sock}")
            argv = ([sys.executable, "-m", "minicelery", "-A", "benchmarks:app", "beat"] if system == "minicelery"
                    else [sys.executable, "-m", "celery", "-A", "benchmarks:celery_app", "beat"])
            beat = subprocess.Popen(argv + ["-s", os.path.join(directory, "beat-state"), "-l", "warning"],
                                    cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + count + 60
                while time.monotonic() < deadline:
                    runs = [float(x) for x in open(path)] if os.path.exists(path) else []
                    if len(runs) > count:
                        break
                    time.sleep(0.5)
            finally:
                stop(beat)
                stop(worker)
            runs = runs[:count + 1]
            gaps = [b - a for a, b in zip(runs, runs[1:])]
            rows.append((system, len(gaps), (runs[-1] - runs[0]) - len(gaps), min(gaps), max(gaps)))
    print(f"{'system':<11} {'intervals':>9} {'drift ms':>9} {'min gap s':>10} {'max gap s':>10}")
    for system, n, drift, shortest, longest in rows:
        print(f"{system:<11} {n:>9} {drift * 1000:>9.1f} {shortest:>10.4f} {longest:>10.4f}")


def chord_bench(size):
    """A chord of `size` no-op tasks: seconds from sending to the body's result, and what
    the chord leaves in Redis once done (keys and used memory beyond the results)."""
    rows = []
    for system in systems():
        with private_redis() as (directory, sock):
            client = redis.Redis(unix_socket_path=sock, db=1)
            worker = start_worker(system, sock, directory)
            try:
                before = client.info("memory")["used_memory"]
                started = time.monotonic()
                result = minicelery.chord(noop.s(i) for i in range(size))(count.s())
                assert result.get(timeout=600) == size
                seconds = time.monotonic() - started
                time.sleep(1)
                chord_keys = [k.decode() for k in client.keys("celery-taskset-meta-*")]
                results_bytes = sum(client.memory_usage(k) or 0 for k in client.keys("celery-task-meta-*"))
                used = client.info("memory")["used_memory"] - before
            finally:
                stop(worker)
            rows.append((system, size, seconds, used / 1024, results_bytes / 1024, chord_keys))
    print(f"{'system':<11} {'tasks':>6} {'seconds':>8} {'Redis +KiB':>11} {'results KiB':>12}  chord keys left")
    for system, n, seconds, used, results, keys in rows:
        print(f"{system:<11} {n:>6} {seconds:>8.2f} {used:>11.0f} {results:>12.0f}  {keys}")


def systems():
    return ["minicelery"] + (["celery"] if celery_app is not None else [])


def eta_lateness(count):
    """Lateness of ETA tasks on an idle worker: ETAs spread over 1-8 s, some parked."""
    rows = []
    for system in systems():
        with private_redis() as (directory, sock):
            worker = start_worker(system, sock, directory)
            try:
                now = time.time()
                results = []
                for _ in range(count):
                    eta = now + random.uniform(1, 8)
                    results.append(lateness.apply_async(
                        (eta,), eta=minicelery.dt.datetime.fromtimestamp(eta, minicelery.dt.timezone.utc)))
                late = sorted(r.get(timeout=60) * 1000 for r in results)
                rows.append((system, count, statistics.median(late), late[int(len(late) * 0.99) - 1],
                             late[-1], late[0]))
            finally:
                stop(worker)
    print(f"{'system':<11} {'tasks':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'min ms':>8}")
    for system, n, p50, p99, worst, best in rows:
        print(f"{system:<11} {n:>6} {p50:>8.1f} {p99:>8.1f} {worst:>8.1f} {best:>8.1f}")


def eta_memory(count):
    """Worker memory (main + pool) once `count` tasks due in a day have been received."""
    rows = []
    for system in systems():
        with private_redis() as (directory, sock):
            client = redis.Redis(unix_socket_path=sock)
            worker = start_worker(system, sock, directory)
            try:
                before = rss_mib(worker.pid)
                eta = minicelery.utcnow() + minicelery.dt.timedelta(days=1)
                started = time.monotonic()
                for _ in range(count):
                    lateness.apply_async((0,), eta=eta)
                deadline = time.monotonic() + 600
                while client.llen("celery") and time.monotonic() < deadline:
                    time.sleep(0.5)
                held = client.hlen("unacked")
                parked = client.zcard("minicelery:eta")
                rows.append((system, count, before, rss_mib(worker.pid), held, parked,
                             time.monotonic() - started, client.llen("celery")))
            finally:
                stop(worker)
    print(f"{'system':<11} {'tasks':>7} {'RSS before':>11} {'RSS after':>10} {'unacked':>8} "
          f"{'parked':>8} {'seconds':>8} {'left':>6}")
    for system, n, before, after, held, parked, seconds, left in rows:
        print(f"{system:<11} {n:>7} {before:>9.1f}Mi {after:>8.1f}Mi {held:>8} {parked:>8} "
              f"{seconds:>8.1f} {left:>6}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["throughput", "eta-lateness", "eta-memory", "beat-drift", "chord"])
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--events", action="store_true", help="throughput: also with task events on")
    args = parser.parse_args()
    if args.benchmark == "throughput":
        throughput(args.tasks or 5000, args.events)
    elif args.benchmark == "eta-lateness":
        eta_lateness(args.tasks or 200)
    elif args.benchmark == "chord":
        chord_bench(args.tasks or 1000)
    elif args.benchmark == "beat-drift":
        beat_drift(args.tasks or 60)
    else:
        eta_memory(args.tasks or 100000)


if __name__ == "__main__":
    main()
