"""The activation store: every input the analysis needs, encoded once by a trained model.

:mod:`~pipeline.activations.inputs` says what to encode (torch-free Ray Datasets),
:mod:`~pipeline.activations.pool` runs a pool of model actors over them and lands each set
atomically; the extraction driver, the sparse layout and the reference encoder use both.
"""
