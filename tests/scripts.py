"""Imports an experiments/ script as a module, with its absl flags as the defined ones.

Scripts define their absl flags at import time, and two scripts may share flag
names (``dtype``, ``repeats``, ...). Tests of different scripts can run in one
process, so loading a script first removes the flags of the script loaded
before it (only flags the script itself defines: a library it imports first,
such as grain, keeps its flags); the module is re-imported whenever another
script was loaded since. Scripts that define their flags only when run
(``define_flags()`` under ``__main__``) need none of this.
"""
import importlib.util
import os
import sys

from absl import flags

_active = {"path": None, "module": None, "flags": ()}


def load_script(path: str, module_name: str):
    """The script at ``path`` as module ``module_name``, its flags defined (once per switch)."""
    if _active["path"] == path:
        return _active["module"]
    for name in _active["flags"]:
        if name in flags.FLAGS:
            delattr(flags.FLAGS, name)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    # Only the script's own flags: libraries it imports first (grain, ...) keep theirs.
    own = flags.FLAGS.flags_by_module_dict().get(module_name, ())
    _active.update(path=path, module=module, flags=tuple(flag.name for flag in own))
    return module


def experiment_config(name: str):
    """``get_config()`` of experiments/configs/<name>.py (a config file defines no flags)."""
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
