"""Tests of the DARTS search space: supernet, architecture and genotype rule, evaluation network."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mlo.problems import data
from mlo.problems.darts import (
    DARTS_V2,
    PRIMITIVES,
    Architecture,
    ArchWeights,
    DepthwiseConv2d,
    EpochRecord,
    Genotype,
    GenotypeError,
    MixedOp,
    PRESETS,
    NetSize,
    NetworkFromGenotype,
    OpMask,
    SearchCell,
    Stage,
    SuperNet,
    derive_genotype,
    full_mask,
    num_edges,
    pdarts_next_stage,
    pdarts_supernet,
    prune_mask,
    train_from_scratch,
)

P = {name: k for k, name in enumerate(PRIMITIVES)}
E = num_edges(4)


# Tiny tensors: one intra-op thread (conftest's fixture) is ~10x faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


# -- supernet ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, pc_k, edge_norm",
    [((1, 8, 8), 1, False), ((1, 8, 8), 2, True), ((3, 32, 32), 1, False), ((3, 32, 32), 4, True)],
)
def test_supernet_forward_backward(shape: tuple[int, int, int], pc_k: int, edge_norm: bool) -> None:
    torch.manual_seed(0)
    net = SuperNet(C=8, num_classes=10, layers=3, in_channels=shape[0], pc_k=pc_k, edge_norm=edge_norm)
    arch = Architecture(edge_norm=edge_norm)
    assert not any(p is q for p in net.parameters() for q in arch.parameters())
    x = torch.randn(3, *shape)
    logits = net(x, arch)
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, p in arch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (arch.betas_normal is not None) == edge_norm
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_supernet_accepts_weights_and_rejects_mismatched_architecture() -> None:
    net = SuperNet(C=4, num_classes=3, layers=3, in_channels=1)
    arch = Architecture()
    x = torch.randn(2, 1, 8, 8)
    net.eval()
    assert torch.allclose(net(x, arch), net(x, arch()))
    with pytest.raises(ValueError, match="edge"):
        net(x, Architecture(edge_norm=True))


def test_supernet_imagenet_stem_224() -> None:
    net = SuperNet(C=4, num_classes=5, layers=2, in_channels=3, stem="imagenet")
    assert net(torch.randn(1, 3, 224, 224), net.new_architecture()).shape == (1, 5)


@pytest.mark.parametrize(
    "size, k, stride, padding, dilation",
    [(8, 5, 1, 2, 1), (8, 3, 2, 1, 1), (5, 5, 2, 4, 2), (2, 3, 1, 2, 2), (1, 5, 2, 2, 1), (8, 3, 1, 1, 1), (12, 5, 1, 2, 1)],
)
def test_depthwise_conv_matches_conv2d(size: int, k: int, stride: int, padding: int, dilation: int) -> None:
    # Small maps take the matrix path, larger ones F.conv2d: both must be the same function.
    torch.manual_seed(6)
    conv = DepthwiseConv2d(6, k, stride, padding, dilation).double()
    x = torch.randn(3, 6, size, size, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    ref = F.conv2d(x, conv.weight, None, stride, padding, dilation, groups=6)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(out, (x, conv.weight), g), torch.autograd.grad(ref, (x, conv.weight), g)
    )


def _single_edge_copy(group: MixedOp, e: int) -> MixedOp:
    """A one-edge MixedOp with the parameters of edge ``e`` of ``group`` (sliced copies)."""
    kept = [[k for k in group.op_indices if e in getattr(group, f"edges_{k}").tolist()]]
    single = MixedOp(group.C, group.stride, 1, group.pc_k, kept).double()
    for k, op, shared in zip(group.op_indices, group.ops, group.shared):
        edges = getattr(group, f"edges_{k}").tolist()
        if e not in edges:
            continue
        pos, m = edges.index(e), len(edges)
        state = {}
        for name, t in op.state_dict().items():
            if shared or t.dim() == 0:
                state[name] = t
            else:
                n = t.shape[0] // m
                state[name] = t[pos * n : (pos + 1) * n]
        single.ops[single.op_indices.index(k)].load_state_dict(state)
    return single


@pytest.mark.parametrize("stride, pc_k, masked", [(1, 1, False), (2, 1, False), (2, 2, True), (1, 2, True)])
def test_grouped_mixed_op_equals_separate_edges(stride: int, pc_k: int, masked: bool) -> None:
    torch.manual_seed(1)
    n = 3
    kept = [[0, 1, 3, 4, 7], [2, 3, 5, 6], [3, 4, 6, 7]] if masked else None
    group = MixedOp(8, stride, n, pc_k, kept).double()
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    w = torch.rand(n, len(PRIMITIVES), dtype=torch.float64)
    if kept is not None:
        for e in range(n):
            w[e, [k for k in range(len(PRIMITIVES)) if k not in kept[e]]] = 0
    out = group(x, w)
    side = (5 + stride - 1) // stride
    assert out.shape == (4, n, 8, side, side)
    for e in range(n):
        single = _single_edge_copy(group, e)
        ref = single(x, w[e : e + 1])[:, 0]
        torch.testing.assert_close(out[:, e], ref, rtol=1e-10, atol=1e-10)


def test_search_cell_edge_numbering() -> None:
    # Only skip_connect carries weight: node i = sum_j c[e(i, j)] * state_j, with e(i, j) numbered
    # node by node as the Architecture does.
    torch.manual_seed(2)
    cell = SearchCell(4, 4, 6, 6, 4, reduction=False, reduction_prev=False).double()
    s0, s1 = torch.randn(2, 6, 5, 5, dtype=torch.float64), torch.randn(2, 6, 5, 5, dtype=torch.float64)
    c = torch.rand(E, dtype=torch.float64) + 0.5
    weights = torch.zeros(E, len(PRIMITIVES), dtype=torch.float64)
    weights[:, P["skip_connect"]] = c
    out = cell(s0, s1, weights)
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    e = 0
    for i in range(4):
        states.append(sum(c[e + j] * states[j] for j in range(i + 2)))
        e += i + 2
    torch.testing.assert_close(out, torch.cat(states[2:], dim=1))


def test_reduction_cell_odd_size() -> None:
    cell = SearchCell(4, 4, 6, 6, 4, reduction=True, reduction_prev=False, pc_k=2)
    arch = Architecture()
    assert cell(torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5), arch().reduce).shape == (2, 16, 3, 3)


# -- architecture and genotype rule -------------------------------------------------------------


def _hand_weights() -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Normal-cell weights whose DARTS genotype is known, with traps for `none` and edge ranking."""
    w = torch.full((E, len(PRIMITIVES)), 0.01)
    # node 0: edges 0 (input 0), 1 (input 1). `none` strongest on edge 0 but never chosen.
    w[0, P["none"]] = 0.9
    w[0, P["sep_conv_3x3"]] = 0.5
    w[1, P["max_pool_3x3"]] = 0.3
    # node 1: edges 2, 3, 4 (inputs 0, 1, 2). Edge 3 has huge `none` and is dropped.
    w[2, P["dil_conv_3x3"]] = 0.2
    w[3, P["none"]] = 0.99
    w[3, P["skip_connect"]] = 0.05
    w[4, P["sep_conv_5x5"]] = 0.6
    # node 2: edges 5..8 (inputs 0..3): top two are inputs 3 and 1.
    w[5, P["avg_pool_3x3"]] = 0.1
    w[6, P["skip_connect"]] = 0.4
    w[7, P["dil_conv_5x5"]] = 0.15
    w[8, P["sep_conv_3x3"]] = 0.7
    # node 3: edges 9..13 (inputs 0..4): top two are inputs 4 and 0.
    w[9, P["dil_conv_5x5"]] = 0.35
    w[10, P["none"]] = 0.95
    w[11, P["max_pool_3x3"]] = 0.3
    w[13, P["sep_conv_5x5"]] = 0.8
    expected = [
        ("sep_conv_3x3", 0), ("max_pool_3x3", 1),
        ("sep_conv_5x5", 2), ("dil_conv_3x3", 0),
        ("sep_conv_3x3", 3), ("skip_connect", 1),
        ("sep_conv_5x5", 4), ("dil_conv_5x5", 0),
    ]
    return w, expected


