"""Backends: one module per implementation, all with the same small contract.

Adding a backend is adding a module here (a file, or a package like ``triton/``) and its name
to ``fastreg._dispatch.BACKENDS``. Only ``fastreg._dispatch`` imports the backend modules; what
they share (``_terms``, ``_geometry``, ``_workspace``) is imported by the layers above too.

Every backend module defines

``NAME: str``
    The name users pass as ``backend=``.
``DEVICE_TYPES: tuple[str, ...] | None``
    The device types it runs on (``None``: any device torch runs on).
``VERSIONS_BUMPED: bool``
    Whether its in-place writes already bump the version counters of what they write (torch
    ops do; kernels writing through raw pointers do not, and ``fastreg._ops`` bumps for them).
``unavailable_reason() -> str | None``
    ``None`` when the backend can run here, else a one-line reason (cached by the module;
    may trigger a JIT build on first call).

``METRIC_PROX: bool``
    Whether ``prox_`` takes ``metric=`` (else ``fastreg._ops`` runs the torch backend's step).

and four kernels, which every penalty term runs through (a new term extends them; it does not
add functions). Each takes one *call*: a non-empty list ``params`` of ``T`` tensors sharing one
device and one floating dtype; any of them may be empty or non-contiguous. Every tensor has its
own structure and its own coefficients, all handled in the same launches. Shared operands:

``centers``: ``None``, or one tensor per param (its shape, dtype and device; any layout).
    Every term is computed on ``d = w - c`` (``d = w`` without centers); ``d`` is formed in
    the accumulation dtype ("acc": float64 for float64 params, float32 otherwise), never
    materialised as a tensor.
``groups``: a ``_geometry.Groups`` (each tensor's structure: no groups, the whole tensor, or
    blocks of ``k`` consecutive slices along a dim; see ``_geometry``), or one int group_dim
    for every tensor (``Groups.uniform``). Group vectors have ``sum(group_sizes(params,
    groups))`` entries, in the acc dtype.
coefficient tables: ``(T, len(Gradient))`` or ``(T, len(Prox))`` acc tensors on the device,
    row ``t`` for ``params[t]`` (``_terms.as_table``: a vector is every tensor's row). Slots
    named in ``_terms``.

``sums(params, centers, groups, shrink=None) -> (sums, group_sq)``
    With ``s = d`` (``shrink`` None or 0) or, per tensor, the shrunk values of the proximal
    step (``shrink``: a prox table, or a float threshold for every tensor): ``s = sign(d) *
    max(|d| - THRESHOLD, 0)``, or ``max(d - THRESHOLD, 0)`` where ``NONNEG``:
    ``sums[t] = [Σ|s|, Σs², Σ_g ‖s_g‖]`` of tensor ``t`` (shape ``(T, 3)``) and
    ``group_sq[g] = ‖s_g‖²``. One read of every operand. Bitwise deterministic.
``grads(params, centers, groups, coeffs, group_scale) -> list[Tensor]``
    ``coeffs``: a Gradient table (slot GROUP ignored); ``group_scale``: a group vector or
    ``None`` (zeros). Fresh tensors with the layout of ``torch.empty_like(w)``:
    ``L1_t·sign(d) + (2·L2_t + group_scale[g])·d``, computed in acc dtype and rounded once.
``add_grad_(params, grads, centers, groups, coeffs, group_norms, want_sums=True) -> (sums, group_sq) | None``
    In place: ``g += L1_t·sign(d) + 2·L2_t·d + GROUP_t·d_g / ‖d_g‖`` (0 for a group of norm
    0). ``grads[i]`` has ``params[i]``'s shape and device, any floating dtype and any
    layout; the sum is formed in the wider of the two acc dtypes and rounded once to ``g``'s
    dtype. ``group_norms``: the norms ``‖d_g‖`` to use (a sharded parameter's global ones, a
    coupled group's), or ``None`` to compute them here. Returns ``sums(params, centers,
    groups)``; with ``want_sums=False``, ``None``, and with given norms no extra read of the
    tensors with groups is made for sums no one will use.
``prox_(params, centers, groups, coeffs, group_norms) -> None``
    In place, with a Prox table and ``s`` the shrunk ``d`` as in ``sums``: ``w = c + f_g · s``
    for tensors with groups, ``f_g = _terms.prox_group_factor(‖s_g‖, GROUP_THRESHOLD,
    DENOMINATOR, MIN_NORM, MAX_NORM)`` (the exact proximal step of the terms and the norm
    constraint; 0 where ``‖s_g‖ = 0``), and ``w = c + s / DENOMINATOR`` for the others.
    Exact zeros of ``d``. ``group_norms``: ``‖s_g‖`` to use, or ``None``.

    With ``metric`` (a ``_terms.MetricOperand``; backends with ``METRIC_PROX = True``; then
    ``group_norms`` is None; ``coeffs`` in float64, since ``DENOMINATOR − 1 = 2·lr·l2`` is read
    and float32 would round it away next to 1): the step in the diagonal metric ``D`` of each tensor
    (``_terms.metric_values``: ``√((v − m²)·SCALE) + EPS``, or ``v``, or 1), ``w = c + x``
    with ``x = argmin ½‖x − d‖²_D + the terms + the constraint``, per coordinate
    ``u = sign(d)·max(D|d| − THRESHOLD, 0)`` (NONNEG: ``max(D·d − THRESHOLD, 0)``) and
    ``a = D + DENOMINATOR − 1``: ``x = u/a`` without groups; per group, 0 when ``‖u_g‖ <=
    GROUP_THRESHOLD``, else ``x = u/(a + μ_g)`` with ``μ_g`` the root of ``μ·‖u/(a + μ)‖ =
    GROUP_THRESHOLD`` (0 without a group term), raised to the root of ``‖u/(a + μ)‖ = MAX_NORM``
    where the norm is over it, or lowered to the root ``λ > −min a`` of ``‖u/(a + λ)‖ = MIN_NORM``
    where the norm is under it (a zero ``u`` stays zero; in the hard case, no ``u`` where ``a``
    is smallest and the bound beyond reach, ``λ = −min a`` and those coordinates take the
    group's ``spread``: ``_terms.metric_multiplier``). With ``MIN_NORM > 0``, ``THRESHOLD`` is
    0 and ``NONNEG`` is 0 (the plan refuses the rest). The torch backend's ``_metric_prox`` is
    the reference. ``v`` is read in the same pass as ``w`` and
    ``c``; a group's root is found in passes over that group alone.

Every kernel also takes ``workspace=None``: a ``fastreg.backends._workspace.Workspace`` owned
by the caller's kernel group, where a backend may keep per-call plans (device tables) between
calls, under the ownership rules stated in ``_workspace``; ``None`` means cache nothing. A
caller that passes a workspace never modifies a list it passed (params, centers, gradients):
a kernel group passes the same lists at every call, and a backend may recognize a list by its
identity (a new list of other tensors is a new list).

Coefficients are acc-dtype tensors on the group's device (no host synchronisation on a GPU).
A backend never validates user input (``fastreg._dispatch`` and ``fastreg._plan`` do, once)
and never allocates memory proportional to the model in the in-place kernels.
"""
