"""Explicit, reproducible randomness.

Every random draw in fedsqueeze comes from a generator derived from
``(run seed, round, client, purpose)``, so the same seed gives the same result in every runtime
(local simulator, Flower simulation, Flower deployment) and no draw disturbs another.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import numpy as np
import torch

SERVER = -1  # the "client id" used for server-side draws


def seed_int(seed: int, round_: int, client: int, purpose: str) -> int:
    """A 63-bit integer seed derived from the run seed, round, client id and a purpose label."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, round_ + 1, client + 2, zlib.crc32(purpose.encode())])
    hi, lo = (int(v) for v in ss.generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def np_rng(seed: int, round_: int, client: int, purpose: str) -> np.random.Generator:
    """A numpy generator for one purpose."""
    return np.random.default_rng(seed_int(seed, round_, client, purpose))


def torch_gen(seed: int, round_: int, client: int, purpose: str) -> torch.Generator:
    """A CPU torch generator for one purpose."""
    g = torch.Generator()
    g.manual_seed(seed_int(seed, round_, client, purpose))
    return g


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG (CPU, and CUDA where initialised) seeded with ``seed``.

    For code that draws from the global generator and takes none of its own (``nn.Linear``'s
    initialisation, HF peft's tuners): the draws are reproducible, and the caller's global state
    is restored afterwards, so nothing else is disturbed.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield
