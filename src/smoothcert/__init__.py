"""smoothcert: certified L2 robustness by randomized smoothing (ADRE training, T-CERTIFY)."""

import importlib

__version__ = "0.1.0"

# Each public name and its module, imported on first use: `python -m smoothcert --help` and the
# torch-free parts (stats, analyze) load neither torch nor scipy.stats until they need them.
_HOMES = {
    "ABSTAIN": "stats",
    "Certificate": "stats",
    "certify_from_counts": "stats",
    "clopper_pearson_lower": "stats",
    "clopper_pearson_upper": "stats",
    "pb_upper_bound": "stats",
    "predict_from_counts": "stats",
    "CertifyAllResult": "smooth",
    "Smooth": "smooth",
    "load_checkpoint": "checkpoints",
    "load": "loading",
    "Loaded": "loading",
    "build_from_spec": "models.spec",
    "certify_dataset": "in_memory",
    "predict_dataset": "in_memory",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'smoothcert' has no attribute {name!r}")
