"""Delta compression: store a fine-tune as a small compressed difference from its base."""

from .compress import compress_delta
from .config import DeltaConfig
from .load import is_delta_folder, load_delta_model
from .serve import DeltaModel

__all__ = ["DeltaConfig", "DeltaModel", "compress_delta", "is_delta_folder", "load_delta_model"]
