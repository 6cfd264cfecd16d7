"""The shared shell: positions have no cap and are identical however a sequence is split;
learned tables fail clearly past their end; model-level input checks."""

import pytest
import torch

from bsbr import BSBRModel
from bsbr.causal_lm import sinusoidal_positions


def test_cached_sinusoidal_table_equals_direct_computation_at_any_offset():
    m = BSBRModel(50, 32, 1, 2, 8, 32, dropout=0.0)
    for start, n in [(0, 5), (1000, 30), (70000, 7), (3, 5000)]:  # grows past the initial table twice
        assert torch.equal(m._positions(start, n, "cpu", torch.float32), sinusoidal_positions(start, n, 32))


def test_sinusoidal_positions_distinct_far_out():
    enc = sinusoidal_positions(10**6, 4, 64)
    assert torch.isfinite(enc).all() and (enc[1:] - enc[:-1]).abs().sum(-1).min() > 0.1


def test_learned_positions_raise_past_their_table():
    m = BSBRModel(50, 32, 1, 2, 8, 32, dropout=0.0, position="learned", max_positions=16)
    assert m(torch.randint(0, 50, (1, 16))).shape == (1, 16, 50)
    with pytest.raises(ValueError, match="max_positions=16"):
        m(torch.randint(0, 50, (1, 17)))
    cache = m.init_cache(1)
    m(torch.randint(0, 50, (1, 10)), cache=cache)
    with pytest.raises(ValueError, match="position 17"):
        m(torch.randint(0, 50, (1, 7)), cache=cache)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(position="rotary"), "position"),
    (dict(position="learned"), "max_positions"),
    (dict(activation="swish9"), "activation"),
])
def test_bad_shell_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        BSBRModel(50, 32, 1, 2, 8, 32, **kwargs)


def test_cache_batch_mismatch_and_unknown_kwargs():
    m = BSBRModel(50, 32, 1, 2, 8, 32, dropout=0.0)
    with pytest.raises(ValueError, match="batch_size=2"):
        m(torch.randint(0, 50, (3, 4)), cache=m.init_cache(2))
    with pytest.raises(ValueError, match="unexpected keyword"):
        m(torch.randint(0, 50, (1, 4)), past_key_values=None)


def test_tied_head_counts_once():
    m = BSBRModel(50, 32, 1, 2, 8, 32)
    assert m.lm_head.weight is m.embed.weight
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())  # parameters() dedups too
    assert m.num_parameters() < sum(p.numel() for p in m.state_dict().values())
