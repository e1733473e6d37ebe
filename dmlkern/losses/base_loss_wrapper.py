import torch


class BaseLossWrapper(torch.nn.Module):
    """Base of the loss wrappers (PML's): subclasses list the loss classes they accept in
    ``supported_losses()`` and check the wrapped loss's class name in ``check_loss_support``."""

    def __init__(self, loss, **kwargs):
        super().__init__(**kwargs)
        self.check_loss_support(type(loss).__name__)

    @staticmethod
    def supported_losses():
        raise NotImplementedError

    @classmethod
    def check_loss_support(cls, loss_name):
        raise NotImplementedError
