"""The penalty's terms as named data: the one place that says what each slot of the vectors
exchanged with the kernels means. Every backend reads these names; the C++ kernels mirror them
in ``csrc/terms.h`` (``fastreg_cpu::Sum``, ``Gradient``, ``Prox``) and the Triton kernels as constexprs;
each backend checks at load time that its copy agrees with this one (``check_mirror``; the cpu
backend reads its copy from ``fastreg_cpu::term_layout()``).

With ``d = w - c`` (``c`` the center, 0 without one) and ``d_g`` the groups of ``d``:

``Sum``  the sums vector every ``sums`` / ``add_grad_`` returns, one entry per term:
         ``[Σ|s|, Σs², Σ_g ‖s_g‖]`` (``s = d``, or the shrunk ``d`` of a proximal step).
``Gradient``  the coefficients of ``grads`` / ``add_grad_``: the gradient is
         ``L1·sign(d) + 2·L2·d + GROUP·d_g/‖d_g‖`` (0 for a zero group). Slot ``i`` multiplies
         the derivative of sum ``i``: autograd hands the backward exactly ``[l1, l2, group]``.
``Prox``  the coefficients of ``prox_`` for a step ``lr``: ``THRESHOLD = lr·l1`` (soft
         threshold), ``DENOMINATOR = 1 + 2·lr·l2``, ``GROUP_THRESHOLD = lr·group``.

Adding a term: a slot here, its sum and gradient in each backend's term maths (``csrc/terms.h``,
``backends/triton/kernels.py`` ``_apply``, ``backends/torch.py`` ``_gradient``), its coefficient in
``fastreg._coefficients``.
"""

from enum import IntEnum


class Sum(IntEnum):
    ABS = 0  # Σ|s|: the L1 term
    SQUARE = 1  # Σs²: the L2 term
    GROUP_NORM = 2  # Σ_g ‖s_g‖: the group lasso term


class Gradient(IntEnum):
    L1 = 0
    L2 = 1
    GROUP = 2


class Prox(IntEnum):
    THRESHOLD = 0
    DENOMINATOR = 1
    GROUP_THRESHOLD = 2


SUMS = len(Sum)
GRADIENT_SLOTS = len(Gradient)


def layout():
    """Every named slot as ``(enum, name, value)``, for comparing with a backend's mirror."""
    return [(enum.__name__, member.name, int(member)) for enum in (Sum, Gradient, Prox) for member in enum]


def check_mirror(backend, mirrored):
    """``RuntimeError`` unless ``mirrored`` (a backend's ``{(enum, name): value}``) names every
    slot with the value it has here."""
    expected = {(enum, name): value for enum, name, value in layout()}
    wrong = {key: mirrored.get(key) for key, value in expected.items() if mirrored.get(key) != value}
    if wrong:
        raise RuntimeError(f"fastreg: the {backend} backend's term slots disagree with fastreg.backends._terms: "
                           + ", ".join(f"{e}.{n} = {v} (expected {expected[(e, n)]})" for (e, n), v in wrong.items()))
