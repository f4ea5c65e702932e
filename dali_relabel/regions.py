"""Training from a region store (FKD's stored crops): what the loader does differently from a map store.

A region store holds per image R stored crops, each with its box, flip and the teacher's top-k soft
label for exactly that crop (:mod:`dali_relabel.store.region_reader`). The loader's source chooses
``crops_per_image`` of them per sample and epoch, keyed (:meth:`~dali_relabel.store.RegionStore.select`);
the graph cuts exactly those windows, flips them as stored and augments the rest as usual
(``pipelines/graphs.py``, :func:`~dali_relabel.pipelines.graphs.stored_window`); this module opens the
store by its kind (:func:`open_training_store`), refuses the settings a stored crop label cannot
follow (:func:`check_region_settings`) and turns a batch's stored top-k labels into dense targets on
the loader's device (:func:`region_targets`), once per batch.
"""
from __future__ import annotations

from typing import Optional, Union

from .config import DataConfig
from .errors import DaliRelabelError
from .fields import REGION_IDS, REGION_VALUES, TARGETS
from .remote import is_remote
from .store import LabelStore, RegionStore, dense_targets, store_kind

#: The store kinds a training loader reads.
TrainingStore = Union[LabelStore, RegionStore]


class RegionSettingsError(DaliRelabelError, ValueError):
    """A data setting a region store's stored crop labels cannot honour."""


def open_training_store(store) -> TrainingStore:
    """``store`` as the reader of its kind: an open :class:`LabelStore` or :class:`RegionStore` as it
    is; a path by its ``format`` attribute (:func:`~dali_relabel.store.store_kind`); an ``s3://`` URL
    as a label-map store (fetched and checked by :class:`LabelStore`)."""
    if isinstance(store, (LabelStore, RegionStore)):
        return store
    if not is_remote(str(store)) and store_kind(store) == RegionStore.kind:
        return RegionStore(store)
    return LabelStore(store)


def geometric_ops(policy_text: str) -> list:
    """Names of the ops of augmentation policy ``policy_text`` that move pixels (rotate, shear,
    translate)."""
    from .augment.policies import parse_policy

    return sorted({op.name for op in parse_policy(policy_text).ops if op.geometry.active})


def check_region_settings(config: DataConfig, store: RegionStore, where: Optional[str] = None) -> None:
    """Refuse, naming the setting, what stored crop labels cannot follow (of ``store``: a
    :class:`~dali_relabel.store.RegionStore`, or anything with its ``regions`` such as a
    :class:`~dali_relabel.shards.ShardSet` of one, ``where`` naming it in messages).

    A stored label describes exactly its crop as stored (the window and the flip): an operation that
    moves pixels afterwards (a policy's rotate/shear/translate, a vertical flip) would show the model
    other content than the label's, and the labels are probabilities of a whole crop (no grid, no
    temperature, no map to pool a CutMix box from). FKD trains with the stored crop and flip alone;
    photometric ops (colour jitter, a policy without geometric ops, random erasing) and CutMix/Mixup
    with the ``"authors"`` area mix are allowed. Also refused: more crops per image than stored, and
    EXIF rotation (the boxes are in pixels of the image as stored, unrotated)."""
    where = where or f"region store {store.path}"
    if config.crops_per_image > store.regions:
        raise RegionSettingsError(f"crops_per_image {config.crops_per_image} asks for {config.crops_per_image} "
                                  f"distinct stored crops per image, but {where} holds {store.regions} per image")
    if config.auto_augment is not None:
        moving = geometric_ops(config.auto_augment)
        if moving:
            raise RegionSettingsError(
                f"auto_augment {config.auto_augment!r} has geometric ops ({', '.join(moving)}), which would move "
                f"the pixels of a stored crop away from its stored label ({where}); FKD trains with the stored "
                "crop and flip only: drop auto_augment, or use a policy without geometric ops")
    refused = []
    if config.vflip_probability > 0:
        refused.append(f"vflip_probability {config.vflip_probability} (a vertical flip moves the crop's pixels; "
                       "the stored flip is horizontal)")
    if tuple(config.output_size) != (1, 1):
        refused.append(f"output_size {tuple(config.output_size)} (a stored label is one [C] target per crop)")
    if config.temperature != 1.0:
        refused.append(f"temperature {config.temperature} (it softens pooled map logits; stored crops hold "
                       "probabilities)")
    if config.cutmix_probability > 0 and config.cutmix_mode == "localized":
        refused.append('cutmix_mode "localized" (it pools the pasted box from a label map; region targets mix '
                       'by area: cutmix_mode "authors")')
    if config.adjust_orientation:
        refused.append("adjust_orientation True (the stored boxes are in pixels of the image as stored, "
                       "without EXIF rotation, as FKD's PIL loader reads it)")
    if refused:
        raise RegionSettingsError(f"{where} cannot be trained with " + "; ".join(refused))


def region_targets(batch: dict, num_classes: int, label_type: str) -> dict:
    """``batch`` (flat: one crop per sample) with ``targets`` ``[B, num_classes]`` float32, the dense
    targets of its stored ``region_ids``/``region_values`` ``[B, k]`` per ``label_type``
    (:func:`~dali_relabel.store.dense_targets`), on their device, in place of them."""
    batch = dict(batch)
    ids, values = batch.pop(REGION_IDS.name), batch.pop(REGION_VALUES.name)
    batch[TARGETS.name] = dense_targets(ids, values, num_classes, label_type)
    return batch
