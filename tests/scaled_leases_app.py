"""The IM-Backend ASGI app with the rate limiter's lease constants scaled for a test, run as
`uvicorn scaled_leases_app:app` (tests/ on PYTHONPATH). The code is the module's own; only two tunables change:

- LEASE_SECONDS (how many seconds' worth of a service's rate one lease may hold) from IM_TEST_LEASE_SECONDS, so a
  rate slow enough that no token comes back during a test still gets leases of several tokens;
- LEASE_LIFE (how long unused lease tokens are kept) from IM_TEST_LEASE_LIFE, so a stalled machine cannot expire a
  lease in the middle of a test and make the count it checks depend on timing."""
import os

import im_backend

im_backend.LEASE_SECONDS = float(os.environ["IM_TEST_LEASE_SECONDS"])
im_backend.LEASE_LIFE = float(os.environ["IM_TEST_LEASE_LIFE"])
app = im_backend.app
