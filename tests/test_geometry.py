"""fastreg.backends._geometry: where the groups of a tensor lie in memory, and the
thread-count-independent sum every backend shares."""

import pytest
import torch

from fastreg.backends._geometry import (NO_GROUPS, fixed_order_sum, group_sizes, is_dense, logical_groups,
                                        memory_geometry)


@pytest.mark.parametrize("make, group_dim, expected", [
    (lambda: torch.empty(6, 5), 0, (1, 6, 5)),  # rows: one run each
    (lambda: torch.empty(6, 5), 1, (6, 5, 1)),  # columns: strided
    (lambda: torch.empty(5, 6).t(), 0, (5, 6, 1)),  # a transposed weight: its rows are strided
    (lambda: torch.empty(5, 6).t(), 1, (1, 5, 6)),
    (lambda: torch.empty(4, 3, 2, 2).to(memory_format=torch.channels_last), 1, (16, 3, 1)),
    (lambda: torch.empty(1, 7), 0, (1, 1, 7)),  # one group holds everything
    (lambda: torch.empty(0, 7), 1, (1, 7, 0)),
], ids=["rows", "columns", "transposed-rows", "transposed-columns", "channels-last", "one-group", "empty"])
def test_memory_geometry_locates_every_group(make, group_dim, expected):
    t = make()
    assert memory_geometry(t, group_dim) == expected
    A, G, K = expected
    if t.numel():  # element at memory offset m belongs to group (m // K) % G
        marks = torch.arange(t.numel()).as_strided(t.shape, t.stride())  # memory offset of each element
        groups = (marks // K) % G
        assert torch.equal(groups, torch.arange(G).view([-1 if d == group_dim else 1 for d in range(t.ndim)])
                           .expand(t.shape))


def test_group_sizes_and_logical_groups():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(0, 2), torch.randn(2, 3, 4)]
    assert group_sizes(tensors, 0) == [3, 0, 0, 2]
    assert group_sizes(tensors, 1) == [4, 0, 2, 3]
    assert group_sizes(tensors, NO_GROUPS) == [0, 0, 0, 0]
    w = tensors[3]
    rows = logical_groups(w, 1)
    assert rows.shape == (3, 8) and torch.equal(rows[1], w[:, 1].reshape(-1))


def test_is_dense():
    assert is_dense(torch.empty(3, 4)) and is_dense(torch.empty(3, 4).t())
    assert is_dense(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert not is_dense(torch.empty(3, 8)[:, ::2]) and not is_dense(torch.empty(6, 4)[1:5, 1:3])


def test_fixed_order_sum_is_bitwise_the_same_for_any_thread_count():
    values = torch.randn(1_000_003, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fixed_order_sum(values))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], values.sum(), rtol=1e-12, atol=0)
