"""Per-parameter settings: the param groups of a ``Penalty``, the torch.optim way.

A ``Penalty`` is a list of *param groups*, each a dict holding ``"params"`` (the tensors) and
every setting: the keyword arguments of ``Penalty`` are the defaults, a group's own keys
override them. They come from

* ``params`` given as a list of dicts (``{"params": model.head.parameters(), "l2": 1e-3}``), or
* ``rules=[(selector, {settings}), ...]`` on one module: a selector is a glob pattern on
  parameter names, a list of them, or ``(name, tensor) -> bool``; the first rule that matches
  gives a parameter its group; every rule is a group (its ``"rule"`` key holds the selector as
  written), and the parameters no rule matches form the last, default group.

Settings fall into two kinds. *Coefficients* (``l1``, ``l2``, ``group``, ``max_norm``,
``min_max_norm``, ``unit_norm``, ``nonneg``) are read from ``reg.param_groups`` at every call, so
``reg.param_groups[i]["l2"] = v`` takes effect at the next call (a schedule). *Structure*
(``params``, ``group_dim``, ``group_size``, ``center``, ``exclude``) shapes the plan, built once:
changing it afterwards is an error naming the group, not a silent no-op.
"""

import math
import numbers
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fastreg import _coefficients
from fastreg._coefficients import Coefficients
from fastreg._params import glob_match

COEFFICIENT_KEYS = ("l1", "l2", "group", "max_norm", "min_max_norm", "unit_norm", "nonneg")
STRUCTURE_KEYS = ("group_dim", "group_size", "center", "exclude")
SETTING_KEYS = COEFFICIENT_KEYS + STRUCTURE_KEYS
GROUP_DIMS = (0, 1, None)
DEFAULTS = dict(l1=0.0, l2=0.0, group=0.0, group_dim=0, group_size=1, center=None, max_norm=None, min_max_norm=None,
                unit_norm=False, nonneg=False, exclude=None)


def defaults(**settings):
    """Every setting: ``settings`` over ``DEFAULTS`` (what ``Penalty``'s keyword arguments give)."""
    unknown = set(settings) - set(SETTING_KEYS)
    if unknown:
        raise TypeError(f"fastreg: unknown settings {sorted(unknown)}")
    return {**DEFAULTS, **settings}


def param_groups(params, defaults, rules=None):
    """``(groups, source)``: the param groups as dicts (each with ``"params"``, the original
    ``"source"`` of its parameters for selection, and every setting), and how to name them."""
    for key, value in defaults.items():
        check_structure(key, value, None)
    if rules is not None:
        if _is_group_list(params):
            raise ValueError("fastreg: give either param groups (a list of dicts) or rules, not both")
        return _from_rules(params, defaults, rules)
    if _is_group_list(params):
        groups = []
        for index, group in enumerate(params):
            unknown = set(group) - set(SETTING_KEYS) - {"params"}
            if "params" not in group:
                raise ValueError(f"fastreg: param group {index} has no 'params' key")
            if unknown:
                raise ValueError(f"fastreg: param group {index} has unknown keys {sorted(unknown)}; settings are "
                                 f"{', '.join(SETTING_KEYS)}")
            groups.append(_group(group["params"], defaults, group, f"param group {index}"))
        return groups
    return [_group(params, defaults, {}, "the penalty")]


def _is_group_list(params):
    return isinstance(params, (list, tuple)) and len(params) > 0 and all(isinstance(g, Mapping) for g in params)


def _group(source, defaults, overrides, where):
    group = dict(defaults)
    for key, value in overrides.items():
        if key != "params":
            check_structure(key, value, where)
            group[key] = value
    group["source"] = source
    return group


def _from_rules(params, defaults, rules):
    if not isinstance(params, nn.Module):
        raise TypeError(f"fastreg: rules select parameters of one nn.Module by name, got {type(params).__name__}")
    if not isinstance(rules, (list, tuple)):
        raise TypeError("fastreg: rules must be a list of (selector, settings) pairs")
    groups, matchers = [], []
    for index, rule in enumerate(rules):
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[1], Mapping)):
            raise TypeError(f"fastreg: rules[{index}] must be a (selector, settings dict) pair, got {rule!r}")
        selector, settings = rule
        unknown = set(settings) - set(SETTING_KEYS)
        if unknown:
            raise ValueError(f"fastreg: rules[{index}] has unknown settings {sorted(unknown)}; settings are "
                             f"{', '.join(SETTING_KEYS)}")
        matchers.append(_matcher(selector, index))
        group = _group(params, defaults, settings, f"rules[{index}]")
        group["rule"] = tuple(selector) if isinstance(selector, list) else selector
        groups.append(group)
    groups.append(_group(params, defaults, {}, "the default group"))

    def group_of(name, tensor):
        for index, matches in enumerate(matchers):
            if matches(name, tensor):
                return index
        return len(matchers)

    for group in groups:
        group["belongs"] = group_of
    return groups


