"""Weight sharing (Deep Compression's k-means codebooks, SqueezeLLM's sensitivity weighting).
kmeans.py is the math, layout.py the stored form and its decoding, apply.py walks the model,
modules.py holds SharedLinear, format.py the folder, hf.py its transformers loader."""

from .apply import share
from .config import ShareConfig
from .format import load_shared, save_shared
from .hf import register_with_transformers
from .kmeans import share_weight, weighted_error, weighted_kmeans
from .layout import dequantize_shared, pack_codes, unpack_codes
from .modules import SharedLinear

__all__ = ["ShareConfig", "SharedLinear", "dequantize_shared", "load_shared", "pack_codes",
           "register_with_transformers", "save_shared", "share", "share_weight", "unpack_codes", "weighted_error",
           "weighted_kmeans"]

register_with_transformers()  # plain transformers loads shared folders once this package is imported
