"""deme-ray: DeMe (Decouple-then-Merge) finetuning of diffusion models, with the experts trained concurrently on Ray."""

from .model import ProjectedUNet2DModel, load_unet

__all__ = ["ProjectedUNet2DModel", "load_unet"]
