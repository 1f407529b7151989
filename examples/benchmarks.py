"""Benchmarks: minicelery beside the real Celery (and Huey), each on a private Redis.

    python3 examples/benchmarks.py throughput [--tasks 5000] [--events]
    python3 examples/benchmarks.py eta-lateness [--tasks 200]
    python3 examples/benchmarks.py eta-memory [--tasks 100000]
    python3 examples/benchmarks.py beat-drift [--tasks 60]
    python3 examples/benchmarks.py chord [--tasks 1000]
    python3 examples/benchmarks.py compare [--tasks 10000] [--roundtrips 500] [--systems minicelery,celery,huey]
    python3 examples/benchmarks.py scale [--backlog 1000000] [--sample 20000] [--systems minicelery,celery]
    python3 examples/benchmarks.py reactions [--repeat 20] [--systems minicelery,celery]

Each run starts its own redis-server on a unix socket (no persistence), then for
each system a worker (`python -m minicelery ...`, `celery ... worker` prefork, or
Huey's consumer with `-k process`; 2 processes each) and prints a table. The real
Celery is measured when `celery` is installed, Huey when `huey` is (the
`benchmark` extra). The numbers are for the machine they ran on (printed at the
top of compare and scale); the README says which. See compare() and scale() for
how each figure is taken.
"""
import argparse
import contextlib
import gc
import glob
import json
import math
import os
import platform
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

#: In a worker, the system it runs (set by start_worker): only that one is imported, so a
#: worker's memory, start time and CPU are its own. The harness (unset) loads them all.
SYSTEM = os.environ.get("BENCH_SYSTEM")


def _noop(i):
    return i


def _stamp(path):
    with open(path, "a") as f:
        f.write(f"{time.time()!r}\n")


def _count(values):
    return len(values)


def _lateness(eta_timestamp):
    return time.time() - eta_timestamp


def _started():
    """reactions: when the task began (time.time() in the pool process)."""
    return time.time()


STAMPS = os.environ.get("BENCH_STAMPS")
#: beat-drift: one entry, every second
BEAT_SCHEDULE = {"stamp": {"task": "bench.stamp", "schedule": 1.0, "args": (STAMPS,)}} if STAMPS else {}

if SYSTEM in (None, "minicelery"):
    import minicelery

    app = minicelery.Celery("benchmarks")  # URLs from MINICELERY_BROKER_URL / _RESULT_BACKEND
    noop = app.task(name="bench.noop")(_noop)
    stamp = app.task(name="bench.stamp", ignore_result=True)(_stamp)
    count = app.task(name="bench.count")(_count)
    lateness = app.task(name="bench.lateness")(_lateness)
    started = app.task(name="bench.started")(_started)
    if BEAT_SCHEDULE:
        app.conf.beat_schedule = BEAT_SCHEDULE

celery = celery_app = None
if SYSTEM in (None, "celery"):
    try:
        import celery
    except ImportError:
        pass
    else:
        celery_app = celery.Celery("benchmarks", broker=os.environ.get("BENCH_CELERY_BROKER"),
                                   backend=os.environ.get("BENCH_CELERY_BACKEND"))
        celery_app.conf.broker_connection_retry_on_startup = True
        celery_app.task(name="bench.lateness")(_lateness)
        celery_app.task(name="bench.noop")(_noop)
        celery_app.task(name="bench.stamp", ignore_result=True)(_stamp)
        celery_app.task(name="bench.count")(_count)
        celery_app.task(name="bench.started")(_started)
        celery_app.conf.beat_schedule = BEAT_SCHEDULE

huey = huey_app = huey_noop = None
if SYSTEM in (None, "huey"):
    try:
        import huey
        from huey import RedisHuey
    except ImportError:
        pass
    else:
        # notify_result: the worker LPUSHes a per-task key when a result is stored and a
        # blocking Result.get() BLPOPs it (Huey's low-latency option since 3.0), instead of
        # polling with backoff (50 ms first, x1.15, at most max_delay).
        huey_app = RedisHuey("benchmarks", url=os.environ.get("BENCH_HUEY_URL"),
                             notify_result=os.environ.get("BENCH_HUEY_NOTIFY", "1") == "1")

        def _huey_noop(i):
            return i
        # Huey names a task <function's module>.<name>: "__main__" here, "benchmarks" in the consumer.
        _huey_noop.__module__ = "benchmarks"
        huey_noop = huey_app.task(name="bench.noop")(_huey_noop)


def start_redis(directory, extra=()):
    """A redis-server on <directory>/redis.sock; `extra`: more command-line options. Its
    output goes to <directory>/redis.log."""
    sock = os.path.join(directory, "redis.sock")
    with open(os.path.join(directory, "redis.log"), "ab") as log:
        proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", sock,
                                 "--save", "", "--appendonly", "no", "--dir", directory, *extra],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(os.path.join(directory, "redis.log"), errors="replace") as f:
                sys.exit(f"redis-server did not start:\n{f.read()[-2000:]}")
        time.sleep(0.05)
    return proc, sock


