"""CAME (Confidence-guided Adaptive Memory Efficient Optimization) for JAX and Optax."""

from came_optax._alias import came, cast_to_param_dtype
from came_optax._confidence import ConfidenceState, scale_by_confidence
from came_optax._factored import FactoredRmsState, factored_axes, scale_by_factored_rms
from came_optax._sharding import state_shardings

__version__ = "0.1.0"

__all__ = [
    "ConfidenceState",
    "FactoredRmsState",
    "came",
    "cast_to_param_dtype",
    "factored_axes",
    "scale_by_confidence",
    "scale_by_factored_rms",
    "state_shardings",
]
