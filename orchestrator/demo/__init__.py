"""The demo workload: a key-value store keeping its data in a memfd
(``python -m orchestrator.demo.kv``), used by ``liveupdate demo``, the
``workloads`` plugin and the tests.
"""
