"""Model zoo: prunable transformer building blocks and the backbones built from them.

Models know nothing of pruners. They expose multiplicative mask slots, physical slicing methods and a
token hook (see :mod:`models.layers`); pruners fill those in.
"""
