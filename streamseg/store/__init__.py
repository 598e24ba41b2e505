"""The store: reading it (:func:`open_store`, :class:`Store`), writing it, converting into it,
and inspecting it (``info`` / ``verify``).

May import: :mod:`streamseg.io`, :mod:`streamseg.errors`, :mod:`streamseg.progress`.
Never imports :mod:`streamseg.pipeline`, :mod:`streamseg.parallel` or :mod:`streamseg.bench`.
"""

from .reader import Store, open_store
from .remote import RemoteStore
from .remote_fs import RemoteStoreError

__all__ = ["Store", "open_store", "RemoteStore", "RemoteStoreError"]
