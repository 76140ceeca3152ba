"""Experiments as a team sees them: MLflow runs built from the DVC outputs (``parent_run``, from what ``outputs``
reads, named by ``identity``, in the ``store``), the training stages' live runs (``live``), logging again
(``relog``), the Model Registry (``registry``), who produced a stage's outputs (``provenance``), the book's runs as DVC
experiments (``recipes``) and sharing them through a DVC remote (``sharing``). The top subpackage: builds on ``serve``
(the logged model), ``learn`` and ``data``.
"""
