"""Shardings of an optimizer state, derived from the parameters' shardings.

CAME keeps, for a parameter of shape ``(..., n, m)``, a momentum of the same
shape and row and column statistics of shapes ``(..., n)`` and ``(..., m)``.
Each statistic is sharded like its parameter with the averaged axis removed:
a kernel sharded ``P('data', 'model')`` has a momentum sharded
``P('data', 'model')``, a row statistic sharded ``P('data')`` and a column
statistic sharded ``P('model')``. ``jax.jit(tx.init)`` already places the state
that way; :func:`state_shardings` states it ahead of time, for
``jax.jit(..., out_shardings=...)``, for buffer donation and for checkpoint
restoration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec, Sharding

from came_optax import _checks

ShardingOrSpec = Sharding | PartitionSpec | None


def _is_sharding_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (Sharding, PartitionSpec))


def _param_spec(path: jax.tree_util.KeyPath, leaf: Any, given: ShardingOrSpec) -> PartitionSpec:
    """The parameter's PartitionSpec, validated against its rank."""
    ndim = len(jnp.shape(leaf))
    if given is None:
        return PartitionSpec()
    if isinstance(given, NamedSharding):
        spec = given.spec
    elif isinstance(given, PartitionSpec):
        spec = given
    elif given.is_fully_replicated:
        return PartitionSpec()
    else:
        raise ValueError(
            f"state_shardings: the sharding of {_checks.leaf_name(path)} is a "
            f"{type(given).__name__}; pass a jax.sharding.NamedSharding or a PartitionSpec."
        )
    if len(spec) > ndim:
        raise ValueError(
            f"state_shardings: {_checks.leaf_name(path)} has rank {ndim} but its partition spec "
            f"{spec} has {len(spec)} entries."
        )
    if any(entry is PartitionSpec.UNCONSTRAINED for entry in spec):
        raise ValueError(
            f"state_shardings: {_checks.leaf_name(path)} has an UNCONSTRAINED partition spec "
            f"{spec}; give every axis a mesh axis or None."
        )
    return spec


def _axis_names(spec: PartitionSpec) -> list[str]:
    names = []
    for entry in spec:
        if entry is None:
            continue
        names.extend(entry if isinstance(entry, tuple) else (entry,))
    return names


def _divisible(spec: PartitionSpec, shape: tuple[int, ...], mesh: Any) -> PartitionSpec:
    """``spec`` without the mesh axes that do not divide the dimension they split.

    The state's own leaves can be smaller than the parameter along a sharded axis (an int8
    momentum's block scales: ``768 / 256 = 3`` columns of scales cannot split 8 ways); such a
    dimension is replicated.
    """
    sizes = dict(mesh.shape)
    entries = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        split = math.prod(sizes[name] for name in _axis_names(PartitionSpec(entry)))
        entries.append(entry if dim % split == 0 else None)
    return PartitionSpec(*entries)


def _output_kind(
    given: list[ShardingOrSpec],
) -> Callable[[PartitionSpec, tuple[int, ...]], ShardingOrSpec]:
    """Turns a state leaf's spec and shape into the kind of object the parameters came with.

    With NamedShardings the mesh sizes are known, and a mesh axis that does not divide
    the leaf's dimension is dropped (:func:`_divisible`); PartitionSpecs pass as they are.
    """
    named = [s for s in given if isinstance(s, NamedSharding)]
    if named:
        mesh = named[0].mesh
        if any(s.mesh != mesh for s in named):
            raise ValueError(
                "state_shardings: the parameters' NamedShardings use different meshes; "
                "an optimizer state lives on one mesh."
            )
        kinds = {s.memory_kind for s in named}
        memory_kind = kinds.pop() if len(kinds) == 1 else None
        return lambda spec, shape: NamedSharding(
            mesh, _divisible(spec, shape, mesh), memory_kind=memory_kind
        )
    other = [s for s in given if isinstance(s, Sharding)]
    if other:
        # Only fully replicated (for example single-device) shardings get here.
        return lambda spec, shape: other[0]
    return lambda spec, shape: spec


