"""Distillation methods: each a small ``nn.Module`` registered with its paper and defaults.

Importing this package registers every method; use :func:`list_methods`, :func:`method_info`
and :func:`create_method` to browse and build them.
"""

from distill.methods import base
from distill.methods.base import (
    Method,
    MethodInfo,
    Paper,
    create_method,
    list_methods,
    method_info,
    register,
)
from distill.methods import features, logits, relations  # noqa: E402  (importing registers the methods)
from distill.methods.features import AT, FitNet
from distill.methods.relations import CC, FSP, ICKD, NST, PKT, RKD, SP
from distill.methods.logits import CTKD, DIST, DKD, KD, SKD, CrossEntropy, LabelSmoothing, LogitRegression, NoisyTeacher

__all__ = [
    "base",
    "logits",
    "features",
    "relations",
    "Method",
    "MethodInfo",
    "Paper",
    "register",
    "list_methods",
    "method_info",
    "create_method",
    "CrossEntropy",
    "LabelSmoothing",
    "KD",
    "LogitRegression",
    "NoisyTeacher",
    "DKD",
    "DIST",
    "SKD",
    "CTKD",
    "FitNet",
    "AT",
    "SP",
    "RKD",
    "PKT",
    "CC",
    "NST",
    "FSP",
    "ICKD",
]
