"""Checkpoints across versions and precisions: the state's layout, checked, upgraded, converted.

An optimizer state restored from a checkpoint is matched against the state that
``tx.init(params)`` would build, leaf by leaf and by name: NamedTuple fields by
field name, dict entries by key, sequence entries by position. A restored
state may be typed (restored into a target) or raw (orbax without a target
gives dicts for NamedTuples, lists for tuples and None for ``EmptyState``);
both match. Every mismatch is a ``ValueError`` that names the first leaf
that does not fit by its key path in the state (``state[0].v_row['w']``) with
the shape and dtype expected there.

The layouts of ``came()``'s state (:data:`STATE_LAYOUT_VERSION` is the current
one):

* **1** (came_optax 0.1.0): ``(FactoredRmsState(count, v_row, v_col, v),
  clip state, ConfidenceState(count, mu, r_row, r_col), (decay state,
  learning-rate state, cast state))``. ``mu`` has the parameters' structure;
  ``v_row``, ``v_col``, ``v``, ``r_row`` and ``r_col`` are tuples with one
  entry per parameter leaf in ``jax.tree.leaves`` order, None where the leaf
  keeps no such statistic. ``scale_by_factored_rms`` and
  ``scale_by_confidence`` alone had the same per-leaf tuples.
* **2** (since): ``(ScaleByCameState(count, mu, v_row, v_col, v, r_row,
  r_col, ...), decay state, learning-rate state, cast or rounding state)``.
  Every statistic is a tree with the parameters' structure (metadata boxes
  removed) holding a one-element placeholder where the leaf keeps no such
  statistic; :class:`FactoredSecondMomentState` and :class:`ConfidenceState`
  follow the same rule. Fields appended to these states later (``mu_scale``)
  are found by name like the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from came_optax import _checks, _confidence, _leaves, _quantize
from came_optax._came import ScaleByCameState
from came_optax._confidence import ConfidenceState
from came_optax._factored import FactoredSecondMomentState

#: The layout of the optimizer state that this version builds (see :func:`upgrade_state`).
STATE_LAYOUT_VERSION = 2

# Per-parameter statistics: per-leaf tuples in layout 1, trees like the parameters since.
_STATS = ("v_row", "v_col", "v", "r_row", "r_col")
_STAGE_STATES = (ScaleByCameState, FactoredSecondMomentState, ConfidenceState)
_MOMENTUM_STATES = (ScaleByCameState, ConfidenceState)
# Their hyperparameters gain an entry with each new numeric argument of the wrapped optimizer.
_INJECTED_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
# The field sets of layout 1's two stages in came().
_V1_SECOND_MOMENT = {"count", "v_row", "v_col", "v"}
_V1_CONFIDENCE = {"count", "mu", "r_row", "r_col"}


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and not _is_namedtuple(x)


def _is_array(x: Any) -> bool:
    """Arrays, ``ShapeDtypeStruct``s, and array metadata such as orbax's; not metadata boxes."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return False
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


def _name(key: Any) -> Any:
    """A key entry as a name that a raw (orbax-restored) container uses too."""
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return key.idx
    return getattr(key, "key", key)


def _children(x: Any) -> dict[Any, tuple[Any, Any]] | None:
    """``{name: (key entry, child)}`` of a container, or None for an array or other leaf."""
    if x is None:
        return {}
    if _is_array(x):
        return None
    if _is_namedtuple(x):
        return {f: (GetAttrKey(f), v) for f, v in zip(x._fields, x, strict=True)}
    flat, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if len(flat) == 1 and flat[0][0] == ():
        return None
    return {_name(path[0]): (path[0], child) for path, child in flat}


def _kind(x: Any) -> str:
    if x is None:
        return "nothing"
    if _is_array(x):
        return f"an array of shape {tuple(x.shape)} and dtype {jnp.dtype(x.dtype)}"
    children = _children(x)
    if children is None:
        return f"a {type(x).__name__}"
    return f"a {type(x).__name__} with entries {sorted(map(str, children))}"


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = _children(tree)[_name(key)][1]
    return tree


