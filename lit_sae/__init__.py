"""lit-sae: TopK sparse autoencoders (Gao et al., 2024) trained with PyTorch Lightning."""

from importlib import import_module

from lit_sae._moved import install as _install_moved

__version__ = "0.1.0"

# Lazy attributes: `import lit_sae` stays cheap, and `lit_sae.X` works for every public class.
_EXPORTS = {
    "TopKSAE": "lit_sae.sae.model",
    "SAEOutput": "lit_sae.sae.model",
    "SAEModule": "lit_sae.train.module",
    "DeadLatentTracker": "lit_sae.callbacks.dead_latents",
    "FeatureHistograms": "lit_sae.callbacks.histograms",
    "ActivationDataModule": "lit_sae.data.datamodule",
    "SyntheticDataModule": "lit_sae.data.synthetic",
    "export_sae": "lit_sae.artifacts.export",
    "load_sae": "lit_sae.artifacts.load",
    "load_exported": "lit_sae.artifacts.export",
}

__all__ = list(_EXPORTS)

_install_moved()


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lit_sae' has no attribute {name!r}")