def test_genotype_from_hand_set_weights() -> None:
    w, expected = _hand_weights()
    reduce = torch.full((E, len(PRIMITIVES)), 0.01)
    reduce[:, P["max_pool_3x3"]] = 0.5
    reduce[:, P["none"]] = 0.9
    g = derive_genotype(ArchWeights(w, reduce))
    assert list(g.normal) == expected
    assert g.normal_concat == (2, 3, 4, 5)
    # Reduce: every edge has max_pool strongest (after none); ties between edges go to the lower inputs.
    assert list(g.reduce) == [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4
    assert all(op != "none" for op, _ in g.normal + g.reduce)


def test_architecture_genotype_matches_rule() -> None:
    w, expected = _hand_weights()
    arch = Architecture()
    with torch.no_grad():
        arch.alphas_normal.copy_(w.log())
        arch.alphas_reduce.copy_(w.log())
    # The softmax of log(w) is w with each row normalised...
    torch.testing.assert_close(arch().normal, w / w.sum(dim=1, keepdim=True))
    g = arch.genotype()
    assert g == derive_genotype(arch(), op_mask=full_mask())
    # ...which reorders node 0 only: edge 1 (0.3 / 0.37) now beats edge 0 (0.5 / 1.46).
    assert list(g.normal) == [expected[1], expected[0]] + expected[2:]
    assert g.reduce == g.normal


def test_edge_normalisation_changes_edge_choice() -> None:
    w = torch.full((E, len(PRIMITIVES)), 0.01)
    w[0, P["sep_conv_3x3"]] = w[1, P["sep_conv_3x3"]] = 0.5
    w[2, P["sep_conv_3x3"]] = 0.5  # node 1, input 0
    w[3, P["skip_connect"]] = 0.4  # node 1, input 1
    w[4, P["dil_conv_3x3"]] = 0.3  # node 1, input 2
    plain = derive_genotype(ArchWeights(w, w))
    assert plain.normal[2:4] == (("sep_conv_3x3", 0), ("skip_connect", 1))
    edges = torch.ones(E)
    edges[2:5] = torch.tensor([0.1, 0.3, 0.6])
    normed = derive_genotype(ArchWeights(w, w, edges, torch.ones(E)))
    # 0.5*0.1=0.05, 0.4*0.3=0.12, 0.3*0.6=0.18: inputs 2 and 1 win.
    assert normed.normal[2:4] == (("dil_conv_3x3", 2), ("skip_connect", 1))
    assert normed.reduce == plain.reduce


def test_edge_softmax_is_per_node() -> None:
    arch = Architecture(edge_norm=True)
    ew = arch().normal_edges
    assert ew is not None
    sums = [float(ew[a:b].detach().sum()) for a, b in [(0, 2), (2, 5), (5, 9), (9, 14)]]
    assert sums == pytest.approx([1.0] * 4)


def test_masked_ops_excluded_from_softmax_and_genotype() -> None:
    w, _ = _hand_weights()
    w[0, P["dil_conv_5x5"]] = 0.2  # runner-up on edge 0
    mask = full_mask()
    mask.normal[0, P["sep_conv_3x3"]] = False  # the winner on edge 0 is pruned
    arch = Architecture(op_mask=mask)
    with torch.no_grad():
        arch.alphas_normal.copy_(w.log())
    weights = arch()
    assert float(weights.normal[0, P["sep_conv_3x3"]].detach()) == 0.0
    assert weights.normal.sum(dim=1).allclose(torch.ones(E))
    g = arch.genotype()
    assert set(g.normal[:2]) == {("max_pool_3x3", 1), ("dil_conv_5x5", 0)}


def test_max_skip_caps_skip_connections() -> None:
    w = torch.full((E, len(PRIMITIVES)), 0.01)
    for e, strength in zip(range(E), torch.linspace(0.2, 0.5, E)):
        w[e, P["skip_connect"]] = float(strength)
        w[e, P["sep_conv_3x3"]] = 0.1
    g = derive_genotype(ArchWeights(w, w))
    assert sum(op == "skip_connect" for op, _ in g.normal) == 8
    capped = derive_genotype(ArchWeights(w, w), max_skip=2)
    skips = [(op, idx) for op, idx in capped.normal if op == "skip_connect"]
    assert len(skips) == 2
    # The two strongest skips (highest edge numbers: node 3, inputs 4 and 3) survive.
    assert capped.normal[6:] == (("skip_connect", 4), ("skip_connect", 3))
    assert capped.reduce == g.reduce  # the cap applies to the normal cell only


# -- P-DARTS ----------------------------------------------------------------------------------------


def test_pdarts_stage_pruning_keeps_strongest_ops() -> None:
    torch.manual_seed(3)
    arch = Architecture(generator=torch.Generator().manual_seed(0), init_scale=1.0)
    new, mask = pdarts_next_stage(arch, Stage(11, 5))
    assert mask.normal.sum(dim=1).tolist() == [5] * E
    assert mask.reduce.sum(dim=1).tolist() == [5] * E
    top5 = arch().normal.topk(5, dim=1).indices
    assert all(set(top5[e].tolist()) == set(mask.normal[e].nonzero().flatten().tolist()) for e in range(E))
    assert torch.equal(new.mask_normal, mask.normal)
    # Next stage: 3 of the 5, a subset of them.
    new.alphas_normal.data.normal_()
    newer, mask3 = pdarts_next_stage(new, (17, 3), reinit=False)
    assert mask3.normal.sum(dim=1).tolist() == [3] * E
    assert bool((mask3.normal <= mask.normal).all())
    assert torch.equal(newer.alphas_normal, new.alphas_normal)
    with pytest.raises(ValueError, match="cannot keep 4"):
        prune_mask(newer, 4)


def test_pdarts_supernet_builds_only_kept_ops() -> None:
    arch = Architecture()
    _, mask = pdarts_next_stage(arch, (4, 3))
    small = pdarts_supernet((4, 3), mask, C=4, num_classes=3, in_channels=1)
    full = SuperNet(C=4, num_classes=3, layers=4, in_channels=1)
    assert len(small.cells) == 4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    next_arch = small.new_architecture()
    x = torch.randn(2, 1, 8, 8)
    assert small(x, next_arch).shape == (2, 3)
    with pytest.raises(ValueError, match="pruned"):
        small(x, Architecture())  # gives weight to pruned ops


# -- genotype files ------------------------------------------------------------------------------


def test_genotype_json_round_trip(tmp_path: Path) -> None:
    text = DARTS_V2.to_json()
    assert Genotype.from_json(text) == DARTS_V2
    path = DARTS_V2.save(tmp_path / "sub" / "g.json")
    assert Genotype.load(path) == DARTS_V2
    assert json.loads(path.read_text())["normal"][0] == ["sep_conv_3x3", 0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["normal"].__setitem__(0, ["conv_7x7", 0]), "unknown operation 'conv_7x7'"),
        (lambda d: d["normal"].__setitem__(1, ["sep_conv_3x3", 2]), "input index 2 out of range"),
        (lambda d: d["reduce"].__setitem__(7, ["max_pool_3x3", -1]), "input index -1"),
        (lambda d: d["normal"].__setitem__(2, ["none", 0]), "'none' is not a valid"),
        (lambda d: d["normal"].pop(), "two edges per intermediate node"),
        (lambda d: d.pop("reduce_concat"), "missing key"),
        (lambda d: d.__setitem__("normal_concat", [2, 3, 9]), "entry 9 out of range"),
        (lambda d: d["normal"].__setitem__(0, "sep_conv_3x3"), "expected \\[op, input index\\]"),
        (lambda d: d["normal"].__setitem__(0, ["sep_conv_3x3", "0"]), "must be an integer"),
    ],
)
def test_malformed_genotype_files(tmp_path: Path, edit: Callable[[dict[str, Any]], object], message: str) -> None:
    d = DARTS_V2.to_dict()
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(GenotypeError, match=message) as info:
        Genotype.load(path)
    assert str(path) in str(info.value)


