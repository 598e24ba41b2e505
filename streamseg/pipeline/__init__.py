"""What a batch is: sample order, joint image/mask augmentation, batch production, the dataset
classes (:class:`~streamseg.pipeline.dataset.SegmentationDataset`) and their Keras adapter.

May import: :mod:`streamseg.store`, :mod:`streamseg.parallel`, :mod:`streamseg.io`,
:mod:`streamseg.errors`, :mod:`streamseg.progress`.  Never imports :mod:`streamseg.bench`.
"""
