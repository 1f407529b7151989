"""The chaos suite at full size, with a report.

    python3 examples/chaos.py

Runs `pytest -m chaos` from test_minicelery.py with MINICELERY_CHAOS=full
(CI runs the same scenarios at trimmed sizes in the normal suite), then prints
one row per scenario: tasks sent, completed, run twice, lost, and seconds.
Needs what the tests need (bash .ci/test installs it).
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    with tempfile.TemporaryDirectory() as directory:
        report = os.path.join(directory, "report.jsonl")
        env = dict(os.environ, MINICELERY_CHAOS="full", MINICELERY_CHAOS_REPORT=report)
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "chaos", "-p", "no:randomly"],
                               cwd=ROOT, env=env)
        rows = [json.loads(line) for line in open(report)] if os.path.exists(report) else []
    print(f"\n| {'scenario':<58} | {'sent':>5} | {'completed':>9} | {'duplicates':>10} | {'lost':>4} | {'time':>6} |")
    print(f"|{'-' * 60}|{'-' * 7}|{'-' * 11}|{'-' * 12}|{'-' * 6}|{'-' * 8}|")
    for row in rows:
        print(f"| {row['scenario']:<58} | {row['sent']:>5} | {row['completed']:>9} | {row['duplicates']:>10} "
              f"| {row['lost']:>4} | {row['seconds']:>5}s |")
    return code


if __name__ == "__main__":
    sys.exit(main())
