"""ovr: one-vs-rest image classification on frozen pretrained features.

Data flow, one module per stage: data (images) -> features (embeddings, cache) -> heads / softmax
-> aggregate -> metrics / report; store keeps models on disk, train orchestrates, cli only parses.
"""
from .errors import OvrError

__version__ = "0.1.0"
__all__ = ["OvrError", "__version__", "load", "OvRClassifier", "SoftmaxClassifier"]


def __getattr__(name: str):
    # Lazy so `import ovr` and `ovr --help` do not pay for importing torch.
    if name == "load":
        from .pipeline import load
        return load
    if name in ("OvRClassifier", "SoftmaxClassifier"):
        from . import estimators
        return getattr(estimators, name)
    raise AttributeError(name)