@dataclasses.dataclass
class _Match:
    """Matches a checkpoint's tree against ``tx``'s state for ``params``."""

    who: str
    tx: Any
    params: Any
    upgrade: bool

    def error(self, path: tuple[Any, ...], message: str) -> ValueError:
        return ValueError(f"{self.who}: state{jax.tree_util.keystr(path)} {message}")

    def fresh(self, path: tuple[Any, ...]) -> Any:
        """The entry at ``path`` of ``tx.init(params)``, computed alone."""
        params = self.params
        if not all(isinstance(x, (jax.Array, np.ndarray)) for x in jax.tree.leaves(params)):
            params = jax.tree.map(lambda s: jnp.zeros(jnp.shape(s), jnp.result_type(s)), params)
        return jax.jit(lambda p: _at(self.tx.init(p), path))(params)

    def leaf(self, target: Any, source: Any, path: tuple[Any, ...], stat: bool) -> Any:
        if source is None and self.upgrade and stat and tuple(target.shape) == (1,):
            return _leaves.placeholder(target.dtype)  # layout 1's None for an unused statistic
        expected = f"shape {tuple(target.shape)} and dtype {jnp.dtype(target.dtype)}"
        if not _is_array(source):
            raise self.error(path, f"should be an array of {expected}; found {_kind(source)}.")
        if tuple(source.shape) != tuple(target.shape) or jnp.dtype(source.dtype) != jnp.dtype(
            target.dtype
        ):
            hint = ""
            if tuple(source.shape) == tuple(target.shape) and "mu" in map(_name, path):
                hint = " Change the momentum's dtype with came_optax.convert_momentum."
            raise self.error(
                path,
                f"should have {expected}; the checkpoint has shape {tuple(source.shape)} and "
                f"dtype {jnp.dtype(source.dtype)}.{hint}",
            )
        if not self.upgrade or isinstance(source, jax.Array):
            return source
        return jnp.asarray(source)

    def per_leaf(self, target: Any, source: Any, path: tuple[Any, ...]) -> Any:
        """Layout 1's per-leaf tuple of a statistic as a tree like the parameters (or grouped)."""
        if isinstance(target, _leaves.Grouped):
            return _leaves.group(self.per_leaf(target.ungrouped(), source, path), target.members)
        flat, treedef = jax.tree_util.tree_flatten_with_path(target)
        if len(source) != len(flat):
            raise self.error(
                path,
                f"holds {len(source)} per-leaf entries (the 0.1.0 layout), but the parameters "
                f"have {len(flat)} leaves.",
            )
        leaves = [self.leaf(t, s, path + p, True) for (p, t), s in zip(flat, source, strict=True)]
        return jax.tree.unflatten(treedef, leaves)

    def regroup(self, target: Any, source: Any, path: tuple[Any, ...], stat, fill) -> Any:
        """``source`` in the per-leaf layout where ``target`` is grouped, or the other way."""
        grouped = isinstance(target, _leaves.Grouped)
        if not self.upgrade:
            layouts = ("per-leaf", "grouped") if grouped else ("grouped", "per-leaf")
            raise self.error(
                path,
                f"is kept {layouts[0]} in the checkpoint but {layouts[1]} by tx (group_leaves="
                f"{grouped}); convert the state with came_optax.upgrade_state(state, tx, params).",
            )
        if grouped:
            matched = self(target.ungrouped(), source, path, stat, fill)
            return _leaves.group(matched, target.members)
        if not isinstance(source, _leaves.Grouped):
            raise self.error(
                path,
                "holds grouped statistics restored without their types, which do not say which "
                "leaves each group holds: restore the checkpoint into the state of the optimizer "
                "that saved it (group_leaves=True), then convert it with upgrade_state.",
            )
        return self(target, source.ungrouped(), path, stat, fill)

    def merge_v1_chain(self, target: Any, source: Any, path: tuple[Any, ...]) -> Any:
        """Layout 1's ``came()`` chain as layout 2's, or ``source`` unchanged."""
        if not (
            len(target) == 4
            and isinstance(target[0], ScaleByCameState)
            and _is_sequence(source)
            and len(source) == 4
        ):
            return source
        second, clip, confidence, tail = (_children(s) for s in source)
        if (
            second is None
            or confidence is None
            or set(second) != _V1_SECOND_MOMENT
            or set(confidence) != _V1_CONFIDENCE
            or not _is_sequence(source[3])
            or len(source[3]) != 3
        ):
            return source
        if clip:
            raise self.error(path + (SequenceKey(1),), "(the 0.1.0 clip state) should be empty.")
        counts = [np.asarray(s["count"][1]) for s in (second, confidence)]
        if not np.array_equal(*counts):
            raise self.error(
                path, f"holds 0.1.0 stages with different step counts {counts[0]}, {counts[1]}."
            )
        stats = {k: v for stage in (second, confidence) for k, (_, v) in stage.items()}
        merged = {f: stats[f] for f in ("count", "mu", *_STATS)}
        return [merged, *source[3]]

    def __call__(
        self, target: Any, source: Any, path: tuple[Any, ...] = (), stat=False, fill=False
    ) -> Any:
        """``source`` rebuilt in ``target``'s structure; ``stat``: inside a statistic's tree
        (where layout 1 has None for a placeholder); ``fill``: missing entries take
        ``tx.init``'s values."""
        if isinstance(target, _leaves.Grouped) != _is_grouped(source):
            return self.regroup(target, source, path, stat, fill)
        targets = _children(target)
        if targets is None:
            return self.leaf(target, source, path, stat)
        if self.upgrade and _is_sequence(target):
            source = self.merge_v1_chain(target, source, path)
        sources = _children(source)
        if sources is None:
            raise self.error(path, f"should be {_kind(target)}; found {_kind(source)}.")
        extra = [n for n in sources if n not in targets]
        if extra:
            key = sources[extra[0]][0]
            raise self.error(path + (key,), "is in the checkpoint but not in the state.")
        missing = [n for n in targets if n not in sources]
        if missing and not (self.upgrade and (fill or _appended(target, sources, missing))):
            raise self.error(path + (targets[missing[0]][0],), "is missing from the checkpoint.")
        stage = isinstance(target, _STAGE_STATES)
        injected = isinstance(target, _INJECTED_STATES)
        values = []
        for name, (key, child) in targets.items():
            here = path + (key,)
            if name not in sources:
                values.append(self.fresh(here))
                continue
            value = sources[name][1]
            if stage and name in _STATS and self.upgrade and _is_sequence(value):
                if not _is_sequence(child):
                    values.append(self.per_leaf(child, value, here))
                    continue
            grows = injected and name in ("hyperparams", "hyperparams_states")
            values.append(self(child, value, here, stat or (stage and name in _STATS), grows))
        if not self.upgrade:
            return None
        treedef = jax.tree.structure(target, is_leaf=lambda y: y is not target)
        return jax.tree.unflatten(treedef, values)


