"""Every built-in method, registered: importing this fills :mod:`forgetless.registry`.

The configuration imports it before validating method names. A plugin method is one module
that calls ``registry.register``; import it before loading a configuration that names it.
"""

from forgetless.merge import rules as merge_methods
from forgetless.mix import methods as mix_methods
from forgetless.recipes import strategies as continual_methods
from forgetless.select import methods as select_methods
from forgetless.train import methods as train_methods

__all__ = ["continual_methods", "merge_methods", "mix_methods", "select_methods", "train_methods"]
