"""smoothcert: certified L2 robustness by randomized smoothing (ADRE training, T-CERTIFY)."""

from .stats import (
    ABSTAIN,
    Certificate,
    certify_from_counts,
    clopper_pearson_lower,
    clopper_pearson_upper,
    pb_upper_bound,
    predict_from_counts,
)

__version__ = "0.1.0"

__all__ = [
    "ABSTAIN",
    "Certificate",
    "CertifyAllResult",
    "Smooth",
    "certify_from_counts",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "load_checkpoint",
    "pb_upper_bound",
    "predict_from_counts",
]


def __getattr__(name: str):
    # Imported on first use so that torch-free parts (stats, analyze) load without torch.
    if name in ("Smooth", "CertifyAllResult"):
        from . import smooth

        return getattr(smooth, name)
    if name == "load_checkpoint":
        from .checkpoints import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'smoothcert' has no attribute {name!r}")
