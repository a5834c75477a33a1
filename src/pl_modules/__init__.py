"""Methods by name. Adding a method: one module, one entry in the tuple below, a YAML and a test."""

from __future__ import annotations

from src.pl_modules.base import SemiSupervisedModule
from src.pl_modules.c3semiseg import C3SemiSeg
from src.pl_modules.cps import CPS
from src.pl_modules.fixmatch import FixMatch
from src.pl_modules.mean_teacher import ClassMix, CutMix, CutOut, MeanTeacher
from src.pl_modules.reco import ReCo
from src.pl_modules.recon import Recon
from src.pl_modules.supervised import Supervised
from src.pl_modules.unimatch import UniMatch
from src.pl_modules.unimatch_v2 import UniMatchV2

METHOD_CLASSES: tuple[type[SemiSupervisedModule], ...] = (
    Supervised,
    MeanTeacher,
    CutOut,
    CutMix,
    ClassMix,
    ReCo,
    FixMatch,
    UniMatch,
    UniMatchV2,
    Recon,
    C3SemiSeg,
    CPS,
)


def _registry(classes: tuple[type[SemiSupervisedModule], ...]) -> dict[str, type[SemiSupervisedModule]]:
    registry: dict[str, type[SemiSupervisedModule]] = {}
    for cls in classes:
        if cls.name in registry:
            raise ValueError(f"method name {cls.name!r} is used by both {registry[cls.name].__name__} and {cls.__name__}")
        registry[cls.name] = cls
    return registry


METHODS = _registry(METHOD_CLASSES)


def get_method(name: str) -> type[SemiSupervisedModule]:
    """The LightningModule class of method ``name``; a bad name lists the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "C3SemiSeg",
    "CPS",
    "ClassMix",
    "CutMix",
    "CutOut",
    "FixMatch",
    "MeanTeacher",
    "ReCo",
    "Recon",
    "SemiSupervisedModule",
    "Supervised",
    "UniMatch",
    "UniMatchV2",
    "get_method",
]
