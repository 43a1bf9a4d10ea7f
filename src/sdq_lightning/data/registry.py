"""The dataset registry: a name -> LightningDataModule class map used by the app's datamodule builder.

Adding a dataset is one module plus one registration::

    from sdq_lightning.data import register_dataset

    @register_dataset("toy")
    class ToyDataModule(lightning.LightningDataModule):
        def __init__(self, batch_size: int = 32, num_classes: int = 10, in_chans: int = 1, image_size: int = 8): ...

and it is selected with ``dataset.name=toy`` (a config file ``conf/dataset/toy.yaml`` holding ``name: toy`` and
the defaults of its arguments makes ``dataset=toy`` work). A dataset defined outside this package is imported
first when the config names its module: ``dataset.module=mypkg.toy``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

__all__ = ["DATASETS", "dataset_class", "register_dataset", "registered_datasets"]

DATASETS: dict[str, type[pl.LightningDataModule]] = {}


def register_dataset(name: str, cls: type | None = None, *, replace: bool = False) -> Any:
    """Register ``cls`` under ``name`` (use as ``@register_dataset("name")`` or ``register_dataset("name", cls)``).

    The class must be a ``LightningDataModule`` whose keyword arguments are the dataset config's keys; it should
    expose ``num_classes`` and ``in_chans`` (the model is built with them when the config leaves them null).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"dataset name must be an identifier like 'toy', got {name!r}")

    def add(klass: type) -> type:
        if not (isinstance(klass, type) and issubclass(klass, pl.LightningDataModule)):
            raise TypeError(f"register_dataset('{name}'): expected a LightningDataModule subclass, got {klass!r}")
        if name in DATASETS and DATASETS[name] is not klass and not replace:
            raise ValueError(f"dataset '{name}' is already registered ({DATASETS[name].__qualname__}); "
                             "pass replace=True to replace it")
        DATASETS[name] = klass
        return klass

    return add(cls) if cls is not None else add


def registered_datasets() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(DATASETS)


def dataset_class(name: str, module: str | None = None) -> type[pl.LightningDataModule]:
    """The class registered as ``name`` (importing ``module`` first, when given, so that it can register)."""
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"dataset.module={module!r} cannot be imported ({err})") from None
    if name not in DATASETS:
        raise ValueError(f"unknown dataset.name={name!r}; registered: {', '.join(registered_datasets())} "
                         "(add one with sdq_lightning.data.register_dataset, see docs/extending.md)")
    return DATASETS[name]


def _builder(cfg_dataset: dict[str, Any]) -> tuple[Callable[..., pl.LightningDataModule], dict[str, Any]]:
    """The class and keyword arguments of a dataset config (``name`` + ``module``, or a ``_target_`` path)."""
    kwargs = dict(cfg_dataset)
    target = kwargs.pop("_target_", None)
    name, module = kwargs.pop("name", None), kwargs.pop("module", None)
    if name is not None:
        return dataset_class(str(name), module), kwargs
    if target is None:
        raise ValueError("the dataset config names no dataset: set dataset.name=<registered name> "
                         f"(registered: {', '.join(registered_datasets())}) or dataset._target_=<class path>")
    from hydra.utils import get_class

    return get_class(str(target)), kwargs
