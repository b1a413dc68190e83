"""``Penalty.explain()`` and ``repr``: what a plan regularizes, and why, as text."""

from fastreg import _coefficients, _dispatch
from fastreg._coefficients import show
from fastreg._plan import groups_text


def explain(plan, coefficients):
    """A table of every candidate parameter: shape, dtype, included or why excluded, its groups
    and center when those terms are used, and the backend of each kernel group."""
    show_groups = not _coefficients.is_zero(coefficients.group)
    show_centers = plan.has_centers
    header = ["parameter", "shape", "dtype", "elements", "regularized"]
    header += ["groups"] if show_groups else []
    header += ["center"] if show_centers else []
    rows = [tuple(header)]
    for info in plan.info:
        status = "yes" if info.excluded_because is None else f"no: {info.excluded_because}"
        row = [info.name, str(tuple(info.tensor.shape)), str(info.tensor.dtype).replace("torch.", ""),
               f"{info.tensor.numel():,}", status]
        row += [groups_text(info.tensor, plan.group_dim) if info.excluded_because is None else "-"] \
            if show_groups else []
        row += [info.center if info.excluded_because is None else "-"] if show_centers else []
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
    terms = f"l1={show(coefficients.l1)}  l2={show(coefficients.l2)}"
    if show_groups:
        terms += f"  group={show(coefficients.group)} (group_dim={plan.group_dim})"
    lines += [
        "",
        f"regularized: {len(included)} tensors, {sum(i.tensor.numel() for i in included):,} elements",
        f"excluded:    {len(excluded)} tensors, {sum(i.tensor.numel() for i in excluded):,} elements",
        f"{terms}  backend={plan.backend}" + (f" -> {backends}" if backends else ""),
    ]
    return "\n".join(lines)


def describe(plan, coefficients):
    terms = f"l1={show(coefficients.l1)}, l2={show(coefficients.l2)}"
    if coefficients.has_groups:
        terms += f", group={show(coefficients.group)}, group_dim={plan.group_dim}"
    return (f"Penalty({terms}{', centered' if plan.has_centers else ''}, "
            f"tensors={len(plan.tensors)}, backend={plan.backend!r})")