def state_shardings(
    tx: optax.GradientTransformation | Callable[[optax.Params], optax.OptState],
    params: optax.Params,
    shardings: Any = None,
) -> Any:
    r"""Shardings (or PartitionSpecs) of ``tx``'s state, derived from the parameters'.

    The parameters' partition specs are propagated through ``tx.init`` abstractly
    (under ``jax.eval_shape`` with explicit sharding types; nothing is allocated
    or compiled), so the result is what ``jax.jit(tx.init)`` produces, for
    :func:`came` and for any chain of CAME's and optax's transformations:

    * a statistic with the parameter's shape (CAME's momentum ``mu``, Adam's
      ``mu`` and ``nu``, full second moments of vectors) gets the parameter's
      spec;
    * a row or column statistic of a factored parameter with spec
      :math:`(s_0, \dots, s_{k-1})` that averages over axis :math:`j` gets
      :math:`(s_0, \dots, s_{j-1}, s_{j+1}, \dots, s_{k-1})`: it stays sharded
      wherever the parameter is, and a mesh axis on the averaged axis is dropped
      (the mean is all-reduced over it);
    * step counts, injected hyperparameters and other leaves not derived from a
      parameter are replicated (``P()``);
    * with ``NamedSharding``\ s (known mesh sizes), a mesh axis that does not
      divide the state leaf's dimension it would split is dropped from that
      dimension, which is then replicated: an int8 momentum's block scales of a
      ``(50257, 768)`` parameter are ``(50257, 3)``, which 8 devices cannot
      split along the columns.

    Args:
      tx: an optax ``GradientTransformation`` (or any object with ``init``), or
        an init function.
      params: the parameters, or their ``jax.ShapeDtypeStruct``\ s, as they are
        passed to ``tx.init`` (for a linen ``TrainState``, unboxed with
        ``nn.meta.unbox``); only shapes and dtypes are read unless
        ``shardings`` is None. May contain ``nnx.Variable``\ s.
      shardings: the parameters' shardings, a pytree with one leaf per leaf of
        ``params`` (in ``jax.tree.leaves`` order): ``jax.sharding.NamedSharding``\ s
        on one mesh, ``PartitionSpec``\ s (of mesh axes or of logical axis
        names), or None for a replicated parameter. None reads
        ``leaf.sharding`` from each leaf of ``params`` (``jax.Array``\ s, or
        ``ShapeDtypeStruct``\ s built with ``sharding=``).

    Returns:
      A pytree with the structure of ``tx.init(params)`` whose array leaves are
      replaced by ``NamedSharding``\ s on the parameters' mesh when any
      parameter's sharding is a ``NamedSharding``, else by ``PartitionSpec``\ s.
      Use it as ``out_shardings`` of ``jax.jit(tx.init)``, as the optimizer
      state's entry of a train step's ``in_shardings`` and ``out_shardings``
      (which lets ``donate_argnums`` reuse the state's buffers), or, for
      PartitionSpecs of logical axis names, with
      ``flax.linen.logical_to_mesh_sharding``.

    Raises:
      ValueError: if ``shardings`` does not have one leaf per parameter, if a
        spec is longer than its parameter's rank or UNCONSTRAINED, if the
        NamedShardings use different meshes, or if ``tx.init`` does something
        the propagation cannot type.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import came_optax
      >>> params = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros(4)}
      >>> specs = {'w': P('data', 'model'), 'b': P('model')}
      >>> tx = came_optax.came(learning_rate=1e-3)
      >>> state_specs = came_optax.state_shardings(tx, params, specs)
      >>> state_specs[0].v_row['w'], state_specs[0].v_col['w']   # row and column statistics
      (P('data',), P('model',))
      >>> state_specs[0].mu['w']                                 # momentum
      P('data', 'model')

      With a mesh, pass arrays placed by ``NamedSharding`` and get
      ``NamedSharding``\ s back::

        shardings = came_optax.state_shardings(tx, params)
        opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
        step = jax.jit(train_step, donate_argnums=(0, 1),
                       out_shardings=(params_shardings, shardings))
    """
    init = tx.init if hasattr(tx, "init") else tx
    if not callable(init):
        raise ValueError(
            f"state_shardings: tx must be a GradientTransformation or an init function; "
            f"got {type(tx).__name__}."
        )
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if shardings is None:
        given = []
        for path, leaf in paths_and_leaves:
            sharding = getattr(leaf, "sharding", None)
            if sharding is None:
                raise ValueError(
                    f"state_shardings: {_checks.leaf_name(path)} has no sharding; pass arrays "
                    "placed with a NamedSharding, ShapeDtypeStructs built with sharding=, or "
                    "the shardings argument."
                )
            given.append(sharding)
    else:
        given = jax.tree.leaves(shardings, is_leaf=_is_sharding_leaf)
        if len(given) != len(paths_and_leaves) or not all(map(_is_sharding_leaf, given)):
            raise ValueError(
                f"state_shardings: shardings must have one Sharding, PartitionSpec or None "
                f"per parameter leaf ({len(paths_and_leaves)}); got {len(given)} leaves: "
                f"{given[:4]}{'...' if len(given) > 4 else ''}."
            )
    specs = [
        _param_spec(path, leaf, s) for (path, leaf), s in zip(paths_and_leaves, given, strict=True)
    ]
    names = tuple(dict.fromkeys(n for spec in specs for n in _axis_names(spec)))
    # Size-one axes: propagation of sharding types does not depend on axis sizes,
    # and nothing here needs devices or divisible shapes.
    mesh = AbstractMesh((1,) * len(names), names, axis_types=(AxisType.Explicit,) * len(names))
    abstract_params = jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(
                jnp.shape(leaf), jnp.result_type(leaf), sharding=NamedSharding(mesh, spec)
            )
            for (_, leaf), spec in zip(paths_and_leaves, specs, strict=True)
        ],
    )
    try:
        # Leave any mesh the caller has set (an abstract mesh may only be swapped for one
        # of the same size, or via the empty mesh) for the size-one mesh above.
        with jax.sharding.use_abstract_mesh(AbstractMesh((), ())):
            with jax.sharding.use_abstract_mesh(mesh):
                abstract_state = jax.eval_shape(init, abstract_params)
    except Exception as e:
        raise ValueError(
            "state_shardings: could not propagate the parameters' shardings through "
            f"tx.init ({type(e).__name__}: {e}). Initialise the state with jax.jit(tx.init) "
            "on the placed parameters and read each leaf's .sharding instead."
        ) from e

    to_output = _output_kind(given)

    def leaf_sharding(x: jax.ShapeDtypeStruct) -> ShardingOrSpec:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.axis_names:
            return to_output(sharding.spec, x.shape)
        return to_output(PartitionSpec(), x.shape)

    return jax.tree.map(leaf_sharding, abstract_state)
