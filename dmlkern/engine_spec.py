"""The pair engine's vocabulary, defined once for every layer (ops, Triton, the reference);
it mirrors `csrc/pair_engine.h` (EnginePass, EngineTransform, EngineMining, EngineParams) and
docs/ENGINE.md."""
from typing import NamedTuple

import torch

# Passes: what each kernel sweep accumulates per row.
PASS_EXTREMA, PASS_LSE2, PASS_POS_SOFTPLUS, PASS_LIFTED_PAIRS, PASS_HINGE = 0, 1, 2, 3, 4
# Per-pair value v(s): s itself, the Euclidean distance of unit rows sqrt(max(2 - 2s, 0)), or
# CircleLoss's per-set values relu(relu_pos - s)(s - shift_pos), relu(s - relu_neg)(s - shift_neg)
# (the lse2 pass with mining 0 only; dv/ds is the relu weight alone, as PML detaches it).
TRANSFORM_DOT, TRANSFORM_UNIT_DISTANCE, TRANSFORM_CIRCLE = 0, 1, 2
# Which pairs a pass keeps: all, or those the Multi-Similarity miner keeps (from row_in's extrema).
MINING_NONE, MINING_MULTI_SIMILARITY = 0, 1
# Output columns per pass.
OUT_COLUMNS = {PASS_EXTREMA: 2, PASS_LSE2: 2, PASS_POS_SOFTPLUS: 3, PASS_LIFTED_PAIRS: 3, PASS_HINGE: 4}
# row_coef widths of the backward: the softmax terms (A_pos, LSE_pos, A_neg, LSE_neg, B_pos), with
# the lifted pairs' C_lift, or the hinge backward's (H_pos, H_neg).
COEF_WIDTH, COEF_WIDTH_LIFT, COEF_WIDTH_HINGE = 5, 6, 2


class EngineParams(NamedTuple):
    """The per-pass scalars (csrc/pair_engine.h's EngineParams): a positive pair's term is
    sc_pos * v + off_pos, a negative's sc_neg * v + off_neg; eps is the miner's margin. The next
    four are read by TRANSFORM_CIRCLE only (its per-set values). log_floor is the pos_softplus
    pass's floor F: its term is -log(exp(-softplus(z)) + e^F) (PML's NT-Xent -log(p + tiny));
    -inf, the plain softplus."""
    sc_pos: float = 1.0
    off_pos: float = 0.0
    sc_neg: float = 1.0
    off_neg: float = 0.0
    eps: float = 0.0
    relu_pos: float = 0.0
    shift_pos: float = 0.0
    relu_neg: float = 0.0
    shift_neg: float = 0.0
    log_floor: float = float("-inf")


# The ops take the first 5 params, 9 (with TRANSFORM_CIRCLE's constants) or all 10 (log_floor).
PARAMS_BASE, PARAMS_CIRCLE = 5, 9
PARAM_COUNTS = (PARAMS_BASE, PARAMS_CIRCLE, len(EngineParams._fields))


def stats_dtype(dtype):
    """The dtype of the engine's row statistics: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
