"""Discrete-event simulation of Ascendra and its baselines (``python -m ascendra.sim``).

``engine``: the event loop and simulated instances (the real scheduler, block manager and policy);
``costs``: step-time sources and the KV migration cost; ``sweep``: points and capacity searches
scored by ``bench.metrics``; ``scenarios``: named setups; ``fidelity``: real CPU server vs simulator.
"""
