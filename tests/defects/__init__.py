# A package, so that this folder's conftest.py is imported as `defects.conftest` and does not
# replace tests/conftest.py under the module name `conftest` (which the other tests import from).
