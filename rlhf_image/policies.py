"""Former home of the Ovis-Image and FLUX.1 adapters, kept so existing imports keep working: the adapters live in
`rlhf_image.families` now (one module per family)."""

from .families.flux import FluxPolicy
from .families.ovis_image import OVIS_SYSTEM_PROMPT, OvisImagePolicy

__all__ = ["FluxPolicy", "OVIS_SYSTEM_PROMPT", "OvisImagePolicy"]
