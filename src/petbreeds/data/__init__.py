"""Images in, batches out: everything between a data source and the tensors a model trains on.

The generated sample and the real archive's download (``sample_data``, ``download``, ``fetch``), the index of
labelled images and its exclusions (``labelling``), the split and the vocab (``splitting``), the CPU item stage
(``presizing``: decode, presize), the loaders (``dataloaders``), the device batch stage (``augment``: one resample,
lighting, normalisation), the ImageNet statistics (``imagenet``) and the pictures of batches (``show``). Imports
only the top-level plumbing (config, errors, atomic, machine, world), never ``learn``, ``serve`` or ``track``.
"""
