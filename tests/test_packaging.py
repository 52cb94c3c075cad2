"""What an install ships: a real wheel built from this checkout holds only non-generic top-level
packages, and every console script points at a function that exists in it. In a checkout the
simulator uses the repository's bench/ package itself (one module object per file)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bench.metrics
import bench.report
import bench.workloads
from ascendra.coordinator import WORKERS_MODULE
from ascendra.layout import sibling_package
from ascendra.sim import benchlib

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_uses_its_own_folders_and_an_install_the_ascendra_names():
    # Run from the repository root (as the tests are), the checkout's folders are what import.
    assert sibling_package("bench") == "bench" and sibling_package("workers") == "workers"
    assert WORKERS_MODULE == "workers"
    # A name this checkout has no folder for is looked up inside ascendra.
    assert sibling_package("no_such_folder") == "ascendra.no_such_folder"


def test_simulator_uses_the_checkouts_bench_modules():
    assert benchlib.PACKAGE == "bench"
    assert benchlib.metrics is bench.metrics
    assert benchlib.RequestSpec is bench.workloads.RequestSpec
    assert benchlib.markdown is bench.report.markdown


@pytest.mark.e2e
def test_wheel_ships_no_generic_top_level_package(tmp_path):
    # Build from a copy, so that the build leaves nothing in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "__pycache__", "build", "*.egg-info", "results"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ascendra-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ascendra"}
    for module in ("ascendra/bench/serve.py", "ascendra/bench/compare.py", "ascendra/bench/workloads.py",
                   "ascendra/sim/benchlib.py", "ascendra/workers/__main__.py", "ascendra/workers/engine.py"):
        assert module in names
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert set(scripts["console_scripts"]) == {"ascendra-serve", "ascendra-sim", "ascendra-bench", "ascendra-compare"}
    for target in scripts["console_scripts"].values():
        module, func = target.split(":")
        path = module.replace(".", "/") + ".py"
        assert path in names, target
        with zipfile.ZipFile(wheel) as z:
            assert f"\ndef {func}(" in z.read(path).decode(), target
