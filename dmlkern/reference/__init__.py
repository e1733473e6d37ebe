from .indices import *  # noqa: F401,F403
from .pair_reductions import *  # noqa: F401,F403
from .miners import *  # noqa: F401,F403
from .embedding_losses import *  # noqa: F401,F403
from .classification_losses import *  # noqa: F401,F403
from .pair_engine import *  # noqa: F401,F403
