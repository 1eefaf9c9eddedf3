"""The DARTS search space: supernet, architecture, genotype, evaluation network and its training.

Variants are options of the same classes: PC-DARTS (``SuperNet(pc_k=4, edge_norm=True)`` with
``Architecture(edge_norm=True)``) and P-DARTS (op masks, `pdarts_next_stage`).
"""

from .architecture import (
    Architecture,
    ArchWeights,
    OpMask,
    derive_genotype,
    edge_softmax,
    full_mask,
    num_edges,
)
from .genotype import DARTS_V2, Genotype, GenotypeError
from .network import AuxiliaryHead, NetworkFromGenotype, drop_path
from .ops import OPS, PRIMITIVES, DepthwiseConv2d, PointwiseConv2d, depthwise_conv2d, make_op, use_reference
from .pdarts import PDARTS_STAGES, Stage, pdarts_next_stage, pdarts_supernet, prune_mask
from .presets import PRESETS, NetSize, Preset
from .search import MixedOp, SearchCell, SuperNet, channel_shuffle
from .stem import build_stem, reduction_indices, stem_for
from .train import EpochRecord, EvalResult, count_parameters, evaluate, train_from_scratch

__all__ = [
    "PRIMITIVES",
    "OPS",
    "make_op",
    "DepthwiseConv2d",
    "PointwiseConv2d",
    "depthwise_conv2d",
    "use_reference",
    "Architecture",
    "ArchWeights",
    "OpMask",
    "derive_genotype",
    "edge_softmax",
    "full_mask",
    "num_edges",
    "Genotype",
    "GenotypeError",
    "DARTS_V2",
    "MixedOp",
    "SearchCell",
    "SuperNet",
    "channel_shuffle",
    "NetworkFromGenotype",
    "AuxiliaryHead",
    "drop_path",
    "PRESETS",
    "NetSize",
    "Preset",
    "Stage",
    "PDARTS_STAGES",
    "prune_mask",
    "pdarts_next_stage",
    "pdarts_supernet",
    "build_stem",
    "reduction_indices",
    "stem_for",
    "EpochRecord",
    "EvalResult",
    "train_from_scratch",
    "evaluate",
    "count_parameters",
]
