"""How sparse a model is: the fraction of exact zeros, per parameter and in total, and with
``group_dim`` the whole groups (rows or columns) that are exactly zero.

    >>> from fastreg import sparsity
    >>> s = sparsity(model)
    >>> print(s)                      # an aligned text table
    >>> s.total_fraction, s.zeros, s.numel
    >>> s.to_dict()                   # plain data (JSON-ready)
    >>> print(sparsity(model, group_dim=0))   # adds "0.weight: 171 of 256 rows zero"
    >>> print(sparsity(reg))          # a Penalty: each parameter's own groups (blocks, whole
                                      # tensors) and each coupling's, counted once

``params`` and ``exclude`` take the same forms as ``fastreg.penalty``, and select the same
tensors: by default every parameter with ``requires_grad=True``. Only exact zeros count
(``-0.0`` is a zero; a tiny value or a NaN is not), which is what L1's proximal step
(``Penalty.prox_``) produces and what an L1 term in the loss, stepped by SGD, does not. A
group (``w.select(group_dim, i)`` of a tensor with ``ndim >= 2``) is zero when all its
elements are: that row or column can be cut out of the model.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from fastreg._params import select
from fastreg.backends._geometry import NO_GROUPS, logical_groups

_SHOW_EXCLUDED = 4  # excluded tensors named under the table


class ParameterSparsity(NamedTuple):
    """One row: unpacks as ``name, numel, zeros, fraction``."""

    name: str
    numel: int
    zeros: int
    fraction: float  # zeros / numel; 0.0 for an empty tensor


class GroupSparsity(NamedTuple):
    """The exact-zero groups of one tensor with ``ndim >= 2``."""

    name: str
    groups: int
    zero_groups: int


_GROUP_WORD = {0: "rows", 1: "columns"}
PER_PARAMETER = "per parameter"  # Sparsity.group_dim of a Penalty's report: each parameter's own structure


@dataclass(frozen=True)
class Sparsity:
    """The exact zeros of a set of parameters. ``str()`` gives ``table()``."""

    per_parameter: list[ParameterSparsity]
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    group_dim: int | None = None
    per_group: list[GroupSparsity] = field(default_factory=list)  # tensors with ndim >= 2, with group_dim

    # Totals: exactly-zero groups and groups over all tensors with groups (0 without
    # ``group_dim``); exact zeros and elements over all selected parameters.
    zero_groups = property(lambda self: _total(self.per_group, "zero_groups"))
    groups = property(lambda self: _total(self.per_group, "groups"))
    zeros = property(lambda self: _total(self.per_parameter, "zeros"))
    numel = property(lambda self: _total(self.per_parameter, "numel"))

    @property
    def total_fraction(self):
        """``zeros / numel`` (0.0 when there are no elements)."""
        return _fraction(self.zeros, self.numel)

    def to_dict(self):
        """Plain Python data: ``{"per_parameter": [{name, numel, zeros, fraction}, ...],
        "zeros", "numel", "total_fraction", "excluded": [{name, reason}, ...]}``."""
        return {
            "per_parameter": [row._asdict() for row in self.per_parameter],
            "zeros": self.zeros,
            "numel": self.numel,
            "total_fraction": self.total_fraction,
            "excluded": [{"name": name, "reason": why} for name, why in self.excluded],
            **({} if self.group_dim is None else {
                "group_dim": self.group_dim,
                "per_group": [row._asdict() for row in self.per_group],
                "zero_groups": self.zero_groups,
                "groups": self.groups,
            }),
        }

    def table(self):
        """An aligned text table: one row per parameter, then the total."""
        header = ("parameter", "elements", "zeros", "zero fraction")
        body = [(row.name, f"{row.numel:,}", f"{row.zeros:,}", _percent(row.fraction))
                for row in self.per_parameter]
        # A Penalty's couplings: one row each (their groups span several parameters).
        body += [(row.name, "", "", "") for row in self.per_group if row.name.startswith("coupled #")]
        total = ("total", f"{self.numel:,}", f"{self.zeros:,}", _percent(self.total_fraction))
        if self.group_dim is not None:
            word = _GROUP_WORD.get(self.group_dim, "groups")
            by_name = {row.name: row for row in self.per_group}
            header += (f"zero {word}",)
            body = [(*cells, f"{by_name[cells[0]].zero_groups:,} of {by_name[cells[0]].groups:,}"
                     if cells[0] in by_name else "-") for cells in body]
            total += (f"{self.zero_groups:,} of {self.groups:,}",)
        rows = [header, *body, total]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

        def line(row):
            return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])

        rule = "  ".join("-" * w for w in widths)
        lines = [line(header), rule, *(line(r) for r in body), rule, line(total)]
        if self.excluded:
            shown = ", ".join(f"{name} [{why}]" for name, why in self.excluded[:_SHOW_EXCLUDED])
            more = len(self.excluded) - _SHOW_EXCLUDED
            lines.append(f"not counted: {len(self.excluded)} tensors: {shown}"
                         + (f", ... ({more} more in .excluded)" if more > 0 else ""))
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def sparsity(params, *, group_dim=None, exclude=None):
    """The fraction of exact zeros of each selected parameter and of all of them.

    ``group_dim``: ``None``, or 0 / 1 to also count, per tensor with ``ndim >= 2``, the groups
    ``w.select(group_dim, i)`` that are exactly zero (rows / columns that can be removed).

    ``params``: an ``nn.Module`` (its parameters with ``requires_grad=True``), tensors, or
    ``(name, tensor)`` pairs, or a ``{name: tensor}`` mapping; ``exclude``: as for
    ``fastreg.penalty`` (``None``, ``"bias_and_norm"``, glob patterns, or a callable).
    A tensor shared between modules counts once. Returns a ``Sparsity``.

    ``params`` may also be a ``fastreg.Penalty``: its parameters, each with the groups it has
    there (rows, columns, blocks of ``group_size``, the whole tensor), and one row per coupling
    (a group is zero when all its slices are: that neuron can be cut out).

    The counts are made on each tensor's device and read back with one transfer per device.
    """
    plan = getattr(params, "_plan", None)
    if plan is not None:
        return _of_penalty(plan.current())
    entries = select(params, exclude)
    included = [e for e in entries if e.included]
    excluded = [(e.name, e.excluded_because) for e in entries if not e.included]

    # One count_nonzero per tensor, stacked per device: a single host read per device.
    by_device = {}
    for index, entry in enumerate(included):
        by_device.setdefault(entry.tensor.device, []).append(index)
    nonzeros = [0] * len(included)
    for indices in by_device.values():
        counts = torch.stack([torch.count_nonzero(included[i].tensor.detach()) for i in indices])
        for i, count in zip(indices, counts.tolist()):
            nonzeros[i] = count

    rows = []
    for entry, nonzero in zip(included, nonzeros):
        numel = entry.tensor.numel()
        zeros = numel - nonzero
        rows.append(ParameterSparsity(entry.name, numel, zeros, _fraction(zeros, numel)))
    if group_dim is None:
        return Sparsity(rows, excluded)
    if isinstance(group_dim, bool) or group_dim not in _GROUP_WORD:
        raise ValueError(f"fastreg: group_dim must be None, 0 (rows) or 1 (columns), got {group_dim!r}")
    grouped = [e for e in included if e.tensor.ndim >= 2]
    per_group = []
    for entry in grouped:
        rows_of = logical_groups(entry.tensor.detach(), group_dim)
        live = int((rows_of != 0).any(dim=1).sum()) if rows_of.numel() else 0
        per_group.append(GroupSparsity(entry.name, rows_of.shape[0], rows_of.shape[0] - live))
    return Sparsity(rows, excluded, group_dim, per_group)


def _of_penalty(plan):
    rows, per_group = [], []
    for m in plan.members:
        t = m.tensor.detach()
        zeros = t.numel() - int(torch.count_nonzero(t))
        rows.append(ParameterSparsity(m.name, t.numel(), zeros, _fraction(zeros, t.numel())))
        dim, size = m.structure
        if m.coupling is None and dim != NO_GROUPS:
            groups_of = logical_groups(t, dim, size)
            live = int((groups_of != 0).any(dim=1).sum()) if groups_of.numel() else 0
            per_group.append(GroupSparsity(m.name, groups_of.shape[0], groups_of.shape[0] - live))
    by_name = {m.name: m.tensor.detach() for m in plan.members}
    for index, coupling in enumerate(plan.couplings):
        live = None
        for name, dim in coupling.slices:
            t = by_name[name]
            slice_live = (logical_groups(t, dim) != 0).any(dim=1) if t.ndim > 1 else (t != 0)
            live = slice_live if live is None else live | slice_live.to(live.device)
        names = " + ".join(f"{name}[dim {dim}]" for name, dim in coupling.slices)
        per_group.append(GroupSparsity(f"coupled #{index} ({names})", coupling.length,
                                       coupling.length - int(live.sum())))
    excluded = [(i.name, i.excluded_because) for i in plan.info if i.excluded_because is not None]
    return Sparsity(rows, excluded, PER_PARAMETER, per_group)


def _total(rows, field):
    return sum(getattr(row, field) for row in rows)


def _fraction(zeros, numel):
    return zeros / numel if numel else 0.0


def _percent(fraction):
    return f"{100 * fraction:.2f}%"