def test_genotype_file_not_json_or_missing(tmp_path: Path) -> None:
    bad = tmp_path / "g.json"
    bad.write_text("{normal: oops")
    with pytest.raises(GenotypeError, match="not valid JSON"):
        Genotype.load(bad)
    with pytest.raises(GenotypeError, match="does not exist"):
        Genotype.load(tmp_path / "nope.json")


# -- evaluation network and training ---------------------------------------------------------------


@pytest.mark.parametrize("shape, layers", [((1, 8, 8), 3), ((3, 32, 32), 5)])
@pytest.mark.parametrize("auxiliary", [False, True])
def test_network_from_genotype_shapes(shape: tuple[int, int, int], layers: int, auxiliary: bool) -> None:
    torch.manual_seed(4)
    net = NetworkFromGenotype(DARTS_V2, C=8, num_classes=7, layers=layers, in_channels=shape[0], auxiliary=auxiliary)
    logits, aux = net.forward_aux(torch.randn(2, *shape))
    assert logits.shape == (2, 7)
    if auxiliary:
        assert aux is not None and aux.shape == (2, 7)
        (logits.sum() + aux.sum()).backward()
        assert net.auxiliary_head is not None
        assert all(p.grad is not None for p in net.auxiliary_head.parameters())
    else:
        assert aux is None
    assert net(torch.randn(2, *shape)).shape == (2, 7)


