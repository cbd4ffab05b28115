"""Federated methods. Importing this package registers every method by name."""

from fedsqueeze.methods import (  # noqa: F401  (registration)
    compressors,
    decomfl,
    deltamask,
    fedavg,
    fedpm,
    fedsz,
    head,
    peft,
)
from fedsqueeze.methods.base import METHODS, ClientOutput, Method, RoundContext, get_method, register_method

__all__ = ["METHODS", "ClientOutput", "Method", "RoundContext", "get_method", "register_method"]
