"""Import an experiment script (experiments/<name>.py) and its default config as modules.

The scripts define their absl flags only when run, so importing them in tests
has no side effects and several scripts can share one test process.
"""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(path: pathlib.Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """experiments/<name>.py as module ``<name>_experiment``."""
    return _load(ROOT / "experiments" / f"{name}.py", f"{name}_experiment")


def default_config(name: str):
    """``get_config()`` of experiments/configs/<name>.py."""
    return _load(ROOT / "experiments" / "configs" / f"{name}.py", f"{name}_config").get_config()
