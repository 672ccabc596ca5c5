"""Triton kernels of beitfast, installed as ``beitfast.kernels``.

This file imports nothing on purpose: each op lives in its own module (``attention``,
``cross_entropy``, ``patch_embed``) and is imported by the dispatcher only when its backend is used.
"""
