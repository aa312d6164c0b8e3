"""hyperbagel core: BAGEL-7B-MoT inference with the Hyper-Bagel accelerations, without ComfyUI."""
__version__ = "0.1.0"


def __getattr__(name):
    if name == "BagelPipeline":
        from .pipeline import BagelPipeline
        return BagelPipeline
    raise AttributeError(name)