def _is_grouped(x: Any) -> bool:
    """A grouped statistic, typed or restored raw (a mapping holding only its stacks)."""
    if isinstance(x, _leaves.Grouped):
        return True
    return isinstance(x, dict) and set(map(str, x)) == {"stacks"}


def _appended(target: Any, sources: dict, missing: list) -> bool:
    """Whether the missing entries are the last fields of a NamedTuple (added since a save)."""
    if not _is_namedtuple(target) or not sources:
        return False
    return missing == list(target._fields[len(target._fields) - len(missing) :])


def _layout_version(state: Any) -> int | None:
    """1 or 2 for a state holding CAME statistics (typed or raw), else None."""
    versions = set()

    def visit(x: Any) -> None:
        children = _children(x)
        if not children:
            return
        names = set(children)
        if _V1_SECOND_MOMENT <= names or _V1_CONFIDENCE <= names:
            values = {n: v for n, (_, v) in children.items()}
            mu_is_sequence = _is_sequence(values.get("mu", ()))
            v1 = any(
                _is_sequence(values[f])
                and (any(e is None for e in values[f]) or not mu_is_sequence)
                for f in _STATS
                if f in values
            )
            versions.add(1 if v1 else 2)
        for _, child in children.values():
            visit(child)

    visit(state)
    return min(versions) if versions else None


