"""Shared test helpers (importable as ``helpers``: pytest puts tests/ on sys.path through tests/conftest.py).

- :mod:`helpers.data`: scikit-learn digits in every form the tests use (1x8x8 tensors, a fixed train/test split and
  its loaders, 3x32x32 images, ImageFolder trees of PNGs).
- :mod:`helpers.user_module`: ``UserNet``, a user's own LightningModule (not timm, not SDQClassifier) with named
  bodies; a module of its own so that a fresh process can import the class, as a user's project would.
- :mod:`helpers.quantized`: quantized timm models and the searched-model setups (levels spread over the
  candidates, every layer frozen somewhere).

GPU tests carry ``@pytest.mark.gpu`` only: tests/conftest.py skips them where CUDA is not available.
"""
