"""Recipes: the stages of each package composed into runs.

* :mod:`forgetless.recipes.adapt` — evaluate the base, [mix], [select], train or merge
  experts, evaluate, report (`forgetless run`);
* :mod:`forgetless.recipes.compare` — several arms of it side by side, with a frontier
  report (`forgetless compare`, `forgetless demo`);
* :mod:`forgetless.recipes.continual` — task sequences (`forgetless continual`).
"""
