"""Architecture maps per decoder family (``maps``) and the one scale fold with its float check (``folding``)."""

from llmq.arch.folding import FOLD_RTOL, FoldError, fold
from llmq.arch.maps import MAPS, ArchMap, NormKind, Producer, Subgroup, arch_for, check_map, replay_block

__all__ = ["FOLD_RTOL", "MAPS", "ArchMap", "FoldError", "NormKind", "Producer", "Subgroup", "arch_for",
           "check_map", "fold", "replay_block"]
