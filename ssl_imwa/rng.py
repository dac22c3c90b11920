"""The process's global random number generators: seeded once per run, saved and restored with checkpoints."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Global RNG states; on a GPU only this process's own (reading every GPU's would create a
    CUDA context on each of them from every process)."""
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state_as_plain_data(np.random.get_state()),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain_data(state["numpy"]))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def numpy_state_as_plain_data(state: tuple[Any, ...]) -> dict[str, Any]:
    """NumPy's legacy MT19937 state with its key array as a tensor: a checkpoint holds only what
    torch's weights-only unpickler accepts (ssl_imwa.checkpoint), and an ndarray is not that."""
    name, keys, position, has_gauss, cached_gaussian = state
    return {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_state_from_plain_data(state: dict[str, Any]) -> tuple[Any, ...]:
    return (state["bit_generator"], state["keys"].numpy().astype(np.uint32), state["position"], state["has_gauss"],
            state["cached_gaussian"])
