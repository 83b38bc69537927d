"""On PYTHONPATH of a test's subprocess: trio's worker threads idle out after 1 s.

trio forks child processes from a thread of its thread cache, which exits after
10 idle seconds. A test that needs that thread gone sets this directory on the
child's PYTHONPATH instead of waiting 10 s.
"""

import trio._core._thread_cache as _thread_cache

_thread_cache.IDLE_TIMEOUT = 1
