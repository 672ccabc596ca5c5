"""The fused ops of beitfast: one public function per op, several backends, one dispatcher.

>>> from beitfast import ops
>>> ops.rel_pos_attention(q, k, v, bias_table, rel_index)            # doctest: +SKIP
>>> ops.masked_lm_cross_entropy(hidden, weight, bias, labels, mask)  # doctest: +SKIP
>>> ops.masked_patch_embed(images, weight, bias, 16, mask, mask_token, cls_token)  # doctest: +SKIP
>>> ops.explain("attention", q=q, k=k, v=v, bias_table=t, rel_index=i, scale=0.125)  # doctest: +SKIP
"""

from .attention import rel_pos_attention, rel_pos_attention_packed, relative_position_bias
from .cross_entropy import masked_lm_cross_entropy
from .dispatch import backends, explain, select, set_preference
from .patch_embed import masked_patch_embed

__all__ = [
    "rel_pos_attention",
    "rel_pos_attention_packed",
    "relative_position_bias",
    "masked_lm_cross_entropy",
    "masked_patch_embed",
    "backends",
    "explain",
    "select",
    "set_preference",
]
