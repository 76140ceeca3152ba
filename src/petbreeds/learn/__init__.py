"""The model and its training: network, optimiser and schedule, the loop, the learning-rate finder, checkpoints.

``model`` (body + fastai head, parameter groups, freezing), ``pretrained`` (ImageNet weights into
``models/pretrained``), ``schedule`` (AdamW, one-cycle), ``device`` and ``calibration`` (where and in which precision
to compute), ``distributed`` (torchrun, DDP), ``training`` (fit_one_cycle, validation, predictions), ``lr_find``,
``checkpoint`` (a trained model on disk with its input transforms) and ``interpret`` (confusion matrix, top
losses). Builds on ``data``; never imports ``serve`` or ``track``.
"""
