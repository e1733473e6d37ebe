import torch

from .._validation import InvalidInputError


class MultipleLosses(torch.nn.Module):
    """The weighted sum of several losses, each optionally with its own miner.

    ``losses``: a list or a dict of losses; ``miners`` / ``weights``: the same kind of container
    (a list as long as ``losses``, None entries meaning no miner; a dict: miners for some of the
    keys, weights for every key). Weights default to 1. With miners, ``indices_tuple`` must be
    None. Mismatched containers raise ``InvalidInputError`` (a ValueError that is also PML's
    AssertionError).
    """

    def __init__(self, losses, miners=None, weights=None):
        super().__init__()
        self.is_dict = isinstance(losses, dict)
        self.losses = torch.nn.ModuleDict(losses) if self.is_dict else torch.nn.ModuleList(losses)
        self.miners = None
        if miners is not None:
            self.assertions_if_not_none(miners, match_all_keys=False)
            self.miners = torch.nn.ModuleDict(miners) if self.is_dict else torch.nn.ModuleList(miners)
        if weights is not None:
            self.assertions_if_not_none(weights, match_all_keys=True)
            self.weights = weights
        else:
            self.weights = {k: 1 for k in self.losses.keys()} if self.is_dict else [1] * len(losses)

    def forward(self, embeddings, labels, indices_tuple=None):
        if self.miners and indices_tuple is not None:
            raise InvalidInputError("MultipleLosses with miners: indices_tuple must be None")
        total_loss = 0
        items = self.losses.items() if self.is_dict else enumerate(self.losses)
        for i, loss_func in items:
            curr_indices_tuple = self.get_indices_tuple(i, embeddings, labels, indices_tuple)
            total_loss += loss_func(embeddings, labels, curr_indices_tuple) * self.weights[i]
        return total_loss

    def get_indices_tuple(self, i, embeddings, labels, indices_tuple):
        if self.miners:
            has_miner = (i in self.miners) if self.is_dict else (self.miners[i] is not None)
            if has_miner:
                indices_tuple = self.miners[i](embeddings, labels)
        return indices_tuple

    def assertions_if_not_none(self, x, match_all_keys):
        if x is None:
            return
        if self.is_dict:
            if not isinstance(x, dict):
                raise InvalidInputError("MultipleLosses: losses is a dict, so miners and weights must be dicts")
            keys = set(self.losses.keys())
            ok = sorted(x.keys()) == sorted(keys) if match_all_keys else all(k in keys for k in x.keys())
            if not ok:
                raise InvalidInputError(f"MultipleLosses: keys {sorted(x.keys())} do not match the losses' {sorted(keys)}")
        elif not isinstance(x, (list, tuple)) or len(x) != len(self.losses):
            raise InvalidInputError("MultipleLosses: miners and weights must be lists as long as losses")