def test_drop_path_only_in_training() -> None:
    torch.manual_seed(5)
    net = NetworkFromGenotype(DARTS_V2, C=4, num_classes=3, layers=3, in_channels=1, drop_path_prob=0.5)
    x = torch.randn(8, 1, 8, 8)
    net.train()
    a, b = net(x), net(x)  # BatchNorm uses batch statistics: only drop path differs
    assert not torch.allclose(a, b)
    net.drop_path_prob = 0.0
    torch.testing.assert_close(net(x), net(x))
    net.drop_path_prob = 0.5
    net.eval()
    torch.testing.assert_close(net(x), net(x))


def test_train_from_scratch_on_digits() -> None:
    splits = data.digits(seed=0)
    seen: list[EpochRecord] = []
    result = train_from_scratch(
        DARTS_V2, splits, epochs=1, batch_size=64, lr=0.05, C=4, layers=3, seed=0,
        progress_callback=seen.append,
    )
    assert 0.0 <= result.test_error <= 100.0
    assert 0.0 <= result.balanced_error <= 100.0
    assert result.test_error < 85.0  # chance is 90 %; one epoch already learns something
    assert result.params > 0
    assert len(result.history) == 1 and seen == result.history
    rec = result.history[0]
    assert rec.epoch == 1 and math.isfinite(rec.train_loss) and 0 <= rec.train_acc <= 100
    assert rec.test_error == result.test_error


def test_num_edges_and_mask_shape() -> None:
    assert num_edges(4) == 14
    m = full_mask()
    assert isinstance(m, OpMask) and m.normal.shape == (14, len(PRIMITIVES))
    with pytest.raises(ValueError, match="without any operation"):
        bad = full_mask()
        bad.normal[3] = False
        Architecture(op_mask=bad)


def test_presets_cover_every_dataset() -> None:
    assert set(PRESETS) == set(data.DATASETS)
    assert PRESETS["cifar10"].evaluation == NetSize(36, 20, 96)  # the DARTS protocol
