"""Algorithm plugins. Importing this package registers the built-in algorithms."""
from algorithms import acr, daso, fixmatch, supervised  # noqa: F401  (built-ins register themselves)
from algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    forward_concat,
    mean_of_states,
    resolve_steps,
)
from algorithms.registry import (
    get_algorithm,
    list_algorithms,
    load_plugins,
    register_algorithm,
)

__all__ = [
    "Algorithm", "AlgorithmConfig", "forward_concat", "get_algorithm", "list_algorithms", "load_plugins",
    "mean_of_states", "register_algorithm", "resolve_steps",
]
