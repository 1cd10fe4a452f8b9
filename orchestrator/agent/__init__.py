"""The host agent: its guard (peers, paths, limits), the server that runs
updates, the HTTP control API, and the client workloads use
(:mod:`orchestrator.agent_client` re-exports it).
"""