@contextlib.contextmanager
def private_redis(broker_url=None, redis_options=()):
    """A scratch directory with its own redis-server (started with `redis_options`); the
    demo app points at it (or at `broker_url`, for SQLite) for the block."""
    with tempfile.TemporaryDirectory() as directory:
        redis_proc, sock = start_redis(directory, redis_options)
        os.environ.update(MINICELERY_BROKER_URL=broker_url or f"unix://{sock}",
                          MINICELERY_RESULT_BACKEND=broker_url or f"unix://{sock}?db=1")
        app.close()
        try:
            yield directory, sock
        finally:
            redis_proc.kill()
            redis_proc.wait()


def worker_env(system, sock, broker_url=None, notify=True):
    """The environment of a worker or beat: the URLs of the private Redis, and bytecode
    caching on (PYTHONDONTWRITEBYTECODE would make minicelery.py compile at every start)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), BENCH_SYSTEM=system,
               MINICELERY_BROKER_URL=broker_url or f"unix://{sock}",
               MINICELERY_RESULT_BACKEND=broker_url or f"unix://{sock}?db=1",
               BENCH_CELERY_BROKER=f"redis+socket://{sock}",
               BENCH_CELERY_BACKEND=f"redis+socket://{sock}?virtual_host=1",
               BENCH_HUEY_URL=f"unix://{sock}", BENCH_HUEY_NOTIFY="1" if notify else "0")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def worker_argv(system, options=()):
    if system == "minicelery":
        return [sys.executable, "-m", "minicelery", "-A", "benchmarks:app", "worker", "-c", "2", "-l", "warning",
                *options]
    if system == "huey":  # -q: log level WARNING
        return [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks.huey_app", "-k", "process", "-w", "2",
                "-q", *options]
    return [sys.executable, "-m", "celery", "-A", "benchmarks:celery_app", "worker", "-c", "2",
            "-l", "warning", "--without-mingle", "--without-gossip", "--without-heartbeat", *options]


def start_worker(system, sock, directory, broker_url=None, settle=3, options=(), notify=True):
    """Start a worker of `system` (minicelery, celery or huey); its output goes to
    <directory>/<system>.log. notify=False: Huey's without notify_result."""
    log = open(os.path.join(directory, f"{system}.log"), "a")
    proc = subprocess.Popen(worker_argv(system, options), cwd=HERE, env=worker_env(system, sock, broker_url, notify),
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = log.name
    time.sleep(settle)  # let it start; the measurements below wait on conditions
    return proc


def stop(proc):
    """SIGTERM, then SIGKILL after 30 s; pool processes it left behind are killed too."""
    tree = [(pid, _cmdline(pid)) for pid in tree_pids(proc.pid)[1:]]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid, cmdline in tree:
        deadline = time.monotonic() + 5
        while _cmdline(pid) == cmdline and time.monotonic() < deadline:
            time.sleep(0.05)
        if _cmdline(pid) == cmdline:  # the same process still there: an orphan of this worker
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def tree_pids(pid):
    """`pid` and all its descendants, from /proc/<pid>/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for path in glob.glob(f"/proc/{p}/task/*/children"):
            with contextlib.suppress(OSError):
                with open(path) as f:
                    todo.extend(int(c) for c in f.read().split())
    return pids


def pss_mib(pid):
    """Proportional set size of a process tree, in MiB: the sum of `Pss` in each
    process's /proc/<pid>/smaps_rollup (shared pages split between their users)."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return total / 1024


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """CPU time (user + system) of processes, with that of their children already reaped."""
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def redis_cpu(client):
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


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
            env = worker_env(system, sock)
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


# -- compare and scale ---------------------------------------------------------

ALL_SYSTEMS = ("minicelery", "celery", "huey")


def installed(system):
    return {"minicelery": True, "celery": celery_app is not None, "huey": huey_app is not None}[system]


def pick_systems(wanted, allowed=ALL_SYSTEMS):
    """The systems asked for (--systems a,b) that are installed; a note for each one that isn't."""
    names = [s.strip() for s in wanted.split(",") if s.strip()] if wanted else list(allowed)
    for name in names:
        if not installed(name):
            print(f"note: {name} is not installed: its rows and ratios are skipped")
    return [name for name in names if installed(name)]


def machine_line():
    model = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    version = subprocess.run([shutil.which("redis-server"), "--version"], capture_output=True, text=True).stdout
    version = next((w[2:] for w in version.split() if w.startswith("v=")), version.strip())
    versions = ", ".join(f"{name} {module.__version__}" for name, module in
                         (("minicelery", minicelery), ("celery", celery), ("huey", huey)) if module is not None)
    return (f"machine: {model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"redis-server {version}; {versions}")


def busy_cores(seconds=1.0):
    """How many cores other processes kept busy over `seconds`, from /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * os.cpu_count()


def busy_note():
    busy = busy_cores()
    print(f"busy before the start: {busy:.2f} of {os.cpu_count()} cores"
          + (" (other work: rates and latencies below are lower and noisier than on an idle machine)"
             if busy > 0.2 else ""))


class Client:
    """One system's client side, pointed at the private Redis on `sock`: send(i) sends a
    no-op task with the system's own API, get() waits for its result the system's way,
    queue_key is the Redis list its tasks wait in, done() counts stored results and
    check() asserts each stored result is its argument."""

    def __init__(self, system, sock):
        self.system = system
        self.redis = redis.Redis(unix_socket_path=sock)
        self.results = redis.Redis(unix_socket_path=sock, db=1)
        if system == "minicelery":
            app.close()  # private_redis() pointed the environment at this Redis
            self.send, self.close, self.queue_key = noop.delay, app.close, "celery"
        elif system == "celery":
            self.app = celery.Celery("bench-client", broker=f"redis+socket://{sock}",
                                     backend=f"redis+socket://{sock}?virtual_host=1", set_as_current=False)
            self.send, self.close, self.queue_key = self.app.task(name="bench.noop")(_noop).delay, self.app.close, \
                "celery"
        else:
            huey_app.storage_kwargs["url"] = f"unix://{sock}"
            huey_app.storage = huey_app.create_storage()
            self.send, self.queue_key = huey_noop, huey_app.storage.queue_key
            self.close = huey_app.storage.pool.disconnect

    def get(self, handle, timeout):
        if self.system == "huey":  # BLPOP on the task's notify key (notify_result=True)
            return handle.get(blocking=True, timeout=timeout)
        return handle.get(timeout=timeout)

    def done(self):
        if self.system == "huey":
            return self.redis.hlen(huey_app.storage.result_key)
        return self.results.dbsize()

    def forget_results(self):
        self.results.flushdb()
        if self.system == "huey":
            self.redis.delete(huey_app.storage.result_key)

    def check(self, handles):
        """Every result is stored and is the task's argument (read from Redis directly)."""
        for start in range(0, len(handles), 1000):
            chunk = handles[start:start + 1000]
            if self.system == "huey":
                raw = self.redis.hmget(huey_app.storage.result_key, [h.id for h in chunk])
                values = [None if r is None else huey_app.serializer.deserialize(r) for r in raw]
            else:
                raw = self.results.mget([f"celery-task-meta-{h.id}" for h in chunk])
                metas = [None if r is None else json.loads(r) for r in raw]
                assert all(m is not None and m["status"] == "SUCCESS" for m in metas), \
                    f"{self.system}: results missing or failed near task {start}"
                values = [m["result"] for m in metas]
            assert values == list(range(start, start + len(chunk))), f"{self.system}: wrong results near {start}"


def watch(poll, started, finished, worker, redis_client, timeout=900, interval=0.002):
    """Poll every `interval` s. From the first poll where started(state) to the first where
    finished(state): (seconds, worker tree CPU seconds, Redis CPU seconds), with CPU read
    at both moments while the worker is alive."""
    begin = None
    deadline = time.monotonic() + timeout
    while True:
        state = poll()
        now = time.perf_counter()
        if begin is None and started(state):
            begin, cpu0, redis0 = now, cpu_seconds(tree_pids(worker.pid)), redis_cpu(redis_client)
        if begin is not None and finished(state):
            return now - begin, cpu_seconds(tree_pids(worker.pid)) - cpu0, redis_cpu(redis_client) - redis0
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}); see its log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no end after {timeout} s: last state {state}")
        time.sleep(interval)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def import_ms(statement, runs=5):
    """In-process time of `statement` in a fresh interpreter, best of `runs`, in ms; one run
    first so bytecode is cached (PYTHONDONTWRITEBYTECODE is dropped)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, check=True,
                                  capture_output=True, text=True).stdout) for _ in range(runs + 1)]
    return min(times[1:]) * 1000


@contextlib.contextmanager
def logs_on_failure(directory):
    try:
        yield
    except BaseException:
        for path in sorted(glob.glob(os.path.join(directory, "*.log"))):
            with open(path, errors="replace") as f:
                tail = f.read()[-3000:]
            print(f"--- {os.path.basename(path)} (last 3000 characters)\n{tail}", file=sys.stderr)
        raise


def compare_one(system, tasks, roundtrips):
    row = {}
    with private_redis() as (directory, sock), logs_on_failure(directory):
        client = Client(system, sock)
        try:
            # Worker start, idle memory and round trips, on one worker.
            handles = None
            first = client.send(0)
            spawned = time.perf_counter()
            worker = start_worker(system, sock, directory, settle=0)
            try:
                assert client.get(first, 120) == 0
                row["start"] = time.perf_counter() - spawned
                time.sleep(2)  # idle
                row["pss"] = pss_mib(worker.pid)
                warmup = max(1, min(10, roundtrips // 10))
                trips = []
                for i in range(warmup + roundtrips):
                    began = time.perf_counter()
                    assert client.get(client.send(i), 30) == i
                    trips.append(time.perf_counter() - began)
                trips = trips[warmup:]
                row["p50"], row["p90"] = statistics.median(trips) * 1000, percentile(trips, 90) * 1000
            finally:
                stop(worker)
            # Enqueue with no worker; then drain.
            client.forget_results()
            client.redis.delete(client.queue_key)
            began = time.perf_counter()
            handles = [client.send(i) for i in range(tasks)]
            row["enqueue"] = tasks / (time.perf_counter() - began)
            assert client.redis.llen(client.queue_key) == tasks, "not every task is in the queue"
            # Huey drains without notify_result: its extra LPUSH per result only serves blocking gets.
            worker = start_worker(system, sock, directory, settle=0, notify=False)
            try:
                seconds, cpu, redis_seconds = watch(
                    lambda: (client.redis.llen(client.queue_key), client.done()),
                    lambda state: state[0] < tasks, lambda state: state[1] >= tasks, worker, client.redis)
            finally:
                stop(worker)
            client.check(handles)
            row.update(drain=tasks / seconds, cpu=cpu / tasks * 1000, redis=redis_seconds / tasks * 1e6)
        finally:
            first = handles = None  # Celery's results unsubscribe when collected: while Redis is up
            gc.collect()
            client.close()
    return row


def compare(tasks, roundtrips, wanted):
    """minicelery, Celery and Huey side by side, each on a fresh private Redis, no-op tasks
    that return their argument, workers with 2 processes.

    enqueue/s: `tasks` sends with the system's client API, no worker running (wall time).
    drain/s: with those tasks queued, a worker starts; the harness polls the queue's Redis
      list (LLEN) and the result count (DBSIZE of the results db; HLEN of Huey's result
      hash) every 2 ms: the drain runs from the first poll where the list is shorter than
      `tasks` (the first task taken) to the first where every result exists. Then each
      result is read back from Redis and asserted equal to its argument.
    round trip p50/p90: `roundtrips` sequential send -> result with an idle worker, after
      a few warm-up ones. Celery and minicelery: task.delay(i).get(timeout=...) (both wait
      on the Redis backend's pub/sub). Huey: Result.get(blocking=True) on a RedisHuey made
      with notify_result=True (Huey's documented low-latency option): the worker LPUSHes a
      key huey.notify.<name>.<task id> after storing the result, and get() does HEXISTS,
      then BLPOP on that key, then HGET+HDEL of the result. Without it, get() polls HEXISTS
      sleeping 50 ms, x1.15 each time, at most max_delay (1 s). The drain worker runs
      without notify_result, which only costs Huey there.
    idle PSS: 2 s after the worker completed its first task, the sum of `Pss` in
      /proc/<pid>/smaps_rollup over the worker's process tree (main, pool, Huey's scheduler).
    worker start: from spawning the worker command (one task already sent) to that task's
      result in hand.
    worker CPU/task: utime+stime (+ reaped children's) from /proc/<pid>/stat over the
      worker tree, read at the drain's start and end while the worker is alive, / tasks.
    Redis CPU/task: INFO cpu used_cpu_user+used_cpu_sys over the drain, / tasks.
    import: in-process time of `import X` in a fresh interpreter (perf_counter around it),
      best of 5, bytecode cached by a run before. `import celery` is lazy (celery.Celery
      loads on first use), so the import target compares `import minicelery` with
      `from celery import Celery`, which loads Celery; the lazy figure is shown too.
    """
    print(machine_line())
    busy_note()
    systems = pick_systems(wanted)
    imports = {s: import_ms(f"import {s}") for s in systems}
    rows = {}
    for system in systems:
        rows[system] = dict(compare_one(system, tasks, roundtrips), imp=imports[system])
    print(f"\n{tasks} tasks, {roundtrips} round trips, workers with 2 processes\n")
    columns = [("enqueue/s", "enqueue", "{:>11.0f}"), ("drain/s", "drain", "{:>11.0f}"),
               ("rt p50 ms", "p50", "{:>11.2f}"), ("rt p90 ms", "p90", "{:>11.2f}"),
               ("PSS MiB", "pss", "{:>11.1f}"), ("start s", "start", "{:>11.2f}"),
               ("CPU ms/t", "cpu", "{:>11.3f}"), ("Redis us/t", "redis", "{:>11.1f}"),
               ("import ms", "imp", "{:>11.1f}")]
    print(f"{'system':<11}" + "".join(f"{title:>11}" for title, _, _ in columns))
    for system, row in rows.items():
        print(f"{system:<11}" + "".join(fmt.format(row[key]) for _, key, fmt in columns))
    celery_class_ms = import_ms("from celery import Celery") if "celery" in rows else None
    if celery_class_ms:
        print(f"\nnote: `from celery import Celery` takes {celery_class_ms:.1f} ms "
              f"(`import celery` alone loads little: its attributes load on first use)")
        rows["celery"]["loaded"] = celery_class_ms  # what importing Celery takes, like for like
    for row in rows.values():
        row.setdefault("loaded", row["imp"])
    print("\ntargets (minicelery / other)")
    targets = [("drain", "huey", "drain", ">=", 1.5), ("round-trip p50", "huey", "p50", "<=", 0.8),
               ("drain", "celery", "drain", ">=", 8), ("enqueue", "celery", "enqueue", ">=", 5),
               ("idle PSS", "celery", "pss", "<=", 0.5), ("worker start", "celery", "start", "<=", 0.2),
               ("import (loaded)", "celery", "loaded", "<=", 0.5)]
    skipped = set()
    for label, other, key, op, target in targets:
        if "minicelery" not in rows or other not in rows:
            missing = "minicelery" if "minicelery" not in rows else other
            if missing not in skipped:
                print(f"  ({'all ratios' if missing == 'minicelery' else 'ratios to ' + missing} skipped: "
                      f"{missing} not measured)")
                skipped.add(missing)
            continue
        ratio = rows["minicelery"][key] / rows[other][key]
        met = ratio >= target if op == ">=" else ratio <= target
        print(f"  {label + ' minicelery/' + other:<32} {ratio:>8.2f}  (target {op} {target:<4})  "
              f"{'met' if met else 'NOT MET'}")
    if celery_class_ms and "minicelery" in rows:
        print(f"  {'import minicelery/`import celery`':<32} {rows['minicelery']['imp'] / rows['celery']['imp']:>8.2f}"
              f"  (for reference: `import celery` loads none of Celery yet)")
    return rows


def message_template():
    """One bench.noop(0) message exactly as minicelery's noop.delay sends it, as a %-format
    string with the task id and the delivery tag as fields (the id occurs several times)."""
    with private_redis() as (_, sock):
        app.close()
        result = noop.delay(0)
        raw = redis.Redis(unix_socket_path=sock).rpop("celery").decode()
        app.close()
    tag = json.loads(raw)["properties"]["delivery_tag"]
    assert len(result.id) == len(tag) == 36 and raw.count(tag) == 1, "unexpected id or tag"
    return raw.replace("%", "%%").replace(result.id, "%(id)s").replace(tag, "%(tag)s")


def fill(client, template, count, queue="celery", chunk=10000, per_command=1000):
    """LPUSH `count` copies of the template, each with its own task id and delivery tag
    (UUID-shaped, from a counter), built and pipelined `chunk` at a time."""
    id_prefix = "%08x-0000-4000-8000-" % random.getrandbits(32)
    tag_prefix = "%08x-0000-4000-9000-" % random.getrandbits(32)
    for start in range(0, count, chunk):
        messages = [template % {"id": f"{id_prefix}{k:012x}", "tag": f"{tag_prefix}{k:012x}"}
                    for k in range(start, min(start + chunk, count))]
        with client.pipeline(transaction=False) as pipe:
            for i in range(0, len(messages), per_command):
                pipe.lpush(queue, *messages[i:i + per_command])
            pipe.execute()


def scale(backlog, sample, wanted):
    """Cost per task as the backlog grows, minicelery beside Celery. For each system and
    each backlog size (`sample`, `backlog`), a fresh Redis gets `backlog` bench.noop
    messages in the queue `celery`, all clones of one message sent by minicelery (Celery's
    protocol 2 in kombu's Redis envelope; only the task id and delivery tag differ),
    LPUSHed in pipelined chunks of 10,000. bytes/msg is Redis used_memory after minus
    before, / backlog. Then a worker starts; the drain of the first `sample` tasks runs from
    the first LLEN poll (every 2 ms) below `backlog` to the first at or below
    `backlog - sample` (taken, not necessarily finished: the prefetched few are the same at
    any backlog), with the worker tree's and Redis's CPU over that span. "flat?" is the
    rate at the big backlog over the rate at the small one."""
    print(machine_line())
    busy_note()
    systems = pick_systems(wanted, ("minicelery", "celery"))
    template = message_template()
    rows = []
    for system in systems:
        small_rate = None
        for size in sorted({sample, backlog}):
            with private_redis() as (directory, sock), logs_on_failure(directory):
                client = redis.Redis(unix_socket_path=sock)
                before = client.info("memory")["used_memory"]
                began = time.perf_counter()
                fill(client, template, size)
                fill_seconds = time.perf_counter() - began
                per_message = (client.info("memory")["used_memory"] - before) / size
                assert client.llen("celery") == size
                taken = min(sample, size)
                worker = start_worker(system, sock, directory, settle=0)
                try:
                    seconds, cpu, redis_seconds = watch(
                        lambda: client.llen("celery"), lambda left: left < size,
                        lambda left: left <= size - taken, worker, client)
                    # The tasks ran: their results come (the prefetched few may still be running).
                    results = redis.Redis(unix_socket_path=sock, db=1)
                    deadline = time.monotonic() + 60
                    while results.dbsize() < taken - 100 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    meta = json.loads(results.get(results.randomkey()))
                    assert meta["status"] == "SUCCESS" and meta["result"] == 0, meta
                finally:
                    stop(worker)
                rate = taken / seconds
                small_rate = small_rate or rate
                rows.append((system, size, per_message, fill_seconds, rate, cpu / taken * 1000,
                             redis_seconds / taken * 1e6, rate / small_rate))
    print(f"\nfirst {sample} tasks drained from each backlog, workers with 2 processes\n")
    print(f"{'system':<11} {'backlog':>8} {'bytes/msg':>10} {'fill s':>7} {'drain/s':>8} {'CPU ms/t':>9} "
          f"{'Redis us/t':>10} {'flat?':>6}")
    for system, size, per_message, fill_seconds, rate, cpu, redis_us, flat in rows:
        print(f"{system:<11} {size:>8} {per_message:>10.0f} {fill_seconds:>7.1f} {rate:>8.0f} {cpu:>9.3f} "
              f"{redis_us:>10.1f} {flat:>6.2f}")
    return rows


# -- reactions ------------------------------------------------------------------

#: reactions: the commands Redis gained after 6.0; renamed away, a 7.x server answers
#: like a 6.0 one would ("unknown command") to what minicelery may use of them (BLMOVE)
NEWER_THAN_6_0 = ("BLMOVE LMOVE GETDEL GETEX ZRANGESTORE COPY LMPOP BLMPOP ZMSCORE SMISMEMBER HRANDFIELD "
                  "ZRANDMEMBER ZUNION ZINTER ZDIFF ZDIFFSTORE XAUTOCLAIM EXPIRETIME PEXPIRETIME SINTERCARD "
                  "LCS FCALL").split()
OLD_REDIS = tuple(option for name in NEWER_THAN_6_0 for option in ("--rename-command", name, ""))

#: (label, queue, priority) of the wake cases
WAKE_CASES = [("queue celery, priority 0", "celery", 0), ("queue second, priority 0", "second", 0),
              ("queue celery, priority 9", "celery", 9)]
WAKE_IDLE = 1.5  # seconds the worker is left idle before each send


class StartedSender:
    """Sends bench.started to a queue with a priority, the system's own way, and waits."""

    def __init__(self, system, sock):
        self.system = system
        if system == "minicelery":
            app.close()  # private_redis() pointed the environment at this Redis
            self.task, self.close = started, app.close
        else:
            self.app = celery.Celery("bench-client", broker=f"redis+socket://{sock}",
                                     backend=f"redis+socket://{sock}?virtual_host=1", set_as_current=False)
            self.task, self.close = self.app.task(name="bench.started")(_started), self.app.close

    def latency(self, queue, priority, timeout=30):
        """Seconds from just before the send to the task's start, as the task saw it."""
        sent = time.time()
        result = self.task.apply_async(queue=queue, priority=priority)
        began = result.get(timeout=timeout)
        result = None
        return began - sent


def wake_latencies(system, repeat, redis_options=()):
    """{case label: [seconds, ...]}: `repeat` rounds of the WAKE_CASES in turn, each sent
    after the worker (-Q celery,second) sat idle for WAKE_IDLE s; after one warm-up send
    per case. Also the worker's log."""
    times = {label: [] for label, _, _ in WAKE_CASES}
    with private_redis(redis_options=redis_options) as (directory, sock), logs_on_failure(directory):
        sender = StartedSender(system, sock)
        # info: the log says so when minicelery falls back to BRPOPLPUSH (no BLMOVE)
        level = ["-l", "info"] if system == "minicelery" and redis_options else []
        worker = start_worker(system, sock, directory, settle=0, options=["-Q", "celery,second", *level])
        try:
            for _, queue, priority in WAKE_CASES:
                sender.latency(queue, priority, timeout=120)  # the first one waits for the start
            for _ in range(repeat):
                for label, queue, priority in WAKE_CASES:
                    time.sleep(WAKE_IDLE)
                    times[label].append(sender.latency(queue, priority))
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker exited ({worker.returncode})")
        finally:
            stop(worker)
            gc.collect()  # Celery's results unsubscribe when collected: while Redis is up
            sender.close()
        with open(worker.log_path, errors="replace") as f:
            log = f.read()
    return times, log


def idle_exits(system, repeat, broker_url=None):
    """([seconds, ...], notes): `repeat` times a fresh worker (2 processes) runs one task,
    sits idle 1 s, gets SIGTERM; from the signal to its main process's exit, polled every
    1 ms. notes: pool processes still alive 1 s after the main one exited."""
    times, notes = [], []
    scratch = tempfile.mkdtemp()
    url = f"sqlite:///{scratch}/bench.db" if broker_url == "sqlite" else None
    try:
        with private_redis(url) as (directory, sock), logs_on_failure(directory):
            client = Client(system, sock)
            try:
                for i in range(repeat):
                    handle = client.send(i)
                    worker = start_worker(system, sock, directory, url, settle=0)
                    try:
                        assert client.get(handle, 120) == i
                        handle = None
                        time.sleep(1)  # idle
                        children = [(pid, _cmdline(pid)) for pid in tree_pids(worker.pid)[1:]]
                        began = time.perf_counter()
                        worker.send_signal(signal.SIGTERM)
                        deadline = began + 60
                        while worker.poll() is None and time.perf_counter() < deadline:
                            time.sleep(0.001)
                        if worker.poll() is None:
                            raise TimeoutError(f"{system}: the worker was still running 60 s after SIGTERM")
                        times.append(time.perf_counter() - began)
                        time.sleep(1)
                        left = [pid for pid, cmdline in children if _cmdline(pid) == cmdline]
                        if left:
                            notes.append(f"try {i + 1}: {len(left)} of {len(children)} child processes "
                                         f"still alive 1 s after the main process exited")
                    finally:
                        stop(worker)  # (it has exited: this reaps it and kills any orphan)
            finally:
                handle = None
                gc.collect()
                client.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return times, notes


def _wait_for_line(path, texts, timeout, interval=0.005):
    """Poll the file until one of `texts` (a string or a tuple) occurs in it; True if one
    did in time."""
    texts = (texts,) if isinstance(texts, str) else texts
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            with open(path, errors="replace") as f:
                content = f.read()
            if any(text in content for text in texts):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def beat_takeovers(count):
    """minicelery only: two beats on one Redis (own state files, the 1 s bench.stamp entry,
    a worker writing the stamps). `count` times: SIGKILL the one whose log says
    "beat: leading", then poll the other's log every 5 ms until it says so; a fresh beat
    then stands by in the killed one's place. Returns ([seconds to take over, ...],
    [seconds between the last stamp before a kill and the first after, ...])."""
    LEADING, STANDING_BY = "beat: leading", "standing by"
    takeovers, gaps, kills = [], [], []
    saved = os.environ.get("BENCH_STAMPS")
    with private_redis() as (directory, sock), logs_on_failure(directory):
        stamps = os.path.join(directory, "stamps")
        os.environ["BENCH_STAMPS"] = stamps  # the worker and beats load the bench.stamp entry
        beats, started_count = [], 0

        def start_beat(slot):
            nonlocal started_count
            started_count += 1
            path = os.path.join(directory, f"beat-{started_count}.log")
            with open(path, "a") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "minicelery", "-A", "benchmarks:app", "beat", "-l", "info",
                     "-s", os.path.join(directory, f"beat-state-{slot}")],
                    cwd=HERE, env=worker_env("minicelery", sock), stdout=log, stderr=subprocess.STDOUT)
            proc.log_path, proc.slot = path, slot
            return proc

        worker = start_worker("minicelery", sock, directory, settle=0)
        try:
            beats = [start_beat("a"), start_beat("b")]
            for beat in beats:  # each says which it is, within its first tick
                if not _wait_for_line(beat.log_path, (LEADING, STANDING_BY), 30):
                    raise RuntimeError(f"a beat said neither leading nor standing by in 30 s ({beat.log_path})")
            for _ in range(count):
                leaders = [b for b in beats if _wait_for_line(b.log_path, LEADING, 0)]
                if len(leaders) != 1:
                    raise RuntimeError(f"{len(leaders)} beats say they lead")
                leader, = leaders
                standby, = [b for b in beats if b is not leader]
                # The leader sends a few runs first; a random phase against its 1 s ticks (each
                # renews the lease), so the kill doesn't always land just after a renewal.
                time.sleep(2 + random.random())
                kills.append(time.time())
                began = time.perf_counter()
                leader.kill()
                if not _wait_for_line(standby.log_path, LEADING, 60):
                    raise RuntimeError("the standby beat did not take over within 60 s")
                takeovers.append(time.perf_counter() - began)
                leader.wait()
                replacement = start_beat(leader.slot)
                if not _wait_for_line(replacement.log_path, STANDING_BY, 30):
                    raise RuntimeError("the replacement beat did not stand by within 30 s")
                beats = [standby, replacement]
            time.sleep(3)  # the last takeover's runs reach the stamps
        finally:
            for beat in beats:
                stop(beat)
            stop(worker)
            if saved is None:
                os.environ.pop("BENCH_STAMPS", None)
            else:
                os.environ["BENCH_STAMPS"] = saved
        runs = sorted(float(x) for x in open(stamps)) if os.path.exists(stamps) else []
    for killed in kills:
        before = [t for t in runs if t <= killed]
        after = [t for t in runs if t > killed]
        gaps.append(after[0] - before[-1] if before and after else math.inf)
    return takeovers, gaps


def reactions(repeat, wanted):
    """How quickly a worker (and beat) reacts, each figure the median and max over tries.

    wake: a worker consuming `-Q celery,second` (2 processes) sits idle 1.5 s, then the
      client sends bench.started to a queue with a priority (apply_async(queue=...,
      priority=...)); the figure is the task's own time.time() at its start (its result)
      minus the client's time.time() just before apply_async. After one warm-up send
      per case, `repeat` rounds of the three cases in turn.
    wake, Redis without 6.2+ commands: the same on a redis-server started with
      --rename-command X "" for each command newer than 6.0 (NEWER_THAN_6_0).
    idle exit: a fresh worker (2 processes) runs one task, sits idle 1 s, gets SIGTERM;
      from the signal to its main process's exit (proc.poll() every 1 ms). `repeat`
      workers per broker. Pool processes alive 1 s later are noted.
    beat takeover (minicelery; Celery's beat has no standby): two beats on one Redis;
      from SIGKILL of the one whose log says "beat: leading" (2-3 s after it first said
      so, at a random phase against its ticks) until the other's log says so (polled
      every 5 ms); 3 times (1 if repeat < 3). The gap row: seconds between the
      last bench.stamp run before the kill and the first after (the entry runs every 1 s).
    """
    print(machine_line())
    busy_note()
    systems = pick_systems(wanted, ("minicelery", "celery"))
    run_started = time.perf_counter()
    rows, notes = [], []  # rows: (label, system, values, unit)

    def add(label, system, values, unit):
        rows.append((label, system, values, unit))

    wake = {}
    for variant, options in (("", ()), ("Redis<6.2, ", OLD_REDIS)):
        for system in systems:
            try:
                times, log = wake_latencies(system, repeat, options)
            except Exception as exc:
                if system == "celery" and options:  # optional: reported, not fatal
                    notes.append(f"celery on the Redis without 6.2+ commands: skipped ({exc!r})")
                    continue
                raise
            for label, _, _ in WAKE_CASES:
                add(f"wake: {variant}{label}", system, [t * 1000 for t in times[label]], "ms")
                wake.setdefault(system, []).append(statistics.median(times[label]) * 1000)
            if options and system == "minicelery":
                fallback = [line for line in log.splitlines() if "BRPOPLPUSH" in line]
                notes.append("minicelery on the Redis without 6.2+ commands: "
                             + (f"its log: {fallback[0].strip()!r}" if fallback
                                else "its log never says it fell back to BRPOPLPUSH"))
    exits = {}
    for system, broker in [(s, b) for s in systems for b in (["redis", "sqlite"] if s == "minicelery" else ["redis"])]:
        times, exit_notes = idle_exits(system, repeat, broker)
        add(f"idle exit after SIGTERM, {'SQLite' if broker == 'sqlite' else 'Redis'}", system, times, "s")
        exits[(system, broker)] = statistics.median(times)
        notes.extend(f"{system} on {broker}, {note}" for note in exit_notes)
    takeovers = []
    if "minicelery" in systems:
        takeovers, gaps = beat_takeovers(3 if repeat >= 3 else 1)
        add("beat takeover after SIGKILL", "minicelery", takeovers, "s")
        add("beat: gap in 1 s runs over the takeover", "minicelery", gaps, "s")
    elapsed = time.perf_counter() - run_started

    print(f"\n{repeat} tries per figure (beat: {len(takeovers)} takeover{'' if len(takeovers) == 1 else 's'}), workers with 2 processes, "
          f"{elapsed:.0f} s\n")
    print(f"{'reaction':<50} {'system':<11} {'median':>8} {'max':>8}")
    order = list(dict.fromkeys(label for label, _, _, _ in rows))  # each reaction's systems together
    for label, system, values, unit in sorted(rows, key=lambda row: order.index(row[0])):
        fmt = "{:>8.1f}" if unit == "ms" else "{:>8.3f}"
        print(f"{label + ' (' + unit + ')':<50} {system:<11} "
              f"{fmt.format(statistics.median(values))} {fmt.format(max(values))}")
    for note in notes:
        print(f"note: {note}")
    if "minicelery" not in systems:
        print("\ntargets: skipped (minicelery not measured)")
        return rows
    print("\ntargets (minicelery; medians, beat: the longest)")
    worst_wake = max(wake["minicelery"])
    worst_exit = max(v for (s, _), v in exits.items() if s == "minicelery")
    longest = max(takeovers)
    for text, value, met in [
            ("wake <= 5 ms, every queue and priority, both Redis", f"{worst_wake:.1f} ms", worst_wake <= 5),
            ("idle exit <= 0.3 s, Redis and SQLite", f"{worst_exit:.3f} s", worst_exit <= 0.3),
            ("beat takeover < 10 s", f"{longest:.2f} s", longest < 10)]:
        print(f"  {text:<52} {value:>10}  {'met' if met else 'NOT MET'}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["throughput", "eta-lateness", "eta-memory", "beat-drift", "chord",
                                              "compare", "scale", "reactions"])
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--events", action="store_true", help="throughput: also with task events on")
    parser.add_argument("--roundtrips", type=int, default=500, help="compare: sequential send -> result trips")
    parser.add_argument("--systems", help="compare, scale, reactions: a comma list of minicelery, celery, huey "
                                          "(default: all installed; scale, reactions: minicelery,celery)")
    parser.add_argument("--repeat", type=int, default=20, help="reactions: tries per figure")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="scale: the big backlog")
    parser.add_argument("--sample", type=int, default=20_000,
                        help="scale: tasks drained from each backlog, and the small backlog")
    args = parser.parse_args()
    allowed = ALL_SYSTEMS if args.benchmark == "compare" else ("minicelery", "celery")
    for name in (args.systems or "").split(","):
        if name.strip() and name.strip() not in allowed:
            parser.error(f"{args.benchmark}: unknown system {name.strip()!r}: choose from {', '.join(allowed)}")
    if args.benchmark == "throughput":
        throughput(args.tasks or 5000, args.events)
    elif args.benchmark == "eta-lateness":
        eta_lateness(args.tasks or 200)
    elif args.benchmark == "chord":
        chord_bench(args.tasks or 1000)
    elif args.benchmark == "beat-drift":
        beat_drift(args.tasks or 60)
    elif args.benchmark == "compare":
        compare(args.tasks or 10000, args.roundtrips, args.systems)
    elif args.benchmark == "scale":
        scale(args.backlog, min(args.sample, args.backlog), args.systems)
    elif args.benchmark == "reactions":
        if args.repeat < 1:
            parser.error("reactions: --repeat must be at least 1")
        reactions(args.repeat, args.systems)
    else:
        eta_memory(args.tasks or 100000)


if __name__ == "__main__":
    main()