def state_layout_version(state: Any) -> int:
    """The layout of the CAME statistics in ``state``: 1 (came_optax 0.1.0) or 2 (current).

    Layout 1 kept each statistic as a tuple with one entry per parameter leaf,
    None where unused; layout 2 keeps trees with the parameters' structure (see
    :func:`upgrade_state` for both). The layout is read from the structure, so
    this works on a typed state, on a tree restored without a target
    (``ocp.StandardCheckpointer().restore(path)``) and on the checkpoint's
    metadata tree. A state of layout 1 is recognised by a None among a
    statistic's entries or a statistic that is a tuple where the momentum is
    not; with every leaf factored and the parameters themselves a flat
    tuple, the two layouts hold the same arrays in the same places.

    Args:
      state: an optimizer state containing the state of :func:`came`,
        :func:`scale_by_came`, :func:`scale_by_factored_second_moment` or
        :func:`scale_by_confidence` (possibly inside wrappers such as
        ``optax.inject_hyperparams``).

    Returns:
      1 if any CAME statistic is in layout 1, else :data:`STATE_LAYOUT_VERSION`.

    Raises:
      ValueError: if ``state`` holds no CAME state.

    Example:
      >>> import jax.numpy as jnp, came_optax
      >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
      >>> came_optax.state_layout_version(came_optax.came(1e-3).init(params))
      2
    """
    version = _layout_version(state)
    if version is None:
        raise ValueError(
            "state_layout_version: state holds no CAME state (no entries named count, v_row, "
            "v_col and v, or count, mu, r_row and r_col)."
        )
    return version


def check_state(state: Any, tx: optax.GradientTransformation, params: Any) -> None:
    """Raises ValueError unless ``state`` fits ``tx``'s state for ``params`` leaf by leaf.

    ``state`` is compared with ``jax.eval_shape(tx.init, params)``: the same
    entries by name (NamedTuple fields, dict keys; a raw restored dict may
    stand for a NamedTuple and a list for a tuple), and at every leaf the same
    shape and dtype. Nothing is allocated. Call it on a restored state, or on
    an orbax checkpoint's metadata tree before restoring, so that a
    checkpoint of another model, other factoring options or another
    ``mu_dtype`` is refused with the leaf that differs instead of restored into
    the wrong place.

    Args:
      state: the state to check: arrays, ``ShapeDtypeStruct``\\ s or any
        leaves with ``shape`` and ``dtype`` (orbax's array metadata).
      tx: the optimizer that will use the state.
      params: the parameters (or their ``ShapeDtypeStruct``\\ s) as passed to
        ``tx.init``.

    Raises:
      ValueError: naming the first leaf, by key path in the state, that is
        missing, extra, or of another shape or dtype, with what was expected
        there; for a state in the 0.1.0 layout, saying to use
        :func:`upgrade_state`.

    Example:
      >>> import jax.numpy as jnp, came_optax
      >>> tx = came_optax.came(1e-3)
      >>> state = tx.init({'w': jnp.ones((3, 2))})
      >>> came_optax.check_state(state, tx, {'w': jnp.ones((3, 2))})
      >>> try:
      ...     came_optax.check_state(state, tx, {'w': jnp.ones((3, 4))})
      ... except ValueError as e:
      ...     print(str(e).split(';')[0])
      check_state: state[0].mu['w'] should have shape (3, 4) and dtype float32
    """
    if _layout_version(state) == 1:
        raise ValueError(
            "check_state: state holds CAME statistics in the 0.1.0 layout (per-leaf tuples); "
            "convert it with came_optax.upgrade_state(state, tx, params)."
        )
    _Match("check_state", tx, params, upgrade=False)(jax.eval_shape(tx.init, params), state)


