"""Sources: read the user's data (folders of 2D image files, NumPy arrays, synthetic scans).

A source yields ``(image, mask, name)`` samples for the converter; it knows nothing of stores,
batches or workers.  May import: :mod:`streamseg.errors`, :mod:`streamseg.progress`.
"""
