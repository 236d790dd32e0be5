"""What `smoothcert objectives` and `smoothcert models` list, known without importing torch.

The registries live in modules that import torch (seconds of start-up, more on a loaded
machine), so the built-in objectives' names and summaries and the built-in models' names are
written here too; a test holds them equal to the registries. Where a registry is already
imported (a plugin registered an objective, then called the command line) it is listed itself.
"""

from __future__ import annotations

import inspect
import sys

# The registries' contents in registration order, each objective with its docstring's first
# paragraph on one line.
BUILTIN_OBJECTIVES = {
    "gaussian": "Gaussian augmentation (Cohen 2019); with k > 1 the mean CE over the k draws "
                "(Salman 2019).",
    "adre": "ADREREG (Feng 2020, Algorithm 1).",
    "smoothadv": "SmoothAdv (Salman 2019): Gaussian augmentation at the smoothed classifier's "
                 "PGD point.",
    "adreadv": "ADREADV (Feng 2020): ADREREG at the PGD point of the ADRE-regularised attack.",
    "macer": "MACER (Zhai 2020): see macer_loss; k noisy copies per example.",
    "consistency": "Consistency regularisation (Jeong & Shin 2020) over k = m noisy copies; "
                   "with lam > 0 plus ADRE's regulariser −lam·l_adre (see consistency_loss).",
    "smoothmix": "SmoothMix (Jeong 2021): mixup between x and its adversary on the soft "
                 "smoothed classifier.",
    "denoiser-mse": "Denoiser, MSE (Salman 2020): mean over pixels of (D(x + delta) - x)^2; "
                    "`y` is unused.",
    "denoiser-stability": "Denoiser, stability (Salman 2020): CE of the frozen --classifier on "
                          "D(x + delta) against its prediction on x; logs the MSE and the "
                          "classifier's noisy accuracy behind the denoiser.",
}
BUILTIN_MODELS = ("lenet", "lenet_20_50", "cifar_resnet20", "cifar_resnet56", "cifar_resnet110",
                  "resnet50", "dncnn", "dncnn_small")


def summary(function: object) -> str:
    """The first paragraph of `function`'s docstring, on one line."""
    return (inspect.getdoc(function) or "").split("\n\n")[0].replace("\n", " ")


def objectives() -> dict[str, str]:
    """Each objective's name and summary: the registry's if it is imported, else the built-ins."""
    registry = sys.modules.get("smoothcert.objectives")
    if registry is None:
        return dict(BUILTIN_OBJECTIVES)
    return {name: summary(registry.get_objective(name)) for name in registry.list_objectives()}


def models() -> list[str]:
    """The models' names: the registry's if it is imported, else the built-ins."""
    registry = sys.modules.get("smoothcert.models.registry")
    return list(BUILTIN_MODELS) if registry is None else registry.list_models()
