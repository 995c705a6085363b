"""ovr: one-vs-rest image classification on frozen pretrained features.

    import ovr
    X, y, classes = ovr.embed("DATA")              # an image folder -> embeddings (cached), labels, class names
    clf = ovr.OvRClassifier().fit(X, y)            # one independent head per class (a scikit-learn estimator)
    model = ovr.load("MODEL")                      # a model folder made by `ovr train`, with its backbone
    model.predict(["a.jpg"])                       # one dict per input: class, confidence, top, runner_up

Errors a user can fix are `ovr.OvrError`, one line each.
"""
from .errors import OvrError
from .version import __version__

__all__ = ["OvrError", "__version__", "embed", "load", "OvRClassifier", "SoftmaxClassifier"]


def __getattr__(name: str):
    # Lazy so `import ovr` and `ovr --help` do not pay for importing torch.
    if name in ("load", "embed"):
        from .apps import pipeline
        return getattr(pipeline, name)
    if name in ("OvRClassifier", "SoftmaxClassifier"):
        from .learn import estimators
        return getattr(estimators, name)
    raise AttributeError(f"module 'ovr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
