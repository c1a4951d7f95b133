"""attentropy: entropy and varentropy of attention, per layer and head, for every generated token."""

__version__ = "0.1.0"

from .store import Run, load_run  # noqa: E402

__all__ = ["Run", "load_run", "__version__"]
