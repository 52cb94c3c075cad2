"""The load generator's library as the simulator uses it (metrics, workloads, runs, reports).

The repository keeps it in the top-level ``bench/`` folder, so that ``python -m bench.serve``
works from a checkout; an installed distribution ships the same folder as ``ascendra.bench``
(a generic top-level ``bench`` would collide in site-packages). This module picks whichever
of the two belongs to this copy of ``ascendra``, so that a checkout never loads the same file
under two module names, and re-exports what the simulator needs.
"""

from __future__ import annotations

import importlib

from ascendra.layout import sibling_package

PACKAGE = sibling_package("bench")


def _module(name: str):
    return importlib.import_module(f"{PACKAGE}.{name}")


metrics = _module("metrics")
promtext = _module("promtext")
_args, _client, _report = _module("args"), _module("client"), _module("report")
_runner, _server, _sweeps = _module("runner"), _module("server_process"), _module("sweeps")
_workloads = _module("workloads")

add_slo_args, add_workload_args, workload_config = _args.add_slo_args, _args.add_workload_args, _args.workload_config
ClientConfig = _client.ClientConfig
format_table, markdown, plot, write_json = _report.format_table, _report.markdown, _report.plot, _report.write_json
execute, request_dict = _runner.execute, _runner.request_dict
ServerProcess, free_port = _server.ServerProcess, _server.free_port
http_get, wait_idle = _server.http_get, _server.wait_idle
rate_tag, summarize_sweep = _sweeps.rate_tag, _sweeps.summarize_sweep
RequestSpec, TraceRow, WorkloadConfig = _workloads.RequestSpec, _workloads.TraceRow, _workloads.WorkloadConfig
build_workload, load_trace = _workloads.build_workload, _workloads.load_trace