def upgrade_state(state: Any, tx: optax.GradientTransformation, params: Any) -> Any:
    """``state``, saved by came_optax 0.1.0 or later, as ``tx``'s current state for ``params``.

    The result has the structure and types of ``tx.init(params)`` and holds the
    arrays of ``state``: a step can continue from it exactly where the run that
    saved it stopped. ``state`` may be typed, or raw as orbax restores it
    without a target (which a 0.1.0 checkpoint needs, its types being gone).

    What is converted (see the module's description of the layouts):

    * a 0.1.0 ``came()`` chain ``(FactoredRmsState, clip state,
      ConfidenceState, (decay, learning rate, cast))`` becomes
      ``(ScaleByCameState, decay, learning rate, cast)``; the two stages'
      counts must agree;
    * each 0.1.0 per-leaf tuple of a statistic (``v_row``, ``v_col``, ``v``,
      ``r_row``, ``r_col``) becomes a tree with the parameters' structure, its
      i-th entry going to the i-th leaf of ``jax.tree.leaves(params)`` and a
      None to a one-element zero placeholder;
    * fields appended to a state since it was saved (``mu_scale``), and
      hyperparameters that ``optax.inject_hyperparams`` gained with new
      arguments of :func:`came`, take the values of ``tx.init(params)``.

    Everything else is matched by name and checked as in :func:`check_state`:
    a state of layout 2 comes back unchanged. A 0.1.0 tuple entry is assigned
    by its position, which is all that layout records, and its shape is
    checked against its parameter's, so a state saved for other parameters or
    with other factoring options is refused.

    Args:
      state: the restored optimizer state.
      tx: the optimizer that continues the run, with the hyperparameters and
        ``mu_dtype`` the state was saved with (change the momentum's dtype
        afterwards with :func:`convert_momentum`).
      params: the parameters (or their ``ShapeDtypeStruct``\\ s) as passed to
        ``tx.init``.

    Returns:
      The state in the current layout; its arrays are those of ``state``,
      placed where they are (``jax.device_put`` it with
      :func:`state_shardings` to shard it).

    Raises:
      ValueError: naming the first leaf that is missing, extra, or of another
        shape or dtype than ``tx.init(params)`` has there.

    Example:
      >>> import jax.numpy as jnp, came_optax
      >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
      >>> tx = came_optax.came(1e-3)
      >>> old = {'count': 0, 'v_row': [None, jnp.ones(3)], 'v_col': [None, jnp.ones(2)],
      ...        'v': [jnp.ones(2), None]}     # a 0.1.0 FactoredRmsState, restored raw
      >>> old = [old, None, {'count': 0, 'mu': params, 'r_row': [None, jnp.ones(3)],
      ...                    'r_col': [None, jnp.ones(2)]}, [None, None, None]]
      >>> old[0]['count'] = old[2]['count'] = jnp.asarray(0, jnp.int32)
      >>> state = came_optax.upgrade_state(old, tx, params)
      >>> state[0].v_row['w'].shape, state[0].v['b'].shape, state[0].v_row['b'].shape
      ((3,), (2,), (1,))
    """
    return _Match("upgrade_state", tx, params, upgrade=True)(jax.eval_shape(tx.init, params), state)


