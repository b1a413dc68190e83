"""Backends: one module per implementation, all with the same small contract.

Adding a backend is adding a file here and its name to ``fastreg._dispatch.BACKENDS``.
Nothing outside ``fastreg._dispatch`` imports these modules.

Every backend module defines

``NAME: str``
    The name users pass as ``backend=``.
``DEVICE_TYPES: tuple[str, ...] | None``
    The device types it runs on (``None``: any device torch runs on).
``unavailable_reason() -> str | None``
    ``None`` when the backend can run here, else a one-line reason (cached by the module;
    may trigger a JIT build on first call).

and four kernels. Each takes a non-empty list ``params`` of tensors that share one device
and one floating dtype; any of them may be empty (0 elements) or non-contiguous, and a
backend must give the right answer for all of them. The accumulation dtype ("acc") is
float64 for float64 parameters and float32 for everything else.

``sums(params) -> Tensor``
    Shape ``(2,)``, acc dtype, on the group's device: ``[Σ|w|, Σw²]`` over every element.
    Bitwise deterministic: the same inputs give the same bits on every call.
``grads(params, coeffs) -> list[Tensor]``
    ``coeffs``: shape ``(2,)`` acc-dtype tensor ``[c1, c2]`` on the group's device.
    Returns fresh tensors ``c1 * sign(w) + 2 * c2 * w`` (``sign(0) = 0``) with the layout
    of ``torch.empty_like(w)``, computed in acc dtype and rounded once to ``w.dtype``.
``add_grad_(params, grads, coeffs) -> Tensor``
    In place: ``g += c1 * sign(w) + 2 * c2 * w`` for every pair (``grads[i]`` has
    ``params[i]``'s shape and dtype, any layout). Returns ``sums(params)`` computed in the
    same pass over ``w``, so the value costs no extra read.
``prox_(params, coeffs) -> None``
    In place, ``coeffs = [threshold, denominator]``:
    ``w = sign(w) * max(|w| - threshold, 0) / denominator``. Gives exact zeros.

A backend never validates user input (``fastreg._dispatch`` does that once) and never
allocates memory proportional to the model in the in-place kernels.
"""
