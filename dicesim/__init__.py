import os
import time

#: perf_counter when dicesim was first imported: start-up timings count from here (the
#: interpreter's own start before it, ~20 ms, is not included)
IMPORTED_AT = time.perf_counter()

# libgomp (torch's CPU thread pool) spins only ~1000 rounds between parallel regions when
# it believes the machine is oversubscribed, then sleeps; waking its workers again for
# each of a step's small ops cost more than the ops on the 2-core VM (a 16-node mlp step
# took 2.1 ms instead of 1.3 ms). 300000 is libgomp's own unthrottled default. It must be
# set before torch loads libgomp, so here, ahead of every dicesim entry point.
os.environ.setdefault("GOMP_SPINCOUNT", "300000")
