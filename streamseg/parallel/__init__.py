"""How batches are made elsewhere: the feeder, the worker pool (processes or threads), the
shared-memory slots batches are lent from, and the fork guard.

Knows nothing of what a batch contains: it runs a picklable producer.  May import:
:mod:`streamseg.errors` only (never :mod:`streamseg.store` or :mod:`streamseg.pipeline`).
"""
