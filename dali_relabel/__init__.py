"""dali-relabel: ReLabel soft targets (label-map pooling) at DALI speed.

Main entry points:

* :class:`~dali_relabel.store.LabelStore` / :class:`~dali_relabel.store.StoreWriter`: the HDF5 label-map store;
* :func:`~dali_relabel.reference.reference_label_pooling`: the authors' LabelPooling in plain PyTorch;
* :func:`~dali_relabel.plugin.load_plugin`: the fused DALI operator ``fn.relabel.label_pooling``;
* :class:`~dali_relabel.loader.ReLabelLoader` / :class:`~dali_relabel.loader.ValidationLoader`: drop-in
  ``(images, targets)`` iterators.
"""
from .config import DataConfig
from .store import LabelMap, LabelStore, StoreError, StoreWriter, write_store

__version__ = "0.1.0"

__all__ = ["DataConfig", "LabelMap", "LabelStore", "StoreError", "StoreWriter", "write_store",
           "ReLabelLoader", "ValidationLoader", "__version__"]


def __getattr__(name):
    # The loaders import DALI and torch; keep `import dali_relabel` light for the store tools.
    if name in ("ReLabelLoader", "ValidationLoader"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(name)