def convert_momentum(state: Any, mu_dtype: Any, batch_dims: Any = None) -> Any:
    r"""``state`` with CAME's momentum stored in ``mu_dtype``: switch precision at a checkpoint.

    Every momentum of a :class:`ScaleByCameState` or :class:`ConfidenceState`
    in ``state`` is read in float32 (complex64 for complex parameters;
    dequantized if it is int8) and stored as ``tx.init`` with that
    ``mu_dtype`` would store it: cast to a float dtype (round to nearest),
    or, for ``'int8'``, blockwise quantized with its float32 scales in
    ``mu_scale`` where the leaf is large enough and float32 elsewhere (see
    :func:`scale_by_confidence`). Everything else is returned as it is. The
    result fits ``came(..., mu_dtype=mu_dtype)``'s state (check it with
    :func:`check_state`).

    Going to a wider dtype is exact: float32 to bfloat16 to float32 gives the
    float32 momentum rounded to bfloat16 once, and bfloat16 to float32 to
    bfloat16 gives back the same bits; int8 to float32 to int8 gives back the
    same int8 values, and scales within one float32 ulp (a scale is recomputed
    as :math:`\max|q\,s| / 127`). A run that switches its momentum from
    bfloat16 or int8 to float32 at a checkpoint takes the same next step as
    the run that keeps it, since that step computes in float32 from the same
    momentum.

    Args:
      state: an optimizer state (typed, as restored into a target or returned
        by :func:`upgrade_state`).
      mu_dtype: a floating or complex dtype, ``'int8'``, or None for float32
        (complex64 for complex momenta).
      batch_dims: the optimizer's ``batch_dims`` (an int, a tree of ints like
        the parameters, or a callable of them), which decides the int8 blocks;
        a state kept with ``group_leaves=True`` stays grouped.

    Returns:
      The converted state, with the same structure.

    Raises:
      ValueError: if ``state`` holds no CAME momentum, if ``mu_dtype`` is not
        a floating, complex or int8 dtype, or if it cannot hold a leaf's
        momentum (a real dtype for a complex one); the leaf is named.

    Example:
      >>> import jax.numpy as jnp, came_optax
      >>> state = came_optax.came(1e-3).init({'w': jnp.ones((3, 2))})
      >>> came_optax.convert_momentum(state, 'bfloat16')[0].mu['w'].dtype
      dtype(bfloat16)
    """
    who = "convert_momentum"
    mu_dtype = _checks.resolve_dtype("mu_dtype", mu_dtype, _confidence.QUANTIZED)
    found = False

    def convert(node: Any) -> Any:
        nonlocal found
        if not isinstance(node, _MOMENTUM_STATES):
            return node
        found = True
        grouped = isinstance(node.mu, _leaves.Grouped)
        mu_tree, scale_tree = node.mu, node.mu_scale
        if grouped:
            mu_tree, scale_tree = mu_tree.ungrouped(), scale_tree.ungrouped()
        flat, treedef = jax.tree_util.tree_flatten_with_path(mu_tree)
        dims = _leaves.batch_dims_of(batch_dims, mu_tree, who)
        mus, new_scales = [], []
        for (path, mu), scale, b in zip(flat, jax.tree.leaves(scale_tree), dims, strict=True):
            m = _confidence.load_momentum(mu, scale, _leaves.compute_dtype(mu.dtype))
            dtype = _confidence.momentum_dtype(m, mu_dtype, path, who, b)
            if dtype.name in _confidence.QUANTIZED:
                q, scale = _quantize.quantize(m, _quantize.block_shape(m.shape, b))
            else:
                q, scale = m.astype(dtype), _leaves.placeholder()
            mus.append(q)
            new_scales.append(scale)
        mu, mu_scale = jax.tree.unflatten(treedef, mus), _leaves.like(scale_tree, new_scales)
        if grouped:
            mu, mu_scale = (_leaves.group(t, node.mu.members) for t in (mu, mu_scale))
        return node._replace(mu=mu, mu_scale=mu_scale)

    converted = jax.tree.map(convert, state, is_leaf=lambda x: isinstance(x, _MOMENTUM_STATES))
    if not found:
        raise ValueError(
            f"{who}: state holds no ScaleByCameState or ConfidenceState; restore it into its "
            "typed target (or pass it through came_optax.upgrade_state) first."
        )
    return converted
