"""What runs in the blackout, after the kexec: standard library only.

The restore plan (:mod:`._resume`), the keeper that holds retrieved sessions
(:mod:`._keeper`), the journal (:mod:`._journal`) and the crash seam
(:mod:`._crashpoint`). It imports nothing but the standard library,
:mod:`orchestrator.luo`, :mod:`orchestrator.errors` and
:mod:`orchestrator._compat` (``tests/test_boundaries.py`` checks it).
"""
