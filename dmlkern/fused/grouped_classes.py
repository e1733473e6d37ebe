"""The class losses with K weight rows per class, on the class path (class_softmax.py) with its
grouped block kernel: SubCenterArcFace (a class's cosine is the max over its K sub-centres, then
ArcFace) and SoftTriple (a class's similarity S_ic = sum_k softmax_k(s_ick / gamma) s_ick, then
cross-entropy of la * (S - margin * onehot)). Each per-class reduction is written over the K
slices with elementwise ops, with its gradient by hand (GroupedBlock's contract)."""
import torch

from ..ops.grouped_class_op import REDUCE_MAX, REDUCE_SOFT
from ..reference import classification_losses as ref
from .class_softmax import ClassLayout, GroupedBlock
from .margin_softmax import _fused


class MaxOverGroup:
    """max_k s_k, as torch.max(dim=-1): the gradient goes to the first k attaining it."""
    kind, inv_gamma = REDUCE_MAX, 1.0  # the C++ kernel's reduce (inv_gamma unused)

    @staticmethod
    def value(s):
        v = s[..., 0]
        for k in range(1, s.shape[-1]):
            v = torch.maximum(v, s[..., k])
        return v

    @staticmethod
    def grad(s, v, w):
        g = torch.zeros_like(s)
        free = torch.ones_like(v, dtype=torch.bool)
        for k in range(s.shape[-1]):
            hit = free & (s[..., k] == v)
            g[..., k] = torch.where(hit, w, 0.0)
            free &= ~hit
        return g


class SoftAssignment:
    """S = sum_k q_k s_k with q = softmax(s / gamma) (PML's SoftTriple); dS/ds_k = q_k (1 + (s_k - S) / gamma)."""

    kind = REDUCE_SOFT  # the C++ kernel's reduce

    def __init__(self, gamma):
        self.inv_gamma = 1.0 / gamma

    def _q(self, s):
        z = s * self.inv_gamma
        top = MaxOverGroup.value(z)
        e = [torch.exp(z[..., k] - top) for k in range(s.shape[-1])]
        total = e[0]
        for t in e[1:]:
            total = total + t
        return [t / total for t in e]

    def value(self, s):
        q = self._q(s)
        v = q[0] * s[..., 0]
        for k in range(1, s.shape[-1]):
            v = v + q[k] * s[..., k]
        return v

    def grad(self, s, v, w):
        g = torch.empty_like(s)
        for k, q in enumerate(self._q(s)):
            g[..., k] = q * ((s[..., k] - v) * self.inv_gamma + 1) * w
        return g


def per_class(cos, k):
    """The targets' cosines as (N, K): the layout gives (N,) when K = 1."""
    return cos.reshape(cos.shape[0], k)


def subcenter_arcface(module, embeddings, labels, indices_tuple):
    s, m, k = float(module.scale), float(module.margin), int(module.sub_centers)
    layout = ClassLayout(columns=True, num_classes=int(module.num_classes), group=k)
    return _fused(module, embeddings, labels, indices_tuple, module.W, layout,
                  kernel=lambda backend: GroupedBlock(MaxOverGroup, s, k, backend),
                  target_logit=lambda x, w, cos: s * ref.arcface_target_logit(per_class(cos, k).max(dim=-1).values, m))


def soft_triple(module, embeddings, labels, indices_tuple):
    la, margin, k = float(module.la), float(module.margin), int(module.centers_per_class)
    reduce = SoftAssignment(float(module._gamma))
    layout = ClassLayout(columns=True, num_classes=int(module.num_classes), group=k)
    return _fused(module, embeddings, labels, indices_tuple, module.fc, layout,
                  kernel=lambda backend: GroupedBlock(reduce, la, k, backend),
                  target_logit=lambda x, w, cos: la * (reduce.value(per_class(cos, k)) - margin))
