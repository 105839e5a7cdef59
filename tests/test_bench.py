"""The benchmarks' command lines: a count that cannot be run is refused by its flag's name before anything
loads or launches, instead of a traceback at the end of a long run."""

import subprocess
import sys

import pytest
from app_server import ROOT

pytestmark = pytest.mark.slow  # each bench started as a process, seven of them


COUNTS = {
    "app_startup": "--starts",
    "generate": "--prompt-lengths",
    "peers": "--rounds",
    "prefill_share": "--long",
    "probability_view": "--rounds",
    "serve_load": "--repeats",
    "train_throughput": "--steps",
}


def test_a_count_of_zero_is_refused_by_name():
    # all at once: each spends its time importing torch
    pipes = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = {b: subprocess.Popen([sys.executable, f"bench/{b}.py", f, "0"], **pipes) for b, f in COUNTS.items()}
    for bench, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 2, (bench, out + err)
        assert f"argument {COUNTS[bench]}: must be a whole number >= 1, got '0'" in err, (bench, err)
