"""Small, faithful CPU-sized versions of the model families our users train, with random
weights built from code: each module has ``build_model``, ``make_batch`` and ``loss_fn``, and a
``test_*.py`` beside it that uses the pytest-modelcheck markers as a user would.

Run them with ``pytest --modelcheck example_models/``.
"""
