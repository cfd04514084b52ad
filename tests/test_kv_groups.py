"""KV-cache groups: vLLM's grouping rule, every layer in exactly one (group, slot), padding counted."""
import pytest
from hypothesis import given, strategies as st

from kvpool.plan.kv_groups import kv_groups


def test_one_attention_kind_is_one_group_and_slot_i_is_layer_i():
    g = kv_groups([None] * 32)
    assert len(g.groups) == 1 and g.group_size == 32 and g.padding_layers == 0 and not g.hybrid
    assert [g.slot_of(i) for i in range(32)] == [(0, i) for i in range(32)]
    assert kv_groups([4096] * 32).windows == (4096,)  # Mistral-7B-v0.1: every layer windowed, one group


def test_gemma3_27b_deals_its_local_layers_round_robin_into_six_groups():
    g = kv_groups([None if (i + 1) % 6 == 0 else 1024 for i in range(62)])
    assert g.group_size == 10 and g.windows == (1024,) * 6 + (None,) and g.padding_layers == 8
    assert [len(x.layers) for x in g.groups] == [9, 9, 9, 9, 8, 8, 10]
    local = [i for i in range(62) if (i + 1) % 6]
    assert g.groups[0].layers == tuple(local[0::6]) and g.groups[6].layers == tuple(range(5, 62, 6))


def test_gpt_oss_alternation_is_two_full_size_groups():
    g = kv_groups([128, None] * 12)
    assert g.windows == (128, None) and g.group_size == 12 and g.padding_layers == 0
    assert g.slot_of(3) == (1, 1)  # layer 3 is the second full-attention layer


def test_near_equal_kinds_take_the_larger_count_as_group_size():
    g = kv_groups([128, None] * 12 + [None])
    assert g.group_size == 13 and g.padding_layers == 1


def test_an_unknown_layer_and_an_empty_model_are_refused():
    with pytest.raises(ValueError, match="layer 40 is not one of the model's 32"):
        kv_groups([None] * 32).slot_of(40)
    with pytest.raises(ValueError, match="at least one attention layer"):
        kv_groups([])


@given(st.lists(st.sampled_from([None, 64, 1024]), min_size=1, max_size=80))
def test_every_layer_has_exactly_one_slot_and_groups_fit_the_slots(windows):
    g = kv_groups(windows)
    seen = [layer for group in g.groups for layer in group.layers]
    assert sorted(seen) == list(range(len(windows)))
    assert all(len(x.layers) <= g.group_size and all(windows[i] == x.window for i in x.layers) for x in g.groups)
    assert g.padding_layers == len(g.groups) * g.group_size - len(windows) >= 0
