"""llmshrink: make Hugging Face language models smaller and cheaper while keeping them good."""

from .errors import UsageError
from .models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "UsageError", "load_model", "load_tokenizer", "resolve_model", "__version__"]
