"""Interpretability you can look at: features named by words and images, followed through
training, located in the image, and browsable as a static HTML atlas (paper Fig 4-6, 9-15,
supplementary Fig 1).

- :mod:`.naming`: each feature's top vocabulary words and top images (its name = top word);
- :mod:`.evolution`: the same naming at every training snapshot, matched by feature index;
- :mod:`.localisation`: per-token heatmaps and the pointing game against known boxes;
- :mod:`.figures`: the paper-shaped PNGs; :mod:`.site`: the HTML atlas;
- :mod:`.build`: one model's atlas from its extracted activations.
"""
