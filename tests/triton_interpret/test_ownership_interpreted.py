"""tests/test_ownership.py on the Triton backend under the interpreter (see conftest.py: the
``backend`` fixture is "triton" only here): memory a user holds, hooks, parameters replaced under
a Penalty, version counters, freeing, bounded caches. The schedule is shortened: the interpreter
runs each program in Python."""

import test_ownership as ownership

ownership.SCHEDULE_STEPS = 60

from test_ownership import *  # noqa: E402,F401,F403  (the ownership tests, collected here)

# The interpreter is not thread-safe (two threads launching kernels fail inside it); the
# threaded test runs on every other backend, and on the GPU machine with real Triton kernels.
del test_the_one_call_penalty_never_writes_its_coefficients_into_the_cached_penalty  # noqa: F821
