"""Drop-in integrations: :mod:`.lightning` (PyTorch Lightning) and :mod:`.transformers`
(the Hugging Face Trainer). Each needs its extra: ``pip install cloudckpt[lightning]``
or ``cloudckpt[transformers]``."""
