"""CAME (Confidence-guided Adaptive Memory Efficient Optimization) for JAX and Optax."""

from came_optax._alias import came, cast_to_param_dtype
from came_optax._came import ScaleByCameState, scale_by_came
from came_optax._cautious import cautious
from came_optax._checkpoint import (
    STATE_LAYOUT_VERSION,
    check_state,
    convert_momentum,
    state_layout_version,
    upgrade_state,
)
from came_optax._confidence import ConfidenceState, scale_by_confidence
from came_optax._factored import (
    FactoredSecondMomentState,
    factored_axes,
    scale_by_factored_second_moment,
)
from came_optax._leaves import Grouped
from came_optax._rounding import StochasticRoundingState, stochastic_round_to_param_dtype
from came_optax._sharding import state_shardings

# The package's release; a saved state's layout has its own number (STATE_LAYOUT_VERSION).
__version__ = "0.3.0"

__all__ = [
    "ConfidenceState",
    "FactoredSecondMomentState",
    "Grouped",
    "STATE_LAYOUT_VERSION",
    "ScaleByCameState",
    "StochasticRoundingState",
    "came",
    "cast_to_param_dtype",
    "cautious",
    "check_state",
    "convert_momentum",
    "factored_axes",
    "scale_by_came",
    "scale_by_confidence",
    "scale_by_factored_second_moment",
    "state_layout_version",
    "state_shardings",
    "stochastic_round_to_param_dtype",
    "upgrade_state",
]
