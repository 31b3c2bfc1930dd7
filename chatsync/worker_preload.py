"""What the reading workers' fork server imports before it forks any worker (see chatsync.worker_server).

The fork server imports :mod:`chatsync.workers` once for every worker, then freezes its heap: as Python's
``gc.freeze`` documentation advises before ``fork()``, so the workers' collections never touch (and so
never copy) the pages they share with the server, and so the server, which lives until the sync ends,
exits without walking that heap (it held the sync's output pipe open ~0.1 s longer, measured).
"""

import gc

import chatsync.workers  # noqa: F401  (imported for the workers it forks)

gc.freeze()
