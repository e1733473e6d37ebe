"""The class losses with K weight rows per class, on the class path (class_softmax.py) with its
grouped block kernel: SubCenterArcFace (a class's cosine is the max over its K sub-centres, then
ArcFace) and SoftTriple (a class's similarity S_ic = sum_k softmax_k(s_ick / gamma) s_ick, then
cross-entropy of la * (S - margin * onehot))."""
import torch

from ..reference import classification_losses as ref
from .class_softmax import ClassLayout, GroupedBlock
from .margin_softmax import _fused


def _max_over_group(cos):
    return cos.max(dim=-1).values


def subcenter_arcface(module, embeddings, labels, indices_tuple):
    s, m, k = float(module.scale), float(module.margin), int(module.sub_centers)
    layout = ClassLayout(columns=True, num_classes=int(module.num_classes), group=k)
    return _fused(module, embeddings, labels, indices_tuple, module.W, layout, kernel=GroupedBlock(_max_over_group, s, k),
                  target_logit=lambda x, w, cos: s * ref.arcface_target_logit(_max_over_group(cos), m))


def soft_triple(module, embeddings, labels, indices_tuple):
    la, gamma, margin, k = float(module.la), float(module._gamma), float(module.margin), int(module.centers_per_class)

    def relaxed_similarity(cos):  # PML's soft_triple_logits, on (N, c, K) cosines
        prob = torch.nn.functional.softmax(cos * (1.0 / gamma), dim=-1)
        return torch.sum(prob * cos, dim=-1)

    layout = ClassLayout(columns=True, num_classes=int(module.num_classes), group=k)
    return _fused(module, embeddings, labels, indices_tuple, module.fc, layout, kernel=GroupedBlock(relaxed_similarity, la, k),
                  target_logit=lambda x, w, cos: la * (relaxed_similarity(cos) - margin))
