"""``Penalty.explain()`` and ``repr``: what a plan regularizes, with which settings and why, as text."""

from fastreg import _dispatch
from fastreg._coefficients import is_zero, show
from fastreg._plan import structure_text


def explain(plan, param_groups, coefficients):
    """A table of every candidate parameter: shape, dtype, included or why excluded, the param
    group (or rule) that gave its settings, its groups and center; then each param group's
    settings and the backend of each kernel group."""
    several = len(param_groups) > 1
    show_groups = any(not is_zero(c.group) or c.constrained for c in coefficients) or bool(plan.couplings)
    show_centers = plan.has_centers
    header = ["parameter", "shape", "dtype", "elements", "regularized"]
    header += ["settings"] if several else []
    header += ["groups"] if show_groups else []
    header += ["center"] if show_centers else []
    rows = [tuple(header)]
    for info in plan.info:
        included = info.excluded_because is None
        status = "yes" if included else f"no: {info.excluded_because}"
        row = [info.name, str(tuple(info.tensor.shape)), str(info.tensor.dtype).replace("torch.", ""),
               f"{info.tensor.numel():,}", status]
        if several:
            row.append(_group_name(info.group, param_groups) if included and info.group is not None else "-")
        if show_groups:
            row.append(_groups_cell(info, plan, coefficients) if included else "-")
        row += [info.center if included else "-"] if show_centers else []
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    included = [i for i in plan.info if i.excluded_because is None]
    excluded = [i for i in plan.info if i.excluded_because is not None]
    backends = ", ".join(
        f"{_dispatch.backend_for(plan.backend, kg.device).NAME} ({kg.device}, "
        f"{str(kg.dtype).replace('torch.', '')}{', centered' if kg.centers is not None else ''}"
        f"{', sharded' if kg.sharded else ''}: {len(kg.tensors)} tensors)"
        for kg in plan.kernel_groups()
    )
    lines += [
        "",
        f"regularized: {len(included)} tensors, {sum(i.tensor.numel() for i in included):,} elements",
        f"excluded:    {len(excluded)} tensors, {sum(i.tensor.numel() for i in excluded):,} elements",
    ]
    for index, (group, c) in enumerate(zip(param_groups, coefficients)):
        count = sum(1 for i in included if i.group == index)
        prefix = f"{_group_name(index, param_groups)} ({count} tensors): " if several else ""
        lines.append(prefix + _terms_text(group, c))
    for index, coupling in enumerate(plan.couplings):
        lines.append(f"coupled #{index}: {coupling.length} groups of " +
                     " + ".join(f"{name}[dim {dim}]" for name, dim in coupling.slices) +
                     f", group={show(coefficients[coupling.group].group)} (from "
                     f"{_group_name(coupling.group, param_groups)})")
    if any(c.constrained or c.nonneg for c in coefficients):
        lines.append("constraints are applied by prox_ / attach(mode='prox'); they add nothing to the value or "
                     "the gradient")
    lines.append(f"backend={plan.backend}" + (f" -> {backends}" if backends else ""))
    return "\n".join(lines)


def _groups_cell(info, plan, coefficients):
    """The parameter's groups, where a group term, a coupling or a norm constraint uses them."""
    m, c = info.member, coefficients[info.group]
    if m.coupling is None and is_zero(c.group) and not c.constrained:
        return "-"
    return structure_text(m, plan.couplings, constrained=c.constrained)


def _group_name(index, param_groups):
    rule = param_groups[index].get("rule")
    return f"group {index}" if rule is None else f"rule {rule!r}"


def _terms_text(group, c):
    terms = f"l1={show(c.l1)}  l2={show(c.l2)}"
    if not is_zero(c.group):
        structure = ("whole tensors" if group["group_dim"] is None
                     else f"group_dim={group['group_dim']}" + (f", group_size={group['group_size']}"
                                                               if group["group_size"] != 1 else ""))
        terms += f"  group={show(c.group)} ({structure})"
    if c.max_norm < float("inf") or c.min_norm > 0:
        terms += (f"  norm in [{c.min_norm:g}, {c.max_norm:g}]" if c.min_norm > 0
                  else f"  max_norm={c.max_norm:g}")
    if c.nonneg:
        terms += "  nonneg"
    return terms


def describe(plan, param_groups):
    """A one-line ``repr``."""
    if len(param_groups) == 1:
        g = param_groups[0]
        terms = f"l1={show(g['l1'])}, l2={show(g['l2'])}"
        if not is_zero(g["group"]):
            terms += f", group={show(g['group'])}, group_dim={g['group_dim']}"
    else:
        terms = f"{len(param_groups)} param groups"
    extra = ", centered" if plan.has_centers else ""
    extra += f", {len(plan.couplings)} couplings" if plan.couplings else ""
    return f"Penalty({terms}{extra}, tensors={len(plan.members)}, backend={plan.backend!r})"


