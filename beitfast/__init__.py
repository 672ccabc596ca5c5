"""beitfast: fast BEiT pre-training and fine-tuning.

>>> import beitfast
>>> model = beitfast.BEiT(beitfast.BEiTConfig.base())
>>> masks = beitfast.MaskingGenerator((14, 14), 75).batch(8)
>>> loss = model(images, bool_masked_pos=masks, labels=tokens)  # doctest: +SKIP
"""

from . import ops
from .config import BEiTConfig
from .masking import MaskingGenerator
from .model import BEiT
from .segmentation import BEiTForSegmentation

__version__ = "0.1.0"

__all__ = ["BEiT", "BEiTConfig", "BEiTForSegmentation", "MaskingGenerator", "ops", "__version__"]
