"""Context: copy-on-write forks, rollback, growth (spec section 3)."""
import torch

from hyperbagel_core.context import Context


def _append(ctx, values, layers=2):
    n = len(values)
    k = torch.tensor(values, dtype=torch.float32).view(n, 1, 1)
    ctx.reserve(n, k, 1, 1)
    for layer in range(layers):
        ctx.write(layer, k + layer, k + layer)
    ctx.advance(n, n)


def _keys(ctx, layer=0):
    return ctx.keys(layer).flatten().tolist()


def test_fork_is_isolated_both_ways():
    a = Context(2)
    _append(a, [1, 2, 3])
    b = a.fork()
    _append(a, [4])
    _append(b, [9, 9])
    assert _keys(a) == [1, 2, 3, 4] and _keys(b) == [1, 2, 3, 9, 9]
    assert _keys(a, 1) == [2, 3, 4, 5]
    c = b.fork()
    _append(b, [7])
    _append(c, [8])
    assert _keys(b)[-1] == 7 and _keys(c)[-1] == 8 and _keys(a) == [1, 2, 3, 4]


def test_truncate_then_append_does_not_clobber_a_fork():
    a = Context(1)
    _append(a, [1, 2, 3], layers=1)
    b = a.fork()
    a.truncate(1, 1)
    _append(a, [5, 6], layers=1)
    assert _keys(a) == [1, 5, 6] and _keys(b) == [1, 2, 3]
    assert (a.kv_len, a.rope) == (3, 3)


def test_decoding_appends_in_place_with_geometric_growth():
    a = Context(1)
    _append(a, [0], layers=1)
    ptrs = set()
    for i in range(200):
        _append(a, [i], layers=1)
        ptrs.add(a._store.k[0].data_ptr())
    assert a.kv_len == 201 and len(ptrs) <= 6


def test_truncate_only_shrinks():
    a = Context(1)
    _append(a, [1], layers=1)
    try:
        a.truncate(3, 3)
    except ValueError:
        return
    raise AssertionError("truncate grew the context")


def _scratch(ctx, values, layers=2):
    """A read-only query's block: reserve + write, no advance."""
    n = len(values)
    k = torch.tensor(values, dtype=torch.float32).view(n, 1, 1)
    ctx.reserve(n, k, 1, 1)
    return [ctx.write(layer, k, k)[0].flatten().tolist() for layer in range(layers)]


def test_scratch_write_is_contiguous_invisible_and_never_clobbers_a_fork():
    a = Context(2)
    _append(a, [1, 2, 3])
    b = a.fork()
    assert _scratch(a, [7, 8])[0] == [1, 2, 3, 7, 8]  # the owner writes past its end, in place
    assert _keys(a) == [1, 2, 3] and _keys(b) == [1, 2, 3] and a.kv_len == 3
    assert _scratch(b, [9])[1] == [2, 3, 4, 9]  # a fork copies its prefix before writing
    assert _keys(a) == [1, 2, 3] and _keys(b) == [1, 2, 3]
    c = a.fork()
    a.truncate(1, 1)  # c still reads a's tokens 2, 3: a must not scratch over them
    assert _scratch(a, [5, 5])[0] == [1, 5, 5]
    assert _keys(c) == [1, 2, 3] and _keys(a) == [1]


def test_fork_copies_once_then_scratches_in_place():
    a = Context(1)
    _append(a, [1, 2, 3, 4], layers=1)
    b = a.fork()
    ptrs = set()
    for step in range(5):
        for ctx in (a, b):
            _scratch(ctx, [step, step], layers=1)
        ptrs.add((a._store.k[0].data_ptr(), b._store.k[0].data_ptr()))
    assert len(ptrs) == 1 and _keys(a) == _keys(b) == [1, 2, 3, 4]


def test_scratch_reservation_is_exact_and_appends_still_grow():
    a = Context(1)
    _append(a, [1] * 20, layers=1)              # capacity 40
    k = torch.zeros(30, 1, 1)
    a.reserve(30, k, 1, 1, grow=False)
    assert a._store.capacity == 50
    _append(a, [2], layers=1)
    _append(a, [3] * 40, layers=1)
    assert a._store.capacity == 2 * 61 and _keys(a) == [1] * 20 + [2] + [3] * 40
