"""The library the stages share: the study's params, files, networks on disk, codec, training loop, sampling, metrics.

The house points one way: ``pipeline`` (flows, tracking) -> ``stages`` (one module per DVC stage) -> ``study`` (this
package) -> ``scm`` (the method's math, pure PyTorch). Nothing here imports ``stages`` or ``pipeline``; nothing here
picks a device or prints: the stage does, once.
"""
