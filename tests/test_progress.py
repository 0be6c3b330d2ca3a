"""Progress: a bar only on a terminal; plain interval lines (no carriage returns) in logs."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    # bytes, decoded by hand: text=True would turn every \r into \n and hide what a log file receives
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env={**os.environ, **env})
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


LOOP = ("from clinicalblip.progress import progress, write\n"
        "bar = progress(total=5, desc='work', unit='step')\n"
        "for i in range(5):\n"
        "    bar.update(1); bar.set_postfix(loss='0.5')\n"
        "write('a log line')\n"
        "bar.close()\n"
        "for _ in progress(range(3), desc='loop'): pass\n")


def test_piped_output_gets_plain_lines_without_carriage_returns():
    proc = _run(LOOP, CLINICALBLIP_PROGRESS="auto", CLINICALBLIP_PROGRESS_INTERVAL="0")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    work = [line for line in lines if line.startswith("work: ")]
    assert work[-1].startswith("work: 5/5 (100%) step") and "loss 0.5" in work[-1]
    assert lines[-1].startswith("loop: 3/3 (100%) it") and lines[-2].startswith("loop: 2/3")  # no repeated last line
    assert sum(line.startswith("work: ") for line in lines) >= 5  # one per interval (0 s here) + the last
    assert "a log line" in proc.stdout


def test_progress_off_and_bar_switches():
    off = _run(LOOP, CLINICALBLIP_PROGRESS="off")
    assert off.returncode == 0 and off.stderr == "" and "a log line" in off.stdout
    bar = _run(LOOP, CLINICALBLIP_PROGRESS="bar")
    assert bar.returncode == 0 and "\r" in bar.stderr  # a forced bar draws as tqdm does
