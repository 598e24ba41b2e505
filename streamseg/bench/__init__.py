"""Measurement: ``streamseg bench`` (throughput, input stall, memory, CPU, GPU), the memory
sampler (USS / RssAnon / file-backed pages) and memory caps (cgroups).

May import every room below it: :mod:`streamseg.pipeline`, :mod:`streamseg.store`,
:mod:`streamseg.parallel`, :mod:`streamseg.io`, :mod:`streamseg.models` and the base modules.
"""
