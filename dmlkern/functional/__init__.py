"""One function per loss with keyword hyperparameters, for users who don't want modules."""
from .classification import *  # noqa: F401,F403
from .embedding import *  # noqa: F401,F403
from .classification import __all__ as _classification_all
from .embedding import __all__ as _embedding_all

__all__ = list(_embedding_all) + list(_classification_all)
