"""Project-wide pytest configuration: example_models is importable from the repository root."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
