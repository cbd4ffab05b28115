"""Federated methods. Importing this package registers every method by name."""

from fedsqueeze.methods import (  # noqa: F401  (registration)
    compressors,
    decomfl,
    deltamask,
    fedavg,
    fedkseed,
    fedpm,
    fedsz,
    feedsign,
    head,
    peft,
)
from fedsqueeze.methods.base import METHODS, ClientOutput, Method, RoundContext, get_method, register_method
from fedsqueeze.plugins import METHOD_GROUP, load_group

__all__ = ["METHODS", "ClientOutput", "Method", "RoundContext", "get_method", "register_method"]

# third-party methods (entry point group "fedsqueeze.methods"), after the built-in ones so none is replaced
load_group(METHOD_GROUP, METHODS, Method, "name")