def _matcher(selector, index):
    if isinstance(selector, str):
        return lambda name, tensor: glob_match(name, selector)
    if isinstance(selector, (list, tuple)) and all(isinstance(p, str) for p in selector):
        patterns = tuple(selector)
        return lambda name, tensor: any(glob_match(name, p) for p in patterns)
    if isinstance(selector, Callable):
        return lambda name, tensor: bool(selector(name, tensor))
    raise TypeError(f"fastreg: the selector of rules[{index}] must be a glob pattern, a list of them or a callable "
                    f"(name, tensor) -> bool, got {type(selector).__name__}")


def hashable(key):
    """A ``values()`` key as something a set can hold (a callable selector by identity)."""
    try:
        hash(key)
        return key
    except TypeError:
        return id(key)


def key_of(index, group):
    """What ``values()`` calls a group: its rule's selector as written, else its index."""
    rule = group.get("rule")
    return index if rule is None else rule


# ------------------------------------------------------------------------------------------
# Checks


def check_structure(key, value, where):
    """Structure settings are checked once, when the plan is built (``where``: None for the
    keyword arguments)."""
    name = key if where is None else f"{key} ({where})"
    if key == "group_dim" and (isinstance(value, bool) or value not in GROUP_DIMS):
        raise ValueError(f"fastreg: {name} must be 0 (rows: output units, filters), 1 (columns: input features, "
                         f"channels) or None (the whole tensor is one group), got {value!r}")
    if key == "group_size" and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise ValueError(f"fastreg: {name} must be a positive int (rows or columns per group), got {value!r}")


def coefficients(group, where=None):
    """The checked ``Coefficients`` of one param group, read now (a schedule may have changed
    them); ``where`` names the group in errors (None: the penalty's only group)."""
    named = (lambda key: key) if where is None else (lambda key: f"{key} ({where})")
    where = where or "the penalty"
    l1 = _coefficients.check(named("l1"), group["l1"])
    l2 = _coefficients.check(named("l2"), group["l2"])
    grp = _coefficients.check(named("group"), group["group"])
    min_norm, max_norm = norm_bounds(group, where)
    nonneg = group["nonneg"]
    if not isinstance(nonneg, bool):
        raise TypeError(f"fastreg: nonneg ({where}) must be True or False, got {nonneg!r}")
    if min_norm > 0 and (nonneg or not _coefficients.is_zero(l1)):
        raise ValueError(
            f"fastreg: {where} combines a lower norm bound (min_max_norm / unit_norm) with "
            f"{'nonneg' if nonneg else 'l1'}: their proximal step is not a rescaling (where L1 or the sign "
            "constraint empties a group, the exact step must pick a coordinate); use max_norm, or drop "
            f"{'nonneg' if nonneg else 'l1'} for these parameters")
    return Coefficients(l1, l2, grp, min_norm, max_norm, nonneg)


def norm_bounds(group, where):
    """``(lo, hi)`` on each group's norm from ``max_norm``, ``min_max_norm`` and ``unit_norm``."""
    lo, hi = 0.0, math.inf
    max_norm, min_max, unit = group["max_norm"], group["min_max_norm"], group["unit_norm"]
    if max_norm is not None:
        hi = min(hi, _positive("max_norm", max_norm, where))
    if min_max is not None:
        if not (isinstance(min_max, (tuple, list)) and len(min_max) == 2):
            raise TypeError(f"fastreg: min_max_norm ({where}) must be a (min, max) pair, got {min_max!r}")
        low = _number("min_max_norm's min", min_max[0], where)
        high = _positive("min_max_norm's max", min_max[1], where)
        if low > high:
            raise ValueError(f"fastreg: min_max_norm ({where}) has min {low} > max {high}")
        lo, hi = max(lo, low), min(hi, high)
    if not isinstance(unit, bool):
        raise TypeError(f"fastreg: unit_norm ({where}) must be True or False, got {unit!r}")
    if unit:
        lo, hi = max(lo, 1.0), min(hi, 1.0)
    if lo > hi:
        raise ValueError(f"fastreg: the norm constraints of {where} leave no feasible norm (min {lo} > max {hi})")
    return lo, hi


def _number(name, value, where):
    # Python numbers only: constraints are read at every call, and a tensor's value would cost a
    # host sync (and a graph break under torch.compile) each time.
    if isinstance(value, torch.Tensor):
        raise TypeError(f"fastreg: {name} ({where}) must be a Python number, got a tensor; assign a new number "
                        "through reg.param_groups to change it")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or value == math.inf:
        raise ValueError(f"fastreg: {name} ({where}) must be a finite number >= 0, got {value!r}")
    return float(value)


def _positive(name, value, where):
    value = _number(name, value, where)
    if value <= 0:
        raise ValueError(f"fastreg: {name} ({where}) must be > 0, got {value}")
    return value
