"""tests/backends/test_metric.py (the proximal step in a diagonal metric) on the Triton backend
under the interpreter (see conftest.py), with the shapes of test_structures_interpreted.py."""

import backends.test_structures as structures

structures.LONG = 1500  # still longer than the shrunk 1024-element chunk

from backends.test_metric import *  # noqa: E402,F401,F403  (the metric tests, collected here)
