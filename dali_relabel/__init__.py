"""dali-relabel: ReLabel soft targets (label-map pooling) at DALI speed.

Main entry points:

* :class:`~dali_relabel.store.LabelStore` / :class:`~dali_relabel.store.StoreWriter`: the HDF5 label-map store;
* :func:`~dali_relabel.ops.reference.reference_label_pooling`: the authors' LabelPooling in plain PyTorch;
* :func:`~dali_relabel.ops.plugin.load_plugin`: the fused DALI operators ``fn.relabel.*``;
* :class:`~dali_relabel.loader.ReLabelLoader` / :class:`~dali_relabel.loader.ValidationLoader`: drop-in
  ``(images, targets)`` iterators.

Names are imported on first use, so ``import dali_relabel`` (and the command line's start) stays
light: the loaders pull in DALI and torch, the store h5py.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "DataConfig": "config", "LabelMap": "store", "LabelStore": "store", "StoreError": "store",
    "StoreWriter": "store", "write_store": "store", "ReLabelLoader": "loader", "ValidationLoader": "loader",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dali_relabel' has no attribute {name!r}")
