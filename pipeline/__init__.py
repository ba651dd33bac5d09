"""sparseclip: natively sparse, interpretable CLIP (Sparse CLIP, Qin et al.) as a pipeline.

The library behind the DVC stages in ``stages/``: configuration (:mod:`pipeline.config`),
tracking (:mod:`pipeline.runtime.tracking`), data (:mod:`pipeline.data`), and one module per step of
the method. Everything here runs without Ray, DVC or MLflow unless a function says otherwise.
"""

__version__ = "0.1.0"
