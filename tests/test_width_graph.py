"""Width pruning's coupling comes from Torch-Pruning's DependencyGraph (ops/prune/graph.py): per family, the
groups the graph finds on the real diffusers module are the hand-written coupling it replaced
(tests/width_reference.py), index for index; every importance criterion gives its own plan, and each plan
reloads."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILY_NAMES
from ditkit.formats.families import FAMILIES
from ditkit.ops.prune import graph
from width_reference import reference_spaces


def tiny_transformer(family):
    fam = FAMILIES[family]
    torch.manual_seed(0)
    return fam, fam.transformer_cls()(**fam.tiny_config()).eval()


def canon(members: dict) -> frozenset:
    """A space as the set of (key, dim, per-channel indices), so that naming does not matter."""
    return frozenset((k, d, tuple(map(tuple, v.tolist()))) for (k, d), v in members.items())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_graph_groups_equal_the_hand_written_coupling(family):
    if family not in ("dit", "pixart", "sd3", "flux"):
        pytest.skip("no hand-written reference for this family")
    fam, tr = tiny_transformer(family)
    found = graph.spaces(fam, tr)
    graph.check_cover(found, tr.state_dict())
    got = {canon(s.members) for s in found}
    ref = {space: canon(m) for space, m in reference_spaces(family, tr).items()}
    assert got == set(ref.values()), {
        "reference only": sorted(s for s, c in ref.items() if c not in got),
        "graph only": sorted(s.name for s in found if canon(s.members) not in set(ref.values()))}
    # the kinds agree with the reference's names: heads, MLP units, width
    kinds = {canon(s.members): s.kind for s in found}
    assert {space: kinds[c] for space, c in ref.items()} == {space: space[0] for space in ref}
