import os

# Every Ray process a test starts must keep to loopback and send no usage reports.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Local clusters run with Ray's token authentication, as the product starts them
# (fluxion_dist.server.ray_cluster): set before any test module imports Ray, which reads it once.
os.environ.setdefault("RAY_AUTH_MODE", "token")
